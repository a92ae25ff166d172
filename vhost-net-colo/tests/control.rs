//! Device control through a real vhost-user socket and QMP: the post-migration announce
//! (`VHOST_USER_SEND_RARP`, QMP `announce-self`), requests the vhost crate does not know, and
//! the link status (`set_link`). The netdev is a `stream` whose far end is the test, so every
//! frame the backend sends out is seen here.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use colo_proto::frame::{Frame, FrameReader, write_frame};
use colo_proto::qmp::QmpClient;
use common::Backend;
use serde_json::json;
use vhost_net_colo::testing::{NetFrontend, Options};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0x01];

struct Setup {
    backend: Backend,
    qmp: QmpClient,
    /// Frames the backend sends out of its stream netdev.
    wire: FrameReader<UnixStream>,
    wire_w: UnixStream,
    dir: tempfile::TempDir,
}

fn start(extra: &[&str]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let args = [&["--mac", "52:54:00:ab:cd:01"][..], extra].concat();
    let (backend, wire) = common::spawn_with_wire(dir.path(), "", &args, true);
    Setup {
        qmp: backend.qmp(),
        backend,
        wire_w: wire.try_clone().unwrap(),
        wire: FrameReader::new(wire, false),
        dir,
    }
}

/// A bare vhost-user frontend: just enough messages to negotiate protocol features.
struct RawFrontend(UnixStream);

const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const SEND_RARP: u32 = 19;
const NEED_REPLY: u32 = 0x8;
const PROTOCOL_F_RARP: u64 = 1 << 2;
const PROTOCOL_F_REPLY_ACK: u64 = 1 << 3;
const PROTOCOL_F_BACKEND_REQ: u64 = 1 << 5;
const SET_BACKEND_REQ_FD: u32 = 21;

impl RawFrontend {
    fn connect(sock: &std::path::Path) -> Self {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Self(s)
    }

    fn send(&mut self, req: u32, flags: u32, payload: &[u8]) {
        let mut m = Vec::new();
        m.extend_from_slice(&req.to_le_bytes());
        m.extend_from_slice(&(1 | flags).to_le_bytes());
        m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        m.extend_from_slice(payload);
        self.0.write_all(&m).unwrap();
    }

    fn reply_u64(&mut self, req: u32) -> u64 {
        let mut h = [0u8; 12];
        self.0.read_exact(&mut h).unwrap();
        assert_eq!(u32::from_le_bytes(h[..4].try_into().unwrap()), req);
        assert_ne!(
            u32::from_le_bytes(h[4..8].try_into().unwrap()) & 4,
            0,
            "reply flag"
        );
        assert_eq!(u32::from_le_bytes(h[8..12].try_into().unwrap()), 8);
        let mut v = [0u8; 8];
        self.0.read_exact(&mut v).unwrap();
        u64::from_le_bytes(v)
    }

    /// SET_OWNER, features with PROTOCOL_FEATURES, protocol features `want` (of those offered).
    fn negotiate(&mut self, want: u64) -> u64 {
        self.send(SET_OWNER, 0, &[]);
        self.send(GET_FEATURES, 0, &[]);
        let f = self.reply_u64(GET_FEATURES);
        assert_ne!(f & (1 << 30), 0, "PROTOCOL_FEATURES offered");
        self.send(SET_FEATURES, 0, &(f & (1 << 30 | 1 << 32)).to_le_bytes());
        self.send(GET_PROTOCOL_FEATURES, 0, &[]);
        let pf = self.reply_u64(GET_PROTOCOL_FEATURES);
        self.send(SET_PROTOCOL_FEATURES, 0, &(pf & want).to_le_bytes());
        pf
    }

    /// Still served: GET_FEATURES is answered.
    fn alive(&mut self) {
        self.send(GET_FEATURES, 0, &[]);
        assert_ne!(self.reply_u64(GET_FEATURES), 0);
    }
}

