//! Data-path framing: a 16-byte prefix, a prost-encoded header, a raw payload.
//!
//! ```text
//! magic u32 | header_len u32 | payload_len u32 | crc32c u32   (little endian)
//! header (header_len bytes: a datapath Request or Response)
//! payload (payload_len bytes: write data, read data, copy pieces)
//! ```
//!
//! The CRC32C covers the header bytes then the payload bytes. Lengths are checked against
//! [`MAX_HEADER`] and [`MAX_PAYLOAD`] before anything is allocated for them; a frame that fails
//! any check is a [`FrameError`] and the connection carrying it is closed (a corrupt stream
//! cannot be resynchronised).
//!
//! - [`decode`] is pure (bytes in, frames out) and is what the fuzz target drives.
//! - [`FrameReader`] is the socket side: small frames are cut out of one receive buffer (many
//!   per `read`), payloads of [`ALIGNED_PAYLOAD_MIN`] bytes or more are read straight into an
//!   [`AlignedBuf`], so write data reaches O_DIRECT without another copy.
//! - [`OutFrame`] + [`write_loop`]: prefix and header in one small buffer, the payload `Bytes`
//!   as is, and everything queued sent in one `writev`.

use std::io::{self, IoSlice};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use ironsan_common::crc::{crc32c, crc32c_append};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use crate::buf::AlignedBuf;
use crate::chunk::MAX_IO;
use crate::error::Error;

/// "ISDP" (IronSAN data path) read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"ISDP");
pub const PREFIX_LEN: usize = 16;
/// Largest header accepted (a response listing many ranges is the biggest).
pub const MAX_HEADER: usize = 64 << 10;
/// Largest payload accepted: one maximal I/O plus slack for future framing needs.
pub const MAX_PAYLOAD: usize = MAX_IO as usize + (64 << 10);
/// Payloads at least this long are read into an aligned buffer (O_DIRECT-ready).
pub const ALIGNED_PAYLOAD_MIN: usize = 4096;
/// Bytes asked of the socket per read when buffering.
const READ_CHUNK: usize = 64 << 10;
/// Frames sent per `writev` at most (two iovecs each, far below IOV_MAX).
const MAX_BATCH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("bad frame magic {0:#010x}")]
    BadMagic(u32),
    #[error("frame header of {0} bytes exceeds {MAX_HEADER}")]
    HeaderTooLarge(usize),
    #[error("frame payload of {0} bytes exceeds {MAX_PAYLOAD}")]
    PayloadTooLarge(usize),
    #[error("frame CRC32C mismatch: frame says {expected:#010x}, contents give {actual:#010x}")]
    BadCrc { expected: u32, actual: u32 },
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("frame not completed within {0:?}")]
    Stalled(std::time::Duration),
    #[error("undecodable frame header: {0}")]
    BadHeader(#[from] prost::DecodeError),
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl From<FrameError> for Error {
    fn from(e: FrameError) -> Self {
        Error::Protocol(e.to_string())
    }
}

/// One decoded frame; the header is still protobuf bytes (see [`Frame::request`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub header: Bytes,
    pub payload: Bytes,
}

impl Frame {
    pub fn request(&self) -> Result<crate::wire::Request, FrameError> {
        Ok(prost::Message::decode(self.header.clone())?)
    }

    pub fn response(&self) -> Result<crate::wire::Response, FrameError> {
        Ok(prost::Message::decode(self.header.clone())?)
    }
}

#[derive(Clone, Copy, Debug)]
struct Prefix {
    header_len: usize,
    payload_len: usize,
    crc: u32,
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

/// Validates the fixed prefix at the start of `b` (at least [`PREFIX_LEN`] bytes).
fn parse_prefix(b: &[u8]) -> Result<Prefix, FrameError> {
    let magic = le32(b, 0);
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    let header_len = le32(b, 4) as usize;
    if header_len > MAX_HEADER {
        return Err(FrameError::HeaderTooLarge(header_len));
    }
    let payload_len = le32(b, 8) as usize;
    if payload_len > MAX_PAYLOAD {
        return Err(FrameError::PayloadTooLarge(payload_len));
    }
    Ok(Prefix {
        header_len,
        payload_len,
        crc: le32(b, 12),
    })
}

fn check_crc(p: &Prefix, header: &[u8], payload: &[u8]) -> Result<(), FrameError> {
    let actual = crc32c_append(crc32c(header), payload);
    if actual != p.crc {
        return Err(FrameError::BadCrc {
            expected: p.crc,
            actual,
        });
    }
    Ok(())
}

/// Cuts the next frame off the front of `buf`: `Ok(None)` when more bytes are needed (room
/// for the whole frame is then reserved), an error when the bytes can never form a valid frame.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
    if buf.len() < PREFIX_LEN {
        return Ok(None);
    }
    let p = parse_prefix(&buf[..PREFIX_LEN])?;
    let total = PREFIX_LEN + p.header_len + p.payload_len;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    check_crc(
        &p,
        &buf[PREFIX_LEN..PREFIX_LEN + p.header_len],
        &buf[PREFIX_LEN + p.header_len..total],
    )?;
    buf.advance(PREFIX_LEN);
    let header = buf.split_to(p.header_len).freeze();
    let payload = buf.split_to(p.payload_len).freeze();
    Ok(Some(Frame { header, payload }))
}

