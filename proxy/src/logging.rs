//! Log lines on stderr, as text or as JSON, under a filter that `/logging` can change at run time.
//!
//! JSON lines are the ones tracing-subscriber's `json().flatten_event(true)` writes, byte for byte
//! (`timestamp`, `level`, the event's fields in order, `target`), but written straight into a
//! reused byte buffer. tracing-subscriber's own JSON formatter goes through an adapter that checks
//! every few bytes of output for UTF-8 and copies them one piece at a time into a `String`, and
//! serializes each field through serde_json's map state machine; with an access line per HTTP
//! request, these lines cost an L7 sidecar about 40,000 instructions per request more in the
//! builds measured (callgrind, bench/README.md). Strings that need no escaping are copied whole;
//! the timestamp's date and time of day are formatted once per second. An event inside a span is
//! handed to tracing-subscriber's formatter, which knows how to write span fields; keycard opens
//! no spans. Access lines, one per HTTP request, skip tracing where this process logs JSON:
//! [`json_event`] writes the same bytes without building an event.

use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::{fmt, io};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent as _;
use tracing_subscriber::fmt::format::{Format, FormatEvent, FormatFields, Json, Writer};
use tracing_subscriber::fmt::time::{FormatTime as _, SystemTime};
use tracing_subscriber::fmt::{FmtContext, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

use crate::admin::LogControl;

/// A line buffer kept for the next event only up to this size (one odd huge line does not stay).
const KEEP_BUFFER: usize = 16 * 1024;

/// Sets up logging on stderr (`filter` in tracing's syntax; an invalid one falls back to `info`)
/// and returns the control `/logging` uses to read and change the filter.
pub fn init(filter: &str, json: bool) -> LogControl {
    use std::io::IsTerminal as _;
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{EnvFilter, fmt, reload};
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    DIRECT_JSON.store(json, Ordering::Relaxed);
    if json {
        registry.with(json_layer(Stderr)).init()
    } else {
        // Colours only for a terminal: not into a file, a pipe or a container's log.
        let ansi = std::io::stderr().is_terminal();
        registry.with(fmt::layer().with_ansi(ansi).with_writer(Stderr)).init()
    }
    // Lines a runtime thread holds are written before a panic's message.
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        flush();
        previous(info);
    }));
    Arc::new(move |set: Option<&str>| {
        if let Some(spec) = set {
            let f = EnvFilter::try_new(spec).map_err(|e| format!("bad filter {spec:?}: {e}"))?;
            handle.reload(f).map_err(|e| e.to_string())?;
        }
        handle.with_current(|f| f.to_string()).map_err(|e| e.to_string())
    })
}

/// Lines held by a runtime thread are written once they reach this size, if it has not parked by then.
const FLUSH_AT: usize = 32 * 1024;

