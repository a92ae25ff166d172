//! Several queue pairs (`queues=N`, `VIRTIO_NET_F_MQ`) through a real vhost-user socket, driven
//! by the test frontend: every pair carries frames out to one `stream` netdev; frames towards
//! the guest are spread over the enabled receive queues by flow, one flow on one queue; and a
//! multi-queue tap (root, in a namespace the test creates) has one queue per pair.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use colo_proto::frame::{Frame, FrameReader, write_frame};
use serde_json::json;
use vhost_net_colo::testing::{NetFrontend, Options};

fn pairs(n: u16) -> Options {
    Options {
        queue_pairs: n,
        ..Options::default()
    }
}

/// A UDP/IPv4 frame of flow `flow` (source port), with `n` in the payload.
fn udp_frame(flow: u16, n: u16) -> Vec<u8> {
    let mut f = vec![0u8; 14 + 20 + 8 + 4];
    f[..6].copy_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f[14] = 0x45;
    f[16..18].copy_from_slice(&(32u16).to_be_bytes());
    f[22] = 64;
    f[23] = 17;
    f[26..30].copy_from_slice(&[10, 0, 2, 2]);
    f[30..34].copy_from_slice(&[10, 0, 2, 15]);
    f[34..36].copy_from_slice(&(10_000 + flow).to_be_bytes());
    f[36..38].copy_from_slice(&7u16.to_be_bytes());
    f[38..40].copy_from_slice(&12u16.to_be_bytes());
    f[42..44].copy_from_slice(&flow.to_be_bytes());
    f[44..46].copy_from_slice(&n.to_be_bytes());
    f
}

/// Collects `count` frames from all receive queues: (pair, frame) in arrival order per pair.
fn collect(fe: &mut NetFrontend, count: usize) -> Vec<(usize, Vec<u8>)> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < count {
        let mut any = false;
        for p in 0..fe.queue_pairs() {
            if let Some(f) = fe.try_recv_on(p) {
                got.push((p, f));
                any = true;
            }
        }
        if !any {
            assert!(
                Instant::now() < deadline,
                "only {} of {count} frames reached the guest",
                got.len()
            );
            std::thread::yield_now();
        }
    }
    got
}

#[test]
fn four_queue_pairs_carry_frames_both_ways_and_keep_each_flow_on_one_queue() {
    let dir = tempfile::tempdir().unwrap();
    let (b, wire) = common::spawn_with_wire(dir.path(), ",queues=4", &[], true);
    let mut qmp = b.qmp();
    let mut w = wire.try_clone().unwrap();
    let mut r = FrameReader::new(wire, false);
    let mut fe = b.frontend(&pairs(4));
    assert_ne!(fe.features() & (1 << 22), 0, "VIRTIO_NET_F_MQ");
    let cfg = fe.config(10).unwrap();
    assert_eq!(
        u16::from_le_bytes([cfg[8], cfg[9]]),
        4,
        "max_virtqueue_pairs"
    );
    assert_eq!(
        qmp.execute("query-net", json!({})).unwrap()["queue_pairs"],
        4
    );

    // Guest -> netdev on every pair; within a pair in order.
    let mut sent: BTreeMap<usize, Vec<Vec<u8>>> = BTreeMap::new();
    for n in 0..40u16 {
        let pair = usize::from(n % 4);
        let f = udp_frame(pair as u16, n);
        fe.send_on(pair, &f).unwrap();
        sent.entry(pair).or_default().push(f);
    }
    let mut out: BTreeMap<u16, Vec<Vec<u8>>> = BTreeMap::new();
    for _ in 0..40 {
        let f = r.read_frame().unwrap().unwrap().payload;
        let flow = u16::from_be_bytes([f[42], f[43]]);
        out.entry(flow).or_default().push(f);
    }
    for (pair, frames) in sent {
        assert_eq!(out[&(pair as u16)], frames, "pair {pair}");
    }

    // Netdev -> guest: 16 flows, 5 frames each, interleaved.
    let mut inbound = Vec::new();
    for n in 0..5u16 {
        for flow in 0..16u16 {
            inbound.push(udp_frame(flow, n));
        }
    }
    for f in &inbound {
        write_frame(&mut w, &Frame::ethernet(f.clone()), false).unwrap();
    }
    let got = collect(&mut fe, inbound.len());
    let mut queue_of: BTreeMap<u16, BTreeSet<usize>> = BTreeMap::new();
    let mut per_flow: BTreeMap<u16, Vec<u16>> = BTreeMap::new();
    for (p, f) in &got {
        let flow = u16::from_be_bytes([f[42], f[43]]);
        queue_of.entry(flow).or_default().insert(*p);
        per_flow
            .entry(flow)
            .or_default()
            .push(u16::from_be_bytes([f[44], f[45]]));
    }
    for (flow, qs) in &queue_of {
        assert_eq!(qs.len(), 1, "flow {flow} on queues {qs:?}");
        assert_eq!(per_flow[flow], vec![0, 1, 2, 3, 4], "flow {flow} in order");
    }
    let used: BTreeSet<usize> = queue_of.values().flatten().copied().collect();
    assert!(used.len() >= 2, "16 flows all on queues {used:?}");
    let net = qmp.execute("query-net", json!({})).unwrap();
    let q = net["queues"].as_array().unwrap();
    assert_eq!(q.len(), 4, "{net}");
    for (p, c) in q.iter().enumerate() {
        assert_eq!(c["from_guest"], 10, "pair {p}: {net}");
        let to_guest = got.iter().filter(|(gp, _)| *gp == p).count();
        assert_eq!(c["to_guest"], to_guest as u64, "pair {p}: {net}");
    }

    // A driver using one pair: the others disabled, everything arrives on pair 0.
    for p in 1..4 {
        fe.set_pair_enabled(p, false).unwrap();
    }
    // A request with a reply, handled after the enables (one socket, in order): a barrier.
    fe.config(10).unwrap();
    for f in &inbound[..16] {
        write_frame(&mut w, &Frame::ethernet(f.clone()), false).unwrap();
    }
    let got = collect(&mut fe, 16);
    assert!(
        got.iter().all(|(p, _)| *p == 0),
        "frames on disabled queues"
    );
}

#[test]
fn bad_queue_counts_are_refused() {
    for q in ["0", "17", "x"] {
        let out = Command::new(common::BIN)
            .args(["--socket", "/nonexistent/x.sock", "--netdev"])
            .arg(format!("user,id=n0,queues={q}"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "queues={q} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("queues="), "{err}");
    }
}

#[test]
fn multi_queue_tap_has_a_queue_per_pair() {
    let Some(ns) = common::netns_with_tun("vnmq") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tap = "vnmqtap0";
    let b = common::spawn_with_tap(dir.path(), &ns, tap, ",queues=2", &[]);
    let l = common::link(&ns, tap);
    let info = &l["linkinfo"]["info_data"];
    assert_eq!(info["multi_queue"], true, "{l}");
    assert_eq!(info["numqueues"], 2, "{l}");
    ns.ip(&["link", "set", tap, "up"]).unwrap();
    let mut fe = b.frontend(&pairs(2));
    let before = common::rx_packets(&ns, tap);
    fe.send_on(0, &udp_frame(1, 1)).unwrap();
    fe.send_on(1, &udp_frame(2, 2)).unwrap();
    common::wait_for(
        Duration::from_secs(10),
        "the tap never got both frames",
        || common::rx_packets(&ns, tap) >= before + 2,
    );
}
