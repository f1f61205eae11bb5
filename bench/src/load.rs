//! The load generator: blocking sockets on plain threads, one thread per keep-alive connection, so
//! that a request leaves when it is due and nothing else in this process delays it.
//!
//! The paced run is open-loop: request `i` is due at `t0 + i / rate`, spread round-robin over the
//! connections, and its latency is measured from when it was *due*, not from when it was sent. A
//! system that stalls therefore pays for every request that should have gone out during the stall
//! (coordinated-omission correction, as in wrk2). Each thread sets its timer slack to 1 ns, so a
//! sleeping thread wakes within microseconds of the due time instead of the default 50 µs.

use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// How long any one read or connect may take before the request counts as an error.
const IO_DEADLINE: Duration = Duration::from_secs(10);
const REQUEST: &[u8] = b"GET /1k HTTP/1.1\r\nHost: backend\r\n\r\n";
const REQUEST_CLOSE: &[u8] = b"GET /1k HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n";

/// Latencies in nanoseconds, up to one minute, three significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 60_000_000_000, 3).expect("static bounds are valid")
}

#[derive(Debug)]
pub struct Run {
    /// Per-request latency (ns): from due time (paced) or send time (closed loop).
    pub latency: Histogram<u64>,
    pub completed: u64,
    pub errors: u64,
    pub elapsed: Duration,
}

impl Run {
    pub fn rate(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64()
    }
}

/// One keep-alive connection that reconnects when the far side closes between requests (nginx
/// closes after `keepalive_requests`; that is not an error).
struct Conn {
    addr: SocketAddr,
    tcp: Option<TcpStream>,
    buf: Vec<u8>,
}

impl Conn {
    fn new(addr: SocketAddr) -> Self {
        Self { addr, tcp: None, buf: vec![0; 64 * 1024] }
    }

    fn stream(&mut self) -> io::Result<&mut TcpStream> {
        if self.tcp.is_none() {
            self.tcp = Some(connect(self.addr)?);
        }
        Ok(self.tcp.as_mut().expect("set just above"))
    }

    /// One request and its whole response; retries once on a fresh connection when the kept-alive
    /// one turns out to be closed.
    fn exchange(&mut self) -> io::Result<()> {
        for attempt in 0..2 {
            let mut buf = std::mem::take(&mut self.buf);
            let r = self.stream().and_then(|s| {
                s.write_all(REQUEST)?;
                read_response(s, &mut buf)
            });
            self.buf = buf;
            match r {
                Ok(_) => return Ok(()),
                Err(e) => {
                    self.tcp = None;
                    let closed = matches!(
                        e.kind(),
                        io::ErrorKind::UnexpectedEof
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::BrokenPipe
                    );
                    if attempt == 1 || !closed {
                        return Err(e);
                    }
                }
            }
        }
        unreachable!("the loop returns on its second attempt")
    }
}

pub fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, IO_DEADLINE)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_DEADLINE))?;
    s.set_write_timeout(Some(IO_DEADLINE))?;
    Ok(s)
}

/// Reads one response (head, then a `Content-Length` body) and returns the body's length.
pub fn read_response(s: &mut TcpStream, buf: &mut [u8]) -> io::Result<u64> {
    let mut filled = 0;
    let (head_len, body_len) = loop {
        let n = s.read(&mut buf[filled..])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        filled += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf[..filled]) {
            Ok(httparse::Status::Complete(h)) => {
                if resp.code != Some(200) {
                    return Err(io::Error::other(format!("status {:?}", resp.code)));
                }
                let len = resp
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse::<u64>().ok())
                    .ok_or_else(|| io::Error::other("no content-length"))?;
                break (h, len);
            }
            Ok(httparse::Status::Partial) if filled < buf.len() => continue,
            Ok(httparse::Status::Partial) => return Err(io::Error::other("response head too large")),
            Err(e) => return Err(io::Error::other(e.to_string())),
        }
    };
    let mut left = body_len.saturating_sub((filled - head_len) as u64);
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = s.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        left -= n as u64;
    }
    Ok(body_len)
}

fn precise_timers() {
    // Best effort: without it, wake-ups are up to 50 µs late, which the latency would include.
    let _ = nix::sys::prctl::set_timerslack(1);
}

/// Open-loop constant rate over `conns` keep-alive connections for `duration`.
pub fn paced(addr: SocketAddr, conns: usize, rate: f64, duration: Duration) -> io::Result<Run> {
    let total = (rate * duration.as_secs_f64()) as u64;
    let interval_ns = 1e9 / rate;
    let barrier = Arc::new(Barrier::new(conns + 1));
    let t0 = Arc::new(std::sync::OnceLock::<Instant>::new());
    let mut threads = Vec::new();
    for c in 0..conns {
        let (barrier, t0) = (barrier.clone(), t0.clone());
        threads.push(thread::spawn(move || -> io::Result<(Histogram<u64>, u64, u64)> {
            precise_timers();
            let mut conn = Conn::new(addr);
            let ready = conn.exchange();
            // Both waits happen whatever `ready` says, or the other threads would wait forever.
            barrier.wait();
            barrier.wait();
            ready?;
            let t0 = *t0.get().expect("set before the second barrier");
            let (mut h, mut done, mut errors) = (histogram(), 0, 0);
            let mut i = c as u64;
            while i < total {
                let due = t0 + Duration::from_nanos((i as f64 * interval_ns) as u64);
                let now = Instant::now();
                if due > now {
                    thread::sleep(due - now);
                }
                match conn.exchange() {
                    Ok(()) => {
                        let _ = h.record((Instant::now() - due).as_nanos() as u64);
                        done += 1;
                    }
                    Err(_) => errors += 1,
                }
                i += conns as u64;
            }
            Ok((h, done, errors))
        }));
    }
    barrier.wait();
    let _ = t0.set(Instant::now() + Duration::from_millis(20));
    barrier.wait();
    let start = *t0.get().expect("set just above");
    collect(threads, start)
}

