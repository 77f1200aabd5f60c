//! The survivors' guard: what bounds survivors (see [`crate::adopt`]) while
//! no supervisor runs.
//!
//! The daemon starts it as a small process of its own (`plugvisor
//! survivor-guard DIR`) and holds the write end of a pipe to it. The guard
//! sleeps on the read end; a clean shutdown writes `stop` and the guard
//! exits. End of file without `stop` means the daemon died: from then on,
//! once a second, the guard takes the survivors' directory lock and
//!
//! - kills every survivor whose `max_unsupervised` has run out: the
//!   recorded process through its pidfd, once proven to be it (as for
//!   re-adoption), and everything left in its own cgroup;
//! - drops unread output over `max_output`, oldest first, as a supervisor's
//!   tail would (counted in `<stream>.dropped`), and gives the space back.
//!
//! It stops as soon as another supervisor holds the lock (that one takes
//! over) or no survivor is left. A guard that is itself killed bounds
//! nothing: the next supervisor then kills survivors that stayed away too
//! long instead of adopting them.

use crate::adopt::{self, Paths, Record};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long the lock must be held by someone else before the guard
/// concludes that a new supervisor took over.
const TAKEN_OVER: Duration = Duration::from_secs(2);

/// What the daemon writes to its guard at a clean shutdown.
pub const STOP: &[u8] = b"stop";

/// How the guard ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The daemon shut down cleanly: its plugins are stopped.
    Stopped,
    /// A new supervisor holds the directory.
    TakenOver,
    /// No survivor is left running.
    NoneLeft,
}

/// Blocks until the daemon holding the other end of `watch` goes away,
/// then guards its survivors (see the module docs).
pub fn run(dir: &Path, proc_root: &Path, watch: OwnedFd, every: Duration) -> io::Result<Outcome> {
    let mut watch = std::fs::File::from(watch);
    let mut said = Vec::new();
    let mut buf = [0u8; 64];
    loop {
        match watch.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                said.extend_from_slice(&buf[..n]);
                if said.windows(STOP.len()).any(|w| w == STOP) {
                    return Ok(Outcome::Stopped);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let since = Instant::now();
    eprintln!(
        "plugvisor survivor-guard: the supervisor is gone; bounding its survivors in {}",
        dir.display()
    );
    // The dead supervisor's lock is released a moment after its pipe
    // closed (the kernel drops an exiting process's files lazily): only a
    // lock held for a while is another supervisor's.
    let mut held_since: Option<Instant> = None;
    loop {
        let lock = match try_lock(&dir.join(adopt::LOCK_FILE))? {
            Some(lock) => {
                held_since = None;
                lock
            }
            None if held_since.get_or_insert_with(Instant::now).elapsed() > TAKEN_OVER => {
                return Ok(Outcome::TakenOver);
            }
            None => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        let live = enforce(dir, proc_root, since.elapsed());
        drop(lock);
        if live == 0 {
            return Ok(Outcome::NoneLeft);
        }
        std::thread::sleep(every);
    }
}

/// The directory's lock, if nobody holds it.
fn try_lock(path: &Path) -> io::Result<Option<std::fs::File>> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Some(file));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Ok(None);
    }
    Err(e)
}

/// One round over the records, `unsupervised` after the supervisor died.
/// Returns how many survivors still run.
pub fn enforce(dir: &Path, proc_root: &Path, unsupervised: Duration) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut live = 0;
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let paths = Paths::new(dir, &name);
        let Some(record) = adopt::read_small(&paths.record(), adopt::MAX_RECORD_BYTES)
            .ok()
            .and_then(|text| Record::parse(&text).ok())
            .filter(|r| r.instance() == name)
        else {
            continue;
        };
        for stream in ["stdout", "stderr"] {
            trim_output(&paths, stream, record.max_output);
        }
        let cgroup = own_cgroup(&record);
        let proven = adopt::prove(proc_root, &record, &cgroup);
        if unsupervised < Duration::from_millis(record.max_unsupervised_ms) {
            live += usize::from(proven.is_ok());
            continue;
        }
        let expired = format!(
            "{name} ran unsupervised for {}s, its max_unsupervised",
            record.max_unsupervised_ms / 1000
        );
        match &proven {
            Ok(pidfd) => {
                eprintln!(
                    "plugvisor survivor-guard: {expired}: killing pid {}",
                    record.pid
                );
                let _ = adopt::pidfd_signal(pidfd, libc::SIGKILL);
            }
            Err(why) => eprintln!(
                "plugvisor survivor-guard: {expired}; pid {} is not touched: {why}",
                record.pid
            ),
        }
        // Whatever is left in its own cgroup is its (only ours can be there).
        kill_cgroup(&cgroup);
    }
    live
}

