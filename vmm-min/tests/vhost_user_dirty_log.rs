//! Backend reconnect and the vhost-user shared dirty log against our own backend (`vhost-blk-colo`, vhost-user-backend
//! with LOG_SHMFD and LOG_ALL), without a guest: the test activates the device through the
//! virtio-MMIO registers with a shared log attached, submits a disk read into a guest buffer,
//! and checks that the pages the backend wrote (data buffer, status byte, used ring) are in the
//! shared log and in the KVM + shared-log bitmap `query-dirty-pages` reports.

#![allow(clippy::unwrap_used)] // test code

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm_min::dirty_log::SharedLog;
use vmm_min::memory::GuestRam;
use vmm_min::virtio::VIRTIO_F_VERSION_1;
use vmm_min::virtio::mmio::{MmioTransport, reg};
use vmm_min::virtio::status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK};
use vmm_min::virtio::vhost_user::{Kind, RamInfo, VhostUserDevice, VhostUserSpec};
use vmm_min::vm::{DirtyTracker, Vm, VmConfig};
use vmm_sys_util::eventfd::EventFd;

/// Our `vhost-blk-colo` binary (another crate's: built on demand by the harness).
fn vhost_blk_colo() -> PathBuf {
    colo_tests::cargo_bin("vhost-blk-colo").unwrap()
}

