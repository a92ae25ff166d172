//! QEMU 7.2 as the vhost-user frontend: QMP `announce-self` on QEMU makes it send
//! `VHOST_USER_SEND_RARP` (its vhost-user netdev turns its own announce into that request), and
//! the frame our device then sends out of its `stream` netdev is byte for byte the frame QEMU
//! itself sends out of a `-netdev stream` for the same NIC. No guest is booted (the VM runs
//! firmware only). Skips loudly without `qemu-system-x86_64`.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use colo_proto::frame::FrameReader;
use colo_proto::qmp::QmpClient;
use serde_json::json;

const MAC: &str = "52:54:00:aa:bb:cc";

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_path(p: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !p.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn qemu(dir: &Path, netdev: &str, qmp: &Path) -> Proc {
    Proc(
        Command::new("qemu-system-x86_64")
            .args([
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
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Runs the VM, asks QEMU for 2 announces, returns the frames read from `wire`.
fn announce_and_read(qmp: &Path, wire: UnixStream) -> Vec<Vec<u8>> {
    wait_path(qmp);
    let mut q = QmpClient::connect_unix(qmp, Duration::from_secs(20)).unwrap();
    q.execute("cont", json!({})).unwrap();
    q.execute(
        "announce-self",
        json!({"initial": 10, "max": 20, "rounds": 2, "step": 10}),
    )
    .unwrap();
    wire.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut r = FrameReader::new(wire, false);
    (0..2)
        .map(|_| r.read_frame().unwrap().unwrap().payload)
        .collect()
}

#[test]
fn qemu_announce_self_reaches_the_wire_through_send_rarp_as_qemus_own_frame() {
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        eprintln!("SKIPPED: qemu-system-x86_64 not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // QEMU on our backend.
    let wire_path = d.join("wire.sock");
    let l = UnixListener::bind(&wire_path).unwrap();
    let sock = d.join("vu.sock");
    let bqmp = d.join("backend.qmp");
    let _backend = Proc(
        Command::new(env!("CARGO_BIN_EXE_vhost-net-colo"))
            .arg("--socket")
            .arg(&sock)
            .arg("--netdev")
            .arg(format!(
                "stream,id=s0,server=off,addr.type=unix,addr.path={}",
                wire_path.display()
            ))
            .arg("--qmp")
            .arg(format!("unix:{}", bqmp.display()))
            .spawn()
            .unwrap(),
    );
    let (wire, _) = l.accept().unwrap();
    wait_path(&sock);
    let qmp1 = d.join("q1.qmp");
    let _q1 = qemu(
        d,
        &format!(
            "-chardev socket,id=c1,path={} -netdev vhost-user,id=n1,chardev=c1",
            sock.display()
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
        &format!(
            "-netdev stream,id=n1,server=off,addr.type=unix,addr.path={}",
            wire2.display()
        ),
        &qmp2,
    );
    let (w2, _) = l2.accept().unwrap();
    let theirs = announce_and_read(&qmp2, w2);

    assert_eq!(ours[0].len(), 60);
    assert_eq!(&ours[0][12..14], &[0x80, 0x35], "RARP");
    assert_eq!(ours, theirs, "our announce differs from QEMU's");
    let mut b = QmpClient::connect_unix(&bqmp, Duration::from_secs(10)).unwrap();
    assert_eq!(
        b.execute("query-net", json!({})).unwrap()["announces_sent"],
        2
    );
}
