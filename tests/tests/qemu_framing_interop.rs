//! QEMU interop of the chardev framing (`colo_proto::frame`).
//!
//! A real QEMU 7.2 `colo-compare` (`-M none`, an iothread, socket chardevs) gets identical
//! primary and secondary frames in our encoding; what it releases on `outdev` is read back with
//! our decoder and must be byte-for-byte the primary frame, with and without
//! `vnet_hdr_support`.
//!
//! The test listens on three Unix sockets and QEMU connects to them as a chardev client: QEMU
//! connects client chardevs synchronously while it starts, so once all three are accepted
//! colo-compare is wired up and no released frame can be lost to a not-yet-accepted outdev.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{ErrorKind, Read};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use colo_proto::frame::{Frame, FrameDecoder, write_frame};

const QEMU: &str = "qemu-system-x86_64";

/// Kills the child by PID when dropped (also on panic).
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu_available() -> bool {
    Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Accepts one connection, failing if QEMU exits or the deadline passes.
fn accept(listener: &UnixListener, child: &mut ChildGuard, what: &str) -> UnixStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                return s;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("accept {what}: {e}"),
        }
        if let Some(status) = child.0.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = child.0.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("QEMU exited ({status}) before connecting {what}: {err}");
        }
        assert!(
            Instant::now() < deadline,
            "QEMU did not connect {what} in time"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Reads one frame from `out` within `timeout`.
fn read_one(out: &mut UnixStream, dec: &mut FrameDecoder, timeout: Duration) -> Option<Frame> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 65536];
    loop {
        if let Some(f) = dec.next_frame().unwrap() {
            return Some(f);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        out.set_read_timeout(Some(left)).unwrap();
        match out.read(&mut buf) {
            Ok(0) => panic!("QEMU closed outdev"),
            Ok(n) => dec.push(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return None;
            }
            Err(e) => panic!("read outdev: {e}"),
        }
    }
}

// ---- real Ethernet/IPv4 frames with correct checksums ----

fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn csum_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Ethernet + IPv4 (+ the given L4 bytes, whose checksum field is filled in here).
fn ipv4_frame(proto: u8, src: [u8; 4], dst: [u8; 4], ident: u16, mut l4: Vec<u8>) -> Vec<u8> {
    let total = 20 + l4.len();
    let mut ip = vec![0x45, 0, (total >> 8) as u8, total as u8];
    ip.extend_from_slice(&ident.to_be_bytes());
    ip.extend_from_slice(&[0x40, 0, 64, proto, 0, 0]);
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let c = csum_fold(csum_add(0, &ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    // L4 checksum: TCP/UDP over the pseudo header, ICMP over the message only.
    let ck_off = match proto {
        6 => Some(16),
        17 => Some(6),
        1 => None,
        _ => unreachable!(),
    };
    match ck_off {
        Some(off) => {
            let mut pseudo = Vec::new();
            pseudo.extend_from_slice(&src);
            pseudo.extend_from_slice(&dst);
            pseudo.extend_from_slice(&[0, proto]);
            pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            let c = csum_fold(csum_add(csum_add(0, &pseudo), &l4));
            l4[off..off + 2].copy_from_slice(&c.to_be_bytes());
        }
        None => {
            let c = csum_fold(csum_add(0, &l4));
            l4[2..4].copy_from_slice(&c.to_be_bytes());
        }
    }
    let mut f = vec![
        0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x52, 0x54, 0, 0x65, 0x43, 0x21, 8, 0,
    ];
    f.extend_from_slice(&ip);
    f.extend_from_slice(&l4);
    f
}

fn udp_frame(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut l4 = Vec::with_capacity(len);
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    l4.extend_from_slice(&(len as u16).to_be_bytes());
    l4.extend_from_slice(&[0, 0]);
    l4.extend_from_slice(payload);
    ipv4_frame(17, [10, 0, 0, 1], [10, 0, 0, 2], 1, l4)
}

fn tcp_frame(sport: u16, dport: u16, seq: u32, ack: u32, payload: &[u8]) -> Vec<u8> {
    let mut l4 = Vec::with_capacity(20 + payload.len());
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    l4.extend_from_slice(&seq.to_be_bytes());
    l4.extend_from_slice(&ack.to_be_bytes());
    l4.extend_from_slice(&[0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]); // PSH|ACK
    l4.extend_from_slice(payload);
    ipv4_frame(6, [10, 0, 0, 1], [10, 0, 0, 2], 2, l4)
}

fn icmp_echo_frame(id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut l4 = vec![8, 0, 0, 0];
    l4.extend_from_slice(&id.to_be_bytes());
    l4.extend_from_slice(&seq.to_be_bytes());
    l4.extend_from_slice(payload);
    ipv4_frame(1, [10, 0, 0, 1], [10, 0, 0, 2], 3, l4)
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// The frames sent: UDP of several sizes (up to a 9000-byte jumbo), TCP with payload, ICMP.
fn test_frames() -> Vec<Vec<u8>> {
    let mut v = vec![
        udp_frame(5000, 7, b"hello colo"),
        udp_frame(5001, 7, &pattern(1472, 1)),
        udp_frame(5002, 7, &pattern(8972, 2)),
        icmp_echo_frame(0x77, 1, &pattern(56, 3)),
    ];
    let mut seq = 1000u32;
    for (i, n) in [100usize, 1460, 7].into_iter().enumerate() {
        v.push(tcp_frame(40000, 80, seq, 5000, &pattern(n, 10 + i as u8)));
        seq += n as u32;
    }
    v
}

fn run_interop(vnet_hdr_support: bool) {
    if !qemu_available() {
        eprintln!("SKIPPED: {QEMU} not installed (Debian package qemu-system-x86)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = |n: &str| dir.path().join(n);
    let pl = UnixListener::bind(sock("pin.sock")).unwrap();
    let sl = UnixListener::bind(sock("sin.sock")).unwrap();
    let ol = UnixListener::bind(sock("out.sock")).unwrap();
    let chardev = |id: &str, p: &Path| format!("socket,id={id},path={}", p.display());
    let mut compare =
        String::from("colo-compare,id=c,primary_in=pin,secondary_in=sin,outdev=out,iothread=it");
    if vnet_hdr_support {
        compare.push_str(",vnet_hdr_support=on");
    }
    let child = Command::new(QEMU)
        .args(["-M", "none", "-nodefaults", "-display", "none"])
        .args(["-chardev", &chardev("pin", &sock("pin.sock"))])
        .args(["-chardev", &chardev("sin", &sock("sin.sock"))])
        .args(["-chardev", &chardev("out", &sock("out.sock"))])
        .args(["-object", "iothread,id=it", "-object", &compare])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = ChildGuard(child);
    // QEMU opens chardevs in command-line order.
    let mut pin = accept(&pl, &mut child, "primary_in");
    let mut sin = accept(&sl, &mut child, "secondary_in");
    let mut out = accept(&ol, &mut child, "outdev");

    let mut dec = FrameDecoder::new(vnet_hdr_support);
    for (i, eth) in test_frames().into_iter().enumerate() {
        let frame = if vnet_hdr_support {
            // A virtio_net_hdr_mrg_rxbuf (12 bytes) in front, flags showing it is ours.
            let mut p = vec![0u8; 12];
            p[0] = 0; // flags
            p[10] = 1; // num_buffers = 1
            p.extend_from_slice(&eth);
            Frame {
                vnet_hdr_len: 12,
                payload: p,
            }
        } else {
            Frame::ethernet(eth)
        };
        write_frame(&mut pin, &frame, vnet_hdr_support).unwrap();
        // Nothing leaves before the secondary twin arrives.
        assert!(
            read_one(&mut out, &mut dec, Duration::from_millis(150)).is_none(),
            "frame {i} released before its secondary twin"
        );
        write_frame(&mut sin, &frame, vnet_hdr_support).unwrap();
        let got = read_one(&mut out, &mut dec, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("frame {i} not released by QEMU (vnet {vnet_hdr_support})"));
        assert_eq!(got.vnet_hdr_len, frame.vnet_hdr_len, "frame {i}");
        assert_eq!(
            got.payload, frame.payload,
            "frame {i} altered by the round trip"
        );
    }
    // Nothing else was released.
    assert!(read_one(&mut out, &mut dec, Duration::from_millis(200)).is_none());
    assert!(child.0.try_wait().unwrap().is_none(), "QEMU died");
}

#[test]
fn qemu_colo_compare_releases_our_frames_intact() {
    run_interop(false);
}

#[test]
fn qemu_colo_compare_releases_our_frames_intact_with_vnet_hdr() {
    run_interop(true);
}
