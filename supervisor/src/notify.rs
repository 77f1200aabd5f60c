//! systemd's sd_notify protocol: `READY=1`, `STATUS=...`, `WATCHDOG=1` sent
//! as datagrams to `$NOTIFY_SOCKET`. Without that variable every call is a
//! no-op, so the daemon runs the same outside systemd.

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
        Ok(Notifier {
            socket: Some((UnixDatagram::unbound()?, addr)),
        })
    }

    /// Sends one notification, e.g. `READY=1\nSTATUS=3 plugins ready`.
    pub fn notify(&self, message: &str) -> io::Result<()> {
        if let Some((socket, addr)) = &self.socket {
            socket.send_to_addr(message.as_bytes(), addr)?;
        }
        Ok(())
    }

    /// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC`, when set for
    /// this process (`$WATCHDOG_PID` absent or ours).
    pub fn watchdog_interval() -> Option<Duration> {
        if let Ok(pid) = std::env::var("WATCHDOG_PID")
            && pid.parse::<u32>().ok() != Some(std::process::id())
        {
            return None;
        }
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
        (usec > 0).then(|| Duration::from_micros(usec / 2))
    }
}
