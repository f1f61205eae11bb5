//! keycard's pure data and logic: no tokio, no sockets.
//!
//! - [`identity`]: SPIFFE IDs and trust domains, parsed once at the edge.
//! - [`svid`]: the X.509-SVID verifier (chain to the trust bundle plus every SPIFFE rule on the leaf).
//! - [`tls`]: rustls certificate verifiers built on [`svid`], shared by the CA and the sidecar.
//! - [`ca_api`]: the CA HTTPS API as data, shared by the CA and its client in the sidecar.
//! - [`certinfo`]: certificates described for a person (CLI inspect, admin `/certs`).
//! - [`policy`]: Istio security YAML loaded with file:line errors; PeerAuthentication resolution,
//!   RequestAuthentication's JWT rules and the authorization engine.
//! - [`http`]: request targets split and paths normalised as Istio does before `paths` rules.
//! - [`jwt`]: JWT verification against a rule and a key set, pure (the clock passed in).
//! - [`sidecar`]: the sidecar configuration file.
//! - [`kube`]: workloads (labels, service account, port protocols) read from Kubernetes manifests.
//! - [`pem`]: reading certificates and keys from PEM with errors that name the file.

#![forbid(unsafe_code)]

pub mod ca_api;
pub mod certinfo;
pub mod http;
pub mod identity;
pub mod jwt;
pub mod kube;
pub mod pem;
pub mod policy;
pub mod sidecar;
pub mod svid;
pub mod tls;

pub use identity::{IdError, K8sIdentity, SpiffeId, TrustDomain};
pub use svid::{Purpose, SvidError, TrustBundle, VerifiedSvid};
