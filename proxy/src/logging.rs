//! Log lines on stderr, as text or as JSON, under a filter that `/logging` can change at run time.
//!
//! JSON lines are the ones tracing-subscriber's `json().flatten_event(true)` writes, byte for byte
//! (`timestamp`, `level`, the event's fields in order, `target`), but serialized straight into a
//! reused byte buffer. tracing-subscriber's own JSON formatter goes through an adapter that checks
//! every few bytes of output for UTF-8 and copies them one piece at a time into a `String`; with
//! an access line per HTTP request, writing lines this way saved about 40,000 of the 229,000
//! instructions an L7 sidecar spent per request in the build measured (callgrind, bench/README.md). An event inside a span is handed to tracing-subscriber's
//! formatter, which knows how to write span fields; keycard opens no spans.

use std::cell::Cell;
use std::fmt;
use std::sync::Arc;

use serde::ser::{SerializeMap as _, Serializer as _};
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
    if json {
        registry.with(json_layer(std::io::stderr)).init()
    } else {
        // Colours only for a terminal: not into a file, a pipe or a container's log.
        let ansi = std::io::stderr().is_terminal();
        registry.with(fmt::layer().with_ansi(ansi).with_writer(std::io::stderr)).init()
    }
    Arc::new(move |set: Option<&str>| {
        if let Some(spec) = set {
            let f = EnvFilter::try_new(spec).map_err(|e| format!("bad filter {spec:?}: {e}"))?;
            handle.reload(f).map_err(|e| e.to_string())?;
        }
        handle.with_current(|f| f.to_string()).map_err(|e| e.to_string())
    })
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
        let mut line = LINE.take();
        line.clear();
        let written = write_line(&mut line, event);
        let result = match (written, std::str::from_utf8(&line)) {
            (Ok(()), Ok(text)) => writer.write_str(text),
            _ => Err(fmt::Error),
        };
        if line.capacity() <= KEEP_BUFFER {
            LINE.set(line);
        }
        result
    }
}

fn write_line(line: &mut Vec<u8>, event: &Event<'_>) -> Result<(), fmt::Error> {
    let mut timestamp = String::with_capacity(32);
    SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
    // Events from the `log` crate (rustls) carry their real target and level as fields.
    let normalized = event.normalized_metadata();
    let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
    let fail = |_: serde_json::Error| fmt::Error;
    let mut ser = serde_json::Serializer::new(&mut *line);
    let mut map = ser.serialize_map(None).map_err(fail)?;
    map.serialize_entry("timestamp", &timestamp).map_err(fail)?;
    map.serialize_entry("level", meta.level().as_str()).map_err(fail)?;
    let mut fields = tracing_serde::SerdeMapVisitor::new(map);
    event.record(&mut fields);
    let mut map = fields.take_serializer().map_err(fail)?;
    map.serialize_entry("target", meta.target()).map_err(fail)?;
    map.end().map_err(fail)?;
    line.push(b'\n');
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::Mutex;

    use tracing_subscriber::prelude::*;

    use super::*;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

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
        fn lines(&self) -> Vec<String> {
            let bytes = self.0.lock().map(|b| b.clone()).unwrap_or_default();
            String::from_utf8_lossy(&bytes)
                .lines()
                .map(|l| match (l.find("\"timestamp\":\""), l.find("\",\"level\"")) {
                    (Some(a), Some(b)) => format!("{}\"timestamp\":\"T{}", &l[..a], &l[b..]),
                    _ => l.to_owned(),
                })
                .collect()
        }
    }

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
        assert_eq!(ours.len(), 3, "{ours:?}");
        assert_eq!(ours, theirs);
        let v: serde_json::Value = serde_json::from_str(&ours[0]).unwrap_or_default();
        assert_eq!(v["path"], "/a\"b\\c\n\u{1}é\u{7f}");
        assert_eq!(v["src.addr"], "127.0.0.1:8080");
        assert_eq!(v["target"], "keycard::access");
        assert!(v["nan"].is_null());
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
