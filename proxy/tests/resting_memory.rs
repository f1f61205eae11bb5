//! A resting HTTP/1.1 connection keeps none of hyper's buffers: the heap that connections served
//! by `http::server::serve` keep between requests, counted by an instrumented allocator. This is
//! the binary's only test, so nothing else allocates beside it. hyper's read buffer alone is
//! 8 KiB; a connection at rest keeps its socket, its smuggling guard and a small future (about
//! 1.2 KB in a debug build). How much that is in resident memory is measured by `bench/`; this
//! guards against the rest keeping a buffer again (it once kept hyper's read buffer through its
//! wait).

use std::alloc::System;
use std::io::{Read as _, Write as _};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use keycard_config::sidecar::HttpSettings;
use keycard_proxy::http::body;
use keycard_proxy::http::server::{builder, serve};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const CONNECTIONS: usize = 200;
/// Half of hyper's read buffer: a connection that kept either of hyper's buffers is over it.
const LIMIT: usize = 4 * 1024;

/// Opens `n` connections to `addr`, one after another, each answered once (1 KiB), and keeps them.
fn open(addr: std::net::SocketAddr, n: usize) -> Vec<std::net::TcpStream> {
    (0..n)
        .map(|i| {
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            c.write_all(format!("GET /{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).unwrap();
            let mut got = Vec::new();
            let mut chunk = [0u8; 4096];
            while !got.ends_with(&[b'.'; 16]) {
                let n = c.read(&mut chunk).unwrap();
                assert!(n > 0, "connection {i} closed after {:?}", String::from_utf8_lossy(&got));
                got.extend_from_slice(&chunk[..n]);
            }
            assert!(got.starts_with(b"HTTP/1.1 200 OK\r\n"), "{}", String::from_utf8_lossy(&got));
            c
        })
        .collect()
}

#[test]
fn a_resting_connection_keeps_none_of_hypers_buffers() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let server = builder(&HttpSettings::default(), Arc::new(|| {}));
    let (stopping, kill) = (CancellationToken::new(), CancellationToken::new());
    let (stop, killed) = (stopping.clone(), kill.clone());
    rt.spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let svc = service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(hyper::Response::new(body::full(vec![b'.'; 1024])))
            });
            tokio::spawn(serve(
                server.clone(),
                tcp,
                svc,
                Duration::from_secs(60),
                stop.clone(),
                killed.clone(),
            ));
        }
    });
    let settle = |rt: &tokio::runtime::Runtime| {
        rt.block_on(async { tokio::time::sleep(Duration::from_millis(300)).await })
    };

    // The clients run on their own thread while this one runs the server; a first batch sets up
    // what the runtime and the allocator keep for any number of connections.
    let client = |n| {
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || tx.send(open(addr, n)).unwrap());
        rx
    };
    let warm = rt.block_on(client(20)).unwrap();
    settle(&rt);
    let region = Region::new(GLOBAL);
    let held = rt.block_on(client(CONNECTIONS)).unwrap();
    settle(&rt);
    let change = region.change();
    let kept = change.bytes_allocated as isize - change.bytes_deallocated as isize + change.bytes_reallocated;
    let per_connection = kept / CONNECTIONS as isize;
    eprintln!("{CONNECTIONS} resting connections keep {kept} bytes of heap: {per_connection} each");
    assert!(
        per_connection < LIMIT as isize,
        "a resting connection keeps {per_connection} bytes of heap (limit {LIMIT}): a buffer is held through the rest"
    );

    // Still served after the rest, and a drain closes resting connections.
    let again = rt.block_on(client(1)).unwrap();
    stopping.cancel();
    settle(&rt);
    for mut c in held.into_iter().chain(warm).chain(again) {
        let mut rest = Vec::new();
        assert_eq!(c.read_to_end(&mut rest).unwrap(), 0, "a resting connection is closed by the drain");
    }
    kill.cancel();
}
