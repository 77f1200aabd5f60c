//! `plugvisor conformance`: runs one plugin under a private supervisor and
//! checks it against each rule of the plugin protocol (spec §3), so a plugin
//! author learns what is wrong before a real supervisor refuses the plugin.
//!
//! The checker owns everything it starts: a temporary runtime directory, its
//! own [`ProcessManager`] and task tracker. Plugins are started, initialized
//! and stopped with [`instance::spawn`], [`instance::initialize`],
//! [`instance::stop`] and [`instance::kill_and_reap`], exactly as the
//! supervisor does, and every child is killed and reaped before [`run`]
//! returns. Rules run in order; a rule that needs what an earlier one failed
//! to provide (a started or initialized plugin) is skipped with the reason.
//!
//! The rules and the report's text and JSON forms live in `report.rs`; this
//! file runs the checks.

mod report;

pub use report::{Check, Outcome, Report, Rule};

use plugvisor::config::merge_json;
use plugvisor::instance::{self, DEFAULT_PATH, Instance, StartContext, StartError};
use plugvisor::logs::{LineReader, LogBuffer};
use plugvisor::manifest::{MANIFEST_FILE, Manifest};
use plugvisor::process::{ProcessManager, SpawnSpec};
use plugvisor::units::HumanDuration;
use plugvisor_proto::handshake::{self, Handshake, HandshakeError, PROTOCOL_VERSION};
use plugvisor_proto::{
    Chunk, ExportStateRequest, ExportStateResponse, HandleRequest, HandleResponse,
    HealthCheckRequest, RestoredState, ShutdownRequest, ValidateConfigRequest,
    health_check_response,
};
use prost::bytes::Bytes;
use serde_json::{Map, Value};
use std::ffi::OsString;
use std::fmt;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tokio::net::unix::pipe;
use tokio_util::task::TaskTracker;
use tonic::Code;

/// The payload of the checker's own `Handle` calls. `key=value` so that a
/// key-value plugin's first method (`set`) accepts it and changes its state.
const PROBE_PAYLOAD: &[u8] = b"plugvisor-conformance=1";
/// A method no plugin serves.
const UNKNOWN_METHOD: &str = "plugvisor.conformance.no-such-method";
/// The config key carrying a random token, to see the config arrive.
const TOKEN_KEY: &str = "plugvisor_conformance_token";
/// The socket's file name in an instance's socket directory, as
/// [`instance::spawn`] names it.
const SOCKET_FILE: &str = "plugin.sock";
/// How long a plugin run without the cookie may take to exit.
const COOKIE_EXIT: Duration = Duration::from_secs(5);
/// How long `HealthCheck` may take, as the spec's default health timeout.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// The deadline sent in `Shutdown`, and how long after it the process may take to exit.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(2);
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// How long a plugin may take to exit on SIGTERM.
const SIGTERM_EXIT: Duration = Duration::from_secs(5);
/// How long the second instance of the state rule gets to stop.
const AUX_STOP: Duration = Duration::from_secs(2);
/// How long the checker waits, at the end, for its reapers and output readers.
const REAP_WAIT: Duration = Duration::from_secs(5);
/// Stdout and stderr lines kept from the run without the cookie.
const KEPT_LINES: usize = 100;

/// What a plugin declared in its `InitializeResponse`.
struct Declared {
    /// `methods`: rules 6, 8 and 10 call the first.
    methods: Vec<String>,
    /// `stream_methods`: rule 7 streams to the first.
    stream_methods: Vec<String>,
    /// `sessions`: rule 8 checks Session when offered.
    sessions: bool,
}

/// A protocol version no plugin announces: rule 3 checks it is refused.
const UNANNOUNCED_VERSION: u32 = 99;

/// How to run the checks.
#[derive(Debug, Clone)]
pub struct Options {
    /// Merged over the manifest's config in every Initialize (the checker
    /// adds its token too).
    pub config: Map<String, Value>,
    /// Deadline for the handshake, Initialize and each call (health checks
    /// keep their 1s).
    pub timeout: Duration,
}

/// `plugvisor conformance TARGET`: prints the report and returns the exit
/// code: 0 conforms, 1 a rule failed, 2 a usage error.
pub async fn command(
    target: &Path,
    json: bool,
    config: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<i32> {
    let usage = |message: String| {
        eprintln!("plugvisor conformance: {message}");
        Ok(2)
    };
    if timeout.is_zero() {
        return usage("--timeout must be greater than zero".into());
    }
    let config = match config {
        None => Map::new(),
        Some(text) => match serde_json::from_str(text) {
            Ok(Value::Object(map)) => map,
            Ok(other) => return usage(format!("--config must be a JSON object, got `{other}`")),
            Err(e) => return usage(format!("--config is not valid JSON: {e}")),
        },
    };
    let manifest = match load_target(target) {
        Ok(m) => m,
        Err(message) => return usage(message),
    };
    let report = run(manifest, Options { config, timeout }).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(report.exit_code())
}

/// Loads `path` as a manifest (a `.yaml`/`.yml` file, or a directory holding
/// `plugin.yaml`) or, for any other file, builds a minimal manifest for it as
/// an executable. Checks that the executable exists and is executable.
pub fn load_target(path: &Path) -> Result<Manifest, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let is_yaml = path
        .extension()
        .is_some_and(|ext| ext == "yaml" || ext == "yml");
    let manifest = if meta.is_dir() {
        Manifest::load(&path.join(MANIFEST_FILE)).map_err(|e| e.to_string())?
    } else if is_yaml {
        Manifest::load(path).map_err(|e| e.to_string())?
    } else {
        manifest_for_executable(path)?
    };
    manifest.check_executable().map_err(|e| e.to_string())?;
    Ok(manifest)
}

