//! Remote plugins end to end on loopback: a Rust plugin serving TCP +
//! mutual TLS is called through the daemon, killed and restarted (the
//! daemon reconnects with backoff), and refused for each kind of bad
//! certificate; a plugin that registers itself joins, answers, stops
//! heartbeating, is marked unavailable, then removed.

use plugvisor_integration_tests::tls::{Issued, Pki};
use plugvisor_integration_tests::{Daemon, Sandbox, bin, wait_until_blocking};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const SECS_15: Duration = Duration::from_secs(15);

/// An SDK plugin serving TCP + mutual TLS, killed on drop.
struct RemotePlugin {
    child: Child,
    address: String,
    stderr: std::path::PathBuf,
}

impl RemotePlugin {
    fn start(
        dir: &Path,
        listen: &str,
        cert: &Issued,
        client_ca: &Path,
        env: &[(&str, &str)],
    ) -> Self {
        let stderr = dir.join(format!("plugin-{}.log", listen.replace(':', "_")));
        let mut command = Command::new(bin("echo-plugin"));
        command
            .env_clear()
            .env("PLUGVISOR_TLS_LISTEN", listen)
            .env("PLUGVISOR_TLS_CERT", &cert.cert)
            .env("PLUGVISOR_TLS_KEY", &cert.key)
            .env("PLUGVISOR_TLS_CLIENT_CA", client_ca)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap());
        let mut child = command.spawn().expect("the plugin starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let address = line
            .trim()
            .strip_prefix("plugvisor|1|tls|")
            .unwrap_or_else(|| panic!("a tls handshake line, got {line:?}"))
            .to_string();
        RemotePlugin {
            child,
            address,
            stderr,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for RemotePlugin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn remote_manifest(
    sandbox: &Sandbox,
    name: &str,
    address: &str,
    ca: &Path,
    client: &Issued,
    identity: &str,
) {
    let dir = sandbox.plugins_dir().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("plugin.yaml"),
        format!(
            "name: {name}\nversion: 1.0.0\nremote:\n  address: {address}\n  ca: {}\n  cert: {}\n  key: {}\n  identity: {identity}\n\
             restart: {{initial_backoff: 100ms, max_backoff: 400ms, max_restarts: 1000}}\n\
             health: {{interval: 200ms, timeout: 500ms}}\ntimeouts: {{start: 2s}}\n",
            ca.display(),
            client.cert.display(),
            client.key.display()
        ),
    )
    .unwrap();
}

/// Waits until `name`'s `ps` reason contains `needle`; returns the reason.
fn wait_reason(daemon: &Daemon, name: &str, needle: &str) -> String {
    let deadline = std::time::Instant::now() + SECS_15;
    loop {
        let p = daemon.plugin(name);
        let last = format!(
            "{}: {}",
            p["state"].as_str().unwrap_or_default(),
            p["reason"].as_str().unwrap_or_default()
        );
        if last.contains(needle) {
            return last;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name}'s reason never mentioned {needle:?}; last: {last}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_remote_plugin_is_called_reconnected_and_refused_for_bad_certificates() {
    let sandbox = Sandbox::new();
    let dir = sandbox.dir.path();
    let pki = Pki::new(dir, "good");
    let rogue = Pki::new(dir, "rogue");
    let daemon_cert = pki.issue("daemon", &["plugvisor-daemon"]);
    let plugin_cert = pki.issue("plugin", &["echo.remote"]);

    let good = RemotePlugin::start(dir, "127.0.0.1:0", &plugin_cert, &pki.ca, &[]);
    remote_manifest(
        &sandbox,
        "echo",
        &good.address,
        &pki.ca,
        &daemon_cert,
        "echo.remote",
    );
    // The same plugin, with its certificate checked for another identity.
    remote_manifest(
        &sandbox,
        "wrongsan",
        &good.address,
        &pki.ca,
        &daemon_cert,
        "other.remote",
    );
    // A certificate from a CA the daemon does not trust.
    let untrusted = RemotePlugin::start(
        dir,
        "127.0.0.1:0",
        &rogue.issue("rogue-plugin", &["echo.remote"]),
        &pki.ca,
        &[],
    );
    remote_manifest(
        &sandbox,
        "badca",
        &untrusted.address,
        &pki.ca,
        &daemon_cert,
        "echo.remote",
    );
    let expired = RemotePlugin::start(
        dir,
        "127.0.0.1:0",
        &pki.issue_expired("old", &["echo.remote"]),
        &pki.ca,
        &[],
    );
    remote_manifest(
        &sandbox,
        "expired",
        &expired.address,
        &pki.ca,
        &daemon_cert,
        "echo.remote",
    );
    // The daemon presents a certificate the plugin does not trust.
    let rogue_client = rogue.issue("rogue-daemon", &["plugvisor-daemon"]);
    remote_manifest(
        &sandbox,
        "refusedus",
        &good.address,
        &pki.ca,
        &rogue_client,
        "echo.remote",
    );
    // A plaintext server where TLS is expected.
    let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let plain_addr = plain.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in plain.incoming().flatten() {
            let mut conn = conn;
            let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n");
        }
    });
    remote_manifest(
        &sandbox,
        "plaintext",
        &plain_addr,
        &pki.ca,
        &daemon_cert,
        "echo.remote",
    );

    let daemon = Daemon::start(&sandbox, &[]);
    let ready = daemon.wait_ready("echo");
    assert_eq!(ready["remote"]["address"], good.address.as_str());
    assert_eq!(ready["remote"]["origin"], "manifest");
    assert_eq!(ready["pid"], serde_json::Value::Null, "no local process");
    let reply = daemon.cli_ok(&["call", "echo", "upper", "--data", "over tls"]);
    assert_eq!(reply.trim(), "OVER TLS");
    let table = daemon.cli_ok(&["ps"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("echo ") && l.contains(&format!("tls://{}", good.address))),
        "ps says where it runs:\n{table}"
    );

    // Each refusal says which check failed.
    let r = wait_reason(&daemon, "wrongsan", "not the expected identity");
    assert!(
        r.contains("`other.remote`") && r.contains("`echo.remote`"),
        "{r}"
    );
    wait_reason(&daemon, "badca", "not signed by the trusted CA");
    let r = wait_reason(&daemon, "expired", "has expired");
    assert!(r.contains("not after 2020-01-01"), "{r}");
    wait_reason(&daemon, "refusedus", "refused our certificate");
    wait_reason(&daemon, "plaintext", "does not speak TLS");
    // A plaintext client on the plugin's TLS port is refused, and the
    // plugin says so.
    let mut raw = std::net::TcpStream::connect(&good.address).unwrap();
    raw.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    let mut sink = Vec::new();
    let _ = raw.read_to_end(&mut sink);
    wait_until_blocking(SECS_15, "the plugin logs the plaintext client", || {
        good.log().contains("a plaintext client on a TLS port")
    });

    // Killed: the daemon loses the connection, retries with backoff, and
    // reconnects once the plugin is back on the same address.
    let address = good.address.clone();
    drop(good);
    wait_reason(&daemon, "echo", "connection to");
    wait_reason(&daemon, "echo", "cannot connect to");
    let back = RemotePlugin::start(dir, &address, &plugin_cert, &pki.ca, &[]);
    daemon.wait_ready("echo");
    let reply = daemon.cli_ok(&["call", "echo", "echo", "--data", "again"]);
    assert_eq!(reply.trim(), "again");
    let events = daemon.cli_ok(&["events", "--json"]);
    assert!(events.contains("restart #"), "backoff events: {events}");
    drop(back);
}

#[test]
fn a_remote_manifest_with_isolation_fields_is_refused_by_check() {
    let sandbox = Sandbox::new();
    let dir = sandbox.dir.path();
    let pki = Pki::new(dir, "good");
    let client = pki.issue("daemon", &["plugvisor-daemon"]);
    remote_manifest(
        &sandbox,
        "echo",
        "127.0.0.1:1",
        &pki.ca,
        &client,
        "echo.remote",
    );
    let path = sandbox.plugins_dir().join("echo/plugin.yaml");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("isolation: {user: nobody}\n");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(bin("plugvisor"))
        .args(["check", "--plugins-dir"])
        .arg(sandbox.plugins_dir())
        .output()
        .unwrap();
    let stderr =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("field `isolation`")
            && stderr.contains("does not apply to a remote plugin"),
        "{stderr}"
    );
}

