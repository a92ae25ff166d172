//! Two-process COLO block replication on loopback: a primary and a secondary
//! `vhost-blk-colo` process, NBD between them, a write workload through the test frontend.

#![allow(clippy::unwrap_used)]

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use colo_proto::qmp::QmpClient;
use serde_json::{Value, json};
use vhost_blk_colo::{
    testing::{FrontendOptions, TestFrontend},
    vhost_user::VIRTIO_BLK_S_OK,
};

const SIZE: usize = 8 << 20;

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[String]) -> Proc {
    let child = Command::new(env!("CARGO_BIN_EXE_vhost-blk-colo"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    Proc(child)
}

fn qmp(path: &Path) -> QmpClient {
    QmpClient::connect_unix_retry(
        path,
        Instant::now() + Duration::from_secs(20),
        Duration::from_secs(20),
    )
    .unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Pair {
    dir: tempfile::TempDir,
    primary: Option<Proc>,
    secondary: Option<Proc>,
    pq: QmpClient,
    sq: QmpClient,
}

impl Pair {
    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn content(seed: u32) -> Vec<u8> {
    (0..SIZE as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 11) as u8)
        .collect()
}

/// Starts both sides with identical images and wires them up as the seed does.
fn start_pair(nbd_timeout_ms: u64) -> Pair {
    start_pair_with(nbd_timeout_ms, false)
}

fn start_pair_with(nbd_timeout_ms: u64, differing_secondary: bool) -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let img = content(1);
    std::fs::write(dir.path().join("pri.img"), &img).unwrap();
    let sec_img = if differing_secondary {
        content(99)
    } else {
        img.clone()
    };
    std::fs::write(dir.path().join("sec.img"), &sec_img).unwrap();
    let d = |n: &str| dir.path().join(n).display().to_string();
    let secondary = spawn(&[
        "--socket".into(),
        d("sec.sock"),
        "--qmp".into(),
        format!("unix:{}", d("sec.qmp")),
        "--drive".into(),
        format!("if=none,id=colo-disk0,driver=raw,file.filename={}", d("sec.img")),
        "--drive".into(),
        "id=active-disk0,driver=replication,mode=secondary,file.driver=overlay,file.backing.driver=overlay,file.backing.backing=colo-disk0,top-id=active-disk0".into(),
    ]);
    let mut sq = qmp(&dir.path().join("sec.qmp"));
    let port = free_port();
    sq.execute(
        "nbd-server-start",
        json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": port.to_string()}}}),
    )
    .unwrap();
    sq.execute(
        "nbd-server-add",
        json!({"device": "colo-disk0", "writable": true}),
    )
    .unwrap();
    if !differing_secondary {
        sq.execute("colo-blk-start", json!({})).unwrap();
    }

    let primary = spawn(&[
        "--socket".into(),
        d("pri.sock"),
        "--qmp".into(),
        format!("unix:{}", d("pri.qmp")),
        "--nbd-timeout-ms".into(),
        nbd_timeout_ms.to_string(),
        "--drive".into(),
        format!(
            "driver=quorum,id=colo-disk0,read-pattern=fifo,vote-threshold=1,children.0.file.filename={},children.0.driver=raw",
            d("pri.img")
        ),
    ]);
    let mut pq = qmp(&dir.path().join("pri.qmp"));
    let line = format!(
        "drive_add -n buddy driver=replication,mode=primary,file.driver=nbd,file.host=127.0.0.1,file.port={port},file.export=colo-disk0,node-name=node0"
    );
    pq.execute("human-monitor-command", json!({"command-line": line}))
        .unwrap();
    pq.execute(
        "x-blockdev-change",
        json!({"parent": "colo-disk0", "node": "node0"}),
    )
    .unwrap();
    pq.execute("colo-blk-start", json!({})).unwrap();
    Pair {
        dir,
        primary: Some(primary),
        secondary: Some(secondary),
        pq,
        sq,
    }
}

/// A deterministic write workload: (sector, data) pairs of 4 KiB..64 KiB.
fn workload(seed: u64, n: usize) -> Vec<(u64, Vec<u8>)> {
    let mut x = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    let mut next = || {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        x >> 33
    };
    (0..n)
        .map(|_| {
            let len = ((next() % 16) + 1) as usize * 4096;
            let sector = (next() % ((SIZE - len) as u64 / 512)) & !7;
            let b = next() as u8;
            (
                sector,
                (0..len).map(|i| b.wrapping_add((i / 512) as u8)).collect(),
            )
        })
        .collect()
}

fn fe(sock: &Path) -> TestFrontend {
    TestFrontend::connect(
        sock,
        &FrontendOptions {
            queue_size: 64,
            slot_bytes: 64 << 10,
            ..FrontendOptions::default()
        },
    )
    .unwrap()
}

fn read_all(f: &mut TestFrontend) -> Vec<u8> {
    let mut v = Vec::with_capacity(SIZE);
    for i in 0..(SIZE / 65536) {
        let (st, d) = f.read(0, (i * 128) as u64, 65536).unwrap();
        assert_eq!(st, VIRTIO_BLK_S_OK);
        v.extend(d);
    }
    v
}

fn status(q: &mut QmpClient) -> Value {
    q.execute("colo-blk-status", json!({})).unwrap()
}

#[test]
fn checkpoint_makes_secondary_base_equal_primary_then_failover_keeps_secondary_view() {
    let mut pair = start_pair(5000);
    let mut pf = fe(&pair.p("pri.sock"));
    let mut sf = fe(&pair.p("sec.sock"));

    // The secondary's own guest writes (they must vanish at the checkpoint).
    for (sector, data) in workload(7, 20) {
        assert_eq!(sf.write(0, sector, &data).unwrap(), VIRTIO_BLK_S_OK);
    }
    for (sector, data) in workload(1, 200) {
        assert_eq!(pf.write(0, sector, &data).unwrap(), VIRTIO_BLK_S_OK);
    }
    assert_eq!(pf.flush(0).unwrap(), VIRTIO_BLK_S_OK);
    let st = status(&mut pair.pq);
    assert_eq!(st["replication"][0]["secondary-connected"], true, "{st}");

    // (a) checkpoint: the secondary's base equals the primary's disk, byte for byte.
    let r = pair.sq.execute("colo-blk-checkpoint", json!({})).unwrap();
    assert!(r["us"].is_u64());
    let pri = std::fs::read(pair.p("pri.img")).unwrap();
    let sec = std::fs::read(pair.p("sec.img")).unwrap();
    assert!(pri != content(1), "the workload changed the disk");
    assert!(
        pri == sec,
        "secondary base differs from the primary after a checkpoint"
    );
    assert_eq!(
        read_all(&mut sf),
        pri,
        "the secondary guest sees the primary's disk after the checkpoint"
    );
    let s = status(&mut pair.sq);
    assert_eq!(s["replication"][0]["active-clusters"], 0);
    assert_eq!(s["replication"][0]["hidden-clusters"], 0);

    // (b) more primary writes (copy-before-write into hidden) and secondary writes (active),
    // then failover: the base must hold exactly the secondary's view.
    for (sector, data) in workload(2, 100) {
        assert_eq!(pf.write(0, sector, &data).unwrap(), VIRTIO_BLK_S_OK);
    }
    for (sector, data) in workload(8, 50) {
        assert_eq!(sf.write(0, sector, &data).unwrap(), VIRTIO_BLK_S_OK);
    }
    let s = status(&mut pair.sq);
    assert!(
        s["replication"][0]["hidden-clusters"].as_u64().unwrap() > 0,
        "{s}"
    );
    assert!(
        s["replication"][0]["active-clusters"].as_u64().unwrap() > 0,
        "{s}"
    );
    let view = read_all(&mut sf);
    // The primary dies; the secondary takes over.
    drop(pf);
    pair.primary.take();
    pair.sq.execute("colo-blk-failover", json!({})).unwrap();
    pair.sq
        .wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(30))
        .unwrap();
    let s = status(&mut pair.sq);
    assert_eq!(s["replication"][0]["stage"], "done", "{s}");
    let sec = std::fs::read(pair.p("sec.img")).unwrap();
    assert!(
        sec == view,
        "after failover the base must hold the secondary's view"
    );
    // The guest keeps running on the base.
    assert_eq!(sf.write(0, 0, &[0x5e; 4096]).unwrap(), VIRTIO_BLK_S_OK);
    assert_eq!(
        &std::fs::read(pair.p("sec.img")).unwrap()[..4096],
        &[0x5e; 4096][..]
    );
}

#[test]
fn sigkill_of_secondary_mid_workload_loses_no_primary_write() {
    let mut pair = start_pair(2000);
    let mut pf = fe(&pair.p("pri.sock"));
    let writes = workload(3, 300);
    let mut expected = content(1);
    for (i, (sector, data)) in writes.iter().enumerate() {
        if i == 100 {
            let mut s = pair.secondary.take().unwrap();
            // SAFETY-free: kill(2) through std sends SIGKILL.
            s.0.kill().unwrap();
            s.0.wait().unwrap();
        }
        assert_eq!(
            pf.write(0, *sector, data).unwrap(),
            VIRTIO_BLK_S_OK,
            "write {i} must be acknowledged"
        );
        let o = *sector as usize * 512;
        expected[o..o + data.len()].copy_from_slice(data);
    }
    assert_eq!(pf.flush(0).unwrap(), VIRTIO_BLK_S_OK);
    assert!(
        std::fs::read(pair.p("pri.img")).unwrap() == expected,
        "every acknowledged write is on the primary's disk"
    );
    assert_eq!(read_all(&mut pf), expected);
    let ev = pair
        .pq
        .wait_event("COLO_BLK_SECONDARY_LOST", Duration::from_secs(10))
        .unwrap();
    assert_eq!(ev.data["node-name"], "node0");
    let st = status(&mut pair.pq);
    assert_eq!(st["replication"][0]["secondary-connected"], false, "{st}");
}

#[test]
fn initial_sync_copies_the_primary_disk_to_a_differing_secondary_while_writes_continue() {
    let mut pair = start_pair_with(5000, true);
    assert!(std::fs::read(pair.p("sec.img")).unwrap() != std::fs::read(pair.p("pri.img")).unwrap());
    let mut pf = fe(&pair.p("pri.sock"));
    pair.pq
        .execute(
            "colo-blk-sync",
            json!({"device": "colo-disk0", "node": "node0", "granularity": 65536}),
        )
        .unwrap();
    // Guest writes while the sync runs.
    for (sector, data) in workload(5, 150) {
        assert_eq!(pf.write(0, sector, &data).unwrap(), VIRTIO_BLK_S_OK);
    }
    let ev = pair
        .pq
        .wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(60))
        .unwrap();
    assert_eq!(ev.data["type"], "mirror");
    let st = status(&mut pair.pq);
    assert!(
        st["replication"][0]["sync"]["done"].as_u64().unwrap() >= (SIZE / 65536) as u64,
        "{st}"
    );
    // Now the secondary starts replication; both disks are equal.
    pair.sq.execute("colo-blk-start", json!({})).unwrap();
    for (sector, data) in workload(6, 50) {
        assert_eq!(pf.write(0, sector, &data).unwrap(), VIRTIO_BLK_S_OK);
    }
    assert_eq!(pf.flush(0).unwrap(), VIRTIO_BLK_S_OK);
    pair.sq.execute("colo-blk-checkpoint", json!({})).unwrap();
    let pri = std::fs::read(pair.p("pri.img")).unwrap();
    let sec = std::fs::read(pair.p("sec.img")).unwrap();
    assert!(
        pri == sec,
        "after the initial sync and a checkpoint the secondary equals the primary"
    );
}

