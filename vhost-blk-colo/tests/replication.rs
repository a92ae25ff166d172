//! Two-process COLO block replication on loopback: a primary and a secondary
//! `vhost-blk-colo` process, NBD between them, a write workload through the test frontend.

#![allow(clippy::unwrap_used)]

mod common;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use common::{ChildGuard, QmpClient, SIZE, content, fe, read_all, status};
use serde_json::json;
use vhost_blk_colo::vhost_user::VIRTIO_BLK_S_OK;

struct Pair {
    primary: Option<ChildGuard>,
    secondary: Option<ChildGuard>,
    pq: QmpClient,
    sq: QmpClient,
    dir: tempfile::TempDir,
}

impl Pair {
    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
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
    let (secondary, mut sq, port) = common::start_secondary(
        dir.path(),
        &[
            format!(
                "if=none,id=colo-disk0,driver=raw,file.filename={}",
                common::path_str(dir.path(), "sec.img")
            ),
            "id=active-disk0,driver=replication,mode=secondary,file.driver=overlay,file.backing.driver=overlay,file.backing.backing=colo-disk0,top-id=active-disk0".into(),
        ],
    );
    if !differing_secondary {
        sq.execute("colo-blk-start", json!({})).unwrap();
    }
    let (primary, pq) = common::start_primary(
        dir.path(),
        &["--nbd-timeout-ms".into(), nbd_timeout_ms.to_string()],
        port,
    );
    Pair {
        primary: Some(primary),
        secondary: Some(secondary),
        pq,
        sq,
        dir,
    }
}

/// A deterministic write workload: (sector, data) pairs of 4 KiB..64 KiB, 4 KiB aligned.
fn workload(seed: u64, n: usize) -> Vec<(u64, Vec<u8>)> {
    common::workload(seed, n, 16, 4096, 8)
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
            // SIGKILL by PID, reaped.
            assert!(s.kill().is_some(), "secondary reaped");
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
    let pid = pair.secondary.as_ref().unwrap().pid() as libc::pid_t;
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
