//! systemd's sd_notify protocol: `READY=1`, `STATUS=...`, `WATCHDOG=1` sent
//! as datagrams to `$NOTIFY_SOCKET`. Without that variable every call is a
//! no-op, so the daemon runs the same outside systemd.
//!
//! The socket is non-blocking, so a full systemd queue never stalls a runtime
//! thread: periodic messages (`WATCHDOG=1`, `STATUS=`) are dropped and sent
//! again at the next tick; one-off ones (`READY=1`, `STOPPING=1`) go through
//! [`Notifier::announce`], which retries for a while.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// A handle on `$NOTIFY_SOCKET`, if systemd gave one.
#[derive(Debug)]
pub struct Notifier {
    socket: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET` (a path, or `@name` for an abstract socket).
    pub fn from_env() -> io::Result<Notifier> {
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
            return Ok(Notifier { socket: None });
        };
        let path = path.to_string_lossy().into_owned();
        let addr = if let Some(name) = path.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?
        } else {
            std::os::unix::net::SocketAddr::from_pathname(&path)?
        };
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        Ok(Notifier {
            socket: Some((socket, addr)),
        })
    }

    /// Sends one notification, e.g. `READY=1\nSTATUS=3 plugins ready`.
    pub fn notify(&self, message: &str) -> io::Result<()> {
        if let Some((socket, addr)) = &self.socket {
            socket.send_to_addr(message.as_bytes(), addr)?;
        }
        Ok(())
    }

    /// Sends a notification that must not be lost, such as `READY=1`: while
    /// systemd's queue is full, retries every 10 ms for up to [`ANNOUNCE_FOR`].
    pub async fn announce(&self, message: &str) -> io::Result<()> {
        let deadline = tokio::time::Instant::now() + ANNOUNCE_FOR;
        loop {
            match self.notify(message) {
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                sent => return sent,
            }
        }
    }

    /// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC`, when set for
    /// this process (`$WATCHDOG_PID` absent or ours).
    pub fn watchdog_interval() -> Option<Duration> {
        watchdog_interval_of(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        )
    }

    /// Pings the watchdog every `watchdog` (if systemd asked for it) and sends
    /// `STATUS=<status()>` whenever it changes, checked at the same ticks (every
    /// [`STATUS_EVERY`] without a watchdog). Never returns; drop it to stop.
    pub async fn keep_alive(&self, watchdog: Option<Duration>, mut status: impl FnMut() -> String) {
        let mut tick = tokio::time::interval(watchdog.unwrap_or(STATUS_EVERY));
        // After a stall, one ping is enough; a burst of catch-up pings is noise.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = String::new();
        loop {
            tick.tick().await;
            if watchdog.is_some() {
                let _ = self.notify("WATCHDOG=1");
            }
            let now = status();
            if now != last {
                // Resent next tick if systemd's queue was full.
                if self.notify(&format!("STATUS={now}")).is_ok() {
                    last = now;
                }
            }
        }
    }

    /// Pings the watchdog every `watchdog` and nothing else, e.g. while the
    /// daemon stops its plugins (which can take longer than `WatchdogSec`).
    pub async fn feed_watchdog(&self, watchdog: Option<Duration>) {
        let Some(every) = watchdog else {
            return std::future::pending().await;
        };
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let _ = self.notify("WATCHDOG=1");
        }
    }
}

/// How long [`Notifier::announce`] keeps trying while systemd's queue is full.
pub const ANNOUNCE_FOR: Duration = Duration::from_secs(5);

/// How often `STATUS=` is refreshed when there is no watchdog to ping.
pub const STATUS_EVERY: Duration = Duration::from_secs(5);

/// The watchdog ping interval for `$WATCHDOG_USEC` and `$WATCHDOG_PID`: half
/// the timeout (at least 1 ms), or `None` when there is no watchdog or it is
/// meant for another process.
pub fn watchdog_interval_of(
    usec: Option<&str>,
    pid: Option<&str>,
    own_pid: u32,
) -> Option<Duration> {
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(own_pid)
    {
        return None;
    }
    let usec: u64 = usec?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_pings_at_half_the_timeout_for_this_process_only() {
        let half = Some(Duration::from_millis(100));
        assert_eq!(watchdog_interval_of(Some("200000"), None, 7), half);
        assert_eq!(watchdog_interval_of(Some("200000"), Some("7"), 7), half);
        assert_eq!(watchdog_interval_of(Some("200000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval_of(None, None, 7), None);
        assert_eq!(watchdog_interval_of(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval_of(Some("soon"), None, 7), None);
        // A zero period would make tokio's interval panic.
        assert_eq!(
            watchdog_interval_of(Some("1"), None, 7),
            Some(Duration::from_millis(1))
        );
    }

    /// A notifier sending to a socket bound at `path`, made like `from_env`.
    fn notifier_for(path: &std::path::Path) -> Notifier {
        // Not through NOTIFY_SOCKET: the environment is shared by all tests.
        let socket = UnixDatagram::unbound().unwrap();
        socket.set_nonblocking(true).unwrap();
        let addr = std::os::unix::net::SocketAddr::from_pathname(path).unwrap();
        Notifier {
            socket: Some((socket, addr)),
        }
    }

    #[test]
    fn a_full_queue_drops_notifications_instead_of_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        // Bound but never read, like a systemd that is busy: its queue
        // (net.unix.max_dgram_qlen, often 10) fills up.
        let _receiver = UnixDatagram::bind(&path).unwrap();
        let notifier = notifier_for(&path);
        let results: Vec<_> = (0..1000).map(|_| notifier.notify("WATCHDOG=1")).collect();
        assert!(results[0].is_ok());
        let full = results.iter().find_map(|r| r.as_ref().err());
        assert_eq!(
            full.map(io::Error::kind),
            Some(io::ErrorKind::WouldBlock),
            "{results:?}"
        );
    }

    #[tokio::test]
    async fn announce_waits_for_room_in_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let receiver = UnixDatagram::bind(&path).unwrap();
        let notifier = notifier_for(&path);
        while notifier.notify("WATCHDOG=1").is_ok() {}
        // systemd gets to its queue 50 ms later.
        let reader = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let mut buf = [0u8; 64];
            loop {
                let len = receiver.recv(&mut buf).unwrap();
                if &buf[..len] == b"READY=1" {
                    return;
                }
            }
        });
        notifier.announce("READY=1").await.unwrap();
        reader.join().unwrap();
    }

    #[tokio::test]
    async fn sends_status_only_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let receiver = UnixDatagram::bind(&path).unwrap();
        receiver.set_nonblocking(true).unwrap();
        let notifier = notifier_for(&path);
        let mut n = 0;
        let status = || {
            n += 1;
            if n < 4 { "starting" } else { "up" }.to_string()
        };
        let every = Some(Duration::from_millis(1));
        let _ = tokio::time::timeout(
            Duration::from_millis(50),
            notifier.keep_alive(every, status),
        )
        .await;
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while let Ok(len) = receiver.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..len]).into_owned());
        }
        let statuses: Vec<_> = got.iter().filter(|m| m.starts_with("STATUS=")).collect();
        assert_eq!(statuses, ["STATUS=starting", "STATUS=up"], "{got:?}");
        assert!(
            got.iter().filter(|m| *m == "WATCHDOG=1").count() >= 4,
            "{got:?}"
        );
    }
}
