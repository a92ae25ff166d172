//! Reading captures (pcap and pcapng, Ethernet link type) and writing frames as pcap.
//!
//! Input is read whole into memory and parsed with `pcap-file`'s slice parsers, so every error
//! names the file and the byte offset of the record that is wrong.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pcap_file::DataLink;
use pcap_file::pcap::{PcapHeader, PcapPacket, PcapParser, PcapWriter};
use pcap_file::pcapng::blocks::interface_description::InterfaceDescriptionOption;
use pcap_file::pcapng::{Block, PcapNgParser};

/// One captured frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    /// Capture timestamp (since the Unix epoch, as recorded).
    pub ts: Duration,
    /// The frame bytes as captured.
    pub data: Vec<u8>,
    /// Byte offset of the packet's record in the file.
    pub offset: u64,
}

/// What can be wrong with a capture file.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The file cannot be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        error: std::io::Error,
    },
    /// The file ends in the middle of a header or record.
    #[error("{path}: truncated at byte offset {offset} (incomplete {what})")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Offset of the incomplete header or record.
        offset: u64,
        /// What was being read.
        what: &'static str,
    },
    /// The bytes are not a valid pcap/pcapng structure.
    #[error("{path}: invalid {what} at byte offset {offset}: {msg}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Offset of the bad header or record.
        offset: u64,
        /// What was being read.
        what: &'static str,
        /// What is wrong.
        msg: String,
    },
    /// Not Ethernet frames.
    #[error(
        "{path}: link type {linktype:?} is not supported (only Ethernet captures can be compared)"
    )]
    LinkType {
        /// The file.
        path: PathBuf,
        /// The link type found.
        linktype: DataLink,
    },
    /// A frame was cut by the capture's snaplen, so it cannot be compared.
    #[error(
        "{path}: packet at byte offset {offset} was captured with {captured} of {original} bytes (snaplen too small); recapture without truncation"
    )]
    SnapTruncated {
        /// The file.
        path: PathBuf,
        /// Offset of the record.
        offset: u64,
        /// Bytes captured.
        captured: usize,
        /// Bytes on the wire.
        original: u32,
    },
}

fn pcap_err(
    path: &Path,
    offset: usize,
    what: &'static str,
    e: pcap_file::PcapError,
) -> CaptureError {
    match e {
        pcap_file::PcapError::IncompleteBuffer => CaptureError::Truncated {
            path: path.to_owned(),
            offset: offset as u64,
            what,
        },
        e => CaptureError::Invalid {
            path: path.to_owned(),
            offset: offset as u64,
            what,
            msg: e.to_string(),
        },
    }
}

/// Reads a pcap or pcapng capture of Ethernet frames.
pub fn read_capture(path: &Path) -> Result<Vec<Packet>, CaptureError> {
    let bytes = std::fs::read(path).map_err(|error| CaptureError::Io {
        path: path.to_owned(),
        error,
    })?;
    parse_capture(&bytes, path)
}

/// Parses capture bytes; `path` only names the input in errors.
pub fn parse_capture(bytes: &[u8], path: &Path) -> Result<Vec<Packet>, CaptureError> {
    match bytes.get(..4) {
        Some([0x0a, 0x0d, 0x0d, 0x0a]) => parse_pcapng(bytes, path),
        Some(_) => parse_pcap(bytes, path),
        None => Err(CaptureError::Truncated {
            path: path.to_owned(),
            offset: 0,
            what: "file header",
        }),
    }
}

fn check_len(
    path: &Path,
    offset: usize,
    captured: usize,
    original: u32,
) -> Result<(), CaptureError> {
    if (captured as u64) < u64::from(original) {
        return Err(CaptureError::SnapTruncated {
            path: path.to_owned(),
            offset: offset as u64,
            captured,
            original,
        });
    }
    Ok(())
}

