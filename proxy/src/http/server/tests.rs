use std::collections::VecDeque;
use std::convert::Infallible;

use http_body_util::BodyExt as _;
use hyper::service::service_fn;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::*;

/// A response body that sends its chunks `gap` apart (an app that streams slowly).
struct Slow {
    chunks: VecDeque<Bytes>,
    gap: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl HttpBody for Slow {
    type Data = Bytes;
    type Error = super::super::body::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let gap = self.gap;
        let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(gap)));
        ready!(sleep.as_mut().poll(cx));
        self.sleep = None;
        Poll::Ready(self.chunks.pop_front().map(|c| Ok(Frame::data(c))))
    }
}

/// Answers `/slow` with three chunks 150 ms apart, anything else with the method, path and
/// request body size.
async fn answer(req: hyper::Request<Incoming>) -> Result<hyper::Response<Body>, Infallible> {
    if req.uri().path() == "/slow" {
        let chunks = [&b"one,"[..], b"two,", b"three"].into_iter().map(Bytes::from_static).collect();
        let body = Slow { chunks, gap: Duration::from_millis(150), sleep: None };
        return Ok(hyper::Response::new(body.boxed_unsync()));
    }
    let line = format!("{} {}", req.method(), req.uri().path());
    let n = req.into_body().collect().await.map(|b| b.to_bytes().len()).unwrap_or(usize::MAX);
    Ok(hyper::Response::new(super::super::body::full(format!("{line} {n}"))))
}

struct Served {
    addr: std::net::SocketAddr,
    stopping: CancellationToken,
    task: JoinHandle<u32>,
}

/// One connection served on a fresh listener with `idle` as its idle deadline, resting once
/// quiet for `rest_after`.
async fn serve_one(idle: Duration, rest_after: Duration) -> Served {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stopping = CancellationToken::new();
    let stop = stopping.clone();
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let settings = HttpSettings { rest_after, ..HttpSettings::default() };
        let server = builder(&settings, Arc::new(|| {}));
        let svc = service_fn(answer);
        serve(server, tcp, svc, idle, stop, CancellationToken::new()).await
    });
    Served { addr, stopping, task }
}

/// Reads until what arrived contains `want`.
async fn read_until(c: &mut TcpStream, want: &str) -> String {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(want) {
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("bytes within 5 s after {:?}", String::from_utf8_lossy(&got)))
            .unwrap();
        assert!(n > 0, "closed early after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8(got).unwrap()
}

async fn closed(c: &mut TcpStream) -> bool {
    let mut rest = Vec::new();
    matches!(tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest)).await, Ok(Ok(0)))
}

#[tokio::test]
async fn keep_alive_requests_rest_between_them_and_every_one_is_answered() {
    let s = serve_one(Duration::from_secs(30), Duration::ZERO).await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    for i in 0..3 {
        c.write_all(format!("GET /seq/{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        let r = read_until(&mut c, &format!("GET /seq/{i} 0")).await;
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(!r.to_ascii_lowercase().contains("connection: close"), "{r}");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    // A body that comes in two writes, the second after the connection could have rested.
    c.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.write_all(b"world").await.unwrap();
    read_until(&mut c, "POST /upload 10").await;
    // A head split across writes.
    c.write_all(b"GET /spl").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.write_all(b"it HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    read_until(&mut c, "GET /split 0").await;
    drop(c);
    let rests = s.task.await.unwrap();
    assert!(rests >= 5, "the connection rested {rests} times between 5 requests");
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let s = serve_one(Duration::from_secs(30), Duration::ZERO).await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    let two = "GET /a HTTP/1.1\r\nHost: x\r\n\r\nPOST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET /c HTTP/1.1\r\nHost: x\r\n\r\n";
    c.write_all(two.as_bytes()).await.unwrap();
    let r = read_until(&mut c, "GET /c 0").await;
    let (a, b) = (r.find("GET /a 0").unwrap(), r.find("POST /b 3").unwrap());
    assert!(a < b && b < r.find("GET /c 0").unwrap(), "{r}");
    c.write_all(b"GET /d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    read_until(&mut c, "GET /d 0").await;
    assert!(closed(&mut c).await, "a request asking to close closes the connection");
    s.task.await.unwrap();
}

#[tokio::test]
async fn a_slow_response_body_is_not_cut_by_resting() {
    // At once, and with a busy connection going quiet (150 ms gaps) in the middle of the body.
    for rest_after in [Duration::ZERO, Duration::from_millis(100)] {
        let s = serve_one(Duration::from_secs(30), rest_after).await;
        let mut c = TcpStream::connect(s.addr).await.unwrap();
        c.write_all(b"GET /warm HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        read_until(&mut c, "GET /warm 0").await;
        c.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let r = read_until(&mut c, "\r\n0\r\n\r\n").await;
        assert!(r.contains("one,") && r.contains("two,") && r.contains("three"), "{r}");
        c.write_all(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        read_until(&mut c, "GET /after 0").await;
        drop(c);
        assert!(s.task.await.unwrap() >= 1, "rest_after {rest_after:?}");
    }
}

#[tokio::test]
async fn a_new_connection_rests_after_its_first_response() {
    let s = serve_one(Duration::from_secs(30), Duration::from_secs(10)).await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(b"GET /once HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    read_until(&mut c, "GET /once 0").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(c);
    assert_eq!(s.task.await.unwrap(), 1, "rested without waiting out rest_after");
}

#[tokio::test]
async fn a_busy_keep_alive_connection_rests_only_once_it_goes_quiet() {
    let s = serve_one(Duration::from_secs(30), Duration::from_secs(1)).await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    // Rests after the first response (a new connection), then is busy: 19 more back to back.
    for i in 0..20 {
        c.write_all(format!("GET /busy/{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        read_until(&mut c, &format!("GET /busy/{i} 0")).await;
    }
    // Quiet for a second: rests. The next request, after the quiet, rests again at once
    // unless the one behind it comes before hyper looks for it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for path in ["/after-quiet", "/and-again"] {
        c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        read_until(&mut c, &format!("GET {path} 0")).await;
    }
    drop(c);
    let rests = s.task.await.unwrap();
    assert!((2..=4).contains(&rests), "22 requests, one quiet second and a half: {rests} rests");
}

#[tokio::test]
async fn a_resting_connection_still_meets_its_idle_deadline_and_drain() {
    let s = serve_one(Duration::from_millis(300), Duration::from_millis(100)).await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    read_until(&mut c, "GET /x 0").await;
    let started = Instant::now();
    assert!(closed(&mut c).await, "closed at the idle deadline");
    assert!(started.elapsed() >= Duration::from_millis(200), "{:?}", started.elapsed());
    assert_eq!(s.task.await.unwrap(), 1);

    let s = serve_one(Duration::from_secs(30), Duration::ZERO).await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(b"GET /y HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    read_until(&mut c, "GET /y 0").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.stopping.cancel();
    assert!(closed(&mut c).await, "drain closes a connection between requests");
    assert_eq!(s.task.await.unwrap(), 1);
}

#[tokio::test]
async fn http2_by_its_preface_is_still_served() {
    let s = serve_one(Duration::from_secs(30), Duration::ZERO).await;
    let tcp = TcpStream::connect(s.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    for path in ["/h2/1", "/h2/2"] {
        let req = hyper::Request::get(format!("http://x{path}"))
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, format!("GET {path} 0"));
    }
    drop(send);
    assert_eq!(s.task.await.unwrap(), 0, "HTTP/2 connections are served whole");
}
