//! The L4 sidecar end to end over real sockets: a CA, sidecars and echo apps in this process.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::mesh::*;
use keycard_config::SpiffeId;
use keycard_config::svid::TrustBundle;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const STRICT_MESH: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n---\n";

fn details_policy() -> String {
    format!(
        "{STRICT_MESH}apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: details-viewer, namespace: default}}
spec:
  selector: {{matchLabels: {{app: details}}}}
  rules:
  - from:
    - source:
        principals: [\"cluster.local/ns/default/sa/bookinfo-productpage\"]
    to:
    - operation:
        ports: [\"9080\"]
  - from:
    - source:
        namespaces: [\"trusted\"]
"
    )
}

struct Server {
    run: Running,
    _policy: tempfile::TempDir,
}

/// The details sidecar with an echo app on ports 9080 and 9443.
async fn details_server(pki: &Pki, policy: &str) -> Server {
    let (a, b) = (echo().await, echo().await);
    details_server_for(pki, policy, vec![(9080, a), (9443, b)]).await
}

async fn details_server_for(pki: &Pki, policy: &str, inbound: Vec<(u16, std::net::SocketAddr)>) -> Server {
    let dir = policy_dir(policy);
    let run = start(config(SidecarSpec {
        ns: "default",
        sa: "bookinfo-details",
        labels: &[("app", "details")],
        identity: pki.files("default", "bookinfo-details"),
        inbound,
        outbound: vec![],
        policy: Some(dir.path().to_owned()),
    }))
    .await;
    Server { run, _policy: dir }
}

async fn client(
    pki: &Pki,
    ns: &'static str,
    sa: &'static str,
    upstreams: Vec<(std::net::SocketAddr, Vec<SpiffeId>)>,
) -> Running {
    start(config(SidecarSpec {
        ns,
        sa,
        labels: &[],
        identity: pki.files(ns, sa),
        inbound: vec![],
        outbound: upstreams,
        policy: None,
    }))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn principal_namespace_and_port_decide_who_gets_through() {
    let pki = Pki::new();
    let server = details_server(&pki, &details_policy()).await;
    let ups = || vec![(server.run.inbound(9080), vec![]), (server.run.inbound(9443), vec![])];
    let productpage = client(&pki, "default", "bookinfo-productpage", ups()).await;
    let reviews = client(&pki, "default", "bookinfo-reviews", ups()).await;
    let tool = client(&pki, "trusted", "tool", ups()).await;

    assert_eq!(
        roundtrip(productpage.addrs.outbound[0]).await,
        Ok(()),
        "productpage -> 9080 allowed by principal"
    );
    assert!(
        roundtrip(productpage.addrs.outbound[1]).await.is_err(),
        "productpage -> 9443: the rule names port 9080"
    );
    assert!(roundtrip(reviews.addrs.outbound[0]).await.is_err(), "reviews is not allowed");
    assert_eq!(roundtrip(tool.addrs.outbound[1]).await, Ok(()), "namespace trusted is allowed on any port");

    let m = server.run.metrics();
    assert_eq!(
        metric_sum(
            &m,
            "keycard_authz_decisions_total",
            &["policy=\"ns[default]-policy[details-viewer]-rule[0]\"", "action=\"allow\""]
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric_sum(
            &m,
            "keycard_authz_decisions_total",
            &["policy=\"ns[default]-policy[details-viewer]-rule[1]\""]
        ),
        1.0
    );
    assert_eq!(metric_sum(&m, "keycard_authz_decisions_total", &["policy=\"none\"", "action=\"deny\""]), 2.0);
    let pp = "source_principal=\"spiffe://cluster.local/ns/default/sa/bookinfo-productpage\"";
    assert!(
        metric_sum(
            &m,
            "istio_tcp_connections_opened_total",
            &[pp, "connection_security_policy=\"mutual_tls\"", "reporter=\"destination\""]
        ) >= 1.0,
        "{m}"
    );
    assert!(metric_sum(&m, "istio_tcp_received_bytes_total", &[pp]) >= 4.0);
    assert_eq!(metric_sum(&m, "istio_tcp_connections_closed_total", &["response_flags=\"RBAC\""]), 2.0);
    let out = productpage.metrics();
    assert!(
        metric_sum(
            &out,
            "istio_tcp_connections_opened_total",
            &[
                "reporter=\"source\"",
                "destination_principal=\"spiffe://cluster.local/ns/default/sa/bookinfo-details\""
            ]
        ) >= 1.0,
        "{out}"
    );

    // config_dump names the effective mode per port and the policies in force.
    let (code, dump) = http_get(server.run.addrs.admin, "/config_dump").await.unwrap();
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(v["inbound"][0]["mtls_mode"], "STRICT");
    assert_eq!(v["inbound"][0]["mode_source"], "istio-system/default");
    assert_eq!(v["authorization_policies"][0]["name"], "details-viewer");
    let (_, certs) = http_get(server.run.addrs.admin, "/certs").await.unwrap();
    let c: serde_json::Value = serde_json::from_str(&certs).unwrap();
    assert_eq!(c["spiffe_id"], "spiffe://cluster.local/ns/default/sa/bookinfo-details");
    assert_eq!(c["chain"][0]["kind"], "leaf");
    for r in [productpage, reviews, tool, server.run] {
        r.shutdown().await;
    }
}

fn tls_client(
    chain: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    bundle: Arc<TrustBundle>,
) -> Arc<rustls::ClientConfig> {
    let verifier = Arc::new(keycard_config::tls::SvidServerVerifier::new(bundle, vec![]));
    let b =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier);
    let mut c = match chain {
        Some((chain, key)) => b.with_client_auth_cert(chain, key).unwrap(),
        None => b.with_no_client_auth(),
    };
    c.alpn_protocols = vec![b"istio".to_vec()];
    Arc::new(c)
}

/// TLS to `addr` with `config`, then a ping: Ok only if it is echoed.
async fn tls_ping(addr: std::net::SocketAddr, config: Arc<rustls::ClientConfig>) -> Result<(), String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from("details").unwrap();
    let mut s =
        tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.map_err(|e| e.to_string())?;
    s.write_all(b"ping").await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 4];
    match tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await {
        Ok(Ok(_)) if &buf == b"ping" => Ok(()),
        other => Err(format!("{other:?}")),
    }
}

fn issue_with(
    pki: &Pki,
    id: &str,
    extra_uri: Option<&str>,
    not_after_offset: time::Duration,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let ca_dir = pki.ca_dir();
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("ca-key.pem")).unwrap()).unwrap();
    let ca_cert = keycard_config::pem::certs_from_file(&ca_dir.join("ca-cert.pem")).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_der(&ca_cert[0], ca_key).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let id = SpiffeId::parse(id).unwrap();
    let mut params = keycard_ca::profile::leaf(
        &id,
        time::Duration::hours(1),
        now,
        now + time::Duration::days(1),
        &Default::default(),
    )
    .unwrap();
    if let Some(u) = extra_uri {
        params.subject_alt_names.push(rcgen::SanType::URI(u.to_owned().try_into().unwrap()));
    }
    params.not_after = now + not_after_offset;
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = params.signed_by(&key, &issuer).unwrap();
    let key_der = keycard_config::pem::key_from_pem(key.serialize_pem().as_bytes(), "k").unwrap();
    (vec![leaf.der().clone(), ca_cert[0].clone()], key_der)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_refuses_plaintext_certless_and_bad_certificates_with_reasons() {
    let pki = Pki::new();
    let allow_all = format!(
        "{STRICT_MESH}apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: all, namespace: default}}\nspec: {{rules: [{{}}]}}\n"
    );
    let server = details_server(&pki, &allow_all).await;
    let port = server.run.inbound(9080);
    let bundle = pki.ca.authority.bundle().clone();

    // Plaintext never reaches the app.
    let mut s = TcpStream::connect(port).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(5)).await);

    let good = issue_with(&pki, "spiffe://cluster.local/ns/default/sa/ok", None, time::Duration::hours(1));
    assert_eq!(
        tls_ping(port, tls_client(Some(good), bundle.clone())).await,
        Ok(()),
        "a valid SVID gets through"
    );
    assert!(tls_ping(port, tls_client(None, bundle.clone())).await.is_err(), "no client certificate");
    let expired =
        issue_with(&pki, "spiffe://cluster.local/ns/default/sa/old", None, -time::Duration::minutes(1));
    assert!(tls_ping(port, tls_client(Some(expired), bundle.clone())).await.is_err());
    let stranger = Pki::new();
    let foreign =
        issue_with(&stranger, "spiffe://cluster.local/ns/default/sa/x", None, time::Duration::hours(1));
    assert!(tls_ping(port, tls_client(Some(foreign), bundle.clone())).await.is_err());
    let other_td = issue_with(&pki, "spiffe://evil.example/ns/default/sa/x", None, time::Duration::hours(1));
    assert!(tls_ping(port, tls_client(Some(other_td), bundle.clone())).await.is_err());
    let two = issue_with(
        &pki,
        "spiffe://cluster.local/ns/default/sa/a",
        Some("spiffe://cluster.local/ns/default/sa/b"),
        time::Duration::hours(1),
    );
    assert!(tls_ping(port, tls_client(Some(two), bundle.clone())).await.is_err());

    let m = server.run.metrics();
    for reason in
        ["plaintext_in_strict", "no_client_cert", "expired", "unknown_ca", "wrong_trust_domain", "bad_svid"]
    {
        assert_eq!(
            metric(
                &m,
                &format!("keycard_handshake_failures_total{{direction=\"inbound\",reason=\"{reason}\"}}")
            ),
            1.0,
            "{reason}: {m}"
        );
    }
    let (_, failures) = http_get(server.run.addrs.admin, "/debug/handshake_failures").await.unwrap();
    let f: serde_json::Value = serde_json::from_str(&failures).unwrap();
    assert_eq!(f.as_array().unwrap().len(), 6);
    assert!(failures.contains("multiple_uri_sans"), "{failures}");
    server.run.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_serves_both_disable_is_plaintext_and_modes_are_per_port() {
    let pki = Pki::new();
    let policy = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: details, namespace: default}\nspec:\n  selector: {matchLabels: {app: details}}\n  mtls: {mode: PERMISSIVE}\n  portLevelMtls:\n    9443: {mode: DISABLE}\n";
    let server = details_server(&pki, policy).await;
    let pp = client(
        &pki,
        "default",
        "productpage",
        vec![(server.run.inbound(9080), vec![]), (server.run.inbound(9443), vec![])],
    )
    .await;

    assert_eq!(roundtrip(server.run.inbound(9080)).await, Ok(()), "PERMISSIVE: plaintext served");
    assert_eq!(roundtrip(pp.addrs.outbound[0]).await, Ok(()), "PERMISSIVE: mTLS served");
    assert_eq!(roundtrip(server.run.inbound(9443)).await, Ok(()), "DISABLE: plaintext served");
    assert!(roundtrip(pp.addrs.outbound[1]).await.is_err(), "DISABLE: the sidecar does not terminate TLS");

    let m = server.run.metrics();
    assert_eq!(metric(&m, "keycard_plaintext_connections_total{port=\"9080\"}"), 1.0, "{m}");
    assert_eq!(metric(&m, "keycard_plaintext_connections_total{port=\"9443\"}"), 2.0);
    assert!(
        metric_sum(&m, "istio_tcp_connections_opened_total", &["connection_security_policy=\"none\""]) >= 2.0
    );
    assert!(
        metric_sum(&m, "istio_tcp_connections_opened_total", &["connection_security_policy=\"mutual_tls\""])
            >= 1.0
    );
    let (_, census) = http_get(server.run.addrs.admin, "/debug/plaintext_sources").await.unwrap();
    assert!(census.contains("127.0.0.1"), "{census}");
    let (_, dump) = http_get(server.run.addrs.admin, "/config_dump").await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(v["inbound"][1]["mtls_mode"], "DISABLE");
    assert_eq!(v["inbound"][1]["mode_source"], "default/details:9443");
    pp.shutdown().await;
    server.run.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_naming_refuses_an_impostor_server() {
    let pki = Pki::new();
    let server = details_server(&pki, STRICT_MESH.trim_end_matches("---\n")).await;
    let expect_reviews = vec![Pki::id("default", "bookinfo-reviews")];
    let expect_details = vec![Pki::id("default", "bookinfo-details")];
    let pp = client(
        &pki,
        "default",
        "productpage",
        vec![(server.run.inbound(9080), expect_reviews), (server.run.inbound(9080), expect_details)],
    )
    .await;
    assert!(roundtrip(pp.addrs.outbound[0]).await.is_err(), "details answering for reviews is an impostor");
    assert_eq!(roundtrip(pp.addrs.outbound[1]).await, Ok(()));
    let m = pp.metrics();
    assert_eq!(
        metric(&m, "keycard_handshake_failures_total{direction=\"outbound\",reason=\"san_mismatch\"}"),
        1.0,
        "{m}"
    );
    let (_, failures) = http_get(pp.addrs.admin, "/debug/handshake_failures").await.unwrap();
    assert!(
        failures.contains("expected spiffe://cluster.local/ns/default/sa/bookinfo-reviews"),
        "{failures}"
    );
    assert!(failures.contains("bookinfo-details"), "the log names what was presented: {failures}");
    pp.shutdown().await;
    server.run.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_reload_closes_a_denied_live_connection_and_a_broken_file_keeps_the_old_policy() {
    let pki = Pki::new();
    let allow_pp = details_policy();
    let server = details_server(&pki, &allow_pp).await;
    let pp = client(&pki, "default", "bookinfo-productpage", vec![(server.run.inbound(9080), vec![])]).await;
    let mut live = TcpStream::connect(pp.addrs.outbound[0]).await.unwrap();
    assert_eq!(exchange(&mut live, b"one").await, Ok(()));

    // A broken file: rejected, counted, the old policy stays and the live connection too.
    let policy_file = server._policy.path().join("policy.yaml");
    std::fs::write(&policy_file, format!("{allow_pp}  - bogus: [\n")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.run.metric("keycard_policy_reloads_total{result=\"error\"}") < 1.0 {
        assert!(Instant::now() < deadline, "the broken policy was never noticed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(exchange(&mut live, b"two").await, Ok(()));
    assert_eq!(roundtrip(pp.addrs.outbound[0]).await, Ok(()), "new connections still follow the old policy");
    let (_, dump) = http_get(server.run.addrs.admin, "/config_dump").await.unwrap();
    assert!(dump.contains("policy.yaml:"), "config_dump shows the rejected file's error: {dump}");

    // Now deny productpage: the live connection is closed and counted.
    std::fs::write(&policy_file, format!("{STRICT_MESH}apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: deny-pp, namespace: default}}\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/default/sa/bookinfo-productpage\"]\n")).unwrap();
    assert!(closed_within(&mut live, Duration::from_secs(5)).await, "the now-denied connection stays open");
    assert_eq!(
        server.run.metric(
            "keycard_connections_closed_by_policy_total{policy=\"ns[default]-policy[deny-pp]-rule[0]\"}"
        ),
        1.0
    );
    assert!(roundtrip(pp.addrs.outbound[0]).await.is_err());
    pp.shutdown().await;
    server.run.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_is_closed_at_the_handshake_deadline() {
    let pki = Pki::new();
    let server = details_server(&pki, STRICT_MESH.trim_end_matches("---\n")).await;
    let mut s = TcpStream::connect(server.run.inbound(9080)).await.unwrap();
    let started = Instant::now();
    // A TLS record header, then one byte every 200 ms: never a full ClientHello.
    s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).await.unwrap();
    let mut closed = false;
    for _ in 0..50 {
        if s.write_all(&[0x01]).await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 8];
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
            closed = true;
            break;
        }
    }
    assert!(closed, "still open after {:?}", started.elapsed());
    assert!(
        server.run.metric("keycard_handshake_failures_total{direction=\"inbound\",reason=\"timeout\"}")
            >= 1.0
    );
    server.run.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_closed_and_counted() {
    let pki = Pki::new();
    let dir = policy_dir("");
    let app = echo().await;
    let mut cfg = config(SidecarSpec {
        ns: "default",
        sa: "capped",
        labels: &[],
        identity: pki.files("default", "capped"),
        inbound: vec![(9080, app)],
        outbound: vec![],
        policy: Some(dir.path().to_owned()),
    });
    cfg.limits.max_connections = 2;
    let run = start(cfg).await;
    let mut a = TcpStream::connect(run.inbound(9080)).await.unwrap();
    let mut b = TcpStream::connect(run.inbound(9080)).await.unwrap();
    assert_eq!(exchange(&mut a, b"a").await, Ok(()));
    assert_eq!(exchange(&mut b, b"b").await, Ok(()));
    let mut c = TcpStream::connect(run.inbound(9080)).await.unwrap();
    assert!(closed_within(&mut c, Duration::from_secs(5)).await);
    assert_eq!(run.metric("keycard_connections_refused_total{reason=\"overloaded\"}"), 1.0);
    drop((a, b));
    run.shutdown().await;
}

/// A TLS echo server outside the mesh, with a certificate for `external.example` from its own CA.
async fn external_tls_server(dir: &std::path::Path) -> (std::net::SocketAddr, std::path::PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name = rcgen::DistinguishedName::new();
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "external test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["external.example".to_owned()])
        .unwrap()
        .signed_by(&key, &rcgen::Issuer::from_params(&ca_params, &ca_key))
        .unwrap();
    let ca_path = dir.join("external-ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let key_der = keycard_config::pem::key_from_pem(key.serialize_pem().as_bytes(), "k").unwrap();
    let config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key_der)
            .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(s) = acceptor.accept(tcp).await {
                    let (mut r, mut w) = tokio::io::split(s);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
        }
    });
    (addr, ca_path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_rules_choose_plaintext_simple_tls_or_the_expected_identity() {
    let pki = Pki::new();
    let server = details_server(&pki, "").await;
    let plain = echo().await;
    let tmp = tempfile::tempdir().unwrap();
    let (external, ca_path) = external_tls_server(tmp.path()).await;
    let rules = format!(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: legacy, namespace: default}}
spec:
  host: legacy
  trafficPolicy: {{tls: {{mode: DISABLE}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: elsewhere, namespace: other}}
spec:
  host: details.default.svc.cluster.local
  trafficPolicy:
    tls:
      mode: ISTIO_MUTUAL
      subjectAltNames: [\"spiffe://cluster.local/ns/default/sa/bookinfo-reviews\"]
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: external, namespace: default}}
spec:
  host: external.example
  trafficPolicy:
    tls: {{mode: SIMPLE, caCertificates: {ca}, sni: external.example}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: details, namespace: default}}
spec:
  host: details.default.svc.cluster.local
  trafficPolicy:
    portLevelSettings:
    - port: {{number: 9080}}
      tls:
        mode: ISTIO_MUTUAL
        subjectAltNames: [\"spiffe://cluster.local/ns/default/sa/bookinfo-reviews\"]
",
        ca = ca_path.display()
    );
    let dir = policy_dir(&rules);
    let set = keycard_config::policy::PolicySet::load(&[dir.path().to_owned()]).unwrap();
    assert_eq!(set.dest_rules.len(), 4, "{:?}", set.dest_rules);
    let mut cfg = config(SidecarSpec {
        ns: "default",
        sa: "productpage",
        labels: &[],
        identity: pki.files("default", "productpage"),
        inbound: vec![],
        outbound: vec![
            (plain, vec![]),
            (external, vec![]),
            (server.run.inbound(9080), vec![]),
            (server.run.inbound(9443), vec![]),
        ],
        policy: Some(dir.path().to_owned()),
    });
    cfg.outbound[0].host = Some("legacy.default.svc.cluster.local".into());
    cfg.outbound[1].host = Some("external.example".into());
    cfg.outbound[2].host = Some("details.default.svc.cluster.local".into());
    cfg.outbound[2].port = Some(9080);
    cfg.outbound[3].host = Some("details.default.svc.cluster.local".into());
    cfg.outbound[3].port = Some(9443);
    let pp = start(cfg).await;
    assert_eq!(roundtrip(pp.addrs.outbound[0]).await, Ok(()), "DISABLE: plaintext to a non-mesh server");
    let simple = roundtrip(pp.addrs.outbound[1]).await;
    let (_, failures) = http_get(pp.addrs.admin, "/debug/handshake_failures").await.unwrap();
    assert_eq!(simple, Ok(()), "SIMPLE: TLS verified with the rule's CA; failures: {failures}");
    assert!(roundtrip(pp.addrs.outbound[2]).await.is_err(), "port 9080's SANs name reviews, details answers");
    assert_eq!(
        roundtrip(pp.addrs.outbound[3]).await,
        Ok(()),
        "no port-level rule for 9443 and namespace other's rule is not the client's: any mesh identity"
    );
    let m = pp.metrics();
    assert_eq!(
        metric(&m, "keycard_handshake_failures_total{direction=\"outbound\",reason=\"san_mismatch\"}"),
        1.0,
        "{m}"
    );
    pp.shutdown().await;
    server.run.shutdown().await;
}

/// A listener whose accept queue is full and never drained: a connection to it hangs in its
/// handshake (the kernel drops the SYNs) until the connecting side gives up. Keep what it returns.
async fn unanswered_listener() -> (std::net::SocketAddr, tokio::net::TcpListener, Vec<TcpStream>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    let listener = socket.listen(1).unwrap();
    let mut queued = Vec::new();
    for _ in 0..16 {
        match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => queued.push(s),
            Ok(Err(e)) => panic!("connect to the listener failed: {e}"),
            Err(_) => return (addr, listener, queued),
        }
    }
    panic!("the accept queue never filled");
}

