//! Methods that push against the supervisor's isolation: burn CPU, fork
//! until refused, open files until refused, reach for the network, and
//! report what the process was given (user, rlimits, cgroup, no_new_privs),
//! try system calls a seccomp filter blocks, report its PID namespace, and
//! write and read files a filesystem view may forbid.

use plugvisor_sdk::{Request, Response, Status};
use std::time::{Duration, Instant};

fn text(req: &Request) -> Result<&str, Status> {
    std::str::from_utf8(&req.payload)
        .map(str::trim)
        .map_err(|e| Status::invalid_argument(format!("{}: payload is not UTF-8: {e}", req.method)))
}

fn number<T: std::str::FromStr>(req: &Request, field: &str, default: T) -> Result<T, Status> {
    match text(req)?.split(',').map(str::trim).find(|p| !p.is_empty()) {
        None => Ok(default),
        Some(t) => t.parse().map_err(|_| {
            Status::invalid_argument(format!("{}: {field} `{t}` is not a number", req.method))
        }),
    }
}

/// `EMFILE` for 24, and so on.
fn errno_name(errno: i32) -> String {
    match errno {
        libc::EMFILE => "EMFILE".into(),
        libc::EAGAIN => "EAGAIN".into(),
        libc::ENETUNREACH => "ENETUNREACH".into(),
        libc::ECONNREFUSED => "ECONNREFUSED".into(),
        libc::EPERM => "EPERM".into(),
        libc::EACCES => "EACCES".into(),
        libc::ENOSYS => "ENOSYS".into(),
        other => format!("errno {other}"),
    }
}

fn process_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into `ts`, a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// `spin MS[,THREADS]`: keeps THREADS threads (default 2) busy for MS ms of
/// wall time; answers `{"wall_ms", "cpu_ms"}`, the CPU time the process got.
pub fn spin(req: &Request) -> Result<Response, Status> {
    let t = text(req)?;
    let mut parts = t.split(',').map(str::trim);
    let ms: u64 = parts
        .next()
        .filter(|p| !p.is_empty())
        .unwrap_or("1000")
        .parse()
        .map_err(|_| Status::invalid_argument(format!("spin: `{t}` is not MS[,THREADS]")))?;
    let threads: usize = parts
        .next()
        .unwrap_or("2")
        .parse()
        .map_err(|_| Status::invalid_argument(format!("spin: `{t}` is not MS[,THREADS]")))?;
    let started = Instant::now();
    let cpu_before = process_cpu_time();
    let deadline = started + Duration::from_millis(ms);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut x = 0u64;
                while Instant::now() < deadline {
                    for i in 0..10_000u64 {
                        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
                    }
                }
            });
        }
    });
    let cpu = process_cpu_time() - cpu_before;
    Ok(Response::new(
        serde_json::json!({
            "wall_ms": started.elapsed().as_millis() as u64,
            "cpu_ms": cpu.as_millis() as u64,
        })
        .to_string(),
    ))
}

/// `fork_bomb N`: forks up to N children, as fast as it can, until fork is
/// refused. Each child tries 8 more forks (its children just sleep), then
/// sleeps until killed. Bounded, so that without a pids limit it stays a
/// few thousand processes, not the machine. Answers `{"forked", "error"}`.
pub fn fork_bomb(req: &Request) -> Result<Response, Status> {
    let n: u32 = number(req, "N", 1000)?;
    let mut forked = 0u32;
    let mut error = None;
    for _ in 0..n {
        // SAFETY: the child only makes async-signal-safe calls (fork,
        // nanosleep, pause, _exit) in `bomb_child`, which never returns, so
        // it touches no lock another thread of this process may hold.
        let pid = unsafe { libc::fork() };
        match pid {
            0 => bomb_child(),
            p if p > 0 => forked += 1,
            _ => {
                error = Some(errno_name(
                    std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
                ));
                break;
            }
        }
    }
    Ok(Response::new(
        serde_json::json!({"forked": forked, "error": error}).to_string(),
    ))
}

