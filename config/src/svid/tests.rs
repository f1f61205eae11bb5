//! Table tests: one certificate per SVID rule, made with rcgen, each rejected by its rule name.

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, UnixTime};
use time::{Duration, OffsetDateTime};

use super::*;

struct Ca {
    cert: CertificateDer<'static>,
    params: CertificateParams,
    key: KeyPair,
}

fn ca(name: &str, td: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.subject_alt_names = vec![SanType::URI(format!("spiffe://{td}").try_into().unwrap())];
    let cert = params.self_signed(&key).unwrap().der().clone();
    Ca { cert, params, key }
}

/// A leaf that passes every rule; each test changes one thing.
fn good_leaf() -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = vec![uri("spiffe://cluster.local/ns/default/sa/productpage")];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::minutes(5);
    p.not_after = now + Duration::hours(1);
    p
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

fn sign(params: &CertificateParams, by: &Ca) -> CertificateDer<'static> {
    let key = KeyPair::generate().unwrap();
    let issuer = Issuer::from_params(&by.params, &by.key);
    params.signed_by(&key, &issuer).unwrap().der().clone()
}

fn bundle(root: &Ca) -> TrustBundle {
    TrustBundle::new(TrustDomain::parse("cluster.local").unwrap(), vec![root.cert.clone()]).unwrap()
}

