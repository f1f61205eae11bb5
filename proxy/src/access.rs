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
        info!(
            target: "keycard::access",
            direction = self.direction.as_str(),
            src.addr = %self.src_addr,
            src.identity = self.src_identity.map(SpiffeId::as_str).unwrap_or("-"),
            dst.addr = %self.dst_addr,
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

/// The `reason` of a connection that was forwarded until it ended.
pub fn end_reason(end: End) -> &'static str {
    match end {
        End::Done => "closed",
        End::Idle => "idle_timeout",
        End::Cancelled => "closed_by_policy_or_drain",
        End::Error => "reset",
    }
}
