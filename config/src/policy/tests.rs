//! Loading Istio YAML: what loads, and every kind of error naming file, line and field.

use std::collections::BTreeMap;
use std::path::Path;

use super::model::{ClientTlsMode, MtlsMode};
use super::*;

fn load(text: &str) -> Result<PolicySet, LoadError> {
    let mut set = PolicySet::default();
    set.add_text(text, Path::new("policy.yaml"))?;
    Ok(set)
}

fn err(text: &str) -> LoadError {
    load(text).expect_err("must not load")
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

const BOOKINFO: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: istio-system
spec:
  mtls:
    mode: STRICT
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-all
  namespace: default
spec: {}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: details-viewer
  namespace: default
spec:
  selector:
    matchLabels:
      app: details
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/bookinfo-productpage"]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: details
spec:
  host: details.default.svc.cluster.local
  trafficPolicy:
    tls:
      mode: ISTIO_MUTUAL
      subjectAltNames: ["spiffe://cluster.local/ns/default/sa/bookinfo-details"]
    loadBalancer:
      simple: ROUND_ROBIN
"#;

#[test]
fn the_bookinfo_lab_policies_load_and_apply_by_namespace_and_selector() {
    let set = load(BOOKINFO).unwrap();
    assert_eq!((set.peer_auth.len(), set.authz.len(), set.dest_rules.len()), (1, 2, 1));
    assert_eq!(set.warnings.len(), 1, "{:?}", set.warnings);
    assert!(set.warnings[0].contains("loadBalancer") && set.warnings[0].starts_with("policy.yaml:"));

    let details = set.for_workload(DEFAULT_ROOT_NAMESPACE, "default", &labels(&[("app", "details")]));
    assert_eq!(
        details.authz.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
        ["deny-all", "details-viewer"]
    );
    assert_eq!(details.peer_auth.mode_for(9080).mode, MtlsMode::Strict);
    assert_eq!(details.peer_auth.mode_for(9080).source, "istio-system/default");

    let ratings = set.for_workload(DEFAULT_ROOT_NAMESPACE, "default", &labels(&[("app", "ratings")]));
    assert_eq!(ratings.authz.len(), 1);
    let elsewhere = set.for_workload(DEFAULT_ROOT_NAMESPACE, "other", &labels(&[("app", "details")]));
    assert!(elsewhere.authz.is_empty());

    let dests =
        &set.for_workload(DEFAULT_ROOT_NAMESPACE, "default", &labels(&[("app", "productpage")])).destinations;
    let tls = dests.lookup("details.default.svc.cluster.local", 9080).and_then(|d| d.tls).unwrap();
    assert_eq!(tls.subject_alt_names, ["spiffe://cluster.local/ns/default/sa/bookinfo-details"]);
    assert!(dests.lookup("reviews.default.svc.cluster.local", 9080).is_none());
}

/// `connectionPool`: the fields keycard acts on, port-level settings replacing the host-wide ones
/// whole (Istio's port-level settings do not inherit), and a warning with its line for each field
/// keycard does not act on.
#[test]
fn destination_rule_connection_pools_choose_the_protocol_and_connect_deadline_per_port() {
    let text = r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews.default.svc.cluster.local
  trafficPolicy:
    tls:
      mode: ISTIO_MUTUAL
      subjectAltNames: ["spiffe://cluster.local/ns/default/sa/reviews"]
    connectionPool:
      tcp:
        connectTimeout: 250ms
        maxConnections: 100
      http:
        h2UpgradePolicy: UPGRADE
        http1MaxPendingRequests: 10
    portLevelSettings:
    - port: {number: 9080}
      connectionPool:
        http:
          h2UpgradePolicy: UPGRADE
          useClientProtocol: true
    - port: {number: 9090}
      tls: {mode: DISABLE}
    - port: {number: 9091}
      connectionPool:
        tcp: {connectTimeout: 1.5s}
        http: {h2UpgradePolicy: DO_NOT_UPGRADE}
"#;
    let set = load(text).unwrap();
    let dests = set.for_workload(DEFAULT_ROOT_NAMESPACE, "default", &labels(&[])).destinations;
    let host = "reviews.default.svc.cluster.local";
    let pool =
        |port| dests.lookup(host, port).and_then(|d| d.pool).map(|p| (p.h2_upgrade, p.connect_timeout));
    let ms = std::time::Duration::from_millis;
    assert_eq!(pool(8080), Some((Some(true), Some(ms(250)))));
    // useClientProtocol wins over UPGRADE; nothing comes down from the host-wide pool.
    assert_eq!(pool(9080), Some((Some(false), None)));
    // A port that sets only TLS gets the default pool (none) ...
    assert_eq!(pool(9090), None);
    assert_eq!(pool(9091), Some((Some(false), Some(ms(1500)))));
    assert!(dests.lookup("ratings.default.svc.cluster.local", 8080).is_none());
    // ... and a port that sets only its pool gets the default TLS (none: ISTIO_MUTUAL with any
    // mesh identity), without the host-wide SANs.
    let tls =
        |port| dests.lookup(host, port).and_then(|d| d.tls).map(|t| (t.mode, t.subject_alt_names.len()));
    assert_eq!(tls(8080), Some((ClientTlsMode::IstioMutual, 1)));
    assert_eq!(tls(9080), None);
    assert_eq!(tls(9090), Some((ClientTlsMode::Disable, 0)));
    assert_eq!(set.dest_rules.len(), 1);

    let line_of = |field: &str| text.lines().position(|l| l.contains(field)).unwrap() + 1;
    let mut want = [
        format!(
            "policy.yaml:{}: DestinationRule default/reviews: connectionPool.tcp.maxConnections",
            line_of("maxConnections")
        ),
        format!(
            "policy.yaml:{}: DestinationRule default/reviews: connectionPool.http.http1MaxPendingRequests",
            line_of("http1MaxPending")
        ),
    ];
    want.sort();
    let mut got = set.warnings.clone();
    got.sort();
    assert_eq!(got.len(), want.len(), "{got:?}");
    for (g, w) in got.iter().zip(&want) {
        assert!(g.starts_with(w.as_str()) && g.ends_with("ignored"), "{g} should start with {w}");
    }
}

/// Which DestinationRule a workload's upstream takes, as Istio chooses: the workload's namespace,
/// then the service's (if exported there), then the root namespace; the most specific host in
/// each; a selecting rule before one without a selector; short hosts in the rule's namespace.
#[test]
fn destination_rules_are_chosen_by_namespace_host_and_selector_as_istio_chooses() {
    let rule = |ns: &str, name: &str, host: &str, extra: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  host: \"{host}\"\n{extra}---\n"
        )
    };
    let text = [
        rule("istio-system", "catch-all", "*", ""),
        rule("istio-system", "mesh-wide", "*.cluster.local", ""),
        rule("shop", "reviews-shop", "reviews", ""),
        rule("shop", "ratings-private", "ratings", "  exportTo: [\".\"]\n"),
        rule("web", "web-reviews", "reviews.shop.svc.cluster.local", ""),
        rule("web", "details-everyone", "details.shop.svc.cluster.local", ""),
        rule(
            "web",
            "details-frontend",
            "details.shop.svc.cluster.local",
            "  workloadSelector: {matchLabels: {app: frontend}}\n",
        ),
        rule("other", "other-details", "details.shop.svc.cluster.local", "  exportTo: [\"*\"]\n"),
        rule(
            "shop",
            "payments-frontend",
            "payments.shop.svc.cluster.local",
            "  workloadSelector: {matchLabels: {app: frontend}}\n",
        ),
    ]
    .concat();
    let set = load(&text).unwrap();
    assert_eq!(
        set.dest_rules[2].host, "reviews.shop.svc.cluster.local",
        "a short host is the rule's namespace's"
    );
    let chosen = |ns: &str, app: &str, host: &str| {
        let dests = set.for_workload(DEFAULT_ROOT_NAMESPACE, ns, &labels(&[("app", app)])).destinations;
        dests.lookup(host, 9080).map(|d| d.rule.name.clone())
    };
    let cases = [
        // The workload's own namespace first, over the service's.
        ("web", "frontend", "reviews.shop.svc.cluster.local", "web-reviews"),
        // Else the service's namespace, exported everywhere by default.
        ("api", "x", "reviews.shop.svc.cluster.local", "reviews-shop"),
        // Not exported beyond its namespace: the root namespace's then.
        ("web", "frontend", "ratings.shop.svc.cluster.local", "mesh-wide"),
        ("shop", "x", "ratings.shop.svc.cluster.local", "ratings-private"),
        // A selecting rule before one without, though loaded after it.
        ("web", "frontend", "details.shop.svc.cluster.local", "details-frontend"),
        ("web", "backend", "details.shop.svc.cluster.local", "details-everyone"),
        // Another namespace's rule is neither the workload's nor the service's.
        ("api", "x", "details.shop.svc.cluster.local", "mesh-wide"),
        // Selectors do not reach across namespaces.
        ("web", "frontend", "payments.shop.svc.cluster.local", "mesh-wide"),
        ("shop", "frontend", "payments.shop.svc.cluster.local", "payments-frontend"),
        // `mesh-wide` won above over `catch-all`, loaded before it: the longer wildcard; outside
        // the cluster only `*` names a host.
        ("api", "x", "api.example.com", "catch-all"),
    ];
    for (ns, app, host, want) in cases {
        assert_eq!(chosen(ns, app, host).as_deref(), Some(want), "{ns}/{app} -> {host}");
    }
    let tier = |ns: &str, host: &str| {
        let dests = set.for_workload(DEFAULT_ROOT_NAMESPACE, ns, &labels(&[])).destinations;
        dests.lookup(host, 9080).map(|d| d.tier)
    };
    assert_eq!(tier("web", "reviews.shop.svc.cluster.local"), Some(Tier::Workload));
    assert_eq!(tier("api", "reviews.shop.svc.cluster.local"), Some(Tier::Service));
    assert_eq!(tier("web", "ratings.shop.svc.cluster.local"), Some(Tier::Root));
    // An upstream named by a short host is its own namespace's service.
    assert_eq!(chosen("shop", "x", "reviews").as_deref(), Some("reviews-shop"));
}