fn rarp_payload(mac: [u8; 6]) -> [u8; 8] {
    let mut p = [0u8; 8];
    p[..6].copy_from_slice(&mac);
    p
}

fn assert_rarp(frame: &[u8], mac: [u8; 6]) {
    assert_eq!(frame.len(), 60, "announce frame length");
    assert_eq!(&frame[..6], &[0xff; 6], "broadcast");
    assert_eq!(&frame[6..12], &mac, "source MAC");
    assert_eq!(&frame[12..14], &[0x80, 0x35], "ethertype RARP");
    assert_eq!(
        &frame[14..22],
        &[0, 1, 8, 0, 6, 4, 0, 3],
        "RARP request header"
    );
    assert_eq!(&frame[22..28], &mac, "sender hardware address");
    assert_eq!(&frame[32..38], &mac, "target hardware address");
}

/// The pcap records of a filter-dump file (payloads only).
fn pcap_frames(path: &std::path::Path) -> Vec<Vec<u8>> {
    let data = std::fs::read(path).unwrap();
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= data.len() {
        let incl = u32::from_le_bytes(data[at + 8..at + 12].try_into().unwrap()) as usize;
        at += 16;
        out.push(data[at..at + incl].to_vec());
        at += incl;
    }
    out
}

#[test]
fn send_rarp_broadcasts_an_announce_after_the_filter_chain_and_unknown_requests_keep_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("chain.pcap");
    let dump_obj = format!("filter-dump,id=d0,netdev=s0,file={}", dump.display());
    let mut s = start(&["--object", &dump_obj]);
    let mut fe = RawFrontend::connect(&s.backend.sock);
    let pf = fe.negotiate(PROTOCOL_F_RARP | PROTOCOL_F_REPLY_ACK);
    assert_ne!(
        pf & PROTOCOL_F_RARP,
        0,
        "VHOST_USER_PROTOCOL_F_RARP offered"
    );

    // As QEMU sends it after a migration when REPLY_ACK is negotiated: acked with 0.
    let new_mac = [0x52, 0x54, 0x00, 0x99, 0x88, 0x77];
    fe.send(SEND_RARP, NEED_REPLY, &rarp_payload(new_mac));
    assert_eq!(fe.reply_u64(SEND_RARP), 0, "SEND_RARP acked");
    let f = s.wire.read_frame().unwrap().unwrap();
    assert_eq!(f.vnet_hdr_len, 0);
    assert_rarp(&f.payload, new_mac);
    // Without a reply asked for.
    fe.send(SEND_RARP, 0, &rarp_payload(MAC));
    assert_rarp(&s.wire.read_frame().unwrap().unwrap().payload, MAC);

    // Requests the vhost crate does not handle: answered with failure, session kept.
    fe.send(7, NEED_REPLY, &[]); // SET_LOG_FD without a descriptor
    assert_ne!(fe.reply_u64(7), 0);
    fe.send(20, 0, &1500u64.to_le_bytes()); // NET_SET_MTU, not negotiated
    fe.send(999, NEED_REPLY, &[1, 2, 3]);
    assert_ne!(fe.reply_u64(999), 0);
    fe.send(SEND_RARP, 0, &[1, 2]); // too short: ignored
    fe.send(998, NEED_REPLY, &vec![7u8; 10_000]); // large payload
    assert_ne!(fe.reply_u64(998), 0);
    fe.alive();

    let net = s.qmp.execute("query-net", json!({})).unwrap();
    assert_eq!(net["announces_sent"], 2, "{net}");
    // The chain never saw the announces (the dump sees both directions), but it does see
    // an ordinary frame from the netdev.
    let mut marker = vec![0u8; 64];
    marker[..6].copy_from_slice(&MAC);
    marker[12..14].copy_from_slice(&[0x88, 0xb5]);
    write_frame(&mut s.wire_w, &Frame::ethernet(marker.clone()), false).unwrap();
    common::wait_for(
        Duration::from_secs(10),
        "the dump never saw the marker frame",
        || pcap_frames(&dump).contains(&marker),
    );
    let dumped = pcap_frames(&dump);
    assert!(
        dumped
            .iter()
            .all(|f| f.get(12..14) != Some(&[0x80, 0x35][..])),
        "an announce went through the filter chain"
    );
    drop(s.dir);
}

