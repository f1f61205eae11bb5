//! The CA on disk: one directory, named like Istio's `cacerts` so a plug-in CA reads the same.
//!
//! | file | what | mode |
//! |---|---|---|
//! | `ca.yaml` | trust domain | 0644 |
//! | `root-cert.pem`, `root-key.pem` | the root (no key for a plug-in CA) | 0644, 0600 |
//! | `ca-cert.pem`, `ca-key.pem` | the intermediate that signs leaves | 0644, 0600 |
//! | `cert-chain.pem` | `ca-cert.pem` up to and including the root | 0644 |
//! | `bundle.pem` | the trust bundle: every root (several while rotating) | 0644 |
//! | `token-key.pem` | signs bootstrap tokens | 0600 |

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use keycard_config::TrustDomain;
use keycard_config::pem::{self as kpem, PemError};
use rcgen::{Issuer, KeyPair};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::authority::{Authority, AuthorityError};
use crate::profile::{self, ProfileError};
use crate::token::{TokenAuthority, TokenKeyError};

pub const CONFIG: &str = "ca.yaml";
pub const ROOT_CERT: &str = "root-cert.pem";
pub const ROOT_KEY: &str = "root-key.pem";
pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const CERT_CHAIN: &str = "cert-chain.pem";
pub const BUNDLE: &str = "bundle.pem";
pub const TOKEN_KEY: &str = "token-key.pem";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("{dir} already holds a CA ({file} exists); pass --force to replace it")]
    Exists { dir: PathBuf, file: &'static str },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Pem(#[from] PemError),
    #[error("{path}: {detail}")]
    Config { path: PathBuf, detail: String },
    #[error("{path}: not a usable private key: {detail}")]
    Key { path: PathBuf, detail: String },
    #[error("{dir}: {source}")]
    Authority { dir: PathBuf, source: AuthorityError },
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error("{path}: {source}")]
    TokenKey { path: PathBuf, source: TokenKeyError },
    #[error("cannot make a key: {0}")]
    KeyGen(rcgen::Error),
}

/// `ca.yaml`: what the directory does not say by itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaConfig {
    pub trust_domain: TrustDomain,
}

/// Lifetimes for `ca init`.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub trust_domain: TrustDomain,
    /// Default 10 years.
    pub root_lifetime: Duration,
    /// Default 1 year, cut at the root's expiry.
    pub intermediate_lifetime: Duration,
    pub force: bool,
}

/// A CA loaded from disk, ready to issue.
#[derive(Debug)]
pub struct LoadedCa {
    pub config: CaConfig,
    pub authority: Authority,
    pub tokens: TokenAuthority,
}

/// Makes a new root and intermediate in `dir`.
pub fn init(dir: &Path, opts: &InitOptions, now: OffsetDateTime) -> Result<LoadedCa, StoreError> {
    prepare_dir(dir, opts.force)?;
    let td = &opts.trust_domain;
    let root_key = KeyPair::generate().map_err(StoreError::KeyGen)?;
    let root_params = profile::root(td, opts.root_lifetime, now)?;
    let root = root_params.self_signed(&root_key).map_err(|e| authority_err(dir, AuthorityError::Sign(e)))?;
    let ca_key = KeyPair::generate().map_err(StoreError::KeyGen)?;
    let ca_params = profile::intermediate(td, opts.intermediate_lifetime, now, root_params.not_after)?;
    let root_issuer = Issuer::from_params(&root_params, &root_key);
    let ca = ca_params
        .signed_by(&ca_key, &root_issuer)
        .map_err(|e| authority_err(dir, AuthorityError::Sign(e)))?;

    write_private(&dir.join(ROOT_KEY), root_key.serialize_pem().as_bytes())?;
    write_public(&dir.join(ROOT_CERT), root.pem().as_bytes())?;
    write_private(&dir.join(CA_KEY), ca_key.serialize_pem().as_bytes())?;
    write_public(&dir.join(CA_CERT), ca.pem().as_bytes())?;
    write_public(&dir.join(CERT_CHAIN), format!("{}{}", ca.pem(), root.pem()).as_bytes())?;
    write_public(&dir.join(BUNDLE), root.pem().as_bytes())?;
    finish_init(dir, td, now)
}

