//! `HandleStream` on the wire without tonic's message codec, so a chunk's
//! data is never copied in user space on the supervisor's side: each
//! request chunk goes out as a small prefix buffer plus the caller's own
//! `Bytes` (one vectored write), and each reply chunk's data is a slice of
//! the HTTP/2 DATA frame it arrived in. tonic's codec would copy every chunk
//! into its encode buffer going out and into its decode buffer coming in.
//!
//! The bytes on the wire are ordinary gRPC (see `plugvisor_proto::framing`),
//! and the call's semantics are tonic's: the same request headers, a
//! trailers-only error or an error in the trailers both end the reply with
//! that status, and transport errors keep their cause as the status's
//! source (read as a lost instance by `call_error`).

use crate::transport::{BodyAbort, Connection, MAX_MESSAGE};
use hyper::body::{Body as _, Frame, Incoming};
use plugvisor_proto::Chunk;
use plugvisor_proto::framing::{self, MessageReader};
use prost::bytes::Bytes;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio_stream::Stream;
use tonic::Status;
use tonic::codegen::http;

/// The method's path.
const PATH: &str = "/plugvisor.v1.Plugin/HandleStream";

/// The field number of `Chunk.data`.
const DATA_FIELD: u32 = 2;

/// Starts a `HandleStream` call on `connection`, sending `upload` (its
/// first chunk names the method). Resolves once the plugin's response
/// headers arrived: to the reply chunks, or to the plugin's status if it
/// refused the call at once. `abort` breaks the upload off (see
/// [`BodyAbort`]).
pub(crate) async fn call<S>(
    mut connection: Connection,
    upload: S,
    abort: BodyAbort,
) -> Result<Replies, Status>
where
    S: Stream<Item = Chunk> + Send + 'static,
{
    let body = tonic::body::Body::new(UploadBody {
        chunks: Box::pin(upload),
        pending: None,
    });
    let mut parts = crate::transport::origin().into_parts();
    parts.path_and_query = Some(http::uri::PathAndQuery::from_static(PATH));
    let uri = http::Uri::from_parts(parts)
        .map_err(|e| Status::internal(format!("the HandleStream URI: {e}")))?;
    let mut request = http::Request::builder()
        .method(http::Method::POST)
        .version(http::Version::HTTP_2)
        .uri(uri)
        .header(http::header::TE, "trailers")
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .body(body)
        .map_err(|e| Status::internal(format!("the HandleStream request: {e}")))?;
    request.extensions_mut().insert(abort);
    std::future::poll_fn(|cx| tower::Service::poll_ready(&mut connection, cx))
        .await
        .map_err(transport_error)?;
    let response = tower::Service::call(&mut connection, request)
        .await
        .map_err(transport_error)?;
    let http_status = response.status();
    // A trailers-only reply: the call failed (or ended) before any chunk.
    let ended = match Status::from_header_map(response.headers()) {
        Some(status) if status.code() != tonic::Code::Ok => return Err(status),
        Some(_) => true,
        None => false,
    };
    if let Some(encoding) = response.headers().get("grpc-encoding")
        && encoding.as_bytes() != b"identity"
    {
        return Err(Status::unimplemented(format!(
            "the plugin compressed its reply with {encoding:?}, which was not offered"
        )));
    }
    Ok(Replies {
        body: response.into_body(),
        reader: MessageReader::new(MAX_MESSAGE),
        http_status,
        done: ended,
    })
}

/// Like tonic: a failure to send keeps the transport error as the source.
fn transport_error(e: hyper::Error) -> Status {
    Status::from_error(Box::new(e))
}

/// The request body: each chunk as its prefixed head and its data.
struct UploadBody {
    chunks: Pin<Box<dyn Stream<Item = Chunk> + Send>>,
    /// The data of the chunk whose head went last.
    pending: Option<Bytes>,
}

