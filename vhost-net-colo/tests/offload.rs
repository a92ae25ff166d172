//! Checksum and segmentation offloads through a real vhost-user socket, driven by the test
//! frontend: GSO frames from the "guest" are segmented in software for a `stream` netdev (and
//! checked with smoltcp's parser), and a tap with vnet headers (in a network namespace the test
//! creates; needs root) takes them whole while the filter chain is empty and segmented once a
//! filter is in, and hands partially checksummed frames to the guest the same way.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use colo_proto::frame::FrameReader;
use colo_proto::qmp::QmpClient;
use serde_json::json;
use smoltcp::wire::{
    EthernetFrame, IpAddress, Ipv4Packet, Ipv6Packet, TcpPacket, TcpSeqNumber, UdpPacket,
};
use vhost_net_colo::offload::{F_NEEDS_CSUM, GSO_UDP, VnetHdr, tcp_gso_frame};
use vhost_net_colo::testing::Options;

const MSS: u16 = 1448;
const GUEST_MAC: &str = "52:54:00:ab:cd:02";

/// Adds a `filter-dump` on the tap netdev `t0`, writing to `file`.
fn add_dump(qmp: &mut QmpClient, id: &str, file: &std::path::Path) {
    qmp.execute(
        "object-add",
        json!({"qom-type": "filter-dump", "id": id, "netdev": "t0",
               "file": file.to_str().unwrap()}),
    )
    .unwrap();
}

/// Sends one UDP datagram of `payload` from 10.0.2.2 to the guest (10.0.2.15:9999) inside `ns`.
fn send_udp_in(ns: &common::NetNs, payload: Vec<u8>) {
    common::in_netns(ns, move || {
        let s = std::net::UdpSocket::bind("10.0.2.2:0").unwrap();
        s.send_to(&payload, "10.0.2.15:9999").unwrap();
    });
}

/// Checks that `segs` are valid plain TCP segments carrying `payload` from sequence 2^32-10.
fn check_plain_tcp(segs: &[Vec<u8>], payload: &[u8]) {
    let mut joined = Vec::new();
    let mut seq = TcpSeqNumber(-10);
    for (i, s) in segs.iter().enumerate() {
        let eth = EthernetFrame::new_checked(&s[..]).unwrap();
        let (src, dst, l4) = match eth.ethertype() {
            smoltcp::wire::EthernetProtocol::Ipv4 => {
                let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
                assert!(ip.verify_checksum(), "IPv4 checksum, segment {i}");
                (
                    IpAddress::Ipv4(ip.src_addr()),
                    IpAddress::Ipv4(ip.dst_addr()),
                    ip.payload().to_vec(),
                )
            }
            _ => {
                let ip = Ipv6Packet::new_checked(eth.payload()).unwrap();
                (
                    IpAddress::Ipv6(ip.src_addr()),
                    IpAddress::Ipv6(ip.dst_addr()),
                    ip.payload().to_vec(),
                )
            }
        };
        let t = TcpPacket::new_checked(&l4[..]).unwrap();
        assert!(t.verify_checksum(&src, &dst), "TCP checksum, segment {i}");
        assert_eq!(t.seq_number(), seq, "sequence number, segment {i}");
        assert!(t.payload().len() <= usize::from(MSS));
        seq += t.payload().len();
        joined.extend_from_slice(t.payload());
    }
    assert_eq!(joined, payload, "payload intact");
}

