//! The daemon's control API (`plugvisor.v1.Control`) on a Unix socket.
//!
//! The socket is created with mode 0660, and every request is checked against
//! the caller's SO_PEERCRED credentials: root, the daemon's own user, and the
//! configured uids and gids are allowed; anyone else gets PERMISSION_DENIED.

use crate::connections::Connections;
use crate::reload::Reloader;
use plugvisor::supervisor::{Event, PluginInfo, Supervisor};
use plugvisor_proto as pb;
use plugvisor_proto::control_server::{Control, ControlServer};
use prost::bytes::Bytes;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Who may use the control socket, besides root and the daemon's own user.
#[derive(Debug, Clone)]
pub struct Access {
    pub uids: Vec<u32>,
    /// Admitted when the caller's primary group or any of its supplementary
    /// groups is one of these.
    pub gids: Vec<u32>,
    /// Where procfs is mounted: a caller's supplementary groups are read
    /// from `<proc_root>/<pid>/status`, as SO_PEERCRED carries only the
    /// primary group.
    pub proc_root: PathBuf,
}

impl Default for Access {
    fn default() -> Self {
        Access {
            uids: Vec::new(),
            gids: Vec::new(),
            proc_root: PathBuf::from("/proc"),
        }
    }
}

/// The credentials of a control socket's peer, as SO_PEERCRED gave them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

/// The supplementary groups in the text of a `/proc/<pid>/status`, provided
/// the process still has the effective uid and gid the socket recorded:
/// should the peer have exited and its pid gone to another process, that
/// process's groups must not count.
pub fn supplementary_groups(status: &str, uid: u32, gid: u32) -> Option<Vec<u32>> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|rest| rest.split_whitespace().collect::<Vec<_>>())
    };
    // `Uid:` and `Gid:` list real, effective, saved and filesystem ids.
    let effective = |name: &str| field(name)?.get(1)?.parse::<u32>().ok();
    if effective("Uid:")? != uid || effective("Gid:")? != gid {
        return None;
    }
    field("Groups:")?.iter().map(|g| g.parse().ok()).collect()
}

impl Access {
    /// Checks the credentials tonic recorded for the connection.
    fn check<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let cred = request
            .extensions()
            .get::<tonic::transport::server::UdsConnectInfo>()
            .and_then(|info| info.peer_cred);
        let Some(cred) = cred else {
            return Err(Status::permission_denied(
                "the control socket could not read the caller's credentials",
            ));
        };
        self.admit(Peer {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
        })
        .map_err(Status::permission_denied)
    }

    /// Admits root, the daemon's own user, the configured users, and members
    /// (primary or supplementary) of the configured groups.
    pub fn admit(&self, peer: Peer) -> Result<(), String> {
        let own = nix::unistd::geteuid().as_raw();
        if peer.uid == 0
            || peer.uid == own
            || self.uids.contains(&peer.uid)
            || self.gids.contains(&peer.gid)
        {
            return Ok(());
        }
        let supplementary = match (self.gids.is_empty(), peer.pid) {
            (false, Some(pid)) => {
                let path = self.proc_root.join(pid.to_string()).join("status");
                match std::fs::read_to_string(&path) {
                    Ok(status) => supplementary_groups(&status, peer.uid, peer.gid),
                    Err(e) => {
                        tracing::debug!(
                            "cannot read the control peer's groups from {}: {e}",
                            path.display()
                        );
                        None
                    }
                }
            }
            _ => None,
        };
        if supplementary
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|g| self.gids.contains(g))
        {
            return Ok(());
        }
        Err(format!(
            "permission denied: uid {} gid {} may not use this control socket; allow it with control_uids or control_gids in the supervisor config",
            peer.uid, peer.gid
        ))
    }
}

/// The payload of a `CallStream` request: the first chunk's data and every
/// later chunk's, up to the chunk marked `end_of_input`. A request stream
/// that ends (or fails) before that mark yields an error, which cancels the
/// plugin's call: the client went away mid-upload.
fn upload_of(
    first: pb::CallChunk,
    mut rest: Streaming<pb::CallChunk>,
) -> impl Stream<Item = Result<Bytes, Status>> + Send + 'static {
    async_stream::stream! {
        if !first.data.is_empty() {
            yield Ok(first.data);
        }
        if first.end_of_input {
            return;
        }
        loop {
            match rest.message().await {
                Ok(Some(chunk)) => {
                    if !chunk.data.is_empty() {
                        yield Ok(chunk.data);
                    }
                    if chunk.end_of_input {
                        return;
                    }
                }
                Ok(None) => {
                    yield Err(Status::cancelled(
                        "the request stream ended without a chunk marked end_of_input: the upload was cut short",
                    ));
                    return;
                }
                Err(status) => {
                    yield Err(status);
                    return;
                }
            }
        }
    }
}

