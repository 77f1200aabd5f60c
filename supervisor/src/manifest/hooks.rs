//! `hooks:` — commands run at points of a replica's life (see
//! [`crate::hooks`] for how they run).

use crate::units::HumanDuration;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Longest a hook may be given: a hook holds up its replica's life.
pub const MAX_HOOK_TIMEOUT: Duration = Duration::from_secs(3600);
/// A hook's timeout when the manifest gives none.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(10);

/// One hook: a command and how long it may run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookSpec {
    /// The program and its arguments. A program with a `/` in it is
    /// relative to the manifest's directory; a bare name is looked up in the
    /// plugin's `PATH`.
    pub command: Vec<String>,
    /// After this long the hook's whole process group is killed and the
    /// hook counts as failed.
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
}

fn default_timeout() -> HumanDuration {
    HumanDuration(DEFAULT_HOOK_TIMEOUT)
}

impl HookSpec {
    /// The program to execute: resolved against `dir` when it is a path.
    pub fn program(&self, dir: &Path) -> PathBuf {
        let first = Path::new(&self.command[0]);
        if self.command[0].contains('/') {
            dir.join(first)
        } else {
            first.to_path_buf()
        }
    }
}

/// The four points of a replica's life a hook can run at.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HooksSpec {
    /// Before each start of the plugin; a failure fails the start.
    pub pre_start: Option<HookSpec>,
    /// Once an instance is initialized, before it is published to take
    /// calls; a failure restarts the instance (in an upgrade, rolls it
    /// back).
    pub post_ready: Option<HookSpec>,
    /// Before a running instance is asked to stop; a failure is reported
    /// and the stop goes on.
    pub pre_stop: Option<HookSpec>,
    /// After an instance has ended, whatever the reason; a failure is
    /// reported.
    pub post_exit: Option<HookSpec>,
}

impl HooksSpec {
    /// Each configured hook with its field name.
    pub fn each(&self) -> impl Iterator<Item = (&'static str, &HookSpec)> {
        [
            ("pre_start", &self.pre_start),
            ("post_ready", &self.post_ready),
            ("pre_stop", &self.pre_stop),
            ("post_exit", &self.post_exit),
        ]
        .into_iter()
        .filter_map(|(name, hook)| hook.as_ref().map(|h| (name, h)))
    }

    /// Checks every hook; `Err((field, message))` names the field below
    /// `hooks.`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        for (name, hook) in self.each() {
            let Some(program) = hook.command.first() else {
                return Err((
                    format!("{name}.command"),
                    "must name a program to run, e.g. [./hooks/prepare.sh, --fast]".into(),
                ));
            };
            if program.trim().is_empty() {
                return Err((
                    format!("{name}.command"),
                    "the program (its first item) is empty".into(),
                ));
            }
            if let Some(bad) = hook.command.iter().find(|a| a.contains('\0')) {
                return Err((
                    format!("{name}.command"),
                    format!("`{}` contains a NUL byte", bad.escape_debug()),
                ));
            }
            if hook.timeout.0.is_zero() || hook.timeout.0 > MAX_HOOK_TIMEOUT {
                return Err((
                    format!("{name}.timeout"),
                    format!(
                        "{:?} is out of range; expected more than 0s and at most 1h",
                        hook.timeout
                    ),
                ));
            }
        }
        Ok(())
    }
}
