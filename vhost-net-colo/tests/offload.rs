//! Checksum and segmentation offloads through a real vhost-user socket, driven by the test
//! frontend: GSO frames from the "guest" are segmented in software for a `stream` netdev (and
//! checked with smoltcp's parser), and a tap with vnet headers (in a network namespace the test
//! creates; needs root) takes them whole while the filter chain is empty and segmented once a
//! filter is in, and hands partially checksummed frames to the guest the same way.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use colo_proto::frame::FrameReader;
use colo_proto::qmp::QmpClient;
use serde_json::json;
use smoltcp::wire::{
    EthernetFrame, IpAddress, Ipv4Packet, Ipv6Packet, TcpPacket, TcpSeqNumber, UdpPacket,
};
use vhost_net_colo::offload::{F_NEEDS_CSUM, GSO_UDP, VnetHdr, tcp_gso_frame};
use vhost_net_colo::testing::{NetFrontend, Options};

const MSS: u16 = 1448;
const GUEST_MAC: &str = "52:54:00:ab:cd:02";

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_backend(dir: &Path, netdev: &str, netns: Option<&str>) -> (Proc, PathBuf, QmpClient) {
    let sock = dir.join("vu.sock");
    let qmp_path = dir.join("qmp.sock");
    let bin = env!("CARGO_BIN_EXE_vhost-net-colo");
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, bin]);
            c
        }
        None => Command::new(bin),
    };
    cmd.arg("--socket")
        .arg(&sock)
        .arg("--netdev")
        .arg(netdev)
        .arg("--mac")
        .arg(GUEST_MAC)
        .arg("--qmp")
        .arg(format!("unix:{}", qmp_path.display()));
    let proc = Proc(cmd.spawn().unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() || !qmp_path.exists() {
        assert!(Instant::now() < deadline, "backend sockets never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    let qmp = QmpClient::connect_unix(&qmp_path, Duration::from_secs(10)).unwrap();
    (proc, sock, qmp)
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
    let wire_path = dir.path().join("wire.sock");
    let l = UnixListener::bind(&wire_path).unwrap();
    let (_p, sock, mut qmp) = spawn_backend(
        dir.path(),
        &format!(
            "stream,id=s0,server=off,addr.type=unix,addr.path={}",
            wire_path.display()
        ),
        None,
    );
    let (wire, _) = l.accept().unwrap();
    wire.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut r = FrameReader::new(wire, false);
    let mut fe = NetFrontend::connect(&sock, &Options::default()).unwrap();
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
    // An unsupported GSO type is dropped and counted; the next frame still passes.
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

struct NetNs(String);

impl NetNs {
    fn new() -> Option<Self> {
        let name = format!("vnoff{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then(|| NetNs(name))
    }

    fn ip(&self, args: &[&str]) {
        let st = Command::new("ip")
            .args(["-n", &self.0])
            .args(args)
            .status()
            .unwrap();
        assert!(st.success(), "ip -n {} {args:?}", self.0);
    }

    /// Runs `f` on a thread inside the namespace.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.0);
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let file = std::fs::File::open(path).unwrap();
            // SAFETY: setns on this thread only, with a namespace fd we opened.
            let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns");
            f()
        })
        .join()
        .unwrap()
    }

    /// The interface's received-packet count (`ip -s -j link`).
    fn rx_packets(&self, ifname: &str) -> u64 {
        let out = Command::new("ip")
            .args(["-n", &self.0, "-s", "-j", "link", "show", "dev", ifname])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v[0]["stats64"]["rx"]["packets"].as_u64().unwrap()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn tap_with_vnet_headers_passes_offloads_through_an_empty_chain_and_segments_otherwise() {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 || !Path::new("/dev/net/tun").exists() {
        eprintln!("SKIPPED: needs root and /dev/net/tun for a tap in a network namespace");
        return;
    }
    let Some(ns) = NetNs::new() else {
        eprintln!("SKIPPED: ip netns add failed");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tap = "vnofftap0";
    let (_p, sock, mut qmp) = spawn_backend(
        dir.path(),
        &format!("tap,id=t0,ifname={tap},script=no,downscript=no"),
        Some(&ns.0),
    );
    let net = qmp.execute("query-net", json!({})).unwrap();
    assert_eq!(net["netdev"]["state"]["vnet_hdr"], true, "{net}");
    ns.ip(&["addr", "add", "10.0.2.2/24", "dev", tap]);
    ns.ip(&["link", "set", tap, "up"]);
    ns.ip(&["link", "set", "lo", "up"]);
    ns.ip(&[
        "neigh",
        "add",
        "10.0.2.15",
        "lladdr",
        GUEST_MAC,
        "dev",
        tap,
        "nud",
        "permanent",
    ]);
    let mut fe = NetFrontend::connect(&sock, &Options::default()).unwrap();
    assert_ne!(fe.features() & (1 << 1), 0, "GUEST_CSUM negotiated");

    // Guest -> tap: one 20000-byte GSO frame is one packet for the kernel while the chain is
    // empty, and 14 plain segments once a filter is in.
    let payload = vec![0x5au8; 20_000];
    let (h, f) = tcp_gso_frame(false, &payload, false, MSS);
    for (chain, want) in [(false, 1u64), (true, 14)] {
        if chain {
            qmp.execute(
                "object-add",
                json!({"qom-type": "filter-dump", "id": "d0", "netdev": "t0",
                       "file": dir.path().join("d.pcap").to_str().unwrap()}),
            )
            .unwrap();
        }
        let before = ns.rx_packets(tap);
        fe.send_vnet(&h.to_bytes(), &f).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while ns.rx_packets(tap) < before + want {
            assert!(Instant::now() < deadline, "tap never got {want} packets");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(ns.rx_packets(tap), before + want, "chain {chain}");
    }
    qmp.execute("object-del", json!({"id": "d0"})).unwrap();

    // Tap -> guest: a UDP datagram sent in the namespace leaves the kernel with a partial
    // checksum; the guest (GUEST_CSUM) gets it with NEEDS_CSUM while the chain is empty, and
    // complete once a filter is in.
    for chain in [false, true] {
        if chain {
            qmp.execute(
                "object-add",
                json!({"qom-type": "filter-dump", "id": "d1", "netdev": "t0",
                       "file": dir.path().join("d1.pcap").to_str().unwrap()}),
            )
            .unwrap();
        }
        ns.run(|| {
            let s = std::net::UdpSocket::bind("10.0.2.2:0").unwrap();
            s.send_to(&[0x42; 300], "10.0.2.15:9999").unwrap();
        });
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
    qmp.execute(
        "chardev-add",
        json!({"id": "mc0", "spec": format!("socket,path={},server=on,wait=off", mpath.display())}),
    )
    .unwrap();
    qmp.execute(
        "object-add",
        json!({"qom-type": "filter-mirror", "id": "m0", "netdev": "t0", "queue": "tx",
               "outdev": "mc0", "vnet_hdr_support": "on"}),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let ms = loop {
        match UnixStream::connect(&mpath) {
            Ok(s) => break s,
            Err(e) => {
                assert!(Instant::now() < deadline, "mirror socket: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    ms.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    ns.run(|| {
        let s = std::net::UdpSocket::bind("10.0.2.2:0").unwrap();
        s.send_to(&[0x43; 200], "10.0.2.15:9999").unwrap();
    });
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
    let mut fe = NetFrontend::connect(
        &sock,
        &Options {
            refuse_features: 1 << 1 | 1 << 7 | 1 << 8,
            ..Options::default()
        },
    )
    .unwrap();
    assert_eq!(fe.features() & (1 << 1), 0, "GUEST_CSUM refused");
    ns.run(|| {
        let s = std::net::UdpSocket::bind("10.0.2.2:0").unwrap();
        s.send_to(&[0x44; 100], "10.0.2.15:9999").unwrap();
    });
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