/// Serves the control API.
pub struct ControlService {
    supervisor: Supervisor,
    /// Who may call; a reload can change it.
    access: tokio::sync::watch::Receiver<Access>,
    /// Ends follow streams when the daemon stops, so shutdown does not wait on them.
    cancel: CancellationToken,
    /// Reloads and upgrades from the plugins directory; `None` when the
    /// service runs without a daemon config.
    reloader: Option<Arc<Reloader>>,
    /// Hands the daemon over to a new binary (`upgrade-self`); `None` when
    /// the service runs without a daemon.
    upgrader: Option<Arc<crate::upgrade_self::Upgrader>>,
}

fn millis(t: std::time::SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The wire form of a plugin's status.
pub fn status_of(info: &PluginInfo) -> pb::PluginStatus {
    pb::PluginStatus {
        name: info.name.clone(),
        version: info.version.clone(),
        state: info.state.to_string(),
        pid: info.pid.map_or(0, |p| p as u32),
        restarts: info.restarts,
        last_exit: info.last_exit.clone().unwrap_or_default(),
        uptime_secs: info.ready_for.map_or(0, |d| d.as_secs()),
        executable: info.exec.display().to_string(),
        methods: info.methods.clone(),
        reason: info.reason.clone(),
        reported_version: info.reported_version.clone().unwrap_or_default(),
        isolation: Some(isolation_of(&info.isolation)),
        remote: info.remote.as_ref().map(crate::registry::remote_status),
        capabilities: info.capabilities.clone(),
        rate_limits: info
            .rate_limits
            .iter()
            .map(|(method, limit)| pb::RateLimit {
                method: method.clone(),
                limit: limit.clone(),
            })
            .collect(),
        replicas: info
            .replicas
            .iter()
            .map(|r| pb::ReplicaStatus {
                instance: r.instance.clone(),
                state: r.state.to_string(),
                pid: r.pid.map_or(0, |p| p as u32),
                restarts: r.restarts,
                last_exit: r.last_exit.clone().unwrap_or_default(),
                uptime_secs: r.ready_for.map_or(0, |d| d.as_secs()),
                reason: r.reason.clone(),
            })
            .collect(),
        scaling: info.scaling.as_ref().map(|s| pb::Scaling {
            min: s.min,
            max: s.max,
            current: s.current,
            last_reason: s.last_reason.clone().unwrap_or_default(),
            last_change_ms: s.last_change.map_or(0, millis),
        }),
        sha256: info.identity.sha256.clone().unwrap_or_default(),
        sha256_sealed: info.identity.sealed,
        signer: info.identity.signer.as_ref().map(signer_of),
        requires: info
            .requires
            .iter()
            .map(|r| pb::Requirement {
                name: r.name.clone(),
                version: r
                    .version
                    .as_ref()
                    .map(|v| v.to_string())
                    .unwrap_or_default(),
                on_crash: r.on_crash.as_str().to_string(),
            })
            .collect(),
    }
}

/// The wire form of who signed what runs.
pub fn signer_of(s: &plugvisor::signature::Signer) -> pb::Signer {
    pb::Signer {
        name: s.name.clone(),
        key_id: s.key_id.clone(),
        comment: s.comment.clone(),
    }
}

/// The wire form of a plugin's isolation.
pub fn isolation_of(i: &plugvisor::isolation::IsolationStatus) -> pb::Isolation {
    pb::Isolation {
        mechanism: i.mechanism.clone(),
        cgroups: i.cgroup.iter().map(|p| p.display().to_string()).collect(),
        limits: i
            .limits
            .iter()
            .map(|l| pb::Limit {
                name: l.name.clone(),
                value: l.value.clone(),
                enforced_by: l.enforced_by.clone(),
            })
            .collect(),
        usage: i.usage.as_ref().map(|u| pb::Usage {
            memory_bytes: u.memory_current,
            memory_peak_bytes: u.memory_peak,
            cpu_usec: u.cpu.map(|d| d.as_micros() as u64),
            pids: u.pids_current,
            pids_rejected: u.pids_rejected,
            oom_kills: u.oom_kills,
        }),
        hardening: i.hardening.clone(),
        uid: i.uid,
        gid: i.gid,
        identity: i.identity.clone(),
        dynamic_user: i.dynamic_user,
        capabilities: i.capabilities.clone(),
        no_new_privs: i.no_new_privs,
        degraded: i.degraded.clone(),
    }
}

fn event_of(e: &Event) -> pb::Event {
    pb::Event {
        time_ms: millis(e.time),
        plugin: e.plugin.clone(),
        instance: e.instance.clone(),
        state: e.state.to_string(),
        reason: e.reason.clone(),
        replica: e.replica as u32,
        pid: e.detail.pid.unwrap_or(0),
        version: e.detail.version.clone().unwrap_or_default(),
        exit: e.detail.exit_kind.map(|kind| pb::ExitInfo {
            kind: kind.to_string(),
            code: e.detail.exit_code.unwrap_or(0),
            signal: e.detail.signal.unwrap_or(0),
            oom: e.detail.oom,
        }),
        attempt: e.detail.attempt.unwrap_or(0),
        delay_ms: e.detail.delay.map_or(0, |d| d.as_millis() as u64),
        scaled_to: e.detail.scaled_to.map_or(0, |n| n as u32),
        requirement: e.detail.requirement.clone().unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl Control for ControlService {
    type CallSessionStream = BoxStream<pb::CallSessionResponse>;

    async fn call_session(
        &self,
        request: Request<Streaming<pb::CallSessionRequest>>,
    ) -> Result<Response<Self::CallSessionStream>, Status> {
        // Once for the stream's every call.
        self.access.borrow().check(&request)?;
        Ok(Response::new(Box::pin(crate::call_session::serve(
            self.supervisor.clone(),
            request.into_inner(),
            self.cancel.clone(),
        ))))
    }

    async fn upgrade_self(
        &self,
        request: Request<pb::UpgradeSelfRequest>,
    ) -> Result<Response<pb::UpgradeSelfResponse>, Status> {
        self.access.borrow().check(&request)?;
        let upgrader = self.upgrader.as_ref().ok_or_else(|| {
            Status::failed_precondition("this control service runs without a daemon to upgrade")
        })?;
        let binary = request.into_inner().binary;
        let binary = (!binary.is_empty()).then(|| std::path::PathBuf::from(binary));
        upgrader.request(binary).await.map(Response::new)
    }

    async fn daemon_info(
        &self,
        request: Request<pb::DaemonInfoRequest>,
    ) -> Result<Response<pb::DaemonInfoResponse>, Status> {
        self.access.borrow().check(&request)?;
        Ok(Response::new(match &self.upgrader {
            Some(upgrader) => upgrader.info(),
            None => pb::DaemonInfoResponse {
                pid: std::process::id(),
                version: env!("CARGO_PKG_VERSION").into(),
                ..Default::default()
            },
        }))
    }

    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        self.access.borrow().check(&request)?;
        let usage = request.get_ref().usage;
        let capability = request.get_ref().capability.clone();
        // Reading cgroup files for many plugins blocks: not on a worker.
        let supervisor = self.supervisor.clone();
        let plugins = tokio::task::spawn_blocking(move || {
            if capability.is_empty() {
                return supervisor.list_with(usage).iter().map(status_of).collect();
            }
            crate::capability::providers(&supervisor, &capability, usage)
        })
        .await
        .map_err(|e| Status::internal(format!("listing the plugins failed: {e}")))?;
        Ok(Response::new(pb::ListResponse { plugins }))
    }

    async fn inspect(
        &self,
        request: Request<pb::InspectRequest>,
    ) -> Result<Response<pb::InspectResponse>, Status> {
        self.access.borrow().check(&request)?;
        let name = &request.get_ref().name;
        let info = self.supervisor.info(name)?;
        let history = self
            .supervisor
            .history(name)?
            .iter()
            .map(event_of)
            .collect();
        Ok(Response::new(pb::InspectResponse {
            status: Some(status_of(&info)),
            history,
        }))
    }

    async fn call(
        &self,
        request: Request<pb::CallRequest>,
    ) -> Result<Response<pb::CallResponse>, Status> {
        self.access.borrow().check(&request)?;
        crate::call_session::call_one(&self.supervisor, request.into_inner())
            .await
            .map(Response::new)
    }

    type CallStreamStream = BoxStream<pb::CallChunk>;

    async fn call_stream(
        &self,
        request: Request<Streaming<pb::CallChunk>>,
    ) -> Result<Response<Self::CallStreamStream>, Status> {
        self.access.borrow().check(&request)?;
        let mut input = request.into_inner();
        let first = input.message().await?.ok_or_else(|| {
            Status::invalid_argument("empty stream: the first chunk must name plugin and method")
        })?;
        if first.plugin.is_empty() == first.capability.is_empty() || first.method.is_empty() {
            return Err(Status::invalid_argument(
                "the first chunk must name the method and either the plugin or a capability",
            ));
        }
        let plugin = if first.plugin.is_empty() {
            // The best ready provider now: a stream is not sent twice.
            self.supervisor
                .provider(&first.capability, crate::capability::STREAM_WAIT)
                .await?
        } else {
            first.plugin.clone()
        };
        let upload = upload_of(first.clone(), input);
        let output = self
            .supervisor
            .call_stream(&plugin, &first.method, Default::default(), upload, None)
            .await?;
        let output = output.map(|data| {
            data.map(|data| pb::CallChunk {
                data,
                ..Default::default()
            })
            .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(output)))
    }

    type EventsStream = BoxStream<pb::Event>;

    async fn events(
        &self,
        request: Request<pb::EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        self.access.borrow().check(&request)?;
        let r = request.into_inner();
        // Subscribe before reading history so nothing falls in between.
        let mut live = self.supervisor.events();
        let mut past: Vec<Event> = if r.plugin.is_empty() {
            let mut all = Vec::new();
            for name in self.supervisor.names() {
                // A plugin removed meanwhile has no history to show.
                if let Ok(history) = self.supervisor.history(&name) {
                    all.extend(history);
                }
            }
            all
        } else {
            self.supervisor.history(&r.plugin)?
        };
        past.sort_by_key(|e| e.time);
        let last_seen = past
            .last()
            .map(|e| (e.time, e.plugin.clone(), e.reason.clone()));
        let cancel = self.cancel.clone();
        let handing_over = self.handing_over();
        let stream = async_stream::stream! {
            for e in &past {
                yield Ok(event_of(e));
            }
            if !r.follow {
                return;
            }
            loop {
                let next = tokio::select! {
                    _ = cancel.cancelled() => None,
                    next = live.recv() => Some(next),
                };
                let Some(next) = next else {
                    if handing_over() {
                        yield Err(crate::follow::handover_status());
                    }
                    break;
                };
                match next {
                    Ok(e) => {
                        if !r.plugin.is_empty() && e.plugin != r.plugin {
                            continue;
                        }
                        if let Some((t, p, why)) = &last_seen
                            && e.time <= *t && (&e.plugin, &e.reason) == (p, why) {
                            continue;
                        }
                        yield Ok(event_of(&e));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        yield Err(Status::data_loss(format!("{n} events were dropped: the reader was too slow")));
                        break;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    type LogsStream = BoxStream<pb::LogLine>;

    async fn logs(
        &self,
        request: Request<pb::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        self.access.borrow().check(&request)?;
        let r = request.into_inner();
        let buffer = self.supervisor.logs(&r.plugin)?;
        let mut live = buffer.subscribe();
        let tail = buffer.tail(if r.tail == 0 {
            usize::MAX
        } else {
            r.tail as usize
        });
        let cancel = self.cancel.clone();
        let handing_over = self.handing_over();
        let line_of = |l: &plugvisor::logs::LogLine| pb::LogLine {
            time_ms: millis(l.time),
            instance: l.instance.clone(),
            stream: l.stream.to_string(),
            line: l.line.clone(),
        };
        let stream = async_stream::stream! {
            for l in &tail {
                yield Ok(line_of(l));
            }
            if !r.follow {
                return;
            }
            loop {
                let next = tokio::select! {
                    _ = cancel.cancelled() => None,
                    next = live.recv() => Some(next),
                };
                let Some(next) = next else {
                    if handing_over() {
                        yield Err(crate::follow::handover_status());
                    }
                    break;
                };
                match next {
                    Ok(l) => yield Ok(line_of(&l)),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        yield Ok(pb::LogLine {
                            line: format!("[plugvisor: {n} lines dropped: the reader was too slow]"),
                            ..Default::default()
                        });
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn start(
        &self,
        request: Request<pb::PluginRequest>,
    ) -> Result<Response<pb::CommandResponse>, Status> {
        self.access.borrow().check(&request)?;
        let name = &request.get_ref().name;
        self.supervisor.start(name).await?;
        self.command_response(name)
    }

    async fn stop(
        &self,
        request: Request<pb::PluginRequest>,
    ) -> Result<Response<pb::CommandResponse>, Status> {
        self.access.borrow().check(&request)?;
        let name = &request.get_ref().name;
        self.supervisor.stop(name).await?;
        self.command_response(name)
    }

    async fn restart(
        &self,
        request: Request<pb::PluginRequest>,
    ) -> Result<Response<pb::CommandResponse>, Status> {
        self.access.borrow().check(&request)?;
        let name = &request.get_ref().name;
        if request.get_ref().upgrade {
            let reloader = self.reloader.as_ref().ok_or_else(|| {
                Status::failed_precondition(
                    "this control service has no plugins directory to upgrade from",
                )
            })?;
            reloader.upgrade(name).await?;
        } else {
            self.supervisor.restart(name).await?;
        }
        self.command_response(name)
    }

    async fn export_state(
        &self,
        request: Request<pb::PluginRequest>,
    ) -> Result<Response<pb::ExportStateResponse>, Status> {
        self.access.borrow().check(&request)?;
        let state = self
            .supervisor
            .export_state(&request.get_ref().name, None)
            .await?;
        Ok(Response::new(state))
    }

    async fn config(
        &self,
        request: Request<pb::ConfigRequest>,
    ) -> Result<Response<pb::ConfigResponse>, Status> {
        self.access.borrow().check(&request)?;
        let r = request.into_inner();
        if !r.set_json.is_empty() {
            let changes: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(&r.set_json).map_err(|e| {
                    Status::invalid_argument(format!(
                        "set_json must be a JSON object of config keys: {e}"
                    ))
                })?;
            self.supervisor.set_runtime_config(&r.name, changes).await?;
        }
        let config = self.supervisor.config(&r.name)?;
        Ok(Response::new(pb::ConfigResponse {
            config_json: serde_json::Value::Object(config).to_string(),
        }))
    }

    async fn reload(
        &self,
        request: Request<pb::ReloadRequest>,
    ) -> Result<Response<pb::ReloadResponse>, Status> {
        self.access.borrow().check(&request)?;
        let reloader = self
            .reloader
            .as_ref()
            .ok_or_else(|| Status::failed_precondition("this control service cannot reload"))?;
        let report = reloader
            .reload()
            .await
            .map_err(|e| Status::failed_precondition(format!("reload changed nothing: {e:#}")))?;
        Ok(Response::new(pb::ReloadResponse {
            added: report.added,
            removed: report.removed,
            upgraded: report.upgraded,
            unchanged: report.unchanged,
            failed: report
                .failed
                .into_iter()
                .map(|(name, reason)| pb::ReloadFailure { name, reason })
                .collect(),
            settings_applied: report.settings_applied,
            settings_need_restart: report.settings_need_restart,
            untrusted: report
                .untrusted
                .into_iter()
                .map(|(name, reason)| pb::ReloadFailure { name, reason })
                .collect(),
        }))
    }

    async fn health(
        &self,
        request: Request<pb::PluginRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        self.access.borrow().check(&request)?;
        let report = self
            .supervisor
            .health_report(&request.get_ref().name)
            .await?;
        Ok(Response::new(pb::HealthResponse {
            status: report.health.as_str_name().to_string(),
            message: report.message,
            instance: report.instance,
            version: report.version,
            sha256: report.identity.sha256.unwrap_or_default(),
            signer: report.identity.signer.as_ref().map(signer_of),
        }))
    }

    async fn metrics(
        &self,
        request: Request<pb::MetricsRequest>,
    ) -> Result<Response<pb::MetricsResponse>, Status> {
        self.access.borrow().check(&request)?;
        let supervisor = self.supervisor.clone();
        // Reading cgroup usage is file I/O; keep it off the async workers.
        let text = tokio::task::spawn_blocking(move || supervisor.metrics_text())
            .await
            .map_err(|e| Status::internal(format!("reading the metrics failed: {e}")))?;
        Ok(Response::new(pb::MetricsResponse { text }))
    }

    async fn tenant(
        &self,
        request: Request<pb::TenantRequest>,
    ) -> Result<Response<pb::TenantResponse>, Status> {
        self.access.borrow().check(&request)?;
        self.tenant_request(request.into_inner()).await
    }
}

impl ControlService {
    /// Whether the server is stopping for a hand-over to a new binary
    /// (rather than for the daemon's shutdown), asked when it stops.
    fn handing_over(&self) -> impl Fn() -> bool + Send + 'static {
        let upgrader = self.upgrader.clone();
        move || upgrader.as_ref().is_some_and(|u| u.switching())
    }

    /// The `Tenant` RPC: see [`crate::tenant`].
    async fn tenant_request(
        &self,
        r: pb::TenantRequest,
    ) -> Result<Response<pb::TenantResponse>, Status> {
        use crate::tenant::TenantOp;
        use pb::tenant_request::Action;
        let reloader = self
            .reloader
            .as_ref()
            .ok_or_else(|| Status::failed_precondition("this control service has no tenants"))?;
        let (plugin, tenant) = (r.plugin.clone(), r.tenant.clone());
        let op = match Action::try_from(r.action).unwrap_or(Action::Unspecified) {
            Action::List => TenantOp::List {
                plugin: (!plugin.is_empty()).then_some(plugin),
            },
            Action::Add => {
                let spec = if r.spec_json.is_empty() {
                    serde_json::json!({})
                } else {
                    serde_json::from_str(&r.spec_json).map_err(|e| {
                        Status::invalid_argument(format!("spec_json is not JSON: {e}"))
                    })?
                };
                TenantOp::Add {
                    plugin,
                    tenant,
                    spec,
                }
            }
            Action::Remove => TenantOp::Remove { plugin, tenant },
            Action::Enable => TenantOp::Enable { plugin, tenant },
            Action::Disable => TenantOp::Disable { plugin, tenant },
            Action::Unspecified => {
                return Err(Status::invalid_argument(
                    "action: expected LIST, ADD, REMOVE, ENABLE or DISABLE",
                ));
            }
        };
        let rows = reloader.tenant(op).await?;
        Ok(Response::new(pb::TenantResponse {
            tenants: rows
                .into_iter()
                .map(|t| pb::TenantStatus {
                    name: plugvisor::tenant::entry_name(&t.plugin, &t.tenant),
                    plugin: t.plugin,
                    tenant: t.tenant,
                    source: t.source,
                    enabled: t.enabled,
                    status: t.status.as_ref().map(status_of),
                })
                .collect(),
        }))
    }

    fn command_response(&self, name: &str) -> Result<Response<pb::CommandResponse>, Status> {
        let info = self.supervisor.info(name)?;
        Ok(Response::new(pb::CommandResponse {
            status: Some(status_of(&info)),
        }))
    }
}

/// Binds the control socket: refuses to take over a socket another daemon
/// still answers on, removes a stale one, and sets mode 0660.
pub async fn bind(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    use anyhow::Context;
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "cannot create the directory of the control socket {}",
                path.display()
            )
        })?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            anyhow::bail!(
                "another plugvisor daemon is already listening on {}; stop it or choose another --control path",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| {
            format!("cannot remove the stale control socket {}", path.display())
        })?;
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("cannot listen on the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("cannot set mode 0660 on {}", path.display()))?;
    Ok(listener)
}

/// Gives the control socket to the first of `gids`, if any: its mode 0660
/// lets only the owner and the socket's group connect, so members of that
/// group get as far as the credential check.
pub fn give_socket_to_group(path: &Path, gids: &[u32]) -> anyhow::Result<()> {
    use anyhow::Context;
    if let Some(gid) = gids.first() {
        std::os::unix::fs::chown(path, None, Some(*gid)).with_context(|| {
            format!(
                "cannot give the control socket {} to group {gid}",
                path.display()
            )
        })?;
    }
    Ok(())
}

/// How long control calls in flight when shutdown begins may run on before
/// their connections are closed.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves the control API on `listener` until `cancel` fires. Then the
/// listener is closed at once, calls in flight get `grace` to finish, and
/// every connection still open after that (idle ones, half-sent requests)
/// is closed, so shutdown never waits on a client.
pub async fn serve(
    supervisor: Supervisor,
    listener: tokio::net::UnixListener,
    access: tokio::sync::watch::Receiver<Access>,
    reloader: Option<Arc<Reloader>>,
    cancel: CancellationToken,
    grace: Duration,
) -> Result<(), tonic::transport::Error> {
    serve_shared(
        supervisor,
        Arc::new(listener),
        access,
        reloader,
        None,
        cancel,
        grace,
    )
    .await
}

/// [`serve`] on a listener the caller keeps: when `cancel` fires, this
/// server stops accepting (the caller's listener stays open, so new clients
/// wait in its backlog for whoever accepts next: a new daemon image after
/// `upgrade-self`), sends every connection HTTP/2 GOAWAY and lets the calls
/// in flight finish within `grace`.
pub async fn serve_shared(
    supervisor: Supervisor,
    listener: Arc<tokio::net::UnixListener>,
    access: tokio::sync::watch::Receiver<Access>,
    reloader: Option<Arc<Reloader>>,
    upgrader: Option<Arc<crate::upgrade_self::Upgrader>>,
    cancel: CancellationToken,
    grace: Duration,
) -> Result<(), tonic::transport::Error> {
    let service = ControlService {
        supervisor,
        access,
        cancel: cancel.clone(),
        reloader,
        upgrader,
    };
    let connections = Connections::default();
    // Accepts only when tonic asks for the next connection, so a connection
    // is either served (and closed with a graceful GOAWAY at shutdown) or
    // left in the listen backlog: never accepted and then dropped unserved.
    let incoming = Incoming {
        listener: Some(listener),
        cancelled: Box::pin(cancel.clone().cancelled_owned()),
        connections: connections.clone(),
        pause: None,
    };
    let server = tonic::transport::Server::builder()
        .initial_stream_window_size(plugvisor::transport::STREAM_WINDOW)
        .initial_connection_window_size(plugvisor::transport::CONNECTION_WINDOW)
        .max_frame_size(plugvisor::transport::MAX_FRAME)
        .add_service(
            ControlServer::new(service)
                .max_decoding_message_size(plugvisor::transport::MAX_MESSAGE)
                .max_encoding_message_size(plugvisor::transport::MAX_MESSAGE),
        )
        .serve_with_incoming_shutdown(incoming, cancel.clone().cancelled_owned());
    tokio::pin!(server);
    let result = tokio::select! {
        ended = &mut server => ended,
        _ = cancel.cancelled() => match tokio::time::timeout(grace, &mut server).await {
            Ok(ended) => ended,
            Err(_) => {
                tracing::info!(
                    "closing {} control connection(s) still open {grace:?} after shutdown began",
                    connections.len()
                );
                connections.close_all();
                server.await
            }
        },
    };
    result
}

/// The control server's incoming connections. Once shutdown begins it lets
/// go of the listener at once (closing it, unless the caller keeps it open
/// for the next daemon image) and ends.
struct Incoming {
    listener: Option<Arc<tokio::net::UnixListener>>,
    cancelled: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    connections: Connections,
    /// After a failed accept, the pause before the next.
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl tokio_stream::Stream for Incoming {
    type Item = std::io::Result<crate::connections::Tracked>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if self.cancelled.as_mut().poll(cx).is_ready() {
            self.listener = None;
            return Poll::Ready(None);
        }
        if let Some(pause) = self.pause.as_mut() {
            if pause.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.pause = None;
        }
        let Some(listener) = self.listener.clone() else {
            return Poll::Ready(None);
        };
        match listener.poll_accept(cx) {
            Poll::Ready(Ok((stream, _))) => Poll::Ready(Some(Ok(self.connections.track(stream)))),
            Poll::Ready(Err(e)) => {
                // Out of descriptors, say: let some close first.
                tracing::warn!("control socket: cannot accept a connection: {e}");
                let mut pause = Box::pin(tokio::time::sleep(Duration::from_millis(50)));
                if pause.as_mut().poll(cx).is_ready() {
                    cx.waker().wake_by_ref();
                }
                self.pause = Some(pause);
                Poll::Pending
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A client of a daemon's control socket (see [`crate::control_client`]).
pub type Client = pb::control_client::ControlClient<crate::control_client::ControlConnection>;

/// A client of a daemon's control socket: it reconnects when the daemon
/// closes the connection, and sends a call the daemon never processed
/// (refused with GOAWAY or REFUSED_STREAM, or never written) again, once.
pub async fn connect(path: &Path) -> anyhow::Result<Client> {
    let channel = crate::control_client::ControlConnection::connect(path).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the plugvisor daemon at {}: {e}\nStart one with `plugvisor run --plugins-dir DIR`, or point --control (or PLUGVISOR_CONTROL) at its socket.",
            path.display()
        )
    })?;
    Ok(client(channel))
}

/// A client on `connection` (a clone keeps counting its calls sent again).
pub fn client(connection: crate::control_client::ControlConnection) -> Client {
    pb::control_client::ControlClient::with_origin(connection, plugvisor::transport::origin())
        .max_decoding_message_size(plugvisor::transport::MAX_MESSAGE)
        .max_encoding_message_size(plugvisor::transport::MAX_MESSAGE)
}

/// The path a socket should be looked for at.
pub fn resolve(path: Option<PathBuf>) -> PathBuf {
    path.unwrap_or_else(plugvisor::config::default_control_socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tplugvisor\nUid:\t65534\t65534\t65534\t65534\nGid:\t65534\t65534\t65534\t65534\nFDSize:\t64\nGroups:\t27 4242 \nNStgid:\t7\n";

    /// A procfs laid out with one process, `pid`, whose status is `status`.
    fn proc_with(pid: i32, status: &str) -> tempfile::TempDir {
        let root = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(root.path().join(pid.to_string())).expect("pid dir");
        std::fs::write(root.path().join(pid.to_string()).join("status"), status)
            .expect("status file");
        root
    }

    fn nobody(pid: i32) -> Peer {
        Peer {
            uid: 65534,
            gid: 65534,
            pid: Some(pid),
        }
    }

    #[test]
    fn reads_supplementary_groups_of_the_process_the_socket_recorded() {
        assert_eq!(
            supplementary_groups(STATUS, 65534, 65534),
            Some(vec![27, 4242])
        );
        let none = STATUS.replace("Groups:\t27 4242 ", "Groups:\t");
        assert_eq!(supplementary_groups(&none, 65534, 65534), Some(vec![]));
        // Another uid or gid than SO_PEERCRED's: not the same process.
        assert_eq!(supplementary_groups(STATUS, 1000, 65534), None);
        assert_eq!(supplementary_groups(STATUS, 65534, 1000), None);
        assert_eq!(supplementary_groups("Name:\tx\n", 65534, 65534), None);
    }

    #[test]
    fn admits_a_member_of_an_allowed_supplementary_group() {
        let proc = proc_with(7, STATUS);
        let access = Access {
            gids: vec![4242],
            proc_root: proc.path().to_path_buf(),
            ..Default::default()
        };
        assert_eq!(access.admit(nobody(7)), Ok(()));
    }

    #[test]
    fn refuses_without_an_allowed_group_or_when_the_groups_cannot_be_read() {
        let proc = proc_with(7, STATUS);
        let access = Access {
            gids: vec![5555],
            proc_root: proc.path().to_path_buf(),
            ..Default::default()
        };
        let refused = access.admit(nobody(7)).unwrap_err();
        assert!(
            refused.contains("uid 65534 gid 65534") && refused.contains("control_gids"),
            "{refused}"
        );
        let access = Access {
            gids: vec![4242],
            ..access
        };
        // No such process: its groups are unknown, so they do not count.
        assert!(access.admit(nobody(8)).is_err());
        assert!(
            access
                .admit(Peer {
                    pid: None,
                    ..nobody(7)
                })
                .is_err()
        );
    }

    #[test]
    fn admits_configured_uids_and_primary_groups_without_reading_proc() {
        let access = Access {
            uids: vec![65534],
            proc_root: PathBuf::from("/nonexistent"),
            ..Default::default()
        };
        assert_eq!(access.admit(nobody(1)), Ok(()));
        let access = Access {
            uids: vec![],
            gids: vec![65534],
            ..access
        };
        assert_eq!(access.admit(nobody(1)), Ok(()));
    }
}
