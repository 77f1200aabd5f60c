//! Runs the real `testplugin` binary the way the supervisor does (clean
//! environment, handshake on stdout, gRPC on the announced socket) and checks
//! that each flag misbehaves as documented.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use plugvisor_proto::handshake::{Handshake, MAGIC_COOKIE_VALUE};
use plugvisor_proto::plugin_client::PluginClient;
use plugvisor_proto::{HandleRequest, InitializeRequest, ShutdownRequest};
use tonic::transport::{Channel, Endpoint};

/// A started testplugin in its own process group; killed (group and all)
/// when dropped, so a failing test leaves nothing behind.
struct Started {
    child: Child,
    stdout: BufReader<ChildStdout>,
    stderr: Option<ChildStderr>,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Started {
    fn drop(&mut self) {
        // SAFETY: plain syscall; the pid is our child's, and as the group
        // leader its pid is also the group id.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

fn start(args: &[&str], cookie: bool) -> Started {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("plugin.sock");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_testplugin"));
    cmd.args(args)
        .env_clear()
        .env("PLUGVISOR_PLUGIN_SOCKET", &socket)
        .env("PLUGVISOR_PLUGIN_NAME", "testplugin")
        .env("PLUGVISOR_PROTOCOL_VERSIONS", "1")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if cookie {
        cmd.env("PLUGVISOR_MAGIC_COOKIE", MAGIC_COOKIE_VALUE);
    }
    let mut child = cmd.spawn().unwrap();
    Started {
        stdout: BufReader::new(child.stdout.take().unwrap()),
        stderr: child.stderr.take(),
        child,
        socket,
        _dir: dir,
    }
}

impl Started {
    /// Reads stdout up to the handshake; returns the lines before it too.
    fn handshake(&mut self) -> (Vec<String>, Handshake) {
        let mut before = Vec::new();
        loop {
            let mut line = String::new();
            assert_ne!(
                self.stdout.read_line(&mut line).unwrap(),
                0,
                "stdout closed"
            );
            match Handshake::parse(&line) {
                Ok(h) => return (before, h),
                Err(_) => before.push(line.trim_end().to_string()),
            }
        }
    }

    async fn client(&mut self) -> PluginClient<Channel> {
        let (_, h) = self.handshake();
        assert_eq!(h.address, self.socket.to_str().unwrap());
        connect(&self.socket).await
    }

    fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let until = Instant::now() + within;
        while Instant::now() < until {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    fn stderr_to_end(&mut self) -> String {
        let mut out = String::new();
        self.stderr
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        out
    }
}

async fn connect(socket: &Path) -> PluginClient<Channel> {
    let channel = Endpoint::from_shared(format!("unix://{}", socket.display()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    PluginClient::new(channel)
}

async fn call(client: &mut PluginClient<Channel>, method: &str, payload: &str) -> String {
    let reply = client
        .handle(HandleRequest {
            method: method.into(),
            payload: payload.to_string().into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    String::from_utf8(reply.payload.to_vec()).unwrap()
}

async fn initialize(client: &mut PluginClient<Channel>, config: &str) {
    client
        .initialize(InitializeRequest {
            plugin_name: "testplugin".into(),
            instance_id: "testplugin-0-1".into(),
            config_json: config.into(),
            protocol_version: 1,
            restored_state: None,
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn junk_before_handshake_then_serves_and_exits_zero_on_shutdown_rpc() {
    let mut p = start(&["--junk", "2"], true);
    let (junk, handshake) = p.handshake();
    assert_eq!(
        junk,
        [
            "junk line 1 before handshake",
            "junk line 2 before handshake"
        ]
    );
    assert_eq!(
        handshake.to_string(),
        format!("plugvisor|1|unix|{}", p.socket.display())
    );
    let mut client = connect(&p.socket).await;
    initialize(&mut client, r#"{"a":1}"#).await;
    assert_eq!(call(&mut client, "echo", "hi").await, "hi");
    assert_eq!(call(&mut client, "config", "").await, r#"{"a":1}"#);
    assert_eq!(call(&mut client, "pid", "").await, p.child.id().to_string());
    let env: serde_json::Value = serde_json::from_str(&call(&mut client, "env", "").await).unwrap();
    assert_eq!(env["PLUGVISOR_PLUGIN_NAME"], "testplugin");
    client
        .shutdown(ShutdownRequest { deadline_ms: 2000 })
        .await
        .unwrap();
    let status = p.wait_exit(Duration::from_secs(5)).expect("still running");
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[tokio::test]
async fn sigterm_drains_an_in_flight_call_and_exits_zero() {
    let mut p = start(&[], true);
    let client = p.client().await;
    let mut slow = client.clone();
    let in_flight = tokio::spawn(async move { call(&mut slow, "sleep", "300").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // SAFETY: plain syscall on our own child.
    unsafe { libc::kill(p.child.id() as i32, libc::SIGTERM) };
    assert_eq!(in_flight.await.unwrap(), "slept");
    let status = p.wait_exit(Duration::from_secs(5)).expect("still running");
    assert_eq!(status.code(), Some(0), "{status:?}");
    drop(client);
}

#[tokio::test]
async fn ignore_sigterm_survives_sigterm_and_shutdown() {
    let mut p = start(&["--ignore-sigterm"], true);
    let mut client = p.client().await;
    // SAFETY: plain syscall on our own child.
    unsafe { libc::kill(p.child.id() as i32, libc::SIGTERM) };
    client
        .shutdown(ShutdownRequest { deadline_ms: 100 })
        .await
        .unwrap();
    assert!(p.wait_exit(Duration::from_millis(400)).is_none());
    assert_eq!(call(&mut client, "echo", "still here").await, "still here");
}

#[tokio::test]
async fn announces_wrong_path_or_version_when_asked() {
    let mut p = start(&["--wrong-path"], true);
    let (_, h) = p.handshake();
    assert_eq!(h.address, format!("{}.wrong", p.socket.display()));
    let mut p = start(&["--bad-version"], true);
    let (_, h) = p.handshake();
    assert_eq!(h.protocol_version, 99);
}

#[tokio::test]
async fn double_fork_leaves_a_grandchild_in_the_process_group() {
    let mut p = start(&["--double-fork"], true);
    let mut client = p.client().await;
    let pid: i32 = call(&mut client, "grandchild", "").await.parse().unwrap();
    let mut stderr = BufReader::new(p.stderr.take().unwrap());
    let mut line = String::new();
    while !line.starts_with("grandchild pid") {
        line.clear();
        assert_ne!(stderr.read_line(&mut line).unwrap(), 0);
    }
    assert_eq!(line.trim_end(), format!("grandchild pid {pid}"));
    // SAFETY: plain syscalls.
    let (alive, pgid) = unsafe { (libc::kill(pid, 0) == 0, libc::getpgid(pid)) };
    assert!(alive);
    assert_eq!(pgid, p.child.id() as i32);
}

#[test]
fn without_the_cookie_prints_the_friendly_message_and_exits_1() {
    let mut p = start(&[], false);
    let status = p.wait_exit(Duration::from_secs(5)).expect("still running");
    assert_eq!(status.code(), Some(1));
    assert!(p.stderr_to_end().starts_with(
        "This is a plugvisor plugin. It is meant to be started by the plugvisor supervisor"
    ),);
}

#[test]
fn exit_immediately_exits_with_the_code() {
    let mut p = start(&["--exit-immediately", "7"], true);
    let status = p.wait_exit(Duration::from_secs(5)).expect("still running");
    assert_eq!(status.code(), Some(7));
}

#[tokio::test]
async fn crash_and_abort_end_the_process() {
    let mut p = start(&[], true);
    let mut client = p.client().await;
    let _ = client
        .handle(HandleRequest {
            method: "crash".into(),
            payload: "5".into(),
            ..Default::default()
        })
        .await;
    let status = p.wait_exit(Duration::from_secs(5)).expect("still running");
    assert_eq!(status.code(), Some(5));

    let mut p = start(&[], true);
    let mut client = p.client().await;
    let _ = client
        .handle(HandleRequest {
            method: "abort".into(),
            ..Default::default()
        })
        .await;
    let status = p.wait_exit(Duration::from_secs(5)).expect("still running");
    assert_eq!(status.signal(), Some(libc::SIGABRT));
}
