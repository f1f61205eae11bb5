//! keycard's certificate authority.
//!
//! - [`profile`]: the X.509-SVID profile of what the CA issues (root, intermediate, leaf).
//! - [`authority`]: signing leaves for a key or a CSR, never copying the CSR's names.
//! - [`token`]: bootstrap tokens (ES256 JWTs) bound to one identity.
//! - [`k8s`]: Kubernetes service-account tokens (a pod's projected token) as bootstrap credentials.
//! - [`store`]: the CA directory on disk (Istio `cacerts` names, key files 0600).
//! - [`server`]: `ca serve`, the HTTPS API, and [`metrics`].

#![forbid(unsafe_code)]

pub mod authority;
pub mod k8s;
pub mod metrics;
pub mod profile;
pub mod server;
pub mod store;
pub mod token;

pub use authority::{Authority, Issued};
pub use store::LoadedCa;
