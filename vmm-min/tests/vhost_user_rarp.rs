//! After a migration or restore, vmm-min announces each net device: `VHOST_USER_SEND_RARP`
//! to a backend that negotiated `VHOST_USER_PROTOCOL_F_RARP`. Checked against vhost-net-colo,
//! whose netdev is a `stream` socket held by the test: the RARP broadcast with the guest's MAC
//! comes out of it.

#![allow(clippy::unwrap_used)] // test code

mod common;

use common::*;
use std::io::Read;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmm_min::memory::GuestRam;
use vmm_min::virtio::VIRTIO_F_VERSION_1;
use vmm_min::virtio::mmio::{MmioTransport, reg};
use vmm_min::virtio::status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK};
use vmm_min::virtio::vhost_user::{Kind, RamInfo, VhostUserDevice, VhostUserSpec};
use vmm_sys_util::eventfd::EventFd;

/// Our `vhost-net-colo` binary (another crate's: built on demand by the harness).
fn vhost_net_colo() -> PathBuf {
    colo_tests::cargo_bin("vhost-net-colo").unwrap()
}

#[test]
fn announce_sends_rarp_with_the_guest_mac_through_the_net_backend() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("net.sock");
    let wire_path = dir.path().join("wire.sock");
    let l = UnixListener::bind(&wire_path).unwrap();
    let _backend = Proc(
        Command::new(vhost_net_colo())
            .arg("--socket")
            .arg(&sock)
            .arg("--netdev")
            .arg(format!(
                "stream,id=s0,server=off,addr.type=unix,addr.path={}",
                wire_path.display()
            ))
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (mut wire, _) = l.accept().unwrap();
    wire.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no vhost-user socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let ram = GuestRam::new(32 << 20).unwrap();
    let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x77];
    let spec = VhostUserSpec::parse(
        Kind::Net,
        &format!("vhost-user,socket={},mac=52:54:00:12:34:77", sock.display()),
    )
    .unwrap();
    let dev = VhostUserDevice::connect(spec, RamInfo::new(&ram), Duration::from_secs(5)).unwrap();
    assert_ne!(
        dev.state().protocol_features & (1 << 2),
        0,
        "RARP protocol feature negotiated"
    );
    let kicks: Vec<EventFd> = (0..2)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .collect();
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(Box::new(dev), kicks, call);
    w(&mut t, reg::STATUS, ACKNOWLEDGE);
    w(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER);
    w(&mut t, reg::DRIVER_FEATURES_SEL, 1);
    w(
        &mut t,
        reg::DRIVER_FEATURES,
        (VIRTIO_F_VERSION_1 >> 32) as u32,
    );
    w(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    for q in 0..2u32 {
        let base = 0x10000 + u64::from(q) * 0x4000;
        w(&mut t, reg::QUEUE_SEL, q);
        w(&mut t, reg::QUEUE_NUM, 16);
        w(&mut t, reg::QUEUE_DESC_LOW, base as u32);
        w(&mut t, reg::QUEUE_AVAIL_LOW, (base + 0x1000) as u32);
        w(&mut t, reg::QUEUE_USED_LOW, (base + 0x2000) as u32);
        w(&mut t, reg::QUEUE_READY, 1);
    }
    w(
        &mut t,
        reg::STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    );
    assert!(t.state().activated);
    t.announce();
    // One frame on the stream netdev: 4-byte big-endian length, then the Ethernet frame.
    let mut len = [0u8; 4];
    wire.read_exact(&mut len).unwrap();
    let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
    wire.read_exact(&mut frame).unwrap();
    assert_eq!(&frame[0..6], &[0xff; 6], "broadcast");
    assert_eq!(&frame[6..12], &mac, "from the guest's MAC");
    assert_eq!(&frame[12..14], &[0x80, 0x35], "ethertype RARP");
}