/// A manifest, in memory, for a bare executable: named after the file,
/// version 0.0.0, every other field at its default.
pub fn manifest_for_executable(exec: &Path) -> Result<Manifest, String> {
    let exec = std::path::absolute(exec).map_err(|e| format!("{}: {e}", exec.display()))?;
    let file_name = exec
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = exec.parent().unwrap_or(Path::new("/"));
    // A JSON string is a valid double-quoted YAML scalar.
    let text = format!(
        "name: {}\nversion: 0.0.0\nexec: {}\n",
        sanitize_name(&file_name),
        Value::from(exec.to_string_lossy())
    );
    Manifest::parse(&dir.join(MANIFEST_FILE), &text).map_err(|e| e.to_string())
}

/// A valid plugin name from a file name: lower-cased, other characters
/// replaced by `-`, no leading `-`/`_`, at most 63 characters.
pub fn sanitize_name(file_name: &str) -> String {
    let mapped: String = file_name
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let name: String = mapped
        .trim_start_matches(['-', '_'])
        .chars()
        .take(63)
        .collect();
    if name.is_empty() {
        "plugin".to_string()
    } else {
        name
    }
}

/// Runs every rule against the plugin `manifest` describes.
pub async fn run(mut manifest: Manifest, options: Options) -> std::io::Result<Report> {
    manifest.timeouts.start = HumanDuration(options.timeout);
    manifest.timeouts.initialize = HumanDuration(options.timeout);
    let token = random_token();
    let mut config = manifest.config.clone();
    merge_json(&mut config, &options.config);
    config.insert(TOKEN_KEY.to_string(), Value::from(token.clone()));
    // Short prefix: socket paths must stay under the 107-byte limit.
    let runtime = tempfile::Builder::new().prefix("pvc-").tempdir()?;
    let tasks = TaskTracker::new();
    let processes = ProcessManager::new()?;
    let checker = Checker {
        manifest,
        config,
        token,
        timeout: options.timeout,
        runtime,
        processes,
        tasks,
        logs: Arc::new(LogBuffer::new(256)),
        starts: AtomicU32::new(0),
    };
    let checks = checker.check_all().await;
    let report = Report {
        plugin: checker.manifest.name.clone(),
        executable: checker.manifest.exec.clone(),
        args: checker.manifest.args.clone(),
        checks,
    };
    checker.finish().await;
    Ok(report)
}

/// Not a secret: it only has to be unlikely to appear in a reply by chance.
fn random_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    let word = || {
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
    };
    format!("{:016x}{:016x}", word(), word())
}

/// The private supervisor one run uses.
struct Checker {
    /// With `timeouts.start` and `.initialize` set to the checker's timeout.
    manifest: Manifest,
    /// The manifest's config, `--config`, and the token.
    config: Map<String, Value>,
    token: String,
    timeout: Duration,
    /// Holds every instance's socket directory; removed on drop.
    runtime: tempfile::TempDir,
    processes: ProcessManager,
    /// Reapers and output readers of every child, waited for in `finish`.
    tasks: TaskTracker,
    /// The plugin's output; start errors quote its last lines.
    logs: Arc<LogBuffer>,
    /// Instances started so far, for unique instance ids.
    starts: AtomicU32,
}

/// Why a call the checker made did not answer OK.
enum CallError {
    Status(tonic::Status),
    Timeout(Duration),
}

impl CallError {
    fn code(&self) -> Option<Code> {
        match self {
            CallError::Status(s) => Some(s.code()),
            CallError::Timeout(_) => None,
        }
    }

    /// The call did not complete as a call: no answer, or the connection broke.
    fn is_transport(&self) -> bool {
        matches!(
            self.code(),
            None | Some(
                Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
            )
        )
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::Status(s) => write!(f, "{}", status_text(s)),
            CallError::Timeout(t) => write!(f, "no answer within {}ms", t.as_millis()),
        }
    }
}

/// `INVALID_ARGUMENT: the message`.
fn status_text(status: &tonic::Status) -> String {
    let mut name = String::new();
    for (i, c) in format!("{:?}", status.code()).chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    if status.message().is_empty() {
        name
    } else {
        format!("{name}: {}", status.message())
    }
}

/// Awaits a unary call for at most `limit`.
async fn deadline<T>(
    limit: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, CallError> {
    match tokio::time::timeout(limit, call).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        // The request's own deadline (grpc-timeout, the same limit) may
        // fire first: that is no answer in time too.
        Ok(Err(status))
            if matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded)
                && status.message() == "Timeout expired" =>
        {
            Err(CallError::Timeout(limit))
        }
        Ok(Err(status)) => Err(CallError::Status(status)),
        Err(_) => Err(CallError::Timeout(limit)),
    }
}

fn request<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

/// Up to `max` bytes of `bytes` as quoted text, for messages.
fn preview(bytes: &[u8], max: usize) -> String {
    let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(max)]).into_owned();
    let more = if bytes.len() > max { "..." } else { "" };
    format!("{shown:?}{more}")
}

fn describe_state(s: &ExportStateResponse) -> String {
    let plural = if s.state.len() == 1 { "" } else { "s" };
    format!(
        "{} byte{plural} {} with state version {}",
        s.state.len(),
        preview(&s.state, 48),
        s.state_version
    )
}

