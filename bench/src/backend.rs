//! The backend every system forwards to: HTTP/1.1 with keep-alive, `GET /1k` answers 1 KiB,
//! `GET /bulk/N` answers N bytes (for throughput), `Connection: close` is honoured. Small on
//! purpose, so that it costs the same behind every system and is never the bottleneck. It runs
//! as its own process (`keycard-bench backend`), so its CPU and memory are not the client's.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// Response bodies are served from this block, repeated.
const CHUNK: usize = 64 * 1024;
/// The largest request head read.
const MAX_HEAD: usize = 16 * 1024;

pub fn run(listen: SocketAddr) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(listen).await?;
        loop {
            let (tcp, _) = listener.accept().await?;
            tokio::spawn(serve(tcp));
        }
    })
}

fn head(len: usize, close: bool) -> Vec<u8> {
    let connection = if close { "Connection: close\r\n" } else { "" };
    format!("HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\n{connection}\r\n")
        .into_bytes()
}

async fn serve(mut tcp: TcpStream) {
    let _ = tcp.set_nodelay(true);
    let small: Vec<u8> = [head(1024, false), vec![b'k'; 1024]].concat();
    let chunk = vec![b'b'; CHUNK];
    let mut buf = vec![0u8; MAX_HEAD];
    let mut filled = 0;
    loop {
        // Parse what is buffered; read more only when the head is incomplete.
        let parsed = {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf[..filled]) {
                Ok(httparse::Status::Complete(n)) => {
                    let close = req.headers.iter().any(|h| {
                        h.name.eq_ignore_ascii_case("connection") && h.value.eq_ignore_ascii_case(b"close")
                    });
                    Some((n, req.path.unwrap_or("/").to_owned(), close))
                }
                Ok(httparse::Status::Partial) => None,
                Err(_) => return,
            }
        };
        let Some((n, path, close)) = parsed else {
            if filled == buf.len() {
                return;
            }
            match tcp.read(&mut buf[filled..]).await {
                Ok(0) | Err(_) => return,
                Ok(m) => filled += m,
            }
            continue;
        };
        buf.copy_within(n..filled, 0);
        filled -= n;
        let ok = match path.strip_prefix("/bulk/").and_then(|s| s.parse::<usize>().ok()) {
            Some(len) => bulk(&mut tcp, len, close, &chunk).await,
            None if close => tcp.write_all(&[head(1024, true), vec![b'k'; 1024]].concat()).await.is_ok(),
            None => tcp.write_all(&small).await.is_ok(),
        };
        if !ok || close {
            let _ = tcp.shutdown().await;
            return;
        }
    }
}

async fn bulk(tcp: &mut TcpStream, len: usize, close: bool, chunk: &[u8]) -> bool {
    if tcp.write_all(&head(len, close)).await.is_err() {
        return false;
    }
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len());
        if tcp.write_all(&chunk[..n]).await.is_err() {
            return false;
        }
        left -= n;
    }
    true
}
