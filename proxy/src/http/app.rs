//! The inbound sidecar's connections to its app (plain TCP to the port's `app` address): HTTP/1.1
//! connections carry one request at a time and wait, most recently used first, for the next;
//! HTTP/2 shares one connection. A request that a reused connection never took (the app had
//! closed it) is sent again on a new one.
//!
//! hyper-util's pooled client did this before; per request it hashed its pool key, spawned a task
//! to wait for the connection to be ready again and ran its checkout machinery, about 10,000
//! instructions of an L7 sidecar's 107,000 (callgrind, bench/README.md).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::body::Body;
use super::idle::{self, Idle, SendError};
use crate::forward::{self, ConnectError};

/// Why a request did not reach the app or got no response.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("connecting to the app: {0}")]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

impl AppError {
    /// No connection could be made (Envoy's `UF`), as opposed to one that failed (`UC`).
    pub fn is_connect(&self) -> bool {
        matches!(self, AppError::Connect(_))
    }
}

impl From<SendError<AppError>> for AppError {
    fn from(e: SendError<AppError>) -> Self {
        match e {
            SendError::Connect(e) => e,
            SendError::Http(e) => AppError::Http(e),
        }
    }
}

pub struct AppPool {
    addr: SocketAddr,
    connect_timeout: Duration,
    h1: Arc<Idle<()>>,
    h2: Mutex<Option<http2::SendRequest<Body>>>,
    h2_connecting: tokio::sync::Mutex<()>,
}

/// An HTTP/1.1 connection lent to one request (see `http::idle`).
pub type Lease = idle::Lease<()>;

impl AppPool {
    pub fn new(addr: SocketAddr, connect_timeout: Duration, idle_timeout: Duration) -> Arc<Self> {
        Arc::new(AppPool {
            addr,
            connect_timeout,
            h1: Idle::new(idle_timeout),
            h2: Mutex::new(None),
            h2_connecting: tokio::sync::Mutex::new(()),
        })
    }

    /// Sends `req` over HTTP/1.1; the lease goes with the response body.
    pub async fn send_h1(&self, req: Request<Body>) -> Result<(Response<Incoming>, Lease), AppError> {
        let connect = || async { Ok((self.connect_h1().await?, ())) };
        Ok(self.h1.send(req, |()| true, connect).await?)
    }

