//! QEMU's socket-chardev packet framing, as spoken by filter-mirror, filter-redirector and
//! colo-compare.
//!
//! One byte stream carries records:
//!
//! ```text
//! len: u32 BE | vnet_hdr_len: u32 BE (only with vnet_hdr_support) | payload: len bytes
//! ```
//!
//! `len` counts the whole payload. With vnet headers the payload starts with the virtio-net
//! header of `vnet_hdr_len` bytes, then the Ethernet frame. There is no magic and no checksum,
//! so both ends must agree on `vnet_hdr_support`; a decoder that meets an impossible record
//! stops for good (it never skips bytes hoping to find the next record).

use std::io::{self, Read, Write};

/// QEMU's receive buffer (`NET_BUFSIZE`: 4096 + 65536): the largest payload a QEMU peer accepts.
pub const MAX_PAYLOAD_LEN: usize = 4096 + 65536;

/// Length of the `len` field, and of the `vnet_hdr_len` field when present.
const FIELD_LEN: usize = 4;

/// One framed packet.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Frame {
    /// Length of the virtio-net header at the start of `payload` (0 when there is none).
    pub vnet_hdr_len: u32,
    /// The record's payload: the virtio-net header (if any), then the Ethernet frame.
    pub payload: Vec<u8>,
}

impl Frame {
    /// A frame without a virtio-net header.
    pub fn ethernet(data: impl Into<Vec<u8>>) -> Self {
        Self {
            vnet_hdr_len: 0,
            payload: data.into(),
        }
    }

    /// The Ethernet frame: the payload after the virtio-net header.
    pub fn l2(&self) -> &[u8] {
        // The decoder and `new_checked` guarantee vnet_hdr_len <= payload.len(); a frame built
        // by hand with a bad length yields an empty slice rather than a panic.
        self.payload
            .get(self.vnet_hdr_len as usize..)
            .unwrap_or(&[])
    }

    /// The virtio-net header (empty when there is none).
    pub fn vnet_hdr(&self) -> &[u8] {
        self.payload
            .get(..self.vnet_hdr_len as usize)
            .unwrap_or(&[])
    }
}

/// What can be wrong with a framed stream.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// A record announces more payload than a QEMU peer could ever receive.
    #[error("record at stream offset {offset}: length {len} exceeds the maximum of {max} bytes")]
    Oversize { offset: u64, len: u64, max: usize },
    /// The vnet header length is larger than the record.
    #[error(
        "record at stream offset {offset}: vnet header length {vnet_hdr_len} exceeds the payload length {len}"
    )]
    BadVnetHdrLen {
        offset: u64,
        vnet_hdr_len: u32,
        len: u32,
    },
    /// The stream ended inside a record.
    #[error(
        "stream ended inside the record at offset {offset}: {have} of {need} bytes of its {part}"
    )]
    Truncated {
        offset: u64,
        part: &'static str,
        have: usize,
        need: usize,
    },
    /// An earlier error stopped this decoder.
    #[error("decoder stopped by an earlier error: {0}")]
    Stopped(Box<FrameError>),
}

/// Errors of the blocking reader and writer.
#[derive(Debug, thiserror::Error)]
pub enum FrameIoError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("framed stream I/O: {0}")]
    Io(#[from] io::Error),
}

/// The length fields in front of a record of `payload_len` bytes whose first `vnet_hdr_len`
/// are a vnet header: the bytes and how many of them to send (8 with `vnet_hdr_support`, 4
/// without). A writer that sends header and frame from separate buffers (one `writev`) puts
/// these first.
///
/// Without `vnet_hdr_support`, a record that carries a vnet header is refused (the peer could
/// not tell it apart).
pub fn record_fields(
    payload_len: usize,
    vnet_hdr_len: usize,
    vnet_hdr_support: bool,
) -> Result<([u8; 2 * FIELD_LEN], usize), FrameError> {
    if payload_len > MAX_PAYLOAD_LEN {
        return Err(FrameError::Oversize {
            offset: 0,
            len: payload_len as u64,
            max: MAX_PAYLOAD_LEN,
        });
    }
    if vnet_hdr_len > payload_len || (!vnet_hdr_support && vnet_hdr_len != 0) {
        return Err(FrameError::BadVnetHdrLen {
            offset: 0,
            vnet_hdr_len: vnet_hdr_len as u32,
            len: payload_len as u32,
        });
    }
    let mut fields = [0u8; 2 * FIELD_LEN];
    fields[..FIELD_LEN].copy_from_slice(&(payload_len as u32).to_be_bytes());
    fields[FIELD_LEN..].copy_from_slice(&(vnet_hdr_len as u32).to_be_bytes());
    let n = if vnet_hdr_support {
        2 * FIELD_LEN
    } else {
        FIELD_LEN
    };
    Ok((fields, n))
}

