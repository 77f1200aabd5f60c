//! Methods that push against the supervisor's isolation: burn CPU, fork
//! until refused, open files until refused, reach for the network, and
//! report what the process was given (user, rlimits, cgroup, no_new_privs).

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