/// The reason to skip a rule on a plugin that has already exited.
fn exited(instance: &Instance, rule: Rule) -> Option<Check> {
    let status = instance.child.try_status()?;
    Some(Check::skip(
        rule,
        format!("the plugin {status} during an earlier rule"),
    ))
}

/// Reads lines from `pipe` until it closes or `until`.
async fn read_lines(pipe: Option<pipe::Receiver>, until: tokio::time::Instant) -> Vec<String> {
    let Some(pipe) = pipe else {
        return Vec::new();
    };
    let mut reader = LineReader::new(pipe);
    let mut lines = Vec::new();
    while let Ok(Some(line)) = tokio::time::timeout_at(until, reader.next_line()).await {
        if lines.len() < KEPT_LINES {
            lines.push(line);
        }
    }
    lines
}

impl Checker {
    async fn check_all(&self) -> Vec<Check> {
        let mut checks = vec![self.cookie().await];
        let mut first = match self.start().await {
            Ok(instance) => instance,
            Err(e) => {
                checks.push(Check::fail(Rule::Handshake, e.to_string()));
                for rule in &Rule::ALL[Rule::Handshake.number()..] {
                    checks.push(Check::skip(*rule, "the plugin did not start (rule 2)"));
                }
                return checks;
            }
        };
        checks.push(Check::pass(
            Rule::Handshake,
            format!(
                "`{}` after {}ms; the socket's peer is the child (pid {})",
                Handshake {
                    protocol_version: PROTOCOL_VERSION,
                    network: handshake::NETWORK_UNIX.into(),
                    address: first.socket_dir.join(SOCKET_FILE).display().to_string(),
                },
                first.spawned_at.elapsed().as_millis(),
                first.child.pid()
            ),
        ));
        let (check, declared) = self.initialize(&mut first).await;
        checks.push(check);
        match declared {
            Some(declared) => self.check_initialized(&first, &declared, &mut checks).await,
            None => {
                for rule in &Rule::ALL[Rule::Initialize.number()..Rule::Shutdown.number()] {
                    checks.push(Check::skip(*rule, "Initialize failed (rule 3)"));
                }
            }
        }
        instance::kill_and_reap(&first.child).await;
        drop(first);
        checks.push(self.sigterm().await);
        // Rule 12 runs on the first instance, before Shutdown, but is listed
        // last (rules keep their numbers).
        if let Some(at) = checks.iter().position(|c| c.rule == Rule::ValidateConfig) {
            let validate = checks.remove(at);
            checks.push(validate);
        } else {
            checks.push(Check::skip(
                Rule::ValidateConfig,
                "Initialize failed (rule 3)",
            ));
        }
        checks
    }

    /// Rules 4 to 10, on the initialized first instance.
    async fn check_initialized(&self, a: &Instance, declared: &Declared, checks: &mut Vec<Check>) {
        let first = declared.methods.first().map(String::as_str);
        let no_method = |rule| Check::skip(rule, "the plugin lists no methods (rule 3)");
        checks.push(match exited(a, Rule::Health) {
            Some(skip) => skip,
            None => self.health(a).await,
        });
        checks.push(match exited(a, Rule::UnknownMethod) {
            Some(skip) => skip,
            None => self.unknown_method(a).await,
        });
        checks.push(match (exited(a, Rule::Handle), first) {
            (Some(skip), _) => skip,
            (None, None) => no_method(Rule::Handle),
            (None, Some(method)) => self.handle(a, method).await,
        });
        checks.push(
            match (exited(a, Rule::Stream), declared.stream_methods.first()) {
                (Some(skip), _) => skip,
                (None, None) => Check::skip(
                    Rule::Stream,
                    "plugin does not stream: Initialize's stream_methods is empty",
                ),
                (None, Some(method)) => self.stream(a, method).await,
            },
        );
        checks.push(match (exited(a, Rule::Session), declared.sessions, first) {
            (Some(skip), _, _) => skip,
            (None, false, _) => Check::skip(
                Rule::Session,
                "plugin does not offer sessions (optional): Initialize's sessions is false",
            ),
            (None, true, None) => no_method(Rule::Session),
            (None, true, Some(method)) => self.session(a, method).await,
        });
        checks.push(match exited(a, Rule::State) {
            Some(skip) => skip,
            None => self.state(a).await,
        });
        checks.push(match exited(a, Rule::ValidateConfig) {
            Some(skip) => skip,
            None => self.validate_config(a, declared).await,
        });
        checks.push(match exited(a, Rule::Shutdown) {
            Some(skip) => skip,
            None => self.shutdown(a, first).await,
        });
    }

    /// Kills nothing (every instance is gone by now) but waits for the
    /// reapers, so no child is left unreaped, and for the output readers.
    async fn finish(self) {
        self.tasks.close();
        if tokio::time::timeout(REAP_WAIT, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("a plugin's output stayed open after it exited; not waiting for it");
        }
    }

    /// Starts an instance: spawn, handshake, peer-checked connect.
    async fn start(&self) -> Result<Instance, StartError> {
        let n = self.starts.fetch_add(1, Ordering::Relaxed) + 1;
        instance::spawn(StartContext {
            manifest: &self.manifest,
            instance_id: format!("{}-0-{n}", self.manifest.name),
            runtime_dir: self.runtime.path(),
            env: self.manifest.env.clone().into_iter().collect(),
            logs: self.logs.clone(),
            processes: &self.processes,
            tasks: &self.tasks,
            // The protocol is checked, not the manifest's limits or hardening.
            isolation: None,
            survive: None,
        })
        .await
    }