thread_local! {
    /// Lines this thread holds until it parks (`None`: it writes each line as it comes).
    static HELD: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

/// Writes what this thread holds to stderr, and from now on holds its lines until the next call.
/// The sidecar's runtime calls it each time a thread is about to park (wait for events), so a
/// wake-up that finishes several requests writes their access lines in one `write(2)`, after
/// its responses went out, and no line waits longer than the work that is already running.
/// Threads that never call it (and the runtime's blocking pool) write each line at once.
pub fn flush() {
    // Unlocked: stderr is locked only when there is something to write.
    flush_to(&mut io::stderr());
}

/// Writes what this thread holds and stops holding (a runtime thread that stops, or the process
/// leaving its runtime).
pub fn release() {
    release_to(&mut io::stderr());
}

fn release_to(out: &mut impl io::Write) {
    flush_to(out);
    let _ = HELD.try_with(|held| held.try_borrow_mut().map(|mut h| *h = None));
}

fn flush_to(out: &mut impl io::Write) {
    let _ = HELD.try_with(|held| {
        let Ok(mut held) = held.try_borrow_mut() else { return };
        let pending = held.get_or_insert_with(Vec::new);
        if !pending.is_empty() {
            let _ = out.write_all(pending);
            pending.clear();
        }
        if pending.capacity() > FLUSH_AT * 2 {
            *pending = Vec::new();
        }
    });
}

/// One line: held, when this thread holds lines (written with the held ones past `FLUSH_AT`),
/// else written to `out` now.
fn write_line_to(line: &[u8], out: &mut impl io::Write) -> io::Result<()> {
    let held = HELD.try_with(|held| {
        let Ok(mut held) = held.try_borrow_mut() else { return false };
        let Some(pending) = held.as_mut() else { return false };
        pending.extend_from_slice(line);
        if pending.len() >= FLUSH_AT {
            let _ = out.write_all(pending);
            pending.clear();
        }
        true
    });
    if held == Ok(true) { Ok(()) } else { out.write_all(line) }
}

/// Standard error, through this thread's held lines (see [`flush`]).
pub struct Stderr;

pub struct StderrLine;

impl io::Write for StderrLine {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        write_line_to(buf, &mut io::stderr())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl MakeWriter<'_> for Stderr {
    type Writer = StderrLine;

    fn make_writer(&self) -> StderrLine {
        StderrLine
    }
}

/// The JSON layer, writing one line per event to `writer`.
pub fn json_layer<S, W>(writer: W) -> tracing_subscriber::fmt::Layer<S, JsonFields, JsonLines, W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + 'static,
{
    tracing_subscriber::fmt::layer()
        .fmt_fields(JsonFields::new())
        .event_format(JsonLines::default())
        .with_writer(writer)
}

pub use tracing_subscriber::fmt::format::JsonFields;

/// The JSON event format (see the module documentation).
pub struct JsonLines {
    /// tracing-subscriber's formatter, for events inside a span.
    in_span: Format<Json>,
}

impl Default for JsonLines {
    fn default() -> Self {
        JsonLines { in_span: tracing_subscriber::fmt::format().json().flatten_event(true) }
    }
}

thread_local! {
    /// The line being built; taken out while in use, so an event logged while formatting another
    /// (from a field's `Debug`) gets a fresh one.
    static LINE: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if event.parent().is_some() || ctx.lookup_current().is_some() {
            return self.in_span.format_event(ctx, writer, event);
        }
        with_line(|line| match (write_line(line, event), std::str::from_utf8(line)) {
            (Ok(()), Ok(text)) => writer.write_str(text),
            _ => Err(fmt::Error),
        })
    }
}

/// Runs `build` on this thread's line buffer, emptied (a fresh one if it is in use: an event
/// logged while another is formatted), and keeps the buffer for the next line unless it grew past
/// `KEEP_BUFFER`.
fn with_line<R>(build: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    let mut line = LINE.take();
    line.clear();
    let result = build(&mut line);
    if line.capacity() <= KEEP_BUFFER {
        LINE.set(line);
    }
    result
}

fn write_line(line: &mut Vec<u8>, event: &Event<'_>) -> Result<(), fmt::Error> {
    // Events from the `log` crate (rustls) carry their real target and level as fields.
    let normalized = event.normalized_metadata();
    let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
    push_head(line, meta.level())?;
    let mut fields = JsonFieldsVisitor { line: &mut *line, ok: true };
    event.record(&mut fields);
    if !fields.ok {
        return Err(fmt::Error);
    }
    line.extend_from_slice(b",\"target\":");
    push_json_str(line, meta.target());
    line.extend_from_slice(b"}\n");
    Ok(())
}

/// `{"timestamp":"...","level":"..."`: how every line starts.
fn push_head(line: &mut Vec<u8>, level: &tracing::Level) -> fmt::Result {
    let mut timestamp = String::with_capacity(32);
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(since) => write_timestamp(&mut timestamp, since),
        // A clock before 1970: tracing-subscriber's formatter knows how to write that.
        Err(_) => SystemTime.format_time(&mut Writer::new(&mut timestamp))?,
    }
    line.extend_from_slice(b"{\"timestamp\":");
    push_json_str(line, &timestamp);
    line.extend_from_slice(b",\"level\":");
    push_json_str(line, level.as_str());
    Ok(())
}

/// Set by [`init`] when this process writes JSON lines.
static DIRECT_JSON: AtomicBool = AtomicBool::new(false);

