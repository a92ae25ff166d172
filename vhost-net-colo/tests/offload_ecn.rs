//! ECN with TSO (`HOST_ECN` / `GUEST_ECN`, `VIRTIO_NET_HDR_GSO_ECN`) and UDP fragmentation
//! offload (`HOST_UFO`) and USO (`HOST_USO`) through the real backend, the test frontend
//! (a vhost-user frontend with real shared memory) and a real tap with vnet headers in a
//! network namespace the test creates (root, `/dev/net/tun`, `ip netns`; skipped loudly
//! otherwise):
//! - the "guest" opens an ECN TCP connection to a real socket in the namespace and sends
//!   `GSO_ECN` TSO frames: whole to the tap (one packet for the kernel) while the chain is
//!   empty, cut in software (CWR on the first segment only, checksums valid, read back from a
//!   filter-dump) once a filter is in; the socket reads every byte in order;
//! - the kernel's own ECN sender in the namespace: after the guest echoes ECE, the frame that
//!   carries CWR leaves the kernel as a GSO frame with `GSO_ECN` (the tap has `TUN_F_TSO_ECN`)
//!   and reaches a guest that negotiated `GUEST_ECN` whole, and one that did not as plain
//!   segments (CWR on the first only), nothing dropped;
//! - a UFO datagram reaches a UDP socket whole through the tap and as IP fragments cut in
//!   software that the kernel reassembles; a USO frame arrives as separate datagrams;
//! - with a filter-mirror (`vnet_hdr_support=on`) and a filter-rewriter in, ECN and UFO frames
//!   cross the chain whole both ways, the mirror's records carrying their header;
//! - a `stream` netdev (no vnet headers) gets all of them cut in software.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::io::{Read, Write};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::json;
use smoltcp::wire::{IpAddress, IpProtocol, Ipv4Address, Ipv4Packet, TcpPacket, TcpSeqNumber};
use vhost_net_colo::offload::{
    F_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_UDP_L4, VnetHdr, udp_gso_frame,
};
use vhost_net_colo::testing::{NetFrontend, Options};

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0xab, 0xcd, 0x03];
const GUEST_MAC_STR: &str = "52:54:00:ab:cd:03";
const GUEST_IP: Ipv4Address = Ipv4Address::new(10, 0, 2, 15);
const NS_IP: Ipv4Address = Ipv4Address::new(10, 0, 2, 2);
const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;
const ECE: u8 = 0x40;
const CWR: u8 = 0x80;
const GUEST_ECN: u64 = 1 << 9;

/// The namespace with the backend's tap `tap` at 10.0.2.2/24 and the guest's address
/// (10.0.2.15) resolved statically; returns the tap's MAC.
fn setup_ns(ns: &common::NetNs, tap: &str) -> [u8; 6] {
    common::tap_as_peer(ns, tap, Some(GUEST_MAC_STR));
    // This namespace's TCP asks for ECN on connections it opens (per-netns sysctl).
    common::in_netns(ns, || {
        std::fs::write("/proc/sys/net/ipv4/tcp_ecn", "1").unwrap();
    });
    let mac = common::link(ns, tap)["address"]
        .as_str()
        .unwrap()
        .to_string();
    let b: Vec<u8> = mac
        .split(':')
        .map(|x| u8::from_str_radix(x, 16).unwrap())
        .collect();
    b.try_into().unwrap()
}