/// Adopts a plug-in CA from a directory in Istio's `cacerts` layout: `ca-cert.pem`, `ca-key.pem`,
/// `root-cert.pem` and optionally `cert-chain.pem`. The root key is never needed.
pub fn init_from_existing(
    dir: &Path,
    src: &Path,
    td: &TrustDomain,
    force: bool,
    now: OffsetDateTime,
) -> Result<LoadedCa, StoreError> {
    let ca_cert = kpem::read(&src.join(CA_CERT))?;
    let ca_key = kpem::read(&src.join(CA_KEY))?;
    let root_cert = kpem::read(&src.join(ROOT_CERT))?;
    let chain = match kpem::read(&src.join(CERT_CHAIN)) {
        Ok(chain) => chain,
        Err(PemError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            ca_cert.clone()
        }
        Err(e) => return Err(e.into()),
    };
    // Validate everything before touching `dir`, so a bad plug-in CA leaves nothing half-written.
    let key = parse_key(&ca_key, &src.join(CA_KEY))?;
    let chain_certs = kpem::certs_from_pem(&chain, &src.join(CERT_CHAIN).display().to_string())?;
    let roots = kpem::certs_from_pem(&root_cert, &src.join(ROOT_CERT).display().to_string())?;
    Authority::new(td.clone(), key, chain_certs, roots, now).map_err(|e| authority_err(src, e))?;

    prepare_dir(dir, force)?;
    write_private(&dir.join(CA_KEY), &ca_key)?;
    write_public(&dir.join(CA_CERT), &ca_cert)?;
    write_public(&dir.join(CERT_CHAIN), &chain)?;
    write_public(&dir.join(ROOT_CERT), &root_cert)?;
    write_public(&dir.join(BUNDLE), &root_cert)?;
    finish_init(dir, td, now)
}

/// Loads and checks the CA in `dir`.
pub fn load(dir: &Path, now: OffsetDateTime) -> Result<LoadedCa, StoreError> {
    let config_path = dir.join(CONFIG);
    let text = fs::read_to_string(&config_path)
        .map_err(|source| StoreError::Io { path: config_path.clone(), source })?;
    let config: CaConfig = serde_saphyr::from_str(&text)
        .map_err(|e| StoreError::Config { path: config_path.clone(), detail: e.to_string() })?;
    let key_path = dir.join(CA_KEY);
    let key = parse_key(&kpem::read(&key_path)?, &key_path)?;
    let chain = kpem::certs_from_file(&dir.join(CERT_CHAIN))?;
    let roots = kpem::certs_from_file(&dir.join(BUNDLE))?;
    let authority = Authority::new(config.trust_domain.clone(), key, chain, roots, now)
        .map_err(|e| authority_err(dir, e))?;
    let token_path = dir.join(TOKEN_KEY);
    let token_key = kpem::key_from_file(&token_path)?;
    let tokens = TokenAuthority::from_pkcs8(token_key.secret_der(), config.trust_domain.clone())
        .map_err(|source| StoreError::TokenKey { path: token_path, source })?;
    Ok(LoadedCa { config, authority, tokens })
}

/// Writes a private key readable by its owner only (0600), whatever the file was before.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    write_mode(path, bytes, 0o600)
}

pub fn write_public(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    write_mode(path, bytes, 0o644)
}

/// Creates `dir` (0700) if needed.
pub fn create_dir(dir: &Path) -> Result<(), StoreError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| StoreError::Io { path: dir.to_owned(), source })
}

fn write_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StoreError> {
    let io = |source| StoreError::Io { path: path.to_owned(), source };
    let mut f =
        OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(path).map_err(io)?;
    // `mode` applies only when the file is created; an existing file keeps its bits otherwise.
    f.set_permissions(fs::Permissions::from_mode(mode)).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)
}

fn prepare_dir(dir: &Path, force: bool) -> Result<(), StoreError> {
    if !force {
        for file in [CONFIG, CA_KEY, ROOT_KEY, CA_CERT] {
            if dir.join(file).exists() {
                return Err(StoreError::Exists { dir: dir.to_owned(), file });
            }
        }
    }
    create_dir(dir)?;
    if force {
        // A plug-in CA has no root key; one left from an earlier CA would be misleading.
        let _ = fs::remove_file(dir.join(ROOT_KEY));
    }
    Ok(())
}

fn finish_init(dir: &Path, td: &TrustDomain, now: OffsetDateTime) -> Result<LoadedCa, StoreError> {
    let token_key = KeyPair::generate().map_err(StoreError::KeyGen)?;
    write_private(&dir.join(TOKEN_KEY), token_key.serialize_pem().as_bytes())?;
    let config = CaConfig { trust_domain: td.clone() };
    let yaml = serde_saphyr::to_string(&config)
        .map_err(|e| StoreError::Config { path: dir.join(CONFIG), detail: e.to_string() })?;
    write_public(&dir.join(CONFIG), yaml.as_bytes())?;
    load(dir, now)
}

fn parse_key(pem: &[u8], path: &Path) -> Result<KeyPair, StoreError> {
    let der = kpem::key_from_pem(pem, &path.display().to_string())?;
    KeyPair::try_from(&der).map_err(|e| StoreError::Key { path: path.to_owned(), detail: e.to_string() })
}

fn authority_err(dir: &Path, source: AuthorityError) -> StoreError {
    StoreError::Authority { dir: dir.to_owned(), source }
}
