//! QEMU 7.2 as the vhost-user frontend: QMP `announce-self` on QEMU makes it send
//! `VHOST_USER_SEND_RARP` (its vhost-user netdev turns its own announce into that request), and
//! the frame our device then sends out of its `stream` netdev is byte for byte the frame QEMU
//! itself sends out of a `-netdev stream` for the same NIC. No guest is booted (the VM runs
//! firmware only). Skips loudly without `qemu-system-x86_64`.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use colo_proto::frame::FrameReader;
use colo_proto::qmp::QmpClient;
use common::ChildGuard;
use serde_json::json;

const MAC: &str = "52:54:00:aa:bb:cc";

/// QEMU with a virtio-net NIC on netdev `n1` (`netdev`: the `-netdev`/`-chardev` options), the
/// VM stopped (`-S`), firmware only; QMP at `qmp`.
fn qemu(dir: &Path, name: &str, netdev: &str, qmp: &Path) -> ChildGuard {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-M",
        "microvm,memory-backend=mem",
        "-accel",
        "tcg",
        "-m",
        "128M",
    ])
    .args(["-nodefaults", "-no-user-config", "-display", "none", "-S"])
    .args(["-object", "memory-backend-memfd,id=mem,size=128M,share=on"])
    .args(["-global", "virtio-mmio.force-legacy=false"])
    .args(netdev.split(' '))
    .args(["-device", &format!("virtio-net-device,netdev=n1,mac={MAC}")])
    .arg("-qmp")
    .arg(format!("unix:{},server=on,wait=off", qmp.display()))
    .current_dir(dir);
    ChildGuard::spawn(name, &mut cmd, dir).unwrap()
}

/// Runs the VM, asks QEMU for 2 announces, returns the frames read from `wire`.
fn announce_and_read(qmp: &Path, wire: UnixStream) -> Vec<Vec<u8>> {
    let mut q =
        QmpClient::connect_unix_retry(qmp, common::secs(20), Duration::from_secs(20)).unwrap();
    q.execute("cont", json!({})).unwrap();
    q.execute(
        "announce-self",
        json!({"initial": 10, "max": 20, "rounds": 2, "step": 10}),
    )
    .unwrap();
    wire.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut r = FrameReader::new(wire, false);
    (0..2)
        .map(|_| r.read_frame().unwrap().unwrap().payload)
        .collect()
}

#[test]
fn qemu_announce_self_reaches_the_wire_through_send_rarp_as_qemus_own_frame() {
    if let Err(why) = colo_tests::host::tool("qemu-system-x86_64") {
        common::skipped(&why);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // QEMU on our backend.
    let (backend, wire) = common::spawn_with_wire(d, "", &[], true);
    let qmp1 = d.join("q1.qmp");
    let _q1 = qemu(
        d,
        "qemu1",
        &format!(
            "-chardev socket,id=c1,path={} -netdev vhost-user,id=n1,chardev=c1",
            backend.sock.display()
        ),
        &qmp1,
    );
    let ours = announce_and_read(&qmp1, wire);

    // QEMU's own frame on its own stream netdev.
    let wire2 = d.join("wire2.sock");
    let l2 = UnixListener::bind(&wire2).unwrap();
    let qmp2 = d.join("q2.qmp");
    let _q2 = qemu(
        d,
        "qemu2",
        &format!("-netdev {}", common::stream_netdev("n1", &wire2)),
        &qmp2,
    );
    let w2 = common::accept(&l2);
    let theirs = announce_and_read(&qmp2, w2);

    assert_eq!(ours[0].len(), 60);
    assert_eq!(&ours[0][12..14], &[0x80, 0x35], "RARP");
    assert_eq!(ours, theirs, "our announce differs from QEMU's");
    let mut b = backend.qmp();
    assert_eq!(
        b.execute("query-net", json!({})).unwrap()["announces_sent"],
        2
    );
}