#[test]
fn gso_frames_from_the_guest_are_segmented_in_software_for_a_stream_netdev() {
    let dir = tempfile::tempdir().unwrap();
    let (b, wire) = common::spawn_with_wire(dir.path(), "", &["--mac", GUEST_MAC], true);
    let mut qmp = b.qmp();
    let mut r = FrameReader::new(wire, false);
    let mut fe = b.frontend(&Options::default());
    assert_ne!(fe.features() & (1 << 11), 0, "HOST_TSO4 negotiated");
    for (v6, total) in [
        (false, 25_000usize),
        (true, 9_000),
        (false, 100),
        (false, 65_000),
    ] {
        let payload: Vec<u8> = (0..total).map(|i| (i % 253) as u8).collect();
        let (h, f) = tcp_gso_frame(v6, &payload, false, MSS);
        fe.send_vnet(&h.to_bytes(), &f).unwrap();
        let n = total.div_ceil(usize::from(MSS));
        let segs: Vec<Vec<u8>> = (0..n)
            .map(|_| r.read_frame().unwrap().unwrap().payload)
            .collect();
        check_plain_tcp(&segs, &payload);
    }
    // A frame whose GSO type does not fit its contents (TCP marked UFO) is dropped and counted;
    // the next frame still passes.
    let (mut h, f) = tcp_gso_frame(false, &[7; 3000], false, MSS);
    h.gso_type = GSO_UDP;
    fe.send_vnet(&h.to_bytes(), &f).unwrap();
    let (h, f) = tcp_gso_frame(false, &[9; 10], false, MSS);
    fe.send_vnet(&h.to_bytes(), &f).unwrap();
    check_plain_tcp(&[r.read_frame().unwrap().unwrap().payload], &[9; 10]);
    let net = qmp.execute("query-net", json!({})).unwrap();
    assert_eq!(net["offload"]["errors"], 1, "{net}");
    assert_eq!(net["offload"]["software"], 5, "{net}");
}

