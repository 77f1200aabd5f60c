//! Plugin output: each stdout/stderr line of a child is kept in a bounded
//! per-plugin buffer and re-emitted through `tracing` with the plugin and
//! instance as fields. Lines are read with a cap on their length, so a plugin
//! that floods or never ends a line costs bounded memory; the re-emission is
//! rate-limited per plugin ([`TokenBucket`]), so a flood cannot drown the
//! supervisor's own log: excess lines stay in the buffer (`plugvisor logs`)
//! and the log says once per interval how many it left out.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};
use tokio::io::AsyncReadExt;

/// Default re-emission rate of one plugin's output: lines per second.
pub const DEFAULT_LINES_PER_SEC: u32 = 200;
/// Default burst: lines re-emitted at once before the rate applies.
pub const DEFAULT_BURST: u32 = 1000;
/// At most one "lines dropped" line per plugin per this interval.
pub const DROP_REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// A token bucket: `rate` lines per second, up to `burst` at once. A pure
/// function of the `now` it is given. It also counts what it refused, for
/// one report per [`DROP_REPORT_INTERVAL`].
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
    /// Lines refused since the last report.
    dropped: u64,
    /// When the current report interval began (the first drop after a report).
    interval_start: Option<Instant>,
}

/// What [`TokenBucket::admit`] decided for one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// Re-emit this line.
    pub emit: bool,
    /// Report this many dropped lines first (once per interval).
    pub report_dropped: Option<u64>,
}

impl TokenBucket {
    pub fn new(lines_per_sec: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        TokenBucket {
            rate: f64::from(lines_per_sec),
            burst,
            tokens: burst,
            last: None,
            dropped: 0,
            interval_start: None,
        }
    }

    pub fn admit(&mut self, now: Instant) -> Admission {
        if let Some(last) = self.last {
            let elapsed = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        }
        self.last = Some(now);
        let report_dropped = self.take_due_report(now);
        let emit = self.tokens >= 1.0;
        if emit {
            self.tokens -= 1.0;
        } else {
            self.dropped += 1;
            self.interval_start.get_or_insert(now);
        }
        Admission {
            emit,
            report_dropped,
        }
    }

    /// The dropped count, when there is one and its interval has passed.
    fn take_due_report(&mut self, now: Instant) -> Option<u64> {
        let start = self.interval_start?;
        if self.dropped == 0 || now.saturating_duration_since(start) < DROP_REPORT_INTERVAL {
            return None;
        }
        self.interval_start = None;
        Some(std::mem::take(&mut self.dropped))
    }

    /// Whatever was dropped and not yet reported (at the end of the output).
    pub fn take_dropped(&mut self) -> Option<u64> {
        self.interval_start = None;
        Some(std::mem::take(&mut self.dropped)).filter(|n| *n > 0)
    }
}

/// Longest line kept; the rest of a longer line is cut.
pub const MAX_LINE: usize = 16 * 1024;

/// One line of plugin output.
#[derive(Debug, Clone)]
pub struct LogLine {
    pub time: SystemTime,
    pub instance: String,
    /// `stdout` or `stderr`.
    pub stream: &'static str,
    pub line: String,
}

/// The last `capacity` lines of a plugin's output.
#[derive(Debug)]
pub struct LogBuffer {
    capacity: usize,
    lines: Mutex<VecDeque<LogLine>>,
    follow: tokio::sync::broadcast::Sender<LogLine>,
    /// Limits re-emission into the tracing log, for all of the plugin's
    /// instances and streams together. Its own lock: it is not part of the
    /// buffered lines, and is held only to decide.
    emission: Mutex<TokenBucket>,
}

impl LogBuffer {
    pub fn new(capacity: usize) -> Self {
        Self::with_rate(capacity, DEFAULT_LINES_PER_SEC, DEFAULT_BURST)
    }

    /// A buffer whose lines are re-emitted at most `lines_per_sec` per
    /// second, after a burst of `burst`.
    pub fn with_rate(capacity: usize, lines_per_sec: u32, burst: u32) -> Self {
        LogBuffer {
            capacity,
            lines: Mutex::new(VecDeque::with_capacity(capacity.min(1024))),
            follow: tokio::sync::broadcast::channel(1024).0,
            emission: Mutex::new(TokenBucket::new(lines_per_sec, burst)),
        }
    }

