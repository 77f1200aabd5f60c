//! `plugvisor conformance` against real plugins: the examples pass, and each
//! deliberately broken `testplugin` variant fails exactly the rule it breaks.

use plugvisor_integration_tests::{Sandbox, bin};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The rule keys, in order, as the report prints them.
const RULES: [&str; 12] = [
    "cookie",
    "handshake",
    "initialize",
    "health",
    "unknown-method",
    "handle",
    "stream",
    "session",
    "state",
    "shutdown",
    "sigterm",
    "validate",
];

/// A finished `plugvisor conformance` run.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The report line of rule `key`, e.g. `FAIL  5 unknown-method ...`.
    fn line(&self, key: &str) -> &str {
        self.stdout
            .lines()
            .find(|l| l.split_whitespace().nth(2) == Some(key))
            .unwrap_or_else(|| panic!("no line for rule `{key}` in:\n{self}"))
    }

    fn outcome(&self, key: &str) -> &str {
        &self.line(key)[..4]
    }

    /// Asserts the exit code and that exactly the rules in `failing` FAIL and
    /// those in `skipped` SKIP; every other rule must PASS.
    fn expect(&self, code: i32, failing: &[&str], skipped: &[&str]) {
        assert_eq!(self.code, code, "exit code\n{self}");
        for key in RULES {
            let want = if failing.contains(&key) {
                "FAIL"
            } else if skipped.contains(&key) {
                "SKIP"
            } else {
                "PASS"
            };
            assert_eq!(self.outcome(key), want, "rule `{key}`\n{self}");
        }
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

fn conformance(target: &Path, extra: &[&str]) -> Run {
    let out = Command::new(bin("plugvisor"))
        .arg("conformance")
        .arg(target)
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("plugvisor runs");
    Run {
        code: out.status.code().expect("exited, not killed"),
        stdout: String::from_utf8(out.stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs conformance on `testplugin` with `args` (YAML list items).
fn testplugin(sandbox: &Sandbox, args: &str, extra: &[&str]) -> Run {
    let manifest = sandbox.plugin("tp", &bin("testplugin"), &format!("args: [{args}]"));
    conformance(&manifest, extra)
}

#[test]
fn echo_example_conforms() {
    let run = conformance(&bin("echo-plugin"), &[]);
    run.expect(0, &[], &[]);
    assert!(
        run.stdout
            .starts_with("plugvisor conformance: echo-plugin (")
    );
    assert!(
        run.line("initialize")
            .contains("config delivery checked only by Initialize succeeding"),
        "{run}"
    );
    assert!(
        run.line("health").contains("grpc.health.v1 Check: SERVING"),
        "{run}"
    );
    assert!(run.stdout.ends_with(
        "12 passed, 0 failed, 0 skipped: echo-plugin conforms to plugvisor protocol 1\n"
    ));
}

#[test]
fn kv_example_conforms_without_streaming() {
    let sandbox = Sandbox::new();
    let manifest = sandbox.plugin("kv", &bin("kv-plugin"), "");
    let run = conformance(&manifest, &[]);
    run.expect(0, &[], &["stream"]);
    assert!(
        run.line("stream").contains("plugin does not stream"),
        "{run}"
    );
    // The probe `set` changed the store, so the restore is really checked.
    assert!(
        run.line("state").contains(r#"exports it unchanged"#),
        "{run}"
    );
}

#[test]
fn well_behaved_testplugin_conforms_and_echoes_the_config_token() {
    let run = testplugin(&Sandbox::new(), "", &["--config", r#"{"extra": 1}"#]);
    run.expect(0, &[], &[]);
    assert!(
        run.line("initialize")
            .contains("`config` method returned the token"),
        "{run}"
    );
    let validate = run.line("validate");
    assert!(
        validate.contains("accepted the config it runs with; accepted a changed config"),
        "{run}"
    );
    assert!(
        validate.contains("its `config` method still returns the running config"),
        "{run}"
    );
}

#[test]
fn refusing_the_running_config_with_a_reason_passes_rule_12_with_a_warning() {
    let run = testplugin(
        &Sandbox::new(),
        "",
        &["--config", r#"{"refuse": "not on this host"}"#],
    );
    run.expect(0, &[], &[]);
    assert!(
        run.line("validate")
            .contains("refused the config it runs with: `refuse` is set: \"not on this host\""),
        "{run}"
    );
    assert!(
        run.stdout
            .contains("warning: it refuses the config Initialize accepted"),
        "{run}"
    );
}

#[test]
fn a_hanging_validate_config_fails_rule_12() {
    let run = testplugin(&Sandbox::new(), "--validate-hang", &["--timeout", "2s"]);
    run.expect(1, &["validate"], &[]);
    assert!(
        run.line("validate")
            .contains("ValidateConfig of the config it runs with: no answer within 2000ms"),
        "{run}"
    );
}

#[test]
fn a_refusal_without_a_reason_fails_rule_12() {
    let run = testplugin(&Sandbox::new(), "--validate-silent", &[]);
    run.expect(1, &["validate"], &[]);
    assert!(
        run.line("validate")
            .contains("refused the config it runs with without a reason"),
        "{run}"
    );
}

#[test]
fn json_report_lists_every_rule() {
    let run = conformance(&bin("echo-plugin"), &["--json"]);
    assert_eq!(run.code, 0, "{run}");
    let report: serde_json::Value = serde_json::from_str(&run.stdout).expect("JSON");
    assert_eq!(report["conforms"], true);
    assert_eq!(report["passed"], 12);
    let keys: Vec<&str> = report["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .map(|r| r["rule"].as_str().expect("key"))
        .collect();
    assert_eq!(keys, RULES);
}

#[test]
fn serving_without_the_cookie_fails_rule_1() {
    let run = testplugin(&Sandbox::new(), "--ignore-cookie", &[]);
    run.expect(1, &["cookie"], &[]);
    let line = run.line("cookie");
    assert!(line.contains("was still running"), "{line}");
    assert!(line.contains("printed a handshake line"), "{line}");
    assert!(line.contains("created the socket"), "{line}");
}

#[test]
fn a_wrong_path_fails_the_handshake_and_skips_the_rest() {
    let run = testplugin(&Sandbox::new(), "--wrong-path", &[]);
    run.expect(1, &["handshake"], &RULES[2..]);
    assert!(
        run.line("handshake")
            .contains(".wrong, but the plugin was told to listen on"),
        "{run}"
    );
    assert!(
        run.line("sigterm")
            .contains("the plugin did not start (rule 2)")
    );
}

#[test]
fn a_bad_version_fails_the_handshake() {
    let run = testplugin(&Sandbox::new(), "--bad-version", &[]);
    run.expect(1, &["handshake"], &RULES[2..]);
    assert!(
        run.line("handshake")
            .contains("announces protocol version 99"),
        "{run}"
    );
}

#[test]
fn no_handshake_fails_within_the_timeout() {
    let run = testplugin(&Sandbox::new(), "--no-handshake", &["--timeout", "1s"]);
    run.expect(1, &["handshake"], &RULES[2..]);
    assert!(
        run.line("handshake").contains("no handshake within 1000ms"),
        "{run}"
    );
}

#[test]
fn a_failing_initialize_fails_rule_3_and_skips_what_needs_it() {
    let run = testplugin(&Sandbox::new(), "--init-fail", &[]);
    run.expect(1, &["initialize"], &[&RULES[3..10], &["validate"]].concat());
    assert!(
        run.line("initialize").contains("FailedPrecondition"),
        "{run}"
    );
}

#[test]
fn not_serving_fails_rule_4() {
    let run = testplugin(&Sandbox::new(), "--not-serving", &[]);
    run.expect(1, &["health"], &[]);
    assert!(
        run.line("health")
            .contains("HealthCheck answered NOT_SERVING (started with --not-serving)"),
        "{run}"
    );
}

#[test]
fn answering_unknown_methods_fails_rule_5() {
    let run = testplugin(&Sandbox::new(), "--unknown-ok", &[]);
    // The session rule sends an unknown method too.
    run.expect(1, &["unknown-method", "session"], &[]);
    assert!(
        run.line("unknown-method")
            .contains("`plugvisor.conformance.no-such-method` answered OK; expected UNIMPLEMENTED"),
        "{run}"
    );
}

#[test]
fn a_listed_but_unserved_method_fails_rule_6() {
    let run = testplugin(&Sandbox::new(), "--phantom-method", &[]);
    // The session rule calls the first listed method too.
    run.expect(1, &["handle", "session"], &[]);
    assert!(
        run.line("handle")
            .contains("`phantom` is listed in Initialize's methods but answered UNIMPLEMENTED"),
        "{run}"
    );
}

#[test]
fn a_failing_stream_fails_rule_7_and_no_stream_skips_it() {
    let sandbox = Sandbox::new();
    let run = testplugin(&sandbox, "--stream-fail", &[]);
    run.expect(1, &["stream"], &[]);
    assert!(run.line("stream").contains("INTERNAL"), "{run}");

    let run = testplugin(&sandbox, "--no-stream", &[]);
    run.expect(0, &[], &["stream"]);
    assert!(
        run.line("stream")
            .contains("plugin does not stream: Initialize's stream_methods is empty"),
        "{run}"
    );
}

#[test]
fn a_declared_stream_method_that_is_unimplemented_fails_rule_7() {
    let run = testplugin(&Sandbox::new(), "--no-stream, --claim-stream", &[]);
    run.expect(1, &["stream"], &[]);
    assert!(
        run.line("stream")
            .contains("`echo` is declared in Initialize's stream_methods, but HandleStream answered UNIMPLEMENTED"),
        "{run}"
    );
}

#[test]
fn forgetting_restored_state_fails_rule_9() {
    let run = testplugin(&Sandbox::new(), "--forget-state", &[]);
    run.expect(1, &["state"], &[]);
    assert!(
        run.line("state").contains("the restored instance exports"),
        "{run}"
    );
}

#[test]
fn ignoring_shutdown_fails_rule_10() {
    let run = testplugin(&Sandbox::new(), "--ignore-shutdown", &[]);
    run.expect(1, &["shutdown"], &[]);
    assert!(
        run.line("shutdown")
            .contains("still running 3000ms after Shutdown(deadline 2000ms) (killed)"),
        "{run}"
    );
}

#[test]
fn ignoring_sigterm_fails_rules_9_and_10() {
    let run = testplugin(&Sandbox::new(), "--ignore-sigterm", &[]);
    run.expect(1, &["shutdown", "sigterm"], &[]);
    assert!(
        run.line("sigterm")
            .contains("still running 5s after SIGTERM (killed)"),
        "{run}"
    );
}

#[test]
fn usage_errors_exit_2() {
    let missing = PathBuf::from("/nonexistent/plugin.yaml");
    let run = conformance(&missing, &[]);
    assert_eq!(run.code, 2, "{run}");
    assert!(run.stderr.contains("/nonexistent/plugin.yaml"), "{run}");

    let run = conformance(&bin("echo-plugin"), &["--config", "[1]"]);
    assert_eq!(run.code, 2, "{run}");
    assert!(
        run.stderr.contains("--config must be a JSON object"),
        "{run}"
    );
}

#[test]
fn python_example_conforms() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root");
    let launcher = repo.join("examples/python-echo/python-echo");
    if !repo.join(".venv/bin/python3").exists() || !launcher.exists() {
        plugvisor_integration_tests::skip("python venv missing (run scripts/setup-python.sh)");
        return;
    }
    let run = conformance(&launcher, &[]);
    // grpcio plugins do not offer sessions: that optional rule is skipped.
    run.expect(0, &[], &["session"]);
    assert!(run.line("state").contains("exports it unchanged"), "{run}");
}