#[test]
fn a_hung_secondary_is_dropped_after_the_nbd_timeout_and_never_fails_guest_writes() {
    let mut pair = start_pair(1000);
    let mut pf = fe(&pair.p("pri.sock"));
    let pid = pair.secondary.as_ref().unwrap().0.id() as libc::pid_t;
    for (sector, data) in workload(4, 20) {
        assert_eq!(pf.write(0, sector, &data).unwrap(), VIRTIO_BLK_S_OK);
    }
    // SAFETY: kill(2) on a child process this test started and has not reaped.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let t0 = Instant::now();
    let writes = workload(9, 50);
    for (i, (sector, data)) in writes.iter().enumerate() {
        assert_eq!(
            pf.write(0, *sector, data).unwrap(),
            VIRTIO_BLK_S_OK,
            "write {i} while the secondary hangs"
        );
    }
    let took = t0.elapsed();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(
        took < Duration::from_secs(10),
        "writes stalled {took:?} (timeout is 1 s, paid once)"
    );
    let ev = pair
        .pq
        .wait_event("COLO_BLK_SECONDARY_LOST", Duration::from_secs(10))
        .unwrap();
    assert!(
        ev.data["error"].as_str().unwrap().contains("timed out"),
        "{ev:?}"
    );
    let pri = std::fs::read(pair.p("pri.img")).unwrap();
    for (sector, data) in writes.iter().rev().take(1) {
        let o = *sector as usize * 512;
        assert_eq!(&pri[o..o + data.len()], &data[..]);
    }
}
