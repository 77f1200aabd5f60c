//! A real terminal for tests: a private tmux server (its own socket, so it
//! never touches a user's sessions) running one command in a 160x40 pane.
//! Tests type with [`Tmux::keys`] and read the screen with
//! [`Tmux::wait_for`], as a person at the terminal would.

use plugvisor_integration_tests::skip;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const SCREEN_TIMEOUT: Duration = Duration::from_secs(15);

pub struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    /// Runs `shell_command` (via `sh -c`) in a new pane; `None`, with the
    /// skip reported, when tmux is not installed. When the command ends the
    /// pane prints `[exit N]` and stays open, so its output can be read.
    pub fn start(dir: &Path, shell_command: &str) -> Option<Tmux> {
        if Command::new("tmux")
            .arg("-V")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            skip("tmux is not installed (apt-get install tmux); .ci/run installs it");
            return None;
        }
        let tmux = Tmux {
            socket: dir.join("tmux.sock"),
        };
        let wrapped = format!("{shell_command}; echo \"[exit $?]\"; exec cat");
        // Starting a tmux server now and then fails under load on a busy
        // machine; a failed start leaves nothing running, so try again a
        // few times and report what tmux said if it never starts.
        let mut said = String::new();
        for attempt in 0..3 {
            let out = tmux
                .command()
                .args(["new-session", "-d", "-x", "160", "-y", "40", "sh", "-c"])
                .arg(&wrapped)
                .output()
                .expect("tmux runs");
            if out.status.success() {
                return Some(tmux);
            }
            said = format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
            let _ = tmux.command().arg("kill-server").output();
            let _ = std::fs::remove_file(&tmux.socket);
            std::thread::sleep(std::time::Duration::from_millis(100 << attempt));
        }
        panic!("tmux new-session failed 3 times; last: {said}");
    }

    fn command(&self) -> Command {
        let mut c = Command::new("tmux");
        // No user config; colours on (tmux picks its TERM for the pane).
        c.arg("-S").arg(&self.socket).args(["-f", "/dev/null"]);
        c.stdin(Stdio::null());
        c
    }

    /// The screen as text; with `escapes`, with tmux's colour codes.
    pub fn screen(&self, escapes: bool) -> String {
        let mut c = self.command();
        c.args(["capture-pane", "-p"]);
        if escapes {
            c.arg("-e");
        }
        let out = c.output().expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Sends keys, as `tmux send-keys` names them (`Enter`, `Escape`, `j`).
    pub fn keys(&self, keys: &[&str]) {
        let status = self
            .command()
            .arg("send-keys")
            .args(keys)
            .status()
            .expect("tmux send-keys");
        assert!(status.success());
    }

    /// Types text literally.
    pub fn type_text(&self, text: &str) {
        let status = self
            .command()
            .args(["send-keys", "-l", text])
            .status()
            .expect("tmux send-keys");
        assert!(status.success());
    }

    /// Waits until the screen satisfies `condition` (polling every 10 ms,
    /// for [`SCREEN_TIMEOUT`] at most); returns that screen.
    pub fn wait_for(&self, what: &str, mut condition: impl FnMut(&str) -> bool) -> String {
        let deadline = Instant::now() + SCREEN_TIMEOUT;
        loop {
            let screen = self.screen(false);
            if condition(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {SCREEN_TIMEOUT:?} waiting for {what}; the screen shows:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.command().arg("kill-server").status();
    }
}

/// The screen line that starts with `name` (after an optional `! `
/// marker), split on whitespace.
pub fn row<'a>(screen: &'a str, name: &str) -> Option<Vec<&'a str>> {
    screen.lines().find_map(|l| {
        let cells: Vec<&str> = l.split_whitespace().collect();
        let cells = match cells.first() {
            Some(&"!") => cells[1..].to_vec(),
            _ => cells,
        };
        (cells.first() == Some(&name)).then_some(cells)
    })
}
