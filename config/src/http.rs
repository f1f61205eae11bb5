//! HTTP request targets as authorization sees them: the path split from the query, then normalised
//! the way Istio's `meshConfig.pathNormalization` does before any `paths` rule is matched.
//!
//! Normalisation is a security boundary: a DENY rule on `/private` must not be dodged by
//! `/public/%2E%2E/private`, so every mode also refuses what cannot be interpreted one way only
//! (bad `%` escapes, control characters, NUL). The normalised path is also what should be sent on
//! to the application, so that the policy and the application judge the same path.

use serde::{Deserialize, Serialize};

/// Istio's `meshConfig.pathNormalization.normalization` (`NONE`, `BASE`, `MERGE_SLASHES`,
/// `DECODE_AND_MERGE_SLASHES`), written in snake case in keycard's configuration. Default `base`,
/// as in Istio.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathNormalization {
    /// No rewriting; invalid escapes and control characters are still refused.
    None,
    /// RFC 3986: `%XX` of unreserved characters decoded, other escapes upper-cased, `\` to `/`,
    /// dot segments removed.
    #[default]
    Base,
    /// `Base`, then runs of `/` merged into one.
    MergeSlashes,
    /// `%2F` / `%5C` (any case) decoded to `/` first, then `MergeSlashes`.
    DecodeAndMergeSlashes,
}

/// Why a path was refused; the proxy answers 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    #[error("the path must start with `/`")]
    NotAbsolute,
    #[error("invalid percent-escape at byte {at}: `%` must be followed by two hex digits")]
    BadEscape { at: usize },
    #[error("control character {byte:#04x} at byte {at}")]
    ControlCharacter { at: usize, byte: u8 },
    #[error("percent-escape at byte {at} decodes to control character {byte:#04x}")]
    EncodedControlCharacter { at: usize, byte: u8 },
}

impl PathError {
    /// A stable label for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotAbsolute => "path_not_absolute",
            Self::BadEscape { .. } => "path_bad_escape",
            Self::ControlCharacter { .. } | Self::EncodedControlCharacter { .. } => "path_control_character",
        }
    }
}

/// The path and the query of a request target; the fragment (which clients should not send) is
/// dropped. An absolute-form target (`http://host/p?q`) gives its path (`/` when it has none).
pub fn split_target(target: &str) -> (&str, Option<&str>) {
    let target = target.split_once('#').map_or(target, |(before, _)| before);
    let target = match target.split_once("://") {
        Some((scheme, rest)) if !scheme.is_empty() && scheme.bytes().all(|b| b.is_ascii_alphabetic()) => {
            match rest.find(['/', '?']) {
                Some(i) if rest.as_bytes()[i] == b'/' => &rest[i..],
                Some(i) => return ("/", Some(&rest[i + 1..])),
                None => return ("/", None),
            }
        }
        _ => target,
    };
    match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    }
}

/// Normalises a request path (no query) under `mode`.
///
/// The path must start with `/`; `*` (the target of `OPTIONS *`) is returned unchanged, and the
/// caller must accept it for `OPTIONS` only. Percent-escapes are decoded once, never twice:
/// `%252e` stays `%252E`.
pub fn normalize_path(path: &str, mode: PathNormalization) -> Result<String, PathError> {
    if path == "*" {
        return Ok(path.to_owned());
    }
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if already_normal(path) {
        return Ok(path.to_owned());
    }
    rewrite(path, mode)
}

/// Whether every mode accepts `path` and leaves it as it is: no control character, `%` or `\`,
/// no empty segment (`//`), no `.` or `..` segment. Most paths are, and skip the passes that
/// copy them (a request's path cost an inbound sidecar about 1,600 instructions through them).
fn already_normal(path: &str) -> bool {
    !path.bytes().any(|b| b.is_ascii_control() || b == b'%' || b == b'\\')
        && !path.contains("//")
        && !path.split('/').any(|segment| segment == "." || segment == "..")
}

/// The passes: decode and check, remove dot segments, merge slashes (as `mode` says).
fn rewrite(path: &str, mode: PathNormalization) -> Result<String, PathError> {
    let decoded = decode(path, mode)?;
    if mode == PathNormalization::None {
        return Ok(path.to_owned());
    }
    let without_dots = remove_dot_segments(&decoded);
    Ok(match mode {
        PathNormalization::MergeSlashes | PathNormalization::DecodeAndMergeSlashes => {
            merge_slashes(&without_dots)
        }
        PathNormalization::None | PathNormalization::Base => without_dots,
    })
}