/// Prefix and header of a frame whose payload is `payload`, CRC included.
pub fn encode_head(header: &impl prost::Message, payload: &[u8]) -> Bytes {
    let hl = header.encoded_len();
    let mut b = BytesMut::with_capacity(PREFIX_LEN + hl);
    b.put_u32_le(MAGIC);
    b.put_u32_le(hl as u32);
    b.put_u32_le(payload.len() as u32);
    b.put_u32_le(0);
    header.encode_raw(&mut b);
    let crc = crc32c_append(crc32c(&b[PREFIX_LEN..]), payload);
    b[12..16].copy_from_slice(&crc.to_le_bytes());
    b.freeze()
}

/// A whole frame in one buffer (tests, fuzzing, seeds).
pub fn encode(header: &impl prost::Message, payload: &[u8]) -> Bytes {
    let head = encode_head(header, payload);
    let mut b = BytesMut::with_capacity(head.len() + payload.len());
    b.extend_from_slice(&head);
    b.extend_from_slice(payload);
    b.freeze()
}

/// A frame queued for a connection's writer.
pub struct OutFrame {
    head: Bytes,
    payload: Bytes,
    /// Released once the frame is on the socket: bounds what a stream keeps queued.
    _permit: Option<OwnedSemaphorePermit>,
}

impl OutFrame {
    pub fn new(header: &impl prost::Message, payload: Bytes) -> Self {
        Self {
            head: encode_head(header, &payload),
            payload,
            _permit: None,
        }
    }

    pub fn with_permit(mut self, permit: OwnedSemaphorePermit) -> Self {
        self._permit = Some(permit);
        self
    }

    pub fn len(&self) -> usize {
        self.head.len() + self.payload.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Sends every queued frame until the queue closes (then shuts the socket's write side) or
/// the socket fails. Frames that queued up meanwhile go out together in one `writev`.
pub async fn write_loop<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::Receiver<OutFrame>,
) -> io::Result<()> {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(f) = rx.recv().await {
        batch.push(f);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(f) => batch.push(f),
                Err(_) => break,
            }
        }
        write_batch(&mut w, &batch).await?;
        batch.clear();
    }
    w.shutdown().await
}

async fn write_batch<W: AsyncWrite + Unpin>(w: &mut W, batch: &[OutFrame]) -> io::Result<()> {
    let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(batch.len() * 2);
    for f in batch {
        iov.push(IoSlice::new(&f.head));
        if !f.payload.is_empty() {
            iov.push(IoSlice::new(&f.payload));
        }
    }
    let mut rest = &mut iov[..];
    while !rest.is_empty() {
        let n = w.write_vectored(rest).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    w.flush().await
}

/// Reads frames from a socket (see the module doc for the buffering rules).
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    /// Once a frame has begun, the rest must arrive within this (a peer idling mid-frame
    /// would otherwise hold its connection forever). Idle time between frames is unbounded.
    stall: Option<std::time::Duration>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            buf: BytesMut::with_capacity(READ_CHUNK),
            stall: None,
        }
    }

    /// Fails a frame with [`FrameError::Stalled`] if it is not complete `d` after it began.
    pub fn with_stall_timeout(mut self, d: std::time::Duration) -> Self {
        self.stall = Some(d);
        self
    }

    /// Reads more bytes into the buffer; false on end of stream.
    async fn fill(&mut self, want: usize) -> io::Result<bool> {
        self.buf.reserve(want.max(READ_CHUNK));
        Ok(self.inner.read_buf(&mut self.buf).await? != 0)
    }

    /// The next frame; `Ok(None)` when the peer closed cleanly between frames. Not cancel-safe:
    /// dropping it mid-frame loses the frame (callers drop the connection then anyway).
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.buf.is_empty() && !self.fill(PREFIX_LEN).await? {
            return Ok(None);
        }
        match self.stall {
            Some(d) => tokio::time::timeout(d, self.read_rest())
                .await
                .map_err(|_| FrameError::Stalled(d))?,
            None => self.read_rest().await,
        }
    }

    /// The rest of a frame of which at least one byte is buffered.
    async fn read_rest(&mut self) -> Result<Option<Frame>, FrameError> {
        while self.buf.len() < PREFIX_LEN {
            if !self.fill(PREFIX_LEN).await? {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated)
                };
            }
        }
        let p = parse_prefix(&self.buf[..PREFIX_LEN])?;
        if p.payload_len < ALIGNED_PAYLOAD_MIN {
            let total = PREFIX_LEN + p.header_len + p.payload_len;
            while self.buf.len() < total {
                if !self.fill(total - self.buf.len()).await? {
                    return Err(FrameError::Truncated);
                }
            }
            return decode(&mut self.buf);
        }
        let head_end = PREFIX_LEN + p.header_len;
        while self.buf.len() < head_end {
            if !self.fill(head_end - self.buf.len()).await? {
                return Err(FrameError::Truncated);
            }
        }
        self.buf.advance(PREFIX_LEN);
        let header = self.buf.split_to(p.header_len).freeze();
        // Whatever payload already sits in the buffer is copied (at most one READ_CHUNK); the
        // rest goes from the socket straight into the aligned buffer.
        let mut payload = AlignedBuf::zeroed(p.payload_len);
        let have = self.buf.len().min(p.payload_len);
        payload.as_mut_slice()[..have].copy_from_slice(&self.buf[..have]);
        self.buf.advance(have);
        if let Err(e) = self
            .inner
            .read_exact(&mut payload.as_mut_slice()[have..])
            .await
        {
            return Err(if e.kind() == io::ErrorKind::UnexpectedEof {
                FrameError::Truncated
            } else {
                e.into()
            });
        }
        check_crc(&p, &header, payload.as_slice())?;
        Ok(Some(Frame {
            header,
            payload: payload.freeze(),
        }))
    }
}