#[test]
fn tap_with_vnet_headers_passes_offloads_through_an_empty_chain_and_segments_otherwise() {
    let Some(ns) = common::netns_with_tun("vnoff") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tap = "vnofftap0";
    let b = common::spawn_with_tap(dir.path(), &ns, tap, "", &["--mac", GUEST_MAC]);
    let mut qmp = b.qmp();
    let net = qmp.execute("query-net", json!({})).unwrap();
    assert_eq!(net["netdev"]["state"]["vnet_hdr"], true, "{net}");
    common::tap_as_peer(&ns, tap, Some(GUEST_MAC));
    let mut fe = b.frontend(&Options::default());
    assert_ne!(fe.features() & (1 << 1), 0, "GUEST_CSUM negotiated");

    // Guest -> tap: one 20000-byte GSO frame is one packet for the kernel while the chain is
    // empty, and 14 plain segments once a filter is in.
    let payload = vec![0x5au8; 20_000];
    let (h, f) = tcp_gso_frame(false, &payload, false, MSS);
    for (chain, want) in [(false, 1u64), (true, 14)] {
        if chain {
            add_dump(&mut qmp, "d0", &dir.path().join("d.pcap"));
        }
        let before = common::rx_packets(&ns, tap);
        fe.send_vnet(&h.to_bytes(), &f).unwrap();
        common::wait_for(
            Duration::from_secs(10),
            &format!("tap never got {want} packets"),
            || common::rx_packets(&ns, tap) >= before + want,
        );
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(common::rx_packets(&ns, tap), before + want, "chain {chain}");
    }
    qmp.execute("object-del", json!({"id": "d0"})).unwrap();

    // Tap -> guest: a UDP datagram sent in the namespace leaves the kernel with a partial
    // checksum; the guest (GUEST_CSUM) gets it with NEEDS_CSUM while the chain is empty, and
    // complete once a filter is in.
    for chain in [false, true] {
        if chain {
            add_dump(&mut qmp, "d1", &dir.path().join("d1.pcap"));
        }
        send_udp_in(&ns, vec![0x42; 300]);
        let deadline = Instant::now() + Duration::from_secs(10);
        let (hdr, frame) = loop {
            let (hdr, frame) = fe
                .recv_vnet(Duration::from_secs(10))
                .expect("the datagram reaches the guest");
            // Skip anything else the namespace sends (IPv6 router solicitations and such).
            if frame.get(12..14) == Some(&[0x08, 0x00][..]) && frame.get(23) == Some(&17) {
                break (hdr, frame);
            }
            assert!(
                Instant::now() < deadline,
                "no UDP datagram reached the guest"
            );
        };
        let h = VnetHdr::parse(&hdr).unwrap();
        let ip = Ipv4Packet::new_checked(&frame[14..]).unwrap();
        let udp = UdpPacket::new_checked(ip.payload()).unwrap();
        assert_eq!(udp.payload(), &[0x42; 300][..]);
        let valid = udp.verify_checksum(
            &IpAddress::Ipv4(ip.src_addr()),
            &IpAddress::Ipv4(ip.dst_addr()),
        );
        if chain {
            assert_eq!(h.flags & F_NEEDS_CSUM, 0, "plain frame through the chain");
            assert!(valid, "checksum completed in software");
        } else {
            assert_ne!(
                h.flags & F_NEEDS_CSUM,
                0,
                "partial checksum passed through: {h:?}"
            );
            assert_eq!(usize::from(h.csum_start), 14 + 20);
            assert_eq!(h.csum_offset, 6);
        }
    }
    // A filter with vnet_hdr_support on this netdev sends QEMU's framing with the tap's header
    // length (12), the header zeroed, the frame plain.
    let mpath = dir.path().join("mirror.sock");
    common::add_socket_chardev(&mut qmp, "mc0", &mpath);
    qmp.execute(
        "object-add",
        json!({"qom-type": "filter-mirror", "id": "m0", "netdev": "t0", "queue": "tx",
               "outdev": "mc0", "vnet_hdr_support": "on"}),
    )
    .unwrap();
    let ms = common::connect_chardev(&mpath);
    ms.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    send_udp_in(&ns, vec![0x43; 200]);
    let mut mr = FrameReader::new(ms, true);
    let rec = loop {
        let rec = mr.read_frame().unwrap().unwrap();
        if rec.l2().get(23) == Some(&17) {
            break rec;
        }
    };
    assert_eq!(
        rec.vnet_hdr_len, 12,
        "QEMU framing with the tap's header length"
    );
    assert_eq!(&rec.payload[..12], &[0u8; 12]);
    let ip = Ipv4Packet::new_checked(&rec.l2()[14..]).unwrap();
    let udp = UdpPacket::new_checked(ip.payload()).unwrap();
    assert!(udp.verify_checksum(
        &IpAddress::Ipv4(ip.src_addr()),
        &IpAddress::Ipv4(ip.dst_addr())
    ));
    let net = qmp.execute("query-net", json!({})).unwrap();
    assert!(
        net["offload"]["passthrough"].as_u64().unwrap() >= 2,
        "{net}"
    );

    // A guest without GUEST_CSUM gets the datagram completed even with an empty chain.
    qmp.execute("object-del", json!({"id": "d1"})).unwrap();
    qmp.execute("object-del", json!({"id": "m0"})).unwrap();
    drop(fe);
    std::thread::sleep(Duration::from_millis(200));
    let mut fe = b.frontend(&Options {
        refuse_features: 1 << 1 | 1 << 7 | 1 << 8,
        ..Options::default()
    });
    assert_eq!(fe.features() & (1 << 1), 0, "GUEST_CSUM refused");
    send_udp_in(&ns, vec![0x44; 100]);
    let (hdr, frame) = loop {
        let (hdr, frame) = fe
            .recv_vnet(Duration::from_secs(10))
            .expect("the datagram reaches the guest");
        if frame.get(23) == Some(&17) {
            break (hdr, frame);
        }
    };
    assert_eq!(
        hdr[0] & F_NEEDS_CSUM,
        0,
        "no partial checksum for this guest"
    );
    let ip = Ipv4Packet::new_checked(&frame[14..]).unwrap();
    let udp = UdpPacket::new_checked(ip.payload()).unwrap();
    assert_eq!(udp.payload(), &[0x44; 100][..]);
    assert!(udp.verify_checksum(
        &IpAddress::Ipv4(ip.src_addr()),
        &IpAddress::Ipv4(ip.dst_addr())
    ));
    assert_eq!(net["offload"]["errors"], 0, "{net}");
}

/// Connects to the Unix socket of a listening chardev (10 s at most).
fn connect_chardev(path: &std::path::Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => {
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
                return s;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "{}: {e}", path.display());
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A packet socket on `ifname` inside `ns`: the first received frame of `len` bytes whose TCP
/// destination port is 7, or None after 10 s. `ready` is sent once the socket listens.
fn capture_in(
    ns: &common::NetNs,
    ifname: &str,
    len: usize,
    ready: std::sync::mpsc::Sender<()>,
) -> std::thread::JoinHandle<Option<Vec<u8>>> {
    let ifname = std::ffi::CString::new(ifname).unwrap();
    common::spawn_in_netns(ns, move || {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2) call; the fd is closed below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(fd >= 0, "AF_PACKET socket");
        // SAFETY: a NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(ifname.as_ptr()) };
        assert_ne!(index, 0, "tap index");
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = index as i32;
        // SAFETY: bind with a sockaddr_ll of its own size.
        let r = unsafe {
            libc::bind(
                fd,
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "bind AF_PACKET");
        let tv = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        // SAFETY: SO_RCVTIMEO takes a timeval of its own size.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        ready.send(()).unwrap();
        let mut buf = vec![0u8; 70_000];
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = None;
        while Instant::now() < deadline {
            // SAFETY: recv into our buffer, at most its length.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n == len as isize && buf.get(36..38) == Some(&7u16.to_be_bytes()[..]) {
                got = Some(buf[..len].to_vec());
                break;
            }
        }
        // SAFETY: our fd, closed once.
        unsafe { libc::close(fd) };
        got
    })
}