/// A TCP segment of the guest (10.0.2.15:`sport` → 10.0.2.2:`dport`), ECT(0) when `ect`,
/// an MSS option on SYNs; the TCP checksum complete, or only the pseudo-header sum when
/// `partial` (as a guest with TSO hands it over).
#[allow(clippy::too_many_arguments)]
fn guest_tcp(
    dst_mac: [u8; 6],
    ports: (u16, u16),
    seq: u32,
    ack: u32,
    flags: u8,
    payload: &[u8],
    ect: bool,
    partial: bool,
) -> Vec<u8> {
    let opt = if flags & SYN != 0 { 4 } else { 0 };
    let tcp_len = 20 + opt + payload.len();
    let mut f = vec![0u8; 34 + tcp_len];
    f[..6].copy_from_slice(&dst_mac);
    f[6..12].copy_from_slice(&GUEST_MAC);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    {
        let mut ip = Ipv4Packet::new_unchecked(&mut f[14..]);
        ip.set_version(4);
        ip.set_header_len(20);
        ip.set_total_len((20 + tcp_len) as u16);
        ip.set_ident(seq as u16);
        ip.set_dont_frag(true);
        ip.set_hop_limit(64);
        ip.set_next_header(IpProtocol::Tcp);
        ip.set_src_addr(GUEST_IP);
        ip.set_dst_addr(NS_IP);
        if ect {
            ip.set_ecn(2);
        }
        ip.fill_checksum();
    }
    {
        let mut t = TcpPacket::new_unchecked(&mut f[34..]);
        t.set_src_port(ports.0);
        t.set_dst_port(ports.1);
        t.set_seq_number(TcpSeqNumber(seq as i32));
        t.set_ack_number(TcpSeqNumber(ack as i32));
        t.set_header_len((20 + opt) as u8);
        t.set_window_len(65535);
        t.set_fin(flags & FIN != 0);
        t.set_syn(flags & SYN != 0);
        t.set_psh(flags & PSH != 0);
        t.set_ack(flags & ACK != 0);
        t.set_ece(flags & ECE != 0);
        t.set_cwr(flags & CWR != 0);
    }
    if opt > 0 {
        f[54..58].copy_from_slice(&[2, 4, 0x05, 0xb4]); // MSS 1460
    }
    f[34 + 20 + opt..].copy_from_slice(payload);
    let (src, dst) = (IpAddress::Ipv4(GUEST_IP), IpAddress::Ipv4(NS_IP));
    let mut t = TcpPacket::new_unchecked(&mut f[34..]);
    if partial {
        let mut ph = Vec::new();
        ph.extend_from_slice(&GUEST_IP.octets());
        ph.extend_from_slice(&NS_IP.octets());
        ph.extend_from_slice(&[0, 6]);
        ph.extend_from_slice(&(tcp_len as u16).to_be_bytes());
        t.set_checksum(vhost_net_colo::vnet::ones_complement_sum(&ph));
    } else {
        t.fill_checksum(&src, &dst);
    }
    f
}

/// A received TCP frame of the namespace towards the guest's port `port`.
struct Seg {
    hdr: VnetHdr,
    seq: u32,
    flags: u8,
    len: usize,
    frame: Vec<u8>,
}

fn parse_seg(hdr: &[u8], frame: &[u8], port: u16) -> Option<Seg> {
    parse_seg_from(hdr, frame, NS_IP, port)
}

/// A TCP frame from `src` to port `port`.
fn parse_seg_from(hdr: &[u8], frame: &[u8], src: Ipv4Address, port: u16) -> Option<Seg> {
    if frame.get(12..14)? != [0x08, 0x00] {
        return None;
    }
    let ip = Ipv4Packet::new_checked(frame.get(14..)?).ok()?;
    if ip.next_header() != IpProtocol::Tcp || ip.src_addr() != src {
        return None;
    }
    let t = TcpPacket::new_checked(ip.payload()).ok()?;
    if t.dst_port() != port {
        return None;
    }
    let flags = frame[14 + usize::from(ip.header_len()) + 13];
    Some(Seg {
        hdr: VnetHdr::parse(hdr).ok()?,
        seq: t.seq_number().0 as u32,
        flags,
        len: t.payload().len(),
        frame: frame.to_vec(),
    })
}

/// Waits (up to 10 s) for the next TCP frame towards the guest's `port`.
fn recv_seg(fe: &mut NetFrontend, port: u16, timeout: Duration) -> Option<Seg> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        let (hdr, frame) = fe.recv_vnet(left)?;
        if let Some(s) = parse_seg(&hdr, &frame, port) {
            return Some(s);
        }
    }
    None
}

fn send_plain(fe: &mut NetFrontend, frame: &[u8]) {
    fe.send_vnet(&[0; 12], frame).unwrap();
}