/// Appends one record to `out` (see [`record_fields`] for what is refused).
pub fn encode(frame: &Frame, vnet_hdr_support: bool, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let len = frame.payload.len();
    let (fields, n) = record_fields(len, frame.vnet_hdr_len as usize, vnet_hdr_support)?;
    out.reserve(n + len);
    out.extend_from_slice(&fields[..n]);
    out.extend_from_slice(&frame.payload);
    Ok(())
}

/// Streaming decoder: push bytes as they arrive, take whole frames out.
///
/// Bytes may arrive in any segmentation. After an error every further call returns
/// [`FrameError::Stopped`]: the stream has no resynchronisation point.
#[derive(Debug)]
pub struct FrameDecoder {
    vnet_hdr_support: bool,
    buf: Vec<u8>,
    /// Start of unconsumed bytes in `buf`.
    pos: usize,
    /// Stream offset of `buf[pos]`.
    offset: u64,
    failed: Option<FrameError>,
}

impl FrameDecoder {
    pub fn new(vnet_hdr_support: bool) -> Self {
        Self {
            vnet_hdr_support,
            buf: Vec::new(),
            pos: 0,
            offset: 0,
            failed: None,
        }
    }

    pub fn vnet_hdr_support(&self) -> bool {
        self.vnet_hdr_support
    }

    /// Stream offset of the next byte the decoder has not consumed.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Bytes received but not yet part of a whole frame.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Adds received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 64 * 1024 && self.pos * 2 > self.buf.len() {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    fn header_len(&self) -> usize {
        if self.vnet_hdr_support {
            2 * FIELD_LEN
        } else {
            FIELD_LEN
        }
    }

    fn fail(&mut self, err: FrameError) -> FrameError {
        self.failed = Some(err.clone());
        err
    }

    /// Takes the next whole frame, `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if let Some(err) = &self.failed {
            return Err(FrameError::Stopped(Box::new(err.clone())));
        }
        let avail = &self.buf[self.pos..];
        let hdr = self.header_len();
        if avail.len() < FIELD_LEN {
            return Ok(None);
        }
        let len = be_u32(&avail[..FIELD_LEN]);
        if len as usize > MAX_PAYLOAD_LEN {
            let err = FrameError::Oversize {
                offset: self.offset,
                len: u64::from(len),
                max: MAX_PAYLOAD_LEN,
            };
            return Err(self.fail(err));
        }
        if avail.len() < hdr {
            return Ok(None);
        }
        let vnet_hdr_len = if self.vnet_hdr_support {
            be_u32(&avail[FIELD_LEN..2 * FIELD_LEN])
        } else {
            0
        };
        if vnet_hdr_len > len {
            let err = FrameError::BadVnetHdrLen {
                offset: self.offset,
                vnet_hdr_len,
                len,
            };
            return Err(self.fail(err));
        }
        let total = hdr + len as usize;
        if avail.len() < total {
            return Ok(None);
        }
        let payload = avail[hdr..total].to_vec();
        self.pos += total;
        self.offset += total as u64;
        Ok(Some(Frame {
            vnet_hdr_len,
            payload,
        }))
    }

    /// Declares the end of the stream: an error if it stopped inside a record.
    pub fn finish(&self) -> Result<(), FrameError> {
        if let Some(err) = &self.failed {
            return Err(FrameError::Stopped(Box::new(err.clone())));
        }
        let avail = &self.buf[self.pos..];
        if avail.is_empty() {
            return Ok(());
        }
        let hdr = self.header_len();
        if avail.len() < hdr {
            return Err(FrameError::Truncated {
                offset: self.offset,
                part: "header",
                have: avail.len(),
                need: hdr,
            });
        }
        let len = be_u32(&avail[..FIELD_LEN]) as usize;
        Err(FrameError::Truncated {
            offset: self.offset,
            part: "payload",
            have: avail.len() - hdr,
            need: len,
        })
    }
}

fn be_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

