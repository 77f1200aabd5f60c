//! What the CLI shows while it works, and in colour where a person reads it.
//!
//! - Live steps: `stop`, `restart [--upgrade]` and `reload` answer only
//!   when done, so [`with_steps`] follows the daemon's event stream while
//!   the command runs and prints each transition as a step line (on stderr,
//!   so stdout keeps just the result).
//! - Colour: state and level colours on a terminal, never when the output is
//!   piped or `NO_COLOR` is set (<https://no-color.org>).

use plugvisor_proto as pb;
use std::future::Future;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long to keep reading steps after the command answered: events are
/// sent before the answer, but travel on another stream.
const SETTLE: Duration = Duration::from_millis(150);

/// Whether to colour what goes to a stream that `is_terminal` or not.
pub fn color_enabled(is_terminal: bool) -> bool {
    is_terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Colour for stdout (`events`, `logs`).
pub fn stdout_color() -> bool {
    color_enabled(std::io::stdout().is_terminal())
}

/// The SGR colour of a plugin state.
pub fn state_sgr(state: &str) -> &'static str {
    match state {
        "ready" => "32",
        "degraded" => "33",
        "starting" | "initializing" => "36",
        "backoff" | "stopping" => "35",
        "failed" => "1;31",
        _ => "2",
    }
}

/// The SGR colour of a log level found in a line: `Some(None)` for a level
/// shown plain (INFO), `None` when the line names no level.
pub fn level_sgr(line: &str) -> Option<Option<&'static str>> {
    let upper = line.to_ascii_uppercase();
    let has = |level: &str| {
        upper.contains(&format!("\"LEVEL\":\"{level}\""))
            || upper
                .split(|c: char| !c.is_ascii_alphanumeric())
                .any(|word| word == level)
    };
    if has("ERROR") || has("FATAL") || has("PANIC") {
        Some(Some("31"))
    } else if has("WARN") || has("WARNING") {
        Some(Some("33"))
    } else if has("DEBUG") || has("TRACE") {
        Some(Some("2"))
    } else if has("INFO") {
        Some(None)
    } else {
        None
    }
}

/// `text` in colour `sgr` when `color`, else as is.
pub fn paint(text: &str, sgr: &str, color: bool) -> String {
    if color {
        format!("\x1b[{sgr}m{text}\x1b[0m")
    } else {
        text.to_string()
    }
}

/// `HH:MM:SS.mmm` (UTC) of a Unix time in milliseconds.
pub fn clock(time_ms: u64) -> String {
    let secs = time_ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02}.{:03}", time_ms % 1000)
}

/// The `events` line, its state coloured when `color`.
pub fn event_line(e: &pb::Event, color: bool) -> String {
    let state = paint(&format!("{:<13}", e.state), state_sgr(&e.state), color);
    format!("{} {:<12} {state} {}", clock(e.time_ms), e.plugin, e.reason)
}

/// The `logs` line, coloured by the level it names (stderr lines without
/// one in yellow) when `color`.
pub fn log_line(l: &pb::LogLine, color: bool) -> String {
    let text = format!("{} {} {}", l.instance, l.stream, l.line);
    let sgr = level_sgr(&l.line).unwrap_or((l.stream == "stderr").then_some("33"));
    match sgr {
        Some(sgr) => paint(&text, sgr, color),
        None => text,
    }
}

/// One step of a command in progress.
pub fn step_line(e: &pb::Event, color: bool) -> String {
    let state = paint(&format!("{:<12}", e.state), state_sgr(&e.state), color);
    let who = if e.instance.is_empty() {
        &e.plugin
    } else {
        &e.instance
    };
    format!("  {} {who:<14} {state} {}", clock(e.time_ms), e.reason)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs `command` while printing, to stderr, every transition of `plugin`
/// (every plugin when `None`) that happens meanwhile. If the event stream
/// cannot be opened the command runs without steps: they are a courtesy,
/// the command's own answer is what counts.
pub async fn with_steps<T>(
    control: &Path,
    plugin: Option<&str>,
    command: impl Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    let color = color_enabled(std::io::stderr().is_terminal());
    let since = now_ms();
    let stream = async {
        let mut client = crate::control::connect(control).await.ok()?;
        let request = pb::EventsRequest {
            plugin: plugin.unwrap_or_default().to_string(),
            follow: true,
        };
        client
            .events(request)
            .await
            .ok()
            .map(tonic::Response::into_inner)
    }
    .await;
    let Some(mut events) = stream else {
        return command.await;
    };
    let print = |e: &pb::Event| {
        // History comes first on the stream; only what happens from now on
        // is a step.
        if e.time_ms >= since {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "{}", step_line(e, color));
            let _ = err.flush();
        }
    };
    tokio::pin!(command);
    let result = loop {
        tokio::select! {
            result = &mut command => break result,
            event = events.message() => match event {
                Ok(Some(e)) => print(&e),
                // The stream ended or broke: finish without steps.
                _ => return command.await,
            },
        }
    };
    // Events still on their way: read until the stream is quiet.
    while let Ok(Ok(Some(e))) = tokio::time::timeout(SETTLE, events.message()).await {
        print(&e);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal() {
        let e = pb::Event {
            time_ms: 3_723_004,
            plugin: "echo".into(),
            instance: "echo-0".into(),
            state: "failed".into(),
            reason: "gave up".into(),
            ..Default::default()
        };
        let plain = event_line(&e, false);
        assert_eq!(plain, "01:02:03.004 echo         failed        gave up");
        assert!(event_line(&e, true).contains("\x1b[1;31mfailed"));
        assert!(!step_line(&e, false).contains('\x1b'));
    }

    #[test]
    fn finds_levels_in_text_and_json_lines() {
        assert_eq!(level_sgr("2024 ERROR db down"), Some(Some("31")));
        assert_eq!(level_sgr(r#"{"level":"warn","msg":"x"}"#), Some(Some("33")));
        assert_eq!(level_sgr(r#"{"level":"INFO","msg":"x"}"#), Some(None));
        assert_eq!(level_sgr("all good"), None);
        assert_eq!(level_sgr("terrorism is not a level"), None);
        let line = |stream: &str, text: &str| pb::LogLine {
            stream: stream.into(),
            line: text.into(),
            ..Default::default()
        };
        assert!(log_line(&line("stderr", "oops"), true).starts_with("\x1b[33m"));
        assert!(!log_line(&line("stderr", "level=info ok"), true).contains('\x1b'));
        assert!(!log_line(&line("stderr", "oops"), false).contains('\x1b'));
    }
}
