//! The test plugin's methods. Each exists to provoke or observe one
//! behaviour of the supervisor (crash handling, limits, hygiene, state).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use plugvisor_sdk::{
    ByteStream, Bytes, Health, InitContext, Plugin, Request, Response, StateSnapshot, Status,
    async_trait, unknown_method,
};

/// Format of the exported state: the counter as decimal text.
pub const STATE_VERSION: u32 = 1;
/// Exit code of `crash` when the payload names none.
const DEFAULT_CRASH_CODE: i32 = 3;
const MIB: usize = 1024 * 1024;
/// Page size for touching `alloc`ated memory; 4 KiB is the smallest in use.
const PAGE: usize = 4096;

/// Behaviour chosen on the command line that the plugin itself acts on.
#[derive(Debug, Default, Clone)]
pub struct Faults {
    /// `--init-sleep-ms`: how long `Initialize` sleeps first.
    pub init_sleep: Duration,
    /// `--init-fail`: `Initialize` fails with FAILED_PRECONDITION.
    pub init_fail: bool,
    /// `--unknown-ok`: unknown methods answer OK with an empty payload
    /// instead of UNIMPLEMENTED.
    pub unknown_ok: bool,
    /// `--forget-state`: `Initialize` ignores the restored state, and the
    /// counter starts at the process ID so the loss shows in `ExportState`.
    pub forget_state: bool,
    /// `--no-stream`: `HandleStream` answers UNIMPLEMENTED.
    pub no_stream: bool,
    /// `--claim-stream`: declare `echo` in `stream_methods` even with
    /// `--no-stream`.
    pub claim_stream: bool,
    /// `--stream-fail`: `HandleStream` answers INTERNAL.
    pub stream_fail: bool,
    /// `--not-serving`: `HealthCheck` reports NOT_SERVING from the start.
    pub not_serving: bool,
    /// `--phantom-method`: lists a method `phantom` first, which `Handle`
    /// answers UNIMPLEMENTED like any unknown method.
    pub phantom_method: bool,
    /// `--validate-hang`: `ValidateConfig` never answers.
    pub validate_hang: bool,
    /// `--validate-silent`: `ValidateConfig` refuses every config without
    /// a reason.
    pub validate_silent: bool,
}

/// Adds one to its counter when dropped, unless disarmed first.
struct CountOnDrop(Option<Arc<AtomicU64>>);