#[test]
fn a_registered_plugin_joins_answers_goes_unavailable_and_is_removed() {
    let sandbox = Sandbox::new();
    let dir = sandbox.dir.path();
    let pki = Pki::new(dir, "fleet");
    let registry_cert = pki.issue("registry", &["registry.test"]);
    let config = dir.join("plugvisor.yaml");
    std::fs::write(
        &config,
        format!(
            "registry:\n  listen: 127.0.0.1:0\n  ca: {}\n  cert: {}\n  key: {}\n  heartbeat_interval: 100ms\n  heartbeat_timeout: 400ms\n  remove_after: 6s\n  announce_burst: 2\n  announce_rate: 0.1\n",
            pki.ca.display(),
            registry_cert.cert.display(),
            registry_cert.key.display()
        ),
    )
    .unwrap();
    let daemon = Daemon::start(&sandbox, &["--config", config.to_str().unwrap()]);
    let mut registry = String::new();
    wait_until_blocking(SECS_15, "the registry listens", || {
        registry = daemon
            .log_text()
            .lines()
            .find_map(|l| {
                l.split("registry on ")
                    .nth(1)
                    .map(|r| r.split_whitespace().next().unwrap_or("").to_string())
            })
            .unwrap_or_default();
        !registry.is_empty()
    });

    let plugin_cert = pki.issue("echo-plugin", &["echo"]);
    let plugin = RemotePlugin::start(
        dir,
        "127.0.0.1:0",
        &plugin_cert,
        &pki.ca,
        &[
            ("PLUGVISOR_REGISTRY", registry.as_str()),
            ("PLUGVISOR_REGISTRY_IDENTITY", "registry.test"),
            ("PLUGVISOR_PLUGIN_NAME", "echo"),
            ("PLUGVISOR_CAPABILITIES", "text.upper,text.echo"),
        ],
    );
    let ready = daemon.wait_ready("echo");
    assert_eq!(ready["remote"]["origin"], "registry");
    assert_eq!(
        ready["remote"]["capabilities"],
        serde_json::json!(["text.upper", "text.echo"])
    );
    assert_eq!(ready["remote"]["address"], plugin.address.as_str());
    let reply = daemon.cli_ok(&["call", "echo", "upper", "--data", "registered"]);
    assert_eq!(reply.trim(), "REGISTERED");
    let table = daemon.cli_ok(&["ps"]);
    assert!(
        table.contains("(registry)"),
        "ps shows registered plugins:\n{table}"
    );
    // Its announced capabilities route calls to it, as a remote provider.
    let providers: Vec<serde_json::Value> =
        serde_json::from_str(&daemon.cli_ok(&["ps", "--capability", "text.upper", "--json"]))
            .unwrap();
    assert_eq!(providers.len(), 1, "{providers:?}");
    assert_eq!(providers[0]["name"], "echo");
    let by_capability = daemon.cli(&[
        "call",
        "--capability",
        "text.upper",
        "upper",
        "--data",
        "cap",
    ]);
    let stderr = String::from_utf8_lossy(&by_capability.stderr);
    assert_eq!(by_capability.status.code(), Some(0), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&by_capability.stdout).trim(), "CAP");
    assert!(stderr.contains("answered by echo"), "{stderr}");
    let history = daemon.cli_ok(&["inspect", "echo", "--json"]);
    assert!(
        history.contains("registered by"),
        "the join is in its events: {history}"
    );

    // Frozen: no heartbeats. Unavailable first, then removed.
    let pid = nix::unistd::Pid::from_raw(plugin.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let r = wait_reason(&daemon, "echo", "missed heartbeats");
    assert!(r.starts_with("unavailable"), "{r}");
    let refused = daemon.cli(&["call", "echo", "upper", "--data", "x"]);
    assert_eq!(
        refused.status.code(),
        Some(1),
        "an unavailable plugin is not called"
    );
    wait_until_blocking(SECS_15, "the silent plugin is removed", || {
        !daemon.ps().iter().any(|p| p["name"] == "echo")
    });
    let gone = daemon.cli(&["call", "--capability", "text.upper", "upper", "--data", "x"]);
    assert_eq!(
        gone.status.code(),
        Some(1),
        "a removed registration provides nothing: {}",
        String::from_utf8_lossy(&gone.stderr)
    );
    assert!(
        daemon
            .log_text()
            .contains("left the registry: no heartbeat"),
        "the leaving is logged and sent as an event:\n{}",
        daemon.log_text()
    );
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
}

