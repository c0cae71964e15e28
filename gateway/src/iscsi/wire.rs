//! Moving PDUs over a TCP stream: a buffered reader that yields parsed [`Pdu`]s and a
//! vectored writer for encoded parts, so that payload `Bytes` are never copied on the way
//! out.

use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::pdu::{try_parse, Framing, OutPdu, Pdu, PduError};

/// Reads PDUs from one connection.
pub struct PduReader<R> {
    io: R,
    buf: BytesMut,
    pub framing: Framing,
}

impl<R: AsyncRead + Unpin> PduReader<R> {
    pub fn new(io: R, framing: Framing) -> Self {
        Self { io, buf: BytesMut::with_capacity(64 * 1024), framing }
    }

    /// The next PDU, or `None` when the peer closed the connection between PDUs.
    pub async fn next(&mut self) -> Result<Option<Pdu>, PduError> {
        loop {
            if let Some(pdu) = try_parse(&mut self.buf, &self.framing)? {
                return Ok(Some(pdu));
            }
            if self.buf.capacity() - self.buf.len() < 16 * 1024 {
                self.buf.reserve(64 * 1024);
            }
            if self.io.read_buf(&mut self.buf).await? == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(PduError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }
}

/// Writes `parts` fully with as few `writev` calls as the kernel allows.
pub async fn write_parts<W: AsyncWrite + Unpin>(io: &mut W, parts: &mut Vec<Bytes>) -> std::io::Result<()> {
    let mut idx = 0;
    while idx < parts.len() {
        let slices: Vec<IoSlice<'_>> = parts[idx..].iter().take(64).map(|b| IoSlice::new(b)).collect();
        let mut n = io.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 && idx < parts.len() {
            let len = parts[idx].len();
            if n >= len {
                n -= len;
                idx += 1;
            } else {
                parts[idx].advance(n);
                n = 0;
            }
        }
    }
    parts.clear();
    Ok(())
}

/// Encodes and writes one PDU (login phase, before the writer task exists).
pub async fn write_pdu<W: AsyncWrite + Unpin>(io: &mut W, pdu: OutPdu, framing: &Framing) -> std::io::Result<()> {
    let mut parts = Vec::with_capacity(3);
    pdu.encode(framing, &mut parts);
    write_parts(io, &mut parts).await?;
    io.flush().await
}
