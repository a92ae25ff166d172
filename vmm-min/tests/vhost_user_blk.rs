//! The vhost-user frontend against a backend nobody here wrote (`qemu-storage-daemon`'s
//! vhost-user-blk export), without a guest: the test lays out a split virtqueue in the VM's
//! memfd RAM, activates the device through the virtio-MMIO registers like a driver would, kicks
//! the queue and checks the backend's writes in guest memory and in the image file. Also: bad
//! backends (closing mid-handshake, malformed replies) give clear errors, no panic, no hang.

#![allow(clippy::unwrap_used)] // test helpers

mod common;

use common::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm_min::memory::GuestRam;
use vmm_min::virtio::mmio::{MmioTransport, reg};
use vmm_min::virtio::status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK};
use vmm_min::virtio::vhost_user::{Kind, RamInfo, VhostUserDevice, VhostUserSpec};
use vmm_min::virtio::{VIRTIO_F_VERSION_1, VirtioDevice};
use vmm_sys_util::eventfd::EventFd;

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn qsd(img: &Path, sock: &Path) -> Proc {
    let child = Command::new("qemu-storage-daemon")
        .args([
            "--blockdev",
            &format!("driver=file,node-name=f,filename={}", img.display()),
            "--export",
            &format!(
                "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on",
                sock.display()
            ),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let p = Proc(child);
    let end = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(
            Instant::now() < end,
            "qemu-storage-daemon did not create {sock:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

/// Submits one request (header, data, status) as descriptors 3n..3n+2 and waits for it.
fn blk_request(
    ram: &GuestRam,
    call: &EventFd,
    kick: &EventFd,
    n: u16,
    write: bool,
    sector: u64,
    data_addr: u64,
) -> u8 {
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    let m = ram.mem();
    let hdr = 0x20000 + u64::from(n) * 0x100;
    let status = hdr + 0x80;
    m.write_obj(u32::from(write), GuestAddress(hdr)).unwrap();
    m.write_obj(0u32, GuestAddress(hdr + 4)).unwrap();
    m.write_obj(sector, GuestAddress(hdr + 8)).unwrap();
    m.write_obj(0xffu8, GuestAddress(status)).unwrap();
    let d = n * 3;
    put_desc(ram, d, hdr, 16, NEXT, d + 1);
    put_desc(
        ram,
        d + 1,
        data_addr,
        512,
        NEXT | if write { 0 } else { WRITE },
        d + 2,
    );
    put_desc(ram, d + 2, status, 1, WRITE, 0);
    m.write_obj(d, GuestAddress(AVAIL + 4 + 2 * u64::from(n % QSIZE)))
        .unwrap();
    m.write_obj(n + 1, GuestAddress(AVAIL + 2)).unwrap();
    kick.write(1).unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let used_idx: u16 = m.read_obj(GuestAddress(USED + 2)).unwrap();
        if used_idx == n + 1 {
            break;
        }
        assert!(Instant::now() < end, "backend did not complete request {n}");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(call.read().is_ok(), "backend signalled the call eventfd");
    let id: u32 = m
        .read_obj(GuestAddress(USED + 4 + 8 * u64::from(n % QSIZE)))
        .unwrap();
    assert_eq!(id, u32::from(d));
    m.read_obj(GuestAddress(status)).unwrap()
}

#[test]
fn qemu_storage_daemon_serves_reads_and_writes_through_our_frontend() {
    if !have("qemu-storage-daemon") {
        eprintln!(
            "SKIPPED: qemu-storage-daemon not installed (Debian package qemu-system-common / qemu-utils)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let mut content = vec![0u8; 1 << 20];
    content[..512].fill(0xa5);
    std::fs::write(&img, &content).unwrap();
    let sock = dir.path().join("blk.sock");
    let _qsd = qsd(&img, &sock);

    let ram = GuestRam::new(32 << 20).unwrap();
    let spec = VhostUserSpec::parse(
        Kind::Block,
        &format!("vhost-user,socket={}", sock.display()),
    )
    .unwrap();
    let dev = VhostUserDevice::connect(spec, RamInfo::new(&ram), Duration::from_secs(5)).unwrap();
    assert_eq!(dev.device_type(), 2);
    let mut cfg = [0u8; 8];
    let mut dev_box: Box<dyn VirtioDevice> = Box::new(dev);
    dev_box.read_config(0, &mut cfg);
    assert_eq!(
        u64::from_le_bytes(cfg),
        (1 << 20) / 512,
        "capacity from GET_CONFIG"
    );
    let features = dev_box.device_features();
    assert_eq!(
        features & (1 << 30),
        0,
        "PROTOCOL_FEATURES is not a guest feature"
    );

    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(
        dev_box,
        vec![kick.try_clone().unwrap()],
        call.try_clone().unwrap(),
    );
    w(&mut t, reg::STATUS, ACKNOWLEDGE);
    w(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER);
    w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
    assert_ne!(r(&mut t, reg::DEVICE_FEATURES) & 1, 0, "VERSION_1 offered");
    w(&mut t, reg::DRIVER_FEATURES_SEL, 0);
    w(&mut t, reg::DRIVER_FEATURES, 0);
    w(&mut t, reg::DRIVER_FEATURES_SEL, 1);
    w(
        &mut t,
        reg::DRIVER_FEATURES,
        (VIRTIO_F_VERSION_1 >> 32) as u32,
    );
    w(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_ne!(r(&mut t, reg::STATUS) & FEATURES_OK, 0);
    w(&mut t, reg::QUEUE_SEL, 0);
    w(&mut t, reg::QUEUE_NUM, u32::from(QSIZE));
    w(&mut t, reg::QUEUE_DESC_LOW, DESC as u32);
    w(&mut t, reg::QUEUE_AVAIL_LOW, AVAIL as u32);
    w(&mut t, reg::QUEUE_USED_LOW, USED as u32);
    w(&mut t, reg::QUEUE_READY, 1);
    w(
        &mut t,
        reg::STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    );
    assert!(t.state().activated, "status {:#x}", r(&mut t, reg::STATUS));

    // Read sector 0 (0xa5 in the image) into guest memory.
    assert_eq!(blk_request(&ram, &call, &kick, 0, false, 0, 0x30000), 0);
    let mut buf = [0u8; 512];
    ram.mem()
        .read_slice(&mut buf, GuestAddress(0x30000))
        .unwrap();
    assert!(buf.iter().all(|b| *b == 0xa5));
    // Write sector 3 from guest memory, then find it in the image file.
    ram.mem()
        .write_slice(&[0x3c; 512], GuestAddress(0x31000))
        .unwrap();
    assert_eq!(blk_request(&ram, &call, &kick, 1, true, 3, 0x31000), 0);
    let mut f = std::fs::File::open(&img).unwrap();
    let mut all = Vec::new();
    f.read_to_end(&mut all).unwrap();
    assert!(all[3 * 512..4 * 512].iter().all(|b| *b == 0x3c));
    assert!(all[4 * 512..5 * 512].iter().all(|b| *b == 0));
    // The guest's interrupt handler sees the used-buffer cause.
    assert_eq!(r(&mut t, reg::INTERRUPT_STATUS) & 1, 1);
    // Reset stops the rings (GET_VRING_BASE) and returns to the initial state.
    w(&mut t, reg::STATUS, 0);
    assert_eq!(r(&mut t, reg::STATUS), 0);
}

fn fake_backend(
    sock: &Path,
    behaviour: fn(std::os::unix::net::UnixStream),
) -> std::thread::JoinHandle<()> {
    let l = UnixListener::bind(sock).unwrap();
    std::thread::spawn(move || {
        if let Ok((s, _)) = l.accept() {
            behaviour(s);
        }
    })
}

fn connect_err(sock: &Path) -> String {
    let ram = GuestRam::new(16 << 20).unwrap();
    let spec = VhostUserSpec::parse(
        Kind::Block,
        &format!("vhost-user,socket={}", sock.display()),
    )
    .unwrap();
    let start = Instant::now();
    let e = match VhostUserDevice::connect(spec, RamInfo::new(&ram), Duration::from_secs(2)) {
        Ok(_) => panic!("a broken backend was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "took too long: {e}"
    );
    e
}

#[test]
fn backend_closing_mid_handshake_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("b.sock");
    let t = fake_backend(&sock, |mut s| {
        // Read SET_OWNER, then the GET_FEATURES header, and hang up.
        let mut b = [0u8; 12];
        let _ = s.read_exact(&mut b);
        let _ = s.read_exact(&mut b);
    });
    let e = connect_err(&sock);
    assert!(e.contains(&sock.display().to_string()), "{e}");
    assert!(e.contains("GET_FEATURES") || e.contains("SET_OWNER"), "{e}");
    t.join().unwrap();
}

#[test]
fn malformed_backend_reply_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("m.sock");
    let t = fake_backend(&sock, |mut s| {
        let mut b = [0u8; 12];
        let _ = s.read_exact(&mut b); // SET_OWNER
        let _ = s.read_exact(&mut b); // GET_FEATURES
        // A reply for another request, with a silly size, then garbage.
        let mut reply = Vec::new();
        reply.extend_from_slice(&7u32.to_le_bytes());
        reply.extend_from_slice(&0x5u32.to_le_bytes());
        reply.extend_from_slice(&4096u32.to_le_bytes());
        reply.extend_from_slice(&[0xee; 64]);
        let _ = s.write_all(&reply);
        std::thread::sleep(Duration::from_millis(200));
    });
    let e = connect_err(&sock);
    assert!(e.contains("GET_FEATURES"), "{e}");
    t.join().unwrap();
}

#[test]
fn missing_backend_socket_is_a_clear_error() {
    let e = connect_err(Path::new("/nonexistent/dir/x.sock"));
    assert!(
        e.contains("cannot connect") && e.contains("/nonexistent/dir/x.sock"),
        "{e}"
    );
}

#[test]
fn silent_backend_times_out_instead_of_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let t = fake_backend(&sock, |mut s| {
        // Read everything, answer nothing, keep the socket open for a while.
        let mut b = [0u8; 256];
        let end = Instant::now() + Duration::from_secs(25);
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        while Instant::now() < end {
            let _ = s.read(&mut b);
        }
    });
    let e = connect_err(&sock);
    assert!(e.contains("GET_FEATURES"), "{e}");
    t.join().unwrap();
}

#[test]
fn qemu_storage_daemon_fails_the_log_probe_and_serves_without_the_log() {
    if !have("qemu-storage-daemon") {
        eprintln!(
            "SKIPPED: qemu-storage-daemon not installed (Debian package qemu-system-common / qemu-utils)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let mut content = vec![0u8; 1 << 20];
    content[512..1024].fill(0x77);
    std::fs::write(&img, &content).unwrap();
    let sock = dir.path().join("blk.sock");
    let _qsd = qsd(&img, &sock);

    let ram = GuestRam::new(32 << 20).unwrap();
    let spec = VhostUserSpec::parse(
        Kind::Block,
        &format!("vhost-user,socket={}", sock.display()),
    )
    .unwrap();
    let mut dev =
        VhostUserDevice::connect(spec, RamInfo::new(&ram), Duration::from_secs(5)).unwrap();
    let log = std::sync::Arc::new(vmm_min::dirty_log::SharedLog::new(ram.last_addr()).unwrap());
    let start = Instant::now();
    // libvhost-user answers SET_LOG_BASE with 8 bytes where vhost 0.18 waits for 16: the probe
    // times out, the frontend reconnects without LOG_SHMFD.
    assert!(!dev.set_dirty_log(log.clone()).unwrap());
    assert!(!dev.logs_dirty_pages());
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "probe + reconnect took {:?}",
        start.elapsed()
    );
    assert_eq!(
        dev.state().protocol_features
            & vhost::vhost_user::VhostUserProtocolFeatures::LOG_SHMFD.bits(),
        0
    );

    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(
        Box::new(dev),
        vec![kick.try_clone().unwrap()],
        call.try_clone().unwrap(),
    );
    w(&mut t, reg::STATUS, ACKNOWLEDGE);
    w(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER);
    w(&mut t, reg::DRIVER_FEATURES_SEL, 1);
    w(
        &mut t,
        reg::DRIVER_FEATURES,
        (VIRTIO_F_VERSION_1 >> 32) as u32,
    );
    w(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    w(&mut t, reg::QUEUE_SEL, 0);
    w(&mut t, reg::QUEUE_NUM, u32::from(QSIZE));
    w(&mut t, reg::QUEUE_DESC_LOW, DESC as u32);
    w(&mut t, reg::QUEUE_AVAIL_LOW, AVAIL as u32);
    w(&mut t, reg::QUEUE_USED_LOW, USED as u32);
    w(&mut t, reg::QUEUE_READY, 1);
    w(
        &mut t,
        reg::STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    );
    assert!(t.state().activated, "status {:#x}", r(&mut t, reg::STATUS));
    assert_eq!(blk_request(&ram, &call, &kick, 0, false, 1, 0x30000), 0);
    let mut buf = [0u8; 512];
    ram.mem()
        .read_slice(&mut buf, GuestAddress(0x30000))
        .unwrap();
    assert!(buf.iter().all(|b| *b == 0x77), "read after the fallback");
    assert!(
        log.take(0, 64 * 64).iter().all(|w| *w == 0),
        "nothing logged"
    );
}