/// Fuzzing entry point: feeds `data` to [`decode`] (in one piece and split at an arbitrary
/// point), decodes every frame's header both ways, and checks that re-encoding round-trips.
/// Must never panic, whatever the input.
pub fn fuzz_decode(data: &[u8]) {
    use prost::Message;
    /// Frames until more bytes are needed (false) or the bytes are invalid (true).
    fn drain(b: &mut BytesMut, out: &mut Vec<Frame>) -> bool {
        loop {
            match decode(b) {
                Ok(Some(f)) => out.push(f),
                Ok(None) => return false,
                Err(_) => return true,
            }
        }
    }
    let mut frames = Vec::new();
    drain(&mut BytesMut::from(data), &mut frames);
    let split = data.first().map_or(0, |&b| b as usize).min(data.len());
    let mut parts = BytesMut::from(&data[..split]);
    let mut again = Vec::new();
    if !drain(&mut parts, &mut again) {
        parts.extend_from_slice(&data[split..]);
        drain(&mut parts, &mut again);
    }
    assert_eq!(
        frames, again,
        "decoding must not depend on how bytes arrive"
    );
    for f in &frames {
        if let Ok(req) = f.request() {
            let re = encode(&req, &f.payload);
            let back = decode(&mut BytesMut::from(&re[..])).ok().flatten();
            assert!(matches!(back.map(|g| g.request()), Some(Ok(r)) if r == req));
        }
        let _ = f.response().map(|r| r.encoded_len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Op, Request};

    fn req(id: u64) -> Request {
        Request {
            request_id: id,
            op: Op::Write as i32,
            volume: 7,
            index: 3,
            offset: 4096,
            length: 5,
            epoch: 2,
            ..Default::default()
        }
    }

    #[test]
    fn round_trip_many_in_one_buffer() {
        let mut b = BytesMut::new();
        for id in 0..5u64 {
            b.extend_from_slice(&encode(&req(id), &vec![id as u8; id as usize * 1000]));
        }
        for id in 0..5u64 {
            let f = decode(&mut b).unwrap().unwrap();
            assert_eq!(f.request().unwrap(), req(id));
            assert_eq!(f.payload.len(), id as usize * 1000);
        }
        assert!(b.is_empty());
        assert!(decode(&mut b).unwrap().is_none());
    }

    #[test]
    fn truncated_needs_more_at_every_length() {
        let full = encode(&req(1), b"hello");
        for n in 0..full.len() {
            let mut b = BytesMut::from(&full[..n]);
            assert!(decode(&mut b).unwrap().is_none(), "prefix of {n} bytes");
        }
    }

    #[test]
    fn bad_magic() {
        let mut f = BytesMut::from(&encode(&req(1), b"x")[..]);
        f[0] ^= 1;
        assert!(matches!(decode(&mut f), Err(FrameError::BadMagic(_))));
    }

    #[test]
    fn bad_crc_in_header_payload_or_crc() {
        let full = encode(&req(1), b"payload");
        for at in [12, PREFIX_LEN + 1, full.len() - 1] {
            let mut f = BytesMut::from(&full[..]);
            f[at] ^= 0x40;
            assert!(
                matches!(decode(&mut f), Err(FrameError::BadCrc { .. })),
                "flip at {at}"
            );
        }
    }

    #[test]
    fn oversize_header_and_payload() {
        let mut f = BytesMut::from(&encode(&req(1), b"")[..]);
        f[4..8].copy_from_slice(&(MAX_HEADER as u32 + 1).to_le_bytes());
        assert!(matches!(decode(&mut f), Err(FrameError::HeaderTooLarge(_))));
        let mut f = BytesMut::from(&encode(&req(1), b"")[..]);
        f[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode(&mut f),
            Err(FrameError::PayloadTooLarge(_))
        ));
    }

    #[test]
    fn garbage_header_with_valid_crc() {
        let garbage = [0xffu8; 11];
        let mut b = BytesMut::new();
        b.put_u32_le(MAGIC);
        b.put_u32_le(garbage.len() as u32);
        b.put_u32_le(0);
        b.put_u32_le(crc32c(&garbage));
        b.extend_from_slice(&garbage);
        let f = decode(&mut b).unwrap().unwrap();
        assert!(matches!(f.request(), Err(FrameError::BadHeader(_))));
    }

    #[tokio::test]
    async fn reader_small_and_aligned_payloads() {
        let big: Vec<u8> = (0..(1 << 20) + 512).map(|i| (i % 251) as u8).collect();
        let mut wire = Vec::new();
        wire.extend_from_slice(&encode(&req(1), b"small"));
        wire.extend_from_slice(&encode(&req(2), &big));
        wire.extend_from_slice(&encode(&req(3), &[]));
        let mut r = FrameReader::new(&wire[..]);
        let a = r.read_frame().await.unwrap().unwrap();
        assert_eq!(&a.payload[..], b"small");
        let b = r.read_frame().await.unwrap().unwrap();
        assert_eq!(b.request().unwrap().request_id, 2);
        assert_eq!(&b.payload[..], &big[..]);
        assert_eq!(b.payload.as_ptr() as usize % crate::buf::ALIGN, 0);
        let c = r.read_frame().await.unwrap().unwrap();
        assert!(c.payload.is_empty());
        assert!(r.read_frame().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn reader_truncated_and_corrupt() {
        let full = encode(&req(1), &[9u8; 8192]);
        let mut r = FrameReader::new(&full[..full.len() - 1]);
        assert!(matches!(r.read_frame().await, Err(FrameError::Truncated)));
        let mut r = FrameReader::new(&full[..10]);
        assert!(matches!(r.read_frame().await, Err(FrameError::Truncated)));
        let mut bad = full.to_vec();
        bad[5000] ^= 1;
        let mut r = FrameReader::new(&bad[..]);
        assert!(matches!(
            r.read_frame().await,
            Err(FrameError::BadCrc { .. })
        ));
    }

    #[tokio::test]
    async fn reader_stall_timeout_only_mid_frame() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let d = std::time::Duration::from_millis(50);
        let mut r = FrameReader::new(b).with_stall_timeout(d);
        let full = encode(&req(1), b"x");
        // Idle between frames: no timeout.
        let idle = tokio::time::timeout(d * 4, r.read_frame()).await;
        assert!(idle.is_err(), "still waiting, no error");
        tokio::io::AsyncWriteExt::write_all(&mut a, &full[..5])
            .await
            .unwrap();
        assert!(matches!(r.read_frame().await, Err(FrameError::Stalled(_))));
    }

    #[tokio::test]
    async fn writer_batches_and_reader_reads_back() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (tx, rx) = mpsc::channel(16);
        let w = tokio::spawn(write_loop(a, rx));
        for id in 0..20u64 {
            tx.send(OutFrame::new(&req(id), Bytes::from(vec![1u8; 5000])))
                .await
                .unwrap();
        }
        drop(tx);
        let mut r = FrameReader::new(b);
        for id in 0..20u64 {
            let f = r.read_frame().await.unwrap().unwrap();
            assert_eq!(f.request().unwrap().request_id, id);
            assert_eq!(f.payload.len(), 5000);
        }
        assert!(r.read_frame().await.unwrap().is_none());
        w.await.unwrap().unwrap();
    }

    #[test]
    fn fuzz_entry_on_valid_and_invalid_input() {
        let mut v = encode(&req(1), b"abc").to_vec();
        v.extend_from_slice(&encode(&req(2), &[]));
        fuzz_decode(&v);
        fuzz_decode(&v[..v.len() - 3]);
        fuzz_decode(b"");
        fuzz_decode(&[0xff; 40]);
    }
}
