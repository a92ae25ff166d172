//! Two-process COLO block replication whose secondary uses qcow2 active and hidden disks made
//! by the real `qemu-img create -f qcow2`, spelled exactly as the seed's replication drive.
//! Checkpoint: the base equals the primary byte for byte and `qemu-img check` is clean on both
//! overlays; failover: the base holds the secondary's view.

#![allow(clippy::unwrap_used)]

mod common;

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use common::{SIZE, check_clean, content, fe, qemu_img, read_all, status};
use serde_json::json;
use vhost_blk_colo::vhost_user::VIRTIO_BLK_S_OK;

/// Deterministic writes of 512 B .. 64 KiB at sector granularity (many partial clusters).
fn workload(seed: u64, n: usize) -> Vec<(u64, Vec<u8>)> {
    common::workload(seed, n, 128, 512, 1)
}

/// `qemu-img create -q -f qcow2 OPTS… PATH SIZE`, which must succeed; false (after `SKIPPED: …`)
/// when qemu-img cannot run.
fn create_qcow2(opts: &[&str], path: &str, size: &str) -> bool {
    let args = [&["create", "-q", "-f", "qcow2"][..], opts, &[path, size]].concat();
    let Some(out) = qemu_img(&args) else {
        return false;
    };
    assert!(out.status.success(), "{out:?}");
    true
}

/// A secondary replication drive whose active and hidden disks are the qcow2 images `active`
/// and `hidden`, without `top-id`.
fn qcow2_secondary_drive(active: &str, hidden: &str) -> String {
    format!(
        "id=active-disk0,driver=replication,mode=secondary,file.driver=qcow2,file.file.filename={active},file.backing.driver=qcow2,file.backing.file.filename={hidden},file.backing.backing=colo-disk0"
    )
}

#[test]
fn qcow2_active_and_hidden_from_qemu_img_checkpoint_and_failover() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).display().to_string();
    let p = |n: &str| -> PathBuf { dir.path().join(n) };
    for (name, cs) in [("active_disk.img", "65536"), ("hidden_disk.img", "65536")] {
        if !create_qcow2(
            &["-o", &format!("cluster_size={cs}")],
            &d(name),
            &SIZE.to_string(),
        ) {
            return;
        }
    }
    let img = content(1);
    std::fs::write(p("pri.img"), &img).unwrap();
    std::fs::write(p("sec.img"), &img).unwrap();

    // The seed's secondary drives, key for key.
    let (secondary, mut sq, port) = common::start_secondary(
        dir.path(),
        &[
            format!(
                "if=none,id=colo-disk0,file.filename={},driver=raw,node-name=node0",
                d("sec.img")
            ),
            format!(
                "if=virtio,id=active-disk0,driver=replication,mode=secondary,file.driver=qcow2,\
                 top-id=active-disk0,file.file.filename={},file.backing.driver=qcow2,\
                 file.backing.file.filename={},file.backing.backing=colo-disk0",
                d("active_disk.img"),
                d("hidden_disk.img")
            ),
        ],
    );
    sq.execute("colo-blk-start", json!({})).unwrap();
    let (primary, _pq) = common::start_primary(dir.path(), &[], port);

    let mut pf = fe(&p("pri.sock"));
    let mut sf = fe(&p("sec.sock"));
    let st = status(&mut sq);
    assert_eq!(st["replication"][0]["cluster-size"], 65536, "{st}");
    assert_eq!(st["replication"][0]["active-driver"], "qcow2", "{st}");
    assert_eq!(st["replication"][0]["hidden-driver"], "qcow2", "{st}");

    // Two checkpoint intervals with writes on both sides.
    for round in 0..2u64 {
        for (sector, data) in workload(10 + round, 30) {
            assert_eq!(sf.write(0, sector, &data).unwrap(), VIRTIO_BLK_S_OK);
        }
        for (sector, data) in workload(20 + round, 150) {
            assert_eq!(pf.write(0, sector, &data).unwrap(), VIRTIO_BLK_S_OK);
        }
        assert_eq!(pf.flush(0).unwrap(), VIRTIO_BLK_S_OK);
        let s = status(&mut sq);
        assert!(
            s["replication"][0]["active-clusters"].as_u64().unwrap() > 0
                && s["replication"][0]["hidden-clusters"].as_u64().unwrap() > 0,
            "{s}"
        );
        assert!(
            std::fs::metadata(p("active_disk.img")).unwrap().len() > 1 << 20,
            "the secondary's writes went into the qcow2 active disk"
        );
        // The overlays are valid qcow2 while they hold data, too.
        check_clean(&p("active_disk.img"));
        check_clean(&p("hidden_disk.img"));
        let held = (
            s["replication"][0]["active-clusters"].clone(),
            s["replication"][0]["hidden-clusters"].clone(),
        );
        let r = sq.execute("colo-blk-checkpoint", json!({})).unwrap();
        eprintln!(
            "qcow2 checkpoint (active {} + hidden {} clusters of 64 KiB): {} us",
            held.0, held.1, r["us"]
        );
        let pri = std::fs::read(p("pri.img")).unwrap();
        let sec = std::fs::read(p("sec.img")).unwrap();
        assert!(pri != img, "the workload changed the disk");
        assert!(pri == sec, "round {round}: base differs from the primary");
        assert!(
            read_all(&mut sf) == pri,
            "secondary guest sees the primary's disk"
        );
        let s = status(&mut sq);
        assert_eq!(s["replication"][0]["active-clusters"], 0, "{s}");
        assert_eq!(s["replication"][0]["hidden-clusters"], 0, "{s}");
        for f in ["active_disk.img", "hidden_disk.img"] {
            check_clean(&p(f));
            assert!(
                std::fs::metadata(p(f)).unwrap().len() <= 4 * 65536,
                "{f} truncated by the checkpoint"
            );
        }
    }

    // Failover after more writes on both sides: the base holds the secondary's view.
    for (sector, data) in workload(30, 100) {
        assert_eq!(pf.write(0, sector, &data).unwrap(), VIRTIO_BLK_S_OK);
    }
    for (sector, data) in workload(31, 50) {
        assert_eq!(sf.write(0, sector, &data).unwrap(), VIRTIO_BLK_S_OK);
    }
    let view = read_all(&mut sf);
    drop(pf);
    drop(primary);
    sq.execute("colo-blk-failover", json!({})).unwrap();
    sq.wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(60))
        .unwrap();
    let s = status(&mut sq);
    assert_eq!(s["replication"][0]["stage"], "done", "{s}");
    assert!(
        std::fs::read(p("sec.img")).unwrap() == view,
        "after failover the base holds the secondary's view"
    );
    check_clean(&p("active_disk.img"));
    check_clean(&p("hidden_disk.img"));
    assert_eq!(sf.write(0, 0, &[0x5e; 4096]).unwrap(), VIRTIO_BLK_S_OK);
    assert_eq!(
        &std::fs::read(p("sec.img")).unwrap()[..4096],
        &[0x5e; 4096][..]
    );
    drop(secondary);
}