/// Whether this process writes JSON lines (set up by [`init`]), so that a line may be written by
/// [`json_event`] instead of through tracing. In-process subscribers (tests) never see this set.
pub fn direct_json() -> bool {
    DIRECT_JSON.load(Ordering::Relaxed)
}

/// The fields of a line that [`json_event`] writes, each as `,"key":value` (as the JSON layer
/// writes a field recorded as a `str`, a `u64` or a `bool`).
pub struct LineFields<'a> {
    line: &'a mut Vec<u8>,
}

impl LineFields<'_> {
    #[inline(always)]
    pub fn str(&mut self, key: &str, value: &str) {
        self.key(key);
        push_json_str(self.line, value);
    }

    #[inline(always)]
    pub fn u64(&mut self, key: &str, value: u64) {
        self.key(key);
        self.line.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
    }

    #[inline(always)]
    pub fn bool(&mut self, key: &str, value: bool) {
        self.key(key);
        self.line.extend_from_slice(if value { b"true" } else { b"false" });
    }

    /// `key` is a field name that needs no escaping (the callers' literals, checked in debug
    /// builds and by the tests that compare lines with the JSON layer's): copied whole, unchecked.
    /// Inlined, like the three above, so a literal's length is known where it is copied and the
    /// copy is a few moves rather than a call to `memcpy`.
    #[inline(always)]
    fn key(&mut self, key: &str) {
        debug_assert!(!needs_escape(key.as_bytes()), "{key:?}");
        self.line.reserve(key.len() + 4);
        self.line.extend_from_slice(b",\"");
        self.line.extend_from_slice(key.as_bytes());
        self.line.extend_from_slice(b"\":");
    }
}

/// Writes, on this thread's held lines, the line the JSON layer writes for an event of `level`
/// and `target` with the message `message` and `fields` (in that order), without building a
/// tracing event: no callsite, no field set, no visitor per field. For lines as frequent as
/// requests (`access`); the caller checks [`direct_json`] and that the filter lets the event
/// through (`tracing::enabled!`), and logs through tracing otherwise.
pub fn json_event(
    level: &tracing::Level,
    target: &str,
    message: &str,
    fields: impl FnOnce(&mut LineFields<'_>),
) {
    with_line(|line| {
        if json_event_into(line, level, target, message, fields).is_ok() {
            let _ = write_line_to(line, &mut io::stderr());
        }
    });
}

pub(crate) fn json_event_into(
    line: &mut Vec<u8>,
    level: &tracing::Level,
    target: &str,
    message: &str,
    fields: impl FnOnce(&mut LineFields<'_>),
) -> fmt::Result {
    push_head(line, level)?;
    let mut f = LineFields { line: &mut *line };
    f.str("message", message);
    fields(&mut f);
    line.extend_from_slice(b",\"target\":");
    push_json_str(line, target);
    line.extend_from_slice(b"}\n");
    Ok(())
}

/// A JSON string: most (field names, addresses, identities, paths) need no escaping and are
/// copied whole; the rest go through serde_json, which escapes exactly what it must (quote,
/// backslash, control characters).
fn push_json_str(line: &mut Vec<u8>, s: &str) {
    if !needs_escape(s.as_bytes()) {
        line.push(b'"');
        line.extend_from_slice(s.as_bytes());
        line.push(b'"');
    } else {
        // Writing into a Vec fails only for a value that fails to serialize; a str does not.
        let _ = serde_json::to_writer(&mut *line, s);
    }
}

/// Whether `s` holds a byte JSON escapes: a control character (below 0x20), `"` or `\`. Eight
/// bytes at a time (a byte loop cost an access line about 3,000 instructions): for a word `x`,
/// `(x - 0x01..01 * n) & !x & 0x80..80` is non-zero exactly when some byte of `x` is below `n`
/// (for `n` up to 0x80), and a byte equal to `c` is a zero byte of `x ^ (0x01..01 * c)`.
fn needs_escape(s: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    let below = |x: u64, n: u8| x.wrapping_sub(ONES * u64::from(n)) & !x & HIGH != 0;
    let escapes = |word: &[u8]| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(word);
        let x = u64::from_ne_bytes(bytes);
        below(x, 0x20) || below(x ^ (ONES * u64::from(b'"')), 1) || below(x ^ (ONES * u64::from(b'\\')), 1)
    };
    if s.len() < 8 {
        return s.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\');
    }
    // The last word overlaps the one before it rather than leaving bytes to check one by one.
    s.chunks_exact(8).any(escapes) || escapes(&s[s.len() - 8..])
}

/// An event's fields as `,"name":value` each, as tracing-serde's map visitor writes them (the same
/// value for every kind of field; `Debug` for what tracing records that way), without its
/// serializer's per-entry state.
struct JsonFieldsVisitor<'a> {
    line: &'a mut Vec<u8>,
    /// False once a value failed to serialize (a `Debug` that returned an error): the line is
    /// dropped, as tracing-subscriber drops it.
    ok: bool,
}

