//! Protocol detection for PERMISSIVE ports: peek (never consume) the client's first bytes, bounded
//! by a deadline, and tell a TLS ClientHello from plaintext; for TLS, read its SNI and ALPN so mesh
//! traffic (by ALPN) can be terminated and other TLS passed through untouched.

use std::time::Duration;

use tokio::net::TcpStream;

/// The most we peek: one TLS record.
const MAX_PEEK: usize = 16 * 1024 + 5;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientHello {
    pub sni: Option<String>,
    pub alpn: Vec<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detected {
    Tls(ClientHello),
    Plaintext,
    /// The client closed or sent nothing before the deadline.
    Nothing,
}

/// Peeks until the first TLS record is complete, plaintext is certain, or `timeout` passes.
pub async fn detect(stream: &TcpStream, timeout: Duration) -> Detected {
    let mut buf = vec![0u8; MAX_PEEK];
    let work = async {
        let mut last = 0;
        loop {
            let n = match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return Detected::Nothing,
                Ok(n) => n,
            };
            match parse_client_hello(&buf[..n]) {
                Parse::Hello(h) => return Detected::Tls(h),
                Parse::NotTls => return Detected::Plaintext,
                // A ClientHello we cannot read is still TLS: not ours to terminate, pass it on.
                Parse::Malformed => return Detected::Tls(ClientHello::default()),
                Parse::NeedMore if n == MAX_PEEK => return Detected::Tls(ClientHello::default()),
                Parse::NeedMore => {}
            }
            if n == last {
                // peek returns at once with what is buffered: wait for the socket to have more.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            last = n;
        }
    };
    tokio::time::timeout(timeout, work).await.unwrap_or(Detected::Nothing)
}

#[derive(Debug, PartialEq, Eq)]
pub enum Parse {
    Hello(ClientHello),
    NotTls,
    Malformed,
    NeedMore,
}

/// Parses a TLS record holding a ClientHello. Every length is bounds-checked; a peer controls
/// these bytes.
pub fn parse_client_hello(b: &[u8]) -> Parse {
    if b.is_empty() {
        return Parse::NeedMore;
    }
    // Handshake record, TLS 1.0-1.3 record versions.
    if b[0] != 0x16 {
        return Parse::NotTls;
    }
    if b.len() < 5 {
        return Parse::NeedMore;
    }
    if b[1] != 0x03 {
        return Parse::NotTls;
    }
    let record_len = usize::from(u16::from_be_bytes([b[3], b[4]]));
    if b.len() < 5 + record_len {
        return Parse::NeedMore;
    }
    match hello_body(&b[5..5 + record_len]) {
        Some(h) => Parse::Hello(h),
        None => Parse::Malformed,
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3).map(|b| (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]))
    }
}

fn hello_body(record: &[u8]) -> Option<ClientHello> {
    let mut r = Reader(record);
    if r.u8()? != 1 {
        return None; // not a ClientHello
    }
    let len = r.u24()?;
    let mut r = Reader(r.take(len)?);
    r.take(2 + 32)?; // legacy_version, random
    let sid = r.u8()?;
    r.take(sid)?;
    let suites = r.u16()?;
    r.take(suites)?;
    let comp = r.u8()?;
    r.take(comp)?;
    let mut hello = ClientHello::default();
    if r.0.is_empty() {
        return Some(hello);
    }
    let ext_len = r.u16()?;
    let mut exts = Reader(r.take(ext_len)?);
    while !exts.0.is_empty() {
        let ty = exts.u16()?;
        let len = exts.u16()?;
        let mut body = Reader(exts.take(len)?);
        match ty {
            0 => {
                let list = body.u16()?;
                let mut names = Reader(body.take(list)?);
                while !names.0.is_empty() {
                    let kind = names.u8()?;
                    let n = names.u16()?;
                    let name = names.take(n)?;
                    if kind == 0 {
                        hello.sni = std::str::from_utf8(name).ok().map(str::to_owned);
                    }
                }
            }
            16 => {
                let list = body.u16()?;
                let mut protos = Reader(body.take(list)?);
                while !protos.0.is_empty() {
                    let n = protos.u8()?;
                    hello.alpn.push(protos.take(n)?.to_vec());
                }
            }
            _ => {}
        }
    }
    Some(hello)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello as rustls writes it, captured through a real handshake attempt.
    fn rustls_hello(alpn: &[&[u8]], sni: &str) -> Vec<u8> {
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let roots = rustls::RootCertStore::empty();
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        let name = rustls_pki_types::ServerName::try_from(sni.to_owned()).unwrap();
        let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn reads_sni_and_alpn_from_a_real_client_hello() {
        let bytes = rustls_hello(&[b"istio", b"h2"], "reviews.default.svc");
        let Parse::Hello(h) = parse_client_hello(&bytes) else { panic!("not parsed") };
        assert_eq!(h.sni.as_deref(), Some("reviews.default.svc"));
        assert_eq!(h.alpn, vec![b"istio".to_vec(), b"h2".to_vec()]);
        for cut in [0, 1, 4, 5, 40, bytes.len() - 1] {
            assert_eq!(parse_client_hello(&bytes[..cut]), Parse::NeedMore, "cut at {cut}");
        }
    }

    #[test]
    fn plaintext_and_garbage_are_told_apart() {
        assert_eq!(parse_client_hello(b"GET / HTTP/1.1\r\n"), Parse::NotTls);
        assert_eq!(parse_client_hello(b"\x16\x01"), Parse::NeedMore);
        assert_eq!(parse_client_hello(b"\x16\x02\x00\x00\x00"), Parse::NotTls);
        assert_eq!(parse_client_hello(b"\x16\x03\x01\x00\x04\x01\xff\xff\xff"), Parse::Malformed);
    }
}
