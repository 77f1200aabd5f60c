//! Plugin output: each stdout/stderr line of a child is re-emitted through
//! `tracing` with the plugin and instance as fields, and kept in a bounded
//! per-plugin buffer. Lines are read with a cap on their length, so a plugin
//! that floods or never ends a line costs bounded memory.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::SystemTime;
use tokio::io::AsyncReadExt;

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
}

impl LogBuffer {
    pub fn new(capacity: usize) -> Self {
        LogBuffer {
            capacity,
            lines: Mutex::new(VecDeque::with_capacity(capacity.min(1024))),
            follow: tokio::sync::broadcast::channel(1024).0,
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

/// Re-emits one plugin line through tracing. A JSON object line keeps its
/// level and message; anything else is logged at info.
pub fn emit(plugin: &str, line: &LogLine) {
    let instance = line.instance.as_str();
    let stream = line.stream;
    if line.line.starts_with('{')
        && let Ok(serde_json::Value::Object(fields)) = serde_json::from_str(&line.line)
    {
        let level = fields
            .get("level")
            .and_then(|v| v.as_str())
            .unwrap_or("info")
            .to_ascii_lowercase();
        let message = fields
            .get("message")
            .or_else(|| fields.get("msg"))
            .and_then(|v| v.as_str())
            .unwrap_or("");
        let mut rest = fields.clone();
        rest.remove("level");
        rest.remove("message");
        rest.remove("msg");
        let rest = serde_json::Value::Object(rest).to_string();
        match level.as_str() {
            "error" | "fatal" | "critical" => {
                tracing::error!(plugin, instance, stream, fields = %rest, "{message}")
            }
            "warn" | "warning" => {
                tracing::warn!(plugin, instance, stream, fields = %rest, "{message}")
            }
            "debug" => tracing::debug!(plugin, instance, stream, fields = %rest, "{message}"),
            "trace" => tracing::trace!(plugin, instance, stream, fields = %rest, "{message}"),
            _ => tracing::info!(plugin, instance, stream, fields = %rest, "{message}"),
        }
        return;
    }
    tracing::info!(plugin, instance, stream, "{}", line.line);
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