fn start_backend(img: &Path, sock: &Path) -> Proc {
    let child = Command::new(vhost_blk_colo())
        .arg("--socket")
        .arg(sock)
        .arg("--drive")
        .arg(format!(
            "id=d0,driver=raw,file.filename={},file.driver=file",
            img.display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let p = Proc(child);
    let end = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(
            Instant::now() < end,
            "vhost-blk-colo did not create {sock:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

/// Submits request `n` (header at 0x20000 + n*0x100, status at +0x80) and waits for it.
fn blk_request(ram: &GuestRam, kick: &EventFd, n: u16, write: bool, sector: u64, data: u64) -> u8 {
    submit(ram, kick, n, write, sector, data);
    wait_used(ram, n)
}

fn submit(ram: &GuestRam, kick: &EventFd, n: u16, write: bool, sector: u64, data: u64) {
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    let m = ram.mem();
    let hdr = 0x20000 + u64::from(n) * 0x100;
    let status = hdr + 0x80;
    m.write_obj(u32::from(write), GuestAddress(hdr)).unwrap();
    m.write_obj(0u32, GuestAddress(hdr + 4)).unwrap();
    m.write_obj(sector, GuestAddress(hdr + 8)).unwrap();
    m.write_obj(0xffu8, GuestAddress(status)).unwrap();
    let d = (n * 3) % QSIZE;
    put_desc(ram, d, hdr, 16, NEXT, d + 1);
    let dflags = NEXT | if write { 0 } else { WRITE };
    put_desc(ram, d + 1, data, 512, dflags, d + 2);
    put_desc(ram, d + 2, status, 1, WRITE, 0);
    m.write_obj(d, GuestAddress(AVAIL + 4 + 2 * u64::from(n % QSIZE)))
        .unwrap();
    m.write_obj(n + 1, GuestAddress(AVAIL + 2)).unwrap();
    kick.write(1).unwrap();
}

/// Waits until request `n` is in the used ring; returns its status byte.
fn wait_used(ram: &GuestRam, n: u16) -> u8 {
    let m = ram.mem();
    let status = 0x20000 + u64::from(n) * 0x100 + 0x80;
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let used_idx: u16 = m.read_obj(GuestAddress(USED + 2)).unwrap();
        if used_idx == n + 1 {
            break;
        }
        assert!(Instant::now() < end, "backend did not complete request {n}");
        std::thread::sleep(Duration::from_millis(5));
    }
    m.read_obj(GuestAddress(status)).unwrap()
}

fn bit(bitmap: &[u64], page: u64) -> bool {
    bitmap
        .get((page / 64) as usize)
        .is_some_and(|w| w & (1 << (page % 64)) != 0)
}

/// Drives a virtio-MMIO transport to DRIVER_OK with one queue of `QSIZE` at DESC/AVAIL/USED.
fn activate(t: &mut MmioTransport) {
    w(t, reg::STATUS, ACKNOWLEDGE);
    w(t, reg::STATUS, ACKNOWLEDGE | DRIVER);
    w(t, reg::DRIVER_FEATURES_SEL, 0);
    w(t, reg::DRIVER_FEATURES, 0);
    w(t, reg::DRIVER_FEATURES_SEL, 1);
    w(t, reg::DRIVER_FEATURES, (VIRTIO_F_VERSION_1 >> 32) as u32);
    w(t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_ne!(r(t, reg::STATUS) & FEATURES_OK, 0);
    w(t, reg::QUEUE_SEL, 0);
    w(t, reg::QUEUE_NUM, u32::from(QSIZE));
    w(t, reg::QUEUE_DESC_LOW, DESC as u32);
    w(t, reg::QUEUE_AVAIL_LOW, AVAIL as u32);
    w(t, reg::QUEUE_USED_LOW, USED as u32);
    w(t, reg::QUEUE_READY, 1);
    w(
        t,
        reg::STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    );
    assert!(t.state().activated, "status {:#x}", r(t, reg::STATUS));
}

#[test]
fn backend_writes_to_guest_memory_show_in_the_dirty_bitmap() {
    let vm = match Vm::new(VmConfig {
        memory: 32 << 20,
        cpus: 1,
        irqchip: false,
    }) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("SKIPPED: no usable KVM here ({e}): the dirty bitmap merges KVM's log");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let mut content = vec![0u8; 1 << 20];
    content[..512].fill(0x5a);
    std::fs::write(&img, &content).unwrap();
    let sock = dir.path().join("blk.sock");
    let _backend = start_backend(&img, &sock);

    let ram = vm.ram();
    let log = Arc::new(SharedLog::new(ram.last_addr()).unwrap());
    let tracker = DirtyTracker::new(&vm).with_logs(vec![log.clone()]);
    // First call: logging on, every page reported.
    let first = tracker.collect().unwrap();
    assert!(bit(&first[0].1, 0x40));

    let spec = VhostUserSpec::parse(
        Kind::Block,
        &format!("vhost-user,socket={}", sock.display()),
    )
    .unwrap();
    let mut dev =
        VhostUserDevice::connect(spec, RamInfo::new(ram), Duration::from_secs(5)).unwrap();
    assert!(
        dev.set_dirty_log(log.clone()).unwrap(),
        "vhost-blk-colo offers LOG_SHMFD and LOG_ALL"
    );
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(Box::new(dev), vec![kick.try_clone().unwrap()], call);
    let start = Instant::now();
    activate(&mut t);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "activation with SET_LOG_BASE took {:?}",
        start.elapsed()
    );
    // Nothing written by the backend yet (our own writes to RAM go through no log).
    let before = tracker.collect().unwrap();
    assert!(!bit(&before[0].1, 0x40), "data page clean before the read");

    // A disk read: the backend writes sector 0 into guest page 0x40.
    assert_eq!(blk_request(ram, &kick, 0, false, 0, 0x40000), 0);
    let mut buf = [0u8; 512];
    ram.mem()
        .read_slice(&mut buf, GuestAddress(0x40000))
        .unwrap();
    assert!(
        buf.iter().all(|b| *b == 0x5a),
        "data read into guest memory"
    );
    let after = tracker.collect().unwrap();
    let bm = &after[0].1;
    assert!(bit(bm, 0x40), "data page 0x40000 dirty");
    assert!(bit(bm, 0x20), "status page 0x20000 dirty");
    assert!(bit(bm, USED / 4096), "used ring page dirty");
    assert!(!bit(bm, 0x50), "an untouched page stays clean");
    let count: u32 = after
        .iter()
        .flat_map(|(_, b)| b)
        .map(|w| w.count_ones())
        .sum();
    assert!(count >= 3, "dirty count {count}");
    // A write request: the backend only reads the data page; status and used ring are written.
    ram.mem()
        .write_slice(&[7; 512], GuestAddress(0x41000))
        .unwrap();
    assert_eq!(blk_request(ram, &kick, 1, true, 2, 0x41000), 0);
    let again = tracker.collect().unwrap();
    assert!(
        !bit(&again[0].1, 0x40),
        "log cleared by the previous collect"
    );
    assert!(
        !bit(&again[0].1, 0x41),
        "a buffer the backend only read is clean"
    );
    assert!(bit(&again[0].1, 0x20), "status page dirty again");
    w(&mut t, reg::STATUS, 0);
    assert_eq!(r(&mut t, reg::STATUS), 0);
}

#[test]
fn backend_killed_and_restarted_on_the_same_socket_the_ring_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let mut content = vec![0u8; 1 << 20];
    content[..512].fill(0x5a);
    std::fs::write(&img, &content).unwrap();
    let sock = dir.path().join("blk.sock");
    let mut backend = start_backend(&img, &sock);

    let ram = GuestRam::new(32 << 20).unwrap();
    let spec = VhostUserSpec::parse(
        Kind::Block,
        &format!("vhost-user,socket={}", sock.display()),
    )
    .unwrap();
    let dev = VhostUserDevice::connect(spec, RamInfo::new(&ram), Duration::from_secs(5)).unwrap();
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(Box::new(dev), vec![kick.try_clone().unwrap()], call);
    activate(&mut t);
    assert_eq!(blk_request(&ram, &kick, 0, false, 0, 0x40000), 0);

    // SIGKILL the backend; submit a write while it is gone; start a new one on the socket.
    backend.0.kill().unwrap();
    backend.0.wait().unwrap();
    ram.mem()
        .write_slice(&[0x3c; 512], GuestAddress(0x41000))
        .unwrap();
    submit(&ram, &kick, 1, true, 5, 0x41000);
    std::thread::sleep(Duration::from_millis(300));
    let used: u16 = ram.mem().read_obj(GuestAddress(USED + 2)).unwrap();
    assert_eq!(used, 1, "nothing completes while no backend runs");
    let _ = std::fs::remove_file(&sock);
    let _backend2 = start_backend(&img, &sock);
    assert_eq!(
        wait_used(&ram, 1),
        0,
        "request submitted while down completed"
    );
    let disk = std::fs::read(&img).unwrap();
    assert!(disk[5 * 512..6 * 512].iter().all(|b| *b == 0x3c));
    // And the ring keeps working: a read after the reconnect, completed exactly once.
    assert_eq!(blk_request(&ram, &kick, 2, false, 5, 0x42000), 0);
    let mut buf = [0u8; 512];
    ram.mem()
        .read_slice(&mut buf, GuestAddress(0x42000))
        .unwrap();
    assert!(buf.iter().all(|b| *b == 0x3c));
    std::thread::sleep(Duration::from_millis(100));
    let used: u16 = ram.mem().read_obj(GuestAddress(USED + 2)).unwrap();
    assert_eq!(used, 3, "no request completed twice");
    // Reset goes to the new backend (GET_VRING_BASE answered, no hang).
    let start = Instant::now();
    w(&mut t, reg::STATUS, 0);
    assert_eq!(r(&mut t, reg::STATUS), 0);
    assert!(start.elapsed() < Duration::from_secs(5));
}

/// A transport over vhost-blk-colo on `sock`; returns it and its queue-0 kick.
fn blk_transport(ram: &GuestRam, sock: &Path) -> (MmioTransport, EventFd) {
    let spec = VhostUserSpec::parse(
        Kind::Block,
        &format!("vhost-user,socket={}", sock.display()),
    )
    .unwrap();
    let dev = VhostUserDevice::connect(spec, RamInfo::new(ram), Duration::from_secs(5)).unwrap();
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let t = MmioTransport::new(Box::new(dev), vec![kick.try_clone().unwrap()], call);
    (t, kick)
}

fn used_idx(ram: &GuestRam) -> u16 {
    ram.mem().read_obj(GuestAddress(USED + 2)).unwrap()
}

#[test]
fn rings_stop_with_get_vring_base_restart_from_the_base_and_a_restored_transport_carries_on() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let (sock_a, sock_b) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let _a = start_backend(&img, &sock_a);
    let _b = start_backend(&img, &sock_b);
    let ram = GuestRam::new(32 << 20).unwrap();
    let sector_data = |n: u64, v: u8| {
        ram.mem()
            .write_slice(&[v; 512], GuestAddress(0x30000 + n * 0x1000))
            .unwrap();
        0x30000 + n * 0x1000
    };
    let (mut t, kick) = blk_transport(&ram, &sock_a);
    activate(&mut t);
    assert_eq!(
        blk_request(&ram, &kick, 0, true, 0, sector_data(0, 0x11)),
        0
    );

    // Stopped: the base is the next request; a request posted meanwhile waits.
    let bases = t.pause_device().unwrap();
    assert_eq!(bases, vec![1]);
    submit(&ram, &kick, 1, true, 1, sector_data(1, 0x22));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(used_idx(&ram), 1, "stopped ring must not be processed");
    // Restarted from the base (SET_VRING_BASE + kick): the waiting request completes once.
    t.resume_device(&bases).unwrap();
    assert_eq!(wait_used(&ram, 1), 0);

    // Stop again, save the transport, post a request, and restore the transport over a second
    // backend (the migration destination): no reset, the request completes there.
    let bases = t.pause_device().unwrap();
    assert_eq!(bases, vec![2]);
    let saved = t.state().clone();
    submit(&ram, &kick, 2, true, 2, sector_data(2, 0x33));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(used_idx(&ram), 2);
    let (mut t2, kick2) = blk_transport(&ram, &sock_b);
    // A transport of another shape is refused first, without touching the device.
    let mut bad = saved.clone();
    bad.queues.push(bad.queues[0]);
    assert!(t2.restore(&bad, &bases).is_err());
    t2.restore(&saved, &bases).unwrap();
    assert_eq!(t2.state(), &saved, "transport registers restored as saved");
    assert_ne!(
        r(&mut t2, reg::STATUS) & DRIVER_OK,
        0,
        "no guest-visible reset"
    );
    assert_eq!(wait_used(&ram, 2), 0);
    assert_eq!(
        blk_request(&ram, &kick2, 3, true, 3, sector_data(3, 0x44)),
        0
    );
    let disk = std::fs::read(&img).unwrap();
    for (s, v) in [(0usize, 0x11u8), (1, 0x22), (2, 0x33), (3, 0x44)] {
        assert!(
            disk[s * 512..(s + 1) * 512].iter().all(|&b| b == v),
            "sector {s}"
        );
    }
    assert_eq!(used_idx(&ram), 4, "each request completed exactly once");
}