    async fn call(
        &self,
        a: &Instance,
        method: &str,
        payload: &'static [u8],
    ) -> Result<HandleResponse, CallError> {
        let message = HandleRequest {
            method: method.to_string(),
            payload: Bytes::from_static(payload),
            metadata: Default::default(),
        };
        deadline(
            self.timeout,
            a.client.clone().handle(request(message, self.timeout)),
        )
        .await
    }

    async fn export(&self, a: &Instance) -> Result<ExportStateResponse, CallError> {
        let mut client = a.client.clone();
        let call = client.export_state(request(ExportStateRequest {}, self.timeout));
        deadline(self.timeout, call).await
    }

    /// Rule 1: the executable, run with the handshake variables but no
    /// cookie, must explain itself on stderr and exit non-zero, without
    /// announcing or creating the socket.
    async fn cookie(&self) -> Check {
        let rule = Rule::Cookie;
        let m = &self.manifest;
        let dir = self.runtime.path().join("cookie");
        if let Err(e) = std::fs::create_dir(&dir) {
            return Check::fail(rule, format!("cannot create {}: {e}", dir.display()));
        }
        let socket = dir.join(SOCKET_FILE);
        let mut env: Vec<(OsString, OsString)> = vec![
            ("PATH".into(), DEFAULT_PATH.into()),
            (handshake::ENV_SOCKET.into(), socket.clone().into()),
            (handshake::ENV_NAME.into(), m.name.clone().into()),
            (
                "PLUGVISOR_INSTANCE_ID".into(),
                format!("{}-0-0", m.name).into(),
            ),
            (
                handshake::ENV_PROTOCOL_VERSIONS.into(),
                PROTOCOL_VERSION.to_string().into(),
            ),
        ];
        env.extend(m.env.iter().map(|(k, v)| (k.into(), v.into())));
        let spec = SpawnSpec {
            program: m.exec.clone(),
            args: m.args.clone(),
            env,
            cwd: m.dir.clone(),
        };
        let started = Instant::now();
        let mut child = match self.processes.spawn(&spec).await {
            Ok(child) => child,
            Err(e) => return Check::fail(rule, format!("cannot start {}: {e}", m.exec.display())),
        };
        let until = tokio::time::Instant::now() + COOKIE_EXIT;
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let (status, out, err) = tokio::join!(
            async { tokio::time::timeout_at(until, child.wait()).await.ok() },
            read_lines(stdout, until),
            read_lines(stderr, until),
        );
        let elapsed = started.elapsed().as_millis();
        let socket_created = std::fs::symlink_metadata(&socket).is_ok();
        instance::kill_and_reap(&child).await;

        let mut problems = Vec::new();
        match status {
            None => problems.push(format!(
                "was still running after {}s (killed)",
                COOKIE_EXIT.as_secs()
            )),
            Some(s) if s.success() => {
                problems.push("exited with code 0; it must exit non-zero".into())
            }
            Some(_) => {}
        }
        let announced = out
            .iter()
            .find(|l| !matches!(Handshake::parse(l), Err(HandshakeError::NotAHandshake)));
        if let Some(line) = announced {
            problems.push(format!("printed a handshake line `{line}`"));
        }
        if socket_created {
            problems.push(format!("created the socket {}", socket.display()));
        }
        let said = err.iter().find(|l| !l.trim().is_empty());
        if said.is_none() {
            problems.push("printed nothing on stderr; it should say it is a plugvisor plugin, started by a supervisor".into());
        }
        match (status, said) {
            (Some(status), Some(said)) if problems.is_empty() => Check::pass(
                rule,
                format!(
                    "{status} after {elapsed}ms; stderr: {}",
                    preview(said.as_bytes(), 100)
                ),
            ),
            _ => Check::fail(
                rule,
                format!(
                    "run without {}, it {}",
                    handshake::ENV_MAGIC_COOKIE,
                    problems.join("; ")
                ),
            ),
        }
    }

    /// Rule 3: Initialize with the token in the config. Returns the declared
    /// methods when Initialize succeeded.
    async fn initialize(&self, a: &mut Instance) -> (Check, Option<Declared>) {
        let rule = Rule::Initialize;
        // First an Initialize asking for a version the plugin never
        // announced: it must be refused (PROTOCOL.md, "Protocol versions").
        let unannounced = self.initialize_with_version(a, UNANNOUNCED_VERSION).await;
        let response = match instance::initialize(a, &self.manifest, &self.config, None).await {
            Ok(response) => response,
            Err(e) => return (Check::fail(rule, e.to_string()), None),
        };
        let mut problems = Vec::new();
        if unannounced.is_ok() {
            problems.push(format!(
                "Initialize asking for protocol version {UNANNOUNCED_VERSION}, which the plugin never announced, succeeded; it must be refused (FAILED_PRECONDITION)"
            ));
        }
        let mut notes = vec![format!(
            "protocol version {}, methods: {}; stream methods: {}",
            response.protocol_version,
            response.methods.join(", "),
            if response.stream_methods.is_empty() {
                "none".to_string()
            } else {
                response.stream_methods.join(", ")
            }
        )];
        if response.protocol_version != PROTOCOL_VERSION {
            problems.push(format!(
                "the response has protocol_version {}, expected {PROTOCOL_VERSION}",
                response.protocol_version
            ));
        }
        if response.methods.is_empty() {
            problems.push("the response lists no methods; list every method Handle serves".into());
        }
        if response.methods.iter().any(|m| m == "config") {
            let token = self.token.as_bytes();
            match self.call(a, "config", b"").await {
                Ok(reply) if reply.payload.windows(token.len()).any(|w| w == token) => {
                    notes.push("its `config` method returned the token sent in Initialize".into())
                }
                Ok(reply) => problems.push(format!(
                    "`config` replied {} without the token sent in Initialize's config (key `{TOKEN_KEY}`)",
                    preview(&reply.payload, 48)
                )),
                Err(e) => problems.push(format!("`config` failed: {e}")),
            }
        } else {
            notes.push(
                "config delivery checked only by Initialize succeeding (no `config` method)".into(),
            );
        }
        (
            Check::verdict(rule, problems, notes),
            Some(Declared {
                methods: response.methods,
                stream_methods: response.stream_methods,
                sessions: response.sessions,
            }),
        )
    }