impl CountOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CountOnDrop {
    fn drop(&mut self) {
        if let Some(counter) = self.0.take() {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[derive(Debug)]
pub struct TestPlugin {
    faults: Faults,
    /// From `--double-fork`, for the `grandchild` method.
    grandchild: Option<i32>,
    /// Handle calls this process has served (before the current one).
    calls: AtomicU64,
    /// The exported, restored counter that `incr` raises and `state` reads.
    counter: AtomicU64,
    /// What `HealthCheck` reports; changed by `set_health`.
    health: Mutex<Health>,
    /// The config from `Initialize`; `None` before it.
    config: Mutex<Option<serde_json::Value>>,
    /// Memory from `alloc`, kept so it stays resident.
    hoard: Mutex<Vec<Vec<u8>>>,
    /// `sleep` calls dropped before they finished (the caller cancelled),
    /// read by `sleeps_cancelled`.
    sleeps_cancelled: Arc<AtomicU64>,
}

/// Locks `m`, ignoring poisoning: every critical section here is a single
/// assignment or push, so the data is consistent even after a panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn text(req: &Request) -> Result<&str, Status> {
    std::str::from_utf8(&req.payload)
        .map(str::trim)
        .map_err(|e| Status::invalid_argument(format!("{}: payload is not UTF-8: {e}", req.method)))
}

/// Parses the payload as a number, `default` when empty.
fn number<T: std::str::FromStr>(req: &Request, default: Option<T>) -> Result<T, Status> {
    let t = text(req)?;
    match (t.is_empty(), default) {
        (true, Some(d)) => Ok(d),
        _ => t.parse().map_err(|_| {
            Status::invalid_argument(format!("{}: payload `{t}` is not a number", req.method))
        }),
    }
}

fn json(value: serde_json::Value) -> Result<Response, Status> {
    Ok(Response::new(value.to_string()))
}

/// Open file descriptors and what they point at, from `/proc/self/fd`,
/// without the descriptor used to read that directory.
fn open_fds() -> Result<BTreeMap<i32, String>, Status> {
    let fd_dir = "/proc/self/fd";
    // As /proc (the host's) names it: not `getpid` in a PID namespace.
    let own_dir = format!("/proc/{}/fd", crate::fork::host_pid());
    let entries = std::fs::read_dir(fd_dir)
        .map_err(|e| Status::internal(format!("reading {fd_dir}: {e}")))?;
    let mut fds = BTreeMap::new();
    for entry in entries.flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        // Already closed again (a racing thread) reads as an error: skip it.
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        if target != own_dir {
            fds.insert(fd, target);
        }
    }
    Ok(fds)
}

/// What `flood` writes to stdout.
#[derive(Debug, Clone, Copy)]
enum Flood {
    /// Numbered lines of about 100 bytes, then `flood done: <N> lines`.
    Lines,
    /// One line that never ends: no newline at all.
    OneLine,
}

/// `flood` / `flood_line`: writes `payload` MiB to stdout as fast as the
/// reader takes them, and answers `<bytes> bytes in <ms> ms` once all is
/// written (the supervisor has read all but the pipe's last buffer).
async fn flood(req: &Request, kind: Flood) -> Result<Response, Status> {
    let mib: usize = number(req, None)?;
    let started = std::time::Instant::now();
    // Blocking writes to a full pipe belong on a blocking thread, so the
    // plugin keeps serving other calls meanwhile.
    let written = tokio::task::spawn_blocking(move || write_flood(mib * MIB, kind))
        .await
        .map_err(|e| Status::internal(format!("{}: the writer thread failed: {e}", req.method)))?
        .map_err(|e| Status::internal(format!("{}: writing to stdout: {e}", req.method)))?;
    Ok(Response::new(format!(
        "{written} bytes in {} ms",
        started.elapsed().as_millis()
    )))
}

fn write_flood(total: usize, kind: Flood) -> std::io::Result<usize> {
    const FILLER: &str = "the quick brown fox jumps over the lazy dog; pack my box with five dozen";
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout().lock());
    let mut written = 0;
    match kind {
        Flood::Lines => {
            let mut lines = 0u64;
            while written < total {
                let line = format!("flood line {lines:09} {FILLER}\n");
                out.write_all(line.as_bytes())?;
                written += line.len();
                lines += 1;
            }
            writeln!(out, "flood done: {lines} lines")?;
        }
        Flood::OneLine => {
            let chunk = [b'x'; 64 * 1024];
            while written < total {
                let n = chunk.len().min(total - written);
                out.write_all(&chunk[..n])?;
                written += n;
            }
        }
    }
    out.flush()?;
    Ok(written)
}

impl TestPlugin {
    pub fn new(faults: Faults, grandchild: Option<i32>) -> Self {
        let counter = if faults.forget_state {
            u64::from(std::process::id())
        } else {
            0
        };
        let health = if faults.not_serving {
            Health::NotServing("started with --not-serving".into())
        } else {
            Health::Serving
        };
        TestPlugin {
            faults,
            grandchild,
            calls: AtomicU64::new(0),
            counter: AtomicU64::new(counter),
            health: Mutex::new(health),
            config: Mutex::new(None),
            hoard: Mutex::new(Vec::new()),
            sleeps_cancelled: Arc::default(),
        }
    }