#[test]
fn the_registry_refuses_names_the_certificate_does_not_carry_and_floods() {
    let sandbox = Sandbox::new();
    let dir = sandbox.dir.path();
    let pki = Pki::new(dir, "fleet");
    let registry_cert = pki.issue("registry", &["registry.test"]);
    let config = dir.join("plugvisor.yaml");
    std::fs::write(
        &config,
        format!(
            "registry:\n  listen: 127.0.0.1:0\n  ca: {}\n  cert: {}\n  key: {}\n  announce_burst: 2\n  announce_rate: 0.01\n",
            pki.ca.display(),
            registry_cert.cert.display(),
            registry_cert.key.display()
        ),
    )
    .unwrap();
    let daemon = Daemon::start(&sandbox, &["--config", config.to_str().unwrap()]);
    let mut registry = String::new();
    wait_until_blocking(SECS_15, "the registry listens", || {
        registry = daemon
            .log_text()
            .lines()
            .find_map(|l| {
                l.split("registry on ")
                    .nth(1)
                    .map(|r| r.split_whitespace().next().unwrap_or("").to_string())
            })
            .unwrap_or_default();
        !registry.is_empty()
    });
    let peer = pki.issue("peer", &["kv"]);
    let files = plugvisor_sdk::tls::TlsFiles {
        cert: peer.cert.clone(),
        key: peer.key.clone(),
        client_ca: pki.ca.clone(),
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut client = plugvisor_sdk::tls::registry_client(&files, &registry, "registry.test")
            .await
            .expect("connects with mutual TLS");
        let announce = |name: &str| plugvisor_proto::AnnounceRequest {
            name: name.into(),
            version: "1.0.0".into(),
            address: "127.0.0.1:9".into(),
            ..Default::default()
        };
        let denied = client.announce(announce("echo")).await.unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(
            denied.message().contains("`echo`") && denied.message().contains("`kv`"),
            "names the wanted and the carried names: {}",
            denied.message()
        );
        // The burst (2) is spent: the next one is rate-limited.
        let _ = client.announce(announce("kv")).await;
        let limited = client.announce(announce("kv")).await.unwrap_err();
        assert_eq!(
            limited.code(),
            tonic::Code::ResourceExhausted,
            "{}",
            limited.message()
        );
        assert!(
            limited.message().contains("retry in"),
            "{}",
            limited.message()
        );
    });
    // A peer whose certificate the registry's CA did not sign never gets in.
    let rogue = Pki::new(dir, "rogue");
    let stranger = rogue.issue("stranger", &["echo"]);
    let files = plugvisor_sdk::tls::TlsFiles {
        cert: stranger.cert,
        key: stranger.key,
        client_ca: pki.ca.clone(),
    };
    runtime.block_on(async {
        let result = async {
            let mut c =
                plugvisor_sdk::tls::registry_client(&files, &registry, "registry.test").await?;
            c.announce(plugvisor_proto::AnnounceRequest {
                name: "echo".into(),
                version: "1.0.0".into(),
                address: "127.0.0.1:9".into(),
                ..Default::default()
            })
            .await
            .map_err(|s| s.to_string())
        }
        .await;
        assert!(result.is_err(), "a stranger is refused");
    });
    wait_until_blocking(SECS_15, "the daemon logs why", || {
        daemon.log_text().contains("not signed by the trusted CA")
    });
}
