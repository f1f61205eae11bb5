//! keycard's sidecar: one connection can be followed top to bottom in `inbound.rs`.
//!
//! - [`identity`]: key and CSR made here, the CA client, the certificate manager (renewal).
//! - [`tls`]: TLS configs built once per certificate ([`tls::MeshTls`]).
//! - [`detect`]: TLS vs plaintext by peeking the ClientHello (SNI, ALPN).
//! - [`inbound`], [`outbound`]: the two directions; [`forward`]: bytes both ways; [`buffers`]:
//!   the buffers they lend, and the read-ahead under every TLS stream; [`ktls`]: L4 mesh
//!   connections handed to the kernel's TLS after the handshake, where it offers it.
//! - [`http`]: L7 for HTTP/1.1, HTTP/2 and gRPC ports (per-request policy, JWT, pooled mTLS).
//! - [`sidecar`]: assembly, policy reload, drain; [`conns`]: live connections for re-evaluation;
//!   [`cancel`]: the drain's tokens waited on cheaply by futures that wake often.
//! - [`capture`]: the transparent-interception listeners (original destination).
//! - [`metrics`], [`access`], [`logging`], [`admin`]: what it reports; [`observe`]: what arrived, for
//!   `keycard status` and `policy suggest`.

#![forbid(unsafe_code)]

pub mod access;
pub mod admin;
pub mod buffers;
pub mod cancel;
pub mod capture;
pub mod conns;
pub mod detect;
pub mod forward;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod ktls;
pub mod logging;
pub mod metrics;
pub mod observe;
pub mod outbound;
pub mod records;
pub mod sidecar;
pub mod tls;

pub use sidecar::{Addrs, Sidecar, SidecarError};
