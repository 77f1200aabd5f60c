//! `plugvisor call --stream` end to end: payloads larger than one control
//! message go through the daemon's `Control.CallStream` to the plugin's
//! `HandleStream` and back, byte for byte, without the CLI holding them.

use plugvisor_integration_tests::{Daemon, Sandbox, bin};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Larger than `plugvisor::transport::MAX_MESSAGE` (64 MiB).
const BIG: usize = 80 << 20;

fn daemon() -> (Sandbox, Daemon) {
    let sandbox = Sandbox::new();
    sandbox.plugin("echo", &bin("echo-plugin"), "");
    let daemon = Daemon::start(&sandbox, &[]);
    daemon.wait_ready("echo");
    (sandbox, daemon)
}

/// Writes `len` pseudo-random bytes (xorshift: no run a chunking bug could
/// hide in) to `path`, returning their sha256.
fn write_random(path: &Path, len: usize) -> Vec<u8> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut hash = Sha256::new();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; 1 << 16];
    let mut left = len;
    while left > 0 {
        for b in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
        }
        let n = left.min(buf.len());
        file.write_all(&buf[..n]).unwrap();
        hash.update(&buf[..n]);
        left -= n;
    }
    file.flush().unwrap();
    hash.finalize().to_vec()
}

fn sha256_of(path: &Path) -> (usize, Vec<u8>) {
    let mut file = std::fs::File::open(path).unwrap();
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut len = 0;
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        len += n;
        hash.update(&buf[..n]);
    }
    (len, hash.finalize().to_vec())
}

/// What a finished CLI run left: its status, stderr, and its peak resident
/// set size in KiB: the last VmHWM read from its /proc status while it ran
/// (wait4's ru_maxrss would also count what the forked child shared with
/// this test process before exec).
struct Finished {
    status: i32,
    stderr: String,
    max_rss_kib: i64,
}

/// Runs the CLI with stdin from `input` (or /dev/null) and stdout into
/// `output`, and waits for it with a deadline.
fn run_cli(daemon: &Daemon, args: &[&str], input: Option<&Path>, output: &Path) -> Finished {
    let stdin = match input {
        Some(path) => Stdio::from(std::fs::File::open(path).unwrap()),
        None => Stdio::null(),
    };
    let stderr_path = output.with_extension("stderr");
    let mut child = Command::new(bin("plugvisor"))
        .arg("--control")
        .arg(&daemon.control)
        .args(args)
        .stdin(stdin)
        .stdout(std::fs::File::create(output).unwrap())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .expect("the CLI runs");
    let pid = child.id() as libc::pid_t;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut peak_kib = 0i64;
    let status = loop {
        if let Some(hwm) = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
            })
        {
            peak_kib = peak_kib.max(hwm);
        }
        let mut status = 0;
        // SAFETY: an all-zero rusage is a valid value for wait4 to fill.
        let mut rusage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 on our own child, with valid pointers; WNOHANG so
        // the deadline is checked between polls.
        let reaped = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut rusage) };
        assert!(reaped >= 0, "wait4: {}", std::io::Error::last_os_error());
        if reaped == pid {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "plugvisor {args:?} did not finish within 120s\ndaemon log:\n{}",
                daemon.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    std::mem::forget(child); // reaped above; Child's drop does not wait.
    Finished {
        status: if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            -1
        },
        stderr: std::fs::read_to_string(&stderr_path).unwrap_or_default(),
        max_rss_kib: peak_kib,
    }
}

