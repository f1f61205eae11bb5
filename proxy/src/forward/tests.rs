use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use super::*;

/// client <-> [proxy: pipe or splice] <-> server, over real loopback sockets. The client sends
/// `size` bytes and half-closes; the server reads to EOF, answers with the count and closes.
async fn through(splice: bool, size: usize) -> (Totals, Vec<u8>) {
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_addr = server.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = server.accept().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        let sum: u64 = got.iter().map(|b| u64::from(*b)).sum();
        s.write_all(format!("{} {sum}", got.len()).as_bytes()).await.unwrap();
    });
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front_addr = front.local_addr().unwrap();
    let proxy = tokio::spawn(async move {
        let (down, _) = front.accept().await.unwrap();
        let up = TcpStream::connect(server_addr).await.unwrap();
        let (idle, cancel) = (Duration::from_secs(10), CancellationToken::new());
        if splice {
            splice_pipe(Leg::plain(down), Leg::plain(up), idle, cancel).await
        } else {
            pipe(down, up, idle, cancel).await
        }
    });
    let mut c = TcpStream::connect(front_addr).await.unwrap();
    let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    c.write_all(&data).await.unwrap();
    c.shutdown().await.unwrap();
    let mut answer = Vec::new();
    c.read_to_end(&mut answer).await.unwrap();
    (proxy.await.unwrap(), answer)
}

#[tokio::test]
async fn both_copies_carry_every_byte_and_the_half_close() {
    for splice in [false, true] {
        let size = 3 * 1024 * 1024 + 17;
        let (totals, answer) = through(splice, size).await;
        let sum: u64 = (0..size).map(|i| (i % 251) as u64).sum();
        assert_eq!(String::from_utf8(answer).unwrap(), format!("{size} {sum}"), "splice={splice}");
        assert_eq!(totals.forward, size as u64);
        assert_eq!(totals.end, End::Done);
    }
}

/// Pipe descriptors this process holds now.
fn pipes_open() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with("pipe:"))
                })
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn idle_spliced_connections_hold_no_pipes() {
    let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front_addr = front.local_addr().unwrap();
    let before = pipes_open();
    let mut clients = Vec::new();
    for _ in 0..40 {
        let mut c = TcpStream::connect(front_addr).await.unwrap();
        let (down, _) = front.accept().await.unwrap();
        let up = TcpStream::connect(echo_addr).await.unwrap();
        tokio::spawn(splice_pipe(
            Leg::plain(down),
            Leg::plain(up),
            Duration::from_secs(30),
            CancellationToken::new(),
        ));
        // Bytes both ways, so each direction has taken a pipe and given it back.
        c.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        c.read_exact(&mut got).await.unwrap();
        clients.push(c);
    }
    // Two per direction per connection (160) if held; the thread's spares (at most 16 pipes)
    // otherwise, with room for other tests in this process.
    let held = pipes_open().saturating_sub(before);
    assert!(held <= 2 * SPARE_PIPES + 16, "{held} pipe descriptors for 40 idle connections");
}

/// The two kinds of forwarding for `down` and `up`: copied (rustls legs), spliced (plain TCP).
fn forwarding(
    splice: bool,
    down: TcpStream,
    up: TcpStream,
    idle: Duration,
    cancel: CancellationToken,
) -> Pin<Box<dyn Future<Output = Totals> + Send>> {
    let legs = if splice { Legs::Spliced(Leg::plain(down), Leg::plain(up)) } else { Legs::Copied(down, up) };
    legs.forward(idle, cancel)
}

/// client <-> front (proxied) and the accepted pair: the client, and the proxy's two legs toward
/// a server that echoes (`echo`) or holds its connection open and silent.
async fn legs(echo: bool) -> (TcpStream, TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        if echo {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        } else {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
    });
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front_addr = front.local_addr().unwrap();
    let c = TcpStream::connect(front_addr).await.unwrap();
    let (down, _) = front.accept().await.unwrap();
    let up = TcpStream::connect(addr).await.unwrap();
    (c, down, up)
}

#[tokio::test]
async fn a_connection_that_keeps_moving_bytes_outlives_its_idle_deadline() {
    for splice in [false, true] {
        let (mut c, down, up) = legs(true).await;
        let idle = Duration::from_millis(300);
        let forwarding = tokio::spawn(forwarding(splice, down, up, idle, CancellationToken::new()));
        // A byte every 100 ms for a second: three idle deadlines' worth, never quiet for one.
        let mut last = std::time::Instant::now();
        for i in 0..10u8 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            c.write_all(&[i]).await.unwrap();
            let mut b = [0u8; 1];
            c.read_exact(&mut b).await.unwrap();
            assert_eq!(b[0], i);
            last = std::time::Instant::now();
        }
        let t = forwarding.await.unwrap();
        assert_eq!(t.end, End::Idle, "splice={splice}");
        assert_eq!((t.forward, t.backward), (10, 10), "splice={splice}");
        // Then quiet: closed one deadline after the last byte (activity is kept in whole ms).
        let quiet = last.elapsed();
        assert!(
            quiet >= idle - Duration::from_millis(20),
            "splice={splice}: closed {quiet:?} after the last byte"
        );
    }
}

#[tokio::test]
async fn an_idle_connection_is_closed() {
    for splice in [false, true] {
        let (_c, down, up) = legs(false).await;
        let t = forwarding(splice, down, up, Duration::from_millis(200), CancellationToken::new()).await;
        assert_eq!(t.end, End::Idle, "splice={splice}");
    }
}

#[tokio::test]
async fn a_cancelled_connection_ends_at_once() {
    for splice in [false, true] {
        let (_c, down, up) = legs(false).await;
        let cancel = CancellationToken::new();
        let forwarding = tokio::spawn(forwarding(splice, down, up, Duration::from_secs(30), cancel.clone()));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!forwarding.is_finished(), "splice={splice}: ended before it was cancelled");
        cancel.cancel();
        let t = tokio::time::timeout(Duration::from_secs(5), forwarding).await.unwrap().unwrap();
        assert_eq!(t.end, End::Cancelled, "splice={splice}");
    }
}
