//! gRPC message framing (the 5-byte length prefix of each message) over
//! `Bytes`, without copying payloads. Used by both ends of `HandleStream`,
//! where megabyte chunks make every copy count: tonic's own codec copies
//! each message once into its encode buffer and once more into its decode
//! buffer, on both sides of the socket.
//!
//! On the wire this is plain gRPC: length-prefixed, uncompressed protobuf
//! messages, so peers that use any other gRPC stack read and write the same
//! bytes. Only the way a message is held in memory differs:
//!
//! - [`encode_with_tail`] encodes a message whose last field is a large
//!   `bytes` value as two buffers: the prefix and every other field, then the
//!   value itself, which is not copied.
//! - [`MessageReader`] cuts received HTTP/2 DATA frames into messages and
//!   hands each out as [`Segments`], the pieces of the frames it spans; a
//!   `bytes` field decoded from it (prost's `Bytes` fields) is a slice of a
//!   received frame whenever it lies within one.
//!
//! This module does no I/O.

use prost::bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
use std::collections::VecDeque;
use std::fmt;

/// Length of the prefix of every gRPC message: a compression flag and a
/// 32-bit big-endian length.
pub const PREFIX: usize = 5;

/// Values up to this size are copied into the prefix buffer: one small
/// buffer is cheaper to send than two.
const INLINE_TAIL: usize = 4 * 1024;

/// Why a stream of gRPC messages could not be read or written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FramingError {
    /// A message is compressed, which was never negotiated.
    Compressed {
        /// The prefix's compression flag.
        flag: u8,
    },
    /// A message is larger than the limit.
    TooLarge {
        /// The message's length.
        len: usize,
        /// The limit it exceeds.
        limit: usize,
    },
    /// The stream ended in the middle of a message.
    Truncated {
        /// Bytes of the unfinished message (prefix included) received.
        buffered: usize,
    },
}

impl fmt::Display for FramingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FramingError::Compressed { flag } => write!(
                f,
                "protocol error: a message has compression flag {flag}, \
                 but no compression was negotiated (no grpc-encoding)"
            ),
            FramingError::TooLarge { len, limit } => write!(
                f,
                "a message of {len} bytes is larger than the limit of {limit} bytes"
            ),
            FramingError::Truncated { buffered } => write!(
                f,
                "the stream ended in the middle of a message ({buffered} bytes of it received)"
            ),
        }
    }
}

impl std::error::Error for FramingError {}

/// Encodes `head` followed by `tail` as field `field` (a `bytes` field that
/// `head` leaves empty), prefixed for gRPC, as two buffers: the second is
/// `tail` itself, not a copy. A small `tail` is copied into the first
/// buffer and the second is empty. Protobuf readers accept fields in any
/// order, so the result decodes as the message with `tail` in `field`.
pub fn encode_with_tail<M: prost::Message>(
    head: &M,
    field: u32,
    tail: Bytes,
    limit: usize,
) -> Result<(Bytes, Bytes), FramingError> {
    let tail_head = if tail.is_empty() {
        0
    } else {
        key_len(field) + encoded_len_varint(tail.len() as u64)
    };
    let len = head.encoded_len() + tail_head + tail.len();
    if len > limit || u32::try_from(len).is_err() {
        return Err(FramingError::TooLarge { len, limit });
    }
    let inline = tail.len() <= INLINE_TAIL;
    let mut buf = BytesMut::with_capacity(PREFIX + len - if inline { 0 } else { tail.len() });
    buf.put_u8(0);
    // Checked above: `len` fits in 32 bits.
    buf.put_u32(len as u32);
    // Cannot fail: `buf` grows as needed.
    let _ = head.encode(&mut buf);
    if !tail.is_empty() {
        encode_key(field, WireType::LengthDelimited, &mut buf);
        encode_varint(tail.len() as u64, &mut buf);
    }
    if inline {
        buf.extend_from_slice(&tail);
        return Ok((buf.freeze(), Bytes::new()));
    }
    Ok((buf.freeze(), tail))
}

/// Decodes one message read by [`MessageReader`]; its `Bytes` fields are
/// slices of the received frames wherever they lie within one.
pub fn decode<M: prost::Message + Default>(message: Segments) -> Result<M, prost::DecodeError> {
    M::decode(message)
}

/// Cuts a stream of received buffers (HTTP/2 DATA frames) into gRPC
/// messages. Holds at most one unfinished message: the caller pushes a
/// frame only when [`Self::next_message`] has nothing, so what it buffers is
/// bounded by the message limit plus one frame.
#[derive(Debug)]
pub struct MessageReader {
    frames: VecDeque<Bytes>,
    buffered: usize,
    limit: usize,
    /// The length of the message whose prefix has been read.
    want: Option<usize>,
}