    /// Sends `req` over the port's HTTP/2 connection (made when there is none).
    pub async fn send_h2(&self, mut req: Request<Body>) -> Result<Response<Incoming>, AppError> {
        let current = self.h2.lock().unwrap_or_else(PoisonError::into_inner).clone();
        if let Some(mut send) = current.filter(|s| !s.is_closed()) {
            match send.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
                Err(e) => req = idle::not_taken(e)?,
            }
        }
        let mut send = self.connect_h2().await?;
        Ok(send.send_request(req).await?)
    }

    async fn connect(&self) -> Result<TokioIo<TcpStream>, AppError> {
        Ok(TokioIo::new(forward::connect(self.addr, self.connect_timeout).await?))
    }

    async fn connect_h1(&self) -> Result<http1::SendRequest<Body>, AppError> {
        let (send, conn) = http1::handshake(self.connect().await?).await?;
        // Ends when the app closes the connection or every handle to it is dropped.
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "app connection ended");
            }
        });
        Ok(send)
    }

    async fn connect_h2(&self) -> Result<http2::SendRequest<Body>, AppError> {
        let _one_at_a_time = self.h2_connecting.lock().await;
        let current = self.h2.lock().unwrap_or_else(PoisonError::into_inner).clone();
        if let Some(send) = current.filter(|s| !s.is_closed()) {
            return Ok(send);
        }
        let (send, conn) = http2::Builder::new(super::SpawnBoxed)
            .timer(TokioTimer::new())
            .handshake(self.connect().await?)
            .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "app connection ended");
            }
        });
        *self.h2.lock().unwrap_or_else(PoisonError::into_inner) = Some(send.clone());
        Ok(send)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    use std::time::Instant;

    use super::*;
    use crate::http::body;

    /// An HTTP/1.1 app on 127.0.0.1 answering every request `ok`, counting the connections it
    /// accepted and those its clients closed; with `close_after`, it closes each connection that
    /// long after its first response (as an app's own keep-alive timeout would).
    struct App {
        addr: SocketAddr,
        accepted: Arc<AtomicUsize>,
        closed_by_client: Arc<AtomicUsize>,
    }

    async fn app(close_after: Option<Duration>) -> App {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, closed_by_client) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (a, c) = (accepted.clone(), closed_by_client.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let c = c.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    loop {
                        let n = match s.read(&mut buf).await {
                            Ok(0) | Err(_) => {
                                c.fetch_add(1, Ordering::SeqCst);
                                return;
                            }
                            Ok(n) => n,
                        };
                        head.extend_from_slice(&buf[..n]);
                        while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                            head.drain(..end + 4);
                            let resp = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if s.write_all(resp).await.is_err() {
                                return;
                            }
                            if let Some(after) = close_after {
                                tokio::time::sleep(after).await;
                                return;
                            }
                        }
                    }
                });
            }
        });
        App { addr, accepted, closed_by_client }
    }

    fn get() -> Request<Body> {
        Request::get("/x").header("host", "app").body(body::empty()).unwrap()
    }

    /// Sends one request and reads the response to its end; the lease goes back then.
    async fn exchange(pool: &Arc<AppPool>) -> Result<String, AppError> {
        let (resp, lease) = pool.send_h1(get()).await?;
        let bytes = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        drop(lease);
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    #[tokio::test]
    async fn sequential_requests_share_one_connection() {
        let app = app(None).await;
        let pool = AppPool::new(app.addr, Duration::from_secs(2), Duration::from_secs(90));
        for _ in 0..5 {
            assert_eq!(exchange(&pool).await.unwrap(), "ok");
        }
        assert_eq!(app.accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn concurrent_requests_get_their_own_connections_and_keep_them() {
        let app = app(None).await;
        let pool = AppPool::new(app.addr, Duration::from_secs(2), Duration::from_secs(90));
        // Three responses held open at once need three connections...
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(pool.send_h1(get()).await.unwrap());
        }
        assert_eq!(app.accepted.load(Ordering::SeqCst), 3);
        for (resp, lease) in held {
            let _ = resp.into_body().collect().await;
            drop(lease);
        }
        // ...which then carry the next ones.
        for _ in 0..6 {
            assert_eq!(exchange(&pool).await.unwrap(), "ok");
        }
        assert_eq!(app.accepted.load(Ordering::SeqCst), 3);
    }

    /// A request body that sends one chunk and then never ends (an upload still going).
    struct Stalled(bool);

    impl hyper::body::Body for Stalled {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
            if self.0 {
                return std::task::Poll::Pending;
            }
            self.0 = true;
            std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(bytes::Bytes::from_static(b"abc")))))
        }
    }

    #[tokio::test]
    async fn a_request_does_not_wait_behind_an_upload_the_app_already_answered() {
        let app = app(None).await;
        let pool = AppPool::new(app.addr, Duration::from_secs(2), Duration::from_secs(90));
        let upload = Request::post("/up").header("host", "app").header("content-length", "1000");
        let (resp, lease) = pool.send_h1(upload.body(body::boxed(Stalled(false))).unwrap()).await.unwrap();
        let _ = resp.into_body().collect().await;
        drop(lease);
        let next = tokio::time::timeout(Duration::from_secs(5), exchange(&pool)).await;
        assert_eq!(next.expect("the next request waited for the upload").unwrap(), "ok");
        assert_eq!(app.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_the_app_closed_is_replaced_without_failing_the_request() {
        let app = app(Some(Duration::from_millis(20))).await;
        let pool = AppPool::new(app.addr, Duration::from_secs(2), Duration::from_secs(90));
        for i in 1..=4 {
            assert_eq!(exchange(&pool).await.unwrap(), "ok", "request {i}");
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
        assert_eq!(app.accepted.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn connections_idle_past_the_timeout_are_closed() {
        let app = app(None).await;
        let pool = AppPool::new(app.addr, Duration::from_secs(2), Duration::from_millis(150));
        assert_eq!(exchange(&pool).await.unwrap(), "ok");
        let deadline = Instant::now() + Duration::from_secs(5);
        while app.closed_by_client.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "the idle connection was never closed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // And the next request opens a new one.
        assert_eq!(exchange(&pool).await.unwrap(), "ok");
        assert_eq!(app.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn nothing_listening_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let pool = AppPool::new(addr, Duration::from_secs(2), Duration::from_secs(90));
        let err = exchange(&pool).await.unwrap_err();
        assert!(err.is_connect(), "{err}");
        let err = pool.send_h2(get()).await.unwrap_err();
        assert!(err.is_connect(), "{err}");
    }

    #[tokio::test]
    async fn http2_requests_share_one_connection_and_survive_its_loss() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let a = accepted.clone();
        let kill = Arc::new(tokio::sync::Notify::new());
        let k = kill.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let k = k.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(Response::new(body::full("h2")))
                    });
                    let conn = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc);
                    tokio::select! {
                        _ = conn => {}
                        () = k.notified() => {}
                    }
                });
            }
        });
        let pool = AppPool::new(addr, Duration::from_secs(2), Duration::from_secs(90));
        let h2_get = || Request::get(format!("http://{addr}/x")).body(body::empty()).unwrap();
        let mut all = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let (pool, req) = (pool.clone(), h2_get());
            all.spawn(async move { pool.send_h2(req).await.unwrap().into_body().collect().await.unwrap() });
        }
        for body in all.join_all().await {
            assert_eq!(&body.to_bytes()[..], b"h2");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        // The app drops the connection: the next request gets a new one.
        kill.notify_waiters();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let closed = pool.h2.lock().unwrap().as_ref().is_none_or(http2::SendRequest::is_closed);
            if closed {
                break;
            }
            assert!(Instant::now() < deadline, "the pool never saw the connection close");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let body = pool.send_h2(h2_get()).await.unwrap().into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"h2");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }
}