    fn alloc(&self, req: &Request) -> Result<Response, Status> {
        let mib: usize = number(req, None)?;
        let mut block = vec![0u8; mib * MIB];
        // The zeroed allocation is lazily mapped; writing one byte per page
        // makes the kernel back (and charge) every page.
        for i in (0..block.len()).step_by(PAGE) {
            block[i] = 1;
        }
        let mut hoard = lock(&self.hoard);
        hoard.push(block);
        let total: usize = hoard.iter().map(Vec::len).sum();
        Ok(Response::new(format!("{}", total / MIB)))
    }

    fn set_health(&self, req: &Request) -> Result<Response, Status> {
        let health = match text(req)? {
            "SERVING" => Health::Serving,
            "NOT_SERVING" => Health::NotServing("set by set_health".into()),
            "DEGRADED" => Health::Degraded("set by set_health".into()),
            other => {
                return Err(Status::invalid_argument(format!(
                    "set_health: expected SERVING, NOT_SERVING or DEGRADED, got `{other}`"
                )));
            }
        };
        *lock(&self.health) = health;
        Ok(Response::empty())
    }
}

#[async_trait]
impl Plugin for TestPlugin {
    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    /// Refuses a config that sets `refuse`, giving its value as the reason.
    /// `--validate-hang` never answers; `--validate-silent` refuses without
    /// a reason.
    async fn validate_config(&self, config: &serde_json::Value) -> Result<(), String> {
        if self.faults.validate_hang {
            std::future::pending::<()>().await;
        }
        if self.faults.validate_silent {
            return Err(String::new());
        }
        match config.get("refuse") {
            Some(why) => Err(format!("`refuse` is set: {why}")),
            None => Ok(()),
        }
    }

    /// `echo` streams, unless `--no-stream`; `--claim-stream` declares it
    /// even then.
    fn stream_methods(&self) -> Vec<String> {
        if self.faults.no_stream && !self.faults.claim_stream {
            Vec::new()
        } else {
            vec!["echo".into()]
        }
    }

    fn stream_changes_state(&self, method: &str) -> bool {
        method == "count"
    }

    fn methods(&self) -> Vec<String> {
        let phantom = self.faults.phantom_method.then(|| "phantom".to_string());
        let served = [
            "echo",
            "crash",
            "abort",
            "sleep",
            "sleeps_cancelled",
            "pid",
            "sleep_pid",
            "grandchild",
            "config",
            "env",
            "fds",
            "fd_targets",
            "set_health",
            "alloc",
            "count",
            "incr",
            "state",
            // Against isolation (see `isolation.rs`).
            "spin",
            "fork_bomb",
            "open_files",
            "connect",
            "identity",
            "bind",
            "connect_unix",
            "syscall",
            "pid_info",
            "write_file",
            "read_file",
            "flood",
            "flood_line",
        ]
        .map(String::from);
        phantom.into_iter().chain(served).collect()
    }

    fn state_version(&self) -> u32 {
        STATE_VERSION
    }

    async fn initialize(&self, ctx: InitContext) -> Result<(), Status> {
        if !self.faults.init_sleep.is_zero() {
            tokio::time::sleep(self.faults.init_sleep).await;
        }
        if self.faults.init_fail {
            return Err(Status::failed_precondition(
                "testplugin: Initialize fails because --init-fail was given",
            ));
        }
        // `init_fail_replica: N` in the config fails Initialize of replica N
        // only (instance ids are `<plugin>-<replica>-<start>`).
        if let Some(n) = ctx.config.get("init_fail_replica").and_then(|v| v.as_u64()) {
            let replica = ctx.instance_id.rsplit('-').nth(1);
            if replica == Some(n.to_string().as_str()) {
                return Err(Status::failed_precondition(format!(
                    "testplugin: Initialize of replica {n} fails as the config asks"
                )));
            }
        }
        let restored = ctx.restored_state.filter(|_| !self.faults.forget_state);
        if let Some(restored) = restored {
            if restored.state_version != STATE_VERSION {
                return Err(Status::failed_precondition(format!(
                    "testplugin: restored state has version {}, expected {STATE_VERSION}",
                    restored.state_version
                )));
            }
            let text = String::from_utf8_lossy(&restored.state);
            let n = text.trim().parse().map_err(|_| {
                Status::failed_precondition(format!(
                    "testplugin: restored state `{text}` is not a counter"
                ))
            })?;
            self.counter.store(n, Ordering::SeqCst);
        }
        *lock(&self.config) = Some(ctx.config);
        Ok(())
    }