impl JsonFieldsVisitor<'_> {
    fn key(&mut self, field: &Field) {
        self.line.push(b',');
        push_json_str(self.line, field.name());
        self.line.push(b':');
    }

    /// A value serde_json writes (a float: `null` when not finite; `Debug` text: a string).
    fn serialize(&mut self, field: &Field, value: impl serde::Serialize) {
        if self.ok {
            self.key(field);
            self.ok = serde_json::to_writer(&mut *self.line, &value).is_ok();
        }
    }
}

impl Visit for JsonFieldsVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.ok {
            self.key(field);
            push_json_str(self.line, value);
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.ok {
            self.key(field);
            self.line.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.ok {
            self.key(field);
            self.line.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.ok {
            self.key(field);
            self.line.extend_from_slice(if value { b"true" } else { b"false" });
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.serialize(field, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.serialize(field, format_args!("{value:?}"));
    }
}

thread_local! {
    /// The second last written, as `YYYY-MM-DDTHH:MM:SS.`, and which second since 1970 that is.
    static SECOND: Cell<(u64, [u8; 20])> = const { Cell::new((u64::MAX, [0; 20])) };
}

/// The time `since` 1970 as tracing-subscriber's `SystemTime` writes it
/// (`2026-12-01T22:31:57.123456Z`, UTC, microseconds), the date and time of day formatted once per
/// second (through `fmt` they cost an access line about 2,400 instructions).
fn write_timestamp(out: &mut String, since: std::time::Duration) {
    let secs = since.as_secs();
    let (cached, mut prefix) = SECOND.get();
    if cached != secs {
        let at = i64::try_from(secs).ok().and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok());
        let Some(at) = at else {
            // Past the year 9999: the slow way, as tracing-subscriber writes it.
            let _ = SystemTime.format_time(&mut Writer::new(out));
            return;
        };
        let text = format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.",
            at.year(),
            u8::from(at.month()),
            at.day(),
            at.hour(),
            at.minute(),
            at.second()
        );
        let Ok(bytes) = <[u8; 20]>::try_from(text.as_bytes()) else {
            let _ = SystemTime.format_time(&mut Writer::new(out));
            return;
        };
        prefix = bytes;
        SECOND.set((secs, prefix));
    }
    out.push_str(std::str::from_utf8(&prefix).unwrap_or_default());
    let micros = since.subsec_micros();
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(micros);
    out.extend(std::iter::repeat_n('0', 6usize.saturating_sub(digits.len())));
    out.push_str(digits);
    out.push('Z');
}

/// A writer the tests read lines back from.
#[cfg(test)]
pub(crate) mod capture {
    use std::io;
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;

