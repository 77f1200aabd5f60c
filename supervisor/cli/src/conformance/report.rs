//! What `plugvisor conformance` reports: the protocol's rules, the verdict
//! on each, and the report as text (one line per rule) or JSON.

use plugvisor_proto::handshake::PROTOCOL_VERSION;
use serde_json::Value;
use std::path::PathBuf;

/// One rule of the protocol, in the order they are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    Cookie,
    Handshake,
    Initialize,
    Health,
    UnknownMethod,
    Handle,
    Stream,
    Session,
    State,
    Shutdown,
    Sigterm,
    ValidateConfig,
}

impl Rule {
    pub const ALL: [Rule; 12] = [
        Rule::Cookie,
        Rule::Handshake,
        Rule::Initialize,
        Rule::Health,
        Rule::UnknownMethod,
        Rule::Handle,
        Rule::Stream,
        Rule::Session,
        Rule::State,
        Rule::Shutdown,
        Rule::Sigterm,
        Rule::ValidateConfig,
    ];

    /// 1-based, as printed.
    pub fn number(self) -> usize {
        Rule::ALL.iter().position(|r| *r == self).unwrap_or(0) + 1
    }

    /// A stable short name, for scripts and `--json`.
    pub fn key(self) -> &'static str {
        match self {
            Rule::Cookie => "cookie",
            Rule::Handshake => "handshake",
            Rule::Initialize => "initialize",
            Rule::Health => "health",
            Rule::UnknownMethod => "unknown-method",
            Rule::Handle => "handle",
            Rule::Stream => "stream",
            Rule::Session => "session",
            Rule::State => "state",
            Rule::Shutdown => "shutdown",
            Rule::Sigterm => "sigterm",
            Rule::ValidateConfig => "validate",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Rule::Cookie => "refuses to run without the magic cookie",
            Rule::Handshake => "announces the assigned socket and serves it from the child",
            Rule::Initialize => "Initialize takes the config and lists the methods",
            Rule::Health => "HealthCheck answers SERVING within 1s",
            Rule::UnknownMethod => "unknown methods answer UNIMPLEMENTED",
            Rule::Handle => "Handle answers the first listed method",
            Rule::Stream => "HandleStream round trip on a declared stream method completes",
            Rule::Session => "Session answers each call by its id, and ends when its caller does",
            Rule::State => "ExportState survives a restore through Initialize",
            Rule::Shutdown => "Shutdown drains and exits 0 within its deadline",
            Rule::Sigterm => "SIGTERM makes it exit 0 within 5s",
            Rule::ValidateConfig => {
                "ValidateConfig (optional) answers in time, refuses only with a reason, applies nothing"
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail,
    /// Could not be checked: an earlier rule failed, or the plugin does not
    /// offer the optional feature the rule checks.
    Skip,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Pass => "PASS",
            Outcome::Fail => "FAIL",
            Outcome::Skip => "SKIP",
        }
    }
}

/// The verdict on one rule.
#[derive(Debug, Clone)]
pub struct Check {
    pub rule: Rule,
    pub outcome: Outcome,
    /// What was seen: the reason on failure or skip, evidence on a pass.
    pub detail: String,
    /// Worth fixing, but not a protocol violation.
    pub warnings: Vec<String>,
}

impl Check {
    pub(super) fn new(rule: Rule, outcome: Outcome, detail: impl Into<String>) -> Check {
        Check {
            rule,
            outcome,
            detail: detail.into(),
            warnings: Vec::new(),
        }
    }

    pub(super) fn pass(rule: Rule, detail: impl Into<String>) -> Check {
        Check::new(rule, Outcome::Pass, detail)
    }

    pub(super) fn fail(rule: Rule, detail: impl Into<String>) -> Check {
        Check::new(rule, Outcome::Fail, detail)
    }

    pub(super) fn skip(rule: Rule, detail: impl Into<String>) -> Check {
        Check::new(rule, Outcome::Skip, detail)
    }

    /// Pass with `notes` as evidence, or fail with `problems` as the reason.
    pub(super) fn verdict(rule: Rule, problems: Vec<String>, notes: Vec<String>) -> Check {
        if problems.is_empty() {
            Check::pass(rule, notes.join("; "))
        } else {
            Check::fail(rule, problems.join("; "))
        }
    }
}

/// Every rule's verdict on one plugin.
#[derive(Debug, Clone)]
pub struct Report {
    pub plugin: String,
    pub executable: PathBuf,
    pub args: Vec<String>,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn count(&self, outcome: Outcome) -> usize {
        self.checks.iter().filter(|c| c.outcome == outcome).count()
    }

