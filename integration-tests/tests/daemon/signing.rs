//! Signed plugins through the real daemon and CLI: keys made by `plugvisor
//! keygen`, plugins signed by `plugvisor sign`, trusted keys in the config.
//! A signed plugin runs and shows who signed it (`ps --json`, `inspect`,
//! `health`, metrics); unsigned, tampered or strangers' plugins are refused
//! naming the file.

use plugvisor_integration_tests::{Daemon, Sandbox, bin, wait_until_blocking};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const SECS_15: Duration = Duration::from_secs(15);

fn plugvisor(args: &[&str]) -> String {
    let out = Command::new(bin("plugvisor"))
        .args(args)
        .output()
        .expect("the CLI runs");
    assert!(
        out.status.success(),
        "plugvisor {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// A plugin directory whose executable is a launcher script inside it
/// (so a signature can cover it) that runs the echo plugin.
fn launcher_plugin(sandbox: &Sandbox, name: &str) -> PathBuf {
    let dir = sandbox.plugins_dir().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let run = dir.join("run.sh");
    std::fs::write(
        &run,
        format!("#!/bin/sh\nexec {} \"$@\"\n", bin("echo-plugin").display()),
    )
    .unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(
        dir.join("plugin.yaml"),
        format!("name: {name}\nversion: 1.4.0\nexec: ./run.sh\n"),
    )
    .unwrap();
    dir
}

fn sign(dir: &Path, key: &Path) {
    let out = plugvisor(&[
        "sign",
        "--key",
        key.to_str().unwrap(),
        dir.to_str().unwrap(),
    ]);
    assert!(out.contains("signed"), "{out}");
}

fn keygen(prefix: &Path) -> String {
    let out = plugvisor(&["keygen", "--out", prefix.to_str().unwrap()]);
    // `      key: RW...`: the line to paste into trusted_keys.
    out.lines()
        .find_map(|l| l.trim().strip_prefix("key: "))
        .unwrap_or_else(|| panic!("keygen prints the public key: {out}"))
        .to_string()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn metrics(address: &str) -> String {
    let mut s = std::net::TcpStream::connect(address).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

fn wait_failed(daemon: &Daemon, name: &str) -> String {
    let mut reason = String::new();
    wait_until_blocking(SECS_15, &format!("{name} refused"), || {
        let row = daemon.plugin(name);
        reason = row["reason"].as_str().unwrap_or_default().to_string();
        row["state"] == "failed"
    });
    reason
}

#[test]
fn signed_plugins_run_showing_their_signer_and_the_rest_are_refused_naming_the_file() {
    let sandbox = Sandbox::new();
    let keys = sandbox.dir.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let public = keygen(&keys.join("release"));
    keygen(&keys.join("stranger"));
    let secret = keys.join("release.key");
    assert_eq!(
        std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777,
        0o600,
        "the secret key is private"
    );

    let good = launcher_plugin(&sandbox, "good");
    sign(&good, &secret);
    launcher_plugin(&sandbox, "unsigned");
    let tampered = launcher_plugin(&sandbox, "tampered");
    sign(&tampered, &secret);
    std::fs::write(
        tampered.join("plugin.yaml"),
        "name: tampered\nversion: 1.4.0\nexec: ./run.sh\nargs: [--evil]\n",
    )
    .unwrap();
    let swapped = launcher_plugin(&sandbox, "swapped");
    sign(&swapped, &secret);
    let mut run = std::fs::OpenOptions::new()
        .append(true)
        .open(swapped.join("run.sh"))
        .unwrap();
    writeln!(run, "# changed").unwrap();
    let stranger = launcher_plugin(&sandbox, "stranger");
    sign(&stranger, &keys.join("stranger.key"));

    let config = sandbox.dir.path().join("plugvisor.yaml");
    std::fs::write(
        &config,
        "require_signatures: true\ntrusted_keys:\n  - name: release\n    key_file: keys/release.pub\n",
    )
    .unwrap();
    // The same key listed twice is a config error naming both entries.
    let twice = sandbox.dir.path().join("twice.yaml");
    std::fs::write(
        &twice,
        format!(
            "trusted_keys:\n  - name: release\n    key_file: keys/release.pub\n  - name: ops\n    key: {public}\n"
        ),
    )
    .unwrap();
    let out = Command::new(bin("plugvisor"))
        .args(["check", "--config", twice.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("trusted_keys[1] (ops)") && err.contains("`release`"),
        "{err}"
    );

    // `check` finds every problem offline, naming the file.
    let check = Command::new(bin("plugvisor"))
        .args([
            "check",
            "--config",
            config.to_str().unwrap(),
            "--plugins-dir",
        ])
        .arg(sandbox.plugins_dir())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(1), "{report}");
    assert!(report.contains("ok    good 1.4.0"), "{report}");
    assert!(report.contains("unsigned is unsigned"), "{report}");

    let address = format!("127.0.0.1:{}", free_port());
    let daemon = Daemon::start(
        &sandbox,
        &[
            "--config",
            config.to_str().unwrap(),
            "--metrics-address",
            &address,
        ],
    );
    let row = daemon.wait_ready("good");
    assert_eq!(row["signer"]["name"], "release", "{row}");
    let key_id = row["signer"]["key_id"].as_str().unwrap().to_string();
    assert_eq!(key_id.len(), 16, "{row}");
    assert!(
        row["signer"]["comment"]
            .as_str()
            .unwrap()
            .starts_with("plugin good 1.4.0 signed at"),
        "{row}"
    );
    // What runs: the sealed copy of the signed launcher.
    let digest = plugvisor::isolation::pin::sha256_file(&good.join("run.sh")).unwrap();
    assert_eq!(row["sha256"], digest.as_str(), "{row}");
    assert_eq!(row["sha256_sealed"], true, "{row}");
    assert_eq!(
        daemon
            .cli_ok(&["call", "good", "upper", "--data", "hi"])
            .trim(),
        "HI"
    );
    let inspect = daemon.cli_ok(&["inspect", "good"]);
    assert!(
        inspect.contains(&format!("signed by:  release (key {key_id}")),
        "{inspect}"
    );
    assert!(
        inspect.contains(&format!(
            "sha256:     {digest} (of the sealed bytes executed)"
        )),
        "{inspect}"
    );
    let health: serde_json::Value =
        serde_json::from_str(&daemon.cli_ok(&["health", "good", "--json"])).unwrap();
    assert_eq!(health["status"], "SERVING");
    assert_eq!(health["version"], "1.4.0");
    assert_eq!(health["sha256"], digest.as_str());
    assert_eq!(health["signer"]["name"], "release");
    assert_eq!(
        daemon.cli_ok(&["health", "good"]),
        format!(
            "good: SERVING (version 1.4.0, sha256 {}, signed by release)\n",
            &digest[..12]
        )
    );
    let text = metrics(&address);
    assert!(
        text.contains(&format!(
            "plugvisor_plugin_info{{plugin=\"good\",version=\"1.4.0\",sha256=\"{digest}\""
        )) && text.contains("signer=\"release\"} 1"),
        "{text}"
    );

    let unsigned = wait_failed(&daemon, "unsigned");
    assert!(
        unsigned.contains("unsigned is unsigned")
            && unsigned.contains("plugins/unsigned/plugin.sums.minisig not found")
            && unsigned.contains("require_signatures: true"),
        "{unsigned}"
    );
    let tampered = wait_failed(&daemon, "tampered");
    assert!(
        tampered.contains("plugins/tampered/plugin.yaml changed after signing"),
        "{tampered}"
    );
    let swapped = wait_failed(&daemon, "swapped");
    assert!(
        swapped.contains("plugins/swapped/run.sh changed after signing"),
        "{swapped}"
    );
    let stranger = wait_failed(&daemon, "stranger");
    assert!(
        stranger.contains("plugins/stranger/plugin.sums.minisig is signed by key")
            && stranger.contains("not among the supervisor config's trusted_keys"),
        "{stranger}"
    );
    for name in ["unsigned", "tampered", "swapped", "stranger"] {
        assert_eq!(
            daemon.plugin(name)["pid"],
            serde_json::Value::Null,
            "{name} never ran"
        );
    }
}

#[test]
fn without_require_unsigned_plugins_run_but_a_bad_signature_is_still_refused() {
    let sandbox = Sandbox::new();
    let prefix = sandbox.dir.path().join("release");
    let public = keygen(&prefix);
    launcher_plugin(&sandbox, "plain");
    let tampered = launcher_plugin(&sandbox, "tampered");
    sign(&tampered, &sandbox.dir.path().join("release.key"));
    std::fs::write(tampered.join("run.sh"), "#!/bin/sh\nexit 3\n").unwrap();
    let config = sandbox.dir.path().join("plugvisor.yaml");
    std::fs::write(
        &config,
        format!("trusted_keys:\n  - name: release\n    key: {public}\n"),
    )
    .unwrap();
    let daemon = Daemon::start(&sandbox, &["--config", config.to_str().unwrap()]);
    let row = daemon.wait_ready("plain");
    assert_eq!(row["signer"], serde_json::Value::Null, "{row}");
    // Unsigned and unpinned: the digest of the file as opened at start.
    let digest =
        plugvisor::isolation::pin::sha256_file(&sandbox.plugins_dir().join("plain/run.sh"))
            .unwrap();
    assert_eq!(row["sha256"], digest.as_str(), "{row}");
    assert_eq!(row["sha256_sealed"], false, "{row}");
    let reason = wait_failed(&daemon, "tampered");
    assert!(
        reason.contains("plugins/tampered/run.sh changed after signing"),
        "{reason}"
    );
}

#[test]
fn a_reload_applies_new_trusted_keys_flags_what_runs_and_refuses_it_at_its_next_start() {
    let sandbox = Sandbox::new();
    let keys = sandbox.dir.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    keygen(&keys.join("release"));
    keygen(&keys.join("next"));
    let signed = launcher_plugin(&sandbox, "signed");
    sign(&signed, &keys.join("release.key"));
    launcher_plugin(&sandbox, "plain");
    let later = launcher_plugin(&sandbox, "later");
    sign(&later, &keys.join("next.key"));
    let config = sandbox.dir.path().join("plugvisor.yaml");
    std::fs::write(
        &config,
        "trusted_keys:\n  - name: release\n    key_file: keys/release.pub\n",
    )
    .unwrap();
    let daemon = Daemon::start(&sandbox, &["--config", config.to_str().unwrap()]);
    let signed_pid = daemon.wait_ready("signed")["pid"].as_i64().unwrap();
    let plain_pid = daemon.wait_ready("plain")["pid"].as_i64().unwrap();
    // Signed by a key not trusted yet.
    let reason = wait_failed(&daemon, "later");
    assert!(
        reason.contains("not among the supervisor config's trusted_keys"),
        "{reason}"
    );

    // Trust only `next`, and require signatures.
    std::fs::write(
        &config,
        "require_signatures: true\ntrusted_keys:\n  - name: next\n    key_file: keys/next.pub\n",
    )
    .unwrap();
    let out = daemon.cli(&["reload", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "flagged plugins: exit 1 {report}"
    );
    assert_eq!(
        report["settings_applied"],
        serde_json::json!(["trusted_keys", "require_signatures"]),
        "{report}"
    );
    assert_eq!(
        report["settings_need_restart"],
        serde_json::json!([]),
        "{report}"
    );
    let untrusted = report["untrusted"].as_array().unwrap();
    let why = |name: &str| {
        untrusted
            .iter()
            .find(|u| u["name"] == name)
            .and_then(|u| u["reason"].as_str())
            .unwrap_or_else(|| panic!("{name} is not flagged: {report}"))
            .to_string()
    };
    assert!(
        why("signed").contains("plugins/signed/plugin.sums.minisig is signed by key")
            && why("signed").contains("not among the supervisor config's trusted_keys (next "),
        "{report}"
    );
    assert!(
        why("plain").contains("plain is unsigned")
            && why("plain").contains("require_signatures: true"),
        "{report}"
    );
    assert_eq!(untrusted.len(), 2, "{report}");
    // They run on, flagged: in ps and as an event.
    for (name, pid) in [("signed", signed_pid), ("plain", plain_pid)] {
        let row = daemon.plugin(name);
        assert_eq!(row["state"], "ready", "{row}");
        assert_eq!(row["pid"].as_i64(), Some(pid), "{row}");
        assert!(
            row["reason"]
                .as_str()
                .unwrap()
                .contains("no longer passes the reloaded trusted_keys/require_signatures"),
            "{row}"
        );
    }
    let events = daemon.cli_ok(&["events", "plain", "--json"]);
    assert!(events.contains("its next start is refused"), "{events}");

    // New starts check the new keys: `later` runs now, `plain` is refused.
    daemon.cli_ok(&["restart", "later"]);
    let row = daemon.wait_ready("later");
    assert_eq!(row["signer"]["name"], "next", "{row}");
    let _ = daemon.cli(&["restart", "plain"]);
    let reason = wait_failed(&daemon, "plain");
    assert!(reason.contains("plain is unsigned"), "{reason}");

    // Nothing changed: nothing applied or flagged again.
    let out = daemon.cli(&["reload", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["settings_applied"],
        serde_json::json!([]),
        "{report}"
    );
    assert_eq!(report["untrusted"], serde_json::json!([]), "{report}");
}
