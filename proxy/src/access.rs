//! The access log: one `access` event per finished connection, the same fields in both
//! directions (field names are an API: `src.addr`, `src.identity`, `dst.addr`, `dst.identity`,
//! `port`, `direction`, `mtls`, `policy`, `decision`, `reason`, `detail`, `bytes_sent`,
//! `bytes_recv`, `duration_ms`). `port` is the workload port policies name (inbound) or the
//! destination port (outbound).

use std::net::SocketAddr;
use std::time::Instant;

use keycard_config::SpiffeId;
use tracing::info;

use crate::forward::End;
use crate::sidecar::Direction;

pub struct Access<'a> {
    pub direction: Direction,
    pub src_addr: SocketAddr,
    pub src_identity: Option<&'a SpiffeId>,
    pub dst_addr: SocketAddr,
    pub dst_identity: Option<&'a SpiffeId>,
    pub port: u16,
    pub mtls: bool,
    /// The deciding rule (`ns[..]-policy[..]-rule[..]`), `none`, or `-` where no policy applies.
    pub policy: &'a str,
    pub started: Instant,
}

impl Access<'_> {
    /// `sent` went to the downstream (the connection's initiator), `recv` came from it.
    pub fn log(&self, decision: &str, reason: &str, detail: &str, sent: u64, recv: u64) {
        let (src, dst) = (AddrText::new(self.src_addr), AddrText::new(self.dst_addr));
        info!(
            target: "keycard::access",
            direction = self.direction.as_str(),
            src.addr = src.as_str(),
            src.identity = self.src_identity.map(SpiffeId::as_str).unwrap_or("-"),
            dst.addr = dst.as_str(),
            dst.identity = self.dst_identity.map(SpiffeId::as_str).unwrap_or("-"),
            port = self.port,
            mtls = self.mtls,
            policy = self.policy,
            decision,
            reason,
            detail,
            bytes_sent = sent,
            bytes_recv = recv,
            duration_ms = self.started.elapsed().as_millis() as u64,
            "access"
        );
    }
}

/// A socket address as text, the way `Display` writes it, without going through `fmt` for IPv4
/// (an access line names two addresses; through `Display` they cost an HTTP request about 3,000
/// instructions, a fifth of its access line). IPv6 goes through `Display`.
pub struct AddrText {
    buf: [u8; 64],
    len: usize,
}

impl AddrText {
    pub fn new(addr: SocketAddr) -> Self {
        let mut text = AddrText { buf: [0; 64], len: 0 };
        match addr {
            SocketAddr::V4(v4) => {
                let mut digits = itoa::Buffer::new();
                for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                    if i > 0 {
                        text.push(b".");
                    }
                    text.push(digits.format(octet).as_bytes());
                }
                text.push(b":");
                text.push(digits.format(v4.port()).as_bytes());
            }
            SocketAddr::V6(_) => {
                use std::io::Write as _;
                let mut rest = &mut text.buf[..];
                // The longest form, `[v6%scope]:port`, is 58 bytes.
                let _ = write!(rest, "{addr}");
                let left = rest.len();
                text.len = text.buf.len() - left;
            }
        }
        text
    }

    fn push(&mut self, bytes: &[u8]) {
        if let Some(dst) = self.buf.get_mut(self.len..self.len + bytes.len()) {
            dst.copy_from_slice(bytes);
            self.len += bytes.len();
        }
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("-")
    }
}

/// The `reason` of a connection that was forwarded until it ended.
pub fn end_reason(end: End) -> &'static str {
    match end {
        End::Done => "closed",
        End::Idle => "idle_timeout",
        End::Cancelled => "closed_by_policy_or_drain",
        End::Error => "reset",
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv6Addr, SocketAddrV6};

    use super::*;

    #[test]
    fn addresses_read_as_display_writes_them() {
        let v6 = SocketAddrV6::new(
            Ipv6Addr::new(0xfe80, 0xffff, 0, 0, 0xffff, 0xffff, 0xffff, 0xffff),
            65535,
            0,
            u32::MAX,
        );
        let addrs: [SocketAddr; 6] = [
            ([127, 0, 0, 1], 8080).into(),
            ([0, 0, 0, 0], 0).into(),
            ([255, 255, 255, 255], 65535).into(),
            ([10, 1, 20, 100], 9).into(),
            (Ipv6Addr::LOCALHOST, 15006).into(),
            v6.into(),
        ];
        for a in addrs {
            assert_eq!(AddrText::new(a).as_str(), a.to_string());
        }
    }
}