/// Checks every byte and escape; decodes unreserved escapes (and `%2F`/`%5C` when the mode says
/// so), upper-cases the others and turns `\` into `/`.
fn decode(path: &str, mode: PathNormalization) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b.is_ascii_control() {
            return Err(PathError::ControlCharacter { at: i, byte: b });
        }
        if b != b'%' {
            // Copy the whole UTF-8 character that starts here.
            let len = path[i..].chars().next().map_or(1, char::len_utf8);
            let piece = &path[i..i + len];
            out.push_str(if piece == "\\" { "/" } else { piece });
            i += len;
            continue;
        }
        let (Some(hi), Some(lo)) = (bytes.get(i + 1).and_then(hex), bytes.get(i + 2).and_then(hex)) else {
            return Err(PathError::BadEscape { at: i });
        };
        let value = (hi << 4) | lo;
        if value.is_ascii_control() {
            return Err(PathError::EncodedControlCharacter { at: i, byte: value });
        }
        let slash = matches!(value, b'/' | b'\\');
        if is_unreserved(value) || (slash && mode == PathNormalization::DecodeAndMergeSlashes) {
            out.push(if slash { '/' } else { char::from(value) });
        } else {
            out.push('%');
            out.push(char::from(HEX_UPPER[usize::from(hi)]));
            out.push(char::from(HEX_UPPER[usize::from(lo)]));
        }
        i += 3;
    }
    Ok(out)
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

