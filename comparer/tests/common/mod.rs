//! Shared helpers of the replay tests: synthetic guest traffic and variants derived from a
//! capture (changed byte, dropped, delayed, retransmitted, reordered, re-segmented).
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use colo_proto::packet::build::{Link, TcpSegment, tcp_frame};
use colo_proto::packet::{TcpFlags, parse_ethernet};
use comparer::engine::{CheckpointReason, CompareConfig, ReleaseReason};
use comparer::pcap::Packet;
use comparer::replay::{NoSink, ReplayOptions, ReplayReport, Timestamps, replay};

pub const SYN: u16 = TcpFlags::SYN;
pub const ACK: u16 = TcpFlags::ACK;
pub const FIN: u16 = TcpFlags::FIN;
pub const PSH: u16 = TcpFlags::PSH;

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The guest's egress of one HTTP-like exchange as a TCP server: SYN-ACK, ACK of the request,
/// a response in `chunks`, FIN. `isn` is the guest's ISN; times start at `t0`.
pub fn http_server_egress(
    link: &Link,
    guest: SocketAddr,
    client: SocketAddr,
    isn: u32,
    response: &[u8],
    chunks: &[usize],
    t0: Duration,
) -> Vec<Packet> {
    let mut out = Vec::new();
    let mut t = t0;
    let mut push = |seq: u32, flags: u16, payload: &[u8], t: Duration| {
        out.push(Packet {
            ts: t,
            data: tcp_frame(
                link,
                &TcpSegment {
                    src: guest,
                    dst: client,
                    seq,
                    ack: 5000,
                    flags,
                    window: 64000,
                    payload,
                },
            ),
            offset: 0,
        })
    };
    push(isn, SYN | ACK, b"", t);
    t += ms(1);
    push(isn.wrapping_add(1), ACK, b"", t);
    let mut off = 0usize;
    let mut ci = 0;
    while off < response.len() {
        let n = chunks
            .get(ci)
            .copied()
            .unwrap_or(1448)
            .min(response.len() - off);
        ci += 1;
        t += ms(1);
        push(
            isn.wrapping_add(1 + off as u32),
            ACK | PSH,
            &response[off..off + n],
            t,
        );
        off += n;
    }
    t += ms(1);
    push(
        isn.wrapping_add(1 + response.len() as u32),
        FIN | ACK,
        b"",
        t,
    );
    out
}

pub fn response(len: usize) -> Vec<u8> {
    let mut r = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n".to_vec();
    while r.len() < len {
        r.push(b'a' + (r.len() % 26) as u8);
    }
    r
}

/// Indices of TCP segments with payload.
pub fn data_segments(p: &[Packet]) -> Vec<usize> {
    p.iter()
        .enumerate()
        .filter(|(_, x)| {
            parse_ethernet(&x.data)
                .tcp()
                .is_some_and(|t| !t.payload.is_empty())
        })
        .map(|(i, _)| i)
        .collect()
}

/// Flips one payload byte of packet `i` (the TCP checksum is not fixed: it is not compared).
pub fn change_payload_byte(p: &mut [Packet], i: usize, at: usize) {
    let pp = parse_ethernet(&p[i].data);
    let ip = pp.ip().expect("ip");
    let t = pp.tcp().expect("tcp");
    let pos = ip.l4_offset + t.header_len + at;
    p[i].data[pos] ^= 0x20;
}

/// Splits TCP segment `i` into two at payload byte `at` (headers rebuilt without options).
pub fn resegment(p: &mut Vec<Packet>, i: usize, at: usize) {
    let pp = parse_ethernet(&p[i].data);
    let ip = *pp.ip().expect("ip");
    let t = pp.tcp().expect("tcp").clone();
    let link = Link {
        src_mac: pp.src_mac,
        dst_mac: pp.dst_mac,
        vlan: pp.vlan(),
    };
    let src = SocketAddr::new(ip.src, t.src_port);
    let dst = SocketAddr::new(ip.dst, t.dst_port);
    let mk = |seq: u32, payload: &[u8]| {
        tcp_frame(
            &link,
            &TcpSegment {
                src,
                dst,
                seq,
                ack: t.ack,
                flags: t.flags.0,
                window: t.window,
                payload,
            },
        )
    };
    let a = mk(t.seq, &t.payload[..at]);
    let b = mk(t.seq.wrapping_add(at as u32), &t.payload[at..]);
    let ts = p[i].ts;
    p[i].data = a;
    p.insert(
        i + 1,
        Packet {
            ts,
            data: b,
            offset: 0,
        },
    );
}