impl hyper::body::Body for UploadBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(data) = self.pending.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        let Some(mut chunk) = ready!(self.chunks.as_mut().poll_next(cx)) else {
            return Poll::Ready(None);
        };
        let data = std::mem::take(&mut chunk.data);
        match framing::encode_with_tail(&chunk, DATA_FIELD, data, MAX_MESSAGE) {
            Ok((head, data)) => {
                if !data.is_empty() {
                    self.pending = Some(data);
                }
                Poll::Ready(Some(Ok(Frame::data(head))))
            }
            Err(e) => Poll::Ready(Some(Err(Status::out_of_range(format!(
                "HandleStream chunk: {e}"
            ))))),
        }
    }
}

/// The plugin's reply chunks, then its status.
pub(crate) struct Replies {
    body: Incoming,
    reader: MessageReader,
    http_status: http::StatusCode,
    done: bool,
}

impl Replies {
    /// The status a reply that ended without `grpc-status` trailers stands
    /// for, as tonic reads it.
    fn without_trailers(&self) -> Option<Status> {
        use tonic::Code;
        let code = match self.http_status {
            http::StatusCode::OK => return None,
            http::StatusCode::BAD_REQUEST => Code::Internal,
            http::StatusCode::UNAUTHORIZED => Code::Unauthenticated,
            http::StatusCode::FORBIDDEN => Code::PermissionDenied,
            http::StatusCode::NOT_FOUND => Code::Unimplemented,
            http::StatusCode::TOO_MANY_REQUESTS
            | http::StatusCode::BAD_GATEWAY
            | http::StatusCode::SERVICE_UNAVAILABLE
            | http::StatusCode::GATEWAY_TIMEOUT => Code::Unavailable,
            _ => Code::Unknown,
        };
        Some(Status::new(
            code,
            format!(
                "grpc-status header missing, mapped from HTTP status code {}",
                self.http_status.as_u16()
            ),
        ))
    }

    fn fail(&mut self, status: Status) -> Poll<Option<Result<Chunk, Status>>> {
        self.done = true;
        Poll::Ready(Some(Err(status)))
    }
}

impl Stream for Replies {
    type Item = Result<Chunk, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match this.reader.next_message() {
                Ok(Some(message)) => {
                    return match framing::decode::<Chunk>(message) {
                        Ok(chunk) => Poll::Ready(Some(Ok(chunk))),
                        Err(e) => this.fail(Status::internal(format!(
                            "the plugin sent a HandleStream chunk that does not decode: {e}"
                        ))),
                    };
                }
                Ok(None) => {}
                Err(e) => {
                    let status = match e {
                        framing::FramingError::TooLarge { .. } => {
                            Status::out_of_range(format!("the plugin's HandleStream reply: {e}"))
                        }
                        _ => Status::internal(format!("the plugin's HandleStream reply: {e}")),
                    };
                    return this.fail(status);
                }
            }
            let frame = match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                Some(Err(e)) => return this.fail(transport_error(e)),
                None => {
                    this.done = true;
                    if let Err(e) = this.reader.finish() {
                        return this.fail(Status::internal(format!(
                            "the plugin's HandleStream reply: {e}"
                        )));
                    }
                    return match this.without_trailers() {
                        Some(status) => this.fail(status),
                        None => Poll::Ready(None),
                    };
                }
            };
            match frame.into_data() {
                Ok(data) => this.reader.push(data),
                Err(frame) => {
                    let Ok(trailers) = frame.into_trailers() else {
                        continue;
                    };
                    if let Err(e) = this.reader.finish() {
                        return this.fail(Status::internal(format!(
                            "the plugin's HandleStream reply: {e}"
                        )));
                    }
                    this.done = true;
                    return match Status::from_header_map(&trailers) {
                        Some(status) if status.code() == tonic::Code::Ok => Poll::Ready(None),
                        Some(status) => this.fail(status),
                        None => match this.without_trailers() {
                            Some(status) => this.fail(status),
                            None => Poll::Ready(None),
                        },
                    };
                }
            }
        }
    }
}