/// Verifies a plain TCP frame's IPv4 and TCP checksums.
fn checksums_ok(frame: &[u8]) -> bool {
    let ip = Ipv4Packet::new_checked(&frame[14..]).unwrap();
    let t = TcpPacket::new_checked(ip.payload()).unwrap();
    ip.verify_checksum()
        && t.verify_checksum(
            &IpAddress::Ipv4(ip.src_addr()),
            &IpAddress::Ipv4(ip.dst_addr()),
        )
}

#[test]
fn ecn_tso_frames_from_the_guest_reach_a_real_socket_whole_or_cut_with_cwr_on_the_first() {
    let Some(ns) = common::netns_with_tun("ecntx") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tap = "ecntxtap0";
    let b = common::spawn_with_tap(dir.path(), &ns, tap, "", &["--mac", GUEST_MAC_STR]);
    let mut qmp = b.qmp();
    let tap_mac = setup_ns(&ns, tap);
    let mut fe = b.frontend(&Options::default());
    for (bit, name) in [(13, "HOST_ECN"), (9, "GUEST_ECN"), (11, "HOST_TSO4")] {
        assert_ne!(fe.features() & (1 << bit), 0, "{name} negotiated");
    }

    const CHUNK: usize = 20_000;
    const GSO: u16 = 1448;
    let data: Vec<u8> = (0..2 * CHUNK).map(|i| (i * 31 + i / 509) as u8).collect();
    let expect = data.clone();
    let (ptx, prx) = mpsc::channel();
    let server = common::spawn_in_netns(&ns, move || {
        let l = std::net::TcpListener::bind("10.0.2.2:0").unwrap();
        ptx.send(l.local_addr().unwrap().port()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut got = vec![0u8; 2 * CHUNK];
        s.read_exact(&mut got).unwrap();
        got
    });
    let port = prx.recv_timeout(Duration::from_secs(10)).unwrap();
    let ports = (40_000, port);
    let isn: u32 = 0xffff_f000; // the sequence numbers wrap during the test

    // ECN-setup SYN (ECE|CWR); the namespace answers with an ECN-setup SYN-ACK (ECE).
    send_plain(
        &mut fe,
        &guest_tcp(tap_mac, ports, isn, 0, SYN | ECE | CWR, &[], false, false),
    );
    let synack = loop {
        let s = recv_seg(&mut fe, 40_000, Duration::from_secs(10)).expect("SYN-ACK");
        if s.flags & SYN != 0 {
            break s;
        }
    };
    assert_eq!(
        synack.flags & (SYN | ACK | ECE | CWR),
        SYN | ACK | ECE,
        "ECN on"
    );
    let their = synack.seq.wrapping_add(1);
    send_plain(
        &mut fe,
        &guest_tcp(
            tap_mac,
            ports,
            isn.wrapping_add(1),
            their,
            ACK,
            &[],
            false,
            false,
        ),
    );

    // Two GSO_ECN frames with CWR: the first while the chain is empty (one packet for the
    // kernel), the second with a filter-dump in (cut in software: 14 segments).
    let pcap = dir.path().join("ecn.pcap");
    for (i, want) in [(0usize, 1u64), (1, CHUNK.div_ceil(usize::from(GSO)) as u64)] {
        if i == 1 {
            qmp.execute(
                "object-add",
                json!({"qom-type": "filter-dump", "id": "d0", "netdev": "t0",
                       "file": pcap.to_str().unwrap()}),
            )
            .unwrap();
        }
        let seq = isn.wrapping_add(1 + (i * CHUNK) as u32);
        let f = guest_tcp(
            tap_mac,
            ports,
            seq,
            their,
            ACK | PSH | CWR,
            &data[i * CHUNK..(i + 1) * CHUNK],
            true,
            true,
        );
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4 | GSO_ECN,
            hdr_len: 54,
            gso_size: GSO,
            csum_start: 34,
            csum_offset: 16,
        };
        let before = common::rx_packets(&ns, tap);
        fe.send_vnet(&h.to_bytes(), &f).unwrap();
        common::wait_for(
            Duration::from_secs(10),
            &format!("the tap never got {want} packets"),
            || common::rx_packets(&ns, tap) >= before + want,
        );
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(common::rx_packets(&ns, tap), before + want, "frame {i}");
    }
    let got = server.join().unwrap();
    assert!(got == expect, "the socket read every byte in order");

    // The software cut, as filter-dump saw it: CWR on the first segment only, ECT(0) and valid
    // checksums on all.
    let mut r = pcap_file::pcap::PcapReader::new(std::fs::File::open(&pcap).unwrap()).unwrap();
    let mut segs = Vec::new();
    while let Some(p) = r.next_packet() {
        let p = p.unwrap();
        if let Some(s) = parse_seg_from(&[0; 12], &p.data, GUEST_IP, port)
            && s.len > 0
        {
            segs.push(s);
        }
    }
    assert_eq!(
        segs.len(),
        CHUNK.div_ceil(usize::from(GSO)),
        "segments in the dump"
    );
    for (i, s) in segs.iter().enumerate() {
        assert_eq!(s.flags & CWR != 0, i == 0, "CWR on segment {i}");
        assert!(s.len <= usize::from(GSO));
        assert!(checksums_ok(&s.frame), "checksums of segment {i}");
        assert_eq!(Ipv4Packet::new_checked(&s.frame[14..]).unwrap().ecn(), 2);
    }
    let net = qmp.execute("query-net", json!({})).unwrap();
    assert!(
        net["offload"]["passthrough"].as_u64().unwrap() >= 1,
        "{net}"
    );
    assert!(net["offload"]["software"].as_u64().unwrap() >= 1, "{net}");
    assert_eq!(net["offload"]["errors"], 0, "{net}");
}

