use super::*;

#[test]
fn valid_ids_parse_into_their_parts() {
    let cases: &[(&str, &str, &str)] = &[
        ("spiffe://cluster.local/ns/default/sa/productpage", "cluster.local", "/ns/default/sa/productpage"),
        ("spiffe://example.org", "example.org", ""),
        ("spiffe://a_b-c.9/x", "a_b-c.9", "/x"),
        ("spiffe://td/Upper.Case-OK_1/..x/x..", "td", "/Upper.Case-OK_1/..x/x.."),
    ];
    for (input, td, path) in cases {
        let id = SpiffeId::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(id.as_str(), *input);
        assert_eq!(id.trust_domain_str(), *td, "{input}");
        assert_eq!(id.path(), *path, "{input}");
        assert_eq!(id.to_string(), *input);
    }
}

#[test]
fn every_rule_of_the_spec_rejects_its_case() {
    use IdError::*;
    let long_td = format!("spiffe://{}/x", "a".repeat(256));
    let max_td = format!("spiffe://{}/x", "a".repeat(255));
    let long_id = format!("spiffe://td/{}", "a".repeat(MAX_ID_LEN - "spiffe://td/".len() + 1));
    let max_id = format!("spiffe://td/{}", "a".repeat(MAX_ID_LEN - "spiffe://td/".len()));
    assert!(SpiffeId::parse(&max_td).is_ok(), "255-byte trust domain is allowed");
    assert!(SpiffeId::parse(&max_id).is_ok(), "2048-byte id is allowed");

    let cases: Vec<(&str, IdError)> = vec![
        ("", Empty),
        (&long_id, TooLong { len: MAX_ID_LEN + 1 }),
        ("SPIFFE://td/x", BadScheme),
        ("Spiffe://td/x", BadScheme),
        ("http://td/x", BadScheme),
        ("spiffe:/td/x", BadScheme),
        ("td/ns/x", BadScheme),
        (" spiffe://td/x", BadScheme),
        ("spiffe://", MissingTrustDomain),
        ("spiffe:///x", MissingTrustDomain),
        (&long_td, TrustDomainTooLong { len: 256 }),
        ("spiffe://Cluster.local/x", BadTrustDomainChar { at: 9, found: Found(b'C') }),
        ("spiffe://td:8080/x", BadTrustDomainChar { at: 11, found: Found(b':') }),
        ("spiffe://user@td/x", BadTrustDomainChar { at: 13, found: Found(b'@') }),
        ("spiffe://td%2e/x", BadTrustDomainChar { at: 11, found: Found(b'%') }),
        ("spiffe://td?q=1", BadTrustDomainChar { at: 11, found: Found(b'?') }),
        ("spiffe://td#frag", BadTrustDomainChar { at: 11, found: Found(b'#') }),
        ("spiffe://t d/x", BadTrustDomainChar { at: 10, found: Found(b' ') }),
        ("spiffe://td/x?q=1", BadPathChar { at: 13, found: Found(b'?') }),
        ("spiffe://td/x#f", BadPathChar { at: 13, found: Found(b'#') }),
        ("spiffe://td/a%2Fb", BadPathChar { at: 13, found: Found(b'%') }),
        ("spiffe://td/a:b", BadPathChar { at: 13, found: Found(b':') }),
        ("spiffe://td/a b", BadPathChar { at: 13, found: Found(b' ') }),
        ("spiffe://td/x\n", BadPathChar { at: 13, found: Found(b'\n') }),
        ("spiffe://td/x ", BadPathChar { at: 13, found: Found(b' ') }),
        ("spiffe://td/caf\u{e9}", BadPathChar { at: 15, found: Found(0xc3) }),
        ("spiffe://td//x", EmptySegment { at: 12 }),
        ("spiffe://td/a//b", EmptySegment { at: 14 }),
        ("spiffe://td/./x", DotSegment { at: 12 }),
        ("spiffe://td/a/..", DotSegment { at: 14 }),
        ("spiffe://td/", TrailingSlash),
        ("spiffe://td/a/", TrailingSlash),
    ];
    for (input, want) in cases {
        assert_eq!(SpiffeId::parse(input), Err(want), "input {input:?}");
    }
}

#[test]
fn errors_explain_the_offending_byte() {
    let e = SpiffeId::parse("spiffe://Cluster.local/x").unwrap_err().to_string();
    assert!(e.contains("upper-case 'C'") && e.contains("not folded"), "{e}");
    let e = SpiffeId::parse("spiffe://td/x\n").unwrap_err().to_string();
    assert!(e.contains("line break"), "{e}");
    let e = SpiffeId::parse("spiffe://td/a%2F").unwrap_err().to_string();
    assert!(e.contains("percent-encoding"), "{e}");
}

#[test]
fn trust_domains_parse_bare_names_only() {
    assert_eq!(TrustDomain::parse("cluster.local").unwrap().as_str(), "cluster.local");
    assert!(TrustDomain::parse("spiffe://cluster.local").is_err());
    assert!(TrustDomain::parse("Cluster.local").is_err());
    assert_eq!(TrustDomain::parse(""), Err(IdError::MissingTrustDomain));
    assert_eq!(TrustDomain::parse("cluster.local").unwrap().id_uri(), "spiffe://cluster.local");
}

#[test]
fn kubernetes_form_yields_namespace_and_service_account() {
    let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/bookinfo-ratings").unwrap();
    let k = id.k8s().unwrap();
    assert_eq!((k.namespace, k.service_account), ("default", "bookinfo-ratings"));
    assert_eq!(id.principal(), "cluster.local/ns/default/sa/bookinfo-ratings");
    for not_k8s in [
        "spiffe://td/ns/default/sa",
        "spiffe://td/ns/default/sa/x/extra",
        "spiffe://td/namespace/default/sa/x",
        "spiffe://td/ns/default/serviceaccount/x",
        "spiffe://td",
    ] {
        assert_eq!(SpiffeId::parse(not_k8s).unwrap().k8s(), None, "{not_k8s}");
    }
}

#[test]
fn from_k8s_builds_and_validates() {
    let td = TrustDomain::parse("cluster.local").unwrap();
    let id = SpiffeId::from_k8s(&td, "default", "productpage").unwrap();
    assert_eq!(id.as_str(), "spiffe://cluster.local/ns/default/sa/productpage");
    for (ns, sa) in [("", "x"), ("x", ""), ("a/b", "x"), ("..", "x"), ("x", "a b")] {
        assert!(matches!(SpiffeId::from_k8s(&td, ns, sa), Err(IdError::BadK8sName { .. })), "{ns:?} {sa:?}");
    }
}

#[test]
fn identities_are_equal_by_their_text_whether_shared_or_parsed_apart() {
    let a = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/productpage").unwrap();
    let clone = a.clone();
    let apart = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/productpage").unwrap();
    let other = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/productpagf").unwrap();
    let shorter = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/productpag").unwrap();
    assert!(a == clone && a == apart && clone == apart);
    assert!(a != other && a != shorter && other != shorter);
    // Ordering and hashing agree with equality.
    assert_eq!(a.cmp(&apart), std::cmp::Ordering::Equal);
    let hash = |id: &SpiffeId| {
        use std::hash::{BuildHasher, BuildHasherDefault};
        BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(id)
    };
    assert_eq!(hash(&a), hash(&apart));
}
