//! `ca serve` over real HTTPS on 127.0.0.1: issuance with a bootstrap token, renewal over mutual
//! TLS, and every refusal reason, each seen by the client and counted in `/metrics`.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keycard_ca::server::ServeOptions;
use keycard_ca::store::{self, InitOptions, LoadedCa};
use keycard_config::pem::{certs_from_pem, key_from_pem};
use keycard_config::svid::{Purpose, TrustBundle};
use keycard_config::{SpiffeId, TrustDomain};
use keycard_proxy::identity::{CaClient, ClientError, Credential, new_key_and_csr};
use rustls_pki_types::UnixTime;
use time::OffsetDateTime;

struct Running {
    _tmp: tempfile::TempDir,
    addr: SocketAddr,
    /// A second handle on the same CA files, to mint tokens as `keycard ca token` would.
    ca: LoadedCa,
    bundle: Arc<TrustBundle>,
    client: CaClient,
}

fn init(dir: &std::path::Path, td: &str) -> LoadedCa {
    let opts = InitOptions {
        trust_domain: TrustDomain::parse(td).unwrap(),
        root_lifetime: time::Duration::days(3650),
        intermediate_lifetime: time::Duration::days(365),
        force: false,
    };
    store::init(dir, &opts, OffsetDateTime::now_utc()).unwrap()
}

async fn start(opts: ServeOptions) -> Running {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let served = init(&dir, "cluster.local");
    let ca = store::load(&dir, OffsetDateTime::now_utc()).unwrap();
    let bundle = ca.authority.bundle().clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let registry = prometheus::Registry::new();
    tokio::spawn(keycard_ca::server::serve(listener, served, opts, registry, std::future::pending()));
    let client = CaClient::new(&format!("https://{addr}"), bundle.clone(), Duration::from_secs(5)).unwrap();
    Running { _tmp: tmp, addr, ca, bundle, client }
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://cluster.local/ns/default/sa/{sa}")).unwrap()
}

fn token(r: &Running, sa: &str, issued_at: i64, ttl: i64) -> Credential {
    Credential::Token(r.ca.tokens.mint(&id(sa), issued_at, ttl).unwrap())
}

fn now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

fn refused_reason(e: ClientError) -> (u16, String) {
    match e {
        ClientError::Refused { status, reason, .. } => (status.as_u16(), reason),
        other => panic!("expected a refusal, got {other}"),
    }
}

async fn metrics(r: &Running) -> String {
    scrape(r.addr, &r.bundle).await
}