fn rules(bundle: &TrustBundle, chain: &[CertificateDer<'_>], purpose: Purpose) -> Vec<&'static str> {
    bundle.inspect(chain, UnixTime::now(), purpose).violations.iter().map(SvidError::rule).collect()
}

fn first_rule(bundle: &TrustBundle, chain: &[CertificateDer<'_>]) -> &'static str {
    bundle.verify(chain, UnixTime::now(), Purpose::Any).unwrap_err().rule()
}

#[test]
fn a_good_leaf_verifies_for_both_purposes() {
    let root = ca("root", "cluster.local");
    let b = bundle(&root);
    let leaf = sign(&good_leaf(), &root);
    for purpose in [Purpose::Client, Purpose::Server, Purpose::Any] {
        let svid = b.verify(std::slice::from_ref(&leaf), UnixTime::now(), purpose).unwrap();
        assert_eq!(svid.id.as_str(), "spiffe://cluster.local/ns/default/sa/productpage");
    }
}

#[test]
fn chain_through_an_intermediate_verifies_and_a_trailing_root_is_harmless() {
    let root = ca("root", "cluster.local");
    let mut inter = ca("intermediate", "cluster.local");
    inter.cert = inter
        .params
        .signed_by(&inter.key, &Issuer::from_params(&root.params, &root.key))
        .unwrap()
        .der()
        .clone();
    let leaf = sign(&good_leaf(), &inter);
    let b = bundle(&root);
    assert!(b.verify(&[leaf.clone(), inter.cert.clone()], UnixTime::now(), Purpose::Any).is_ok());
    assert!(
        b.verify(&[leaf.clone(), inter.cert.clone(), root.cert.clone()], UnixTime::now(), Purpose::Any)
            .is_ok()
    );
    assert_eq!(first_rule(&b, &[leaf]), "unknown_ca", "intermediate missing");
}

#[test]
fn each_rule_is_named_when_it_fails() {
    let root = ca("root", "cluster.local");
    let b = bundle(&root);
    let now = OffsetDateTime::now_utc();
    type Tweak = fn(&mut CertificateParams, OffsetDateTime);
    let cases: Vec<(&str, Tweak)> = vec![
        ("no_uri_san", |p, _| p.subject_alt_names = vec![SanType::DnsName("x.example".try_into().unwrap())]),
        ("multiple_uri_sans", |p, _| {
            p.subject_alt_names.push(uri("spiffe://cluster.local/ns/default/sa/other"))
        }),
        ("invalid_spiffe_id", |p, _| {
            p.subject_alt_names = vec![uri("spiffe://cluster.local/ns/default/sa/a%20b")]
        }),
        ("invalid_spiffe_id", |p, _| p.subject_alt_names = vec![uri("SPIFFE://cluster.local/x")]),
        ("root_path", |p, _| p.subject_alt_names = vec![uri("spiffe://cluster.local")]),
        ("trust_domain_mismatch", |p, _| {
            p.subject_alt_names = vec![uri("spiffe://evil.example/ns/default/sa/x")]
        }),
        ("leaf_is_ca", |p, _| {
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages.push(KeyUsagePurpose::KeyCertSign);
        }),
        ("key_usage_missing", |p, _| p.key_usages.clear()),
        ("no_digital_signature", |p, _| p.key_usages = vec![KeyUsagePurpose::KeyAgreement]),
        ("key_cert_sign", |p, _| p.key_usages.push(KeyUsagePurpose::KeyCertSign)),
        ("crl_sign", |p, _| p.key_usages.push(KeyUsagePurpose::CrlSign)),
        ("key_usage_not_critical", |p, _| {
            p.key_usages.clear();
            // KeyUsage ::= BIT STRING { digitalSignature (0) }, marked non-critical.
            let mut ext = CustomExtension::from_oid_content(&[2, 5, 29, 15], vec![0x03, 0x02, 0x07, 0x80]);
            ext.set_criticality(false);
            p.custom_extensions.push(ext);
        }),
        ("eku_incomplete", |p, _| {
            p.extended_key_usages =
                vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::CodeSigning]
        }),
        ("san_not_critical", |p, _| {
            p.subject_alt_names.clear();
            let uri = b"spiffe://cluster.local/ns/default/sa/productpage";
            let mut content = vec![0x30, uri.len() as u8 + 2, 0x86, uri.len() as u8];
            content.extend_from_slice(uri);
            let mut ext = CustomExtension::from_oid_content(&[2, 5, 29, 17], content);
            ext.set_criticality(false);
            p.custom_extensions.push(ext);
        }),
        ("expired", |p, now| {
            p.not_before = now - Duration::hours(2);
            p.not_after = now - Duration::hours(1);
        }),
        ("not_yet_valid", |p, now| {
            p.not_before = now + Duration::hours(1);
            p.not_after = now + Duration::hours(2);
        }),
    ];
    for (want, tweak) in cases {
        let mut params = good_leaf();
        tweak(&mut params, now);
        let leaf = sign(&params, &root);
        let found = rules(&b, std::slice::from_ref(&leaf), Purpose::Any);
        assert!(found.contains(&want), "want {want}, found {found:?}");
        assert!(b.verify(&[leaf], UnixTime::now(), Purpose::Any).is_err(), "{want} must fail verify");
    }
}

#[test]
fn a_foreign_root_is_unknown_ca() {
    let root = ca("root", "cluster.local");
    let other = ca("impostor", "cluster.local");
    assert_eq!(first_rule(&bundle(&root), &[sign(&good_leaf(), &other)]), "unknown_ca");
}

#[test]
fn a_tampered_signature_is_rejected() {
    let root = ca("root", "cluster.local");
    let leaf = sign(&good_leaf(), &root);
    let mut bytes = leaf.to_vec();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    let rule = first_rule(&bundle(&root), &[CertificateDer::from(bytes)]);
    assert!(rule == "bad_signature" || rule == "malformed", "{rule}");
}

#[test]
fn purpose_is_enforced_through_eku() {
    let root = ca("root", "cluster.local");
    let b = bundle(&root);
    let mut params = good_leaf();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let leaf = sign(&params, &root);
    assert_eq!(rules(&b, std::slice::from_ref(&leaf), Purpose::Server)[0], "wrong_purpose");
    assert!(!rules(&b, &[leaf], Purpose::Client).contains(&"wrong_purpose"));
}

#[test]
fn a_non_ca_in_the_chain_is_named() {
    let root = ca("root", "cluster.local");
    let leaf = sign(&good_leaf(), &root);
    let stray = sign(&good_leaf(), &root);
    assert!(rules(&bundle(&root), &[leaf, stray], Purpose::Any).contains(&"signing_cert_not_ca"));
}

#[test]
fn garbage_and_empty_chains_are_errors_not_panics() {
    let b = bundle(&ca("root", "cluster.local"));
    assert_eq!(first_rule(&b, &[]), "no_certificate");
    assert_eq!(first_rule(&b, &[CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01])]), "malformed");
}

#[test]
fn secure_naming_rejects_an_unexpected_identity() {
    let root = ca("root", "cluster.local");
    let svid = bundle(&root).verify(&[sign(&good_leaf(), &root)], UnixTime::now(), Purpose::Server).unwrap();
    let reviews = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/reviews").unwrap();
    let err = svid.clone().expect_one_of(std::slice::from_ref(&reviews)).unwrap_err();
    assert_eq!(err.rule(), "san_mismatch");
    assert!(err.to_string().contains("expected spiffe://cluster.local/ns/default/sa/reviews"), "{err}");
    assert!(svid.expect_one_of(&[]).is_ok());
}

#[test]
fn bundles_name_their_trust_domain_and_refuse_non_cas() {
    let root = ca("root", "cluster.local");
    assert_eq!(
        TrustBundle::trust_domain_of_roots(std::slice::from_ref(&root.cert)).unwrap().as_str(),
        "cluster.local"
    );
    let leaf = sign(&good_leaf(), &root);
    let td = TrustDomain::parse("cluster.local").unwrap();
    assert!(matches!(TrustBundle::new(td.clone(), vec![leaf]), Err(BundleError::NotCa { index: 0 })));
    assert!(matches!(TrustBundle::new(td, vec![]), Err(BundleError::Empty)));
}
