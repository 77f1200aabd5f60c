//! The daemon's Prometheus endpoint: `GET /metrics` over HTTP.

use std::time::Duration;

/// Serves `GET /metrics` on `listener` until `cancel` fires. Anything else
/// gets 404; each connection answers one request.
pub async fn serve(
    listener: tokio::net::TcpListener,
    supervisor: plugvisor::Supervisor,
    cancel: tokio_util::sync::CancellationToken,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let (mut stream, _) = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("metrics listener: {e}");
                    continue;
                }
            },
        };
        let supervisor = supervisor.clone();
        tokio::spawn(async move {
            let mut request = Vec::with_capacity(1024);
            let mut buf = [0u8; 1024];
            // Read up to the end of the headers (bounded: 8 KiB, 5 s).
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let line =
                String::from_utf8_lossy(request.split(|b| *b == b'\n').next().unwrap_or(&[]))
                    .into_owned();
            let (status, content_type, body) = if line.starts_with("GET /metrics ") {
                (
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    supervisor.metrics_text(),
                )
            } else {
                (
                    "404 Not Found",
                    "text/plain",
                    "only GET /metrics is served here\n".to_string(),
                )
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