/// The kernel in the namespace sends `TOTAL` bytes to the guest over an ECN connection; the
/// guest acknowledges each flight at once, with ECE on the first acknowledgement (as if a
/// router had marked CE) until CWR arrives. Returns every data frame the guest got and the
/// backend's offload counters.
fn kernel_ecn_sender(
    b: &common::Backend,
    ns: &common::NetNs,
    tap_mac: [u8; 6],
    o: &Options,
) -> (Vec<Seg>, u64, serde_json::Value) {
    const TOTAL: usize = 150_000;
    const PORT: u16 = 5001;
    let mut fe = b.frontend(o);
    let features = fe.features();
    let client = common::spawn_in_netns(ns, move || {
        let mut s = std::net::TcpStream::connect_timeout(
            &"10.0.2.15:5001".parse().unwrap(),
            Duration::from_secs(10),
        )
        .unwrap();
        s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        let data: Vec<u8> = (0..TOTAL).map(|i| (i % 251) as u8).collect();
        s.write_all(&data).unwrap();
        // Let the guest's acknowledgements arrive before closing.
        std::thread::sleep(Duration::from_millis(300));
    });
    let syn = loop {
        let s = recv_seg(&mut fe, PORT, Duration::from_secs(10)).expect("SYN from the kernel");
        if s.flags & SYN != 0 {
            break s;
        }
    };
    assert_eq!(
        syn.flags & (SYN | ECE | CWR),
        SYN | ECE | CWR,
        "ECN-setup SYN"
    );
    let ip = Ipv4Packet::new_checked(&syn.frame[14..]).unwrap();
    let cport = TcpPacket::new_checked(ip.payload()).unwrap().src_port();
    let ports = (PORT, cport);
    let g_isn: u32 = 7_000;
    let their0 = syn.seq.wrapping_add(1);
    send_plain(
        &mut fe,
        &guest_tcp(
            tap_mac,
            ports,
            g_isn,
            their0,
            SYN | ACK | ECE,
            &[],
            false,
            false,
        ),
    );
    let mut rcv_nxt = their0;
    let end = their0.wrapping_add(TOTAL as u32);
    let mut segs = Vec::new();
    let mut cwr_seen = false;
    let mut acks = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while rcv_nxt != end {
        assert!(
            Instant::now() < deadline,
            "only {} bytes arrived",
            rcv_nxt.wrapping_sub(their0)
        );
        match recv_seg(&mut fe, PORT, Duration::from_millis(50)) {
            Some(s) if s.len > 0 => {
                if s.seq == rcv_nxt {
                    rcv_nxt = rcv_nxt.wrapping_add(s.len as u32);
                }
                cwr_seen |= s.flags & CWR != 0;
                segs.push(s);
            }
            Some(_) => {}
            None => {
                // The flight is over: acknowledge it, echoing CE once ECN data has flowed.
                let ece = if !cwr_seen && !segs.is_empty() {
                    ECE
                } else {
                    0
                };
                acks += 1;
                send_plain(
                    &mut fe,
                    &guest_tcp(
                        tap_mac,
                        ports,
                        g_isn + 1,
                        rcv_nxt,
                        ACK | ece,
                        &[],
                        false,
                        false,
                    ),
                );
            }
        }
    }
    send_plain(
        &mut fe,
        &guest_tcp(tap_mac, ports, g_isn + 1, rcv_nxt, ACK, &[], false, false),
    );
    client.join().unwrap();
    assert!(acks > 0);
    let net = b.qmp().execute("query-net", json!({})).unwrap();
    drop(fe);
    std::thread::sleep(Duration::from_millis(300));
    (segs, features, net)
}