/// A DestinationRule's `connectionPool.tcp.connectTimeout` is the deadline for connections to its
/// host; another host keeps the sidecar's own (`limits.connect_timeout`, 5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_rules_connect_timeout_bounds_connects_to_its_host_only() {
    let pki = Pki::new();
    let (hanging, _listener, _queued) = unanswered_listener().await;
    let dir = policy_dir(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: details, namespace: default}\nspec:\n  host: details.default.svc.cluster.local\n  trafficPolicy:\n    connectionPool:\n      tcp: {connectTimeout: 300ms}\n",
    );
    let mut cfg = config(SidecarSpec {
        ns: "default",
        sa: "productpage",
        labels: &[],
        identity: pki.files("default", "productpage"),
        inbound: vec![],
        outbound: vec![(hanging, vec![]), (hanging, vec![])],
        policy: Some(dir.path().to_owned()),
    });
    cfg.outbound[0].host = Some("details.default.svc.cluster.local".into());
    cfg.outbound[1].host = Some("reviews.default.svc.cluster.local".into());
    let pp = start(cfg).await;
    // Each connection waits for its upstream; the first gives up at the rule's deadline.
    let mut bounded = TcpStream::connect(pp.addrs.outbound[0]).await.unwrap();
    let mut unbounded = TcpStream::connect(pp.addrs.outbound[1]).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(3), bounded.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "not closed within 3 s: {closed:?}");
    let waited = started.elapsed();
    // The other host's connection is still waiting on its 5 s deadline.
    let open = tokio::time::timeout(Duration::from_millis(500), unbounded.read(&mut buf)).await;
    assert!(open.is_err(), "closed after {waited:?} + 0.5 s, before its own deadline: {open:?}");
    pp.shutdown().await;
}