    /// No rule failed (skips for optional features are fine).
    pub fn conforms(&self) -> bool {
        self.count(Outcome::Fail) == 0
    }

    /// 0 if the plugin conforms, 1 if any rule failed.
    pub fn exit_code(&self) -> i32 {
        if self.conforms() { 0 } else { 1 }
    }

    /// One line per rule (`PASS  1 cookie  <title>: <detail>`), then a summary.
    pub fn to_text(&self) -> String {
        let mut command = self.executable.display().to_string();
        for arg in &self.args {
            command.push(' ');
            command.push_str(arg);
        }
        let mut out = format!("plugvisor conformance: {} ({command})\n", self.plugin);
        for c in &self.checks {
            let mut text = c.rule.title().to_string();
            if !c.detail.is_empty() {
                text.push_str(": ");
                text.push_str(&c.detail);
            }
            out.push_str(&format!(
                "{} {:>2} {:<14} {text}\n",
                c.outcome.label(),
                c.rule.number(),
                c.rule.key()
            ));
            for w in &c.warnings {
                out.push_str(&format!("{:23}warning: {w}\n", ""));
            }
        }
        let counts = format!(
            "{} passed, {} failed, {} skipped",
            self.count(Outcome::Pass),
            self.count(Outcome::Fail),
            self.count(Outcome::Skip)
        );
        if self.conforms() {
            out.push_str(&format!(
                "{counts}: {} conforms to plugvisor protocol {PROTOCOL_VERSION}\n",
                self.plugin
            ));
        } else {
            let failed: Vec<String> = self
                .checks
                .iter()
                .filter(|c| c.outcome == Outcome::Fail)
                .map(|c| format!("{} {}", c.rule.number(), c.rule.key()))
                .collect();
            out.push_str(&format!(
                "{counts}: {} does not conform (failed: {})\n",
                self.plugin,
                failed.join(", ")
            ));
        }
        out
    }

    pub fn to_json(&self) -> Value {
        let rules: Vec<Value> = self
            .checks
            .iter()
            .map(|c| {
                serde_json::json!({
                    "number": c.rule.number(),
                    "rule": c.rule.key(),
                    "title": c.rule.title(),
                    "outcome": c.outcome.label().to_ascii_lowercase(),
                    "detail": c.detail,
                    "warnings": c.warnings,
                })
            })
            .collect();
        serde_json::json!({
            "plugin": self.plugin,
            "executable": self.executable,
            "args": self.args,
            "protocol_version": PROTOCOL_VERSION,
            "conforms": self.conforms(),
            "passed": self.count(Outcome::Pass),
            "failed": self.count(Outcome::Fail),
            "skipped": self.count(Outcome::Skip),
            "rules": rules,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_are_numbered_in_order_with_unique_keys() {
        let numbers: Vec<usize> = Rule::ALL.iter().map(|r| r.number()).collect();
        assert_eq!(numbers, (1..=12).collect::<Vec<_>>());
        let mut keys: Vec<&str> = Rule::ALL.iter().map(|r| r.key()).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), 12);
        assert!(Rule::ALL.iter().all(|r| !r.title().contains(": ")));
    }

    fn report(outcomes: &[Outcome]) -> Report {
        Report {
            plugin: "demo".into(),
            executable: "/bin/demo".into(),
            args: vec!["--x".into()],
            checks: Rule::ALL
                .iter()
                .zip(outcomes)
                .map(|(rule, outcome)| Check::new(*rule, *outcome, "why"))
                .collect(),
        }
    }

    #[test]
    fn report_prints_one_line_per_rule_and_a_summary() {
        let mut outcomes = [Outcome::Pass; 10];
        outcomes[6] = Outcome::Skip;
        let ok = report(&outcomes);
        let text = ok.to_text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "plugvisor conformance: demo (/bin/demo --x)");
        assert_eq!(
            lines[1],
            "PASS  1 cookie         refuses to run without the magic cookie: why"
        );
        assert!(lines[7].starts_with("SKIP  7 stream "), "{}", lines[7]);
        assert_eq!(
            lines[11],
            "9 passed, 0 failed, 1 skipped: demo conforms to plugvisor protocol 1"
        );
        assert_eq!(ok.exit_code(), 0);

        outcomes[4] = Outcome::Fail;
        let bad = report(&outcomes);
        assert!(
            bad.to_text()
                .ends_with("does not conform (failed: 5 unknown-method)\n")
        );
        assert_eq!(bad.exit_code(), 1);
        let json = bad.to_json();
        assert_eq!(json["conforms"], false);
        assert_eq!(json["rules"][4]["outcome"], "fail");
        assert_eq!(json["rules"][4]["rule"], "unknown-method");
    }
}