    /// Initialize with `version` in place of the handshake's.
    async fn initialize_with_version(&self, a: &Instance, version: u32) -> Result<(), CallError> {
        let message = plugvisor_proto::InitializeRequest {
            plugin_name: self.manifest.name.clone(),
            instance_id: a.id.clone(),
            config_json: serde_json::Value::Object(self.config.clone()).to_string(),
            protocol_version: version,
            restored_state: None,
        };
        deadline(
            self.timeout,
            a.client.clone().initialize(request(message, self.timeout)),
        )
        .await
        .map(drop)
    }

    /// Rule 4: the plugin's own HealthCheck, and grpc.health.v1 if served.
    async fn health(&self, a: &Instance) -> Check {
        use health_check_response::Status;
        let rule = Rule::Health;
        let started = Instant::now();
        let mut client = a.client.clone();
        let call = client.health_check(request(HealthCheckRequest {}, HEALTH_TIMEOUT));
        let response = match deadline(HEALTH_TIMEOUT, call).await {
            Ok(response) => response,
            Err(e) => return Check::fail(rule, format!("HealthCheck: {e}")),
        };
        let status = Status::try_from(response.status).unwrap_or(Status::Unspecified);
        let message = if response.message.is_empty() {
            String::new()
        } else {
            format!(" ({})", response.message)
        };
        let own = format!(
            "HealthCheck answered {}{message} in {}ms",
            status.as_str_name(),
            started.elapsed().as_millis()
        );
        if !matches!(status, Status::Serving | Status::Degraded) {
            return Check::fail(rule, format!("{own}; expected SERVING (or DEGRADED)"));
        }
        match self.standard_health(a).await {
            Ok(true) => Check::pass(rule, format!("{own}; grpc.health.v1 Check: SERVING")),
            Ok(false) => {
                let mut check = Check::pass(rule, own);
                check.warnings.push(
                    "grpc.health.v1.Health is not served, so stock gRPC probes (grpc_health_probe, Kubernetes) cannot check this plugin".into(),
                );
                check
            }
            Err(why) => Check::fail(rule, format!("{own}, but grpc.health.v1 Check {why}")),
        }
    }