#[test]
fn qmp_announce_self_sends_the_requested_rounds() {
    let mut s = start(&[]);
    let t0 = Instant::now();
    s.qmp
        .execute(
            "announce-self",
            json!({"initial": 10, "max": 40, "rounds": 3, "step": 20}),
        )
        .unwrap();
    for _ in 0..3 {
        assert_rarp(&s.wire.read_frame().unwrap().unwrap().payload, MAC);
    }
    // 10 + 30 + 40 ms of delays.
    assert!(
        t0.elapsed() >= Duration::from_millis(80),
        "{:?}",
        t0.elapsed()
    );
    // No fourth one.
    s.wire
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(s.wire.read_frame().is_err(), "more announces than rounds");
    // Defaults (5 rounds) and bad arguments.
    s.qmp.execute("announce-self", json!({})).unwrap();
    s.wire
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    for _ in 0..5 {
        assert_rarp(&s.wire.read_frame().unwrap().unwrap().payload, MAC);
    }
    for bad in [
        json!({"rounds": "x"}),
        json!({"rounds": 5000}),
        json!({"bogus": 1}),
    ] {
        assert!(
            s.qmp.execute("announce-self", bad.clone()).is_err(),
            "{bad}"
        );
    }
    let net = s.qmp.execute("query-net", json!({})).unwrap();
    assert_eq!(net["announces_sent"], 8, "{net}");
}

fn guest_frame(i: u8) -> Vec<u8> {
    let mut f = vec![i; 80];
    f[..6].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 9]);
    f[6..12].copy_from_slice(&MAC);
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    f
}

#[test]
fn set_link_changes_config_status_and_drops_frames_both_ways_while_down() {
    let mut s = start(&[]);
    let mut fe = s.backend.frontend(&Options::default());
    let status = |fe: &mut NetFrontend| {
        let c = fe.config(8).unwrap();
        u16::from_le_bytes([c[6], c[7]])
    };
    assert_eq!(status(&mut fe), 1, "link up at start");
    assert_ne!(fe.features() & (1 << 16), 0, "VIRTIO_NET_F_STATUS");
    // Up: frames pass.
    fe.send(&guest_frame(1)).unwrap();
    assert_eq!(
        s.wire.read_frame().unwrap().unwrap().payload,
        guest_frame(1)
    );

    s.qmp
        .execute("set_link", json!({"name": "s0", "up": false}))
        .unwrap();
    assert_eq!(status(&mut fe), 0, "link down in config space");
    fe.send(&guest_frame(2)).unwrap();
    write_frame(&mut s.wire_w, &Frame::ethernet(guest_frame(3)), false).unwrap();
    assert!(
        fe.recv(Duration::from_millis(500)).is_none(),
        "a frame reached the guest while the link was down"
    );
    s.qmp
        .execute("announce-self", json!({"rounds": 1, "initial": 0}))
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let net = s.qmp.execute("query-net", json!({})).unwrap();
    assert_eq!(net["link_up"], false, "{net}");
    assert_eq!(net["link_down_dropped"], 3, "{net}");

    s.qmp
        .execute("set_link", json!({"name": "s0", "up": true}))
        .unwrap();
    assert_eq!(status(&mut fe), 1, "link up again");
    fe.send(&guest_frame(4)).unwrap();
    // The frames sent while down never come out: the next one on the wire is frame 4.
    assert_eq!(
        s.wire.read_frame().unwrap().unwrap().payload,
        guest_frame(4)
    );
    write_frame(&mut s.wire_w, &Frame::ethernet(guest_frame(5)), false).unwrap();
    let (got, _) = fe
        .recv(Duration::from_secs(10))
        .expect("frame after link up");
    assert_eq!(got, guest_frame(5));

    for bad in [
        json!({"name": "nope", "up": false}),
        json!({"name": "s0"}),
        json!({"name": "s0", "up": "yes"}),
    ] {
        assert!(s.qmp.execute("set_link", bad.clone()).is_err(), "{bad}");
    }
}

