//! Sidecars that get their identity from `ca serve`: bootstrap with a token, renewal under
//! continuous traffic with no failed connection, and riding out a CA outage on the cached
//! certificate.

mod common;

use std::time::{Duration, Instant};

use common::mesh::*;
use keycard_ca::server::ServeOptions;
use keycard_config::sidecar::IdentitySource;

struct Ca {
    pki: Pki,
    url: String,
    task: tokio::task::JoinHandle<()>,
}

async fn serve_ca(ttl: Duration) -> Ca {
    let pki = Pki::new();
    let served = keycard_ca::store::load(&pki.ca_dir(), time::OffsetDateTime::now_utc()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let ttl = time::Duration::try_from(ttl).unwrap();
    let opts = ServeOptions { default_ttl: ttl, max_ttl: ttl, ..Default::default() };
    let task = tokio::spawn(async move {
        let _ = keycard_ca::server::serve(
            listener,
            served,
            opts,
            prometheus::Registry::new(),
            std::future::pending(),
        )
        .await;
    });
    Ca { pki, url, task }
}

fn from_ca(ca: &Ca, ns: &str, sa: &str, ttl: Duration) -> IdentitySource {
    let id = Pki::id(ns, sa);
    let token = ca.pki.ca.tokens.mint(&id, time::OffsetDateTime::now_utc().unix_timestamp(), 600).unwrap();
    let token_file = ca.pki.dir.path().join(format!("{sa}.token"));
    std::fs::write(&token_file, token).unwrap();
    IdentitySource::Ca { url: ca.url.clone(), token_file, bundle: ca.pki.bundle_path(), ttl }
}

async fn pair(ca: &Ca, ttl: Duration) -> (Running, Running, tempfile::TempDir) {
    let dir = policy_dir(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n",
    );
    let server = start(config(SidecarSpec {
        ns: "default",
        sa: "ratings",
        labels: &[],
        identity: from_ca(ca, "default", "ratings", ttl),
        inbound: vec![(9080, echo().await)],
        outbound: vec![],
        policy: Some(dir.path().to_owned()),
    }))
    .await;
    let client = start(config(SidecarSpec {
        ns: "default",
        sa: "reviews",
        labels: &[],
        identity: from_ca(ca, "default", "reviews", ttl),
        inbound: vec![],
        outbound: vec![(server.inbound(9080), vec![Pki::id("default", "ratings")])],
        policy: None,
    }))
    .await;
    (server, client, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_renew_under_continuous_traffic_with_no_failed_connection() {
    let ca = serve_ca(Duration::from_secs(4)).await;
    let (server, client, _dir) = pair(&ca, Duration::from_secs(4)).await;
    let (mut ok, mut failed) = (0, Vec::new());
    let until = Instant::now() + Duration::from_secs(9);
    while Instant::now() < until {
        match roundtrip(client.addrs.outbound[0]).await {
            Ok(()) => ok += 1,
            Err(e) => failed.push(e),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        failed.is_empty(),
        "{} of {} connections failed: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(3)]
    );
    // 4 s certificates renewed at half life over 9 s: the first plus at least three renewals each.
    for r in [&server, &client] {
        let renewed = r.metric("keycard_certificate_renewals_total{result=\"success\"}");
        assert!(renewed >= 4.0, "only {renewed} certificates in 9 s");
    }
    let (_, certs) = http_get(client.addrs.admin, "/certs").await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&certs).unwrap();
    assert!(v["expires_in_seconds"].as_i64().unwrap() <= 4);
    let renews_in = v["renews_in_seconds"].as_i64().unwrap();
    assert!((-1..=3).contains(&renews_in), "renewal is due at about half of 4 s, not {renews_in}");
    client.shutdown().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_outage_rides_on_the_cached_certificate() {
    let ca = serve_ca(Duration::from_secs(8)).await;
    let (server, client, _dir) = pair(&ca, Duration::from_secs(8)).await;
    assert_eq!(roundtrip(client.addrs.outbound[0]).await, Ok(()));
    ca.task.abort();
    // Renewal is due at about 4 s and fails; the certificates stay valid until 8 s.
    let deadline = Instant::now() + Duration::from_secs(7);
    while client.metric("keycard_certificate_renewals_total{result=\"failure\"}") < 1.0 {
        assert!(Instant::now() < deadline, "no renewal was attempted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        roundtrip(client.addrs.outbound[0]).await,
        Ok(()),
        "traffic continues on the cached certificate"
    );
    let (code, _) = http_get(client.addrs.readiness, "/healthz/ready").await.unwrap();
    assert_eq!(code, 200, "still ready while the certificate is valid");
    // At expiry it fails closed: not ready, and no mesh traffic.
    let deadline = Instant::now() + Duration::from_secs(8);
    while http_get(client.addrs.readiness, "/healthz/ready").await.is_some_and(|(c, _)| c == 200) {
        assert!(Instant::now() < deadline, "still ready after the certificate expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(roundtrip(client.addrs.outbound[0]).await.is_err(), "an expired sidecar must not carry traffic");
    client.shutdown().await;
    server.shutdown().await;
}