/// Moves packet `i` later by `by` (re-sorting by time).
pub fn delay(p: &mut Vec<Packet>, i: usize, by: Duration) {
    let mut x = p.remove(i);
    x.ts += by;
    let pos = p.iter().position(|q| q.ts > x.ts).unwrap_or(p.len());
    p.insert(pos, x);
}

/// Retransmits packet `i` `after` later.
pub fn retransmit(p: &mut Vec<Packet>, i: usize, after: Duration) {
    let mut x = p[i].clone();
    x.ts += after;
    let pos = p.iter().position(|q| q.ts > x.ts).unwrap_or(p.len());
    p.insert(pos, x);
}

/// Swaps packets `i` and `j` (keeping the timestamps in place).
pub fn reorder(p: &mut [Packet], i: usize, j: usize) {
    let (ti, tj) = (p[i].ts, p[j].ts);
    p.swap(i, j);
    p[i].ts = ti;
    p[j].ts = tj;
}

pub fn run(primary: &[Packet], secondary: &[Packet]) -> ReplayReport {
    let opts = ReplayOptions {
        cfg: CompareConfig::default(),
        vnet_hdr_len: 12,
        timestamps: Timestamps::Relative,
    };
    replay(primary, secondary, &opts, &mut NoSink).expect("replay")
}

/// Asserts that every primary frame was released exactly once.
pub fn assert_all_released(r: &ReplayReport) {
    let mut idx: Vec<usize> = r.released.iter().map(|x| x.index).collect();
    idx.sort_unstable();
    assert_eq!(
        idx,
        (0..r.primary_frames).collect::<Vec<_>>(),
        "released: {:?}",
        r.released
    );
}

pub fn reasons(r: &ReplayReport) -> Vec<&'static str> {
    r.checkpoints.iter().map(|(_, c)| c.name()).collect()
}

pub fn release_reasons(r: &ReplayReport) -> Vec<ReleaseReason> {
    r.released.iter().map(|x| x.reason).collect()
}

pub fn first_reason(r: &ReplayReport) -> &CheckpointReason {
    &r.checkpoints.first().expect("a checkpoint").1
}

/// Rebuilds every IPv4 TCP frame as IPv6 (fd00::<last IPv4 octet>), keeping ports, sequence
/// numbers, flags and payload; other frames stay as they are.
pub fn to_ipv6(p: &[Packet]) -> Vec<Packet> {
    use std::net::{IpAddr, Ipv6Addr};
    let v6 = |a: IpAddr| match a {
        IpAddr::V4(a) => IpAddr::V6(Ipv6Addr::new(
            0xfd00,
            0,
            0,
            0,
            0,
            0,
            0,
            u16::from(a.octets()[3]),
        )),
        a => a,
    };
    p.iter()
        .map(|x| {
            let pp = parse_ethernet(&x.data);
            let (Some(ip), Some(t)) = (pp.ip(), pp.tcp()) else {
                return x.clone();
            };
            let data = tcp_frame(
                &Link {
                    src_mac: pp.src_mac,
                    dst_mac: pp.dst_mac,
                    vlan: pp.vlan(),
                },
                &TcpSegment {
                    src: SocketAddr::new(v6(ip.src), t.src_port),
                    dst: SocketAddr::new(v6(ip.dst), t.dst_port),
                    seq: t.seq,
                    ack: t.ack,
                    flags: t.flags.0,
                    window: t.window,
                    payload: t.payload,
                },
            );
            Packet {
                ts: x.ts,
                data,
                offset: x.offset,
            }
        })
        .collect()
}

/// Stream offset (bytes after the SYN) of payload byte `at` of TCP packet `i`, given the
/// connection's SYN-ACK in the same capture.
pub fn stream_offset(p: &[Packet], i: usize, at: usize) -> u64 {
    let t = parse_ethernet(&p[i].data).tcp().expect("tcp").clone();
    let key = parse_ethernet(&p[i].data).conn_key();
    let isn = p
        .iter()
        .find_map(|x| {
            let pp = parse_ethernet(&x.data);
            (pp.conn_key() == key && pp.tcp().is_some_and(|t| t.flags.syn()))
                .then(|| pp.tcp().expect("tcp").seq)
        })
        .expect("a SYN-ACK");
    u64::from(t.seq.wrapping_sub(isn).wrapping_sub(1)) + at as u64
}
