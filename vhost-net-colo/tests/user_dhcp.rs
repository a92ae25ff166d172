//! The `user` netdev's DHCP server against a real DHCP client: busybox `udhcpc` on a tap in a
//! network namespace the test creates, whose frames the test relays to and from the device's
//! rings through the test frontend (the tap stands in for the guest's NIC). Needs root,
//! /dev/net/tun and busybox; otherwise it says SKIPPED.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::ChildGuard;
use vhost_net_colo::testing::Options;

#[test]
fn udhcpc_gets_qemus_default_lease_from_the_user_netdev() {
    if let Err(why) = colo_tests::host::tool("busybox") {
        common::skipped(&format!("{why} (udhcpc)"));
        return;
    }
    let Some(ns) = common::netns_with_tun("vndhcp") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let backend = common::spawn_backend(dir.path(), "user,id=n0", &[], false, None);
    let mut fe = backend.frontend(&Options::default());

    let tap_name = "vndhcp0";
    let mut tap = common::tap_in(&ns, tap_name);
    ns.ip(&["link", "set", tap_name, "up"]).unwrap();
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
    let mut client = ChildGuard::spawn(
        "udhcpc",
        ns.command("busybox")
            .args([
                "udhcpc", "-i", tap_name, "-f", "-q", "-n", "-t", "5", "-T", "1",
            ])
            .arg("-s")
            .arg(&script),
        dir.path(),
    )
    .unwrap();
    // Relay: tap (the client's NIC) <-> the device's rings.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = vec![0u8; 65536];
    let status = loop {
        if let Some(st) = client.try_wait() {
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