impl MessageReader {
    /// A reader refusing messages over `limit` bytes.
    pub fn new(limit: usize) -> Self {
        MessageReader {
            frames: VecDeque::new(),
            buffered: 0,
            limit,
            want: None,
        }
    }

    /// Adds received bytes.
    pub fn push(&mut self, data: Bytes) {
        if !data.is_empty() {
            self.buffered += data.len();
            self.frames.push_back(data);
        }
    }

    /// Bytes received and not yet handed out.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// The next whole message (without its prefix), if it has arrived.
    pub fn next_message(&mut self) -> Result<Option<Segments>, FramingError> {
        let len = match self.want {
            Some(len) => len,
            None => {
                if self.buffered < PREFIX {
                    return Ok(None);
                }
                let mut prefix = [0u8; PREFIX];
                self.take(PREFIX).copy_to_slice(&mut prefix);
                if prefix[0] != 0 {
                    return Err(FramingError::Compressed { flag: prefix[0] });
                }
                let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
                if len > self.limit {
                    return Err(FramingError::TooLarge {
                        len,
                        limit: self.limit,
                    });
                }
                self.want = Some(len);
                len
            }
        };
        if self.buffered < len {
            return Ok(None);
        }
        self.want = None;
        Ok(Some(self.take(len)))
    }

    /// Checks that the stream did not end in the middle of a message.
    pub fn finish(&self) -> Result<(), FramingError> {
        if self.buffered == 0 && self.want.is_none() {
            Ok(())
        } else {
            Err(FramingError::Truncated {
                buffered: self.buffered + self.want.map_or(0, |_| PREFIX),
            })
        }
    }

    /// The first `len` buffered bytes, as slices of the frames.
    fn take(&mut self, len: usize) -> Segments {
        let mut parts = VecDeque::new();
        let mut need = len;
        while need > 0 {
            let Some(front) = self.frames.front_mut() else {
                break;
            };
            if front.len() <= need {
                need -= front.len();
                if let Some(frame) = self.frames.pop_front() {
                    parts.push_back(frame);
                }
            } else {
                parts.push_back(front.split_to(need));
                need = 0;
            }
        }
        let len = len - need;
        self.buffered -= len;
        Segments {
            parts,
            remaining: len,
        }
    }
}

/// One message's bytes, as the pieces of the frames it spans. A `Buf`
/// whose `copy_to_bytes` slices instead of copying when the bytes asked
/// for lie within one piece, so prost's `Bytes` fields decode without a copy.
#[derive(Debug, Default)]
pub struct Segments {
    parts: VecDeque<Bytes>,
    remaining: usize,
}

impl Buf for Segments {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        self.parts.front().map_or(&[], |b| b.as_ref())
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.remaining, "advance past the end of a message");
        self.remaining -= cnt;
        while cnt > 0 {
            let Some(front) = self.parts.front_mut() else {
                return;
            };
            if front.len() <= cnt {
                cnt -= front.len();
                self.parts.pop_front();
            } else {
                front.advance(cnt);
                cnt = 0;
            }
        }
    }

    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        assert!(
            len <= self.remaining,
            "copy_to_bytes past the end of a message"
        );
        if let Some(front) = self.parts.front_mut()
            && front.len() >= len
        {
            let bytes = front.split_to(len);
            if front.is_empty() {
                self.parts.pop_front();
            }
            self.remaining -= len;
            return bytes;
        }
        let mut out = BytesMut::with_capacity(len);
        out.put(self.take(len));
        out.freeze()
    }
}

impl Segments {
    fn take(&mut self, len: usize) -> Take<'_> {
        Take {
            inner: self,
            left: len,
        }
    }
}

/// The first `left` bytes of a [`Segments`], to copy them out.
struct Take<'a> {
    inner: &'a mut Segments,
    left: usize,
}

