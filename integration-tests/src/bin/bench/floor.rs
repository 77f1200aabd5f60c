//! The floors every call-path figure is a ratio to: a raw Unix-socket
//! ping-pong of the same payload, and a raw Unix-socket copy of the same
//! bytes as the HandleStream figure.

use super::spin::CpuMode;
use super::{Counts, PAYLOAD, Result, STREAM_CHUNK, STREAM_TOTAL, Stats};
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Round trips of a 64 B payload over a Unix socket to an echo thread: the
/// client is a tokio task on this runtime (as a supervisor's calls are), the
/// server a thread with its own current-thread tokio runtime (as a plugin's
/// is). Also returns a both-ends-blocking variant: the kernel's own floor.
pub async fn raw_floor(root: &Path, counts: Counts, cpus: CpuMode) -> Result<(Stats, Stats)> {
    let _spin = cpus.hold()?;
    // Tokio client <-> echo thread running its own tokio runtime.
    let path = root.join("raw.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path)?;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        rt.block_on(async move {
            listener.set_nonblocking(true)?;
            let listener = tokio::net::UnixListener::from_std(listener)?;
            let (mut stream, _) = listener.accept().await?;
            let mut buf = [0u8; PAYLOAD];
            loop {
                match stream.read_exact(&mut buf).await {
                    Ok(_) => stream.write_all(&buf).await?,
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
        })
    });
    let n = counts.latency;
    let warm = counts.latency_warmup;
    let client = tokio::spawn(async move {
        let mut stream = tokio::net::UnixStream::connect(&path).await?;
        let out = [7u8; PAYLOAD];
        let mut back = [0u8; PAYLOAD];
        let mut samples = Vec::with_capacity(n);
        for i in 0..warm + n {
            let t = Instant::now();
            stream.write_all(&out).await?;
            stream.read_exact(&mut back).await?;
            if i >= warm {
                samples.push(t.elapsed());
            }
        }
        Ok::<_, std::io::Error>(samples)
    });
    let samples = client.await??;
    server
        .join()
        .map_err(|_| "the raw echo thread panicked")??;
    let floor = Stats::of(samples)?;

    // Both ends blocking std threads.
    let path = root.join("rawb.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path)?;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut stream, _) = listener.accept()?;
        let mut buf = [0u8; PAYLOAD];
        loop {
            match stream.read_exact(&mut buf) {
                Ok(()) => stream.write_all(&buf)?,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    });
    let samples = tokio::task::spawn_blocking(move || {
        let mut stream = std::os::unix::net::UnixStream::connect(&path)?;
        let out = [7u8; PAYLOAD];
        let mut back = [0u8; PAYLOAD];
        let mut samples = Vec::with_capacity(n);
        for i in 0..warm + n {
            let t = Instant::now();
            stream.write_all(&out)?;
            stream.read_exact(&mut back)?;
            if i >= warm {
                samples.push(t.elapsed());
            }
        }
        Ok::<_, std::io::Error>(samples)
    })
    .await??;
    server
        .join()
        .map_err(|_| "the raw echo thread panicked")??;
    Ok((floor, Stats::of(samples)?))
}

/// A raw Unix-socket round trip of `STREAM_TOTAL` bytes, like the
/// HandleStream figure: a writer thread sends them in `STREAM_CHUNK` writes
/// over a socketpair to an echo thread, which writes each read back; this
/// thread reads everything back. Timed from the first write to the last byte
/// back. Returns the median and best GB/s (payload bytes per second, each
/// sent and received back) over `counts.stream_reps` copies.
pub async fn raw_copy(counts: Counts) -> Result<(f64, f64)> {
    let copy_once = |total: usize| -> std::io::Result<Duration> {
        let (mut near, mut far) = std::os::unix::net::UnixStream::pair()?;
        let echo = std::thread::spawn(move || -> std::io::Result<()> {
            let mut buf = vec![0u8; STREAM_CHUNK];
            loop {
                let n = far.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                far.write_all(&buf[..n])?;
            }
        });
        let mut sender = near.try_clone()?;
        let started = Instant::now();
        let writer = std::thread::spawn(move || -> std::io::Result<()> {
            let chunk = vec![7u8; STREAM_CHUNK];
            for _ in 0..total / STREAM_CHUNK {
                sender.write_all(&chunk)?;
            }
            sender.shutdown(std::net::Shutdown::Write)
        });
        let mut buf = vec![0u8; STREAM_CHUNK];
        let mut back = 0;
        while back < total {
            let n = near.read(&mut buf)?;
            if n == 0 {
                break;
            }
            back += n;
        }
        let elapsed = started.elapsed();
        for t in [writer, echo] {
            t.join()
                .map_err(|_| std::io::Error::other("a raw copy thread panicked"))??;
        }
        if back != total {
            return Err(std::io::Error::other(format!(
                "the raw copy got {back} bytes of {total} back"
            )));
        }
        Ok(elapsed)
    };
    let reps = counts.stream_reps;
    let mut rates = tokio::task::spawn_blocking(move || {
        copy_once(8 * STREAM_CHUNK)?;
        (0..reps)
            .map(|_| copy_once(STREAM_TOTAL).map(|d| STREAM_TOTAL as f64 / d.as_secs_f64() / 1e9))
            .collect::<std::io::Result<Vec<f64>>>()
    })
    .await??;
    rates.sort_by(f64::total_cmp);
    Ok((rates[rates.len() / 2], rates[rates.len() - 1]))
}

