//! Istio's AuthorizationPolicy semantics, one behaviour per test, policies written as YAML.

use std::net::IpAddr;
use std::path::Path;

use super::*;
use crate::policy::PolicySet;

fn policies(yaml: &str) -> Vec<AuthzPolicy> {
    let mut set = PolicySet::default();
    set.add_text(yaml, Path::new("t.yaml")).unwrap();
    set.authz
}

fn ap(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n{spec}\n---\n"
    )
}

struct Peer {
    id: Option<SpiffeId>,
    ip: IpAddr,
    port: u16,
}

fn mtls(sa: &str) -> Peer {
    Peer {
        id: Some(SpiffeId::parse(&format!("spiffe://cluster.local/ns/default/sa/{sa}")).unwrap()),
        ip: "10.0.0.5".parse().unwrap(),
        port: 9080,
    }
}

fn mtls_in(ns: &str, sa: &str) -> Peer {
    Peer {
        id: Some(SpiffeId::parse(&format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")).unwrap()),
        ..mtls("x")
    }
}

fn plaintext() -> Peer {
    Peer { id: None, ..mtls("x") }
}

fn decide(ps: &[AuthzPolicy], peer: &Peer, http: Option<&HttpAttributes>) -> Decision {
    let refs: Vec<&AuthzPolicy> = ps.iter().collect();
    evaluate(
        &refs,
        &Attributes {
            source_ip: peer.ip,
            source_principal: peer.id.as_ref(),
            destination_ip: "10.0.0.9".parse().unwrap(),
            destination_port: peer.port,
            sni: None,
            http,
        },
    )
}

fn allowed(ps: &[AuthzPolicy], peer: &Peer) -> bool {
    decide(ps, peer, None).is_ok()
}

#[test]
fn no_policy_allows_and_spec_empty_denies_all_and_rule_empty_allows_all() {
    assert!(allowed(&[], &plaintext()));
    let deny_all = policies(&ap("deny-all", "  {}"));
    let d = decide(&deny_all, &mtls("productpage"), None).unwrap_err();
    assert_eq!((d.rule.clone(), d.reason()), (None, "no_matching_allow"));
    let allow_all = policies(&ap("allow-all", "  rules:\n  - {}"));
    let p = decide(&allow_all, &plaintext(), None).unwrap();
    assert_eq!(p.policy_label(), "ns[default]-policy[allow-all]-rule[0]");
}

#[test]
fn principals_match_without_the_scheme_with_wildcards_and_never_match_plaintext() {
    let p = policies(&ap(
        "v",
        "  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/default/sa/bookinfo-productpage\"]",
    ));
    assert!(allowed(&p, &mtls("bookinfo-productpage")));
    assert!(!allowed(&p, &mtls("bookinfo-reviews")));
    assert!(!allowed(&p, &plaintext()));

    let any = policies(&ap("any", "  rules:\n  - from:\n    - source:\n        principals: [\"*\"]"));
    assert!(allowed(&any, &mtls("anything")));
    assert!(!allowed(&any, &plaintext()), "* means any authenticated peer");

    let prefix = policies(&ap(
        "p",
        "  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/default/sa/bookinfo-*\"]",
    ));
    assert!(allowed(&prefix, &mtls("bookinfo-ratings")));
    assert!(!allowed(&prefix, &mtls("ratings")));
    let suffix =
        policies(&ap("s", "  rules:\n  - from:\n    - source:\n        principals: [\"*/sa/ratings\"]"));
    assert!(allowed(&suffix, &mtls_in("other", "ratings")));
    assert!(!allowed(&suffix, &mtls("reviews")));
}

#[test]
fn not_principals_and_not_namespaces_match_plaintext_peers() {
    let p = policies(&ap(
        "n",
        "  rules:\n  - from:\n    - source:\n        notPrincipals: [\"cluster.local/ns/default/sa/evil\"]",
    ));
    assert!(allowed(&p, &plaintext()));
    assert!(allowed(&p, &mtls("good")));
    assert!(!allowed(&p, &mtls("evil")));
    let ns = policies(&ap("n", "  rules:\n  - from:\n    - source:\n        notNamespaces: [\"prod\"]"));
    assert!(allowed(&ns, &plaintext()));
    assert!(!allowed(&ns, &mtls_in("prod", "x")));
    let only = policies(&ap("n", "  rules:\n  - from:\n    - source:\n        namespaces: [\"default\"]"));
    assert!(allowed(&only, &mtls("x")));
    assert!(!allowed(&only, &plaintext()), "identity fields never match plaintext");
    assert!(!allowed(&only, &mtls_in("prod", "x")));
}

#[test]
fn deny_wins_over_allow_and_names_its_rule() {
    let yaml = ap("allow-all", "  rules:\n  - {}")
        + &ap(
            "deny-evil",
            "  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/default/sa/a\"]\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/default/sa/evil\"]",
        );
    let ps = policies(&yaml);
    let d = decide(&ps, &mtls("evil"), None).unwrap_err();
    assert_eq!(d.policy_label(), "ns[default]-policy[deny-evil]-rule[1]");
    assert_eq!(d.reason(), "denied_by_policy");
    assert!(allowed(&ps, &mtls("good")));
}

#[test]
fn ip_blocks_ports_and_when_conditions() {
    let ps = policies(&ap(
        "net",
        "  rules:\n  - from:\n    - source:\n        ipBlocks: [\"10.0.0.0/24\"]\n        notIpBlocks: [\"10.0.0.7\"]\n    to:\n    - operation:\n        ports: [\"9080\"]\n    when:\n    - key: source.namespace\n      values: [\"default\"]\n    - key: destination.port\n      notValues: [\"9443\"]",
    ));
    assert!(allowed(&ps, &mtls("a")));
    assert!(!allowed(&ps, &Peer { ip: "10.0.1.5".parse().unwrap(), ..mtls("a") }));
    assert!(!allowed(&ps, &Peer { ip: "10.0.0.7".parse().unwrap(), ..mtls("a") }));
    assert!(!allowed(&ps, &Peer { port: 9081, ..mtls("a") }));
    assert!(!allowed(&ps, &mtls_in("prod", "a")), "when source.namespace");
    let np = policies(&ap("np", "  rules:\n  - to:\n    - operation:\n        notPorts: [\"22\"]"));
    assert!(allowed(&np, &mtls("a")));
    assert!(!allowed(&np, &Peer { port: 22, ..mtls("a") }));
}

#[test]
fn on_tcp_allow_rules_with_http_fields_never_match_and_deny_rules_widen() {
    let allow = policies(&ap(
        "get-only",
        "  rules:\n  - from:\n    - source:\n        principals: [\"*\"]\n    to:\n    - operation:\n        methods: [\"GET\"]",
    ));
    assert!(!allowed(&allow, &mtls("a")), "an ALLOW rule with methods never matches TCP");
    let http =
        HttpAttributes { method: "GET".into(), path: "/".into(), host: "x".into(), ..Default::default() };
    assert!(decide(&allow, &mtls("a"), Some(&http)).is_ok());

    let deny = policies(&ap(
        "no-post-from-a",
        "  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/default/sa/a\"]\n    to:\n    - operation:\n        methods: [\"POST\"]",
    ));
    assert!(
        !allowed(&deny, &mtls("a")),
        "the DENY rule drops `methods` on TCP and denies all of a's traffic"
    );
    assert!(allowed(&deny, &mtls("b")));
    assert!(decide(&deny, &mtls("a"), Some(&http)).is_ok(), "over HTTP only POST is denied");
}

#[test]
fn audit_reports_without_deciding_and_dry_run_reports_without_enforcing() {
    let yaml = ap(
        "audit-a",
        "  action: AUDIT\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/default/sa/a\"]",
    ) + "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: would-deny\n  namespace: default\n  annotations:\n    istio.io/dry-run: \"true\"\nspec:\n  action: DENY\n  rules:\n  - {}\n";
    let ps = policies(&yaml);
    let p = decide(&ps, &mtls("a"), None).unwrap();
    assert_eq!(p.rule, None, "no enforced ALLOW policy: allowed by default");
    assert_eq!(p.evidence.audited.len(), 1);
    assert_eq!(p.evidence.audited[0].to_string(), "ns[default]-policy[audit-a]-rule[0]");
    assert_eq!(p.evidence.dry_run, vec![("ns[default]-policy[would-deny]".to_owned(), false)]);
}

#[test]
fn patterns_parse_as_istio_allows() {
    assert_eq!(Pattern::parse("*").unwrap(), Pattern::Any);
    assert_eq!(Pattern::parse("a*").unwrap(), Pattern::Prefix("a".into()));
    assert_eq!(Pattern::parse("*a").unwrap(), Pattern::Suffix("a".into()));
    assert!(Pattern::parse("a*b").is_err());
    assert!(Pattern::parse("**").is_err());
    assert!(!Pattern::Any.matches(Some("")));
}

#[test]
fn path_templates_match_segments_as_istio_documents() {
    let cases: &[(&str, &str, bool)] = &[
        ("/foo/{*}", "/foo/bar", true),
        ("/foo/{*}", "/foo/bar/baz", false),
        ("/foo/{*}", "/foo/", false),
        ("/foo/{*}", "/foo", false),
        ("/foo/{**}", "/foo/", true),
        ("/foo/{**}", "/foo/a/b", true),
        ("/foo/{**}", "/foo", false),
        ("/foo/{**}", "/foobar", false),
        ("/foo/{**}/", "/foo/bar/", true),
        ("/foo/{**}/", "/foo//", true),
        ("/foo/{**}/", "/foo/a/b/", true),
        ("/foo/{**}/", "/foo/bar", false),
        ("/foo/{*}/bar/{**}", "/foo/buzz/bar/", true),
        ("/foo/{*}/bar/{**}", "/foo/buzz/bar/baz", true),
        ("/foo/{*}/bar/{**}", "/foo/buzz/qux/baz", false),
        ("/foo/{*}/bar/{**}", "/foo//bar/baz", false),
        ("/{*}", "/x", true),
        ("/{*}", "/", false),
        ("/{**}", "/", true),
        ("/{**}", "/a/b/c", true),
        ("/{*}/{*}", "/a/b", true),
        ("/{*}/{*}", "/a/b/c", false),
        ("/api/{**}/edit", "/api/users/7/edit", true),
        ("/api/{**}/edit", "/api//edit", true),
        ("/api/{**}/edit", "/api/edit", false),
        ("/api/{**}/edit", "/api/users/7/edits", false),
    ];
    for (template, path, want) in cases {
        let p = Pattern::parse_path(template).unwrap_or_else(|e| panic!("{template}: {e}"));
        assert!(matches!(p, Pattern::Template(_)), "{template}");
        assert_eq!(p.matches(Some(path)), *want, "{template} against {path}");
    }
}

#[test]
fn invalid_path_templates_are_refused_and_plain_paths_parse_as_before() {
    let cases: &[(&str, &str)] = &[
        ("/*/baz/{*}", "cannot also use `*` wildcards"),
        ("/**/baz/{*}", "cannot also use `*` wildcards"),
        ("/foo/{*}*", "must fill its whole path segment"),
        ("/{**}/foo/{*}", "must be the last operator"),
        ("/{**}/{**}", "must be the last operator"),
        ("/foo/{*}.txt", "must fill its whole path segment"),
        ("/foo/{bar}", "only `{*}` and `{**}`"),
        ("/foo/{*", "only `{*}` and `{**}`"),
        ("/foo/}", "only `{*}` and `{**}`"),
        ("foo/{*}", "must start with `/`"),
    ];
    for (value, why) in cases {
        match Pattern::parse_path(value) {
            Ok(p) => panic!("{value} parsed as {p:?}"),
            Err(e) => assert!(e.contains(why), "{value}: {e} should say {why}"),
        }
    }
    assert_eq!(Pattern::parse_path("/a/*").unwrap(), Pattern::Prefix("/a/".into()));
    assert_eq!(Pattern::parse_path("/a").unwrap(), Pattern::Exact("/a".into()));
    assert_eq!(
        Pattern::parse("/a/{x}").unwrap(),
        Pattern::Exact("/a/{x}".into()),
        "other fields keep braces literal"
    );
}

#[test]
fn hosts_match_case_insensitively_and_without_port_unless_the_pattern_has_one() {
    let cases: &[(&str, &str, bool)] = &[
        ("example.com", "example.com", true),
        ("example.com", "Example.COM:8080", true),
        ("Example.com", "example.COM", true),
        ("example.com", "example.com.evil", false),
        ("example.com", "example.com:", true),
        ("example.com:8080", "example.com:8080", true),
        ("example.com:8080", "example.com", false),
        ("example.com:8080", "example.com:9090", false),
        ("example.com:*", "EXAMPLE.com:443", true),
        ("example.com:*", "example.com", false),
        ("*.example.com", "API.example.com:8443", true),
        ("*.example.com", "example.com", false),
        ("*:8080", "anything:8080", true),
        ("*:8080", "anything", false),
        ("api.*", "Api.internal:80", true),
        ("*", "x:1", true),
        ("*", "", false),
        ("[::1]", "[::1]:8080", true),
        ("[::1]:8080", "[::1]:8080", true),
        ("[::1]:8080", "[::1]", false),
    ];
    for (pattern, authority, want) in cases {
        let p = Pattern::parse_host(pattern).unwrap();
        assert_eq!(p.matches_authority(authority), *want, "{pattern} against {authority}");
    }
    let ps = policies(&ap(
        "deny-admin-host",
        "  action: DENY\n  rules:\n  - to:\n    - operation:\n        hosts: [\"Admin.Example.com\"]\n        paths: [\"/internal/{**}\"]",
    ));
    let req = |host: &str, path: &str| HttpAttributes {
        host: host.into(),
        method: "GET".into(),
        path: path.into(),
        ..Default::default()
    };
    assert!(decide(&ps, &mtls("a"), Some(&req("admin.example.COM:8443", "/internal/x"))).is_err());
    assert!(decide(&ps, &mtls("a"), Some(&req("admin.example.com", "/internal"))).is_ok());
    assert!(decide(&ps, &mtls("a"), Some(&req("www.example.com", "/internal/x"))).is_ok());
}

#[test]
fn condition_keys_parse_known_names_only() {
    let claim = |c: &str| Some(ConditionKey::Request(RequestKey::Claim(c.into())));
    let cases: &[(&str, Option<ConditionKey>)] = &[
        ("request.auth.principal", Some(ConditionKey::Request(RequestKey::Principal))),
        ("request.auth.audiences", Some(ConditionKey::Request(RequestKey::Audiences))),
        ("request.auth.presenter", Some(ConditionKey::Request(RequestKey::Presenter))),
        ("request.auth.claims[groups]", claim("groups")),
        ("request.auth.claims[realm][roles]", claim("realm.roles")),
        ("request.auth.claims[a][b][c]", claim("a.b.c")),
        ("request.headers[X-Api-Key]", Some(ConditionKey::Request(RequestKey::Header("x-api-key".into())))),
        ("source.principal", Some(ConditionKey::SourcePrincipal)),
        ("request.auth.claims", None),
        ("request.auth.claims[]", None),
        ("request.auth.claims[a]b", None),
        ("request.auth.claims[a][]", None),
        ("request.auth.claims[a[b]]", None),
        ("request.auth.claimz[a]", None),
        ("request.auth.issuer", None),
        ("request.auth.principals", None),
        ("request.headers[]", None),
        ("request.headers[a][b]", None),
        ("request.method", None),
        ("source.color", None),
    ];
    for (key, want) in cases {
        assert_eq!(ConditionKey::parse(key), *want, "{key}");
    }
}

#[test]
fn jwt_conditions_match_any_element_of_a_list_claim() {
    let ps = policies(&ap(
        "jwt",
        "  rules:\n  - when:\n    - key: request.auth.claims[groups]\n      values: [\"admin\"]\n      notValues: [\"banned\"]\n    - key: request.auth.audiences\n      values: [\"svc-*\"]\n    - key: request.auth.presenter\n      values: [\"web\"]\n    - key: request.auth.claims[realm][tier]\n      notValues: [\"free\"]",
    ));
    let req = |claims: &[(&str, &[&str])]| HttpAttributes {
        host: "svc".into(),
        method: "GET".into(),
        path: "/".into(),
        request_principal: Some("iss/alice".into()),
        claims: claims
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.iter().map(|s| (*s).to_owned()).collect()))
            .collect(),
        ..Default::default()
    };
    let base: Vec<(&str, &[&str])> =
        vec![("groups", &["dev", "admin"]), ("aud", &["x", "svc-a"]), ("azp", &["web"])];
    let with = |extra: (&'static str, &'static [&'static str])| {
        let mut c = base.clone();
        c.retain(|(k, _)| *k != extra.0);
        c.push(extra);
        req(&c)
    };
    let cases: &[(&str, HttpAttributes, bool)] = &[
        ("all conditions hold, admin is the second group", req(&base), true),
        ("not in admin", with(("groups", &["dev"])), false),
        ("admin but also banned", with(("groups", &["admin", "banned"])), false),
        ("no groups claim", with(("groups", &[])), false),
        ("no matching audience", with(("aud", &["x"])), false),
        ("other presenter", with(("azp", &["cli"])), false),
        ("nested claim in notValues", with(("realm.tier", &["gold", "free"])), false),
        ("nested claim elsewhere", with(("realm.tier", &["gold"])), true),
    ];
    for (what, http, want) in cases {
        assert_eq!(decide(&ps, &mtls("a"), Some(http)).is_ok(), *want, "{what}");
    }
}