#[test]
fn qcow2_overlays_of_the_wrong_size_or_format_are_refused_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).display().to_string();
    if !create_qcow2(&[], &d("a.qcow2"), "10G") {
        return;
    }
    std::fs::write(dir.path().join("base.img"), vec![0u8; 1 << 20]).unwrap();
    std::fs::write(dir.path().join("notq.img"), vec![0u8; 1 << 20]).unwrap();
    let run = |drive: String| -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_vhost-blk-colo"))
            .args([
                "--socket".into(),
                d("x.sock"),
                "--drive".into(),
                format!(
                    "if=none,id=colo-disk0,driver=raw,file.filename={}",
                    d("base.img")
                ),
                "--drive".into(),
                drive,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert!(!out.status.success(), "must refuse");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = run(qcow2_secondary_drive(&d("a.qcow2"), &d("a.qcow2")));
    assert!(e.contains("same length"), "{e}");
    let e = run(qcow2_secondary_drive(&d("notq.img"), &d("a.qcow2")));
    assert!(e.contains("not a qcow2 image"), "{e}");
}

#[test]
fn a_lone_qcow2_drive_reads_its_backing_node_and_writes_into_the_image() {
    use vhost_blk_colo::{block::null_events, control::BlkControl};
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).display().to_string();
    if !create_qcow2(&[], &d("o.qcow2"), "1M") {
        return;
    }
    std::fs::write(dir.path().join("base.img"), vec![0x42u8; 1 << 20]).unwrap();
    let c = BlkControl::new(null_events(), Duration::from_secs(5)).unwrap();
    c.add_drive_str(&format!(
        "if=none,id=base0,driver=raw,file.filename={}",
        d("base.img")
    ))
    .unwrap();
    c.add_drive_str(&format!(
        "id=disk0,driver=qcow2,file.filename={},backing=base0",
        d("o.qcow2")
    ))
    .unwrap();
    let n = c.node("disk0").unwrap();
    assert_eq!(n.driver(), "qcow2");
    n.write_at(&[7; 3000], 1000, false).unwrap();
    n.flush().unwrap();
    let mut b = vec![0u8; 5000];
    n.read_at(&mut b, 0).unwrap();
    assert!(b[..1000].iter().all(|&x| x == 0x42) && b[1000..4000].iter().all(|&x| x == 7));
    assert!(b[4000..].iter().all(|&x| x == 0x42));
    assert!(
        std::fs::read(dir.path().join("base.img"))
            .unwrap()
            .iter()
            .all(|&x| x == 0x42),
        "the backing file is untouched"
    );
    check_clean(&dir.path().join("o.qcow2"));
    let e = c
        .add_drive_str(&format!(
            "id=disk1,driver=qcow2,file.filename={}",
            d("base.img")
        ))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a qcow2 image"), "{e}");
}