fn bomb_child() -> ! {
    let pause = libc::timespec {
        tv_sec: 0,
        tv_nsec: 10_000_000,
    };
    for _ in 0..8 {
        // SAFETY: fork, nanosleep and pause are async-signal-safe; the
        // grandchild only pauses until killed.
        unsafe {
            if libc::fork() == 0 {
                loop {
                    libc::pause();
                }
            }
            libc::nanosleep(&pause, std::ptr::null_mut());
        }
    }
    loop {
        // SAFETY: pause has no preconditions; we sleep until killed.
        unsafe { libc::pause() };
    }
}

/// `open_files N`: opens /dev/null up to N times, keeping each open, until
/// refused. Answers `{"opened", "error"}` (e.g. `EMFILE`), then closes them.
pub fn open_files(req: &Request) -> Result<Response, Status> {
    let n: usize = number(req, "N", 100_000)?;
    let mut files = Vec::new();
    let mut error = None;
    for _ in 0..n {
        match std::fs::File::open("/dev/null") {
            Ok(f) => files.push(f),
            Err(e) => {
                error = Some(errno_name(e.raw_os_error().unwrap_or(0)));
                break;
            }
        }
    }
    Ok(Response::new(
        serde_json::json!({"opened": files.len(), "error": error}).to_string(),
    ))
}

/// `connect HOST:PORT`: opens a TCP connection (2 s at most). Answers
/// `{"connected": bool, "error"}`.
pub fn connect(req: &Request) -> Result<Response, Status> {
    let addr: std::net::SocketAddr = text(req)?
        .parse()
        .map_err(|e| Status::invalid_argument(format!("connect: not HOST:PORT: {e}")))?;
    let result = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2));
    let (connected, error) = match result {
        Ok(_) => (true, None),
        Err(e) => (
            false,
            Some(match e.raw_os_error() {
                Some(errno) => format!("{} ({e})", errno_name(errno)),
                None => e.to_string(),
            }),
        ),
    };
    Ok(Response::new(
        serde_json::json!({"connected": connected, "error": error}).to_string(),
    ))
}

fn outcome(result: std::io::Result<()>) -> serde_json::Value {
    match result {
        Ok(()) => serde_json::json!({"ok": true, "error": null}),
        Err(e) => serde_json::json!({
            "ok": false,
            "error": match e.raw_os_error() {
                Some(errno) => format!("{} ({e})", errno_name(errno)),
                None => e.to_string(),
            },
        }),
    }
}

/// `bind HOST:PORT`: binds a TCP listener there and closes it. Answers
/// `{"ok": bool, "error"}` (`EACCES` for a privileged port without
/// CAP_NET_BIND_SERVICE).
pub fn bind(req: &Request) -> Result<Response, Status> {
    let addr: std::net::SocketAddr = text(req)?
        .parse()
        .map_err(|e| Status::invalid_argument(format!("bind: not HOST:PORT: {e}")))?;
    let result = std::net::TcpListener::bind(addr).map(drop);
    Ok(Response::new(outcome(result).to_string()))
}

/// `write_file PATH`: creates (or truncates) the file and writes a line to
/// it. Answers `{"ok": bool, "error"}` (`EACCES` outside a filesystem
/// view's writable paths).
pub fn write_file(req: &Request) -> Result<Response, Status> {
    let result = std::fs::write(text(req)?, b"written by the test plugin\n");
    Ok(Response::new(outcome(result).to_string()))
}

/// `read_file PATH`: reads a file, or lists a directory. Answers
/// `{"ok": bool, "error", "bytes"}` (`bytes`: the file's length, or the
/// number of entries).
pub fn read_file(req: &Request) -> Result<Response, Status> {
    let path = std::path::Path::new(text(req)?);
    let result = if path.is_dir() {
        std::fs::read_dir(path).and_then(|d| {
            d.map(|e| e.map(drop))
                .collect::<Result<Vec<_>, _>>()
                .map(|v| v.len())
        })
    } else {
        std::fs::read(path).map(|b| b.len())
    };
    let bytes = result.as_ref().ok().copied();
    let mut answer = outcome(result.map(drop));
    answer["bytes"] = serde_json::json!(bytes);
    Ok(Response::new(answer.to_string()))
}

