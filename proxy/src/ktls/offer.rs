//! The sidecar's side of kernel TLS: the probe at start (logged, and shown by
//! `keycard_tls_offload_available`), and each mesh connection (L4 or HTTP) offered to the kernel,
//! else to keycard's own record layer ([`crate::records`]), and counted in
//! `keycard_tls_offload_total{direction, result}`.

use std::net::SocketAddr;

use bytes::Bytes;
use keycard_config::sidecar::KernelOffload;
use tracing::info;

use super::{Declined, Handshaken, KernelTls, Offloaded, Refused};
use crate::metrics::ProxyMetrics;
use crate::records::RecordStream;
use crate::sidecar::{Direction, Shared};

/// Kernel TLS as configured and found: the suites the probe found, or why it is not used.
pub(crate) fn probe_at_start(
    setting: KernelOffload,
    user_records: bool,
    metrics: &ProxyMetrics,
) -> Result<KernelTls, Refused> {
    let otherwise = if user_records {
        "keycard's own record layer takes mesh connections after their handshake"
    } else {
        "rustls keeps every connection (tls.user_records: off)"
    };
    let found = match setting {
        KernelOffload::Off => {
            info!("kernel TLS off (tls.kernel_offload: off): {otherwise}");
            Err(Refused::Off)
        }
        KernelOffload::Auto => match super::probe() {
            Ok(k) => {
                info!(suites = %k.describe(), "kernel TLS: mesh connections move to it after their handshake");
                Ok(k)
            }
            Err(e) => {
                info!("kernel TLS not used: {e}; {otherwise}");
                Err(Refused::Unavailable)
            }
        },
    };
    metrics.tls_offload_available.set(i64::from(found.is_ok()));
    found
}

impl Shared {
    /// Whether a mesh connection's handshake should be read record by record, so that the
    /// kernel or keycard's own record layer can take it after.
    pub fn may_take_records(&self) -> bool {
        self.kernel_tls.is_ok() || self.user_records
    }

    /// Moves a handshaken mesh connection's records to the kernel, else (`tls.user_records: on`)
    /// to keycard's own record layer, else leaves them with rustls, and counts where they went.
    /// `None`: a hand-over failed half-way and the connection is gone (logged as a refusal).
    pub fn take_records<S: Handshaken>(
        &self,
        direction: Direction,
        peer: SocketAddr,
        stream: S,
        sniffed: Bytes,
    ) -> Option<Moved<S>> {
        let (stream, sniffed, refused) = match &self.kernel_tls {
            Ok(kernel) => match kernel.hand_over(stream, sniffed) {
                Ok(offloaded) => {
                    self.count_offload(direction, "kernel");
                    return Some(Moved::Kernel(offloaded));
                }
                Err(Declined::Kept(stream, sniffed, refused)) => (stream, sniffed, refused),
                Err(Declined::Lost(detail)) => {
                    return self.lost(direction, peer, "kernel_tls_setup", &detail);
                }
            },
            Err(refused) => (stream, sniffed, *refused),
        };
        if !self.user_records {
            self.count_offload(direction, refused.as_str());
            return Some(Moved::Rustls(stream, sniffed));
        }
        match crate::records::take(stream, sniffed) {
            Ok(records) => {
                self.count_offload(direction, "user");
                Some(Moved::User(records))
            }
            Err(Declined::Kept(stream, sniffed, refused)) => {
                self.count_offload(direction, refused.as_str());
                Some(Moved::Rustls(stream, sniffed))
            }
            Err(Declined::Lost(detail)) => self.lost(direction, peer, "record_layer_setup", &detail),
        }
    }

    fn lost<T>(
        &self,
        direction: Direction,
        peer: SocketAddr,
        reason: &'static str,
        detail: &str,
    ) -> Option<T> {
        self.count_offload(direction, "lost");
        self.handshake_failed(direction, peer, reason, detail);
        None
    }

    /// Counts a mesh connection's `keycard_tls_offload_total{direction, result}`: one label
    /// lookup per connection, next to a handshake of about a million instructions.
    pub fn count_offload(&self, direction: Direction, result: &str) {
        self.metrics.tls_offload.with_label_values(&[direction.as_str(), result]).inc();
    }

    /// Counts a mesh connection that was not offered to the kernel because there is none to
    /// offer it to (`off` or `unavailable`).
    pub fn count_no_offload(&self, direction: Direction) {
        if let Err(refused) = &self.kernel_tls {
            self.count_offload(direction, refused.as_str());
        }
    }
}

/// Where [`Shared::take_records`] moved a connection's records.
pub enum Moved<S> {
    Kernel(Offloaded),
    User(RecordStream),
    /// rustls keeps them, with the sniffed bytes still to deliver.
    Rustls(S, Bytes),
}