/// Blocking reader of framed records over any byte stream (socket, file).
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    decoder: FrameDecoder,
    chunk: Vec<u8>,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R, vnet_hdr_support: bool) -> Self {
        Self {
            inner,
            decoder: FrameDecoder::new(vnet_hdr_support),
            chunk: vec![0; 64 * 1024],
        }
    }

    /// Next frame; `Ok(None)` at a clean end of stream (between records).
    pub fn read_frame(&mut self) -> Result<Option<Frame>, FrameIoError> {
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                return Ok(Some(frame));
            }
            let n = match self.inner.read(&mut self.chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                self.decoder.finish()?;
                return Ok(None);
            }
            self.decoder.push(&self.chunk[..n]);
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

/// Writes one record in a single `write_all`, so records from one writer never interleave.
pub fn write_frame<W: Write>(
    out: &mut W,
    frame: &Frame,
    vnet_hdr_support: bool,
) -> Result<(), FrameIoError> {
    let mut buf = Vec::with_capacity(frame.payload.len() + 2 * FIELD_LEN);
    encode(frame, vnet_hdr_support, &mut buf)?;
    out.write_all(&buf)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames() -> Vec<Frame> {
        vec![
            Frame::ethernet(vec![1u8; 60]),
            Frame::ethernet(Vec::new()),
            Frame::ethernet(vec![7u8; MAX_PAYLOAD_LEN]),
        ]
    }

    #[test]
    fn encodes_big_endian_length_then_payload() {
        let mut out = Vec::new();
        encode(&Frame::ethernet(vec![0xaa, 0xbb]), false, &mut out).unwrap();
        assert_eq!(out, [0, 0, 0, 2, 0xaa, 0xbb]);
        out.clear();
        let f = Frame {
            vnet_hdr_len: 1,
            payload: vec![0x00, 0xaa, 0xbb],
        };
        encode(&f, true, &mut out).unwrap();
        assert_eq!(out, [0, 0, 0, 3, 0, 0, 0, 1, 0x00, 0xaa, 0xbb]);
        assert_eq!(f.l2(), [0xaa, 0xbb]);
    }

    #[test]
    fn decodes_any_segmentation() {
        for vnet in [false, true] {
            let mut stream = Vec::new();
            for f in frames() {
                encode(&f, vnet, &mut stream).unwrap();
            }
            for step in [1usize, 3, 4, 5, 1000, stream.len()] {
                let mut dec = FrameDecoder::new(vnet);
                let mut got = Vec::new();
                for chunk in stream.chunks(step) {
                    dec.push(chunk);
                    while let Some(f) = dec.next_frame().unwrap() {
                        got.push(f);
                    }
                }
                dec.finish().unwrap();
                assert_eq!(got, frames(), "step {step} vnet {vnet}");
                assert_eq!(dec.offset(), stream.len() as u64);
            }
        }
    }

    #[test]
    fn oversize_record_stops_the_decoder_for_good() {
        let mut dec = FrameDecoder::new(false);
        dec.push(&((MAX_PAYLOAD_LEN as u32) + 1).to_be_bytes());
        let err = dec.next_frame().unwrap_err();
        assert!(
            matches!(err, FrameError::Oversize { offset: 0, .. }),
            "{err}"
        );
        dec.push(&[0, 0, 0, 1, 9]);
        assert!(matches!(dec.next_frame(), Err(FrameError::Stopped(_))));
    }

    #[test]
    fn vnet_header_longer_than_payload_is_rejected() {
        let mut dec = FrameDecoder::new(true);
        dec.push(&[0, 0, 0, 2, 0, 0, 0, 3, 1, 2]);
        assert!(matches!(
            dec.next_frame(),
            Err(FrameError::BadVnetHdrLen { .. })
        ));
    }

    #[test]
    fn truncated_stream_names_offset_and_part() {
        let mut stream = Vec::new();
        encode(&Frame::ethernet(vec![5u8; 10]), false, &mut stream).unwrap();
        encode(&Frame::ethernet(vec![6u8; 10]), false, &mut stream).unwrap();
        stream.truncate(14 + 6);
        let mut reader = FrameReader::new(&stream[..], false);
        assert!(reader.read_frame().unwrap().is_some());
        let err = reader.read_frame().unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("offset 14") && text.contains("payload"),
            "{text}"
        );
    }

    #[test]
    fn encode_refuses_what_the_peer_could_not_decode() {
        let mut out = Vec::new();
        let big = Frame::ethernet(vec![0; MAX_PAYLOAD_LEN + 1]);
        assert!(encode(&big, false, &mut out).is_err());
        let hdr = Frame {
            vnet_hdr_len: 10,
            payload: vec![0; 20],
        };
        assert!(encode(&hdr, false, &mut out).is_err());
        assert!(out.is_empty());
    }
}