    async fn handle(&self, req: Request) -> Result<Response, Status> {
        let served_before = self.calls.fetch_add(1, Ordering::SeqCst);
        match req.method.as_str() {
            "echo" => Ok(Response::new(req.payload)),
            "crash" => {
                let code = number(&req, Some(DEFAULT_CRASH_CODE))?;
                eprintln!("testplugin: crashing with exit code {code} as asked");
                std::process::exit(code)
            }
            // Exits after the payload's milliseconds, from a thread of its
            // own: the call answers at once.
            "crash_in" => {
                let ms = number(&req, Some(0))?;
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(ms));
                    eprintln!("testplugin: crashing {ms}ms after being asked");
                    std::process::exit(DEFAULT_CRASH_CODE)
                });
                Ok(Response::new("crashing"))
            }
            "abort" => {
                eprintln!("testplugin: aborting (SIGABRT) as asked");
                std::process::abort()
            }
            "sleep" => {
                let ms = number(&req, Some(0))?;
                // Counts the sleep as cancelled unless it finishes.
                let guard = CountOnDrop(Some(self.sleeps_cancelled.clone()));
                tokio::time::sleep(Duration::from_millis(ms)).await;
                guard.disarm();
                Ok(Response::new("slept"))
            }
            "sleeps_cancelled" => Ok(Response::new(
                self.sleeps_cancelled.load(Ordering::SeqCst).to_string(),
            )),
            // The pid as the supervisor sees it (getpid is 1 in the plugin's
            // own PID namespace).
            "pid" => Ok(Response::new(crate::fork::host_pid().to_string())),
            "sleep_pid" => {
                let ms = number(&req, Some(0))?;
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(Response::new(crate::fork::host_pid().to_string()))
            }
            "grandchild" => match self.grandchild {
                Some(pid) => Ok(Response::new(pid.to_string())),
                None => Err(Status::not_found(
                    "grandchild: no grandchild; start with --double-fork",
                )),
            },
            "config" => match &*lock(&self.config) {
                Some(config) => Ok(Response::new(config.to_string())),
                None => Err(Status::failed_precondition(
                    "config: Initialize has not been called",
                )),
            },
            "env" => {
                let env: serde_json::Map<String, serde_json::Value> = std::env::vars_os()
                    .map(|(k, v)| {
                        (
                            k.to_string_lossy().into_owned(),
                            v.to_string_lossy().into_owned().into(),
                        )
                    })
                    .collect();
                json(env.into())
            }
            "fds" => json(open_fds()?.into_keys().collect::<Vec<_>>().into()),
            "fd_targets" => json(
                open_fds()?
                    .into_iter()
                    .map(|(fd, target)| (fd.to_string(), target.into()))
                    .collect::<serde_json::Map<_, _>>()
                    .into(),
            ),
            "set_health" => self.set_health(&req),
            "alloc" => self.alloc(&req),
            "count" => Ok(Response::new(served_before.to_string())),
            "incr" => {
                let by = number(&req, Some(1))?;
                let now = self.counter.fetch_add(by, Ordering::SeqCst) + by;
                Ok(Response::new(now.to_string()).state_changed())
            }
            "state" => Ok(Response::new(
                self.counter.load(Ordering::SeqCst).to_string(),
            )),
            "flood" => flood(&req, Flood::Lines).await,
            "flood_line" => flood(&req, Flood::OneLine).await,
            // Listed by --phantom-method, but never served.
            "phantom" => Err(unknown_method("phantom")),
            _ if self.faults.unknown_ok => Ok(Response::empty()),
            "spin" => crate::isolation::spin(&req),
            "fork_bomb" => crate::isolation::fork_bomb(&req),
            "open_files" => crate::isolation::open_files(&req),
            "connect" => crate::isolation::connect(&req),
            "identity" => crate::isolation::identity(),
            "bind" => crate::isolation::bind(&req),
            "connect_unix" => crate::isolation::connect_unix(&req),
            "syscall" => crate::isolation::syscall(&req),
            "write_file" => crate::isolation::write_file(&req),
            "read_file" => crate::isolation::read_file(&req),
            // The file's bytes (up to 1 MiB): what a container sees.
            "cat" => {
                let path = String::from_utf8_lossy(&req.payload).into_owned();
                let mut bytes = Vec::new();
                std::fs::File::open(&path)
                    .and_then(|f| {
                        std::io::Read::read_to_end(&mut std::io::Read::take(f, 1 << 20), &mut bytes)
                    })
                    .map(|_| Response::new(bytes))
                    .map_err(|e| Status::not_found(format!("{path}: {e}")))
            }
            "pid_info" => crate::isolation::pid_info(),
            other => Err(unknown_method(other)),
        }
    }

    async fn handle_stream(
        &self,
        method: &str,
        _metadata: HashMap<String, String>,
        input: ByteStream,
    ) -> Result<ByteStream, Status> {
        if self.faults.no_stream {
            return Err(unknown_method(method));
        }
        if self.faults.stream_fail {
            return Err(Status::internal(
                "testplugin: HandleStream fails because --stream-fail was given",
            ));
        }
        if method == "count" {
            // The upload's size is added to the exported counter: a
            // streamed call that changes state (see stream_changes_state).
            return count_upload(input, &self.counter).await;
        }
        Ok(input)
    }

    async fn health(&self) -> Health {
        lock(&self.health).clone()
    }

    async fn export_state(&self) -> Result<StateSnapshot, Status> {
        Ok(StateSnapshot::new(
            self.counter.load(Ordering::SeqCst).to_string(),
            STATE_VERSION,
        ))
    }
}