#[test]
fn a_file_larger_than_one_message_round_trips_through_call_stream() {
    let (sandbox, daemon) = daemon();
    let input = sandbox.dir.path().join("in.bin");
    let output = sandbox.dir.path().join("out.bin");
    let want = write_random(&input, BIG);
    let run = run_cli(
        &daemon,
        &["call", "echo", "echo", "--stream"],
        Some(&input),
        &output,
    );
    assert_eq!(run.status, 0, "{}\n{}", run.stderr, daemon.log_text());
    let (len, got) = sha256_of(&output);
    assert_eq!(len, BIG, "every byte comes back");
    assert_eq!(got, want, "byte for byte");
    eprintln!("the CLI peaked at {} KiB", run.max_rss_kib);
    // The CLI holds a few 1 MiB chunks, not the payload.
    let limit_kib = 48 << 10;
    assert!(
        run.max_rss_kib < limit_kib,
        "the CLI peaked at {} KiB for an {} MiB stream (limit {limit_kib} KiB)",
        run.max_rss_kib,
        BIG >> 20
    );
}

#[test]
fn a_data_file_over_the_limit_streams_by_itself() {
    let (sandbox, daemon) = daemon();
    let input = sandbox.dir.path().join("in.bin");
    let output = sandbox.dir.path().join("out.bin");
    let want = write_random(&input, BIG);
    let file = input.to_str().unwrap();
    let run = run_cli(
        &daemon,
        &["call", "echo", "upper", "--data-file", file],
        None,
        &output,
    );
    assert_eq!(run.status, 0, "{}\n{}", run.stderr, daemon.log_text());
    assert!(
        run.stderr.contains("over the 64 MiB limit of one message")
            && run.stderr.contains("streaming it to echo.upper"),
        "says why it streams: {}",
        run.stderr
    );
    // `upper` upper-cases ASCII letters: compare with the same done here.
    let mut data = std::fs::read(&input).unwrap();
    data.make_ascii_uppercase();
    let (len, got) = sha256_of(&output);
    assert_eq!(len, BIG);
    assert_eq!(got, Sha256::digest(&data).to_vec());
    drop(want);
}

#[test]
fn stdin_over_the_limit_streams_by_itself_and_json_refuses_it() {
    let (sandbox, daemon) = daemon();
    let input = sandbox.dir.path().join("in.bin");
    let output = sandbox.dir.path().join("out.bin");
    let want = write_random(&input, (64 << 20) + 1);
    let run = run_cli(
        &daemon,
        &["call", "echo", "echo", "-"],
        Some(&input),
        &output,
    );
    assert_eq!(run.status, 0, "{}", run.stderr);
    assert!(
        run.stderr.contains("standard input holds more than"),
        "{}",
        run.stderr
    );
    assert_eq!(sha256_of(&output).1, want);

    let run = run_cli(
        &daemon,
        &["call", "echo", "echo", "--json", "-"],
        Some(&input),
        &output,
    );
    assert_eq!(run.status, 1);
    assert!(run.stderr.contains("--json cannot show"), "{}", run.stderr);
}

#[test]
fn small_streams_errors_and_empty_input_behave_like_calls() {
    let (sandbox, daemon) = daemon();
    let output = sandbox.dir.path().join("out.txt");
    let run = run_cli(
        &daemon,
        &["call", "echo", "upper", "--stream", "--data", "hello"],
        None,
        &output,
    );
    assert_eq!(run.status, 0, "{}", run.stderr);
    assert_eq!(std::fs::read_to_string(&output).unwrap(), "HELLO");

    // Empty stdin: one chunk, marked last; an empty reply.
    let run = run_cli(
        &daemon,
        &["call", "echo", "echo", "--stream"],
        None,
        &output,
    );
    assert_eq!(run.status, 0, "{}", run.stderr);
    assert_eq!(std::fs::read(&output).unwrap(), b"");

    let run = run_cli(
        &daemon,
        &["call", "echo", "nosuch", "--stream", "--data", "x"],
        None,
        &output,
    );
    assert_eq!(run.status, 1);
    assert!(
        run.stderr.contains("echo.nosuch: Unimplemented"),
        "the plugin's status reaches the caller: {}",
        run.stderr
    );

    let run = run_cli(
        &daemon,
        &["call", "nobody", "echo", "--stream", "--data", "x"],
        None,
        &output,
    );
    assert_eq!(run.status, 1);
    assert!(run.stderr.contains("nobody"), "{}", run.stderr);
}
