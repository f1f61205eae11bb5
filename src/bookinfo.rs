//! The Bookinfo services, small enough to read in one sitting: `productpage` calls `details` and
//! `reviews`, `reviews` calls `ratings`. `keycard demo` runs them in its own process; the compose
//! mesh runs each as `keycard bookinfo APP`. Every answer is JSON, and a page reports the status
//! of each call it made, so a hop the mesh refused shows in the page instead of hiding behind it.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How long one call to another service may take, connection included.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum App {
    Productpage,
    Details,
    Reviews,
    Ratings,
}

impl App {
    pub fn name(self) -> &'static str {
        match self {
            App::Productpage => "productpage",
            App::Details => "details",
            App::Reviews => "reviews",
            App::Ratings => "ratings",
        }
    }
}

/// Base URLs (`http://host:port`) of the services an app calls; in a mesh these point at the
/// sidecar (or, with interception, at the service itself).
#[derive(Debug, Clone, Default)]
pub struct Calls {
    pub details: Option<String>,
    pub reviews: Option<String>,
    pub ratings: Option<String>,
}

pub type HttpClient = Client<HttpConnector, Empty<Bytes>>;

struct State {
    app: App,
    calls: Calls,
    client: HttpClient,
}

/// Serves `app` on `listener` until `stop`.
pub async fn serve(app: App, listener: TcpListener, calls: Calls, stop: CancellationToken) {
    let state = std::sync::Arc::new(State { app, calls, client: client() });
    loop {
        let (tcp, _) = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

pub fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(CALL_TIMEOUT));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).pool_timer(TokioTimer::new()).build(connector)
}

async fn route(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    if req.method() != Method::GET {
        return reply(StatusCode::METHOD_NOT_ALLOWED, json!({"error": "only GET"}));
    }
    if path == "/health" {
        return reply(StatusCode::OK, json!({"status": "ok", "app": state.app.name()}));
    }
    let id = |prefix: &str| path.strip_prefix(prefix).and_then(|n| n.parse::<u32>().ok());
    match state.app {
        App::Productpage if path == "/productpage" => productpage(state).await,
        App::Details => match id("/details/") {
            Some(id) => reply(StatusCode::OK, details(id)),
            None => not_found(),
        },
        App::Reviews => match id("/reviews/") {
            Some(id) => reviews(state, id).await,
            None => not_found(),
        },
        App::Ratings => match id("/ratings/") {
            Some(id) => reply(StatusCode::OK, ratings(id)),
            None => not_found(),
        },
        App::Productpage => not_found(),
    }
}

async fn productpage(state: &State) -> Response<Full<Bytes>> {
    let (details, reviews) = tokio::join!(
        call(&state.client, state.calls.details.as_deref(), "/details/0"),
        call(&state.client, state.calls.reviews.as_deref(), "/reviews/0"),
    );
    reply(
        StatusCode::OK,
        json!({"product": {"id": 0, "title": "The Comedy of Errors"}, "details": details, "reviews": reviews}),
    )
}

fn details(id: u32) -> Value {
    json!({"id": id, "author": "William Shakespeare", "year": 1595, "type": "paperback",
           "pages": 200, "publisher": "PublisherA", "language": "English"})
}

async fn reviews(state: &State, id: u32) -> Response<Full<Bytes>> {
    let ratings = call(&state.client, state.calls.ratings.as_deref(), &format!("/ratings/{id}")).await;
    reply(
        StatusCode::OK,
        json!({"id": id, "reviews": [
            {"reviewer": "Reviewer1", "text": "Two sets of twins, one long day: a farce that still lands."},
            {"reviewer": "Reviewer2", "text": "Short, quick and funnier on stage than on the page."},
        ], "ratings": ratings}),
    )
}

fn ratings(id: u32) -> Value {
    json!({"id": id, "ratings": {"Reviewer1": 5, "Reviewer2": 4}})
}

/// `{"status": 200, "body": ...}`, or `{"error": ...}` when the call got no answer.
async fn call(client: &HttpClient, base: Option<&str>, path: &str) -> Value {
    let Some(base) = base else { return json!({"error": "not configured"}) };
    match get(client, &format!("{base}{path}"), &[]).await {
        Ok((status, body)) => {
            let body = serde_json::from_slice::<Value>(&body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
            json!({"status": status.as_u16(), "body": body})
        }
        Err(e) => json!({"error": e}),
    }
}

/// One GET with extra headers: the status and the whole body, or why there was none.
pub async fn get(
    client: &HttpClient,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<(StatusCode, Bytes), String> {
    send(client, Method::GET, url, headers).await
}

/// One request without a body: the status and the whole body, or why there was none.
pub async fn send(
    client: &HttpClient,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<(StatusCode, Bytes), String> {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Empty::new()).map_err(|e| format!("bad request: {e}"))?;
    let exchange = async {
        let resp = client.request(req).await.map_err(|e| describe(&e))?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(CALL_TIMEOUT, exchange).await.unwrap_or_else(|_| Err("timed out".into()))
}

/// The innermost cause of a client error: "connection reset by peer" says more than "client error".
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut inner = e;
    while let Some(next) = inner.source() {
        inner = next;
    }
    inner.to_string()
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    resp
}

fn not_found() -> Response<Full<Bytes>> {
    reply(StatusCode::NOT_FOUND, json!({"error": "not found"}))
}