/// A ClientHello as rustls writes it for `alpn`, to send over a plain socket.
fn client_hello(alpn: &[u8]) -> Vec<u8> {
    let roots = rustls::RootCertStore::empty();
    let mut config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), ServerName::try_from("app.example").unwrap())
            .unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_passes_non_mesh_tls_to_the_app_untouched() {
    let pki = Pki::new();
    let server = details_server(&pki, "").await;
    // ALPN h2: someone else's TLS. The echo app gets the ClientHello byte for byte.
    let hello = client_hello(b"h2");
    let mut s = TcpStream::connect(server.run.inbound(9080)).await.unwrap();
    s.write_all(&hello).await.unwrap();
    let mut back = vec![0u8; hello.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back)).await.unwrap().unwrap();
    assert_eq!(back, hello, "passed through untouched");
    // ALPN istio: mesh traffic, terminated by the sidecar (a ServerHello comes back, not an echo).
    let hello = client_hello(b"istio");
    let mut s = TcpStream::connect(server.run.inbound(9080)).await.unwrap();
    s.write_all(&hello).await.unwrap();
    let mut first = [0u8; 6];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut first)).await.unwrap().unwrap();
    assert_eq!(first[0], 0x16, "a TLS handshake record");
    assert_ne!(&first[..], &hello[..6], "not our own bytes echoed");
    server.run.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_root_added_to_the_bundle_file_is_trusted_without_restart() {
    let pki = Pki::new();
    let server = details_server(&pki, STRICT_MESH.trim_end_matches("---\n")).await;
    let next = Pki::new();
    let from_next =
        issue_with(&next, "spiffe://cluster.local/ns/default/sa/rotated", None, time::Duration::hours(1));
    let both = {
        let mut roots = pki.ca.authority.bundle().roots().to_vec();
        roots.extend(next.ca.authority.bundle().roots().iter().cloned());
        Arc::new(
            TrustBundle::new(keycard_config::TrustDomain::parse("cluster.local").unwrap(), roots).unwrap(),
        )
    };
    let port = server.run.inbound(9080);
    assert!(
        tls_ping(port, tls_client(Some((from_next.0.clone(), from_next.1.clone_key())), both.clone()))
            .await
            .is_err(),
        "not trusted yet"
    );
    // Rotation: the bundle file now holds the old and the new root.
    let pem = format!(
        "{}{}",
        std::fs::read_to_string(pki.bundle_path()).unwrap(),
        std::fs::read_to_string(next.bundle_path()).unwrap()
    );
    std::fs::write(pki.bundle_path(), pem).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match tls_ping(port, tls_client(Some((from_next.0.clone(), from_next.1.clone_key())), both.clone()))
            .await
        {
            Ok(()) => break,
            Err(e) => assert!(Instant::now() < deadline, "the new root was never trusted: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let old =
        issue_with(&pki, "spiffe://cluster.local/ns/default/sa/old-root", None, time::Duration::hours(1));
    assert_eq!(tls_ping(port, tls_client(Some(old), both)).await, Ok(()), "the old root stays trusted");
    let (_, certs) = http_get(server.run.addrs.admin, "/certs").await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&certs).unwrap();
    assert_eq!(v["trust_bundle"].as_array().unwrap().len(), 2);
    server.run.shutdown().await;
}

/// Istio's byte counters on both sidecars: `sent` is what went back to the connection's
/// initiator (the response), `received` what came from it, for the source and the destination
/// reporter alike. The app answers a 4-byte request with 1,000 bytes and closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_byte_counters_count_the_response_as_sent_on_both_sidecars() {
    let pki = Pki::new();
    let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_addr = app.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = app.accept().await.unwrap();
        let mut req = [0u8; 4];
        s.read_exact(&mut req).await.unwrap();
        s.write_all(&[7u8; 1000]).await.unwrap();
    });
    let (Server { run: server, _policy }, pp) = details_and_productpage(&pki, app_addr).await;
    let mut s = TcpStream::connect(pp.addrs.outbound[0]).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await.unwrap().unwrap();
    assert_eq!(got.len(), 1000);
    drop(s);

    let deadline = Instant::now() + Duration::from_secs(5);
    for (run, reporter) in [(&server, "reporter=\"destination\""), (&pp, "reporter=\"source\"")] {
        while metric_sum(&run.metrics(), "istio_tcp_connections_closed_total", &[reporter]) < 1.0 {
            assert!(Instant::now() < deadline, "{reporter}: the connection was never counted closed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let m = run.metrics();
        assert_eq!(metric_sum(&m, "istio_tcp_sent_bytes_total", &[reporter]), 1000.0, "{m}");
        assert_eq!(metric_sum(&m, "istio_tcp_received_bytes_total", &[reporter]), 4.0, "{m}");
    }
    pp.shutdown().await;
    server.shutdown().await;
}

#[tokio::test]
async fn the_active_connections_gauge_counts_a_forwarded_connection_until_it_closes() {
    let pki = Pki::new();
    let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_addr = app.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = app.accept().await.unwrap();
        // An echo: the connection stays open until the client closes it.
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    });
    let (Server { run: server, _policy }, pp) = details_and_productpage(&pki, app_addr).await;
    let gauge = "keycard_active_connections";
    let mut s = TcpStream::connect(pp.addrs.outbound[0]).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut echo)).await.unwrap().unwrap();
    assert_eq!(&echo, b"ping");
    for run in [&server, &pp] {
        assert_eq!(run.metric(gauge), 1.0, "{}", run.metrics());
    }
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(5);
    for run in [&server, &pp] {
        while run.metric(gauge) != 0.0 {
            assert!(Instant::now() < deadline, "still counted active after the close: {}", run.metrics());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    pp.shutdown().await;
    server.shutdown().await;
}

/// The details sidecar (inbound port 9080 to `app`, the details policy) and a productpage client
/// sidecar routed to it.
async fn details_and_productpage(pki: &Pki, app: std::net::SocketAddr) -> (Server, Running) {
    let server = details_server_for(pki, &details_policy(), vec![(9080, app)]).await;
    let pp = client(pki, "default", "bookinfo-productpage", vec![(server.run.inbound(9080), vec![])]).await;
    (server, pp)
}
