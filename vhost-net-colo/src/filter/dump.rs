//! `filter-dump`: writes every frame of its direction(s) to a pcap file (Ethernet link type,
//! microsecond timestamps, frames cut at `maxlen` bytes, default 65536), readable by tcpdump, Wireshark
//! and `comparer replay`. Frames always pass on. Each packet is written through to the file
//! at once, so a reader sees it while the filter runs.

use std::fs::File;
use std::time::{SystemTime, UNIX_EPOCH};

use pcap_file::DataLink;
use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};

use super::{Counters, Direction, Filter, FilterError, Verdict};

/// Snap length written in the file header (tcpdump's maximum).
const HEADER_SNAPLEN: u32 = 262_144;

pub struct FilterDump {
    path: String,
    maxlen: u32,
    writer: PcapWriter<File>,
}

impl FilterDump {
    pub fn create(path: &str, maxlen: u32) -> Result<Self, FilterError> {
        let err = |e: std::io::Error| FilterError::Dump {
            path: path.to_string(),
            source: e,
        };
        let file = File::create(path).map_err(err)?;
        // The header's snap length stays large: pcap-file 2.0's reader (used by `comparer
        // replay`) refuses packets whose original length exceeds it; truncation to `maxlen`
        // is done per packet.
        let header = PcapHeader {
            snaplen: HEADER_SNAPLEN.max(maxlen),
            datalink: DataLink::ETHERNET,
            // Little-endian like tcpdump and QEMU write on x86 (pcap-file defaults to big).
            endianness: pcap_file::Endianness::Little,
            ..Default::default()
        };
        let writer = PcapWriter::with_header(file, header)
            .map_err(|e| err(std::io::Error::other(e.to_string())))?;
        Ok(Self {
            path: path.to_string(),
            maxlen,
            writer,
        })
    }
}

impl Filter for FilterDump {
    fn kind(&self) -> &'static str {
        "filter-dump"
    }

    fn receive(&mut self, _dir: Direction, frame: &mut Vec<u8>, c: &mut Counters) -> Verdict {
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let cap = frame.len().min(self.maxlen as usize);
        let pkt = PcapPacket::new(ts, frame.len() as u32, &frame[..cap]);
        match self.writer.write_packet(&pkt) {
            Ok(_) => c.sent += 1,
            Err(e) => {
                c.errors += 1;
                tracing::debug!("filter-dump {}: {e}", self.path);
            }
        }
        Verdict::Pass
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({"file": self.path, "maxlen": self.maxlen})
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::entry;
    use super::super::*;
    use pcap_file::pcap::PcapReader;

    #[test]
    fn dump_writes_a_readable_pcap_and_passes_frames() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.pcap");
        let mut c = Chain::new();
        c.insert(
            entry(
                "d0",
                QueueSel::All,
                Box::new(FilterDump::create(path.to_str().unwrap(), 64).unwrap()),
            ),
            &Position::Tail,
            Insert::Behind,
        )
        .unwrap();
        let frames = [vec![1u8; 60], vec![2u8; 100]];
        assert_eq!(
            c.process(Direction::Tx, frames[0].clone()),
            Outcome::Deliver(frames[0].clone())
        );
        assert_eq!(
            c.process(Direction::Rx, frames[1].clone()),
            Outcome::Deliver(frames[1].clone())
        );
        let mut r = PcapReader::new(std::fs::File::open(&path).unwrap()).unwrap();
        assert_eq!(r.header().datalink, pcap_file::DataLink::ETHERNET);
        assert_eq!(
            &std::fs::read(&path).unwrap()[..4],
            &[0xd4, 0xc3, 0xb2, 0xa1]
        );
        let p1 = r.next_packet().unwrap().unwrap();
        assert_eq!(&p1.data[..], &frames[0][..]);
        let p2 = r.next_packet().unwrap().unwrap();
        assert_eq!(p2.orig_len, 100);
        assert_eq!(&p2.data[..], &frames[1][..64]);
        assert!(r.next_packet().is_none());
    }

    #[test]
    fn dump_to_an_impossible_path_is_an_error() {
        assert!(FilterDump::create("/nonexistent-dir/x.pcap", 100).is_err());
    }
}
