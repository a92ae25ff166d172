//! Fuzz target: arbitrary interleavings of primary and secondary frames, ticks and checkpoints.
//!
//! Invariants: no panic; every released frame is a primary frame that was given and not yet
//! released; every dropped frame is a secondary frame that was given and not yet dropped; after a
//! final `checkpoint_done` every primary frame has been released exactly once (none lost),
//! every secondary frame dropped, and nothing is queued.
#![no_main]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use arbitrary::Arbitrary;
use colo_proto::frame::Frame;
use colo_proto::packet::build::{Link, TcpSegment, tcp_frame, udp_frame};
use comparer::engine::{CompareConfig, Decision, Engine};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Pkt {
    /// 0..=2 TCP, 3 UDP, 4 raw bytes.
    kind: u8,
    flow: u8,
    off: u16,
    len: u8,
    flags: u8,
    corrupt: Option<u8>,
    raw: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Primary(Pkt),
    Secondary(Pkt),
    Tick(u16),
    CheckpointDone,
}

#[derive(Arbitrary, Debug)]
struct Input {
    max_queue: u8,
    isn_p: u32,
    isn_s: u32,
    ops: Vec<Op>,
}

fn stream_byte(pos: u32) -> u8 {
    (pos.wrapping_mul(7) >> 3) as u8
}

fn build(p: &Pkt, isn: u32, unique: u32) -> Frame {
    let guest: SocketAddr = if p.flow % 2 == 0 {
        "10.0.0.2:80".parse().unwrap()
    } else {
        "[fd00::2]:80".parse().unwrap()
    };
    let client: SocketAddr = if p.flow % 2 == 0 {
        "10.0.0.1:4000".parse().unwrap()
    } else {
        "[fd00::1]:4000".parse().unwrap()
    };
    match p.kind % 5 {
        0..=2 => {
            let syn = p.flags & 1 != 0;
            let start = u32::from(p.off);
            let mut payload: Vec<u8> = (0..u32::from(p.len))
                .map(|i| stream_byte(start + i))
                .collect();
            if let (Some(c), false) = (p.corrupt, payload.is_empty()) {
                let n = payload.len();
                payload[usize::from(c) % n] ^= 0x5a;
            }
            let mut flags = 0x10u16; // ACK
            if syn {
                flags |= 0x02;
            }
            if p.flags & 2 != 0 {
                flags |= 0x01; // FIN
            }
            if p.flags & 4 != 0 {
                flags |= 0x04; // RST
            }
            if p.flags & 8 != 0 {
                flags &= !0x10;
            }
            let seq = isn.wrapping_add(start).wrapping_add(u32::from(!syn));
            Frame::ethernet(tcp_frame(
                &Link::default(),
                &TcpSegment {
                    src: guest,
                    dst: client,
                    seq,
                    ack: unique, // makes every frame's bytes unique (ack is not compared)
                    flags,
                    window: 100,
                    payload: if syn { &[] } else { &payload },
                },
            ))
        }
        3 => {
            let mut payload = vec![p.len, p.off as u8];
            if let Some(c) = p.corrupt {
                payload.push(c);
            }
            Frame::ethernet(udp_frame(&Link::default(), guest, client, &payload))
        }
        _ => Frame {
            vnet_hdr_len: u32::from(p.flags % 3) * 6,
            payload: p.raw.clone(),
        },
    }
}

fuzz_target!(|input: Input| {
    let mut e = Engine::new(CompareConfig {
        max_queue_size: usize::from(input.max_queue % 16) + 1,
        compare_timeout: Duration::from_millis(300),
        expired_scan_cycle: Duration::from_millis(100),
        ..CompareConfig::default()
    });
    // Outstanding frames by their bytes (count, for identical frames).
    let mut prim: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut sec: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut given = 0u64;
    let mut released = 0u64;
    let mut now = Duration::from_secs(1);
    let mut unique = 0u32;
    let check = |d: Vec<Decision>,
                 prim: &mut HashMap<Vec<u8>, usize>,
                 sec: &mut HashMap<Vec<u8>, usize>,
                 released: &mut u64| {
        for d in d {
            match d {
                Decision::Release { frame, .. } => {
                    let c = prim
                        .get_mut(&frame.payload)
                        .expect("released frame is a primary frame");
                    assert!(*c > 0, "released twice");
                    *c -= 1;
                    *released += 1;
                }
                Decision::DropSecondary { frame, .. } => {
                    let c = sec
                        .get_mut(&frame.payload)
                        .expect("dropped frame is a secondary frame");
                    assert!(*c > 0, "dropped twice");
                    *c -= 1;
                }
                Decision::Checkpoint { .. } => {}
            }
        }
    };
    for op in input.ops.iter().take(2000) {
        unique = unique.wrapping_add(1);
        match op {
            Op::Primary(p) => {
                let f = build(p, input.isn_p, unique);
                *prim.entry(f.payload.clone()).or_default() += 1;
                given += 1;
                e.on_primary(f, now);
            }
            Op::Secondary(p) => {
                let f = build(p, input.isn_s, unique);
                *sec.entry(f.payload.clone()).or_default() += 1;
                e.on_secondary(f, now);
            }
            Op::Tick(ms) => {
                now += Duration::from_millis(u64::from(*ms % 1000));
                if let Some(d) = e.next_deadline() {
                    assert!(d >= Duration::ZERO);
                }
                e.on_tick(now);
            }
            Op::CheckpointDone => e.checkpoint_done(now),
        }
        check(e.take_decisions(), &mut prim, &mut sec, &mut released);
    }
    e.checkpoint_done(now);
    check(e.take_decisions(), &mut prim, &mut sec, &mut released);
    assert_eq!(released, given, "every primary frame released exactly once");
    assert!(prim.values().all(|&c| c == 0));
    assert!(
        sec.values().all(|&c| c == 0),
        "every secondary frame dropped"
    );
    let s = e.stats();
    assert_eq!((s.primary_queued, s.secondary_queued), (0, 0));
    assert_eq!(s.released, given);
});