/// The primary's chain with `vnet_hdr_support=on` on a tap with vnet headers: a 64 KiB GSO frame
/// from the guest leaves through redire1's outdev as ONE record carrying its virtio-net header
/// (QEMU's framing, vnet_hdr_len 12); written back into redire0's indev it is injected with
/// that header, and reaches the tap whole (the kernel segments it), byte for byte.
#[test]
fn gso_frame_crosses_the_colo_chain_whole_with_vnet_hdr_support() {
    let Some(ns) = common::netns_with_tun("vngso") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tap = "vngsotap0";
    let b = common::spawn_with_tap(dir.path(), &ns, tap, "", &["--mac", GUEST_MAC]);
    let mut qmp = b.qmp();
    common::tap_as_peer(&ns, tap, None);
    let (out_path, in_path) = (dir.path().join("out.sock"), dir.path().join("in.sock"));
    for (id, p) in [("compare0", &out_path), ("compare_out", &in_path)] {
        common::add_socket_chardev(&mut qmp, id, p);
    }
    for (id, key, dev) in [
        ("redire0", "indev", "compare_out"),
        ("redire1", "outdev", "compare0"),
    ] {
        qmp.execute(
            "object-add",
            json!({"qom-type": "filter-redirector", "id": id, "netdev": "t0", "queue": "rx",
                   key: dev, "vnet_hdr_support": true}),
        )
        .unwrap();
    }
    let out = connect_chardev(&out_path);
    let mut inj = connect_chardev(&in_path);
    std::thread::sleep(Duration::from_millis(200));
    let mut fe = b.frontend(&Options::default());
    assert_ne!(fe.features() & (1 << 11), 0, "HOST_TSO4 negotiated");

    let payload: Vec<u8> = (0..65_000usize).map(|i| (i * 13 + i / 256) as u8).collect();
    let (h, f) = tcp_gso_frame(false, &payload, false, MSS);
    fe.send_vnet(&h.to_bytes(), &f).unwrap();
    let mut r = FrameReader::new(out, true);
    let rec = r.read_frame().unwrap().unwrap();
    assert_eq!(rec.vnet_hdr_len, 12, "QEMU framing with the tap's header");
    assert_eq!(
        VnetHdr::parse(rec.vnet_hdr()).unwrap(),
        h,
        "the GSO header travels with the frame"
    );
    assert_eq!(rec.l2(), &f[..], "one record: the whole 64 KiB frame");

    // Back through the comparer's side: injected with its header, one packet for the kernel.
    let (tx, rx) = std::sync::mpsc::channel();
    let cap = capture_in(&ns, tap, f.len(), tx);
    rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let before = common::rx_packets(&ns, tap);
    colo_proto::frame::write_frame(&mut inj, &rec, true).unwrap();
    let got = cap
        .join()
        .unwrap()
        .expect("the GSO frame reached the tap whole");
    assert_eq!(got, f, "byte for byte");
    common::wait_for(Duration::from_secs(10), "tap rx count", || {
        common::rx_packets(&ns, tap) > before
    });
    let net = qmp.execute("query-net", json!({})).unwrap();
    assert_eq!(net["offload"]["software"], 0, "nothing segmented: {net}");
    assert!(
        net["offload"]["passthrough"].as_u64().unwrap() >= 2,
        "{net}"
    );
    assert_eq!(net["offload"]["errors"], 0, "{net}");
    let filters = qmp.execute("query-filters", json!({})).unwrap();
    let row = |id: &str| {
        filters
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["id"] == id)
            .cloned()
            .unwrap()
    };
    assert_eq!(row("redire1")["counters"]["sent"], 1, "{filters}");
    assert_eq!(row("redire0")["counters"]["injected"], 1, "{filters}");
}
