//! Header handling shared by both directions: hop-by-hop removal, `x-request-id`, the
//! `x-forwarded-client-cert` value Envoy sets for a mutual-TLS peer, and keycard's own hop header.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use keycard_config::SpiffeId;

/// Set by the outbound sidecar: the protocol the calling app used (`h1` or `h2`), so the inbound
/// sidecar can deliver the request in it. Trusted only from a mutual-TLS peer; never reaches apps.
pub const DOWNSTREAM_PROTOCOL: HeaderName = HeaderName::from_static("x-keycard-proto");
/// On a 403: the rule that denied (`ns[..]-policy[..]-rule[..]`, or `none`).
pub const DENIED_BY: HeaderName = HeaderName::from_static("x-keycard-denied-by");
pub const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Removes hop-by-hop headers (RFC 9110 7.6.1): those named in `Connection` and the fixed set.
/// `te: trailers` survives (gRPC needs it); `upgrade` survives when `keep_upgrade`.
pub fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none of them: one pass over the names rather than eight lookups.
    let hop = |n: &HeaderName| {
        n == header::CONNECTION
            || n == header::UPGRADE
            || n == header::TRANSFER_ENCODING
            || n == header::TE
            || n.as_str() == "keep-alive"
            || n.as_str() == "proxy-connection"
    };
    if !h.keys().any(hop) {
        return;
    }
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == header::UPGRADE))
        .collect();
    for n in named {
        h.remove(n);
    }
    if !keep_upgrade {
        h.remove(header::CONNECTION);
        h.remove(header::UPGRADE);
    }
    h.remove("keep-alive");
    h.remove("proxy-connection");
    h.remove(header::TRANSFER_ENCODING);
    let te_trailers = h
        .get_all(header::TE)
        .iter()
        .any(|v| v.to_str().is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers"))));
    h.remove(header::TE);
    if te_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Whether an HTTP/1.1 request asks to switch protocols (WebSocket and the like).
pub fn is_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION)
            .iter()
            .any(|v| v.to_str().is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade"))))
}

/// The request's `x-request-id`, generated (UUID v4) when absent or unreadable. The value is
/// marked sensitive, which HTTP/2 encodes as never indexed: a value unique to each request
/// would otherwise enter HPACK's dynamic table on every request and push out the headers that
/// repeat (authority, path, user agent).
pub fn ensure_request_id(h: &mut HeaderMap) -> String {
    if let Some(v) = h.get_mut(REQUEST_ID)
        && let Some(id) = v.to_str().ok().filter(|v| !v.is_empty()).map(str::to_owned)
    {
        v.set_sensitive(true);
        return id;
    }
    let id = uuid_v4();
    if let Ok(mut v) = HeaderValue::from_str(&id) {
        v.set_sensitive(true);
        h.insert(REQUEST_ID, v);
    }
    id
}

fn uuid_v4() -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut b = random_16();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    // Written into an array and copied out once (a `String` pushed a character at a time
    // checked its capacity and encoded UTF-8 for each of the 36).
    let mut text = [b'-'; 36];
    let mut at = 0;
    for (i, x) in b.into_iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            at += 1;
        }
        text[at] = DIGITS[usize::from(x >> 4)];
        text[at + 1] = DIGITS[usize::from(x & 0xf)];
        at += 2;
    }
    String::from_utf8_lossy(&text).into_owned()
}

/// 16 bytes from the system RNG, drawn 1 KiB at a time per thread: each draw of aws-lc's DRBG
/// costs a fixed ~2,500 instructions (a key schedule and reseed checks) whatever its length.
/// The RNG failing leaves zeros: a request id is a correlation id, nothing security-relevant
/// depends on it.
fn random_16() -> [u8; 16] {
    use std::cell::RefCell;
    const POOL: usize = 1024;
    thread_local! {
        static DRAWN: RefCell<([u8; POOL], usize)> = const { RefCell::new(([0; POOL], POOL)) };
    }
    DRAWN.with_borrow_mut(|(pool, used)| {
        if *used == POOL {
            let _ = aws_lc_rs::rand::fill(pool);
            *used = 0;
        }
        let mut b = [0u8; 16];
        b.copy_from_slice(&pool[*used..*used + 16]);
        // Each id's bytes leave the pool as they are handed out.
        pool[*used..*used + 16].fill(0);
        *used += 16;
        b
    })
}

/// Lower-case hex of `bytes`, two digits each (one `format!` per byte cost an L7 request about
/// 12,000 instructions in the request id alone).
fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for &x in bytes {
        out.push(char::from(DIGITS[usize::from(x >> 4)]));
        out.push(char::from(DIGITS[usize::from(x & 0xf)]));
    }
}

/// Envoy's XFCC element for a verified peer: `By=<us>;Hash=<sha256 of its leaf>;Subject="";URI=<peer>`.
pub fn xfcc_element(us: &SpiffeId, peer_leaf: &[u8], peer: &SpiffeId) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, peer_leaf);
    let mut hash = String::with_capacity(64);
    push_hex(&mut hash, digest.as_ref());
    format!("By={us};Hash={hash};Subject=\"\";URI={peer}")
}

