//! Helpers shared by the replication and NBD interop tests (`mod common;` in each): the
//! `vhost-blk-colo` processes of a primary/secondary pair under a [`ChildGuard`] (logged to the
//! test's directory, killed by PID on drop), QMP, disk contents and workloads, the test
//! frontend, and QEMU's image tools. The guard and the waits are the `colo-tests` harness's.

#![allow(dead_code)] // every test binary uses a part of it

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

pub use colo_tests::{ChildGuard, QmpClient, free_tcp_port, secs, skipped};
use serde_json::{Value, json};
use vhost_blk_colo::{
    testing::{FrontendOptions, TestFrontend},
    vhost_user::VIRTIO_BLK_S_OK,
};

/// The disk size of the replication tests.
pub const SIZE: usize = 8 << 20;

/// Starts `vhost-blk-colo ARGS`, logged as `DIR/NAME.std{out,err}.log`.
pub fn spawn(dir: &Path, name: &str, args: &[String]) -> ChildGuard {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vhost-blk-colo"));
    cmd.args(args);
    ChildGuard::spawn(name, &mut cmd, dir).unwrap()
}

/// A QMP client on `path`, waiting up to 20 s for the socket; replies within 20 s.
pub fn qmp(path: &Path) -> QmpClient {
    QmpClient::connect_unix_retry(path, secs(20), Duration::from_secs(20)).unwrap()
}

/// `colo-blk-status`.
pub fn status(q: &mut QmpClient) -> Value {
    q.execute("colo-blk-status", json!({})).unwrap()
}

/// A disk image of `SIZE` bytes, different for every seed.
pub fn content(seed: u32) -> Vec<u8> {
    (0..SIZE as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 11) as u8)
        .collect()
}

/// A deterministic write workload: `n` (sector, data) pairs of 1 to `units` times `unit` bytes,
/// at sectors that are multiples of `align` (a power of two).
pub fn workload(seed: u64, n: usize, units: u64, unit: usize, align: u64) -> Vec<(u64, Vec<u8>)> {
    let mut x = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    let mut next = || {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        x >> 33
    };
    (0..n)
        .map(|_| {
            let len = ((next() % units) + 1) as usize * unit;
            let sector = (next() % ((SIZE - len) as u64 / 512)) & !(align - 1);
            let b = next() as u8;
            (
                sector,
                (0..len).map(|i| b.wrapping_add((i / 512) as u8)).collect(),
            )
        })
        .collect()
}

/// The test frontend on `sock`: 64 descriptors, 64 KiB buffers.
pub fn fe(sock: &Path) -> TestFrontend {
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

/// The whole disk as the frontend reads it, 64 KiB at a time.
pub fn read_all(f: &mut TestFrontend) -> Vec<u8> {
    let mut v = Vec::with_capacity(SIZE);
    for i in 0..(SIZE / 65536) {
        let (st, d) = f.read(0, (i * 128) as u64, 65536).unwrap();
        assert_eq!(st, VIRTIO_BLK_S_OK);
        v.extend(d);
    }
    v
}

/// `DIR/NAME` as a string for command lines.
pub fn path_str(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

/// Starts the secondary (`DIR/sec.sock`, QMP `DIR/sec.qmp`) with `drives` (each after a
/// `--drive`), connects QMP, and exports `colo-disk0` writable over NBD on a free port of
/// 127.0.0.1 (returned).
pub fn start_secondary(dir: &Path, drives: &[String]) -> (ChildGuard, QmpClient, u16) {
    let mut args = vec![
        "--socket".into(),
        path_str(dir, "sec.sock"),
        "--qmp".into(),
        format!("unix:{}", path_str(dir, "sec.qmp")),
    ];
    for d in drives {
        args.push("--drive".into());
        args.push(d.clone());
    }
    let proc = spawn(dir, "secondary", &args);
    let mut sq = qmp(&dir.join("sec.qmp"));
    let port = free_tcp_port().unwrap();
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
    (proc, sq, port)
}

/// Starts the primary (`DIR/pri.sock`, QMP `DIR/pri.qmp`, `extra` options) on a quorum of
/// `DIR/pri.img`, adds the replication child towards the secondary's NBD export on `port` as
/// the seed does (`drive_add`, `x-blockdev-change`) and starts replication.
pub fn start_primary(dir: &Path, extra: &[String], port: u16) -> (ChildGuard, QmpClient) {
    let mut args = vec![
        "--socket".into(),
        path_str(dir, "pri.sock"),
        "--qmp".into(),
        format!("unix:{}", path_str(dir, "pri.qmp")),
    ];
    args.extend_from_slice(extra);
    args.push("--drive".into());
    args.push(format!(
        "driver=quorum,id=colo-disk0,read-pattern=fifo,vote-threshold=1,children.0.file.filename={},children.0.driver=raw",
        path_str(dir, "pri.img")
    ));
    let proc = spawn(dir, "primary", &args);
    let mut pq = qmp(&dir.join("pri.qmp"));
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
    (proc, pq)
}

/// Whether all `tools` (QEMU's, from Debian package qemu-utils) are installed; if not, prints
/// `SKIPPED: …`.
pub fn have_qemu_tools(tools: &[&str]) -> bool {
    for t in tools {
        if let Err(why) = colo_tests::host::tool(t) {
            skipped(&format!("{why} (Debian package qemu-utils)"));
            return false;
        }
    }
    true
}

/// Runs `qemu-img ARGS`; `None` (after `SKIPPED: …`) when qemu-img cannot run.
pub fn qemu_img(args: &[&str]) -> Option<Output> {
    match Command::new("qemu-img").args(args).output() {
        Ok(o) => Some(o),
        Err(e) => {
            eprintln!("SKIPPED: qemu-img not runnable ({e}); install qemu-utils");
            None
        }
    }
}

/// `qemu-img check` finds neither leaks nor corruptions in the image at `p`.
pub fn check_clean(p: &Path) {
    let out = qemu_img(&["check", "--output=json", &p.display().to_string()]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("\"leaks\"") && !text.contains("\"corruptions\""),
        "qemu-img check {}: {:?} {text} {}",
        p.display(),
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
}