/// The record's cgroup directories, each named after its instance (a record
/// cannot point the guard at another cgroup).
fn own_cgroup(record: &Record) -> Vec<PathBuf> {
    let instance = record.instance();
    record
        .cgroup
        .iter()
        .filter(|d| {
            d.file_name()
                .is_some_and(|n| n.to_string_lossy() == instance)
        })
        .filter(|d| d.is_absolute() && !d.components().any(|c| c.as_os_str() == ".."))
        .cloned()
        .collect()
}

/// SIGKILLs every process in `dirs`: `cgroup.kill` where the kernel has it,
/// else each listed pid through a pidfd opened while it is still listed.
fn kill_cgroup(dirs: &[PathBuf]) {
    for dir in dirs {
        // Never created: only an existing cgroup's file is written.
        let killed = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.kill"))
            .and_then(|mut f| io::Write::write_all(&mut f, b"1"));
        if killed.is_ok() {
            continue;
        }
        for _ in 0..3 {
            let listed = |dir: &Path| -> Vec<i32> {
                std::fs::read_to_string(dir.join("cgroup.procs"))
                    .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
                    .unwrap_or_default()
            };
            let pids = listed(dir);
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                let Ok(pidfd) = adopt::pidfd_open(pid) else {
                    continue;
                };
                // Opened while listed: the pidfd is a member, not a reuser.
                if listed(dir).contains(&pid) {
                    let _ = adopt::pidfd_signal(&pidfd, libc::SIGKILL);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Drops `stream`'s unread output beyond `max_output`, oldest first: the
/// persisted offset moves up to keep the newest half, the count goes to
/// `<stream>.dropped`, and the skipped range is given back to the
/// filesystem.
pub fn trim_output(paths: &Paths, stream: &str, max_output: u64) {
    let Ok(file) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(paths.output(stream))
    else {
        return;
    };
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let offset = adopt::read_number(&paths.offset(stream));
    if size.saturating_sub(offset) <= max_output {
        return;
    }
    let skip_to = size - max_output / 2;
    let dropped = adopt::read_number(&paths.dropped(stream)) + (skip_to - offset);
    if adopt::write_atomic(&paths.dropped(stream), dropped.to_string().as_bytes()).is_err()
        || adopt::write_atomic(&paths.offset(stream), skip_to.to_string().as_bytes()).is_err()
    {
        return;
    }
    let upto = skip_to & !4095;
    if upto > 0 {
        adopt::punch_hole(&file, 0, upto);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn survivor(
        dir: &Path,
        instance_cgroup: &Path,
        max_unsupervised_ms: u64,
    ) -> (std::process::Child, Record) {
        let child = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let id = adopt::proc_identity(Path::new("/proc"), pid).unwrap();
        let record = Record {
            format: adopt::RECORD_FORMAT,
            plugin: "tp".into(),
            replica: 0,
            start: 1,
            pid,
            start_time: id.start_time,
            boot_id: adopt::boot_id(Path::new("/proc")).unwrap(),
            uid: id.uid,
            version: "1.0.0".into(),
            exec: "/bin/sleep".into(),
            info: adopt::RecordedInfo {
                name: "tp".into(),
                version: "1.0.0".into(),
                methods: vec![],
                stream_methods: vec![],
                state_version: 0,
                sessions: false,
            },
            restarts: 0,
            max_unsupervised_ms,
            max_output: 64 << 10,
            cgroup: vec![instance_cgroup.to_path_buf()],
            identity: Default::default(),
        };
        let paths = Paths::new(dir, "tp-0-1");
        adopt::create_output(&paths).unwrap();
        adopt::write_atomic(&paths.record(), &serde_json::to_vec(&record).unwrap()).unwrap();
        (child, record)
    }

    /// A temp-dir stand-in for the instance's cgroup, listing `pid` (the
    /// kernel's own cgroups are the integration tests').
    fn fake_cgroup(root: &Path, name: &str, pid: i32) -> PathBuf {
        let dir = root.join("cg").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cgroup.procs"), format!("{pid}\n")).unwrap();
        dir
    }

    fn exits_within(child: &mut std::process::Child, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    #[test]
    fn a_survivor_past_max_unsupervised_is_killed_and_one_within_is_not() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("s");
        std::fs::create_dir_all(&dir).unwrap();
        let cgroup = tmp.path().join("cg").join("tp-0-1");
        let (mut child, record) = survivor(&dir, &cgroup, 1000);
        fake_cgroup(tmp.path(), "tp-0-1", record.pid);
        assert_eq!(
            enforce(&dir, Path::new("/proc"), Duration::from_millis(500)),
            1
        );
        assert!(!exits_within(&mut child, Duration::from_millis(100)));
        assert_eq!(
            enforce(&dir, Path::new("/proc"), Duration::from_millis(1500)),
            0
        );
        assert!(
            exits_within(&mut child, Duration::from_secs(10)),
            "not killed"
        );
    }

    #[test]
    fn a_stranger_holding_the_pid_is_never_killed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("s");
        std::fs::create_dir_all(&dir).unwrap();
        let cgroup = tmp.path().join("cg").join("tp-0-1");
        let (mut child, record) = survivor(&dir, &cgroup, 1000);
        // Its record says it started at another time: not it.
        let mut forged = record.clone();
        forged.start_time += 1;
        let paths = Paths::new(&dir, "tp-0-1");
        adopt::write_atomic(&paths.record(), &serde_json::to_vec(&forged).unwrap()).unwrap();
        // Nor is a record that points at a cgroup of another name obeyed.
        let mut elsewhere = record.clone();
        elsewhere.replica = 1;
        elsewhere.cgroup = vec![fake_cgroup(tmp.path(), "elsewhere", record.pid)];
        let other = Paths::new(&dir, "tp-1-1");
        adopt::create_output(&other).unwrap();
        adopt::write_atomic(&other.record(), &serde_json::to_vec(&elsewhere).unwrap()).unwrap();
        assert_eq!(
            enforce(&dir, Path::new("/proc"), Duration::from_secs(60)),
            0
        );
        assert!(
            !exits_within(&mut child, Duration::from_millis(300)),
            "a stranger was killed"
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn a_flood_while_unsupervised_is_trimmed_to_the_cap() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("s");
        std::fs::create_dir_all(&dir).unwrap();
        let (mut child, _) = survivor(&dir, &tmp.path().join("cg/tp-0-1"), 60_000);
        let paths = Paths::new(&dir, "tp-0-1");
        let mut out = std::fs::OpenOptions::new()
            .append(true)
            .open(paths.output("stdout"))
            .unwrap();
        let line = [b'x'; 99];
        for _ in 0..10_000 {
            out.write_all(&line).unwrap();
            out.write_all(b"\n").unwrap();
        }
        trim_output(&paths, "stdout", 64 << 10);
        let offset = adopt::read_number(&paths.offset("stdout"));
        assert_eq!(offset, 1_000_000 - (32 << 10));
        assert_eq!(adopt::read_number(&paths.dropped("stdout")), offset);
        use std::os::unix::fs::MetadataExt;
        let allocated = std::fs::metadata(paths.output("stdout")).unwrap().blocks() * 512;
        assert!(allocated < 200_000, "{allocated} bytes still allocated");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn stop_ends_the_guard_and_end_of_file_starts_it() {
        let tmp = tempfile::tempdir().unwrap();
        let (read, mut write) = std::io::pipe().unwrap();
        let dir = tmp.path().to_path_buf();
        let guard = std::thread::spawn(move || {
            run(
                &dir,
                Path::new("/proc"),
                OwnedFd::from(read),
                Duration::from_millis(10),
            )
        });
        write.write_all(STOP).unwrap();
        assert_eq!(guard.join().unwrap().unwrap(), Outcome::Stopped);
        let (read, write) = std::io::pipe().unwrap();
        let dir = tmp.path().to_path_buf();
        let guard = std::thread::spawn(move || {
            run(
                &dir,
                Path::new("/proc"),
                OwnedFd::from(read),
                Duration::from_millis(10),
            )
        });
        drop(write);
        // Nothing recorded: nothing to guard.
        assert_eq!(guard.join().unwrap().unwrap(), Outcome::NoneLeft);
        // A supervisor holding the directory takes over from a guard.
        let _held = adopt::take_lock(&tmp.path().join(adopt::LOCK_FILE)).unwrap();
        let (read, write) = std::io::pipe().unwrap();
        let dir = tmp.path().to_path_buf();
        let guard = std::thread::spawn(move || {
            run(
                &dir,
                Path::new("/proc"),
                OwnedFd::from(read),
                Duration::from_millis(10),
            )
        });
        drop(write);
        assert_eq!(guard.join().unwrap().unwrap(), Outcome::TakenOver);
    }
}
