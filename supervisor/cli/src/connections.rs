//! The control server's connections, tracked so that shutdown can close the
//! ones still open after the grace period: a client that never sends the
//! HTTP/2 preface, or stops halfway through a request, would otherwise keep
//! tonic's graceful shutdown (and so the daemon) waiting forever.
//!
//! Each accepted socket is wrapped in a [`Tracked`] stream that registers its
//! file descriptor while it is open; [`Connections::close_all`] shuts every
//! registered socket down (shutdown(2)), which ends its reads with EOF and
//! lets its connection task finish. Nothing is checked on the read/write path.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;

/// The open connections of one server. The lock guards the map and is also
/// what keeps a registered descriptor open: a [`Tracked`] stream leaves the
/// map (under the lock) before its socket is closed.
#[derive(Debug, Clone, Default)]
pub struct Connections {
    open: Arc<Mutex<Registry>>,
}

#[derive(Debug, Default)]
struct Registry {
    next: u64,
    fds: HashMap<u64, RawFd>,
    /// Set by `close_all`: connections accepted later are shut at once.
    closed: bool,
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        // A panic while holding the lock leaves the map consistent (every
        // operation on it is a single insert or remove), so keep using it.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wraps an accepted socket so that [`Self::close_all`] can reach it.
    pub fn track(&self, stream: UnixStream) -> Tracked {
        let mut registry = self.lock();
        let id = registry.next;
        registry.next += 1;
        let fd = stream.as_raw_fd();
        if registry.closed {
            shut(fd);
        } else {
            registry.fds.insert(id, fd);
        }
        Tracked {
            stream,
            id,
            connections: self.clone(),
        }
    }

    /// How many tracked connections are open.
    pub fn len(&self) -> usize {
        self.lock().fds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Shuts down every open connection (and any tracked later): their
    /// readers see end of file and their writers an error.
    pub fn close_all(&self) {
        let mut registry = self.lock();
        registry.closed = true;
        for fd in registry.fds.values() {
            shut(*fd);
        }
    }
}

fn shut(fd: RawFd) {
    // SAFETY: `fd` is the descriptor of a socket owned by a `Tracked` stream
    // that is still registered, so it is open: a stream deregisters under
    // the registry's lock (held by our caller) before it closes its socket.
    // shutdown(2) only changes the socket's state; it does not close `fd`.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}

/// An accepted control connection, registered in its [`Connections`] while
/// it is open.
#[derive(Debug)]
pub struct Tracked {
    stream: UnixStream,
    id: u64,
    connections: Connections,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        // Deregister first: `stream` (and its descriptor) is dropped after
        // this body has run.
        self.connections.lock().fds.remove(&self.id);
    }
}

impl tonic::transport::server::Connected for Tracked {
    type ConnectInfo = tonic::transport::server::UdsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn close_all_ends_a_read_that_waits_on_a_silent_peer() {
        let connections = Connections::default();
        let (ours, mut peer) = UnixStream::pair().expect("socket pair");
        let mut tracked = connections.track(ours);
        assert_eq!(connections.len(), 1);
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let n = tracked.read(&mut buf).await;
            (n.map_err(|e| e.kind()), tracked)
        });
        connections.close_all();
        let (n, tracked) = tokio::time::timeout(std::time::Duration::from_secs(10), reader)
            .await
            .expect("the read ends once the connection is shut")
            .expect("reader task");
        assert_eq!(n, Ok(0), "end of file");
        // The peer sees the close as well.
        let mut buf = [0u8; 1];
        assert_eq!(peer.read(&mut buf).await.expect("peer read"), 0);
        drop(tracked);
        assert!(connections.is_empty(), "a dropped stream deregisters");
    }

    #[tokio::test]
    async fn connections_tracked_after_close_all_are_shut_at_once() {
        let connections = Connections::default();
        connections.close_all();
        let (ours, mut peer) = UnixStream::pair().expect("socket pair");
        let _tracked = connections.track(ours);
        assert!(connections.is_empty());
        let mut buf = [0u8; 1];
        assert_eq!(peer.read(&mut buf).await.expect("peer read"), 0);
    }
}