/// Sets XFCC for the app: appended to what a mutual-TLS mesh hop sent (Envoy's APPEND_FORWARD),
/// removed for anyone else (an app cannot assert a client certificate). `element` is made once per
/// connection; a request that brings no XFCC of its own (the usual case) gets it as it is, with no
/// header value to build and check.
pub fn set_xfcc(h: &mut HeaderMap, element: Option<&HeaderValue>) {
    let Some(element) = element else {
        h.remove(XFCC);
        return;
    };
    if !h.contains_key(XFCC) {
        h.insert(XFCC, element.clone());
        return;
    }
    let element = String::from_utf8_lossy(element.as_bytes());
    let previous: Vec<String> =
        h.get_all(XFCC).iter().filter_map(|v| v.to_str().ok()).map(str::to_owned).collect();
    let mut value = previous.join(",");
    if !value.is_empty() {
        value.push(',');
    }
    value.push_str(&element);
    h.remove(XFCC);
    if let Ok(v) = HeaderValue::from_str(&value) {
        h.insert(XFCC, v);
    }
}

/// Lower-case header names to values (repeated headers joined with `,`), for policy `when`.
pub fn for_policy(h: &HeaderMap) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::<String, String>::new();
    for (name, value) in h {
        let Ok(v) = value.to_str() else { continue };
        out.entry(name.as_str().to_owned())
            .and_modify(|e| {
                e.push(',');
                e.push_str(v);
            })
            .or_insert_with(|| v.to_owned());
    }
    out
}

/// The request's `request_protocol` label: `grpc` for gRPC content types, else `http`.
pub fn request_protocol(h: &HeaderMap) -> &'static str {
    let grpc = h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"));
    if grpc { "grpc" } else { "http" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_te_trailers_stays() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers, deflate"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        let mut names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["te", "x-kept"]);
        assert_eq!(h[header::TE], "trailers");
    }

    #[test]
    fn each_hop_by_hop_header_alone_goes_and_others_stay() {
        for name in ["connection", "upgrade", "transfer-encoding", "te", "keep-alive", "proxy-connection"] {
            let mut h = HeaderMap::new();
            h.insert("x-kept", HeaderValue::from_static("1"));
            h.insert(HeaderName::from_static(name), HeaderValue::from_static("gzip"));
            strip_hop_by_hop(&mut h, false);
            let names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
            assert_eq!(names, ["x-kept"], "{name}");
        }
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a"));
        h.append("x-two", HeaderValue::from_static("1"));
        h.append("x-two", HeaderValue::from_static("2"));
        let before = h.clone();
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h, before);
    }

    #[test]
    fn xfcc_is_appended_for_mesh_peers_and_removed_otherwise() {
        let us = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/details").unwrap();
        let peer = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/productpage").unwrap();
        let e = xfcc_element(&us, b"leaf", &peer);
        // The hash is SHA-256 of the leaf, lower-case hex (as Envoy writes it).
        let hash = "9f91161f43433e49a6de6db680d79f60159f2e4ac9172621a12846428158440b";
        assert_eq!(
            e,
            format!(
                "By=spiffe://cluster.local/ns/default/sa/details;Hash={hash};Subject=\"\";\
                 URI=spiffe://cluster.local/ns/default/sa/productpage"
            )
        );
        let element = HeaderValue::from_str(&e).unwrap();
        let mut h = HeaderMap::new();
        set_xfcc(&mut h, Some(&element));
        assert_eq!(h[XFCC].to_str().unwrap(), e);
        h.insert(XFCC, HeaderValue::from_static("By=a;URI=b"));
        h.append(XFCC, HeaderValue::from_static("By=c;URI=d"));
        set_xfcc(&mut h, Some(&element));
        assert_eq!(h[XFCC].to_str().unwrap(), format!("By=a;URI=b,By=c;URI=d,{e}"));
        assert_eq!(h.get_all(XFCC).iter().count(), 1);
        set_xfcc(&mut h, None);
        assert!(h.get(XFCC).is_none());
    }

    #[test]
    fn request_ids_are_kept_or_made() {
        let mut h = HeaderMap::new();
        let id = ensure_request_id(&mut h);
        assert_eq!(id.len(), 36);
        for (i, c) in id.char_indices() {
            match i {
                8 | 13 | 18 | 23 => assert_eq!(c, '-', "{id}"),
                14 => assert_eq!(c, '4', "version 4: {id}"),
                19 => assert!("89ab".contains(c), "RFC 4122 variant: {id}"),
                _ => assert!(c.is_ascii_digit() || ('a'..='f').contains(&c), "{id}"),
            }
        }
        assert_eq!(ensure_request_id(&mut h), id);
        assert!(h[REQUEST_ID].is_sensitive());
        assert_ne!(ensure_request_id(&mut HeaderMap::new()), id);
        // Ids drawn over several refills of the per-thread pool are all different.
        let ids: std::collections::HashSet<String> =
            (0..500).map(|_| ensure_request_id(&mut HeaderMap::new())).collect();
        assert_eq!(ids.len(), 500);
    }
}
