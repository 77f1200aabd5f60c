//! `plugvisor call NAME METHOD --stream`: the payload goes to the plugin's
//! `HandleStream` through the daemon's `Control.CallStream`, in chunks, and
//! the reply is written to stdout as it arrives. Neither side is ever held
//! whole, so `plugvisor call x transcode --stream < in > out` works on files
//! larger than memory.
//!
//! A call whose payload would not fit in one control message
//! ([`plugvisor::transport::MAX_MESSAGE`]) switches to a stream by itself
//! ([`Payload`]); `--stream` asks for one whatever the size.

use anyhow::{Context, bail};
use plugvisor_proto as pb;
use prost::bytes::Bytes;
use std::io::{IsTerminal, Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How much is read (and sent) at a time: large enough that the per-chunk
/// overhead vanishes, small enough that a handful in flight cost little.
pub const CHUNK: usize = 1 << 20;

/// Chunks read ahead of what the connection has taken. With [`CHUNK`] this
/// bounds the client's buffered input to a few MiB.
const READ_AHEAD: usize = 2;

/// Room left for the plugin and method names and the framing when deciding
/// whether a payload fits in one `CallRequest`.
const ENVELOPE: usize = 64 << 10;

/// Where the bytes of a streamed call come from.
pub type Source = Box<dyn Read + Send>;

/// A call's payload: whole, for a unary `Call`, or a source to stream.
pub enum Payload {
    Whole(Bytes),
    /// Streamed; `reason` says why when it was not asked for.
    Stream {
        source: Source,
        reason: Option<String>,
    },
}

/// The largest payload sent as one `Call`.
pub fn unary_limit() -> usize {
    plugvisor::transport::MAX_MESSAGE - ENVELOPE
}

impl Payload {
    /// `--data`: always small enough to be whole, unless `--stream`.
    pub fn data(data: &str, stream: bool) -> Payload {
        let bytes = Bytes::from(data.to_owned());
        if stream {
            Payload::Stream {
                source: Box::new(std::io::Cursor::new(bytes)),
                reason: None,
            }
        } else {
            Payload::Whole(bytes)
        }
    }

    /// `--data-file F`: streamed when asked, or when the file is larger than
    /// one message may be.
    pub fn file(path: &Path, stream: bool) -> anyhow::Result<Payload> {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let len = file
            .metadata()
            .with_context(|| format!("cannot stat {}", path.display()))?
            .len();
        if stream {
            return Ok(Payload::Stream {
                source: Box::new(file),
                reason: None,
            });
        }
        if len > unary_limit() as u64 {
            return Ok(Payload::Stream {
                source: Box::new(file),
                reason: Some(format!(
                    "{} is {len} bytes, over the {} MiB limit of one message",
                    path.display(),
                    plugvisor::transport::MAX_MESSAGE >> 20
                )),
            });
        }
        let mut buf = Vec::with_capacity(len as usize);
        std::io::BufReader::new(file)
            .read_to_end(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Ok(Payload::Whole(Bytes::from(buf)))
    }

    /// Standard input: streamed when asked; otherwise read up to the limit
    /// of one message, and streamed (what was read, then the rest) if there
    /// is more. That first part is held in memory, as a unary call would;
    /// `--stream` holds nothing.
    pub fn stdin(stream: bool) -> anyhow::Result<Payload> {
        Self::reader(Box::new(std::io::stdin()), stream, "standard input")
    }

    fn reader(source: Source, stream: bool, what: &str) -> anyhow::Result<Payload> {
        if stream {
            return Ok(Payload::Stream {
                source,
                reason: None,
            });
        }
        let limit = unary_limit();
        let mut head = Vec::new();
        let mut source = source;
        (&mut source)
            .take(limit as u64 + 1)
            .read_to_end(&mut head)
            .with_context(|| format!("cannot read {what}"))?;
        if head.len() <= limit {
            return Ok(Payload::Whole(Bytes::from(head)));
        }
        Ok(Payload::Stream {
            source: Box::new(std::io::Cursor::new(head).chain(source)),
            reason: Some(format!(
                "{what} holds more than the {} MiB limit of one message",
                plugvisor::transport::MAX_MESSAGE >> 20
            )),
        })
    }
}

/// Reads `source` on a thread of its own, [`CHUNK`] bytes at a time, into a
/// channel of [`READ_AHEAD`] chunks: the connection takes chunks as HTTP/2
/// flow control lets it, and the reader waits when it falls behind. Ends
/// after EOF (`Ok(empty)` is never sent) or the first read error, or when
/// the receiver is dropped. A reader blocked in `read(2)` on a terminal when
/// the call ends is left to the process's exit.
fn spawn_reader(mut source: Source) -> mpsc::Receiver<std::io::Result<Bytes>> {
    let (tx, rx) = mpsc::channel(READ_AHEAD);
    std::thread::Builder::new()
        .name("call-stream-reader".into())
        .spawn(move || {
            loop {
                let mut buf = vec![0u8; CHUNK];
                let mut filled = 0;
                // Fill the chunk: pipes hand out 64 KiB at a time.
                let result = loop {
                    match source.read(&mut buf[filled..]) {
                        Ok(0) => break Ok(true),
                        Ok(n) => {
                            filled += n;
                            if filled == buf.len() {
                                break Ok(false);
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => break Err(e),
                    }
                };
                buf.truncate(filled);
                match result {
                    Ok(eof) => {
                        if filled > 0 && tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                            return;
                        }
                        if eof {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                }
            }
        })
        .map(|_| ())
        .unwrap_or_else(|e| {
            // The receiver then sees the channel closed with no chunk and
            // no end mark, and the call fails as an upload cut short.
            tracing::error!("cannot start the stdin reader thread: {e}");
        });
    rx
}

/// The request stream: the first chunk names the plugin and method, the
/// last one carries `end_of_input`. A read error ends the stream without
/// that mark, so the daemon cancels the call instead of letting the plugin
/// see a shorter input that looks whole; the error itself goes to `failed`.
fn request_stream(
    plugin: String,
    method: String,
    mut chunks: mpsc::Receiver<std::io::Result<Bytes>>,
    failed: tokio::sync::oneshot::Sender<std::io::Error>,
) -> impl tokio_stream::Stream<Item = pb::CallChunk> + Send + 'static {
    async_stream::stream! {
        let mut first = true;
        // One chunk of look-ahead, so the last one with data carries the
        // end mark and no empty chunk follows it.
        let mut held: Option<Bytes> = None;
        loop {
            match chunks.recv().await {
                Some(Ok(data)) => {
                    if let Some(data) = held.replace(data) {
                        yield chunk(&mut first, &plugin, &method, data, false);
                    }
                }
                Some(Err(e)) => {
                    let _ = failed.send(e);
                    return;
                }
                None => {
                    yield chunk(&mut first, &plugin, &method, held.take().unwrap_or_default(), true);
                    return;
                }
            }
        }
    }
}

fn chunk(first: &mut bool, plugin: &str, method: &str, data: Bytes, last: bool) -> pb::CallChunk {
    let (plugin, method) = if std::mem::take(first) {
        (plugin.to_owned(), method.to_owned())
    } else {
        (String::new(), String::new())
    };
    pb::CallChunk {
        plugin,
        method,
        data,
        end_of_input: last,
        ..Default::default()
    }
}

/// Streams `source` to `plugin.method` and writes the reply to stdout as it
/// arrives. Returns the exit code; errors name the call and what failed.
pub async fn call(
    control: &Path,
    plugin: &str,
    method: &str,
    source: Source,
    timeout: Option<Duration>,
) -> anyhow::Result<i32> {
    let run = call_to(control, plugin, method, source, std::io::stdout());
    match timeout {
        None => run.await,
        Some(t) => match tokio::time::timeout(t, run).await {
            Ok(result) => result,
            Err(_) => bail!(
                "{plugin}.{method}: the streamed call did not finish within {}; it was cancelled",
                plugvisor::units::format_duration(t)
            ),
        },
    }
}

async fn call_to(
    control: &Path,
    plugin: &str,
    method: &str,
    source: Source,
    mut out: impl Write,
) -> anyhow::Result<i32> {
    let mut client = crate::control::connect(control).await?;
    let (failed_tx, mut failed_rx) = tokio::sync::oneshot::channel();
    let progress = Progress::start(std::io::stderr().is_terminal());
    let counted = progress.counts.clone();
    let input = tokio_stream::StreamExt::map(
        request_stream(
            plugin.to_owned(),
            method.to_owned(),
            spawn_reader(source),
            failed_tx,
        ),
        move |chunk| {
            counted
                .sent
                .fetch_add(chunk.data.len() as u64, Ordering::Relaxed);
            chunk
        },
    );
    let read_error = |failed: &mut tokio::sync::oneshot::Receiver<std::io::Error>| {
        failed.try_recv().ok().map(|e| {
            anyhow::anyhow!("{plugin}.{method}: cannot read the input: {e}; the call was cancelled")
        })
    };
    let mut replies = match client.call_stream(input).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            if let Some(e) = read_error(&mut failed_rx) {
                return Err(e);
            }
            bail!(
                "{plugin}.{method}: {:?}: {}",
                status.code(),
                status.message()
            )
        }
    };
    let terminal = std::io::stdout().is_terminal();
    let mut last_byte = b'\n';
    loop {
        match replies.message().await {
            Ok(Some(chunk)) => {
                if let Some(&b) = chunk.data.last() {
                    last_byte = b;
                }
                progress
                    .counts
                    .received
                    .fetch_add(chunk.data.len() as u64, Ordering::Relaxed);
                // A slow reader of stdout blocks this write, which stops
                // reading replies, which (flow control) stops the plugin.
                tokio::task::block_in_place(|| out.write_all(&chunk.data))
                    .context("cannot write the reply to standard output")?;
            }
            Ok(None) => break,
            Err(status) => {
                let _ = out.flush();
                if let Some(e) = read_error(&mut failed_rx) {
                    return Err(e);
                }
                bail!(
                    "{plugin}.{method}: {:?}: {}",
                    status.code(),
                    status.message()
                )
            }
        }
    }
    progress.finish();
    if terminal && last_byte != b'\n' {
        writeln!(out)?;
    }
    out.flush()
        .context("cannot write the reply to standard output")?;
    Ok(0)
}

/// Bytes sent and received so far.
#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    received: AtomicU64,
}

/// Live progress of a streamed call on stderr, when stderr is a terminal:
/// bytes each way and the rate, redrawn in place a few times a second, and
/// a last line when the call ends. Nothing at all when stderr is piped.
struct Progress {
    counts: Arc<Counts>,
    started: Instant,
    ticker: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    fn start(terminal: bool) -> Progress {
        let counts = Arc::new(Counts::default());
        let started = Instant::now();
        let ticker = terminal.then(|| {
            let counts = counts.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(250));
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let line = progress_line(&counts, started.elapsed());
                    let mut err = std::io::stderr().lock();
                    let _ = write!(err, "\r\x1b[2K{line}");
                    let _ = err.flush();
                }
            })
        });
        Progress {
            counts,
            started,
            ticker,
        }
    }

    /// Stops redrawing and prints the final figures (terminal only).
    fn finish(self) {
        if let Some(ticker) = self.ticker {
            ticker.abort();
            let line = progress_line(&self.counts, self.started.elapsed());
            eprintln!("\r\x1b[2K{line} done");
        }
    }
}

