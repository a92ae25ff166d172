//! Offline replay on real guest traffic: `fixtures/guest-{primary,secondary}.pcap` are the
//! output of two copies of the test guest serving the same mirrored client workload (HTTP GET,
//! TCP echo), captured with QEMU's filter-dump (`fixtures/capture-pair.sh`). The guests chose
//! different TCP ISNs. Variants are derived from them here.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;
use comparer::engine::{CheckpointReason, DropReason, Flow, ReleaseReason, Side};
use comparer::pcap::{Packet, read_capture};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn captures() -> (Vec<Packet>, Vec<Packet>) {
    (
        read_capture(&fixture("guest-primary.pcap")).unwrap(),
        read_capture(&fixture("guest-secondary.pcap")).unwrap(),
    )
}

#[test]
fn fixtures_are_real_tcp_with_different_isns() {
    let (p, s) = captures();
    assert!(p.len() >= 8 && s.len() >= 8, "{} {}", p.len(), s.len());
    let isn = |c: &[Packet]| {
        c.iter()
            .find_map(|x| {
                colo_proto::packet::parse_ethernet(&x.data)
                    .tcp()
                    .filter(|t| t.flags.syn())
                    .map(|t| t.seq)
            })
            .unwrap()
    };
    assert_ne!(isn(&p), isn(&s), "the two guests chose different ISNs");
    assert!(data_segments(&p).len() >= 3);
}

#[test]
fn identical_workloads_release_everything_without_checkpoint() {
    let (p, s) = captures();
    let r = run(&p, &s);
    assert_eq!(reasons(&r), Vec::<&str>::new(), "{:?}", r.checkpoints);
    assert_all_released(&r);
    assert_eq!(r.stats.released_flushed + r.stats.released_overflow, 0);
    // Every data-carrying primary segment was matched, none released uncompared.
    for i in data_segments(&p) {
        let rel = r.released.iter().find(|x| x.index == i).unwrap();
        assert_eq!(rel.reason, ReleaseReason::Matched, "frame {i}");
    }
    assert_eq!(r.dropped.len(), s.len());
}

#[test]
fn changed_payload_byte_in_the_http_response() {
    let (p, mut s) = captures();
    let i = data_segments(&s)[0];
    change_payload_byte(&mut s, i, 9);
    let r = run(&p, &s);
    assert_eq!(reasons(&r), vec!["payload_differs"]);
    let CheckpointReason::PayloadDiffers {
        conn: Flow::Ip(k),
        byte_offset,
        primary_excerpt,
        secondary_excerpt,
    } = first_reason(&r)
    else {
        panic!("{:?}", r.checkpoints)
    };
    assert_eq!(k.src_port, 80);
    assert_eq!(*byte_offset, stream_offset(&s, i, 9));
    assert_ne!(primary_excerpt[0], secondary_excerpt[0]);
    assert_all_released(&r);
    // The differing primary segment, and only frames queued behind it on the same connection,
    // waited for the checkpoint.
    let pi = data_segments(&p)[0];
    let flushed: Vec<usize> = r
        .released
        .iter()
        .filter(|x| x.reason == ReleaseReason::Flushed)
        .map(|x| x.index)
        .collect();
    assert!(flushed.contains(&pi), "{flushed:?}");
    assert!(flushed.iter().all(|&j| j >= pi), "{flushed:?}");
    assert!(
        r.released
            .iter()
            .filter(|x| x.index < pi)
            .all(|x| x.reason != ReleaseReason::Flushed)
    );
}

#[test]
fn dropped_secondary_segment_times_out() {
    let (p, mut s) = captures();
    let i = data_segments(&s)[0];
    s.remove(i);
    let r = run(&p, &s);
    assert_eq!(reasons(&r), vec!["timeout"]);
    assert!(matches!(
        first_reason(&r),
        CheckpointReason::Timeout {
            side: Side::Primary,
            waited_ms: 3000,
            ..
        }
    ));
    assert_all_released(&r);
}

#[test]
fn delayed_past_the_timeout() {
    let (p, mut s) = captures();
    let i = data_segments(&s)[0];
    delay(&mut s, i, ms(3500));
    let moved = s
        .iter()
        .position(|x| x.ts == s.iter().map(|y| y.ts).max().unwrap())
        .unwrap();
    let r = run(&p, &s);
    assert_eq!(reasons(&r), vec!["timeout"]);
    assert_all_released(&r);
    assert!(
        r.dropped
            .iter()
            .any(|(j, d)| *j == moved && *d == DropReason::AlreadyVerified),
        "{:?}",
        r.dropped
    );
}

