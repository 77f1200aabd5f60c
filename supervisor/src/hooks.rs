//! Lifecycle hooks: the commands a manifest's `hooks:` runs at pre-start,
//! post-ready, pre-stop and post-exit of each instance.
//!
//! A hook is spawned through the process thread like a plugin (own session
//! and process group, parent-death signal, clean environment, reaped with a
//! pidfd), in the plugin's sandbox minus its cgroup and PID namespace (see
//! [`crate::isolation::Isolation::hook_setup`]). It gets the plugin's
//! environment (the manifest's and the supervisor config's `env`, `PATH`,
//! `PLUGVISOR_PLUGIN_NAME`, `PLUGVISOR_INSTANCE_ID`) plus `PLUGVISOR_HOOK`,
//! `PLUGVISOR_REPLICA`, `PLUGVISOR_PLUGIN_VERSION` and what the point of
//! the life adds (`PLUGVISOR_PLUGIN_PID`, `PLUGVISOR_EXIT_REASON`,
//! `PLUGVISOR_EXIT_KIND`), but neither the plugin's socket nor the magic
//! cookie. Its output goes to the plugin's log (stream `hook:<name>`) and
//! its last lines into the failure's message; past its timeout its whole
//! process group is killed.

use crate::instance::DEFAULT_PATH;
use crate::isolation::{Isolation, PrepareError};
use crate::logs::{LineReader, LogBuffer, LogLine};
use crate::manifest::{HookSpec, Manifest};
use crate::process::{ExitStatus, ProcessManager, SpawnSpec};
use plugvisor_proto::handshake;
use std::collections::VecDeque;
use std::ffi::OsString;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Lines of a hook's output kept for its failure message.
const KEPT_LINES: usize = 10;
/// Characters of one kept line.
const KEPT_LINE_CHARS: usize = 400;

/// Where a hook runs: which plugin, replica and instance.
pub(crate) struct HookContext<'a> {
    pub manifest: &'a Manifest,
    pub replica: usize,
    pub instance_id: &'a str,
    /// The manifest's and the supervisor config's `env`.
    pub env: &'a [(String, String)],
    pub processes: &'a ProcessManager,
    pub isolation: Option<&'a Isolation>,
    pub logs: &'a Arc<LogBuffer>,
}

/// How a hook failed: which, how, and the last of what it printed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{hook} hook `{command}` {how}{}", output_note(.output))]
pub struct HookError {
    pub hook: &'static str,
    pub command: String,
    /// `exited with code 3 after 12ms`, `timed out after 5000ms`, ...
    pub how: String,
    pub output: Vec<String>,
}

fn output_note(lines: &[String]) -> String {
    if lines.is_empty() {
        "; it printed nothing".to_string()
    } else {
        format!("; output: {}", lines.join(" | "))
    }
}

/// What a hook that succeeded took.
#[derive(Debug)]
pub(crate) struct HookDone {
    pub took: Duration,
}