impl Buf for Take<'_> {
    fn remaining(&self) -> usize {
        self.left
    }

    fn chunk(&self) -> &[u8] {
        let chunk = self.inner.chunk();
        &chunk[..chunk.len().min(self.left)]
    }

    fn advance(&mut self, cnt: usize) {
        assert!(cnt <= self.left, "advance past the bytes taken");
        self.left -= cnt;
        self.inner.advance(cnt);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Chunk;
    use prost::Message;

    fn chunk(data: &[u8]) -> Chunk {
        Chunk {
            method: "m".into(),
            data: Bytes::copy_from_slice(data),
            metadata: [("k".to_string(), "v".to_string())].into(),
            state_changed: true,
        }
    }

    /// Encodes `msgs` the way tonic does: prefix and whole message.
    fn standard(msgs: &[Chunk]) -> Vec<u8> {
        let mut out = Vec::new();
        for m in msgs {
            let body = m.encode_to_vec();
            out.push(0);
            out.extend_from_slice(&(body.len() as u32).to_be_bytes());
            out.extend_from_slice(&body);
        }
        out
    }

    fn read_all(reader: &mut MessageReader) -> Vec<Chunk> {
        let mut out = Vec::new();
        while let Some(m) = reader.next_message().unwrap() {
            out.push(Chunk::decode(m).unwrap());
        }
        out
    }

    #[test]
    fn reads_standard_messages_cut_at_every_boundary() {
        let msgs = [chunk(b"hello"), chunk(&[]), chunk(&[7; 300])];
        let wire = standard(&msgs);
        for step in [1, 2, 3, 5, 7, 64, wire.len()] {
            let mut reader = MessageReader::new(1 << 20);
            let mut got = Vec::new();
            for piece in wire.chunks(step) {
                reader.push(Bytes::copy_from_slice(piece));
                got.extend(read_all(&mut reader));
            }
            reader.finish().unwrap();
            assert_eq!(got, msgs, "frames of {step} bytes");
        }
    }

    #[test]
    fn encodes_what_a_standard_reader_decodes() {
        for size in [0, 1, INLINE_TAIL, INLINE_TAIL + 1, 1 << 20] {
            let data = Bytes::from((0..size).map(|i| i as u8).collect::<Vec<u8>>());
            let head = Chunk {
                data: Bytes::new(),
                ..chunk(&[])
            };
            let (prefix, tail) = encode_with_tail(&head, 2, data.clone(), 64 << 20).unwrap();
            let mut wire = prefix.to_vec();
            wire.extend_from_slice(&tail);
            assert_eq!(wire[0], 0);
            let len = u32::from_be_bytes(wire[1..5].try_into().unwrap()) as usize;
            assert_eq!(len, wire.len() - PREFIX, "size {size}");
            let decoded = Chunk::decode(&wire[PREFIX..]).unwrap();
            assert_eq!(decoded.data, data, "size {size}");
            assert_eq!(decoded.method, "m");
            assert!(decoded.state_changed);
            // Large values are not copied.
            if size > INLINE_TAIL {
                assert_eq!(tail.as_ptr(), data.as_ptr());
            } else {
                assert!(tail.is_empty());
            }
        }
    }

    #[test]
    fn decodes_a_value_within_one_frame_without_copying() {
        let data = Bytes::from(vec![9u8; 100_000]);
        let (prefix, tail) = encode_with_tail(&Chunk::default(), 2, data.clone(), 1 << 20).unwrap();
        let mut reader = MessageReader::new(1 << 20);
        reader.push(prefix);
        assert!(reader.next_message().unwrap().is_none());
        reader.push(tail);
        let got = Chunk::decode(reader.next_message().unwrap().unwrap()).unwrap();
        assert_eq!(got.data.as_ptr(), data.as_ptr());
        assert_eq!(got.data, data);
        reader.finish().unwrap();
    }

    #[test]
    fn refuses_oversized_compressed_and_truncated_messages() {
        let mut reader = MessageReader::new(10);
        reader.push(Bytes::from_static(&[0, 0, 0, 0, 11]));
        assert_eq!(
            reader.next_message().unwrap_err(),
            FramingError::TooLarge { len: 11, limit: 10 }
        );
        let mut reader = MessageReader::new(10);
        reader.push(Bytes::from_static(&[1, 0, 0, 0, 1, 0]));
        assert_eq!(
            reader.next_message().unwrap_err(),
            FramingError::Compressed { flag: 1 }
        );
        let mut reader = MessageReader::new(10);
        reader.push(Bytes::from_static(&[0, 0, 0, 0, 4, 1, 2]));
        assert!(reader.next_message().unwrap().is_none());
        assert_eq!(
            reader.finish().unwrap_err(),
            FramingError::Truncated { buffered: 7 }
        );
        let mut reader = MessageReader::new(10);
        reader.push(Bytes::from_static(&[0, 0]));
        assert!(reader.next_message().unwrap().is_none());
        assert_eq!(
            reader.finish().unwrap_err(),
            FramingError::Truncated { buffered: 2 }
        );
        assert_eq!(
            encode_with_tail(&Chunk::default(), 2, Bytes::from(vec![0; 11]), 10).unwrap_err(),
            FramingError::TooLarge { len: 13, limit: 10 }
        );
    }
}