/// `count` on HandleStream: reads the whole upload, adds its size to the
/// exported counter, and answers the size.
/// Says on stderr how the upload ended, so tests can tell a complete upload
/// from one that broke off.
async fn count_upload(mut input: ByteStream, counter: &AtomicU64) -> Result<ByteStream, Status> {
    use tokio_stream::StreamExt;
    eprintln!("testplugin: upload started");
    let mut total = 0usize;
    while let Some(chunk) = input.next().await {
        match chunk {
            Ok(data) => total += data.len(),
            Err(status) => {
                eprintln!(
                    "testplugin: upload broken after {total} bytes: {:?}",
                    status.code()
                );
                return Err(status);
            }
        }
    }
    eprintln!("testplugin: upload complete: {total} bytes");
    counter.fetch_add(total as u64, Ordering::SeqCst);
    let reply = Bytes::from(total.to_string());
    Ok(Box::pin(tokio_stream::once(Ok(reply))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use plugvisor_sdk::Code;
    use plugvisor_sdk::testing::Harness;
    use serde_json::json;

    #[tokio::test]
    async fn counts_calls_and_keeps_its_counter_across_restarts() {
        let mut h = Harness::start(TestPlugin::new(Faults::default(), None))
            .await
            .unwrap();
        h.initialize(json!({"k": "v"})).await.unwrap();
        assert_eq!(h.call("config", "").await.unwrap(), r#"{"k":"v"}"#);
        h.call("echo", "x").await.unwrap();
        assert_eq!(h.call("count", "").await.unwrap(), "2");
        assert_eq!(h.call("incr", "").await.unwrap(), "1");
        assert_eq!(h.call("incr", "4").await.unwrap(), "5");

        let mut h = h
            .restart_with_state(TestPlugin::new(Faults::default(), None))
            .await;
        h.initialize(json!({})).await.unwrap();
        assert_eq!(h.call("state", "").await.unwrap(), "5");
        assert_eq!(h.call("count", "").await.unwrap(), "1");
        h.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn reports_and_changes_health() {
        let mut h = Harness::start(TestPlugin::new(Faults::default(), None))
            .await
            .unwrap();
        assert_eq!(h.health().await.unwrap(), Health::Serving);
        h.call("set_health", "DEGRADED").await.unwrap();
        assert!(matches!(h.health().await.unwrap(), Health::Degraded(_)));
        h.call("set_health", "NOT_SERVING").await.unwrap();
        assert!(matches!(h.health().await.unwrap(), Health::NotServing(_)));
        let err = h.call("set_health", "sick").await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        h.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn observes_its_process() {
        let mut h = Harness::start(TestPlugin::new(Faults::default(), Some(42)))
            .await
            .unwrap();
        assert_eq!(
            h.call("pid", "").await.unwrap(),
            std::process::id().to_string()
        );
        assert_eq!(h.call("grandchild", "").await.unwrap(), "42");
        let fds: Vec<i32> = serde_json::from_slice(&h.call("fds", "").await.unwrap()).unwrap();
        assert!(fds.contains(&0) && fds.contains(&2), "{fds:?}");
        let env: BTreeMap<String, String> =
            serde_json::from_slice(&h.call("env", "").await.unwrap()).unwrap();
        assert_eq!(env.get("PATH"), std::env::var("PATH").ok().as_ref());
        assert_eq!(h.call("alloc", "2").await.unwrap(), "2");
        assert_eq!(h.call("sleep", "10").await.unwrap(), "slept");
        assert_eq!(h.stream("anything", ["a", "b"]).await.unwrap(), ["a", "b"]);
        h.shutdown().await.unwrap();

        let mut h = Harness::start(TestPlugin::new(Faults::default(), None))
            .await
            .unwrap();
        assert_eq!(
            h.call("grandchild", "").await.unwrap_err().code(),
            Code::NotFound
        );
        h.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn init_faults() {
        let faults = Faults {
            init_fail: true,
            init_sleep: Duration::from_millis(20),
            ..Faults::default()
        };
        let mut h = Harness::start(TestPlugin::new(faults, None)).await.unwrap();
        let started = std::time::Instant::now();
        let err = h.initialize(json!({})).await.unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(20));
        assert_eq!(err.code(), Code::FailedPrecondition);
        h.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn protocol_faults_break_one_rule_each() {
        let faults = Faults {
            unknown_ok: true,
            forget_state: true,
            no_stream: true,
            not_serving: true,
            phantom_method: true,
            ..Faults::default()
        };
        let mut h = Harness::start(TestPlugin::new(faults.clone(), None))
            .await
            .unwrap();
        let init = h
            .initialize_with_state(json!({}), Some(StateSnapshot::new("5", STATE_VERSION)))
            .await
            .unwrap();
        assert_eq!(init.methods[0], "phantom");
        assert_eq!(
            h.call("phantom", "").await.unwrap_err().code(),
            Code::Unimplemented
        );
        assert_eq!(h.call("no-such-method", "").await.unwrap(), "");
        assert_eq!(
            h.stream("echo", ["a"]).await.unwrap_err().code(),
            Code::Unimplemented
        );
        assert!(matches!(h.health().await.unwrap(), Health::NotServing(_)));
        let state = h.export_state().await.unwrap();
        assert_eq!(state.state, std::process::id().to_string());
        h.shutdown().await.unwrap();

        let faults = Faults {
            stream_fail: true,
            ..Faults::default()
        };
        let mut h = Harness::start(TestPlugin::new(faults, None)).await.unwrap();
        assert_eq!(
            h.stream("echo", ["a"]).await.unwrap_err().code(),
            Code::Internal
        );
        h.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn refuses_state_of_another_version() {
        let mut h = Harness::start(TestPlugin::new(Faults::default(), None))
            .await
            .unwrap();
        let err = h
            .initialize_with_state(json!({}), Some(StateSnapshot::new("3", 2)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(err.message().contains("version 2"), "{}", err.message());
        h.shutdown().await.unwrap();
    }
}
