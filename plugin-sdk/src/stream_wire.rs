//! `HandleStream` served without tonic's message codec, so a chunk's data
//! is never copied in user space inside the plugin: each request chunk's
//! data is a slice of the HTTP/2 DATA frame it arrived in, and each reply
//! chunk goes out as a small prefix buffer plus the plugin's own `Bytes`.
//! tonic's codec would copy every chunk into its decode buffer coming in and
//! into its encode buffer going out.
//!
//! The bytes on the wire are ordinary gRPC (see `plugvisor_proto::framing`),
//! and the call behaves as the generated service would: an error before the
//! reply starts is a trailers-only response, an error during it ends the
//! reply with that status in the trailers, and a reply that ends well ends
//! with `grpc-status: 0`. Deadlines (`grpc-timeout`) are enforced by the
//! server around every route, this one included.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http_body::{Body as _, Frame};
use plugvisor_proto::Chunk;
use plugvisor_proto::framing::{self, FramingError, MessageReader};
use tokio_stream::Stream;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{Bytes, http};

use crate::service::{ChunkStream, MAX_MESSAGE_SIZE};

/// The method's path.
pub(crate) const PATH: &str = "/plugvisor.v1.Plugin/HandleStream";

/// The field number of `Chunk.data`.
const DATA_FIELD: u32 = 2;

/// The request's chunks, read from its body.
pub(crate) struct RequestChunks {
    body: Body,
    reader: MessageReader,
    done: bool,
}

impl RequestChunks {
    /// The chunks of `request`, or why they cannot be read at all.
    pub(crate) fn new(request: http::Request<Body>) -> Result<Self, Status> {
        if let Some(encoding) = request.headers().get("grpc-encoding")
            && encoding.as_bytes() != b"identity"
        {
            return Err(Status::unimplemented(format!(
                "Content is compressed with `{}` which is not supported",
                String::from_utf8_lossy(encoding.as_bytes())
            )));
        }
        Ok(RequestChunks {
            body: request.into_body(),
            reader: MessageReader::new(MAX_MESSAGE_SIZE),
            done: false,
        })
    }

    fn fail(&mut self, status: Status) -> Poll<Option<Result<Chunk, Status>>> {
        self.done = true;
        Poll::Ready(Some(Err(status)))
    }
}

fn framing_status(e: FramingError) -> Status {
    match e {
        FramingError::TooLarge { .. } => Status::out_of_range(format!("HandleStream request: {e}")),
        _ => Status::internal(format!("HandleStream request: {e}")),
    }
}

impl Stream for RequestChunks {
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
                            "HandleStream request: a chunk does not decode: {e}"
                        ))),
                    };
                }
                Ok(None) => {}
                Err(e) => return this.fail(framing_status(e)),
            }
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        this.reader.push(data);
                    }
                }
                // A reset upload (the supervisor's caller broke it off) is
                // an error, never the end of the input.
                Some(Err(status)) => return this.fail(status),
                None => {
                    this.done = true;
                    if let Err(e) = this.reader.finish() {
                        return this.fail(framing_status(e));
                    }
                    return Poll::Ready(None);
                }
            }
        }
    }
}

/// The reply to a call that started: `chunks`, then the status.
pub(crate) fn reply(chunks: ChunkStream) -> http::Response<Body> {
    let mut response = http::Response::new(Body::new(ReplyBody {
        chunks,
        pending: None,
        done: false,
    }));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

/// The reply body: each chunk as its prefixed head and its data, then
/// trailers with the status.
struct ReplyBody {
    chunks: ChunkStream,
    /// The data of the chunk whose head went last.
    pending: Option<Bytes>,
    done: bool,
}

fn trailers(status: &Status) -> Frame<Bytes> {
    let mut map = http::HeaderMap::new();
    if status.add_header(&mut map).is_err() {
        // Only a message or details that cannot be a header value fail:
        // the code alone still goes.
        let _ = Status::new(status.code(), "").add_header(&mut map);
    }
    Frame::trailers(map)
}

impl http_body::Body for ReplyBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(data) = self.pending.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if self.done {
            return Poll::Ready(None);
        }
        let next = ready!(self.chunks.as_mut().poll_next(cx));
        let status = match next {
            Some(Ok(mut chunk)) => {
                let data = std::mem::take(&mut chunk.data);
                match framing::encode_with_tail(&chunk, DATA_FIELD, data, MAX_MESSAGE_SIZE) {
                    Ok((head, data)) => {
                        if !data.is_empty() {
                            self.pending = Some(data);
                        }
                        return Poll::Ready(Some(Ok(Frame::data(head))));
                    }
                    Err(e) => Status::out_of_range(format!("HandleStream reply chunk: {e}")),
                }
            }
            Some(Err(status)) => status,
            None => Status::ok(""),
        };
        self.done = true;
        Poll::Ready(Some(Ok(trailers(&status))))
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.pending.is_none()
    }
}