    /// Keeps `line` and re-emits it through tracing, within the rate limit;
    /// over the limit, it is only kept, and a "lines dropped" line is logged
    /// once per [`DROP_REPORT_INTERVAL`].
    pub fn record(&self, plugin: &str, line: LogLine) {
        self.record_at(plugin, line, Instant::now());
    }

    fn record_at(&self, plugin: &str, line: LogLine, now: Instant) {
        let admission = self
            .emission
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(now);
        if let Some(n) = admission.report_dropped {
            report_dropped(plugin, &line.instance, n);
        }
        if admission.emit {
            emit(plugin, &line);
        }
        self.push(line);
    }

    /// Logs the count of lines dropped and not yet reported: call when an
    /// instance's output ends.
    pub fn finish(&self, plugin: &str, instance: &str) {
        let dropped = self
            .emission
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take_dropped();
        if let Some(n) = dropped {
            report_dropped(plugin, instance, n);
        }
    }

    pub fn push(&self, line: LogLine) {
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        if lines.len() == self.capacity {
            lines.pop_front();
        }
        lines.push_back(line.clone());
        drop(lines);
        let _ = self.follow.send(line);
    }

    /// The last `n` lines, oldest first.
    pub fn tail(&self, n: usize) -> Vec<LogLine> {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines
            .iter()
            .skip(lines.len().saturating_sub(n))
            .cloned()
            .collect()
    }

    /// New lines as they arrive.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<LogLine> {
        self.follow.subscribe()
    }
}

/// Reads `\n`-terminated lines of at most [`MAX_LINE`] bytes.
pub struct LineReader<R> {
    inner: R,
    buf: Vec<u8>,
    eof: bool,
}

impl<R: tokio::io::AsyncRead + Unpin> LineReader<R> {
    pub fn new(inner: R) -> Self {
        LineReader {
            inner,
            buf: Vec::with_capacity(1024),
            eof: false,
        }
    }

