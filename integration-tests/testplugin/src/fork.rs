//! `--double-fork`: leave a grandchild behind in our process group, the way a
//! daemonizing helper script would, so the supervisor's tests can check that
//! stopping a plugin kills its whole group.

use std::io;

/// Forks a child that forks a grandchild and exits at once. The grandchild
/// stays in this process group, writes `grandchild pid <N>` to stderr and
/// sleeps until killed. Returns the grandchild's pid.
///
/// Must run before any other thread exists (before the Tokio runtime): the
/// children then inherit no lock held by another thread, so they may
/// allocate.
pub fn double_fork() -> io::Result<i32> {
    let mut pipe = [0; 2];
    // SAFETY: `pipe` is a valid, writable array of two c_ints.
    if unsafe { libc::pipe(pipe.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let [read_end, write_end] = pipe;

    // SAFETY: the process is single-threaded here (see the doc comment), so
    // the child is a full copy with no lock held by a vanished thread. The
    // child runs only `middle`, which never returns.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(io::Error::last_os_error());
    }
    if child == 0 {
        middle(read_end, write_end);
    }

    // SAFETY: `write_end` is our open copy of the pipe's write end; closing it
    // lets the read below see EOF if the child dies without writing.
    unsafe { libc::close(write_end) };
    let mut buf = [0u8; 4];
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let n = unsafe { libc::read(read_end, buf[got..].as_mut_ptr().cast(), buf.len() - got) };
        match n {
            n if n > 0 => got += n as usize,
            0 => break,
            _ if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
            _ => break,
        }
    }
    // SAFETY: `read_end` is open and not used after this.
    unsafe { libc::close(read_end) };
    // Reap the middle child so it does not linger as a zombie.
    let mut status = 0;
    // SAFETY: `child` is our own child's pid; `status` is a valid out-pointer.
    unsafe { libc::waitpid(child, &mut status, 0) };
    if got != buf.len() {
        return Err(io::Error::other(
            "the forked child exited without reporting the grandchild's pid",
        ));
    }
    Ok(i32::from_ne_bytes(buf))
}

/// The middle process: fork the grandchild, report its pid, exit.
fn middle(read_end: i32, write_end: i32) -> ! {
    // SAFETY: single-threaded copy of a single-threaded process (see
    // `double_fork`); the grandchild runs only `grandchild`, which never returns.
    let grandchild = unsafe { libc::fork() };
    if grandchild == 0 {
        grandchild_main(read_end, write_end);
    }
    // The grandchild reports its own pid through the pipe: only it can
    // name itself as the supervisor sees it (see `host_pid`).
    // SAFETY: `_exit` skips atexit handlers and stdio flushing, which belong
    // to the parent.
    unsafe { libc::_exit(if grandchild < 0 { 1 } else { 0 }) }
}

/// The grandchild: announce itself on stderr, then sleep until killed.
fn grandchild_main(read_end: i32, write_end: i32) -> ! {
    let pid = host_pid();
    let bytes = pid.to_ne_bytes();
    // SAFETY: both are this process's copies of the pipe; `bytes` is a valid
    // buffer of its length.
    unsafe {
        libc::write(write_end, bytes.as_ptr().cast(), bytes.len());
        libc::close(read_end);
        libc::close(write_end);
    }
    // Allocating is fine: this process is a copy of a single-threaded one.
    let line = format!("grandchild pid {pid}\n");
    // SAFETY: fd 2 is stderr; `line` is a valid buffer of its length.
    unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
    loop {
        // SAFETY: `pause` has no preconditions; it returns only after a
        // handled signal, and we handle none, so we sleep until killed.
        unsafe { libc::pause() };
    }
}

/// This process's pid as the supervisor sees it. In a PID namespace of its
/// own `getpid` answers the namespace's number, but /proc (mounted by the
/// host, not remounted here) resolves `/proc/self` in the host's namespace.
pub fn host_pid() -> i32 {
    std::fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_str().and_then(|s| s.parse().ok()))
        .unwrap_or_else(|| std::process::id() as i32)
}