/// `connect_unix PATH`: connects to a Unix socket (another plugin's, say)
/// and closes the connection. Answers `{"ok": bool, "error"}`.
pub fn connect_unix(req: &Request) -> Result<Response, Status> {
    let result = std::os::unix::net::UnixStream::connect(text(req)?).map(drop);
    Ok(Response::new(outcome(result).to_string()))
}

fn rlimit(resource: libc::__rlimit_resource_t) -> [u64; 2] {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into `r`, a valid rlimit.
    unsafe { libc::getrlimit(resource, &mut r) };
    [r.rlim_cur, r.rlim_max]
}

/// `identity`: who and what this process is: uid, gid, groups,
/// no_new_privs, rlimits, cgroups, executable, and network interfaces.
pub fn identity() -> Result<Response, Status> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    // /proc/self/net is this process's network namespace (sysfs shows the
    // namespace of whoever mounted it).
    let interfaces: Vec<String> = std::fs::read_to_string("/proc/self/net/dev")
        .unwrap_or_default()
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next().map(|n| n.trim().to_string()))
        .collect();
    Ok(Response::new(
        serde_json::json!({
            "uid": field("Uid:"),
            "gid": field("Gid:"),
            "groups": field("Groups:"),
            "no_new_privs": field("NoNewPrivs:").first().cloned().unwrap_or_default(),
            "cap_eff": field("CapEff:").first().cloned().unwrap_or_default(),
            "cap_prm": field("CapPrm:").first().cloned().unwrap_or_default(),
            "cap_inh": field("CapInh:").first().cloned().unwrap_or_default(),
            "cap_bnd": field("CapBnd:").first().cloned().unwrap_or_default(),
            "cap_amb": field("CapAmb:").first().cloned().unwrap_or_default(),
            "rlimits": {
                "nofile": rlimit(libc::RLIMIT_NOFILE),
                "core": rlimit(libc::RLIMIT_CORE),
                "data": rlimit(libc::RLIMIT_DATA),
                "cpu": rlimit(libc::RLIMIT_CPU),
                "nproc": rlimit(libc::RLIMIT_NPROC),
            },
            "cgroup": std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default(),
            "exe": std::fs::read_link("/proc/self/exe").map(|p| p.display().to_string()).unwrap_or_default(),
            "net_ns": std::fs::read_link("/proc/self/ns/net").map(|p| p.display().to_string()).unwrap_or_default(),
            "interfaces": interfaces,
        })
        .to_string(),
    ))
}

/// What `syscall` can try.
const ATTEMPTS: [&str; 8] = [
    "mount",
    "unshare_user",
    "ptrace",
    "keyctl",
    "bpf",
    "perf_event_open",
    "personality",
    "clone3",
];

/// One attempt at a system call the default seccomp filter blocks, with
/// arguments that do no harm when it is allowed.
fn attempt(name: &str) -> Option<libc::c_long> {
    // SAFETY: for every arm, raw system calls with null pointers or plain
    // integers; none writes to this process's memory, and each either fails
    // or changes only the calling process (which is a forked copy unless
    // `here` was asked for).
    unsafe {
        Some(match name {
            "mount" => libc::syscall(
                libc::SYS_mount,
                c"none".as_ptr(),
                c"/tmp".as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                std::ptr::null::<libc::c_void>(),
            ),
            "unshare_user" => libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUSER),
            // Succeeds when allowed: the forked copy asks to be traced by
            // the plugin, which never traces it.
            "ptrace" => libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0),
            // Succeeds when allowed: the session keyring's serial number.
            "keyctl" => libc::syscall(
                libc::SYS_keyctl,
                0,     // KEYCTL_GET_KEYRING_ID
                -3i32, // KEY_SPEC_SESSION_KEYRING
                0,
            ),
            "bpf" => libc::syscall(libc::SYS_bpf, 0, std::ptr::null::<libc::c_void>(), 0),
            "perf_event_open" => libc::syscall(
                libc::SYS_perf_event_open,
                std::ptr::null::<libc::c_void>(),
                0,
                -1,
                -1,
                0,
            ),
            // ADDR_NO_RANDOMIZE: one of the personas the filter refuses.
            "personality" => libc::syscall(libc::SYS_personality, 0x0040000),
            // Succeeds when allowed; answered ENOSYS by the filter.
            "clone3" => libc::syscall(libc::SYS_clone3, std::ptr::null::<libc::c_void>(), 0),
            _ => return None,
        })
    }
}