#[test]
fn kernel_gso_frames_with_ecn_reach_the_guest_whole_with_guest_ecn_and_cut_without() {
    let Some(ns) = common::netns_with_tun("ecnrx") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tap = "ecnrxtap0";
    let b = common::spawn_with_tap(dir.path(), &ns, tap, "", &["--mac", GUEST_MAC_STR]);
    let tap_mac = setup_ns(&ns, tap);

    // GUEST_ECN negotiated: the CWR frame is a GSO frame with GSO_ECN, passed whole.
    let (segs, features, net) = kernel_ecn_sender(&b, &ns, tap_mac, &Options::default());
    assert_ne!(features & GUEST_ECN, 0);
    let cwr: Vec<&Seg> = segs.iter().filter(|s| s.flags & CWR != 0).collect();
    assert_eq!(cwr.len(), 1, "one frame carries CWR");
    assert_eq!(
        cwr[0].hdr.gso_type,
        GSO_TCPV4 | GSO_ECN,
        "the CWR frame came whole with GSO_ECN: {:?}, {} bytes",
        cwr[0].hdr,
        cwr[0].len
    );
    assert!(cwr[0].len > usize::from(cwr[0].hdr.gso_size));
    assert!(
        segs.iter()
            .all(|s| s.hdr.gso_type & GSO_ECN == 0 || s.flags & CWR != 0),
        "GSO_ECN only on the CWR frame"
    );
    assert!(net["offload"]["passthrough"].as_u64().unwrap() > 0, "{net}");
    let sw0 = net["offload"]["software"].as_u64().unwrap();

    // GUEST_ECN refused: the same frame is cut in software; CWR on its first segment only,
    // every byte arrives (the loop above waits for all of them).
    let (segs, features, net) = kernel_ecn_sender(
        &b,
        &ns,
        tap_mac,
        &Options {
            refuse_features: GUEST_ECN,
            ..Options::default()
        },
    );
    assert_eq!(features & GUEST_ECN, 0);
    assert!(segs.iter().all(|s| s.hdr.gso_type & GSO_ECN == 0));
    let at = segs
        .iter()
        .position(|s| s.flags & CWR != 0)
        .expect("a segment with CWR");
    assert_eq!(
        segs.iter().filter(|s| s.flags & CWR != 0).count(),
        1,
        "CWR once"
    );
    let first = &segs[at];
    assert_eq!(first.hdr.gso_type, GSO_NONE, "the CWR segment is plain");
    assert!(first.len <= 1460);
    assert!(checksums_ok(&first.frame), "checksums of the CWR segment");
    let next = &segs[at + 1];
    assert_eq!(
        next.seq,
        first.seq.wrapping_add(first.len as u32),
        "its next segment"
    );
    assert_eq!(next.flags & CWR, 0);
    assert!(
        net["offload"]["software"].as_u64().unwrap() > sw0,
        "the GSO_ECN frame was cut in software: {net}"
    );
    assert_eq!(net["offload"]["errors"], 0, "{net}");
}