#[test]
fn errors_name_file_line_and_field() {
    let cases: &[(&str, u64, Option<&str>, &str)] = &[
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: x\nspec:\n  rules:\n  - from:\n    - source:\n        principalz: [a]\n",
            9,
            Some("principalz"),
            "unknown field",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: x\nspec:\n  action: CUSTOM\n",
            6,
            Some("action"),
            "CUSTOM",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: x\nspec:\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"10.0.0.0/33\"]\n",
            9,
            Some("ipBlocks"),
            "not an IP address",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: x\nspec:\n  rules:\n  - to:\n    - operation:\n        ports: [\"http\"]\n",
            9,
            Some("ports"),
            "not a port number",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: x\nspec:\n  rules:\n  - when:\n    - key: source.color\n      values: [red]\n",
            8,
            Some("key"),
            "unsupported condition key",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: x\nspec:\n  rules:\n  - from:\n    - source:\n        principals: [\"a*b*\"]\n",
            9,
            Some("principals"),
            "`*` is allowed only",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: x\nspec:\n  mtls:\n    mode: STRICTLY\n",
            7,
            Some("mode"),
            "unknown variant",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: x\nspec:\n  portLevelMtls:\n    8080:\n      mode: DISABLE\n",
            7,
            None,
            "needs a workload selector",
        ),
        ("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n", 2, Some("kind"), "unsupported kind"),
        (
            "apiVersion: security.istio.io/v2\nkind: PeerAuthentication\nmetadata:\n  name: x\n",
            1,
            Some("apiVersion"),
            "apiVersion",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: x\n  annotations:\n    istio.io/dry-run: maybe\n",
            6,
            Some("istio.io/dry-run"),
            "must be",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: x\nspec:\n  host: a\n  trafficPolicy:\n    connectionPool:\n      http:\n        h2UpgradePolicy: SOMETIMES\n",
            10,
            Some("h2UpgradePolicy"),
            "unknown variant",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: x\nspec:\n  host: a\n  trafficPolicy:\n    portLevelSettings:\n    - port: {number: 80}\n      connectionPool:\n        tcp:\n          connectTimeout: soon\n",
            12,
            Some("connectTimeout"),
            "not a positive duration",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: x\nspec:\n  host: a\n  trafficPolicy:\n    connectionPool:\n      tcp:\n        maxConections: 4\n",
            10,
            Some("maxConections"),
            "unknown field",
        ),
    ];
    for (text, line, field, msg) in cases {
        let e = err(text);
        assert_eq!(e.file, Path::new("policy.yaml"));
        if *line > 0 {
            assert_eq!(e.line, *line, "line for {msg}: {e}");
        }
        if field.is_some() {
            assert_eq!(e.field.as_deref(), *field, "field for {msg}: {e}");
        }
        assert!(e.to_string().contains(msg), "{e} should say {msg}");
        assert!(e.to_string().starts_with("policy.yaml:"), "{e}");
    }
}

#[test]
fn an_error_in_a_later_document_points_into_that_document() {
    let text = format!(
        "{BOOKINFO}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: y\nspec:\n  acton: DENY\n"
    );
    let e = err(&text);
    let want = text.lines().position(|l| l.contains("acton")).unwrap() as u64 + 1;
    assert_eq!(e.line, want, "{e}");
    assert_eq!(e.field.as_deref(), Some("acton"));
}

#[test]
fn kubectl_output_with_server_fields_loads() {
    let text = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: x\n  namespace: foo\n  uid: 1234\n  resourceVersion: \"5\"\n  generation: 1\n  creationTimestamp: \"2024-01-01T00:00:00Z\"\nspec:\n  mtls:\n    mode: DISABLE\nstatus: {}\n";
    let set = load(text).unwrap();
    assert_eq!(set.peer_auth[0].created, Some(1_704_067_200));
}

#[test]
fn peer_authentication_resolves_mesh_namespace_workload_port() {
    let text = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: mesh, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: ns-unset, namespace: foo}
spec: {mtls: {mode: UNSET}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: workload, namespace: foo}
spec:
  selector: {matchLabels: {app: db}}
  mtls: {mode: PERMISSIVE}
  portLevelMtls:
    5432: {mode: DISABLE}
    8080: {mode: UNSET}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: root-selector-ignored, namespace: istio-system}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: DISABLE}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: newer, namespace: bar, creationTimestamp: "2025-01-01T00:00:00Z"}
