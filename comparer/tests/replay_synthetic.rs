//! Offline replay on synthetic captures (built with real TCP/UDP/ICMP/ARP encodings): the
//! expected decisions for identical runs with different ISNs and for each kind of variant.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use colo_proto::packet::build::{Link, arp_frame, icmp_echo_frame, udp_frame};
use common::*;
use comparer::engine::{CheckpointReason, DropReason, Flow, ReleaseReason, Side};
use comparer::pcap::Packet;

fn guest() -> SocketAddr {
    "10.0.2.15:80".parse().unwrap()
}
fn client() -> SocketAddr {
    "10.0.2.2:40123".parse().unwrap()
}

/// Two runs of the same HTTP exchange; the guests chose different ISNs (one wraps).
fn pair(chunks_p: &[usize], chunks_s: &[usize]) -> (Vec<Packet>, Vec<Packet>) {
    let body = response(5000);
    let l = Link::default();
    let p = http_server_egress(&l, guest(), client(), 0xffff_f000, &body, chunks_p, ms(0));
    let s = http_server_egress(&l, guest(), client(), 0x1234_5678, &body, chunks_s, ms(2));
    (p, s)
}

#[test]
fn identical_runs_with_different_isn_release_everything_without_checkpoint() {
    let (p, s) = pair(&[], &[]);
    let r = run(&p, &s);
    assert_eq!(reasons(&r), Vec::<&str>::new());
    assert_all_released(&r);
    use ReleaseReason::*;
    assert_eq!(
        release_reasons(&r),
        vec![
            Matched, PureAck, Matched, Matched, Matched, Matched, Matched
        ]
    );
    assert!(
        r.dropped
            .iter()
            .all(|(_, d)| *d == DropReason::Matched || *d == DropReason::PureAck)
    );
    assert_eq!(r.dropped.len(), s.len());
}

#[test]
fn differently_segmented_streams_match() {
    let (p, s) = pair(&[5000], &[100, 1448, 1000, 7]);
    let r = run(&p, &s);
    assert_eq!(reasons(&r), Vec::<&str>::new());
    assert_all_released(&r);
    assert_eq!(
        r.stats.released_matched, 3,
        "SYN-ACK, one 5000-byte segment, FIN"
    );
    let (mut p, s) = pair(&[], &[]);
    let i = data_segments(&p)[1];
    resegment(&mut p, i, 3);
    let r = run(&p, &s);
    assert_eq!(reasons(&r), Vec::<&str>::new());
    assert_all_released(&r);
}

#[test]
fn changed_payload_byte_is_a_payload_difference_at_that_offset() {
    let (p, mut s) = pair(&[], &[]);
    let i = data_segments(&s)[1];
    change_payload_byte(&mut s, i, 10);
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
    assert_eq!(*byte_offset, 1448 + 10);
    assert_eq!(k.src_port, 80);
    assert_eq!(primary_excerpt[0] ^ 0x20, secondary_excerpt[0]);
    assert_eq!(&primary_excerpt[1..], &secondary_excerpt[1..]);
    // The differing frame is released by the checkpoint, everything after compares again.
    assert_all_released(&r);
    let by_index: Vec<(usize, ReleaseReason)> =
        r.released.iter().map(|x| (x.index, x.reason)).collect();
    assert!(
        by_index.contains(&(i, ReleaseReason::Flushed)),
        "{by_index:?}"
    );
    assert_eq!(r.stats.released_flushed, 1);
}

#[test]
fn dropped_secondary_segment_times_out() {
    let (p, mut s) = pair(&[], &[]);
    let i = data_segments(&s)[0];
    s.remove(i);
    let r = run(&p, &s);
    assert_eq!(reasons(&r), vec!["timeout"]);
    let CheckpointReason::Timeout {
        side, waited_ms, ..
    } = first_reason(&r)
    else {
        panic!()
    };
    assert_eq!((*side, *waited_ms), (Side::Primary, 3000));
    // It fired exactly compare_timeout after the unmatched primary frame arrived.
    assert_eq!(r.checkpoints[0].0, ms(2) + ms(3000));
    assert_all_released(&r);
}