fn hex(b: &u8) -> Option<u8> {
    char::from(*b).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

/// RFC 3986 section 2.3.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// RFC 3986 section 5.2.4 for an absolute path: `.` segments vanish, `..` removes the segment
/// before it (never above the root), and a path ending in `.` or `..` keeps its trailing slash.
fn remove_dot_segments(path: &str) -> String {
    let segments: Vec<&str> = path.get(1..).unwrap_or_default().split('/').collect();
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    let last = segments.len().saturating_sub(1);
    for (i, segment) in segments.iter().enumerate() {
        match *segment {
            "." => {}
            ".." => {
                out.pop();
            }
            other => {
                out.push(other);
                continue;
            }
        }
        if i == last {
            out.push("");
        }
    }
    format!("/{}", out.join("/"))
}

fn merge_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::PathNormalization::{Base, DecodeAndMergeSlashes, MergeSlashes};
    use super::*;

    const NONE: PathNormalization = PathNormalization::None;

    /// The shortcut for paths that need no rewriting gives what the passes give, for every mode,
    /// on every path of up to six characters from an alphabet of the characters that matter.
    #[test]
    fn paths_left_alone_are_those_the_passes_leave_alone() {
        let alphabet = ['/', '.', 'a', '%', '2', 'e', '\\', '\u{1}', 'é'];
        let mut paths = vec![String::from("/")];
        let mut last = paths.clone();
        for _ in 0..5 {
            last = last.iter().flat_map(|p| alphabet.iter().map(move |c| format!("{p}{c}"))).collect();
            paths.extend(last.iter().cloned());
        }
        let mut shortcut = 0;
        for path in &paths {
            for mode in [NONE, Base, MergeSlashes, DecodeAndMergeSlashes] {
                assert_eq!(normalize_path(path, mode), rewrite(path, mode), "{path:?} under {mode:?}");
            }
            shortcut += usize::from(already_normal(path));
        }
        assert!(shortcut > 1000, "the shortcut was taken for {shortcut} of {} paths", paths.len());
    }

    #[test]
    fn paths_normalise_as_istio_documents() {
        let cases: &[(&str, PathNormalization, &str)] = &[
            ("/public/%2E%2E/private", Base, "/private"),
            ("/public/%2e%2e/private", Base, "/private"),
            ("/a/./b/../c", Base, "/a/c"),
            ("/..", Base, "/"),
            ("/../../x", Base, "/x"),
            ("/a/b/..", Base, "/a/"),
            ("/a/.", Base, "/a/"),
            ("/a/...", Base, "/a/..."),
            ("/a/..b/c", Base, "/a/..b/c"),
            ("/", Base, "/"),
            ("//a", Base, "//a"),
            ("//a", MergeSlashes, "/a"),
            ("/a//b///c/", MergeSlashes, "/a/b/c/"),
            ("/a//../b", MergeSlashes, "/a/b"),
            ("/some%2fdata/%61%62%63", DecodeAndMergeSlashes, "/some/data/abc"),
            ("/some%2Fdata", Base, "/some%2Fdata"),
            ("/some%2fdata", MergeSlashes, "/some%2Fdata"),
            ("/a%5cb", DecodeAndMergeSlashes, "/a/b"),
            ("/a%5Cb", Base, "/a%5Cb"),
            ("/a/b%2f..%2fc", DecodeAndMergeSlashes, "/a/c"),
            ("/a%2f%2fb", DecodeAndMergeSlashes, "/a/b"),
            ("/some\\data", Base, "/some/data"),
            ("/%7e%5F%2d%2E", Base, "/~_-."),
            ("/%41%5a%30", Base, "/AZ0"),
            ("/%3f%23%20", Base, "/%3F%23%20"),
            ("/%252e%252e/x", Base, "/%252e%252e/x"),
            ("/caf\u{e9}/./x", Base, "/caf\u{e9}/x"),
            ("/a/../b//%2e", NONE, "/a/../b//%2e"),
            ("*", Base, "*"),
        ];
        for (input, mode, want) in cases {
            assert_eq!(normalize_path(input, *mode).as_deref(), Ok(*want), "{input} under {mode:?}");
        }
    }

    #[test]
    fn what_cannot_be_read_one_way_only_is_refused() {
        let cases: &[(&str, PathError)] = &[
            ("a/b", PathError::NotAbsolute),
            ("", PathError::NotAbsolute),
            ("\\a", PathError::NotAbsolute),
            ("/a%zzb", PathError::BadEscape { at: 2 }),
            ("/a%2", PathError::BadEscape { at: 2 }),
            ("/a%", PathError::BadEscape { at: 2 }),
            ("/a%g1", PathError::BadEscape { at: 2 }),
            ("/a\0b", PathError::ControlCharacter { at: 2, byte: 0 }),
            ("/a\nb", PathError::ControlCharacter { at: 2, byte: b'\n' }),
            ("/a\x7f", PathError::ControlCharacter { at: 2, byte: 0x7f }),
            ("/a%00", PathError::EncodedControlCharacter { at: 2, byte: 0 }),
            ("/a%0D%0A", PathError::EncodedControlCharacter { at: 2, byte: b'\r' }),
            ("/a%7F", PathError::EncodedControlCharacter { at: 2, byte: 0x7f }),
        ];
        for mode in [NONE, Base, MergeSlashes, DecodeAndMergeSlashes] {
            for (input, want) in cases {
                assert_eq!(normalize_path(input, mode).as_ref(), Err(want), "{input:?} under {mode:?}");
            }
        }
        assert_eq!(PathError::BadEscape { at: 0 }.reason(), "path_bad_escape");
        assert!(PathError::BadEscape { at: 3 }.to_string().contains("byte 3"));
    }

    #[test]
    fn targets_split_into_path_and_query() {
        let cases: &[(&str, (&str, Option<&str>))] = &[
            ("/a/b?x=1&y=2", ("/a/b", Some("x=1&y=2"))),
            ("/a/b", ("/a/b", None)),
            ("/a?", ("/a", Some(""))),
            ("/a#frag", ("/a", None)),
            ("/a?q#frag", ("/a", Some("q"))),
            ("/a?q=?", ("/a", Some("q=?"))),
            ("http://example.com/p?q", ("/p", Some("q"))),
            ("https://example.com", ("/", None)),
            ("http://example.com?q", ("/", Some("q"))),
            ("/redirect?to=http://x/y", ("/redirect", Some("to=http://x/y"))),
            ("*", ("*", None)),
        ];
        for (target, want) in cases {
            assert_eq!(split_target(target), *want, "{target}");
        }
    }

    #[test]
    fn the_default_mode_is_base_and_modes_read_as_snake_case() {
        assert_eq!(PathNormalization::default(), Base);
        let m: PathNormalization = serde_json::from_str("\"decode_and_merge_slashes\"").unwrap();
        assert_eq!(m, DecodeAndMergeSlashes);
        assert_eq!(serde_json::to_string(&MergeSlashes).unwrap(), "\"merge_slashes\"");
    }
}