/// A UDP socket in the namespace on 10.0.2.2:9 that returns the sizes and contents of the
/// datagrams it gets within `wait`.
fn udp_sink(ns: &common::NetNs, wait: Duration) -> std::thread::JoinHandle<Vec<Vec<u8>>> {
    let (tx, rx) = mpsc::channel();
    let h = common::spawn_in_netns(ns, move || {
        let s = std::net::UdpSocket::bind("10.0.2.2:9").unwrap();
        tx.send(()).unwrap();
        s.set_read_timeout(Some(wait)).unwrap();
        let mut out = Vec::new();
        let mut buf = vec![0u8; 70_000];
        while let Ok(n) = s.recv(&mut buf) {
            out.push(buf[..n].to_vec());
        }
        out
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap();
    h
}

#[test]
fn ufo_and_uso_frames_from_the_guest_reach_a_real_udp_socket() {
    let Some(ns) = common::netns_with_tun("ufo") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tap = "ufotap0";
    let b = common::spawn_with_tap(dir.path(), &ns, tap, "", &["--mac", GUEST_MAC_STR]);
    let mut qmp = b.qmp();
    let tap_mac = setup_ns(&ns, tap);
    let mut fe = b.frontend(&Options::default());
    for (bit, name) in [(14, "HOST_UFO"), (10, "GUEST_UFO"), (56, "HOST_USO")] {
        assert_ne!(fe.features() & (1 << bit), 0, "{name} negotiated");
    }
    let with_mac = |mut f: Vec<u8>| {
        f[..6].copy_from_slice(&tap_mac);
        f[6..12].copy_from_slice(&GUEST_MAC);
        f
    };
    // UFO: one 4000-byte datagram, whole to the tap (the kernel fragments it) and, with a
    // filter in, cut into IP fragments here (3 fragments of 1480) that the kernel
    // reassembles. USO: 10 datagrams of 400 bytes from one frame.
    let payload: Vec<u8> = (0..4000u32).map(|i| (i * 7) as u8).collect();
    for chain in [false, true] {
        if chain {
            qmp.execute(
                "object-add",
                json!({"qom-type": "filter-dump", "id": "d0", "netdev": "t0",
                       "file": dir.path().join("u.pcap").to_str().unwrap()}),
            )
            .unwrap();
        }
        let sink = udp_sink(&ns, Duration::from_millis(1500));
        let before = common::rx_packets(&ns, tap);
        let (h, f) = udp_gso_frame(false, &payload, GSO_UDP, 1480);
        fe.send_vnet(&h.to_bytes(), &with_mac(f)).unwrap();
        let (h, f) = udp_gso_frame(false, &payload, GSO_UDP_L4, 400);
        fe.send_vnet(&h.to_bytes(), &with_mac(f)).unwrap();
        let got = sink.join().unwrap();
        let packets = common::rx_packets(&ns, tap) - before;
        assert_eq!(
            got.len(),
            11,
            "chain {chain}: datagrams {:?}",
            got.iter().map(Vec::len).collect::<Vec<_>>()
        );
        assert_eq!(got[0], payload, "chain {chain}: the UFO datagram whole");
        let joined: Vec<u8> = got[1..].concat();
        assert!(got[1..].iter().all(|d| d.len() == 400));
        assert_eq!(joined, payload, "chain {chain}: the USO datagrams");
        // Whole: 2 packets for the kernel; cut here: 3 fragments and 10 datagrams.
        assert_eq!(packets, if chain { 13 } else { 2 }, "chain {chain}");
    }
    let net = qmp.execute("query-net", json!({})).unwrap();
    assert_eq!(net["offload"]["errors"], 0, "{net}");
    assert!(net["offload"]["software"].as_u64().unwrap() >= 2, "{net}");
}

/// A netdev without vnet headers (`stream`): the guest's GSO_ECN frame arrives as plain
/// segments with CWR on the first only, its UFO datagram as IP fragments (3 of 1480 bytes of
/// IP payload, MF on all but the last, one identification) and its USO frame as datagrams.
#[test]
fn ecn_ufo_and_uso_frames_are_cut_in_software_for_a_stream_netdev() {
    use colo_proto::frame::FrameReader;
    use smoltcp::wire::UdpPacket;
    use vhost_net_colo::offload::tcp_gso_frame;
    let dir = tempfile::tempdir().unwrap();
    let (b, wire) = common::spawn_with_wire(dir.path(), "", &["--mac", GUEST_MAC_STR], true);
    let mut r = FrameReader::new(wire, false);
    let mut fe = b.frontend(&Options::default());
    for bit in [9, 10, 13, 14, 56] {
        assert_ne!(
            fe.features() & (1 << bit),
            0,
            "feature {bit} offered on a stream netdev"
        );
    }
    let payload: Vec<u8> = (0..10_000u32).map(|i| (i * 5 + i / 300) as u8).collect();
    let (mut h, f) = tcp_gso_frame(false, &payload, false, 1448);
    h.gso_type |= GSO_ECN;
    fe.send_vnet(&h.to_bytes(), &f).unwrap();
    let mut joined = Vec::new();
    for i in 0..payload.len().div_ceil(1448) {
        let s = r.read_frame().unwrap().unwrap().payload;
        let ip = Ipv4Packet::new_checked(&s[14..]).unwrap();
        let t = TcpPacket::new_checked(ip.payload()).unwrap();
        assert_eq!(t.cwr(), i == 0, "CWR on segment {i}");
        assert!(checksums_ok(&s), "checksums of segment {i}");
        joined.extend_from_slice(t.payload());
    }
    assert_eq!(joined, payload);

    let (h, f) = udp_gso_frame(false, &payload[..4000], GSO_UDP, 1480);
    fe.send_vnet(&h.to_bytes(), &f).unwrap();
    let mut dgram = Vec::new();
    let mut ident = None;
    for i in 0..3 {
        let s = r.read_frame().unwrap().unwrap().payload;
        let ip = Ipv4Packet::new_checked(&s[14..]).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!(usize::from(ip.frag_offset()), dgram.len(), "offset {i}");
        assert_eq!(ip.more_frags(), i < 2);
        assert_eq!(*ident.get_or_insert(ip.ident()), ip.ident());
        dgram.extend_from_slice(ip.payload());
    }
    let u = UdpPacket::new_checked(&dgram[..]).unwrap();
    assert!(u.verify_checksum(&IpAddress::Ipv4(GUEST_IP), &IpAddress::Ipv4(NS_IP)));
    assert_eq!(u.payload(), &payload[..4000]);

    let (h, f) = udp_gso_frame(false, &payload[..1000], GSO_UDP_L4, 300);
    fe.send_vnet(&h.to_bytes(), &f).unwrap();
    let mut joined = Vec::new();
    for _ in 0..4 {
        let s = r.read_frame().unwrap().unwrap().payload;
        let ip = Ipv4Packet::new_checked(&s[14..]).unwrap();
        let u = UdpPacket::new_checked(ip.payload()).unwrap();
        assert!(u.verify_checksum(&IpAddress::Ipv4(GUEST_IP), &IpAddress::Ipv4(NS_IP)));
        joined.extend_from_slice(u.payload());
    }
    assert_eq!(joined, &payload[..1000]);
    let net = b.qmp().execute("query-net", json!({})).unwrap();
    assert_eq!(net["offload"]["errors"], 0, "{net}");
    assert_eq!(net["offload"]["software"], 3, "{net}");
}

/// A filter-mirror with `vnet_hdr_support=on` (both directions) and a filter-rewriter on a tap
/// with vnet headers: the guest's GSO_ECN TSO frame and UFO datagram, and the kernel's GSO_ECN
/// frame towards a GUEST_ECN guest, cross the chain whole, the mirror's records carry their
/// header, and they arrive whole (one packet for the tap; the datagram at a real socket).
#[test]
fn ecn_and_ufo_frames_cross_mirror_and_rewriter_whole_with_vnet_hdr_support() {
    use vhost_net_colo::offload::tcp_gso_frame;
    let Some(ns) = common::netns_with_tun("ecnch") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tap = "ecnchtap0";
    let b = common::spawn_with_tap(dir.path(), &ns, tap, "", &["--mac", GUEST_MAC_STR]);
    let mut qmp = b.qmp();
    let tap_mac = setup_ns(&ns, tap);
    let records = common::add_vnet_mirror(&mut qmp, "all", &dir.path().join("mirror.sock"));
    qmp.execute(
        "object-add",
        json!({"qom-type": "filter-rewriter", "id": "rw0", "netdev": "t0", "queue": "all"}),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let mut fe = b.frontend(&Options::default());

    // Guest -> tap.
    let (mut h, mut f) = tcp_gso_frame(false, &vec![0x61; 30_000], false, 1448);
    h.gso_type |= GSO_ECN;
    f[..6].copy_from_slice(&tap_mac);
    let sink = udp_sink(&ns, Duration::from_millis(1500));
    let before = common::rx_packets(&ns, tap);
    fe.send_vnet(&h.to_bytes(), &f).unwrap();
    let (uh, uf) = udp_gso_frame(false, &[0x62; 5000], GSO_UDP, 1480);
    let mut uf2 = uf.clone();
    uf2[..6].copy_from_slice(&tap_mac);
    fe.send_vnet(&uh.to_bytes(), &uf2).unwrap();
    let got = sink.join().unwrap();
    assert_eq!(
        got,
        vec![vec![0x62; 5000]],
        "the UFO datagram at the socket"
    );
    assert_eq!(
        common::rx_packets(&ns, tap),
        before + 2,
        "both frames whole"
    );
    // The mirror also copies what the namespace sends (IPv6 solicitations...): pick ours.
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.len() < 2 && Instant::now() < deadline {
        if let Ok((hdr, l2)) = records.recv_timeout(Duration::from_millis(500))
            && (l2.len() == f.len() || l2.len() == uf2.len())
        {
            seen.push((VnetHdr::parse(&hdr).unwrap(), l2));
        }
    }
    assert_eq!(seen.len(), 2, "two mirror records of ours");
    assert_eq!(seen[0].0, h, "the GSO_ECN header in the record");
    assert_eq!(seen[0].1, f, "the whole TSO frame");
    assert_eq!(seen[1].0, uh, "the UFO header in the record");
    assert_eq!(seen[1].1, uf2, "the whole datagram");
    drop(fe);
    std::thread::sleep(Duration::from_millis(300));

    // Tap -> a GUEST_ECN guest: the kernel's CWR frame through the chain whole, mirrored
    // with its GSO_ECN header.
    let (segs, _, net) = kernel_ecn_sender(&b, &ns, tap_mac, &Options::default());
    let cwr: Vec<&Seg> = segs.iter().filter(|s| s.flags & CWR != 0).collect();
    assert_eq!(cwr.len(), 1);
    assert_eq!(cwr[0].hdr.gso_type, GSO_TCPV4 | GSO_ECN, "{:?}", cwr[0].hdr);
    let mut mirrored_ecn = 0;
    while let Ok((hdr, l2)) = records.recv_timeout(Duration::from_millis(500)) {
        let h = VnetHdr::parse(&hdr).unwrap();
        if h.gso_type == GSO_TCPV4 | GSO_ECN {
            mirrored_ecn += 1;
            assert_eq!(l2, cwr[0].frame, "the mirrored frame is the guest's");
        }
    }
    assert_eq!(
        mirrored_ecn, 1,
        "the CWR frame mirrored whole with its header"
    );
    assert_eq!(net["offload"]["errors"], 0, "{net}");
    assert_eq!(net["offload"]["software"], 0, "nothing cut: {net}");
}