#[test]
fn set_link_sends_config_change_on_the_backend_request_channel() {
    let mut s = start(&[]);
    let mut fe = RawFrontend::connect(&s.backend.sock);
    let pf = fe.negotiate(PROTOCOL_F_BACKEND_REQ | PROTOCOL_F_REPLY_ACK);
    assert_ne!(pf & PROTOCOL_F_BACKEND_REQ, 0, "BACKEND_REQ offered");
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut m = Vec::new();
    m.extend_from_slice(&SET_BACKEND_REQ_FD.to_le_bytes());
    m.extend_from_slice(&(1 | NEED_REPLY).to_le_bytes());
    m.extend_from_slice(&0u32.to_le_bytes());
    use std::os::fd::AsRawFd;
    fe.0.send_with_fds(&[&m[..]], &[theirs.as_raw_fd()])
        .unwrap();
    assert_eq!(fe.reply_u64(SET_BACKEND_REQ_FD), 0, "channel accepted");
    drop(theirs);
    ours.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut r = &ours;
    for up in [false, true] {
        s.qmp
            .execute("set_link", json!({"name": "s0", "up": up}))
            .unwrap();
        let mut h = [0u8; 12];
        r.read_exact(&mut h).unwrap();
        assert_eq!(
            u32::from_le_bytes(h[..4].try_into().unwrap()),
            2,
            "CONFIG_CHANGE_MSG"
        );
        assert_eq!(
            u32::from_le_bytes(h[4..8].try_into().unwrap()),
            1,
            "version 1"
        );
        assert_eq!(
            u32::from_le_bytes(h[8..12].try_into().unwrap()),
            0,
            "no payload"
        );
    }
    // Same state again: no message.
    s.qmp
        .execute("set_link", json!({"name": "s0", "up": true}))
        .unwrap();
    ours.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut b = [0u8; 1];
    assert!(r.read(&mut b).is_err(), "config change without a change");
    fe.alive();
}

/// What a migration test relies on: after SEND_RARP, a bridge in front of the tap has learnt
/// the guest's MAC on the tap's port (root; a namespace the test creates).
#[test]
fn send_rarp_makes_a_bridge_learn_the_guest_mac_on_the_tap_port() {
    let Some(ns) = common::netns_with_tun("vnrarp") else {
        return;
    };
    let ipn = |args: &[&str]| {
        ns.ip(args).unwrap();
    };
    ipn(&["link", "add", "br0", "type", "bridge"]);
    ipn(&["link", "set", "br0", "up"]);
    let dir = tempfile::tempdir().unwrap();
    let b = common::spawn_with_tap(dir.path(), &ns, "vnrarptap0", "", &[]);
    ipn(&["link", "set", "vnrarptap0", "master", "br0"]);
    ipn(&["link", "set", "vnrarptap0", "up"]);
    let learnt = || {
        let out = Command::new("bridge")
            .args(["-n", ns.name(), "fdb", "show", "br", "br0"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.starts_with("52:54:00:77:66:55 dev vnrarptap0"))
    };
    assert!(!learnt(), "MAC known before the announce");
    let mut fe = RawFrontend::connect(&b.sock);
    fe.negotiate(PROTOCOL_F_RARP);
    fe.send(
        SEND_RARP,
        0,
        &rarp_payload([0x52, 0x54, 0, 0x77, 0x66, 0x55]),
    );
    common::wait_for(
        Duration::from_secs(10),
        "the bridge never learnt the MAC on the tap port",
        learnt,
    );
}