    #[derive(Clone, Default)]
    pub struct Capture(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().map_err(|_| io::Error::other("poisoned"))?.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Capture {
        type Writer = Capture;
        fn make_writer(&'w self) -> Capture {
            self.clone()
        }
    }

    impl Capture {
        /// The captured lines with each timestamp's value replaced by `T`.
        pub fn lines(&self) -> Vec<String> {
            let bytes = self.0.lock().map(|b| b.clone()).unwrap_or_default();
            without_timestamps(&bytes)
        }
    }

    /// `bytes`' lines with each timestamp's value replaced by `T`.
    pub fn without_timestamps(bytes: &[u8]) -> Vec<String> {
        String::from_utf8_lossy(bytes)
            .lines()
            .map(|l| match (l.find("\"timestamp\":\""), l.find("\",\"level\"")) {
                (Some(a), Some(b)) => format!("{}\"timestamp\":\"T{}", &l[..a], &l[b..]),
                _ => l.to_owned(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use tracing_subscriber::prelude::*;

    use super::capture::Capture;
    use super::*;

    fn emit_all() {
        let addr: std::net::SocketAddr = "127.0.0.1:8080".parse().unwrap_or(([127, 0, 0, 1], 1).into());
        tracing::info!(
            target: "keycard::access",
            direction = "inbound",
            src.addr = %addr,
            port = 8080u16,
            mtls = true,
            delta = -3i64,
            ratio = 0.25f64,
            nan = f64::NAN,
            path = %"/a\"b\\c\n\u{1}é\u{7f}",
            debug = ?Some("x"),
            "access"
        );
        tracing::warn!(error = %io::Error::other("broken \"pipe\""), "a {} message", "formatted");
        let err = io::Error::other("as an error");
        tracing::info!(
            wide = u128::MAX,
            narrow = i128::MIN,
            big = u64::MAX,
            small = i64::MIN,
            no = false,
            inf = f64::INFINITY,
            empty = "",
            separators = "\u{2028}\u{2029}\t",
            unit_separator = "a\u{1f}b",
            "quoted \"name\"" = 1u64,
            err = &err as &(dyn std::error::Error + 'static),
        );
        tracing::error!(target: "odd \" target", "");
    }

    /// Each line is the one tracing-subscriber's JSON formatter writes for the same event.
    #[test]
    fn lines_match_tracing_subscribers_json() {
        let ours = Capture::default();
        let theirs = Capture::default();
        let sub = tracing_subscriber::registry().with(json_layer(ours.clone()));
        tracing::subscriber::with_default(sub, emit_all);
        let sub = tracing_subscriber::registry()
            .with(tracing_subscriber::fmt::layer().json().flatten_event(true).with_writer(theirs.clone()));
        tracing::subscriber::with_default(sub, emit_all);
        let (ours, theirs) = (ours.lines(), theirs.lines());
        assert_eq!(ours.len(), 4, "{ours:?}");
        assert_eq!(ours, theirs);
        let v: serde_json::Value = serde_json::from_str(&ours[0]).unwrap_or_default();
        assert_eq!(v["path"], "/a\"b\\c\n\u{1}é\u{7f}");
        assert_eq!(v["src.addr"], "127.0.0.1:8080");
        assert_eq!(v["target"], "keycard::access");
        assert!(v["nan"].is_null());
    }

    #[test]
    fn timestamps_are_written_as_tracing_subscriber_writes_them() {
        use std::time::Duration;
        let cases = [
            (Duration::ZERO, "1970-01-01T00:00:00.000000Z"),
            (Duration::new(951_827_696, 123_999), "2000-02-29T12:34:56.000123Z"),
            (Duration::new(951_827_696, 999_999_999), "2000-02-29T12:34:56.999999Z"),
            (Duration::new(951_827_697, 1_000), "2000-02-29T12:34:57.000001Z"),
            (Duration::new(1_796_169_599, 500_000_000), "2026-12-01T23:59:59.500000Z"),
            (Duration::new(4_102_444_799, 999_999_000), "2099-12-31T23:59:59.999999Z"),
            (Duration::new(253_402_300_799, 0), "9999-12-31T23:59:59.000000Z"),
        ];
        for (since, want) in cases {
            let mut out = String::new();
            write_timestamp(&mut out, since);
            assert_eq!(out, want, "{since:?}");
        }
        // And the shape of the real thing, from tracing-subscriber, now.
        let (mut ours, mut theirs) = (String::new(), String::new());
        let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        write_timestamp(&mut ours, since);
        let _ = SystemTime.format_time(&mut Writer::new(&mut theirs));
        let shape =
            |t: &str| t.bytes().map(|b| if b.is_ascii_digit() { b'0' } else { b }).collect::<Vec<u8>>();
        assert_eq!(shape(&ours), shape(&theirs), "{ours} {theirs}");
    }

    /// The word-at-a-time check agrees with the plain one on every byte in every position.
    #[test]
    fn escape_check_finds_every_byte_json_escapes() {
        let plain = |s: &[u8]| s.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\');
        for len in 0..20 {
            for at in 0..len {
                for b in 0..=255u8 {
                    let mut s = vec![b'a'; len];
                    s[at] = b;
                    assert_eq!(needs_escape(&s), plain(&s), "byte {b:#x} at {at} of {len}");
                    // Next to UTF-8 and DEL, which stay as they are.
                    let mut s = "é\u{7f}".repeat(len).into_bytes();
                    s[at] = b;
                    assert_eq!(needs_escape(&s), plain(&s), "byte {b:#x} at {at} among UTF-8");
                }
            }
        }
    }

    /// A thread that holds its lines writes them at the next flush, in order, or as soon as they
    /// pass `FLUSH_AT`; one that does not writes each at once.
    #[test]
    fn held_lines_wait_for_the_flush() {
        std::thread::spawn(|| {
            let mut out = Vec::new();
            write_line_to(b"one\n", &mut out).unwrap();
            assert_eq!(out, b"one\n", "not holding yet: written at once");
            flush_to(&mut out);
            write_line_to(b"two\n", &mut out).unwrap();
            write_line_to(b"three\n", &mut out).unwrap();
            assert_eq!(out, b"one\n", "held until the flush");
            flush_to(&mut out);
            assert_eq!(out, b"one\ntwo\nthree\n");
            let long = vec![b'x'; FLUSH_AT / 2];
            write_line_to(&long, &mut out).unwrap();
            assert_eq!(out.len(), 14, "half the limit stays held");
            write_line_to(&long, &mut out).unwrap();
            assert_eq!(out.len(), 14 + FLUSH_AT, "the limit is written without a flush");
            write_line_to(b"four\n", &mut out).unwrap();
            release_to(&mut out);
            write_line_to(b"five\n", &mut out).unwrap();
            assert!(out.ends_with(b"four\nfive\n"), "released: written at once again");
        })
        .join()
        .unwrap();
    }

    /// Inside a span the line carries the span, as tracing-subscriber writes it.
    #[test]
    fn events_in_a_span_keep_the_span() {
        let ours = Capture::default();
        let theirs = Capture::default();
        let emit = || {
            let span = tracing::info_span!("conn", id = 7u64);
            let _in = span.enter();
            tracing::info!(n = 1u64, "inside");
        };
        tracing::subscriber::with_default(
            tracing_subscriber::registry().with(json_layer(ours.clone())),
            emit,
        );
        let sub = tracing_subscriber::registry()
            .with(tracing_subscriber::fmt::layer().json().flatten_event(true).with_writer(theirs.clone()));
        tracing::subscriber::with_default(sub, emit);
        let (ours, theirs) = (ours.lines(), theirs.lines());
        assert_eq!(ours, theirs);
        assert!(ours[0].contains("\"span\":{\"id\":7,\"name\":\"conn\"}"), "{ours:?}");
    }

    /// A field whose `Debug` logs gets its own line and spoils neither.
    #[test]
    fn an_event_logged_while_formatting_another() {
        struct Noisy;
        impl fmt::Debug for Noisy {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                tracing::info!("from inside");
                f.write_str("noisy")
            }
        }
        let ours = Capture::default();
        let sub = tracing_subscriber::registry().with(json_layer(ours.clone()));
        tracing::subscriber::with_default(sub, || tracing::info!(field = ?Noisy, "outer"));
        let lines = ours.lines();
        let outer: Vec<&String> = lines.iter().filter(|l| l.contains("\"outer\"")).collect();
        assert_eq!(outer.len(), 1, "{lines:?}");
        assert!(outer[0].contains("\"field\":\"noisy\""), "{lines:?}");
        for l in &lines {
            assert!(serde_json::from_str::<serde_json::Value>(l).is_ok(), "not JSON: {l}");
        }
    }
}
