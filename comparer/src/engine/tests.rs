use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use colo_proto::frame::Frame;
use colo_proto::packet::TcpFlags;
use colo_proto::packet::build::{
    Link, TcpSegment, arp_frame, icmp_echo_frame, tcp_frame, udp_frame,
};

use super::*;

const SYN: u16 = TcpFlags::SYN;
const ACK: u16 = TcpFlags::ACK;
const FIN: u16 = TcpFlags::FIN;
const RST: u16 = TcpFlags::RST;
const PSH: u16 = TcpFlags::PSH;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn guest() -> SocketAddr {
    "10.0.0.2:80".parse().unwrap()
}
fn client() -> SocketAddr {
    "10.0.0.1:40000".parse().unwrap()
}

/// A guest-egress TCP segment of the server side.
fn seg(seq: u32, flags: u16, payload: &[u8]) -> Frame {
    Frame::ethernet(tcp_frame(
        &Link::default(),
        &TcpSegment {
            src: guest(),
            dst: client(),
            seq,
            ack: 1000,
            flags,
            window: 1000,
            payload,
        },
    ))
}

#[derive(Debug, PartialEq, Eq)]
enum D {
    Rel(ReleaseReason),
    Drop(DropReason),
    Ckpt(&'static str),
}

fn summary(e: &mut Engine) -> Vec<D> {
    e.take_decisions()
        .into_iter()
        .map(|d| match d {
            Decision::Release { reason, .. } => D::Rel(reason),
            Decision::DropSecondary { reason, .. } => D::Drop(reason),
            Decision::Checkpoint { reason } => D::Ckpt(reason.name()),
        })
        .collect()
}

fn engine() -> Engine {
    Engine::new(CompareConfig::default())
}

#[test]
fn handshake_with_different_isn_aligns_and_matches() {
    let mut e = engine();
    let (pi, si) = (0xffff_fff0u32, 12345u32); // primary ISN wraps within the stream
    e.on_primary(seg(pi, SYN | ACK, b""), ms(0));
    assert_eq!(summary(&mut e), vec![], "SYN-ACK waits for its twin");
    e.on_secondary(seg(si, SYN | ACK, b""), ms(1));
    assert_eq!(
        summary(&mut e),
        vec![D::Rel(ReleaseReason::Matched), D::Drop(DropReason::Matched)]
    );
    let body = vec![7u8; 100];
    e.on_primary(seg(pi.wrapping_add(1), ACK | PSH, &body), ms(2));
    e.on_secondary(seg(si + 1, ACK | PSH, &body), ms(3));
    assert_eq!(
        summary(&mut e),
        vec![D::Rel(ReleaseReason::Matched), D::Drop(DropReason::Matched)]
    );
    e.on_primary(seg(pi.wrapping_add(101), FIN | ACK, b""), ms(4));
    e.on_secondary(seg(si + 101, FIN | ACK, b""), ms(5));
    assert_eq!(
        summary(&mut e),
        vec![D::Rel(ReleaseReason::Matched), D::Drop(DropReason::Matched)]
    );
    let s = e.stats();
    assert_eq!(
        (s.released_matched, s.primary_queued, s.secondary_queued),
        (3, 0, 0)
    );
    assert_eq!(s.checkpoints, CheckpointCounts::default());
}

#[test]
fn handshake_with_different_isn_and_rewritten_secondary_matches() {
    // filter-rewriter: the secondary's SYN-ACK keeps its own ISN, every later segment is
    // already in the primary's sequence space.
    let mut e = engine();
    let (pi, si) = (0xffff_fff0u32, 12345u32);
    e.on_primary(seg(pi, SYN | ACK, b""), ms(0));
    e.on_secondary(seg(si, SYN | ACK, b""), ms(1));
    assert_eq!(
        summary(&mut e),
        vec![D::Rel(ReleaseReason::Matched), D::Drop(DropReason::Matched)]
    );
    let body = vec![7u8; 100];
    // Secondary first this time: it must be neither dropped nor mis-aligned.
    e.on_secondary(seg(pi.wrapping_add(1), ACK | PSH, &body), ms(2));
    assert_eq!(summary(&mut e), vec![]);
    e.on_primary(seg(pi.wrapping_add(1), ACK | PSH, &body), ms(3));
    assert_eq!(
        summary(&mut e),
        vec![D::Rel(ReleaseReason::Matched), D::Drop(DropReason::Matched)]
    );
    e.on_primary(seg(pi.wrapping_add(101), ACK | PSH, b"more"), ms(4));
    e.on_secondary(seg(pi.wrapping_add(101), ACK | PSH, b"more"), ms(5));
    e.on_primary(seg(pi.wrapping_add(105), FIN | ACK, b""), ms(6));
    e.on_secondary(seg(pi.wrapping_add(105), FIN | ACK, b""), ms(7));
    assert_eq!(
        summary(&mut e),
        vec![
            D::Rel(ReleaseReason::Matched),
            D::Drop(DropReason::Matched),
            D::Rel(ReleaseReason::Matched),
            D::Drop(DropReason::Matched)
        ]
    );
    // Nothing waits, so no timeout can follow.
    e.on_tick(ms(10_000));
    assert_eq!(summary(&mut e), vec![]);
    let s = e.stats();
    assert_eq!(
        (s.released_matched, s.primary_queued, s.secondary_queued),
        (4, 0, 0)
    );
    assert_eq!(s.checkpoints, CheckpointCounts::default());
}

#[test]
fn differently_segmented_streams_match_without_leftovers() {
    let mut e = engine();
    e.on_primary(seg(100, SYN | ACK, b""), ms(0));
    e.on_secondary(seg(900, SYN | ACK, b""), ms(0));
    let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    // Primary: one 3000-byte GSO frame; secondary: 1000 + 1500 + 500.
    e.on_secondary(seg(901, ACK, &data[..1000]), ms(1));
    e.on_primary(seg(101, ACK, &data), ms(2));
    e.on_secondary(seg(1901, ACK, &data[1000..2500]), ms(3));
    assert_eq!(e.stats().primary_queued, 1, "primary waits for the rest");
    e.on_secondary(seg(3401, ACK, &data[2500..]), ms(4));
    let d = summary(&mut e);
    assert_eq!(
        d.iter()
            .filter(|x| **x == D::Rel(ReleaseReason::Matched))
            .count(),
        2
    );
    assert_eq!(
        d.iter()
            .filter(|x| **x == D::Drop(DropReason::Matched))
            .count(),
        4
    );
    let s = e.stats();
    assert_eq!((s.primary_queued, s.secondary_queued), (0, 0));
    // Reverse: primary in small pieces, secondary one big frame.
    e.on_secondary(seg(3901, ACK, &data), ms(5));
    e.on_primary(seg(3101, ACK, &data[..10]), ms(6));
    e.on_primary(seg(3111, ACK, &data[10..]), ms(7));
    assert_eq!(
        summary(&mut e),
        vec![
            D::Rel(ReleaseReason::Matched),
            D::Rel(ReleaseReason::Matched),
            D::Drop(DropReason::Matched)
        ]
    );
    e.on_tick(ms(10_000));
    assert_eq!(
        summary(&mut e),
        vec![],
        "no stale secondary segment times out"
    );
}

#[test]
fn payload_difference_reports_stream_offset_and_excerpts() {
    let mut e = engine();
    e.on_primary(seg(0, SYN | ACK, b""), ms(0));
    e.on_secondary(seg(5000, SYN | ACK, b""), ms(0));
    summary(&mut e);
    e.on_primary(seg(1, ACK, b"HTTP/1.0 200 OK\r\n"), ms(1));
    e.on_secondary(seg(5001, ACK, b"HTTP/1.0 500 OK\r\n"), ms(1));
    let d = e.take_decisions();
    assert_eq!(d.len(), 2, "{d:?}");
    assert!(matches!(
        d[1],
        Decision::DropSecondary {
            reason: DropReason::AfterDivergence,
            ..
        }
    ));
    let Decision::Checkpoint {
        reason:
            CheckpointReason::PayloadDiffers {
                byte_offset,
                primary_excerpt,
                secondary_excerpt,
                ..
            },
    } = &d[0]
    else {
        panic!("{d:?}")
    };
    assert_eq!(*byte_offset, 9);
    assert_eq!(primary_excerpt, b"200 OK\r\n");
    assert_eq!(secondary_excerpt, b"500 OK\r\n");
    // Held until the checkpoint; then released, and the stream compares again.
    e.on_primary(seg(18, ACK, b"more"), ms(2));
    assert_eq!(summary(&mut e), vec![]);
    e.on_secondary(seg(5018, ACK, b"more"), ms(2));
    assert_eq!(summary(&mut e), vec![D::Drop(DropReason::AfterDivergence)]);
    assert!(e.checkpoint_pending());
    e.keep_seq_alignment_across_checkpoints(true);
    e.checkpoint_done(ms(3));
    assert_eq!(
        summary(&mut e),
        vec![
            D::Rel(ReleaseReason::Flushed),
            D::Rel(ReleaseReason::Flushed)
        ]
    );
    e.on_primary(seg(22, ACK, b"next"), ms(4));
    e.on_secondary(seg(5022, ACK, b"next"), ms(4));
    assert_eq!(
        summary(&mut e),
        vec![D::Rel(ReleaseReason::Matched), D::Drop(DropReason::Matched)]
    );
}

#[test]
fn live_checkpoint_resets_offset_to_zero() {
    let mut e = engine();
    e.on_primary(seg(0, SYN | ACK, b""), ms(0));
    e.on_secondary(seg(5000, SYN | ACK, b""), ms(0));
    e.on_primary(seg(1, ACK, b"a"), ms(1));
    e.on_secondary(seg(5001, ACK, b"b"), ms(1));
    e.checkpoint_done(ms(2));
    summary(&mut e);
    // After a live checkpoint the secondary is a copy of the primary: same sequence numbers.
    e.on_primary(seg(2, ACK, b"c"), ms(3));
    e.on_secondary(seg(2, ACK, b"c"), ms(3));
    assert_eq!(
        summary(&mut e),
        vec![D::Rel(ReleaseReason::Matched), D::Drop(DropReason::Matched)]
    );
}

#[test]
fn missing_secondary_segment_times_out_at_compare_timeout() {
    let mut e = engine();
    e.on_primary(seg(0, SYN | ACK, b""), ms(0));
    e.on_secondary(seg(0, SYN | ACK, b""), ms(0));
    summary(&mut e);
    e.on_primary(seg(1, ACK, b"one"), ms(10));
    e.on_primary(seg(4, ACK, b"two"), ms(11));
    e.on_secondary(seg(4, ACK, b"two"), ms(12)); // "one" never comes: a gap, waited for
    assert_eq!(summary(&mut e), vec![]);
    assert_eq!(e.next_deadline(), Some(ms(1000)), "expiry scan first");
    e.on_tick(ms(1000));
    assert_eq!(e.next_deadline(), Some(ms(2000)));
    e.on_tick(ms(2000));
    e.on_tick(ms(3000));
    assert_eq!(e.next_deadline(), Some(ms(3010)));
    e.on_tick(ms(3010));
    let d = e.take_decisions();
    assert!(
        matches!(
            &d[..],
            [Decision::Checkpoint {
                reason: CheckpointReason::Timeout {
                    side: Side::Primary,
                    waited_ms: 3000,
                    ..
                }
            }]
        ),
        "{d:?}"
    );
    e.on_tick(ms(3020));
    assert_eq!(summary(&mut e), vec![], "coalesced while outstanding");
    e.checkpoint_done(ms(3100));
    assert_eq!(
        summary(&mut e),
        vec![
            D::Rel(ReleaseReason::Flushed),
            D::Rel(ReleaseReason::Flushed),
            D::Drop(DropReason::Flushed)
        ]
    );
}

#[test]
fn pure_acks_leave_in_order_and_retransmissions_are_released() {
    let mut e = engine();
    e.on_primary(seg(0, SYN | ACK, b""), ms(0));
    e.on_secondary(seg(0, SYN | ACK, b""), ms(0));
    summary(&mut e);
    e.on_primary(seg(1, ACK, b""), ms(1));
    assert_eq!(summary(&mut e), vec![D::Rel(ReleaseReason::PureAck)]);
    e.on_primary(seg(1, ACK, b"data"), ms(2));
    e.on_primary(seg(5, ACK, b""), ms(3)); // pure ACK behind held data waits
    assert_eq!(summary(&mut e), vec![]);
    e.on_secondary(seg(1, ACK, b""), ms(3));
    assert_eq!(summary(&mut e), vec![D::Drop(DropReason::PureAck)]);
    e.on_secondary(seg(1, ACK, b"data"), ms(4));
    assert_eq!(
        summary(&mut e),
        vec![
            D::Rel(ReleaseReason::Matched),
            D::Drop(DropReason::Matched),
            D::Rel(ReleaseReason::PureAck)
        ]
    );
    e.on_primary(seg(1, ACK, b"data"), ms(5));
    e.on_secondary(seg(1, ACK, b"data"), ms(6));
    assert_eq!(
        summary(&mut e),
        vec![
            D::Rel(ReleaseReason::AlreadyVerified),
            D::Drop(DropReason::AlreadyVerified)
        ]
    );
}

#[test]
fn fin_against_data_and_rst_are_compared() {
    let mut e = engine();
    e.on_primary(seg(0, SYN | ACK, b""), ms(0));
    e.on_secondary(seg(0, SYN | ACK, b""), ms(0));
    e.on_primary(seg(1, FIN | ACK, b""), ms(1));
    e.on_secondary(seg(1, ACK, b"x"), ms(1));
    let d = e.take_decisions();
    assert!(
        matches!(
            d.get(2),
            Some(Decision::Checkpoint {
                reason: CheckpointReason::TcpControlDiffers {
                    primary: "fin",
                    secondary: "data",
                    byte_offset: 0,
                    ..
                }
            })
        ),
        "{d:?}"
    );
    e.checkpoint_done(ms(2));
    summary(&mut e);
    e.on_primary(seg(2, RST | ACK, b""), ms(3));
    assert_eq!(summary(&mut e), vec![], "RST waits for the secondary's RST");
    e.on_secondary(seg(2, RST | ACK, b""), ms(3));
    assert_eq!(
        summary(&mut e),
        vec![D::Rel(ReleaseReason::Matched), D::Drop(DropReason::Matched)]
    );
}

#[test]
fn udp_icmp_arp_ipv6_vlan_are_compared_fifo() {
    let mut e = engine();
    let a: SocketAddr = "[fd00::2]:53".parse().unwrap();
    let b: SocketAddr = "[fd00::1]:5353".parse().unwrap();
    let vlan = Link {
        vlan: Some(5),
        ..Link::default()
    };
    let u1 = Frame::ethernet(udp_frame(&vlan, a, b, b"one"));
    let u2 = Frame::ethernet(udp_frame(&vlan, a, b, b"two"));
    // Primary-side reordering relative to the secondary is waited for, FIFO release.
    e.on_primary(u1.clone(), ms(0));
    e.on_primary(u2.clone(), ms(0));
    e.on_secondary(u2.clone(), ms(1));
    assert_eq!(summary(&mut e), vec![]);
    e.on_secondary(u1.clone(), ms(2));
    let d = e.take_decisions();
    let released: Vec<&Frame> = d
        .iter()
        .filter_map(|x| match x {
            Decision::Release { frame, .. } => Some(frame),
            _ => None,
        })
        .collect();
    assert_eq!(released, vec![&u1, &u2]);
    // ICMP with padding differences still matches; a different echo payload does not.
    let (g, c) = (
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
    );
    let i1 = icmp_echo_frame(&Link::default(), g, c, false, 7, 1, b"ping");
    let mut i1pad = i1.clone();
    i1pad.resize(60, 0xee);
    e.on_primary(Frame::ethernet(i1.clone()), ms(3));
    e.on_secondary(Frame::ethernet(i1pad), ms(3));
    assert_eq!(
        summary(&mut e),
        vec![D::Drop(DropReason::Matched), D::Rel(ReleaseReason::Matched)]
    );
    let arp_p = arp_frame(
        &Link::default(),
        2,
        Ipv4Addr::new(10, 0, 0, 2),
        [1; 6],
        Ipv4Addr::new(10, 0, 0, 1),
    );
    let arp_s = arp_frame(
        &Link::default(),
        2,
        Ipv4Addr::new(10, 0, 0, 3),
        [1; 6],
        Ipv4Addr::new(10, 0, 0, 1),
    );
    e.on_primary(Frame::ethernet(arp_p), ms(4));
    e.on_secondary(Frame::ethernet(arp_s), ms(4));
    let d = e.take_decisions();
    assert!(
        matches!(
            &d[..],
            [
                Decision::Checkpoint {
                    reason: CheckpointReason::PayloadDiffers {
                        conn: Flow::Arp { vlan: None },
                        byte_offset: 17,
                        ..
                    }
                },
                Decision::DropSecondary { .. }
            ]
        ),
        "{d:?}"
    );
}

#[test]
fn full_queue_requests_checkpoint_and_never_loses_primary_frames() {
    let mut e = Engine::new(CompareConfig {
        max_queue_size: 4,
        ..CompareConfig::default()
    });
    let g: SocketAddr = "10.0.0.2:9".parse().unwrap();
    let frames: Vec<Frame> = (0..10u8)
        .map(|i| Frame::ethernet(udp_frame(&Link::default(), g, client(), &[i])))
        .collect();
    for f in &frames {
        e.on_primary(f.clone(), ms(0));
    }
    let d = e.take_decisions();
    let ck = d
        .iter()
        .filter(|x| matches!(x, Decision::Checkpoint { .. }))
        .count();
    assert_eq!(ck, 1, "one (coalesced) request: {d:?}");
    assert!(matches!(
        d[0],
        Decision::Checkpoint {
            reason: CheckpointReason::QueueFull {
                side: Side::Primary,
                ..
            }
        }
    ));
    let overflow: Vec<&Frame> = d
        .iter()
        .filter_map(|x| match x {
            Decision::Release {
                frame,
                reason: ReleaseReason::Overflow,
                ..
            } => Some(frame),
            _ => None,
        })
        .collect();
    assert_eq!(overflow, vec![&frames[0], &frames[1]]);
    e.checkpoint_done(ms(1));
    let rest: Vec<Frame> = e
        .take_decisions()
        .into_iter()
        .filter_map(|x| match x {
            Decision::Release { frame, .. } => Some(frame),
            _ => None,
        })
        .collect();
    assert_eq!(rest, frames[2..].to_vec());
    assert_eq!(e.stats().released, 10);
}

#[test]
fn idle_flows_expire() {
    let mut e = engine();
    let g: SocketAddr = "10.0.0.2:9".parse().unwrap();
    let f = Frame::ethernet(udp_frame(&Link::default(), g, client(), b"x"));
    e.on_primary(f.clone(), ms(0));
    e.on_secondary(f, ms(0));
    assert_eq!(e.stats().connections, 1);
    e.on_tick(ms(1000));
    assert_eq!(e.stats().connections, 1);
    e.on_tick(IDLE_FLOW_EXPIRY + ms(1));
    assert_eq!(e.stats().connections, 0);
    assert_eq!(e.stats().connections_expired, 1);
    assert_eq!(e.next_deadline(), None);
}

#[test]
fn secondary_only_output_times_out() {
    let mut e = engine();
    let g: SocketAddr = "10.0.0.2:9".parse().unwrap();
    e.on_secondary(
        Frame::ethernet(udp_frame(&Link::default(), g, client(), b"x")),
        ms(0),
    );
    e.on_tick(ms(3000));
    let d = e.take_decisions();
    assert!(
        matches!(
            &d[..],
            [Decision::Checkpoint {
                reason: CheckpointReason::Timeout {
                    side: Side::Secondary,
                    ..
                }
            }]
        ),
        "{d:?}"
    );
}

#[test]
fn ethernet_padding_is_not_tcp_payload() {
    let mut e = engine();
    e.on_primary(seg(0, SYN | ACK, b""), ms(0));
    e.on_secondary(seg(0, SYN | ACK, b""), ms(0));
    summary(&mut e);
    // A pure ACK padded to the 60-byte Ethernet minimum with garbage is still a pure ACK
    // (QEMU counts the padding as payload).
    let mut padded = seg(1, ACK, b"");
    padded.payload.resize(60, 0xee);
    e.on_primary(padded, ms(1));
    assert_eq!(summary(&mut e), vec![D::Rel(ReleaseReason::PureAck)]);
    let mut p = seg(1, ACK, b"ab");
    p.payload.resize(60, 0x11);
    let mut s = seg(1, ACK, b"ab");
    s.payload.resize(60, 0x22);
    e.on_primary(p, ms(2));
    e.on_secondary(s, ms(2));
    assert_eq!(
        summary(&mut e),
        vec![D::Rel(ReleaseReason::Matched), D::Drop(DropReason::Matched)]
    );
}

#[test]
fn outstanding_checkpoint_is_repeated_after_compare_timeout() {
    let mut e = engine();
    let g: SocketAddr = "10.0.0.2:9".parse().unwrap();
    e.on_primary(
        Frame::ethernet(udp_frame(&Link::default(), g, client(), b"a")),
        ms(0),
    );
    e.on_secondary(
        Frame::ethernet(udp_frame(&Link::default(), g, client(), b"b")),
        ms(0),
    );
    assert_eq!(
        summary(&mut e),
        vec![
            D::Ckpt("payload_differs"),
            D::Drop(DropReason::AfterDivergence)
        ]
    );
    // Not done: the primary frame's timeout is held back until the request is overdue.
    assert_eq!(e.next_deadline(), Some(ms(1000)), "expiry scan");
    e.on_tick(ms(1000));
    assert_eq!(e.next_deadline(), Some(ms(2000)));
    e.on_tick(ms(2000));
    e.on_tick(ms(2999));
    assert_eq!(summary(&mut e), vec![]);
    e.on_tick(ms(3000));
    assert_eq!(summary(&mut e), vec![D::Ckpt("timeout")]);
    assert_eq!(e.stats().checkpoints.payload_differs, 1);
    assert_eq!(e.stats().checkpoints.timeout, 1);
}

#[test]
fn secondary_only_syn_ack_retransmission_after_rewriter_is_dropped() {
    // Two guests answer the same client; the secondary's output passes a filter-rewriter (its
    // SYN-ACK keeps its own ISN, later segments are in the primary's space) and the secondary
    // retransmits its SYN-ACK more often than the primary. Its ISN lies above the primary's
    // stream (within 2 GiB), so once the offset resolved to 0 the retransmission's sequence
    // range would be "ahead"; it must still be recognised and dropped, not wait for a twin.
    let mut e = engine();
    let (pi, si) = (1000u32, 1000u32.wrapping_add(0x4000_0000));
    e.on_primary(seg(pi, SYN | ACK, b""), ms(0));
    e.on_secondary(seg(si, SYN | ACK, b""), ms(1));
    assert_eq!(
        summary(&mut e),
        vec![D::Rel(ReleaseReason::Matched), D::Drop(DropReason::Matched)]
    );
    // Retransmitted before the offset is decided, then rewritten data.
    e.on_secondary(seg(si, SYN | ACK, b""), ms(2));
    let body = vec![7u8; 100];
    e.on_secondary(seg(pi + 1, ACK | PSH, &body), ms(3));
    // The primary retransmits once (released), then sends its data.
    e.on_primary(seg(pi, SYN | ACK, b""), ms(4));
    e.on_primary(seg(pi + 1, ACK | PSH, &body), ms(5));
    // Retransmitted again after the offset resolved to 0.
    e.on_secondary(seg(si, SYN | ACK, b""), ms(6));
    e.on_primary(seg(pi + 101, FIN | ACK, b""), ms(7));
    e.on_secondary(seg(pi + 101, FIN | ACK, b""), ms(8));
    let d = summary(&mut e);
    assert_eq!(
        d.iter()
            .filter(|x| **x == D::Drop(DropReason::AlreadyVerified))
            .count(),
        2,
        "{d:?}"
    );
    assert_eq!(
        d.iter()
            .filter(|x| **x == D::Rel(ReleaseReason::Matched))
            .count(),
        2,
        "{d:?}"
    );
    e.on_tick(ms(60_000));
    assert_eq!(summary(&mut e), vec![]);
    let s = e.stats();
    assert_eq!((s.primary_queued, s.secondary_queued), (0, 0));
    assert_eq!(s.checkpoints, CheckpointCounts::default());
}

#[test]
fn secondary_fin_retransmitted_after_close_in_its_own_space_is_dropped() {
    // The secondary's FIN is retransmitted after the primary's FIN was compared and released,
    // and carries the secondary's own sequence number (a filter-rewriter that already forgot
    // the connection). It must not wait for a twin; a FIN with data still counts.
    let mut e = engine();
    let (pi, si) = (1000u32, 1000u32.wrapping_add(0x4000_0000));
    e.on_primary(seg(pi, SYN | ACK, b""), ms(0));
    e.on_secondary(seg(si, SYN | ACK, b""), ms(1));
    let body = vec![7u8; 100];
    e.on_secondary(seg(pi + 1, ACK | PSH, &body), ms(2));
    e.on_primary(seg(pi + 1, ACK | PSH, &body), ms(3));
    e.on_primary(seg(pi + 101, FIN | ACK, b""), ms(4));
    e.on_secondary(seg(pi + 101, FIN | ACK, b""), ms(5));
    let d = summary(&mut e);
    assert_eq!(
        d.iter()
            .filter(|x| **x == D::Rel(ReleaseReason::Matched))
            .count(),
        3,
        "{d:?}"
    );
    e.on_secondary(seg(si + 101, FIN | ACK, b""), ms(1000));
    assert_eq!(summary(&mut e), vec![D::Drop(DropReason::AlreadyVerified)]);
    e.on_tick(ms(60_000));
    assert_eq!(summary(&mut e), vec![]);
    let s = e.stats();
    assert_eq!((s.primary_queued, s.secondary_queued), (0, 0));
    assert_eq!(s.checkpoints, CheckpointCounts::default());
}
