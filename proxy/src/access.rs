//! The access log: one `access` event per finished connection, the same fields in both
//! directions (field names are an API: `src.addr`, `src.identity`, `dst.addr`, `dst.identity`,
//! `port`, `direction`, `mtls`, `policy`, `decision`, `reason`, `detail`, `bytes_sent`,
//! `bytes_recv`, `duration_ms`), and one per HTTP request ([`RequestLine`]: the connection's
//! ends, then the request's fields). `port` is the workload port policies name (inbound) or the
//! destination port (outbound).

use std::net::SocketAddr;
use std::time::Instant;

use keycard_config::SpiffeId;
use tracing::{Level, info};

use crate::forward::End;
use crate::logging::{self, LineFields};
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
    /// The fields every access line starts with, connection's or request's: who to whom, on
    /// which port, with mutual TLS or not.
    fn write_ends(&self, f: &mut LineFields<'_>) {
        f.str("direction", self.direction.as_str());
        f.str("src.addr", AddrText::new(self.src_addr).as_str());
        f.str("src.identity", self.src_identity.map_or("-", SpiffeId::as_str));
        f.str("dst.addr", AddrText::new(self.dst_addr).as_str());
        f.str("dst.identity", self.dst_identity.map_or("-", SpiffeId::as_str));
        f.u64("port", self.port.into());
        f.bool("mtls", self.mtls);
    }

    /// `sent` went to the downstream (the connection's initiator), `recv` came from it.
    pub fn log(&self, decision: &str, reason: &str, detail: &str, sent: u64, recv: u64) {
        let duration_ms = self.started.elapsed().as_millis() as u64;
        emit(&ConnLine { access: self, decision, reason, detail, sent, recv, duration_ms });
    }
}

/// The target of access events.
const ACCESS: &str = "keycard::access";

/// An `info` access event of the [`Access`] `$a` (its ends, as [`Access::write_ends`] writes
/// them) followed by the line's own fields (`$rest`, its message last).
macro_rules! access_event {
    ($a:expr, $($rest:tt)*) => {
        info!(
            target: ACCESS,
            direction = $a.direction.as_str(),
            src.addr = AddrText::new($a.src_addr).as_str(),
            src.identity = $a.src_identity.map_or("-", SpiffeId::as_str),
            dst.addr = AddrText::new($a.dst_addr).as_str(),
            dst.identity = $a.dst_identity.map_or("-", SpiffeId::as_str),
            port = $a.port,
            mtls = $a.mtls,
            $($rest)*
        )
    };
}

/// An access line, written by either of two means that give the same bytes.
trait Line {
    /// Its fields, for [`logging::json_event`].
    fn fields(&self, f: &mut LineFields<'_>);
    /// The same fields, as a tracing event.
    fn event(&self);
}

/// Writes an access line: straight, as the JSON layer would write its event, where this process
/// logs JSON lines (no dispatch, field set or visitor per field: an HTTP request's line cost an
/// inbound sidecar 10,600 instructions through tracing, 6,900 so, by callgrind); else as a
/// tracing event (text lines, tests' own subscribers). The tests below hold the two to the same
/// bytes.
fn emit(line: &impl Line) {
    if !logging::direct_json() {
        line.event();
    } else if tracing::enabled!(target: ACCESS, Level::INFO) {
        logging::json_event(&Level::INFO, ACCESS, "access", |f| line.fields(f));
    }
}

/// A connection's access line.
struct ConnLine<'a> {
    access: &'a Access<'a>,
    decision: &'a str,
    reason: &'a str,
    detail: &'a str,
    sent: u64,
    recv: u64,
    duration_ms: u64,
}

impl Line for ConnLine<'_> {
    fn fields(&self, f: &mut LineFields<'_>) {
        self.access.write_ends(f);
        f.str("policy", self.access.policy);
        f.str("decision", self.decision);
        f.str("reason", self.reason);
        f.str("detail", self.detail);
        f.u64("bytes_sent", self.sent);
        f.u64("bytes_recv", self.recv);
        f.u64("duration_ms", self.duration_ms);
    }

    fn event(&self) {
        access_event!(
            self.access,
            policy = self.access.policy,
            decision = self.decision,
            reason = self.reason,
            detail = self.detail,
            bytes_sent = self.sent,
            bytes_recv = self.recv,
            duration_ms = self.duration_ms,
            "access"
        );
    }
}