/// GET /metrics over TLS (verifying the CA's SVID), without a client certificate.
async fn scrape(addr: SocketAddr, bundle: &Arc<TrustBundle>) -> String {
    use http_body_util::BodyExt as _;
    let verifier = Arc::new(keycard_config::tls::SvidServerVerifier::new(bundle.clone(), vec![]));
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(rustls_pki_types::ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/metrics")
        .header("host", "localhost")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

#[tokio::test]
async fn a_token_gets_a_certificate_and_the_certificate_renews_itself_over_mtls() {
    let r = start(ServeOptions::default()).await;
    let (key, csr) = new_key_and_csr(&id("productpage")).unwrap();
    let resp = r.client.sign(&csr, Some(3600), &token(&r, "productpage", now(), 600)).await.unwrap();
    assert_eq!(resp.spiffe_id, "spiffe://cluster.local/ns/default/sa/productpage");
    let chain = certs_from_pem(resp.chain.as_bytes(), "response").unwrap();
    assert_eq!(chain.len(), 3, "leaf, intermediate, root");
    let svid = r.bundle.verify(&chain, UnixTime::now(), Purpose::Any).unwrap();
    assert_eq!(svid.id, id("productpage"));
    assert!(svid.not_after - now() <= 3600 + 5, "ttl honoured");
    // The issued certificate binds the key we made, which the CA never saw.
    let leaf = x509_parser::parse_x509_certificate(&chain[0]).unwrap().1;
    assert_eq!(leaf.public_key().raw, rcgen::PublicKeyData::subject_public_key_info(&key).as_slice());

    let credential = Credential::Svid {
        chain: chain.clone(),
        key: key_from_pem(key.serialize_pem().as_bytes(), "key").unwrap(),
    };
    let (_key2, csr2) = new_key_and_csr(&id("productpage")).unwrap();
    let renewed = r.client.sign(&csr2, None, &credential).await.unwrap();
    assert_eq!(renewed.spiffe_id, resp.spiffe_id);
    assert_ne!(renewed.serial, resp.serial);

    let m = metrics(&r).await;
    assert_eq!(metric(&m, "keycard_ca_certificates_issued_total{auth=\"token\"}"), 1.0);
    assert_eq!(metric(&m, "keycard_ca_certificates_issued_total{auth=\"mtls\"}"), 1.0);
    let inter = r.ca.authority.signer_not_after().unix_timestamp() as f64;
    assert_eq!(metric(&m, "keycard_ca_intermediate_expiry_timestamp_seconds"), inter);
    assert!(metric(&m, "keycard_ca_root_expiry_timestamp_seconds") > inter);
}

#[tokio::test]
async fn the_ttl_is_clamped_to_the_maximum() {
    let opts = ServeOptions { max_ttl: time::Duration::hours(1), ..Default::default() };
    let r = start(opts).await;
    let (_k, csr) = new_key_and_csr(&id("reviews")).unwrap();
    let resp = r.client.sign(&csr, Some(365 * 86_400), &token(&r, "reviews", now(), 60)).await.unwrap();
    let chain = certs_from_pem(resp.chain.as_bytes(), "response").unwrap();
    let svid = r.bundle.verify(&chain, UnixTime::now(), Purpose::Any).unwrap();
    assert!(svid.not_after - now() <= 3600 + 5, "asked a year, got {}s", svid.not_after - now());
}

#[tokio::test]
async fn every_refusal_has_its_status_reason_and_counter() {
    let r = start(ServeOptions::default()).await;
    let (_k, csr) = new_key_and_csr(&id("productpage")).unwrap();

    let e = r.client.sign(&csr, None, &Credential::Anonymous).await.unwrap_err();
    assert_eq!(refused_reason(e), (401, "missing_credentials".into()));

    let e = r.client.sign(&csr, None, &Credential::Token("not.a.token".into())).await.unwrap_err();
    assert_eq!(refused_reason(e), (401, "invalid_token".into()));

    // A token signed by another CA's key.
    let other_dir = tempfile::tempdir().unwrap();
    let other = init(&other_dir.path().join("ca"), "cluster.local");
    let foreign_token = Credential::Token(other.tokens.mint(&id("productpage"), now(), 600).unwrap());
    let e = r.client.sign(&csr, None, &foreign_token).await.unwrap_err();
    assert_eq!(refused_reason(e), (401, "invalid_token".into()));

    let e = r.client.sign(&csr, None, &token(&r, "productpage", now() - 7200, 3600)).await.unwrap_err();
    assert_eq!(refused_reason(e), (401, "expired_token".into()));

    // A token for reviews cannot get a productpage certificate.
    let e = r.client.sign(&csr, None, &token(&r, "reviews", now(), 600)).await.unwrap_err();
    assert_eq!(refused_reason(e), (403, "identity_mismatch".into()));

    let foreign_id = SpiffeId::parse("spiffe://evil.example/ns/default/sa/productpage").unwrap();
    let (_k, foreign_csr) = new_key_and_csr(&foreign_id).unwrap();
    let e = r.client.sign(&foreign_csr, None, &token(&r, "productpage", now(), 600)).await.unwrap_err();
    assert_eq!(refused_reason(e), (403, "foreign_trust_domain".into()));

    let e = r.client.sign("garbage", None, &token(&r, "productpage", now(), 600)).await.unwrap_err();
    assert_eq!(refused_reason(e), (400, "bad_csr".into()));

    // A CSR whose signature does not match its key: flip a byte inside the signature.
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(csr.as_bytes())
        .map(|d: rustls_pki_types::CertificateSigningRequestDer<'static>| d.as_ref().to_vec())
        .unwrap();
    let mut tampered = der.clone();
    let n = tampered.len();
    tampered[n - 3] ^= 0x55;
    let tampered_pem = keycard_config::pem::der_to_pem("CERTIFICATE REQUEST", &tampered);
    let e = r.client.sign(&tampered_pem, None, &token(&r, "productpage", now(), 600)).await.unwrap_err();
    assert_eq!(refused_reason(e), (400, "bad_csr".into()));

    let huge = "A".repeat(keycard_config::ca_api::MAX_BODY_BYTES + 1);
    let e = r.client.sign(&huge, None, &token(&r, "productpage", now(), 600)).await.unwrap_err();
    assert_eq!(refused_reason(e), (413, "body_too_large".into()));

    let m = metrics(&r).await;
    for (reason, count) in [
        ("missing_credentials", 1.0),
        ("invalid_token", 2.0),
        ("expired_token", 1.0),
        ("identity_mismatch", 1.0),
        ("foreign_trust_domain", 1.0),
        ("bad_csr", 2.0),
        ("body_too_large", 1.0),
    ] {
        assert_eq!(
            metric(&m, &format!("keycard_ca_requests_refused_total{{reason=\"{reason}\"}}")),
            count,
            "{reason}"
        );
    }
    assert!(!m.contains("keycard_ca_certificates_issued_total{"), "nothing was issued:\n{m}");
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_fails_the_handshake() {
    let r = start(ServeOptions::default()).await;
    let other_dir = tempfile::tempdir().unwrap();
    let other = init(&other_dir.path().join("ca"), "cluster.local");
    let key = rcgen::KeyPair::generate().unwrap();
    let issued = other
        .authority
        .issue(
            &id("productpage"),
            &key,
            time::Duration::hours(1),
            OffsetDateTime::now_utc(),
            &Default::default(),
        )
        .unwrap();
    let credential = Credential::Svid {
        chain: issued.chain,
        key: key_from_pem(key.serialize_pem().as_bytes(), "k").unwrap(),
    };
    let (_k, csr) = new_key_and_csr(&id("productpage")).unwrap();
    let e = r.client.sign(&csr, None, &credential).await.unwrap_err();
    assert!(matches!(e, ClientError::Tls(_) | ClientError::Http(_)), "handshake must fail, got {e}");
}

#[tokio::test]
async fn the_client_refuses_a_server_that_is_not_the_ca() {
    // Our client trusts a different bundle: the real CA's certificate is then an unknown CA.
    let r = start(ServeOptions::default()).await;
    let other_dir = tempfile::tempdir().unwrap();
    let other = init(&other_dir.path().join("ca"), "cluster.local");
    let client = CaClient::new(
        &format!("https://{}", r.addr),
        other.authority.bundle().clone(),
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(matches!(client.bundle_pem().await.unwrap_err(), ClientError::Tls(_)));
    assert!(r.client.bundle_pem().await.unwrap().contains("BEGIN CERTIFICATE"));
}

#[tokio::test]
async fn tls_1_2_is_refused() {
    let r = start(ServeOptions::default()).await;
    let verifier = Arc::new(keycard_config::tls::SvidServerVerifier::new(r.bundle.clone(), vec![]));
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(r.addr).await.unwrap();
    let result = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(rustls_pki_types::ServerName::try_from("localhost").unwrap(), tcp)
        .await;
    assert!(result.is_err(), "a TLS 1.2 handshake must not complete");
}

#[tokio::test]
async fn a_silent_connection_is_closed_at_the_handshake_deadline() {
    use tokio::io::AsyncReadExt as _;
    let opts = ServeOptions { handshake_timeout: Duration::from_millis(300), ..Default::default() };
    let r = start(opts).await;
    let mut tcp = tokio::net::TcpStream::connect(r.addr).await.unwrap();
    // Trickle one byte of a ClientHello: the deadline is absolute, not reset by bytes.
    tokio::io::AsyncWriteExt::write_all(&mut tcp, &[0x16]).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await;
    match read {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("server sent {n} bytes to a silent client"),
        Err(_) => panic!("the connection was still open 10 s after a 300 ms handshake deadline"),
    }
    // The CA still serves others.
    assert!(r.client.bundle_pem().await.is_ok());
}