fn progress_line(counts: &Counts, elapsed: Duration) -> String {
    let sent = counts.sent.load(Ordering::Relaxed);
    let received = counts.received.load(Ordering::Relaxed);
    let secs = elapsed.as_secs_f64().max(1e-3);
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    format!(
        "sent {:.1} MiB, received {:.1} MiB, {:.1} MiB/s, {:.1}s",
        mib(sent),
        mib(received),
        mib(sent.max(received)) / secs,
        elapsed.as_secs_f64()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    fn collect(source: Source) -> Vec<pb::CallChunk> {
        collect_with_error(source).0
    }

    fn collect_with_error(source: Source) -> (Vec<pb::CallChunk>, Option<std::io::Error>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let chunks = request_stream("p".into(), "m".into(), spawn_reader(source), tx)
                .collect()
                .await;
            (chunks, rx.await.ok())
        })
    }

    #[test]
    fn names_the_call_first_and_marks_the_last_chunk() {
        let data = vec![7u8; CHUNK * 2 + 5];
        let chunks = collect(Box::new(std::io::Cursor::new(data.clone())));
        assert_eq!(chunks.len(), 3);
        assert_eq!(
            (chunks[0].plugin.as_str(), chunks[0].method.as_str()),
            ("p", "m")
        );
        assert!(chunks[1].plugin.is_empty() && chunks[1].method.is_empty());
        assert_eq!(
            chunks.iter().map(|c| c.end_of_input).collect::<Vec<_>>(),
            [false, false, true]
        );
        let joined: Vec<u8> = chunks.iter().flat_map(|c| c.data.to_vec()).collect();
        assert_eq!(joined, data);
    }

    #[test]
    fn an_empty_input_is_one_named_chunk_marked_last() {
        let chunks = collect(Box::new(std::io::empty()));
        assert_eq!(chunks.len(), 1);
        assert!(chunks[0].end_of_input && chunks[0].data.is_empty());
        assert_eq!(chunks[0].plugin, "p");
    }

    #[test]
    fn an_exact_multiple_of_the_chunk_size_sends_no_empty_tail() {
        let chunks = collect(Box::new(std::io::Cursor::new(vec![1u8; CHUNK * 2])));
        assert_eq!(chunks.len(), 2);
        assert!(chunks[1].end_of_input && chunks[1].data.len() == CHUNK);
    }

    struct Failing(usize);
    impl Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0 == 0 {
                return Err(std::io::Error::other("disk on fire"));
            }
            let n = buf.len().min(self.0);
            self.0 -= n;
            Ok(n)
        }
    }

    #[test]
    fn a_read_error_ends_the_stream_without_the_end_mark() {
        let (chunks, error) = collect_with_error(Box::new(Failing(CHUNK * 2 + 3)));
        assert!(!chunks.is_empty(), "what was read before the error is sent");
        assert!(chunks.iter().all(|c| !c.end_of_input));
        assert_eq!(
            error.expect("the error is reported").to_string(),
            "disk on fire"
        );
    }

    #[test]
    fn small_input_stays_whole_and_large_input_streams_from_where_it_was() {
        match Payload::reader(Box::new(std::io::Cursor::new(b"hi".to_vec())), false, "x") {
            Ok(Payload::Whole(b)) => assert_eq!(&b[..], b"hi"),
            _ => panic!("small input is whole"),
        }
        let big = unary_limit() + 10;
        match Payload::reader(Box::new(std::io::repeat(3).take(big as u64)), false, "x") {
            Ok(Payload::Stream {
                mut source,
                reason: Some(reason),
            }) => {
                assert!(reason.contains("64 MiB"), "{reason}");
                let n = std::io::copy(&mut source, &mut std::io::sink()).expect("copy");
                assert_eq!(n as usize, big, "nothing read ahead is lost");
            }
            _ => panic!("large input streams"),
        }
    }
}