/// One HTTP request's access line, as `http::Exchange::finish` reports it: the connection's
/// fields (`access`, whose `policy` is the request's) and the request's (`protocol`, `method`,
/// `path`, `authority`, `status`, `grpc_status`, `request_id`, `response_flags`).
pub struct RequestLine<'a> {
    pub access: Access<'a>,
    pub protocol: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub authority: &'a str,
    pub status: u16,
    pub grpc_status: &'a str,
    pub request_id: &'a str,
    pub decision: &'a str,
    pub reason: &'a str,
    pub response_flags: &'a str,
    pub bytes_sent: u64,
    pub bytes_recv: u64,
    pub duration_ms: u64,
}

impl RequestLine<'_> {
    pub fn log(&self) {
        emit(self);
    }
}

impl Line for RequestLine<'_> {
    fn fields(&self, f: &mut LineFields<'_>) {
        self.access.write_ends(f);
        f.str("protocol", self.protocol);
        f.str("method", self.method);
        f.str("path", self.path);
        f.str("authority", self.authority);
        f.u64("status", self.status.into());
        f.str("grpc_status", self.grpc_status);
        f.str("request_id", self.request_id);
        f.str("policy", self.access.policy);
        f.str("decision", self.decision);
        f.str("reason", self.reason);
        f.str("response_flags", self.response_flags);
        f.u64("bytes_sent", self.bytes_sent);
        f.u64("bytes_recv", self.bytes_recv);
        f.u64("duration_ms", self.duration_ms);
    }

    fn event(&self) {
        access_event!(
            self.access,
            protocol = self.protocol,
            method = self.method,
            path = self.path,
            authority = self.authority,
            status = self.status,
            grpc_status = self.grpc_status,
            request_id = self.request_id,
            policy = self.access.policy,
            decision = self.decision,
            reason = self.reason,
            response_flags = self.response_flags,
            bytes_sent = self.bytes_sent,
            bytes_recv = self.bytes_recv,
            duration_ms = self.duration_ms,
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

    /// The line written straight is the one the JSON layer writes for the same line's event,
    /// byte for byte (but the timestamp), with values that need escaping.
    fn same_bytes(line: &impl Line) {
        use tracing_subscriber::prelude::*;
        let through_tracing = crate::logging::capture::Capture::default();
        let sub = tracing_subscriber::registry().with(crate::logging::json_layer(through_tracing.clone()));
        tracing::subscriber::with_default(sub, || line.event());
        let mut straight = Vec::new();
        let written =
            logging::json_event_into(&mut straight, &Level::INFO, ACCESS, "access", |f| line.fields(f));
        assert!(written.is_ok());
        let straight = crate::logging::capture::without_timestamps(&straight);
        assert_eq!(straight.len(), 1, "{straight:?}");
        assert_eq!(straight, through_tracing.lines());
        let v: serde_json::Value = serde_json::from_str(&straight[0]).unwrap_or_default();
        assert_eq!(v["target"], ACCESS, "{}", straight[0]);
    }

    #[test]
    fn access_lines_written_straight_are_the_json_layers_lines() {
        let client = SpiffeId::parse("spiffe://td/ns/a/sa/c").ok();
        let server = SpiffeId::parse("spiffe://td/ns/b/sa/s").ok();
        assert!(client.is_some() && server.is_some());
        let v6: SocketAddr = (std::net::Ipv6Addr::LOCALHOST, 15006).into();
        let conn = Access {
            direction: Direction::Inbound,
            src_addr: ([10, 0, 0, 7], 41234).into(),
            src_identity: client.as_ref(),
            dst_addr: v6,
            dst_identity: None,
            port: 9080,
            mtls: true,
            policy: "ns[b]-policy[p]-rule[0]",
            started: std::time::Instant::now(),
        };
        same_bytes(&ConnLine {
            access: &conn,
            decision: "deny",
            reason: "no_match",
            detail: "tab\there \u{1}é",
            sent: 0,
            recv: u64::MAX,
            duration_ms: 12,
        });
        same_bytes(&RequestLine {
            access: Access {
                direction: Direction::Outbound,
                src_addr: ([127, 0, 0, 1], 5).into(),
                src_identity: server.as_ref(),
                dst_addr: v6,
                dst_identity: client.as_ref(),
                port: 65535,
                mtls: false,
                policy: "-",
                started: std::time::Instant::now(),
            },
            protocol: "grpc",
            method: "POST",
            path: "/a\"b\\c\n",
            authority: "example.com:8080",
            status: 503,
            grpc_status: "",
            request_id: "86218309-63bb-4b8a-8cd0-090627362bf8",
            decision: "allow",
            reason: "upstream_reset",
            response_flags: "UR",
            bytes_sent: 1024,
            bytes_recv: 0,
            duration_ms: 0,
        });
    }

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
