//! L7 end to end over real sockets: an app's HTTP through productpage's sidecar, pooled mutual
//! TLS HTTP/2 to details' sidecar, per-request policy there, and the app behind it.

mod common;

use std::time::Duration;

use common::l7::*;
use common::mesh::*;
use keycard_config::sidecar::{HttpSettings, Protocol};

const STRICT_MESH: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n---\n";

const REQUEST_POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: details-viewer, namespace: default}
spec:
  selector: {matchLabels: {app: details}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/bookinfo-productpage"]}}]
    to:
    - operation:
        methods: ["GET"]
        paths: ["/public/*", "/items/{*}/reviews"]
        hosts: ["details.default.svc.cluster.local"]
  - to: [{operation: {paths: ["/private"]}}]
    when: [{key: "request.headers[x-role]", values: ["admin"]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: default}
spec:
  selector: {matchLabels: {app: details}}
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin/*"]}}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_authorized_by_method_path_host_and_header_after_normalisation() {
    let pki = Pki::new();
    let mesh =
        L7Mesh::start(&pki, &format!("{STRICT_MESH}{REQUEST_POLICY}"), Protocol::Http, Protocol::Http).await;
    let c = h1_client();
    let out = mesh.outbound();
    let details = "details.default.svc.cluster.local";
    // (method, target, host, extra header, expected status, path the app sees)
    type Case<'a> = (&'a str, &'a str, &'a str, Option<(&'a str, &'a str)>, u16, Option<&'a str>);
    let cases: &[Case] = &[
        ("GET", "/public/a", details, None, 200, Some("/public/a")),
        ("GET", "/public/a?q=1", "DETAILS.default.svc.cluster.local:9080", None, 200, Some("/public/a?q=1")),
        ("GET", "/public/a", "other.example", None, 403, None),
        ("POST", "/public/a", details, None, 403, None),
        ("GET", "/private", details, None, 403, None),
        ("GET", "/private", details, Some(("x-role", "admin")), 200, Some("/private")),
        ("GET", "/public/%2E%2E/private", details, None, 403, None),
        ("GET", "/public/%2e%2e/private", details, Some(("x-role", "admin")), 200, Some("/private")),
        ("GET", "/public/../private", details, None, 403, None),
        ("GET", "/public/./b/../c", details, None, 200, Some("/public/c")),
        ("GET", "/public/%7Euser", details, None, 200, Some("/public/~user")),
        ("GET", "/admin/x", details, Some(("x-role", "admin")), 403, None),
        ("GET", "/public/%2E%2E/admin/x", details, Some(("x-role", "admin")), 403, None),
        ("GET", "/items/42/reviews", details, None, 200, Some("/items/42/reviews")),
        ("GET", "/items/42/43/reviews", details, None, 403, None),
    ];
    for (method, target, host, extra, want, seen) in cases {
        let mut headers = vec![("host", *host)];
        headers.extend(extra.iter().copied());
        let a = call(&c, out, method, target, &headers).await;
        assert_eq!(a.status, *want, "{method} {target} (host {host}, {extra:?}): {}", a.body);
        if let Some(seen) = seen {
            assert_eq!(field(&a.body, "target"), Some(*seen), "{method} {target}");
        } else {
            assert_eq!(a.body, "RBAC: access denied");
        }
    }
    // The deciding rule travels back with a 403.
    let a = call(&c, out, "POST", "/public/a", &[]).await;
    assert_eq!(a.headers["x-keycard-denied-by"], "none");
    let a = call(&c, out, "GET", "/admin/x", &[("x-role", "admin")]).await;
    assert_eq!(a.headers["x-keycard-denied-by"], "ns[default]-policy[deny-admin]-rule[0]");
    let m = mesh.server.metrics();
    assert!(
        metric_sum(
            &m,
            "keycard_authz_decisions_total",
            &["policy=\"ns[default]-policy[deny-admin]-rule[0]\"", "action=\"deny\""]
        ) >= 3.0,
        "{m}"
    );
    let denied = metric_sum(
        &m,
        "istio_requests_total",
        &["reporter=\"destination\"", "response_code=\"403\"", "response_flags=\"RBAC\""],
    );
    assert_eq!(denied, 10.0, "{m}");
    let allowed = metric_sum(
        &m,
        "istio_requests_total",
        &[
            "reporter=\"destination\"",
            "response_code=\"200\"",
            "connection_security_policy=\"mutual_tls\"",
            &format!("source_principal=\"{PRODUCTPAGE}\""),
        ],
    );
    assert_eq!(allowed, 7.0, "{m}");
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_gets_the_callers_identity_in_xfcc_a_request_id_and_untouched_trace_headers() {
    let pki = Pki::new();
    let mesh =
        L7Mesh::start(&pki, STRICT_MESH.trim_end_matches("---\n"), Protocol::Http, Protocol::Http).await;
    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let a = call(
        &h1_client(),
        mesh.outbound(),
        "GET",
        "/",
        &[
            (
                "x-forwarded-client-cert",
                "By=spiffe://cluster.local/ns/default/sa/x;URI=spiffe://cluster.local/ns/default/sa/admin",
            ),
            ("traceparent", trace),
            ("tracestate", "rojo=00f067aa0ba902b7"),
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("x-keycard-proto", "h2"),
        ],
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let xfcc = field(&a.body, "x-forwarded-client-cert").expect("xfcc reaches the app");
    assert!(!xfcc.contains("sa/admin"), "a forged XFCC was passed on: {xfcc}");
    let parts: Vec<&str> = xfcc.split(';').collect();
    assert_eq!(parts.len(), 4, "{xfcc}");
    assert_eq!(parts[0], format!("By={DETAILS}"));
    let hash = parts[1].strip_prefix("Hash=").unwrap();
    assert!(hash.len() == 64 && hash.chars().all(|c| c.is_ascii_hexdigit()), "{xfcc}");
    assert_eq!(parts[2], "Subject=\"\"");
    assert_eq!(parts[3], format!("URI={PRODUCTPAGE}"));
    assert_eq!(field(&a.body, "x-request-id").map(str::len), Some(36), "{}", a.body);
    assert_eq!(field(&a.body, "traceparent"), Some(trace));
    assert_eq!(field(&a.body, "tracestate"), Some("rojo=00f067aa0ba902b7"));
    assert_eq!(field(&a.body, "x-b3-traceid"), Some("80f198ee56343ba864fe8b2a57d3eff7"));
    assert_eq!(field(&a.body, "x-keycard-proto"), None, "keycard's hop header reached the app");
    assert_eq!(field(&a.body, "version"), Some("HTTP/1.1"));
    // A caller's own request id is kept.
    let a = call(&h1_client(), mesh.outbound(), "GET", "/", &[("x-request-id", "abc-123")]).await;
    assert_eq!(field(&a.body, "x-request-id"), Some("abc-123"));
    // The outbound sidecar keeps the request's path and query as sent, under its authority; a
    // Host that is no authority is refused there.
    let a = call(&h1_client(), mesh.outbound(), "GET", "/a%20b/c?q=1&r=%2F", &[]).await;
    assert_eq!((a.status, field(&a.body, "target")), (200, Some("/a%20b/c?q=1&r=%2F")), "{}", a.body);
    assert_eq!(field(&a.body, "host"), Some("details.default.svc.cluster.local"), "{}", a.body);
    let a = call(&h1_client(), mesh.outbound(), "GET", "/", &[("host", "not an authority")]).await;
    assert_eq!(a.status, 400, "{}", a.body);
    assert_eq!(a.body, "bad request target\n");
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_callers_on_a_permissive_port_cannot_forge_xfcc() {
    let pki = Pki::new();
    let mesh = L7Mesh::start(&pki, "", Protocol::Auto, Protocol::Http).await;
    let a = call(
        &h1_client(),
        mesh.server.inbound(9080),
        "GET",
        "/",
        &[
            ("x-forwarded-client-cert", "By=a;URI=spiffe://cluster.local/ns/default/sa/admin"),
            ("x-keycard-proto", "h2"),
        ],
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(field(&a.body, "x-forwarded-client-cert"), None, "{}", a.body);
    assert_eq!(field(&a.body, "version"), Some("HTTP/1.1"), "an untrusted hop header was obeyed");
    let m = mesh.server.metrics();
    assert_eq!(
        metric_sum(
            &m,
            "istio_requests_total",
            &["connection_security_policy=\"none\"", "source_principal=\"unknown\""]
        ),
        1.0,
        "{m}"
    );
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_h2_upgrade_requests_share_one_pooled_mtls_connection_and_keep_their_protocol() {
    let pki = Pki::new();
    let http = HttpSettings { h2_upgrade: true, ..HttpSettings::default() };
    let policy = STRICT_MESH.trim_end_matches("---\n");
    let mesh = L7Mesh::custom(&pki, policy, Protocol::Auto, Protocol::Http, inspect_app().await, http).await;
    let out = mesh.outbound();
    let h1 = h1_client();
    for i in 0..30 {
        let a = call(&h1, out, "GET", &format!("/seq/{i}"), &[]).await;
        assert_eq!((a.status, field(&a.body, "version")), (200, Some("HTTP/1.1")), "{}", a.body);
    }
    let concurrent: Vec<_> = (0..30)
        .map(|i| {
            let h1 = h1.clone();
            tokio::spawn(async move { call(&h1, out, "GET", &format!("/par/{i}"), &[]).await.status })
        })
        .collect();
    for t in concurrent {
        assert_eq!(t.await.unwrap(), 200);
    }
    let h2 = h2c_client();
    for i in 0..20 {
        let a = call(&h2, out, "GET", &format!("/h2/{i}"), &[]).await;
        assert_eq!((a.status, field(&a.body, "version")), (200, Some("HTTP/2.0")), "{}", a.body);
    }
    // A streamed 8 MiB body there and back.
    echoes_8_mib(&h1, out).await;

    let client = mesh.client.metrics();
    assert_eq!(metric_sum(&client, "keycard_upstream_connections_opened_total", &[]), 1.0, "{client}");
    assert_eq!(
        metric_sum(&client, "keycard_upstream_connections_opened_total", &["protocol=\"h2\""]),
        1.0,
        "{client}"
    );
    assert_eq!(
        metric_sum(
            &client,
            "istio_requests_total",
            &[
                "reporter=\"source\"",
                "response_code=\"200\"",
                &format!("destination_principal=\"{DETAILS}\"")
            ]
        ),
        81.0,
        "{client}"
    );
    let server = mesh.server.metrics();
    assert_eq!(
        metric_sum(&server, "keycard_http_connections_total", &["direction=\"inbound\""]),
        1.0,
        "{server}"
    );
    assert_eq!(
        metric_sum(
            &server,
            "istio_requests_total",
            &["reporter=\"destination\"", "connection_security_policy=\"mutual_tls\""]
        ),
        81.0,
        "{server}"
    );
    assert!(
        metric_sum(&server, "istio_request_bytes_sum", &["reporter=\"destination\""]) >= (8 << 20) as f64,
        "{server}"
    );
    mesh.shutdown().await;
}

/// Istio's default (`h2UpgradePolicy: DO_NOT_UPGRADE`): HTTP/1.1 requests travel as HTTP/1.1, each
/// on a pooled mutual-TLS connection lent to it alone and kept for the next; HTTP/2 ones share an
/// HTTP/2 connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_requests_ride_pooled_http1_connections_and_http2_ones_share_one() {
    let pki = Pki::new();
    let mesh =
        L7Mesh::start(&pki, STRICT_MESH.trim_end_matches("---\n"), Protocol::Auto, Protocol::Http).await;
    let out = mesh.outbound();
    let h1 = h1_client();
    let opened = |proto: &str| {
        let m = mesh.client.metrics();
        metric_sum(&m, "keycard_upstream_connections_opened_total", &[&format!("protocol=\"{proto}\"")])
    };
    for i in 0..30 {
        let a = call(&h1, out, "GET", &format!("/seq/{i}?q={i}"), &[]).await;
        assert_eq!((a.status, field(&a.body, "version")), (200, Some("HTTP/1.1")), "{}", a.body);
        assert_eq!(field(&a.body, "target"), Some(format!("/seq/{i}?q={i}").as_str()), "{}", a.body);
        assert_eq!(field(&a.body, "host"), Some("details.default.svc.cluster.local"), "{}", a.body);
    }
    assert_eq!(opened("http/1.1"), 1.0, "one after another, the requests reuse one connection");
    // Ten requests in flight at once (the app answers each after 3 s) need ten connections: the
    // idle one and nine more...
    let slow: Vec<_> = (0..10)
        .map(|_| {
            let h1 = h1.clone();
            tokio::spawn(async move { call(&h1, out, "GET", "/slow", &[]).await.status })
        })
        .collect();
    for t in slow {
        assert_eq!(t.await.unwrap(), 200);
    }
    let after_burst = opened("http/1.1");
    assert_eq!(after_burst, 10.0);
    // ...which then carry the next ones: no new connection.
    for i in 0..20 {
        assert_eq!(call(&h1, out, "GET", &format!("/again/{i}"), &[]).await.status, 200);
    }
    assert_eq!(opened("http/1.1"), after_burst);
    // Bodies stream through HTTP/1.1 between the sidecars: 8 MiB with its length, and a chunked
    // one of unknown length, each echoed back whole.
    echoes_8_mib(&h1, out).await;
    let sent: Vec<u8> = (0..64u8).flat_map(|i| vec![i; 1000]).collect();
    let mut req = b"POST /echo HTTP/1.1\r\nHost: details.default.svc.cluster.local\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for chunk in sent.chunks(1000) {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let answer = raw_bytes(out, &req).await;
    let head_end = answer.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head") + 4;
    let head = String::from_utf8_lossy(&answer[..head_end]).to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let body = if head.contains("transfer-encoding: chunked") {
        dechunk(&answer[head_end..])
    } else {
        answer[head_end..].to_vec()
    };
    assert_eq!(body, sent, "the chunked upload came back as sent");
    assert_eq!(opened("http/1.1"), after_burst, "the uploads reused the pooled connections");
    let h2 = h2c_client();
    for i in 0..20 {
        let a = call(&h2, out, "GET", &format!("/h2/{i}"), &[]).await;
        assert_eq!((a.status, field(&a.body, "version")), (200, Some("HTTP/2.0")), "{}", a.body);
    }
    assert_eq!(opened("h2"), 1.0);
    let server = mesh.server.metrics();
    let client = mesh.client.metrics();
    assert_eq!(
        metric_sum(&server, "keycard_http_connections_total", &["direction=\"inbound\""]),
        after_burst + 1.0,
        "{server}"
    );
    for (m, reporter) in [(&client, "source"), (&server, "destination")] {
        let labels = [
            &format!("reporter=\"{reporter}\"") as &str,
            "response_code=\"200\"",
            "connection_security_policy=\"mutual_tls\"",
        ];
        assert_eq!(metric_sum(m, "istio_requests_total", &labels), 82.0, "{m}");
    }
    mesh.shutdown().await;
}

/// The pooled HTTP/1.1 connections to one remote sidecar are bounded (`pool_max_connections` x
/// `pool_streams_per_connection` requests in flight on their own connections); requests past that
/// share an HTTP/2 connection instead of opening more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_requests_past_the_pools_bound_share_an_http2_connection() {
    let pki = Pki::new();
    let http =
        HttpSettings { pool_max_connections: 1, pool_streams_per_connection: 3, ..HttpSettings::default() };
    let mesh = L7Mesh::custom(&pki, "", Protocol::Http, Protocol::Http, inspect_app().await, http).await;
    let out = mesh.outbound();
    let h1 = h1_client();
    // Eight requests in flight at once (the app answers each after 3 s): three on HTTP/1.1
    // connections of their own, five on one HTTP/2 connection; the app gets HTTP/1.1 either way.
    let slow: Vec<_> = (0..8)
        .map(|_| {
            let h1 = h1.clone();
            tokio::spawn(async move { call(&h1, out, "GET", "/slow", &[]).await })
        })
        .collect();
    for t in slow {
        let a = t.await.unwrap();
        assert_eq!((a.status, field(&a.body, "version")), (200, Some("HTTP/1.1")), "{}", a.body);
    }
    let m = mesh.client.metrics();
    let opened = |proto: &str| {
        metric_sum(&m, "keycard_upstream_connections_opened_total", &[&format!("protocol=\"{proto}\"")])
    };
    assert_eq!((opened("http/1.1"), opened("h2")), (3.0, 1.0), "{m}");
    // With the burst over, requests take the connections already open.
    for i in 0..5 {
        assert_eq!(call(&h1, out, "GET", &format!("/after/{i}"), &[]).await.status, 200);
    }
    let m = mesh.client.metrics();
    assert_eq!(metric_sum(&m, "keycard_upstream_connections_opened_total", &[]), 4.0, "{m}");
    mesh.shutdown().await;
}

/// Secure naming outlives the pool: once a DestinationRule names another identity for the
/// upstream, a pooled HTTP/1.1 connection verified against the old expectation carries no more
/// requests; the next one dials again and is refused for the SAN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_is_not_reused_once_a_destination_rule_expects_another_identity() {
    let pki = Pki::new();
    let mesh = L7Mesh::start(&pki, "", Protocol::Http, Protocol::Http).await;
    let dir = policy_dir("");
    let client = productpage_to_details(&pki, mesh.server.inbound(9080), dir.path()).await;
    let out = client.addrs.outbound[0];
    let h1 = h1_client();
    for i in 0..3 {
        assert_eq!(call(&h1, out, "GET", &format!("/before/{i}"), &[]).await.status, 200);
    }
    let opened = "keycard_upstream_connections_opened_total{protocol=\"http/1.1\",upstream=\"";
    let opened = format!("{opened}{}\"}}", mesh.server.inbound(9080));
    assert_eq!(client.metric(&opened), 1.0, "{}", client.metrics());
    let rule = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: details, namespace: default}\nspec:\n  host: details.default.svc.cluster.local\n  trafficPolicy:\n    tls: {mode: ISTIO_MUTUAL, subjectAltNames: [\"spiffe://cluster.local/ns/default/sa/bookinfo-reviews\"]}\n";
    replace_policy(&client, dir.path(), rule).await;
    let after = call(&h1, out, "GET", "/after", &[]).await;
    assert_eq!(after.status, 503, "the pooled connection to details carried it: {}", after.body);
    assert_eq!(
        client.metric("keycard_handshake_failures_total{direction=\"outbound\",reason=\"san_mismatch\"}"),
        1.0,
        "{}",
        client.metrics()
    );
    client.shutdown().await;
    mesh.shutdown().await;
}

/// A DestinationRule's `connectionPool.http.h2UpgradePolicy` decides for its host over the
/// sidecar's `http.h2_upgrade`, and a reload that changes it changes how the next requests travel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_rules_h2_upgrade_policy_chooses_how_http1_requests_travel() {
    let pki = Pki::new();
    let mesh = L7Mesh::start(&pki, "", Protocol::Http, Protocol::Http).await;
    let rule = |policy: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: details, namespace: default}}\nspec:\n  host: details.default.svc.cluster.local\n  trafficPolicy:\n    connectionPool:\n      http: {{h2UpgradePolicy: {policy}}}\n"
        )
    };
    let dir = policy_dir(&rule("UPGRADE"));
    let client = productpage_to_details(&pki, mesh.server.inbound(9080), dir.path()).await;
    let out = client.addrs.outbound[0];
    let opened = |proto: &str| {
        client.metric(&format!(
            "keycard_upstream_connections_opened_total{{protocol=\"{proto}\",upstream=\"{}\"}}",
            mesh.server.inbound(9080)
        ))
    };
    let h1 = h1_client();
    let burst = |tag: &'static str| {
        (0..6)
            .map(|i| {
                let h1 = h1.clone();
                tokio::spawn(async move { call(&h1, out, "GET", &format!("/{tag}/{i}"), &[]).await })
            })
            .collect::<Vec<_>>()
    };
    for t in burst("upgraded") {
        let a = t.await.unwrap();
        assert_eq!((a.status, field(&a.body, "version")), (200, Some("HTTP/1.1")), "{}", a.body);
    }
    assert_eq!((opened("h2"), opened("http/1.1")), (1.0, 0.0), "{}", client.metrics());
    // config_dump shows the route in force and the rule that made it.
    let route = || async {
        let (_, dump) = http_get(client.addrs.admin, "/config_dump").await.unwrap();
        let v: serde_json::Value = serde_json::from_str(&dump).unwrap();
        let r = &v["routes"][0];
        (r["destination_rule"].as_str().map(str::to_owned), r["h2_upgrade"].as_bool(), r["tls_mode"].clone())
    };
    assert_eq!(route().await, (Some("default/details".into()), Some(true), "ISTIO_MUTUAL".into()));

    replace_policy(&client, dir.path(), &rule("DO_NOT_UPGRADE")).await;
    for i in 0..4 {
        let a = call(&h1, out, "GET", &format!("/as-sent/{i}"), &[]).await;
        assert_eq!((a.status, field(&a.body, "version")), (200, Some("HTTP/1.1")), "{}", a.body);
    }
    assert_eq!((opened("h2"), opened("http/1.1")), (1.0, 1.0), "{}", client.metrics());
    assert_eq!(route().await, (Some("default/details".into()), Some(false), "ISTIO_MUTUAL".into()));
    client.shutdown().await;
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431() {
    let pki = Pki::new();
    let mesh = L7Mesh::start(&pki, "", Protocol::Http, Protocol::Http).await;
    let big = "a".repeat(70 * 1024);
    let r =
        raw(mesh.outbound(), format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 431"), "{}", &r[..r.len().min(200)]);
    let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let r = raw(mesh.outbound(), format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 431"), "{}", &r[..r.len().min(200)]);
    // The same limits hold on the inbound side.
    let r = raw(
        mesh.server.inbound(9080),
        format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 431"), "{}", &r[..r.len().min(200)]);
    mesh.shutdown().await;
}

/// An app that speaks first (like SMTP or MySQL): a banner on accept, then echo.
async fn banner_app() -> std::net::SocketAddr {
    use tokio::io::AsyncWriteExt as _;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(b"220 ready\r\n").await;
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_ports_fall_back_to_tcp_and_server_first_protocols_still_work() {
    use tokio::io::AsyncReadExt as _;
    let pki = Pki::new();
    for (proto, timeouts) in [(Protocol::Tcp, 0.0), (Protocol::Auto, 1.0)] {
        let mesh = L7Mesh::with_app(
            &pki,
            STRICT_MESH.trim_end_matches("---\n"),
            proto,
            Protocol::Tcp,
            banner_app().await,
        )
        .await;
        let mut s = tokio::net::TcpStream::connect(mesh.outbound()).await.unwrap();
        let mut banner = [0u8; 11];
        tokio::time::timeout(Duration::from_secs(8), s.read_exact(&mut banner))
            .await
            .expect("banner in time")
            .unwrap();
        assert_eq!(&banner, b"220 ready\r\n");
        exchange(&mut s, b"HELO x").await.unwrap();
        let m = mesh.server.metrics();
        assert_eq!(metric_sum(&m, "keycard_protocol_detect_timeouts_total", &[]), timeouts, "{proto:?}: {m}");
        // Client-first TCP on an auto port is sniffed as not-HTTP and forwarded at once.
        let mut s2 = tokio::net::TcpStream::connect(mesh.outbound()).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut s2, b"ping").await.unwrap();
        let mut got = [0u8; 15];
        tokio::time::timeout(Duration::from_secs(1), s2.read_exact(&mut got))
            .await
            .expect("no sniffing delay")
            .unwrap();
        assert_eq!(&got, b"220 ready\r\nping");
        drop(s);
        mesh.shutdown().await;
    }
}

/// A JWKS server on loopback; returns its URL.
async fn jwks_server(jwks: String) -> String {
    use hyper::service::service_fn;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let jwks = jwks.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req: http::Request<hyper::body::Incoming>| {
                    let body = jwks.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from(body),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    format!("http://{addr}/jwks.json")
}

/// An ES256 signing key and its public JWK (`kid`).
struct JwtKey {
    pkcs8: Vec<u8>,
    jwk: String,
}

impl JwtKey {
    fn new(kid: &str) -> Self {
        use base64::Engine as _;
        let key = rcgen::KeyPair::generate().unwrap();
        let raw = key.public_key_raw();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwk = format!(
            r#"{{"kty":"EC","crv":"P-256","alg":"ES256","use":"sig","kid":"{kid}","x":"{}","y":"{}"}}"#,
            b64(&raw[1..33]),
            b64(&raw[33..65])
        );
        Self { pkcs8: key.serialize_der(), jwk }
    }

    fn sign(&self, kid: &str, claims: serde_json::Value) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(kid.to_owned());
        let key = jsonwebtoken::EncodingKey::from_ec_der(&self.pkcs8);
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwts_are_verified_required_by_policy_and_stripped_before_the_app() {
    let issuer_key = JwtKey::new("k1");
    let inline_key = JwtKey::new("in1");
    let stranger = JwtKey::new("k1");
    let uri = jwks_server(format!(r#"{{"keys":[{}]}}"#, issuer_key.jwk)).await;
    let inline_jwks = format!(r#"{{"keys":[{}]}}"#, inline_key.jwk).replace('"', "\\\"");
    let policy = format!(
        r#"{STRICT_MESH}apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: default}}
spec:
  selector: {{matchLabels: {{app: details}}}}
  jwtRules:
  - issuer: "https://issuer.example"
    audiences: ["details"]
    jwksUri: "{uri}"
  - issuer: "inline"
    jwks: "{inline_jwks}"
    fromHeaders: [{{name: x-jwt}}]
    forwardOriginalToken: true
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: details-jwt, namespace: default}}
spec:
  selector: {{matchLabels: {{app: details}}}}
  rules:
  - to: [{{operation: {{paths: ["/public/*"]}}}}]
  - from: [{{source: {{requestPrincipals: ["https://issuer.example/alice", "inline/*"]}}}}]
    to: [{{operation: {{paths: ["/secure/*"]}}}}]
  - to: [{{operation: {{paths: ["/admin/*"]}}}}]
    when: [{{key: "request.auth.claims[groups]", values: ["admins"]}}]
"#
    );
    let pki = Pki::new();
    let mesh = L7Mesh::start(&pki, &policy, Protocol::Http, Protocol::Http).await;
    let (c, out) = (h1_client(), mesh.outbound());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let token = |key: &JwtKey, sub: &str, extra: serde_json::Value| {
        let mut claims = serde_json::json!({"iss": "https://issuer.example", "sub": sub, "aud": "details", "exp": now + 600});
        if let (Some(c), Some(e)) = (claims.as_object_mut(), extra.as_object()) {
            c.extend(e.clone());
        }
        format!("Bearer {}", key.sign("k1", claims))
    };
    let alice = token(&issuer_key, "alice", serde_json::json!({}));
    let get = |target: &'static str, headers: Vec<(&'static str, String)>| {
        let c = c.clone();
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            call(&c, out, "GET", target, &h).await
        }
    };
    // No token: no request principal, so only the open path is allowed.
    assert_eq!(get("/public/x", vec![]).await.status, 200);
    assert_eq!(get("/secure/x", vec![]).await.status, 403);
    // A valid token: allowed, and the app never sees it.
    let a = get("/secure/x", vec![("authorization", alice.clone())]).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(field(&a.body, "authorization"), None, "the token reached the app");
    // Valid but not the principal the rule wants.
    assert_eq!(
        get("/secure/x", vec![("authorization", token(&issuer_key, "bob", serde_json::json!({})))])
            .await
            .status,
        403
    );
    // Invalid tokens are refused even on open paths.
    for (why, bad) in [
        ("foreign key", token(&stranger, "alice", serde_json::json!({}))),
        ("expired", token(&issuer_key, "alice", serde_json::json!({"exp": now - 3600}))),
        ("wrong audience", token(&issuer_key, "alice", serde_json::json!({"aud": "reviews"}))),
        ("garbage", "Bearer not.a.jwt".to_owned()),
    ] {
        let a = get("/public/x", vec![("authorization", bad)]).await;
        assert_eq!((a.status, a.body.as_str()), (401, "Jwt verification fails"), "{why}");
    }
    // Claims in `when`: any element of an array claim.
    let admins = token(&issuer_key, "carol", serde_json::json!({"groups": ["devs", "admins"]}));
    assert_eq!(get("/admin/x", vec![("authorization", admins)]).await.status, 200);
    let devs = token(&issuer_key, "dave", serde_json::json!({"groups": ["devs"]}));
    assert_eq!(get("/admin/x", vec![("authorization", devs)]).await.status, 403);
    // The inline-JWKS issuer, from its own header, forwarded as configured.
    let inline = inline_key.sign("in1", serde_json::json!({"iss": "inline", "sub": "svc", "exp": now + 600}));
    let a = get("/secure/y", vec![("x-jwt", inline.clone())]).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(field(&a.body, "x-jwt"), Some(inline.as_str()));
    let m = mesh.server.metrics();
    assert_eq!(metric_sum(&m, "istio_requests_total", &["response_code=\"401\""]), 4.0, "{m}");
    mesh.shutdown().await;
}

#[derive(Clone, PartialEq, prost::Message)]
struct Msg {
    #[prost(string, tag = "1")]
    text: String,
}

/// `echo.Echo/Say`: greets, or fails with PERMISSION_DENIED for "deny".
struct Say;

impl tonic::server::UnaryService<Msg> for Say {
    type Response = Msg;
    type Future = std::future::Ready<Result<tonic::Response<Msg>, tonic::Status>>;

    fn call(&mut self, req: tonic::Request<Msg>) -> Self::Future {
        let text = req.into_inner().text;
        std::future::ready(if text == "deny" {
            Err(tonic::Status::permission_denied("nope"))
        } else {
            Ok(tonic::Response::new(Msg { text: format!("hello {text}") }))
        })
    }
}

/// A gRPC server (tonic's server machinery on hyper, h2c).
async fn grpc_app() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                        let mut grpc =
                            tonic::server::Grpc::new(tonic_prost::ProstCodec::<Msg, Msg>::default());
                        Ok::<_, std::convert::Infallible>(grpc.unary(Say, req).await)
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_and_their_status_survive_the_mesh() {
    let pki = Pki::new();
    let mesh = L7Mesh::with_app(
        &pki,
        STRICT_MESH.trim_end_matches("---\n"),
        Protocol::Grpc,
        Protocol::Http,
        grpc_app().await,
    )
    .await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", mesh.outbound()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = tonic::client::Grpc::new(channel);
    let path = http::uri::PathAndQuery::from_static("/echo.Echo/Say");
    for _ in 0..3 {
        client.ready().await.unwrap();
        let r = client
            .unary(
                tonic::Request::new(Msg { text: "mesh".into() }),
                path.clone(),
                tonic_prost::ProstCodec::<Msg, Msg>::default(),
            )
            .await
            .expect("an OK call");
        assert_eq!(r.into_inner().text, "hello mesh");
    }
    client.ready().await.unwrap();
    let e = client
        .unary(
            tonic::Request::new(Msg { text: "deny".into() }),
            path,
            tonic_prost::ProstCodec::<Msg, Msg>::default(),
        )
        .await
        .expect_err("the server's status arrives");
    assert_eq!((e.code(), e.message()), (tonic::Code::PermissionDenied, "nope"));
    for (m, reporter) in [(mesh.server.metrics(), "destination"), (mesh.client.metrics(), "source")] {
        let rep = format!("reporter=\"{reporter}\"");
        assert_eq!(
            metric_sum(
                &m,
                "istio_requests_total",
                &[&rep, "request_protocol=\"grpc\"", "grpc_response_status=\"0\""]
            ),
            3.0,
            "{m}"
        );
        assert_eq!(
            metric_sum(
                &m,
                "istio_requests_total",
                &[&rep, "request_protocol=\"grpc\"", "grpc_response_status=\"7\"", "response_code=\"200\""]
            ),
            1.0,
            "{m}"
        );
    }
    mesh.shutdown().await;
}

/// A WebSocket echo app.
async fn websocket_app() -> std::net::SocketAddr {
    use futures_util::{SinkExt as _, StreamExt as _};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else { return };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_upgrade_through_the_mesh() {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    let pki = Pki::new();
    let mesh = L7Mesh::with_app(
        &pki,
        STRICT_MESH.trim_end_matches("---\n"),
        Protocol::Http,
        Protocol::Http,
        websocket_app().await,
    )
    .await;
    let tcp = tokio::net::TcpStream::connect(mesh.outbound()).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async("ws://details.default.svc.cluster.local/chat", tcp)
        .await
        .expect("upgraded");
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("hello")).await.unwrap();
    let back = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(back, Message::text("hello"));
    let blob: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(blob.clone())).await.unwrap();
    let back = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(back.into_data().as_ref(), blob.as_slice());
    ws.close(None).await.unwrap();
    let m = mesh.server.metrics();
    assert_eq!(
        metric_sum(
            &m,
            "istio_requests_total",
            &[
                "reporter=\"destination\"",
                "response_code=\"101\"",
                "connection_security_policy=\"mutual_tls\""
            ]
        ),
        1.0,
        "{m}"
    );
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_smuggling_attempt_gets_one_400_and_the_connection_closes() {
    let pki = Pki::new();
    let mesh = L7Mesh::start(&pki, "", Protocol::Http, Protocol::Http).await;
    let attack = "POST /public HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: x\r\n\r\n";
    let honest_first = format!("GET /first HTTP/1.1\r\nHost: x\r\n\r\n{attack}");
    for (side, addr) in [("outbound", mesh.outbound()), ("inbound", mesh.server.inbound(9080))] {
        for bytes in [attack.to_owned(), honest_first.clone()] {
            let r = raw(addr, bytes.as_bytes()).await;
            let statuses: Vec<&str> = r.lines().filter(|l| l.starts_with("HTTP/1.1 ")).collect();
            let want: &[&str] = if bytes.starts_with("GET /first") {
                &["HTTP/1.1 200 OK", "HTTP/1.1 400 Bad Request"]
            } else {
                &["HTTP/1.1 400 Bad Request"]
            };
            assert_eq!(statuses, want, "{side}: {r}");
            assert!(!r.contains("target: /admin"), "{side}: the smuggled request reached the app: {r}");
        }
    }
    for run in [&mesh.client, &mesh.server] {
        assert_eq!(run.metric("keycard_connections_refused_total{reason=\"conflicting_framing\"}"), 2.0);
    }
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_deadline_gets_504_and_others_are_unaffected() {
    let pki = Pki::new();
    let http = HttpSettings { request_timeout: Duration::from_millis(500), ..Default::default() };
    let mesh = L7Mesh::custom(&pki, "", Protocol::Http, Protocol::Http, inspect_app().await, http).await;
    let c = h1_client();
    let a = call(&c, mesh.outbound(), "GET", "/slow", &[]).await;
    assert_eq!((a.status, a.body.as_str()), (504, "upstream request timeout\n"));
    assert_eq!(call(&c, mesh.outbound(), "GET", "/fast", &[]).await.status, 200);
    let m = mesh.client.metrics();
    assert_eq!(
        metric_sum(
            &m,
            "istio_requests_total",
            &["reporter=\"source\"", "response_code=\"504\"", "response_flags=\"UT\""]
        ),
        1.0,
        "{m}"
    );
    mesh.shutdown().await;
}

/// Sends `bytes` on a new connection to `addr` and reads until the server closes.
async fn raw_bytes(addr: std::net::SocketAddr, bytes: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.write_all(bytes).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut got)).await.unwrap().unwrap();
    got
}

/// A chunked HTTP/1.1 body's data.
fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line = b.windows(2).position(|w| w == b"\r\n").expect("a chunk size line");
        let size = usize::from_str_radix(std::str::from_utf8(&b[..line]).unwrap().trim(), 16).unwrap();
        b = &b[line + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}