spec: {mtls: {mode: DISABLE}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: older, namespace: bar, creationTimestamp: "2020-01-01T00:00:00Z"}
spec: {mtls: {mode: PERMISSIVE}}
"#;
    let set = load(text).unwrap();
    let mode = |ns: &str, app: &str, port: u16| {
        let wp = set.for_workload("istio-system", ns, &labels(&[("app", app)]));
        let m = wp.peer_auth.mode_for(port);
        (m.mode, m.source)
    };
    assert_eq!(
        mode("foo", "web", 80),
        (MtlsMode::Strict, "istio-system/mesh".into()),
        "UNSET inherits; root selector ignored"
    );
    assert_eq!(mode("foo", "db", 80), (MtlsMode::Permissive, "foo/workload".into()));
    assert_eq!(mode("foo", "db", 5432), (MtlsMode::Disable, "foo/workload:5432".into()));
    assert_eq!(mode("foo", "db", 8080), (MtlsMode::Permissive, "foo/workload".into()), "port UNSET inherits");
    assert_eq!(mode("bar", "x", 80), (MtlsMode::Permissive, "bar/older".into()), "oldest wins");
    assert_eq!(mode("baz", "x", 80), (MtlsMode::Strict, "istio-system/mesh".into()));
    let empty = PolicySet::default().for_workload("istio-system", "x", &BTreeMap::new());
    assert_eq!(empty.peer_auth.mode_for(1).mode, MtlsMode::Permissive, "no policy means PERMISSIVE");
}