/// The stream name a hook's output is logged under.
fn stream_of(hook: &'static str) -> &'static str {
    match hook {
        "pre_start" => "hook:pre_start",
        "post_ready" => "hook:post_ready",
        "pre_stop" => "hook:pre_stop",
        "post_exit" => "hook:post_exit",
        _ => "hook",
    }
}

/// Runs `hook` (named `name`) to its end or its timeout, with `extra`
/// variables added to its environment. Cancel safe: a dropped run kills the
/// hook's process group (see `Child`'s Drop).
pub(crate) async fn run(
    ctx: &HookContext<'_>,
    name: &'static str,
    hook: &HookSpec,
    extra: &[(&str, String)],
) -> Result<HookDone, HookError> {
    let command = hook.command.join(" ");
    let fail = |how: String, output: Vec<String>| HookError {
        hook: name,
        command: command.clone(),
        how,
        output,
    };
    let m = ctx.manifest;
    let mut env: Vec<(OsString, OsString)> = vec![
        ("PATH".into(), DEFAULT_PATH.into()),
        (handshake::ENV_NAME.into(), m.name.clone().into()),
        (handshake::ENV_INSTANCE_ID.into(), ctx.instance_id.into()),
        ("PLUGVISOR_HOOK".into(), name.into()),
        ("PLUGVISOR_REPLICA".into(), ctx.replica.to_string().into()),
        (
            "PLUGVISOR_PLUGIN_VERSION".into(),
            m.version.to_string().into(),
        ),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.into(), v.into())));
    // Like the plugin's: the manifest's env may point PATH elsewhere.
    for (k, v) in ctx.env {
        env.retain(|(have, _)| have != k.as_str());
        env.push((k.into(), v.into()));
    }
    let spec = SpawnSpec {
        program: hook.program(&m.dir),
        args: hook.command[1..].to_vec(),
        env,
        cwd: m.dir.clone(),
    };
    let started = Instant::now();
    let spawned = match ctx.isolation {
        None => ctx.processes.spawn(&spec).await,
        Some(isolation) => {
            let setup = isolation.hook_setup(m).await.map_err(|e| {
                let why = match e {
                    PrepareError::Refused(w) | PrepareError::Failed(w) => w,
                };
                fail(format!("could not be sandboxed: {why}"), Vec::new())
            })?;
            ctx.processes.spawn_with(&spec, setup, None).await
        }
    };
    let mut child = spawned.map_err(|e| {
        fail(
            format!("could not start ({}): {e}", spec.program.display()),
            Vec::new(),
        )
    })?;
    let kept: Arc<Mutex<VecDeque<String>>> = Arc::default();
    let stream = stream_of(name);
    let out = read_lines(child.stdout.take(), ctx, stream, &kept);
    let err = read_lines(child.stderr.take(), ctx, stream, &kept);
    let read_all = async move {
        tokio::join!(out, err);
    };
    let timeout = hook.timeout.0;
    let ended = tokio::time::timeout(timeout, async {
        let mut reading = std::pin::pin!(read_all);
        let mut read = false;
        let status = loop {
            tokio::select! {
                status = child.wait() => break status,
                _ = &mut reading, if !read => read = true,
            }
        };
        if !read {
            // What it printed last may still be in the pipes; a descendant
            // that left its group and keeps them open is not waited for.
            let _ = tokio::time::timeout(Duration::from_millis(200), reading).await;
        }
        status
    })
    .await;
    // Whatever the hook left behind in its process group goes too.
    let _ = child.signal_group(libc::SIGKILL);
    let output = || {
        kept.lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect::<Vec<_>>()
    };
    let took = started.elapsed();
    match ended {
        Ok(ExitStatus::Exited(0)) => Ok(HookDone { took }),
        Ok(status) => Err(fail(
            format!("{status} after {}ms", took.as_millis()),
            output(),
        )),
        Err(_) => {
            let _ = child.signal(libc::SIGKILL);
            let _ = child.wait().await;
            Err(fail(
                format!(
                    "did not finish within its timeout of {}ms and was killed",
                    timeout.as_millis()
                ),
                output(),
            ))
        }
    }
}

/// Logs each line of `pipe` and keeps the last [`KEPT_LINES`] in `kept`.
async fn read_lines(
    pipe: Option<tokio::net::unix::pipe::Receiver>,
    ctx: &HookContext<'_>,
    stream: &'static str,
    kept: &Mutex<VecDeque<String>>,
) {
    let Some(pipe) = pipe else { return };
    let mut reader = LineReader::new(pipe);
    while let Some(line) = reader.next_line().await {
        {
            let mut kept = kept.lock().unwrap_or_else(|e| e.into_inner());
            if kept.len() == KEPT_LINES {
                kept.pop_front();
            }
            kept.push_back(format!(
                "`{}`",
                line.chars().take(KEPT_LINE_CHARS).collect::<String>()
            ));
        }
        ctx.logs.record(
            &ctx.manifest.name,
            LogLine {
                time: std::time::SystemTime::now(),
                instance: ctx.instance_id.to_string(),
                stream,
                line,
            },
        );
    }
}