#[test]
fn retransmitted_reordered_and_resegmented_need_no_checkpoint() {
    let (mut p, s) = captures();
    let i = data_segments(&p)[0];
    retransmit(&mut p, i, ms(200));
    let r = run(&p, &s);
    assert_eq!(reasons(&r), Vec::<&str>::new());
    assert_all_released(&r);
    assert_eq!(r.stats.released_already_verified, 1);

    let (p, mut s) = captures();
    let d = data_segments(&s);
    reorder(&mut s, d[0], d[1]);
    let r = run(&p, &s);
    assert_eq!(reasons(&r), Vec::<&str>::new());
    assert_all_released(&r);

    let (mut p, mut s) = captures();
    let i = data_segments(&p)[0];
    resegment(&mut p, i, 17);
    let j = data_segments(&s)[0];
    resegment(&mut s, j, 100);
    let r = run(&p, &s);
    assert_eq!(reasons(&r), Vec::<&str>::new());
    assert_all_released(&r);
}

#[test]
fn ipv6_versions_of_the_captures_are_compared() {
    let (p, s) = captures();
    let (p6, mut s6) = (to_ipv6(&p), to_ipv6(&s));
    let r = run(&p6, &s6);
    assert_eq!(reasons(&r), Vec::<&str>::new());
    assert_all_released(&r);
    let i = data_segments(&s6)[1];
    change_payload_byte(&mut s6, i, 0);
    let r = run(&p6, &s6);
    assert_eq!(reasons(&r)[0], "payload_differs");
    let CheckpointReason::PayloadDiffers {
        conn: Flow::Ip(k),
        byte_offset,
        ..
    } = first_reason(&r)
    else {
        panic!()
    };
    assert!(k.src.is_ipv6());
    assert_eq!(*byte_offset, stream_offset(&s6, i, 0));
    assert_all_released(&r);
}

#[test]
fn arp_difference_is_caught() {
    let (p, mut s) = captures();
    let Some(i) = s
        .iter()
        .position(|x| x.data.get(12..14) == Some(&[0x08, 0x06]))
    else {
        eprintln!("SKIPPED: the fixture has no ARP frame");
        return;
    };
    // Sender IP 10.0.2.15 -> 10.0.2.16 in the secondary's ARP reply.
    s[i].data[14 + 17] ^= 0x1f;
    let r = run(&p, &s);
    assert_eq!(reasons(&r), vec!["payload_differs"]);
    assert!(matches!(
        first_reason(&r),
        CheckpointReason::PayloadDiffers {
            conn: Flow::Arp { vlan: None },
            byte_offset: 17,
            ..
        }
    ));
    assert_all_released(&r);
}

#[test]
fn cli_replays_the_real_pair() {
    let dir = tempfile::tempdir().unwrap();
    let released = dir.path().join("released.pcap");
    let events = dir.path().join("events.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_comparer"))
        .arg("replay")
        .arg("--primary")
        .arg(fixture("guest-primary.pcap"))
        .arg("--secondary")
        .arg(fixture("guest-secondary.pcap"))
        .arg("--released")
        .arg(&released)
        .arg("--events")
        .arg(&events)
        .args(["--compare-timeout", "3000", "--max_queue_size", "1024"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("checkpoints          0"), "{stdout}");
    assert!(stdout.contains("first divergence     none"), "{stdout}");
    let (p, _) = captures();
    let rel = read_capture(&released).unwrap();
    let mut a: Vec<Vec<u8>> = rel.into_iter().map(|x| x.data).collect();
    let mut b: Vec<Vec<u8>> = p.into_iter().map(|x| x.data).collect();
    a.sort();
    b.sort();
    assert_eq!(a, b, "the released pcap holds exactly the primary frames");
    let ev = std::fs::read_to_string(&events).unwrap();
    let lines: Vec<serde_json::Value> = ev
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines.iter().filter(|v| v["decision"] == "release").count(),
        b.len()
    );
    assert!(lines.iter().all(|v| v["decision"] != "checkpoint"));
}

#[test]
fn cli_divergence_is_not_an_error_but_bad_input_is() {
    let dir = tempfile::tempdir().unwrap();
    let (p, mut s) = captures();
    let i = data_segments(&s)[0];
    change_payload_byte(&mut s, i, 0);
    let sp = dir.path().join("s.pcap");
    let mut w = comparer::pcap::PcapOut::create(&sp).unwrap();
    for x in &s {
        w.write(x.ts, &x.data).unwrap();
    }
    w.finish().unwrap();
    let _ = p;
    let out = Command::new(env!("CARGO_BIN_EXE_comparer"))
        .arg("replay")
        .arg("--primary")
        .arg(fixture("guest-primary.pcap"))
        .arg("--secondary")
        .arg(&sp)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("checkpoints          1  (payload_differs 1)"),
        "{stdout}"
    );
    assert!(stdout.contains("first divergence     at "), "{stdout}");
    assert!(stdout.contains("payload differs at byte"), "{stdout}");
    // Truncated input: non-zero, names the file and offset.
    let bytes = std::fs::read(&sp).unwrap();
    let bad = dir.path().join("bad.pcap");
    std::fs::write(&bad, &bytes[..bytes.len() - 5]).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_comparer"))
        .arg("replay")
        .arg("--primary")
        .arg(&bad)
        .arg("--secondary")
        .arg(&sp)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("bad.pcap: truncated at byte offset"),
        "{stderr}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_comparer"))
        .args(["replay", "--primary", "x.pcap"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