/// The structural floor of a call through the daemon: round trips of a
/// 64 B payload from a tokio task through a relay thread to an echo thread
/// and back (two Unix-socket hops chained, each thread with its own
/// current-thread tokio runtime, as the daemon and a plugin have), and the
/// same with one hop, the two alternating call by call so that both see the
/// same moments of a noisy machine. Their ratio is the best a two-hop call
/// can do against a one-hop one here.
pub async fn chained_floor(root: &Path, counts: Counts, cpus: CpuMode) -> Result<(Stats, Stats)> {
    let _spin = cpus.hold()?;
    let (one_path, mut threads) = echo_chain(root, "hop1", false)?;
    let (two_path, more) = echo_chain(root, "hop2", true)?;
    threads.extend(more);
    let (n, warm) = (counts.latency, counts.latency_warmup);
    let samples = tokio::spawn(async move {
        let mut one = tokio::net::UnixStream::connect(&one_path).await?;
        let mut two = tokio::net::UnixStream::connect(&two_path).await?;
        let out = [7u8; PAYLOAD];
        let mut back = [0u8; PAYLOAD];
        let mut samples = (Vec::with_capacity(n), Vec::with_capacity(n));
        for i in 0..warm + n {
            let t = Instant::now();
            one.write_all(&out).await?;
            one.read_exact(&mut back).await?;
            let took_one = t.elapsed();
            let t = Instant::now();
            two.write_all(&out).await?;
            two.read_exact(&mut back).await?;
            let took_two = t.elapsed();
            if i >= warm {
                samples.0.push(took_one);
                samples.1.push(took_two);
            }
        }
        Ok::<_, std::io::Error>(samples)
    })
    .await??;
    // The client's streams are closed: each relay closes its upstream in
    // turn, and every thread ends.
    for thread in threads.into_iter().rev() {
        thread.join().map_err(|_| "a raw hop thread panicked")??;
    }
    Ok((Stats::of(samples.0)?, Stats::of(samples.1)?))
}

/// Serves one connection on `listener` in a thread with its own tokio
/// runtime, with `answer`.
fn serve_one<F, Fut>(
    listener: std::os::unix::net::UnixListener,
    answer: F,
) -> std::thread::JoinHandle<std::io::Result<()>>
where
    F: FnOnce(tokio::net::UnixStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = std::io::Result<()>>,
{
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        rt.block_on(async move {
            listener.set_nonblocking(true)?;
            let listener = tokio::net::UnixListener::from_std(listener)?;
            let (stream, _) = listener.accept().await?;
            answer(stream).await
        })
    })
}

type Threads = Vec<std::thread::JoinHandle<std::io::Result<()>>>;

/// An echo thread, behind a relay thread if `relay`: the socket to call
/// and the threads (echo first).
fn echo_chain(root: &Path, name: &str, relay: bool) -> Result<(std::path::PathBuf, Threads)> {
    let echo_path = root.join(format!("{name}-echo.sock"));
    let echo = serve_one(
        std::os::unix::net::UnixListener::bind(&echo_path)?,
        |mut stream| async move {
            let mut buf = [0u8; PAYLOAD];
            loop {
                match stream.read_exact(&mut buf).await {
                    Ok(_) => stream.write_all(&buf).await?,
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
        },
    );
    if !relay {
        return Ok((echo_path, vec![echo]));
    }
    let relay_path = root.join(format!("{name}-relay.sock"));
    let upstream = echo_path.clone();
    let relay = serve_one(
        std::os::unix::net::UnixListener::bind(&relay_path)?,
        move |mut stream| async move {
            let mut next = tokio::net::UnixStream::connect(&upstream).await?;
            let mut buf = [0u8; PAYLOAD];
            loop {
                match stream.read_exact(&mut buf).await {
                    Ok(_) => {
                        next.write_all(&buf).await?;
                        next.read_exact(&mut buf).await?;
                        stream.write_all(&buf).await?;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
        },
    );
    Ok((relay_path, vec![echo, relay]))
}