/// `syscall NAME[,here]`: tries NAME (see `attempt`) in a forked copy of
/// this process (or, with `here`, in the plugin itself: for a filter that
/// kills) and answers `{"name", "result", "errno", "error"}`; `errno` is 0
/// when the call succeeded.
pub fn syscall(req: &Request) -> Result<Response, Status> {
    let t = text(req)?;
    let mut parts = t.split(',').map(str::trim);
    let asked = parts.next().unwrap_or_default();
    let here = parts.next() == Some("here");
    let Some(name) = ATTEMPTS.iter().copied().find(|n| *n == asked) else {
        return Err(Status::invalid_argument(format!(
            "syscall: no attempt named `{asked}`; try one of {}",
            ATTEMPTS.join(", ")
        )));
    };
    let (result, errno) = if here {
        let rc = attempt(name).unwrap_or(-1);
        let errno = if rc < 0 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        } else {
            0
        };
        (rc, errno)
    } else {
        in_fork(name)?
    };
    Ok(Response::new(
        serde_json::json!({
            "name": name,
            "result": result,
            "errno": errno,
            "error": if errno == 0 { "ok".to_string() } else { errno_name(errno) },
        })
        .to_string(),
    ))
}

/// Runs `attempt(name)` in a forked child, which reports (result, errno)
/// through a pipe and exits.
fn in_fork(name: &'static str) -> Result<(libc::c_long, i32), Status> {
    let fail = |what: &str| {
        Status::internal(format!(
            "syscall: {what}: {}",
            std::io::Error::last_os_error()
        ))
    };
    let mut pipe = [0; 2];
    // SAFETY: `pipe` is a valid array of two descriptors to fill.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(fail("pipe"));
    }
    // SAFETY: the child makes only raw system calls (async-signal-safe in a
    // copy of a multi-threaded process) and leaves with `_exit`.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(fail("fork"));
    }
    if pid == 0 {
        let rc = attempt(name).unwrap_or(-1);
        // SAFETY: errno of this thread, then a write to our own pipe.
        unsafe {
            let errno = if rc < 0 { *libc::__errno_location() } else { 0 };
            let msg = [rc, errno as i64];
            libc::write(pipe[1], msg.as_ptr().cast(), std::mem::size_of_val(&msg));
            libc::_exit(0);
        }
    }
    let mut msg = [0i64; 2];
    // SAFETY: close our write end, read the report into a valid buffer, reap.
    let n = unsafe {
        libc::close(pipe[1]);
        let n = libc::read(
            pipe[0],
            msg.as_mut_ptr().cast(),
            std::mem::size_of_val(&msg),
        );
        libc::close(pipe[0]);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
        n
    };
    if n != std::mem::size_of_val(&msg) as isize {
        return Err(Status::internal(format!(
            "syscall: the forked child died before reporting on {name}"
        )));
    }
    Ok((msg[0] as libc::c_long, msg[1] as i32))
}

/// `pid_info`: `{"pid", "host_pid", "seccomp", "pid_ns"}`: the pid this
/// process sees, the one the supervisor sees, the Seccomp field of its
/// status, and its PID namespace.
pub fn pid_info() -> Result<Response, Status> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    Ok(Response::new(
        serde_json::json!({
            "pid": std::process::id(),
            "host_pid": crate::fork::host_pid(),
            "seccomp": field("Seccomp:"),
            "nspid": field("NSpid:"),
            "pid_ns": std::fs::read_link("/proc/self/ns/pid").map(|p| p.display().to_string()).unwrap_or_default(),
        })
        .to_string(),
    ))
}
