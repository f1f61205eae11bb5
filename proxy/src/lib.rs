//! keycard's sidecar.
//!
//! - [`identity`]: the workload's key and CSR, and the client of the keycard CA that signs them.
//!
//! Inbound and outbound mutual TLS, policy enforcement, metrics and admin come with the sidecar
//! itself (see ARCHITECTURE.md for what exists today).

#![forbid(unsafe_code)]

pub mod identity;
