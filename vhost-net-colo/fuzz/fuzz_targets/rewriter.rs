//! `filter-rewriter` fed a sequence of frames in both directions, with and without a
//! virtio-net header (offloads pending), interleaved with checkpoint and failover events.
//!
//! Most frames are TCP segments built from a few fuzzer-chosen fields over a small set of
//! addresses and ports, so that handshakes, data, FIN and RST of the same connections meet
//! (random bytes alone would almost never form two segments of one connection); the rest are
//! raw fuzzer bytes. Checks: no panic; the rewriter never consumes a frame nor changes its
//! length; it only touches the TCP sequence, acknowledgement and checksum fields of a TCP
//! segment (non-TCP frames come out unchanged); the connection table stays bounded.
#![no_main]

use colo_proto::packet::build::{Link, TcpSegment, tcp_frame};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use vhost_net_colo::filter::rewriter::MAX_CONNECTIONS;
use vhost_net_colo::filter::{Counters, Direction, Filter, FilterRewriter, Verdict};
use vhost_net_colo::offload::VnetHdr;

const GUESTS: [&str; 2] = ["10.0.0.2:80", "[fd00::2]:80"];
const PEERS: [&str; 4] = [
    "10.0.0.9:40000",
    "10.0.0.9:40001",
    "[fd00::9]:40000",
    "10.0.0.7:40000",
];

fn built(u: &mut Unstructured<'_>, dir: Direction) -> Result<Vec<u8>> {
    let gi = usize::from(u.int_in_range(0..=1u8)?);
    let mut pi = usize::from(u.int_in_range(0..=3u8)?);
    // Keep the address families together (a v4 peer of a v6 guest is not a packet).
    if gi == 1 {
        pi = 2;
    } else if pi == 2 {
        pi = 0;
    }
    let guest = GUESTS[gi].parse().expect("constant");
    let peer = PEERS[pi].parse().expect("constant");
    let (src, dst, link) = match dir {
        Direction::Tx => (peer, guest, Link::default()),
        Direction::Rx => (guest, peer, Link::default().reversed()),
    };
    // Sequence numbers near a few bases, so that acks and FIN ends can match.
    let base: u32 = *u.choose(&[0u32, 1_000, 0xffff_ff00, 5_000])?;
    let seq = base.wrapping_add(u32::from(u.arbitrary::<u8>()?));
    let ack_base: u32 = *u.choose(&[0u32, 1_001, 0xffff_ff01, 5_001])?;
    let ack = ack_base.wrapping_add(u32::from(u.arbitrary::<u8>()?));
    let flags = u16::from(u.arbitrary::<u8>()?) & 0x3f;
    let len = usize::from(u.arbitrary::<u8>()? % 64);
    let payload = u.bytes(len.min(u.len()))?;
    Ok(tcp_frame(
        &link,
        &TcpSegment {
            src,
            dst,
            seq,
            ack,
            flags,
            window: 1000,
            payload,
        },
    ))
}

/// Offsets of the bytes the rewriter may change in `frame`: TCP seq, ack and checksum.
fn mutable_bytes(frame: &[u8]) -> Option<Vec<usize>> {
    let p = colo_proto::packet::parse_ethernet(frame);
    let colo_proto::packet::Network::Ip(ip, colo_proto::packet::Transport::Tcp(_)) = &p.net else {
        return None;
    };
    let l4 = ip.l4_offset;
    Some((l4 + 4..l4 + 12).chain(l4 + 16..l4 + 18).collect())
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let mut rw = FilterRewriter::new();
    let mut c = Counters::default();
    while !u.is_empty() {
        let op: u8 = u.arbitrary()?;
        let dir = if op & 1 == 0 {
            Direction::Rx
        } else {
            Direction::Tx
        };
        let mut frame = match op >> 1 & 7 {
            0 => {
                rw.checkpoint();
                continue;
            }
            1 if op & 0x80 != 0 => {
                assert!(rw.failover(), "the rewriter stays on at failover");
                continue;
            }
            2 => {
                let n = usize::from(u.arbitrary::<u8>()?);
                u.bytes(n.min(u.len()))?.to_vec()
            }
            _ => built(u, dir)?,
        };
        // A corrupted byte now and then (truncation, options, IP header fields).
        if op & 0x40 != 0 && !frame.is_empty() {
            let at = usize::from(u.arbitrary::<u16>()?) % frame.len();
            frame[at] = u.arbitrary()?;
            if op & 0x20 != 0 {
                frame.truncate(at);
            }
        }
        let before = frame.clone();
        let verdict = if op & 0x10 != 0 {
            let mut raw = [0u8; 10];
            u.fill_buffer(&mut raw)?;
            let mut hdr = VnetHdr::parse(&raw).expect("10 bytes");
            rw.receive_offloaded(dir, &mut hdr, &mut frame, &mut c)
        } else {
            rw.receive(dir, &mut frame, &mut c)
        };
        assert_eq!(verdict, Verdict::Pass);
        assert_eq!(frame.len(), before.len(), "length changed");
        if frame != before {
            let allowed = mutable_bytes(&before).expect("only TCP segments are rewritten");
            for (i, (a, b)) in before.iter().zip(&frame).enumerate() {
                assert!(a == b || allowed.contains(&i), "byte {i} changed");
            }
        }
        assert!(rw.connections() <= MAX_CONNECTIONS);
        let _ = rw.describe();
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