fn parse_pcap(bytes: &[u8], path: &Path) -> Result<Vec<Packet>, CaptureError> {
    let (mut rest, parser) =
        PcapParser::new(bytes).map_err(|e| pcap_err(path, 0, "pcap file header", e))?;
    let linktype = parser.header().datalink;
    if linktype != DataLink::ETHERNET {
        return Err(CaptureError::LinkType {
            path: path.to_owned(),
            linktype,
        });
    }
    let mut out = Vec::new();
    while !rest.is_empty() {
        let offset = bytes.len() - rest.len();
        let (next, pkt) = parser
            .next_packet(rest)
            .map_err(|e| pcap_err(path, offset, "pcap packet record", e))?;
        check_len(path, offset, pkt.data.len(), pkt.orig_len)?;
        out.push(Packet {
            ts: pkt.timestamp,
            data: pkt.data.into_owned(),
            offset: offset as u64,
        });
        rest = next;
    }
    Ok(out)
}

/// Nanoseconds per timestamp unit of an interface (`if_tsresol`, default microseconds).
fn unit_nanos(opts: &[InterfaceDescriptionOption<'_>]) -> Option<f64> {
    let r = opts.iter().find_map(|o| match o {
        InterfaceDescriptionOption::IfTsResol(r) => Some(*r),
        _ => None,
    });
    let r = r.unwrap_or(6);
    let secs = if r & 0x80 == 0 {
        10f64.powi(-i32::from(r))
    } else {
        2f64.powi(-i32::from(r & 0x7f))
    };
    let n = secs * 1e9;
    n.is_finite().then_some(n)
}

fn parse_pcapng(bytes: &[u8], path: &Path) -> Result<Vec<Packet>, CaptureError> {
    let (mut rest, mut parser) =
        PcapNgParser::new(bytes).map_err(|e| pcap_err(path, 0, "pcapng section header", e))?;
    let mut out = Vec::new();
    while !rest.is_empty() {
        let offset = bytes.len() - rest.len();
        let (next, block) = parser
            .next_block(rest)
            .map_err(|e| pcap_err(path, offset, "pcapng block", e))?;
        rest = next;
        let (iface, raw_ts, data, orig): (u32, Option<Duration>, Cow<'_, [u8]>, u32) = match block {
            Block::EnhancedPacket(p) => (p.interface_id, Some(p.timestamp), p.data, p.original_len),
            Block::SimplePacket(p) => (0, None, p.data, p.original_len),
            Block::Packet(p) => (
                u32::from(p.interface_id),
                Some(Duration::from_nanos(p.timestamp)),
                p.data,
                p.original_len,
            ),
            _ => continue,
        };
        let Some(idb) = parser.interfaces().get(iface as usize) else {
            return Err(CaptureError::Invalid {
                path: path.to_owned(),
                offset: offset as u64,
                what: "pcapng packet block",
                msg: format!("interface {iface} was not described"),
            });
        };
        if idb.linktype != DataLink::ETHERNET {
            return Err(CaptureError::LinkType {
                path: path.to_owned(),
                linktype: idb.linktype,
            });
        }
        // pcap-file reports the raw 64-bit timestamp as nanoseconds; scale by if_tsresol.
        let ts = match (raw_ts, unit_nanos(&idb.options)) {
            (Some(raw), Some(unit)) => {
                let ns = raw.as_nanos() as f64 * unit;
                if ns.is_finite() && ns >= 0.0 && ns < u64::MAX as f64 {
                    Duration::from_nanos(ns as u64)
                } else {
                    Duration::ZERO
                }
            }
            _ => out.last().map_or(Duration::ZERO, |p: &Packet| p.ts),
        };
        check_len(path, offset, data.len(), orig)?;
        out.push(Packet {
            ts,
            data: data.into_owned(),
            offset: offset as u64,
        });
    }
    Ok(out)
}

/// Writes Ethernet frames to a pcap file (nanosecond timestamps).
pub struct PcapOut {
    path: PathBuf,
    writer: PcapWriter<std::io::BufWriter<std::fs::File>>,
}

impl PcapOut {
    /// Creates (truncates) `path`.
    pub fn create(path: &Path) -> Result<Self, CaptureError> {
        let io = |error| CaptureError::Io {
            path: path.to_owned(),
            error,
        };
        let file = std::fs::File::create(path).map_err(io)?;
        let header = PcapHeader {
            datalink: DataLink::ETHERNET,
            ts_resolution: pcap_file::TsResolution::NanoSecond,
            snaplen: 262_144,
            ..PcapHeader::default()
        };
        let writer = PcapWriter::with_header(std::io::BufWriter::new(file), header)
            .map_err(|e| io(std::io::Error::other(e)))?;
        Ok(PcapOut {
            path: path.to_owned(),
            writer,
        })
    }

    /// Appends one frame.
    pub fn write(&mut self, ts: Duration, frame: &[u8]) -> Result<(), CaptureError> {
        let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
        self.writer
            .write_packet(&PcapPacket::new(ts, len, frame))
            .map_err(|e| CaptureError::Io {
                path: self.path.clone(),
                error: std::io::Error::other(e),
            })?;
        Ok(())
    }

    /// Flushes and closes the file.
    pub fn finish(self) -> Result<(), CaptureError> {
        use std::io::Write;
        let path = self.path;
        self.writer
            .into_writer()
            .flush()
            .map_err(|error| CaptureError::Io { path, error })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pcap(frames: &[(u64, Vec<u8>)]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.pcap");
        let mut out = PcapOut::create(&path).unwrap();
        for (ts, f) in frames {
            out.write(Duration::from_micros(*ts), f).unwrap();
        }
        out.finish().unwrap();
        (dir, path)
    }

    #[test]
    fn pcap_round_trip() {
        let frames = vec![(1, vec![1u8; 60]), (2_000_000, vec![2u8; 1514])];
        let (_d, path) = write_pcap(&frames);
        let got = read_capture(&path).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].ts, Duration::from_secs(2));
        assert_eq!(got[1].data, frames[1].1);
        assert_eq!(got[0].offset, 24);
        assert_eq!(got[1].offset, 24 + 16 + 60);
    }

    #[test]
    fn truncated_and_garbage_name_file_and_offset() {
        let (_d, path) = write_pcap(&[(1, vec![1u8; 60]), (2, vec![2u8; 100])]);
        let bytes = std::fs::read(&path).unwrap();
        let cut = &bytes[..bytes.len() - 10];
        let e = parse_capture(cut, Path::new("p.pcap")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "p.pcap: truncated at byte offset 100 (incomplete pcap packet record)"
        );
        let e = parse_capture(b"hello, this is not a capture", Path::new("g.pcap")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("g.pcap: invalid pcap file header at byte offset 0"),
            "{e}"
        );
        let e = parse_capture(b"ab", Path::new("t.pcap")).unwrap_err();
        assert!(e.to_string().contains("offset 0"), "{e}");
        let e = read_capture(Path::new("/nonexistent/x.pcap")).unwrap_err();
        assert!(e.to_string().starts_with("/nonexistent/x.pcap: "), "{e}");
    }

    #[test]
    fn pcapng_is_read_with_its_timestamp_resolution() {
        use pcap_file::pcapng::PcapNgWriter;
        use pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketBlock;
        use pcap_file::pcapng::blocks::interface_description::InterfaceDescriptionBlock;
        let mut buf = Vec::new();
        {
            let mut w = PcapNgWriter::new(&mut buf).unwrap();
            w.write_pcapng_block(InterfaceDescriptionBlock::new(DataLink::ETHERNET, 65535))
                .unwrap();
            // Default resolution is microseconds: raw 1_500_000 = 1.5 s.
            w.write_pcapng_block(EnhancedPacketBlock {
                interface_id: 0,
                timestamp: Duration::from_nanos(1_500_000),
                original_len: 60,
                data: Cow::Owned(vec![9u8; 60]),
                options: vec![],
            })
            .unwrap();
        }
        let got = parse_capture(&buf, Path::new("n.pcapng")).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].ts, Duration::from_millis(1500));
        assert_eq!(got[0].data, vec![9u8; 60]);
        let e = parse_capture(&buf[..buf.len() - 4], Path::new("n.pcapng")).unwrap_err();
        assert!(
            e.to_string().contains("n.pcapng: truncated at byte offset"),
            "{e}"
        );
    }
}
