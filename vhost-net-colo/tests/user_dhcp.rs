//! The `user` netdev's DHCP server against a real DHCP client: busybox `udhcpc` on a tap in a
//! network namespace the test creates, whose frames the test relays to and from the device's
//! rings through the test frontend (the tap stands in for the guest's NIC). Needs root,
//! /dev/net/tun and busybox; otherwise it says SKIPPED.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vhost_net_colo::testing::{NetFrontend, Options};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct NetNs(String);

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates tap `name` inside namespace `ns` (from a thread that enters it) and returns its fd.
fn tap_in(ns: &str, name: &str) -> File {
    let (ns, name) = (ns.to_string(), name.to_string());
    std::thread::spawn(move || {
        let nsf = File::open(format!("/run/netns/{ns}")).unwrap();
        // SAFETY: setns on this thread only, with a namespace fd we opened.
        let r = unsafe { libc::setns(nsf.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap();
        let mut req = IfReq {
            name: [0; 16],
            flags: 0x0002 | 0x1000, // IFF_TAP | IFF_NO_PI
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF with an ifreq-sized struct on our tun fd.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), 0x4004_54ca, &mut req as *mut IfReq) };
        assert!(r >= 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
        // SAFETY: F_SETFL on our own fd.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        f
    })
    .join()
    .unwrap()
}

#[test]
fn udhcpc_gets_qemus_default_lease_from_the_user_netdev() {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 || !Path::new("/dev/net/tun").exists() {
        eprintln!("SKIPPED: needs root and /dev/net/tun (tap in a namespace)");
        return;
    }
    if Command::new("busybox")
        .args(["udhcpc", "--help"])
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        eprintln!("SKIPPED: busybox (udhcpc) not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vu.sock");
    let backend = Proc(
        Command::new(env!("CARGO_BIN_EXE_vhost-net-colo"))
            .arg("--socket")
            .arg(&sock)
            .args(["--netdev", "user,id=n0"])
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "backend socket never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut fe = NetFrontend::connect(&sock, &Options::default()).unwrap();

    let ns = NetNs(format!("vndhcp{}", std::process::id()));
    assert!(
        Command::new("ip")
            .args(["netns", "add", &ns.0])
            .status()
            .unwrap()
            .success()
    );
    let tap_name = "vndhcp0";
    let mut tap = tap_in(&ns.0, tap_name);
    assert!(
        Command::new("ip")
            .args(["-n", &ns.0, "link", "set", tap_name, "up"])
            .status()
            .unwrap()
            .success()
    );
    let out = dir.path().join("lease.txt");
    let script = dir.path().join("udhcpc.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$1 ip=$ip mask=$subnet router=$router dns=$dns lease=$lease serverid=$serverid\" >> {}\n",
            out.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut client = Proc(
        Command::new("ip")
            .args(["netns", "exec", &ns.0, "busybox", "udhcpc"])
            .args(["-i", tap_name, "-f", "-q", "-n", "-t", "5", "-T", "1"])
            .arg("-s")
            .arg(&script)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Relay: tap (the client's NIC) <-> the device's rings.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = vec![0u8; 65536];
    let status = loop {
        if let Some(st) = client.0.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "udhcpc did not finish");
        let mut idle = true;
        match tap.read(&mut buf) {
            Ok(n) if n > 0 => {
                fe.send(&buf[..n]).unwrap();
                idle = false;
            }
            _ => {}
        }
        if let Some((f, _)) = fe.try_recv() {
            let _ = tap.write(&f);
            idle = false;
        }
        if idle {
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    let lease = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(status.success(), "udhcpc failed; script saw: {lease}");
    assert!(
        lease.contains(
            "bound ip=10.0.2.15 mask=255.255.255.0 router=10.0.2.2 dns=10.0.2.3 lease=86400 serverid=10.0.2.2"
        ),
        "lease: {lease}"
    );
    drop(backend);
}
