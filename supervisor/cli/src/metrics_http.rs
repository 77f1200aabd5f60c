//! The daemon's Prometheus endpoint: `GET /metrics` over HTTP/1.1, served
//! by hyper.
//!
//! Bounded so that a misbehaving client cannot starve scrapes or the daemon:
//! at most [`Limits::max_connections`] connections are served at once (more
//! wait in the listen backlog until one closes), each must send its request
//! headers within [`Limits::header_read_timeout`], and each answers one
//! request (no keep-alive, so an idle scraper does not hold a slot).

use hyper::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The text exposition format, for clients that do not ask for OpenMetrics.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// What prometheus-client writes, served to clients that accept it.
pub const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Bounds on what the endpoint spends on its clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Time from accepting a connection to having its request headers; a
    /// client slower than this is disconnected.
    pub header_read_timeout: Duration,
    /// How long a request in progress at shutdown may take to finish.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 64,
            header_read_timeout: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Serves `GET /metrics` on `listener` until `cancel` fires, then lets the
/// requests in progress finish (within the grace) and returns once every
/// connection is closed.
pub async fn serve(
    listener: tokio::net::TcpListener,
    supervisor: plugvisor::Supervisor,
    limits: Limits,
    cancel: CancellationToken,
) {
    serve_shared(Arc::new(listener), supervisor, limits, cancel).await
}

/// [`serve`] on a listener the caller may keep open after `cancel` (for
/// the next daemon image after `upgrade-self`: scrapers then wait in its
/// backlog rather than being refused).
pub async fn serve_shared(
    listener: Arc<tokio::net::TcpListener>,
    supervisor: plugvisor::Supervisor,
    limits: Limits,
    cancel: CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut connections = tokio::task::JoinSet::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(false);
    loop {
        // Take a slot before accepting: at the limit, clients wait in the
        // backlog rather than being accepted and left unanswered.
        let slot = tokio::select! {
            _ = cancel.cancelled() => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                // The semaphore is never closed.
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, say: let some close first.
                    tracing::warn!("metrics listener: cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Reap the connections that are done, so the set stays small.
        while connections.try_join_next().is_some() {}
        let supervisor = supervisor.clone();
        let cancel = cancel.clone();
        let connection = http.serve_connection(
            TokioIo::new(stream),
            hyper::service::service_fn(move |request| {
                let response = respond(&request, || supervisor.metrics_text());
                async move { Ok::<_, std::convert::Infallible>(response) }
            }),
        );
        connections.spawn(async move {
            let _slot = slot;
            tokio::pin!(connection);
            let ended = tokio::select! {
                ended = &mut connection => ended,
                _ = cancel.cancelled() => {
                    // Keep-alive is off, so a connection ends after its one
                    // answer: it is let finish, even when its request has
                    // not arrived yet (a graceful shutdown would close such
                    // an idle connection unanswered, a failed scrape at an
                    // upgrade-self). The header timeout bounds a client that
                    // says nothing; the grace bounds the rest.
                    match tokio::time::timeout(limits.shutdown_grace, &mut connection).await {
                        Ok(ended) => ended,
                        Err(_) => return,
                    }
                }
            };
            if let Err(e) = ended {
                tracing::debug!("metrics connection: {e}");
            }
        });
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// The answer to one request: the metrics for `GET /metrics`, 404 for any
/// other path, 405 for another method on `/metrics`.
pub fn respond<B>(request: &Request<B>, metrics: impl FnOnce() -> String) -> Response<String> {
    let reply = |status: StatusCode, content_type: &'static str, body: String| {
        let mut response = Response::new(body);
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        response
    };
    if request.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "only GET /metrics is served here\n".to_string(),
        );
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET /metrics is served here\n".to_string(),
        );
        response
            .headers_mut()
            .insert(hyper::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let openmetrics = request
        .headers()
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let content_type = if openmetrics {
        OPENMETRICS_TEXT
    } else {
        PROMETHEUS_TEXT
    };
    reply(StatusCode::OK, content_type, metrics())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str, accept: Option<&str>) -> Response<String> {
        let mut request = Request::get(path);
        if let Some(accept) = accept {
            request = request.header(ACCEPT, accept);
        }
        respond(&request.body(()).expect("a request"), || {
            "plugvisor_plugin_up 1\n# EOF\n".to_string()
        })
    }

    #[test]
    fn serves_metrics_in_the_format_the_client_accepts() {
        let plain = get("/metrics", None);
        assert_eq!(plain.status(), StatusCode::OK);
        assert_eq!(plain.headers()[CONTENT_TYPE], PROMETHEUS_TEXT);
        assert!(plain.body().contains("plugvisor_plugin_up 1"));
        let open = get(
            "/metrics",
            Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
        );
        assert_eq!(open.headers()[CONTENT_TYPE], OPENMETRICS_TEXT);
    }

    #[test]
    fn anything_but_get_metrics_is_refused() {
        assert_eq!(get("/", None).status(), StatusCode::NOT_FOUND);
        assert_eq!(get("/metrics/x", None).status(), StatusCode::NOT_FOUND);
        let post = respond(
            &Request::post("/metrics").body(()).expect("a request"),
            String::new,
        );
        assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
    }
}