#[test]
fn a_directory_loads_in_name_order_and_a_broken_file_fails_the_whole_load() {
    let dir = std::env::temp_dir().join(format!("keycard-policy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("10-mesh.yaml"), BOOKINFO).unwrap();
    std::fs::write(dir.join("notes.txt"), "not yaml: [").unwrap();
    let set = PolicySet::load(std::slice::from_ref(&dir)).unwrap();
    assert_eq!(set.files.len(), 1);
    std::fs::write(dir.join("20-bad.yml"), "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: x\nspec:\n  rulez: []\n").unwrap();
    let e = PolicySet::load(std::slice::from_ref(&dir)).unwrap_err();
    assert!(e.file.ends_with("20-bad.yml") && e.line == 6, "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn request_authn_yaml(jwks: &str) -> String {
    format!(
        r#"apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata:
  name: jwt
  namespace: foo
spec:
  selector:
    matchLabels:
      app: api
  jwtRules:
  - issuer: "{iss}"
    audiences: ["svc"]
    jwks: |
      {jwks}
    fromHeaders:
    - name: X-Token
      prefix: "Bearer "
    outputClaimToHeaders:
    - header: X-Jwt-Sub
      claim: sub
    outputPayloadToHeader: X-Jwt-Payload
    forwardOriginalToken: true
    timeout: 1.5s
  - issuer: other
    jwksUri: https://other.example/jwks.json
---
apiVersion: security.istio.io/v1beta1
kind: RequestAuthentication
metadata: {{name: mesh, namespace: istio-system}}
spec:
  jwtRules:
  - issuer: mesh-issuer
    jwks_uri: http://keys.mesh/jwks
    fromCookies: [session]
"#,
        iss = crate::jwt::tests::ISS
    )
}

#[test]
fn request_authentication_with_an_inline_jwks_loads_applies_and_verifies() {
    use crate::jwt::tests::{NOW, Signer};

    let signer = Signer::p256();
    let jwks = serde_json::json!({"keys": [signer.jwk(Some("k1"))]}).to_string();
    let set = load(&request_authn_yaml(&jwks)).unwrap();
    assert_eq!(set.request_authn.len(), 2);
    assert!(set.warnings.is_empty(), "{:?}", set.warnings);

    let api = set.for_workload(DEFAULT_ROOT_NAMESPACE, "foo", &labels(&[("app", "api")]));
    let issuers: Vec<&str> = api.jwt_rules.iter().map(|r| r.issuer.as_str()).collect();
    assert_eq!(issuers, [crate::jwt::tests::ISS, "other", "mesh-issuer"]);
    let web = set.for_workload(DEFAULT_ROOT_NAMESPACE, "foo", &labels(&[("app", "web")]));
    assert_eq!(web.jwt_rules.iter().map(|r| r.issuer.as_str()).collect::<Vec<_>>(), ["mesh-issuer"]);
    let elsewhere = set.for_workload(DEFAULT_ROOT_NAMESPACE, "bar", &labels(&[("app", "api")]));
    assert_eq!(elsewhere.jwt_rules.len(), 1, "the root namespace's rule applies mesh-wide");

    let (inline, by_uri, mesh) = (&api.jwt_rules[0], &api.jwt_rules[1], &api.jwt_rules[2]);
    assert_eq!((inline.namespace.as_str(), inline.policy.as_str()), ("foo", "jwt"));
    assert_eq!(inline.audiences, ["svc"]);
    assert_eq!(inline.from_headers, [("x-token".to_owned(), "Bearer ".to_owned())]);
    assert!(inline.from_params.is_empty() && inline.from_cookies.is_empty());
    assert_eq!(inline.output_claim_to_headers, [("x-jwt-sub".to_owned(), "sub".to_owned())]);
    assert_eq!(inline.output_payload_to_header.as_deref(), Some("x-jwt-payload"));
    assert!(inline.forward_original_token);
    assert_eq!(inline.timeout, Some(std::time::Duration::from_millis(1500)));
    assert_eq!(inline.jwks_uri, None);
    assert_eq!(by_uri.jwks_uri.as_deref(), Some("https://other.example/jwks.json"));
    assert!(by_uri.jwks.is_none());
    assert_eq!(
        (by_uri.from_headers.as_slice(), by_uri.from_params.as_slice()),
        (&[("authorization".to_owned(), "Bearer ".to_owned())][..], &["access_token".to_owned()][..]),
        "no location given: Envoy's defaults"
    );
    assert_eq!(mesh.jwks_uri.as_deref(), Some("http://keys.mesh/jwks"), "jwks_uri is accepted too");
    assert_eq!(mesh.from_cookies, ["session"]);
    assert!(mesh.from_headers.is_empty(), "a cookie location replaces the defaults");

    let keys = inline.jwks.as_ref().unwrap();
    let good = signer.token("ES256", serde_json::json!({"aud": "svc"}));
    let verified = crate::jwt::verify(&good, inline, keys, NOW).unwrap();
    assert_eq!(verified.principal, format!("{}/alice", crate::jwt::tests::ISS));
    let wrong_aud = signer.token("ES256", serde_json::json!({"aud": "other"}));
    assert_eq!(crate::jwt::verify(&wrong_aud, inline, keys, NOW).unwrap_err().reason(), "audience_mismatch");
    let dump = serde_json::to_string(&set).unwrap();
    assert!(dump.contains("\"kid\":\"k1\""), "config dumps show key ids: {dump}");
}

#[test]
fn jwks_next_to_jwks_uri_wins_with_a_warning() {
    let jwks = serde_json::json!({"keys": [crate::jwt::tests::Signer::p256().jwk(None)]}).to_string();
    let text = format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata:\n  name: both\nspec:\n  jwtRules:\n  - issuer: i\n    jwksUri: https://x/jwks\n    jwks: '{jwks}'\n"
    );
    let set = load(&text).unwrap();
    assert_eq!(set.request_authn[0].rules[0].jwks_uri, None);
    assert_eq!(set.warnings.len(), 1);
    assert!(
        set.warnings[0].starts_with("policy.yaml:8:") && set.warnings[0].contains("ignored"),
        "{:?}",
        set.warnings
    );
}

#[test]
fn request_authentication_and_path_template_errors_name_line_and_field() {
    let ra = |rule: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata:\n  name: x\nspec:\n  jwtRules:\n{rule}"
        )
    };
    let cases: Vec<(String, u64, Option<&str>, &str)> = vec![
        (ra("  - jwksUri: https://k/jwks\n    audiences: [a]\n"), 7, Some("jwksUri"), "needs an issuer"),
        (ra("  - issuer: \"\"\n    jwksUri: https://k/jwks\n"), 7, Some("issuer"), "must not be empty"),
        (ra("  - issuer: i\n    audiences: [a]\n"), 7, Some("issuer"), "needs jwks or jwksUri"),
        (ra("  - issuer: i\n    jwks: '{\"keys\": []}'\n"), 8, Some("jwks"), "no usable signature key"),
        (ra("  - issuer: i\n    jwks: 'not json'\n"), 8, Some("jwks"), "not a JSON Web Key Set"),
        (ra("  - issuer: i\n    jwks: |\n      {\"keys\": [{\"kty\": \"oct\"}]}\n"), 9, Some("jwks"), "key 0: "),
        (ra("  - issuer: i\n    jwksUri: ftp://k/jwks\n"), 8, Some("jwksUri"), "not an http or https URL"),
        (ra("  - issuer: i\n    jwksURI: https://k/jwks\n"), 8, Some("jwksURI"), "unknown field"),
        (
            ra("  - issuer: i\n    jwksUri: https://k/jwks\n    fromHeaders:\n    - name: X Token\n"),
            10,
            Some("name"),
            "not an HTTP header name",
        ),
        (
            ra("  - issuer: i\n    jwksUri: https://k/jwks\n    fromHeaders:\n    - prefix: \"Bearer \"\n"),
            10,
            None,
            "missing field `name`",
        ),
        (ra("  - issuer: i\n    jwksUri: https://k/jwks\n    timeout: soon\n"), 9, Some("timeout"), "not a positive duration"),
        (ra("  - issuer: i\n    jwksUri: https://k/jwks\n    timeout: 0s\n"), 9, Some("timeout"), "not a positive duration"),
        (
            ra("  - issuer: i\n    jwksUri: https://k/jwks\n    outputClaimToHeaders:\n    - header: x-sub\n      claim: \"\"\n"),
            11,
            Some("claim"),
            "must not be empty",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata:\n  name: x\nspec:\n  targetRef:\n    kind: Gateway\n    name: gw\n"
                .into(),
            7,
            None,
            "targetRef is not supported",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: x\nspec:\n  rules:\n  - to:\n    - operation:\n        paths: [\"/a/{*}\", \"/{**}/b/{*}\"]\n".into(),
            9,
            Some("paths"),
            "must be the last operator",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: x\nspec:\n  rules:\n  - to:\n    - operation:\n        notPaths:\n        - /api/{id}\n".into(),
            10,
            None,
            "only `{*}` and `{**}`",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: x\nspec:\n  rules:\n  - when:\n    - key: request.auth.claims[]\n      values: [a]\n".into(),
            8,
            Some("key"),
            "unsupported condition key",
        ),
        (
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: x\n".into(),
            2,
            Some("kind"),
            "PeerAuthentication, AuthorizationPolicy, RequestAuthentication and DestinationRule",
        ),
    ];
    for (text, line, field, msg) in &cases {
        let e = err(text);
        assert_eq!(e.line, *line, "line for {msg}: {e}");
        if field.is_some() {
            assert_eq!(e.field.as_deref(), *field, "field for {msg}: {e}");
        }
        assert!(e.to_string().contains(msg), "{e} should say {msg}");
    }
}
