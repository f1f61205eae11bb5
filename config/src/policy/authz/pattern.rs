//! Istio's string matches (`Pattern`): exact, prefix, suffix, any, and the path templates of
//! `paths` / `notPaths` (`PathTemplate`).

/// Istio's string match: exact, `prefix*`, `*suffix`, or `*` (any non-empty value); in `paths`
/// and `notPaths` also a path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Any,
    Template(PathTemplate),
}

impl Pattern {
    pub fn parse(s: &str) -> Result<Self, String> {
        let stars = s.matches('*').count();
        Ok(match (s, stars) {
            ("*", _) => Self::Any,
            (_, 0) => Self::Exact(s.to_owned()),
            (_, 1) if s.ends_with('*') => Self::Prefix(s[..s.len() - 1].to_owned()),
            (_, 1) if s.starts_with('*') => Self::Suffix(s[1..].to_owned()),
            _ => return Err(format!("{s:?}: `*` is allowed only alone, at the start or at the end")),
        })
    }

    /// For `paths` / `notPaths`: a value with `{` or `}` is a [`PathTemplate`] (and must be a valid
    /// one), anything else parses as [`Pattern::parse`] does.
    pub fn parse_path(s: &str) -> Result<Self, String> {
        if s.contains(['{', '}']) { PathTemplate::parse(s).map(Self::Template) } else { Self::parse(s) }
    }

    /// For `hosts` / `notHosts`: matched case-insensitively, so kept lower-case.
    pub fn parse_host(s: &str) -> Result<Self, String> {
        Self::parse(&s.to_ascii_lowercase())
    }

    /// Whether `value` matches; an absent value (a plaintext peer's identity) matches nothing.
    pub fn matches(&self, value: Option<&str>) -> bool {
        let Some(v) = value else { return false };
        match self {
            Self::Exact(e) => v == e,
            Self::Prefix(p) => v.starts_with(p.as_str()),
            Self::Suffix(s) => v.ends_with(s.as_str()),
            Self::Any => !v.is_empty(),
            Self::Template(t) => t.matches(v),
        }
    }

    /// A host pattern (from [`Pattern::parse_host`]) against a request authority: case-insensitive;
    /// a pattern without a port is matched against the authority's host alone, so `example.com`
    /// matches `Example.COM:8080`, while a pattern with a port (`example.com:8080`,
    /// `example.com:*`, `*:8080`) is matched against the whole authority.
    ///
    /// Istio compares the whole authority (case-insensitively) and its security guide asks for
    /// `hosts: [example.com, "example.com:*"]`; that pair matches the same here, and a lone
    /// `example.com` in a DENY rule can no longer be sidestepped with `Host: example.com:80`.
    pub fn matches_authority(&self, authority: &str) -> bool {
        let authority = authority.to_ascii_lowercase();
        let text = match self {
            Self::Exact(t) | Self::Prefix(t) | Self::Suffix(t) => t.as_str(),
            Self::Any => return !authority.is_empty(),
            Self::Template(_) => return false,
        };
        let value = if has_port(text) { authority.as_str() } else { host_of(&authority) };
        self.matches(Some(value))
    }
}

/// Whether a host pattern names a port: a `:` outside an IPv6 literal's brackets.
fn has_port(pattern: &str) -> bool {
    let outside = pattern.rfind(']').map_or(pattern, |i| &pattern[i..]);
    outside.contains(':')
}

/// The host of an authority: `[::1]:80` -> `[::1]`, `a.b:80` -> `a.b`, `a.b` -> `a.b`.
fn host_of(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority.find(']').map_or(authority, |i| &authority[..=i]);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

/// An Istio path template, for `paths` / `notPaths` (Istio 1.22+, Envoy's URI template match):
/// `{*}` matches exactly one non-empty path segment, `{**}` matches the rest of the path, `/`
/// included and possibly empty, and must be the last operator. An operator fills its whole segment
/// (`/a/{*}.txt` is refused) and no other `*`, `{` or `}` may appear.
///
/// So `/foo/{*}` matches `/foo/bar` but neither `/foo/` nor `/foo/bar/baz`; `/foo/{**}` matches
/// `/foo/` and `/foo/a/b` but not `/foo`; `/foo/{**}/` matches `/foo//` and `/foo/a/b/`.
/// Envoy limits what an operator matches to RFC 3986 path characters; keycard matches any
/// character but `/` for `{*}` and any character for `{**}`, since the path reaching the policy
/// is already normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    /// Literal text and `{*}`, up to the `{**}` if there is one.
    head: Vec<TemplatePart>,
    /// With a `{**}`: the literal text after it, which must end the path.
    tail: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TemplatePart {
    Literal(String),
    Segment,
}

impl PathTemplate {
    pub fn parse(s: &str) -> Result<Self, String> {
        let Some(segments) = s.strip_prefix('/') else {
            return Err(format!("{s:?}: a path template must start with `/`"));
        };
        let (mut head, mut tail, mut literal) = (Vec::new(), None::<String>, String::from("/"));
        let mut first = true;
        for segment in segments.split('/') {
            if !first {
                literal.push('/');
            }
            first = false;
            match segment {
                "{*}" | "{**}" if tail.is_some() => {
                    return Err(format!("{s:?}: `{{**}}` must be the last operator of a path template"));
                }
                "{*}" => {
                    head.push(TemplatePart::Literal(std::mem::take(&mut literal)));
                    head.push(TemplatePart::Segment);
                }
                "{**}" => {
                    head.push(TemplatePart::Literal(std::mem::take(&mut literal)));
                    tail = Some(String::new());
                }
                _ if segment.contains(['{', '}', '*']) => {
                    let why = if segment.contains("{*}") || segment.contains("{**}") {
                        "an operator must fill its whole path segment"
                    } else if segment.contains(['{', '}']) {
                        "only `{*}` and `{**}` are supported in a path template"
                    } else {
                        "a path template cannot also use `*` wildcards"
                    };
                    return Err(format!("{s:?}: {why}"));
                }
                _ => literal.push_str(segment),
            }
        }
        if head.is_empty() {
            return Err(format!("{s:?}: not a path template: it has no `{{*}}` or `{{**}}`"));
        }
        head.retain(|p| !matches!(p, TemplatePart::Literal(l) if l.is_empty()));
        match &mut tail {
            Some(t) => *t = literal,
            None => head.push(TemplatePart::Literal(literal)),
        }
        Ok(Self { head, tail })
    }

    pub fn matches(&self, path: &str) -> bool {
        let mut rest = path;
        for part in &self.head {
            match part {
                TemplatePart::Literal(l) => match rest.strip_prefix(l.as_str()) {
                    Some(r) => rest = r,
                    None => return false,
                },
                TemplatePart::Segment => {
                    // The next part (if any) starts with `/`: the segment is all up to it.
                    let end = rest.find('/').unwrap_or(rest.len());
                    if end == 0 {
                        return false;
                    }
                    rest = &rest[end..];
                }
            }
        }
        match &self.tail {
            Some(tail) => rest.ends_with(tail.as_str()),
            None => rest.is_empty(),
        }
    }
}
