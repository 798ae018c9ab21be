//! The protobuf codec both stubs use: tonic-prost's, with buffers sized for cache traffic.
//!
//! tonic allocates an 8 KiB buffer for every message it encodes or decodes; cache messages are
//! mostly a few hundred bytes. Starting at 512 bytes is 16 KiB less per RPC in flight and keeps
//! glibc (which clients may use) out of its large-bin path; bigger messages still work, because
//! the encoder reserves a message's exact length before writing it and the decoder reserves the
//! length announced in the frame header. On its own this did not move the server's CPU per Get
//! beyond noise (BENCHMARKS.md); mimalloc in the server did.

use std::marker::PhantomData;

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use tonic::{
    Status,
    codec::{BufferSettings, EncodeBuf, Encoder},
};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// The buffer tonic allocates per message before it knows the message's size.
const BUFFER_BYTES: usize = 512;
/// How much a streaming response batches before yielding (tonic's default; no RPC streams).
const YIELD_THRESHOLD: usize = 32 * 1024;

fn buffer_settings() -> BufferSettings {
    BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD)
}

/// The codec of the generated `cache_money.v1` stubs: prost messages with small first buffers.
#[derive(Debug, Clone, Copy)]
pub struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec(PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = SizedEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        SizedEncoder(ProstEncoder::new(buffer_settings()))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(buffer_settings())
    }
}

/// Encodes a prost message after reserving its exact encoded length, so a large value costs
/// one allocation rather than a doubling series.
#[derive(Debug)]
pub struct SizedEncoder<T>(ProstEncoder<T>);

impl<T: Message> Encoder for SizedEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        self.0.encode(item, buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// The path of Get, the one RPC both sides frame and read themselves (the server's
/// `direct_get`, the client's `Transport::get`).
pub(crate) const GET_PATH: &str = "/cache_money.v1.CacheMoney/Get";

/// A gRPC message's frame header: the compressed flag and the length (big-endian u32).
pub(crate) const FRAME_HEADER: usize = 5;

/// The compressed flag and the length that the frame at the start of `bytes` announces;
/// `None` while its header is not all there.
pub(crate) fn frame_header(bytes: &[u8]) -> Option<(u8, usize)> {
    let [flag, a, b, c, d, ..] = *bytes else {
        return None;
    };
    Some((flag, u32::from_be_bytes([a, b, c, d]) as usize))
}

/// `message` in one uncompressed gRPC frame, or tonic's refusal of a message over 4 GB.
pub(crate) fn frame(message: &impl Message) -> Result<Bytes, Status> {
    let len = message.encoded_len();
    let announced = u32::try_from(len).map_err(|_| {
        Status::resource_exhausted(format!(
            "Cannot return body with more than 4GB of data but got {len} bytes"
        ))
    })?;
    let mut frame = BytesMut::with_capacity(FRAME_HEADER + len);
    frame.put_u8(0);
    frame.put_u32(announced);
    message
        .encode(&mut frame)
        .expect("the buffer holds the message's encoded length");
    Ok(frame.freeze())
}