/// Closed loop: each connection sends its next request as soon as the last one is answered.
pub fn saturate(addr: SocketAddr, conns: usize, duration: Duration) -> io::Result<Run> {
    let start = Instant::now();
    let threads = (0..conns)
        .map(|_| {
            thread::spawn(move || -> io::Result<(Histogram<u64>, u64, u64)> {
                let mut conn = Conn::new(addr);
                let (mut h, mut done, mut errors) = (histogram(), 0, 0);
                while start.elapsed() < duration {
                    let sent = Instant::now();
                    match conn.exchange() {
                        Ok(()) => {
                            let _ = h.record(sent.elapsed().as_nanos() as u64);
                            done += 1;
                        }
                        Err(_) => errors += 1,
                    }
                }
                Ok((h, done, errors))
            })
        })
        .collect();
    collect(threads, start)
}

/// A new connection per request (`Connection: close`, read to the end): connections per second.
pub fn new_connections(addr: SocketAddr, workers: usize, duration: Duration) -> io::Result<Run> {
    let start = Instant::now();
    let threads = (0..workers)
        .map(|_| {
            thread::spawn(move || -> io::Result<(Histogram<u64>, u64, u64)> {
                let mut buf = vec![0u8; 16 * 1024];
                let (mut h, mut done, mut errors) = (histogram(), 0, 0);
                while start.elapsed() < duration {
                    let sent = Instant::now();
                    let r = connect(addr).and_then(|mut s| {
                        s.write_all(REQUEST_CLOSE)?;
                        read_response(&mut s, &mut buf)?;
                        // The far side closes; wait for it so the connection is whole.
                        let _ = s.read(&mut buf);
                        Ok(())
                    });
                    match r {
                        Ok(()) => {
                            let _ = h.record(sent.elapsed().as_nanos() as u64);
                            done += 1;
                        }
                        Err(_) => errors += 1,
                    }
                }
                Ok((h, done, errors))
            })
        })
        .collect();
    collect(threads, start)
}

/// One connection fetches `bytes`; returns MB/s (10^6 bytes per second).
pub fn bulk(addr: SocketAddr, bytes: u64) -> io::Result<f64> {
    let mut s = connect(addr)?;
    let mut buf = vec![0u8; 256 * 1024];
    let start = Instant::now();
    s.write_all(format!("GET /bulk/{bytes} HTTP/1.1\r\nHost: backend\r\n\r\n").as_bytes())?;
    let got = read_response(&mut s, &mut buf)?;
    if got != bytes {
        return Err(io::Error::other(format!("got {got} of {bytes} bytes")));
    }
    Ok(bytes as f64 / start.elapsed().as_secs_f64() / 1e6)
}

/// Opens `count` connections, each proven end to end by one request, and returns them open.
pub fn idle(addr: SocketAddr, count: usize, workers: usize) -> io::Result<Vec<TcpStream>> {
    let per = count.div_ceil(workers);
    let threads: Vec<_> = (0..workers)
        .map(|w| {
            let n = per.min(count.saturating_sub(w * per));
            thread::spawn(move || -> io::Result<Vec<TcpStream>> {
                let mut buf = vec![0u8; 16 * 1024];
                (0..n)
                    .map(|_| {
                        let mut s = connect(addr)?;
                        s.write_all(REQUEST)?;
                        read_response(&mut s, &mut buf)?;
                        Ok(s)
                    })
                    .collect()
            })
        })
        .collect();
    let mut all = Vec::with_capacity(count);
    for t in threads {
        all.extend(t.join().map_err(|_| io::Error::other("idle worker panicked"))??);
    }
    Ok(all)
}

type Outcome = io::Result<(Histogram<u64>, u64, u64)>;

fn collect(threads: Vec<thread::JoinHandle<Outcome>>, start: Instant) -> io::Result<Run> {
    let mut run = Run { latency: histogram(), completed: 0, errors: 0, elapsed: Duration::ZERO };
    let mut first_error = None;
    for t in threads {
        match t.join().map_err(|_| io::Error::other("load thread panicked"))? {
            Ok((h, done, errors)) => {
                let _ = run.latency.add(&h);
                run.completed += done;
                run.errors += errors;
            }
            Err(e) => first_error = Some(e),
        }
    }
    run.elapsed = start.elapsed();
    match first_error {
        Some(e) if run.completed == 0 => Err(e),
        _ => Ok(run),
    }
}