#[test]
fn delayed_past_timeout_then_arriving_late_is_dropped_as_stale() {
    let (p, mut s) = pair(&[], &[]);
    let i = data_segments(&s)[0];
    delay(&mut s, i, ms(4000));
    let r = run(&p, &s);
    assert_eq!(reasons(&r), vec!["timeout"]);
    assert_all_released(&r);
    assert!(
        r.dropped
            .iter()
            .any(|(j, d)| *j == s.len() - 1 && *d == DropReason::AlreadyVerified),
        "{:?}",
        r.dropped
    );
    // Delayed but within the timeout: no checkpoint.
    let (p, mut s) = pair(&[], &[]);
    let i = data_segments(&s)[0];
    delay(&mut s, i, ms(2000));
    let r = run(&p, &s);
    assert_eq!(reasons(&r), Vec::<&str>::new());
    assert_all_released(&r);
}

#[test]
fn retransmissions_and_reordering_need_no_checkpoint() {
    let (mut p, mut s) = pair(&[], &[]);
    let i = data_segments(&p)[1];
    retransmit(&mut p, i, ms(200));
    let j = data_segments(&s)[2];
    retransmit(&mut s, j, ms(100));
    let r = run(&p, &s);
    assert_eq!(reasons(&r), Vec::<&str>::new());
    assert_all_released(&r);
    assert_eq!(r.stats.released_already_verified, 1);
    let (p, mut s) = pair(&[], &[]);
    let d = data_segments(&s);
    reorder(&mut s, d[0], d[2]);
    let r = run(&p, &s);
    assert_eq!(reasons(&r), Vec::<&str>::new());
    assert_all_released(&r);
}

#[test]
fn ipv6_vlan_udp_icmp_and_arp_are_compared() {
    let l = Link {
        vlan: Some(100),
        ..Link::default()
    };
    let g6: SocketAddr = "[fd00::15]:80".parse().unwrap();
    let c6: SocketAddr = "[fd00::2]:50000".parse().unwrap();
    let body = response(3000);
    let mut p = http_server_egress(&l, g6, c6, 7, &body, &[], ms(0));
    let mut s = http_server_egress(&l, g6, c6, 99_999, &body, &[1000, 2000], ms(1));
    let g = IpAddr::V4(Ipv4Addr::new(10, 0, 2, 15));
    let c = IpAddr::V4(Ipv4Addr::new(10, 0, 2, 2));
    let dns = udp_frame(
        &Link::default(),
        "10.0.2.15:5353".parse().unwrap(),
        "10.0.2.3:53".parse().unwrap(),
        b"query",
    );
    let echo = icmp_echo_frame(&Link::default(), g, c, false, 1, 1, b"pong");
    let arp = arp_frame(
        &Link::default(),
        1,
        Ipv4Addr::new(10, 0, 2, 15),
        [0; 6],
        Ipv4Addr::new(10, 0, 2, 2),
    );
    for (t, f) in [(20, dns), (21, echo), (22, arp)] {
        p.push(Packet {
            ts: ms(t),
            data: f.clone(),
            offset: 0,
        });
        s.push(Packet {
            ts: ms(t + 1),
            data: f,
            offset: 0,
        });
    }
    let r = run(&p, &s);
    assert_eq!(reasons(&r), Vec::<&str>::new());
    assert_all_released(&r);
    assert_eq!(r.stats.connections_total, 4);
    // An ARP reply that differs is caught (QEMU would release it uncompared).
    let mut s2 = s.clone();
    let last = s2.len() - 1;
    s2[last].data = arp_frame(
        &Link::default(),
        1,
        Ipv4Addr::new(10, 0, 2, 16),
        [0; 6],
        Ipv4Addr::new(10, 0, 2, 2),
    );
    let r = run(&p, &s2);
    assert_eq!(reasons(&r), vec!["payload_differs"]);
    assert!(matches!(
        first_reason(&r),
        CheckpointReason::PayloadDiffers {
            conn: Flow::Arp { vlan: None },
            ..
        }
    ));
    assert_all_released(&r);
    // IPv6 payload difference on the VLAN.
    let mut s3 = s.clone();
    let i = data_segments(&s3)[1];
    change_payload_byte(&mut s3, i, 0);
    let r = run(&p, &s3);
    // The secondary segment that differed also carried bytes of the primary's next segment;
    // it is gone with the checkpoint and a capture never resends it, so that primary segment
    // times out (live, the secondary would resend from the checkpointed state).
    assert_eq!(reasons(&r), vec!["payload_differs", "timeout"]);
    assert_all_released(&r);
    let CheckpointReason::PayloadDiffers {
        conn: Flow::Ip(k),
        byte_offset,
        ..
    } = first_reason(&r)
    else {
        panic!()
    };
    assert_eq!(
        (k.vlan, k.src.is_ipv6(), *byte_offset),
        (Some(100), true, 1000)
    );
}
