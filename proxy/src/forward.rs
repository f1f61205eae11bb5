//! Byte forwarding between two connections: both directions at once, half-close propagated (EOF
//! on one side shuts down writing on the other), an idle deadline over both directions, and a
//! cancellation token (policy reload, drain). Each direction owns one buffer for the connection's
//! life: nothing is allocated per chunk.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const BUF: usize = 16 * 1024;

/// How a forwarded connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides closed.
    Done,
    Idle,
    Cancelled,
    /// A read or write failed (reset, broken pipe).
    Error,
}

#[derive(Debug, Clone, Copy)]
pub struct Totals {
    /// Bytes from the first argument to the second.
    pub forward: u64,
    /// Bytes from the second argument to the first.
    pub backward: u64,
    pub end: End,
}

pub async fn pipe<A, B>(a: A, b: B, idle: Duration, cancel: CancellationToken) -> Totals
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let activity = Arc::new(AtomicU64::new(0));
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    let (fwd, bwd) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let both = async {
        tokio::join!(one_way(ar, bw, &fwd, &activity, start), one_way(br, aw, &bwd, &activity, start))
    };
    let watchdog = async {
        loop {
            let last = Duration::from_millis(activity.load(Ordering::Relaxed));
            let quiet_until = start + last + idle;
            if Instant::now() >= quiet_until {
                return;
            }
            tokio::time::sleep_until(quiet_until).await;
        }
    };
    let end = tokio::select! {
        (x, y) = both => if x && y { End::Done } else { End::Error },
        () = watchdog => End::Idle,
        () = cancel.cancelled() => End::Cancelled,
    };
    Totals { forward: fwd.load(Ordering::Relaxed), backward: bwd.load(Ordering::Relaxed), end }
}

/// Copies until EOF, then shuts down the writer. `false` on an I/O error.
async fn one_way<R, W>(mut r: R, mut w: W, count: &AtomicU64, activity: &AtomicU64, start: Instant) -> bool
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) => {
                let _ = w.shutdown().await;
                return true;
            }
            Ok(n) => n,
            Err(_) => {
                let _ = w.shutdown().await;
                return false;
            }
        };
        if w.write_all(&buf[..n]).await.is_err() {
            return false;
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
        activity.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}