    /// The next line without its newline, or `None` at end of input.
    pub async fn next_line(&mut self) -> Option<String> {
        loop {
            let window = &self.buf[..self.buf.len().min(MAX_LINE + 1)];
            if let Some(pos) = window.iter().position(|b| *b == b'\n') {
                let rest = self.buf.split_off(pos + 1);
                let mut line = std::mem::replace(&mut self.buf, rest);
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Some(String::from_utf8_lossy(&line).into_owned());
            }
            if self.buf.len() >= MAX_LINE {
                let rest = self.buf.split_off(MAX_LINE);
                let line = std::mem::replace(&mut self.buf, rest);
                return Some(String::from_utf8_lossy(&line).into_owned());
            }
            if self.eof {
                if self.buf.is_empty() {
                    return None;
                }
                let line = std::mem::take(&mut self.buf);
                return Some(String::from_utf8_lossy(&line).into_owned());
            }
            let mut chunk = [0u8; 4096];
            match self.inner.read(&mut chunk).await {
                Ok(0) | Err(_) => self.eof = true,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

fn report_dropped(plugin: &str, instance: &str, n: u64) {
    tracing::warn!(
        plugin,
        instance,
        dropped = n,
        "{n} lines of plugin output left out of this log (over the rate limit); `plugvisor logs {plugin}` has them"
    );
}

/// A JSON log line taken apart: its level, message, and the author's other
/// fields in one flat object.
#[derive(Debug, PartialEq)]
pub struct JsonLine {
    pub level: String,
    pub message: String,
    pub fields: serde_json::Map<String, serde_json::Value>,
}

/// Reads a JSON object log line. The recommended shape (PROTOCOL.md) keeps
/// the author's fields under `fields`; flat ones put them beside `level` and
/// `message`. Both come out flat, so the fields are not nested twice when
/// re-emitted. The plugin's timestamp is dropped: the re-emitted line has
/// the supervisor's, and the buffer keeps the line as printed.
pub fn parse_json_line(line: &str) -> Option<JsonLine> {
    if !line.starts_with('{') {
        return None;
    }
    let serde_json::Value::Object(mut top) = serde_json::from_str(line).ok()? else {
        return None;
    };
    let text = |v: Option<serde_json::Value>| match v {
        Some(serde_json::Value::String(s)) => Some(s),
        Some(other) => Some(other.to_string()),
        None => None,
    };
    let level = text(top.remove("level"))
        .unwrap_or_else(|| "info".to_string())
        .to_ascii_lowercase();
    let message = text(top.remove("message"))
        .or_else(|| text(top.remove("msg")))
        .unwrap_or_default();
    for key in ["timestamp", "time", "ts"] {
        top.remove(key);
    }
    let mut fields = serde_json::Map::new();
    let nested = match top.remove("fields") {
        Some(serde_json::Value::Object(nested)) => Some(nested),
        Some(other) => {
            fields.insert("fields".to_string(), other);
            None
        }
        None => None,
    };
    fields.extend(top);
    // The author's own fields win over same-named envelope keys.
    fields.extend(nested.into_iter().flatten());
    Some(JsonLine {
        level,
        message,
        fields,
    })
}

/// Re-emits one plugin line through tracing. A JSON object line keeps its
/// level and message, and its fields (flattened) as `fields`; anything else
/// is logged at info.
pub fn emit(plugin: &str, line: &LogLine) {
    let instance = line.instance.as_str();
    let stream = line.stream;
    let Some(json) = parse_json_line(&line.line) else {
        tracing::info!(plugin, instance, stream, "{}", line.line);
        return;
    };
    let message = json.message;
    let fields = serde_json::Value::Object(json.fields).to_string();
    match json.level.as_str() {
        "error" | "fatal" | "critical" => {
            tracing::error!(plugin, instance, stream, fields = %fields, "{message}")
        }
        "warn" | "warning" => {
            tracing::warn!(plugin, instance, stream, fields = %fields, "{message}")
        }
        "debug" => tracing::debug!(plugin, instance, stream, fields = %fields, "{message}"),
        "trace" => tracing::trace!(plugin, instance, stream, fields = %fields, "{message}"),
        _ => tracing::info!(plugin, instance, stream, fields = %fields, "{message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn splits_lines_and_caps_their_length() {
        let mut input = b"one\r\ntwo\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', MAX_LINE + 10));
        input.extend(b"\nlast");
        let mut r = LineReader::new(&input[..]);
        assert_eq!(r.next_line().await.as_deref(), Some("one"));
        assert_eq!(r.next_line().await.as_deref(), Some("two"));
        assert_eq!(r.next_line().await.map(|l| l.len()), Some(MAX_LINE));
        assert_eq!(r.next_line().await.map(|l| l.len()), Some(10));
        assert_eq!(r.next_line().await.as_deref(), Some("last"));
        assert_eq!(r.next_line().await, None);
    }

    fn line(i: usize) -> LogLine {
        LogLine {
            time: SystemTime::now(),
            instance: "x-0-1".into(),
            stream: "stdout",
            line: format!("line {i}"),
        }
    }

    #[test]
    fn the_bucket_lets_a_burst_through_then_the_rate() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(10, 5);
        let emitted = (0..20).filter(|_| bucket.admit(t0).emit).count();
        assert_eq!(emitted, 5);
        // 0.5 s later: 5 more tokens, and the drops are not reported yet.
        let later = t0 + Duration::from_millis(500);
        let first = bucket.admit(later);
        assert_eq!(
            first,
            Admission {
                emit: true,
                report_dropped: None
            }
        );
        let emitted = 1 + (0..20).filter(|_| bucket.admit(later).emit).count();
        assert_eq!(emitted, 5);
        // A second after the first drop: one report of all 15 + 16 dropped.
        let report = bucket.admit(t0 + DROP_REPORT_INTERVAL);
        assert_eq!(report.report_dropped, Some(31));
        assert_eq!(bucket.admit(t0 + DROP_REPORT_INTERVAL).report_dropped, None);
        assert_eq!(bucket.take_dropped(), None);
    }

    #[test]
    fn unreported_drops_are_taken_at_the_end() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(1, 1);
        assert!(bucket.admit(t0).emit);
        assert!(!bucket.admit(t0).emit);
        assert!(!bucket.admit(t0).emit);
        assert_eq!(bucket.take_dropped(), Some(2));
        assert_eq!(bucket.take_dropped(), None);
    }

    #[test]
    fn a_flood_is_kept_whole_but_logged_within_the_rate() {
        let events = capture::Events::default();
        let buf = LogBuffer::with_rate(10_000, 100, 10);
        let t0 = Instant::now();
        tracing::subscriber::with_default(events.clone(), || {
            for i in 0..5000 {
                buf.record_at("flood", line(i), t0);
            }
            buf.record_at("flood", line(5000), t0 + DROP_REPORT_INTERVAL);
            buf.finish("flood", "x-0-1");
        });
        assert_eq!(buf.tail(usize::MAX).len(), 5001, "every line is kept");
        let logged = events.take();
        let lines = logged
            .iter()
            .filter(|e| e.message.starts_with("line "))
            .count();
        assert_eq!(lines, 11, "the burst of 10, then one after refilling");
        let reports: Vec<_> = logged
            .iter()
            .filter(|e| e.message.contains("left out"))
            .collect();
        assert_eq!(reports.len(), 1, "{logged:#?}");
        assert!(
            reports[0].message.starts_with("4990 lines"),
            "{:?}",
            reports[0]
        );
        assert_eq!(
            reports[0].fields.get("dropped").map(String::as_str),
            Some("4990")
        );
    }

    #[test]
    fn json_lines_of_the_recommended_shape_are_flattened() {
        let line = r#"{"timestamp": "2026-11-22T03:26:12.200Z", "level": "WARN", "message": "initialized", "target": "python-echo", "fields": {"count": 0, "config": {"greeting": "hi"}}}"#;
        let parsed = parse_json_line(line).unwrap();
        assert_eq!(parsed.level, "warn");
        assert_eq!(parsed.message, "initialized");
        assert_eq!(
            serde_json::Value::Object(parsed.fields),
            serde_json::json!({"target": "python-echo", "count": 0, "config": {"greeting": "hi"}})
        );
        let flat = parse_json_line(r#"{"level":"error","msg":"boom","code":7}"#).unwrap();
        assert_eq!(flat.message, "boom");
        assert_eq!(
            serde_json::Value::Object(flat.fields),
            serde_json::json!({"code": 7})
        );
        assert!(parse_json_line("{not json").is_none());
        assert!(parse_json_line("[1]").is_none());

        let events = capture::Events::default();
        tracing::subscriber::with_default(events.clone(), || {
            emit(
                "echo",
                &LogLine {
                    line: line.to_string(),
                    ..line_0()
                },
            );
        });
        let logged = events.take();
        assert_eq!(logged.len(), 1);
        assert_eq!(logged[0].level, tracing::Level::WARN);
        assert_eq!(logged[0].message, "initialized");
        let fields: serde_json::Value = serde_json::from_str(&logged[0].fields["fields"]).unwrap();
        assert_eq!(fields["count"], 0, "{fields}");
        assert!(fields.get("fields").is_none(), "not nested twice: {fields}");
    }

    fn line_0() -> LogLine {
        line(0)
    }

    /// A tracing subscriber that records events, for asserting on what was
    /// logged.
    mod capture {
        use std::collections::BTreeMap;
        use std::sync::{Arc, Mutex};
        use tracing::field::{Field, Visit};

        #[derive(Debug)]
        pub struct Event {
            pub level: tracing::Level,
            pub message: String,
            pub fields: BTreeMap<String, String>,
        }

        #[derive(Clone, Default)]
        pub struct Events(Arc<Mutex<Vec<Event>>>);

        impl Events {
            pub fn take(&self) -> Vec<Event> {
                std::mem::take(&mut self.0.lock().unwrap())
            }
        }

        struct Fields(BTreeMap<String, String>);

        impl Visit for Fields {
            fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
                self.0
                    .insert(field.name().to_string(), format!("{value:?}"));
            }
            fn record_str(&mut self, field: &Field, value: &str) {
                self.0.insert(field.name().to_string(), value.to_string());
            }
        }

        impl tracing::Subscriber for Events {
            fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
                true
            }
            fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
                tracing::span::Id::from_u64(1)
            }
            fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
            fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
            fn event(&self, event: &tracing::Event<'_>) {
                let mut fields = Fields(BTreeMap::new());
                event.record(&mut fields);
                let message = fields.0.remove("message").unwrap_or_default();
                self.0.lock().unwrap().push(Event {
                    level: *event.metadata().level(),
                    message,
                    fields: fields.0,
                });
            }
            fn enter(&self, _: &tracing::span::Id) {}
            fn exit(&self, _: &tracing::span::Id) {}
        }
    }

    #[test]
    fn buffer_keeps_the_last_lines() {
        let buf = LogBuffer::new(3);
        for i in 0..5 {
            buf.push(LogLine {
                time: SystemTime::now(),
                instance: "x-0-1".into(),
                stream: "stdout",
                line: format!("line {i}"),
            });
        }
        let tail: Vec<_> = buf.tail(10).into_iter().map(|l| l.line).collect();
        assert_eq!(tail, vec!["line 2", "line 3", "line 4"]);
        assert_eq!(buf.tail(1)[0].line, "line 4");
    }
}