    /// grpc.health.v1 `Check("")` over a second connection: `Ok(true)` when
    /// SERVING, `Ok(false)` when the service is absent.
    async fn standard_health(&self, a: &Instance) -> Result<bool, String> {
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::health_client::HealthClient;
        let socket = a.socket_dir.join(SOCKET_FILE);
        let connect = plugvisor::transport::connect_plugin(&socket, a.child.pid());
        let channel = match tokio::time::timeout(HEALTH_TIMEOUT, connect).await {
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => return Err(format!("could not connect: {e}")),
            Err(_) => {
                return Err(format!(
                    "could not connect within {}ms",
                    HEALTH_TIMEOUT.as_millis()
                ));
            }
        };
        let message = tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        };
        let mut client = HealthClient::with_origin(channel, plugvisor::transport::origin());
        let call = client.check(request(message, HEALTH_TIMEOUT));
        match deadline(HEALTH_TIMEOUT, call).await {
            Ok(response) => match ServingStatus::try_from(response.status) {
                Ok(ServingStatus::Serving) => Ok(true),
                Ok(other) => Err(format!("answered {}", other.as_str_name())),
                Err(_) => Err(format!("answered an unknown status {}", response.status)),
            },
            Err(e) if e.code() == Some(Code::Unimplemented) => Ok(false),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Rule 5.
    async fn unknown_method(&self, a: &Instance) -> Check {
        let rule = Rule::UnknownMethod;
        match self.call(a, UNKNOWN_METHOD, PROBE_PAYLOAD).await {
            Err(e) if e.code() == Some(Code::Unimplemented) => {
                Check::pass(rule, format!("`{UNKNOWN_METHOD}` answered {e}"))
            }
            Ok(_) => Check::fail(
                rule,
                format!("`{UNKNOWN_METHOD}` answered OK; expected UNIMPLEMENTED"),
            ),
            Err(e) => Check::fail(
                rule,
                format!("`{UNKNOWN_METHOD}` answered {e}; expected UNIMPLEMENTED"),
            ),
        }
    }

    /// Rule 6: the first listed method is served (any answer but
    /// UNIMPLEMENTED or a broken call).
    async fn handle(&self, a: &Instance, method: &str) -> Check {
        let rule = Rule::Handle;
        let error = match self.call(a, method, PROBE_PAYLOAD).await {
            Ok(reply) => {
                return Check::pass(
                    rule,
                    format!("`{method}` answered OK ({} bytes)", reply.payload.len()),
                );
            }
            Err(e) => e,
        };
        // A crash shows up as a broken call; give the reaper a moment to see it.
        if let Ok(status) = tokio::time::timeout(Duration::from_millis(100), a.child.wait()).await {
            return Check::fail(
                rule,
                format!("the plugin {status} during `{method}` ({error})"),
            );
        }
        if error.code() == Some(Code::Unimplemented) {
            Check::fail(
                rule,
                format!("`{method}` is listed in Initialize's methods but answered {error}"),
            )
        } else if error.is_transport() {
            Check::fail(rule, format!("`{method}` did not complete: {error}"))
        } else {
            Check::pass(
                rule,
                format!(
                    "`{method}` answered {error}: an application error, so the method is served"
                ),
            )
        }
    }

    /// Rule 7: three chunks to the first declared stream method; the reply
    /// stream must end. UNIMPLEMENTED fails: the method was declared.
    async fn stream(&self, a: &Instance, method: &str) -> Check {
        let rule = Rule::Stream;
        let chunks: Vec<Chunk> = (1..=3)
            .map(|i| Chunk {
                method: if i == 1 {
                    method.to_string()
                } else {
                    String::new()
                },
                data: Bytes::from(format!("conformance chunk {i};")),
                metadata: Default::default(),
                state_changed: false,
            })
            .collect();
        let sent: usize = chunks.iter().map(|c| c.data.len()).sum();
        let mut client = a.client.clone();
        let outbound = request(tokio_stream::iter(chunks), self.timeout);
        let round_trip = async move {
            let mut replies = client.handle_stream(outbound).await?.into_inner();
            let (mut count, mut bytes) = (0, 0);
            while let Some(chunk) = replies.message().await? {
                count += 1;
                bytes += chunk.data.len();
            }
            Ok::<_, tonic::Status>((count, bytes))
        };
        match tokio::time::timeout(self.timeout, round_trip).await {
            Ok(Ok((count, bytes))) => Check::pass(
                rule,
                format!(
                    "sent 3 chunks ({sent} bytes) to `{method}`, received {count} chunks ({bytes} bytes) and the end of the stream"
                ),
            ),
            Ok(Err(s)) if s.code() == Code::Unimplemented => Check::fail(
                rule,
                format!(
                    "`{method}` is declared in Initialize's stream_methods, but HandleStream answered {}",
                    status_text(&s)
                ),
            ),
            Ok(Err(s)) => Check::fail(
                rule,
                format!("HandleStream on `{method}` failed: {}", status_text(&s)),
            ),
            Err(_) => Check::fail(
                rule,
                format!(
                    "the stream on `{method}` did not complete within {}ms",
                    self.timeout.as_millis()
                ),
            ),
        }
    }

    /// Rule 8 (when offered): on one Session, two calls to the first listed
    /// method and one to an unknown method, sent together; each must be
    /// answered under its own id (the unknown one with UNIMPLEMENTED), and
    /// the plugin must end the session once the checker closes its side.
    async fn session(&self, a: &Instance, method: &str) -> Check {
        use plugvisor_proto::SessionRequest;
        let rule = Rule::Session;
        let call = |id: u64, method: &str| SessionRequest {
            id,
            call: Some(HandleRequest {
                method: method.to_string(),
                payload: Bytes::from_static(PROBE_PAYLOAD),
                metadata: Default::default(),
            }),
            cancel: false,
            timeout_ms: self.timeout.as_millis() as u64,
        };
        let requests = vec![call(7, method), call(8, UNKNOWN_METHOD), call(9, method)];
        let mut client = a.client.clone();
        let round_trip = async move {
            let mut replies = client
                .session(request(tokio_stream::iter(requests), self.timeout))
                .await?
                .into_inner();
            let mut answers = std::collections::BTreeMap::new();
            while let Some(reply) = replies.message().await? {
                answers.insert(reply.id, reply);
            }
            Ok::<_, tonic::Status>(answers)
        };
        let answers = match tokio::time::timeout(self.timeout, round_trip).await {
            Ok(Ok(answers)) => answers,
            Ok(Err(s)) => {
                return Check::fail(
                    rule,
                    format!(
                        "Initialize offers sessions, but Session failed: {}",
                        status_text(&s)
                    ),
                );
            }
            Err(_) => {
                return Check::fail(
                    rule,
                    format!(
                        "the session did not answer its 3 calls and end within {}ms of the checker closing its side",
                        self.timeout.as_millis()
                    ),
                );
            }
        };
        let ids: Vec<u64> = answers.keys().copied().collect();
        if ids != [7, 8, 9] {
            return Check::fail(
                rule,
                format!(
                    "calls 7, 8 and 9 were answered with ids {ids:?}; each call must be answered once, under its id"
                ),
            );
        }
        let unimplemented = Code::Unimplemented as i32;
        for id in [7, 9] {
            if answers[&id].code == unimplemented {
                return Check::fail(
                    rule,
                    format!(
                        "`{method}` is listed in Initialize's methods but call {id} on the session answered UNIMPLEMENTED"
                    ),
                );
            }
        }
        if answers[&8].code != unimplemented {
            return Check::fail(
                rule,
                format!(
                    "`{UNKNOWN_METHOD}` on the session answered code {}; expected UNIMPLEMENTED ({unimplemented})",
                    answers[&8].code
                ),
            );
        }
        Check::pass(
            rule,
            format!(
                "3 calls answered by id (`{method}` twice, UNIMPLEMENTED once), then the session ended"
            ),
        )
    }

    /// Rule 9: a second instance initialized with the first one's export
    /// must export the same.
    async fn state(&self, a: &Instance) -> Check {
        let rule = Rule::State;
        let exported = match self.export(a).await {
            Ok(state) => state,
            Err(e) => return Check::fail(rule, format!("ExportState failed: {e}")),
        };
        if exported.state.is_empty() {
            return Check::pass(
                rule,
                format!(
                    "ExportState returned an empty state (state version {}); passes trivially, there is nothing to restore",
                    exported.state_version
                ),
            );
        }
        let mut b = match self.start().await {
            Ok(b) => b,
            Err(e) => return Check::fail(rule, format!("a second instance did not start: {e}")),
        };
        let restored = RestoredState {
            state: exported.state.clone(),
            state_version: exported.state_version,
        };
        let check = match instance::initialize(&mut b, &self.manifest, &self.config, Some(restored))
            .await
        {
            Err(e) => Check::fail(
                rule,
                format!(
                    "a second instance, given the exported {}, failed: {e}",
                    describe_state(&exported)
                ),
            ),
            Ok(_) => match self.export(&b).await {
                Err(e) => Check::fail(
                    rule,
                    format!("the restored instance's ExportState failed: {e}"),
                ),
                Ok(again) if again == exported => Check::pass(
                    rule,
                    format!(
                        "a second instance restored from {} exports it unchanged",
                        describe_state(&exported)
                    ),
                ),
                Ok(again) => Check::fail(
                    rule,
                    format!(
                        "the restored instance exports {}, but it was given {}",
                        describe_state(&again),
                        describe_state(&exported)
                    ),
                ),
            },
        };
        instance::stop(&mut b, AUX_STOP).await;
        check
    }

    /// Rule 12: ValidateConfig is optional (UNIMPLEMENTED skips the rule).
    /// A plugin that serves it is asked about the config it runs with and
    /// about a changed one: each must be answered within the deadline, a
    /// refusal must give the operator a reason, and validating must change
    /// nothing (its `config` method, if any, still shows the running token).
    async fn validate_config(&self, a: &Instance, declared: &Declared) -> Check {
        let rule = Rule::ValidateConfig;
        let mut changed = self.config.clone();
        changed.insert(
            TOKEN_KEY.to_string(),
            Value::from(format!("{}-validated-only", self.token)),
        );
        let asks = [
            (
                "the config it runs with",
                Value::Object(self.config.clone()),
            ),
            ("a changed config", Value::Object(changed)),
        ];
        let (mut problems, mut notes, mut warnings) = (Vec::new(), Vec::new(), Vec::new());
        for (i, (what, config)) in asks.into_iter().enumerate() {
            let message = ValidateConfigRequest {
                config_json: config.to_string(),
            };
            let mut client = a.client.clone();
            let answer = deadline(
                self.timeout,
                client.validate_config(request(message, self.timeout)),
            )
            .await;
            match answer {
                Err(e) if e.code() == Some(Code::Unimplemented) && i == 0 => {
                    return Check::skip(
                        rule,
                        "plugin does not validate configs (optional): ValidateConfig answered UNIMPLEMENTED, so every config change is rolled out",
                    );
                }
                Err(e) => {
                    let hung = matches!(e, CallError::Timeout(_));
                    problems.push(format!("ValidateConfig of {what}: {e}"));
                    if hung {
                        // The next ask would hang as well.
                        break;
                    }
                }
                Ok(answer) if answer.accepted => notes.push(format!("accepted {what}")),
                Ok(answer) if answer.reason.trim().is_empty() => problems.push(format!(
                    "refused {what} without a reason; the operator would see none"
                )),
                Ok(answer) => {
                    notes.push(format!("refused {what}: {}", answer.reason));
                    if i == 0 {
                        warnings.push(
                            "it refuses the config Initialize accepted; every config change will be refused"
                                .to_string(),
                        );
                    }
                }
            }
        }
        if let Some(status) = a.child.try_status() {
            problems.push(format!("the plugin {status} after ValidateConfig"));
        } else if declared.methods.iter().any(|m| m == "config") {
            let token = self.token.as_bytes();
            let validated = format!("{}-validated-only", self.token);
            match self.call(a, "config", b"").await {
                Ok(reply)
                    if reply
                        .payload
                        .windows(validated.len())
                        .any(|w| w == validated.as_bytes()) =>
                {
                    problems.push(
                        "validating the changed config applied it: its `config` method returns the validated token".into(),
                    )
                }
                Ok(reply) if reply.payload.windows(token.len()).any(|w| w == token) => {
                    notes.push("its `config` method still returns the running config".into())
                }
                Ok(reply) => problems.push(format!(
                    "after ValidateConfig, `config` replied {} without the running config's token",
                    preview(&reply.payload, 48)
                )),
                Err(e) => problems.push(format!("`config` after ValidateConfig failed: {e}")),
            }
        }
        let mut check = Check::verdict(rule, problems, notes);
        check.warnings = warnings;
        check
    }

    /// Rule 10: Shutdown(2s) with a Handle call in flight; the call must end
    /// and the process exit 0 within the deadline plus 1s.
    async fn shutdown(&self, a: &Instance, method: Option<&str>) -> Check {
        let rule = Rule::Shutdown;
        let limit = SHUTDOWN_DEADLINE + SHUTDOWN_GRACE;
        let (mut call_client, mut stop_client) = (a.client.clone(), a.client.clone());
        // Both go over the same connection, the call first; a quick method
        // may still finish before Shutdown arrives, which is fine too.
        let in_flight = async {
            let method = method?;
            let message = HandleRequest {
                method: method.to_string(),
                payload: Bytes::from_static(PROBE_PAYLOAD),
                metadata: Default::default(),
            };
            Some(deadline(limit, call_client.handle(request(message, limit))).await)
        };
        let stop = async {
            let sent = tokio::time::Instant::now();
            let message = ShutdownRequest {
                deadline_ms: SHUTDOWN_DEADLINE.as_millis() as u64,
            };
            let reply = deadline(limit, stop_client.shutdown(request(message, limit))).await;
            let exit = tokio::time::timeout_at(sent + limit, a.child.wait())
                .await
                .ok();
            (reply, exit, sent.elapsed().as_millis())
        };
        let (call, (reply, exit, elapsed)) = tokio::join!(in_flight, stop);

        let (mut problems, mut notes) = (Vec::new(), Vec::new());
        let asked = format!("Shutdown(deadline {}ms)", SHUTDOWN_DEADLINE.as_millis());
        match exit {
            Some(status) if status.success() => {
                notes.push(format!("exited with code 0 {elapsed}ms after {asked}"))
            }
            Some(status) => problems.push(format!("{status} after {asked}; expected exit code 0")),
            None => problems.push(format!(
                "still running {}ms after {asked} (killed)",
                limit.as_millis()
            )),
        }
        match reply {
            Ok(_) => {}
            Err(e) if e.code() == Some(Code::Unimplemented) => {
                problems.push(format!("Shutdown answered {e}"))
            }
            Err(e @ CallError::Timeout(_)) => problems.push(format!("Shutdown: {e}")),
            Err(e) => notes.push(format!("the Shutdown reply was lost ({e})")),
        }
        match (method, call) {
            (Some(m), Some(Ok(_))) => notes.push(format!("the in-flight `{m}` call completed")),
            (Some(m), Some(Err(e @ CallError::Timeout(_)))) => {
                problems.push(format!("the in-flight `{m}` call hung: {e}"))
            }
            (Some(m), Some(Err(e))) => {
                notes.push(format!("the in-flight `{m}` call ended with {e}"))
            }
            _ => notes.push("no method to keep in flight".into()),
        }
        instance::kill_and_reap(&a.child).await;
        Check::verdict(rule, problems, notes)
    }

    /// Rule 11: a fresh, initialized instance gets SIGTERM through its pidfd.
    async fn sigterm(&self) -> Check {
        let rule = Rule::Sigterm;
        let mut c = match self.start().await {
            Ok(c) => c,
            Err(e) => return Check::fail(rule, format!("a fresh instance did not start: {e}")),
        };
        // Like a ready plugin; whether Initialize works is rule 3's business.
        let _ = instance::initialize(&mut c, &self.manifest, &self.config, None).await;
        let sent = Instant::now();
        let check = match c.child.signal(libc::SIGTERM) {
            Err(e) => Check::fail(rule, format!("cannot send SIGTERM through the pidfd: {e}")),
            Ok(()) => match tokio::time::timeout(SIGTERM_EXIT, c.child.wait()).await {
                Ok(status) if status.success() => Check::pass(
                    rule,
                    format!(
                        "exited with code 0 {}ms after SIGTERM",
                        sent.elapsed().as_millis()
                    ),
                ),
                Ok(status) => Check::fail(
                    rule,
                    format!("on SIGTERM the plugin {status}; expected exit code 0"),
                ),
                Err(_) => Check::fail(
                    rule,
                    format!(
                        "still running {}s after SIGTERM (killed)",
                        SIGTERM_EXIT.as_secs()
                    ),
                ),
            },
        };
        instance::kill_and_reap(&c.child).await;
        check
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitizes_file_names_into_plugin_names() {
        assert_eq!(sanitize_name("echo-plugin"), "echo-plugin");
        assert_eq!(sanitize_name("My Plugin.py"), "my-plugin-py");
        assert_eq!(sanitize_name("__x"), "x");
        assert_eq!(sanitize_name("...."), "plugin");
        assert_eq!(sanitize_name(&"a".repeat(80)).len(), 63);
        for name in ["echo-plugin", "My Plugin.py", "....", "-_9z"] {
            plugvisor::manifest::validate_name(&sanitize_name(name)).unwrap();
        }
    }

    #[test]
    fn builds_a_manifest_for_a_bare_executable() {
        let m = manifest_for_executable(Path::new("/usr/bin/Some Tool")).unwrap();
        assert_eq!(m.name, "some-tool");
        assert_eq!(m.exec, Path::new("/usr/bin/Some Tool"));
        assert_eq!(m.dir, Path::new("/usr/bin"));
        assert!(m.args.is_empty() && m.config.is_empty());
    }

    #[test]
    fn names_status_codes_as_grpc_does() {
        let s = tonic::Status::invalid_argument("bad");
        assert_eq!(status_text(&s), "INVALID_ARGUMENT: bad");
        assert_eq!(
            status_text(&tonic::Status::unimplemented("")),
            "UNIMPLEMENTED"
        );
    }
}
