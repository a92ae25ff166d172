//! Ping through vhost-net-colo's `user` netdev from a real guest: QEMU 7.2 under TCG (`-M
//! microvm`, `-netdev vhost-user`) boots the stock test guest, whose busybox `ping` (a raw
//! socket, as root) pings the gateway 10.0.2.2 (answered by the netdev itself) and 192.0.2.1,
//! which the netdev reaches through an unprivileged ICMP datagram socket. The backend runs in a
//! network namespace the test creates, with 192.0.2.1 on its loopback and
//! `net.ipv4.ping_group_range` set there (per namespace: the host's is untouched), so no ping
//! leaves the namespace. Needs root and `ip netns` (else SKIPPED). One boot (~15-50 s under TCG).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::Write;
use std::os::fd::AsRawFd;

use colo_tests::guest::shell_guest_on_vhost_user_net;
use colo_tests::{ChildGuard, NetNs, TestDir, cargo_bin, require, secs};

/// Writes `value` to /proc/sys/net/ipv4/ping_group_range of `ns` (from a thread that entered
/// it: /proc/sys/net is the opener's namespace).
fn set_ping_group_range(ns: &NetNs, value: &'static str) {
    let path = format!("/run/netns/{}", ns.name());
    std::thread::spawn(move || {
        let f = std::fs::File::open(path).unwrap();
        // SAFETY: setns of this thread only, with a namespace fd we opened.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        std::fs::write("/proc/sys/net/ipv4/ping_group_range", value).unwrap();
    })
    .join()
    .unwrap();
}

#[test]
fn guest_busybox_ping_reaches_the_gateway_and_an_address_behind_a_ping_socket() {
    let img = require!(colo_tests::guest_image());
    require!(colo_tests::host::netns());
    let dir = TestDir::new().unwrap();
    let ns = NetNs::new("vnipq").unwrap();
    ns.ip(&["addr", "add", "192.0.2.1/32", "dev", "lo"])
        .unwrap();
    set_ping_group_range(&ns, "0 2147483647");

    let sock = dir.join("vu.sock");
    let mut be_cmd = ns.command(cargo_bin("vhost-net-colo").unwrap().to_str().unwrap());
    be_cmd
        .arg("--socket")
        .arg(&sock)
        .args(["--netdev", "user,id=n0"]);
    let be = ChildGuard::spawn("backend", &mut be_cmd, dir.path()).unwrap();
    colo_tests::wait_for_unix_socket(&sock, secs(30)).unwrap();

    let (mut guest, mut stdin) = shell_guest_on_vhost_user_net(&img, &sock, dir.path()).unwrap();

    // Markers are split in the typed commands so their echo does not match.
    for (n, dst) in [(1, "10.0.2.2"), (2, "192.0.2.1")] {
        writeln!(stdin, "ping -c 3 {dst}; echo PING{n}\"\"-RC=$?").unwrap();
        guest
            .wait_for_output(&format!("PING{n}-RC="), secs(60))
            .unwrap();
        let out = guest.stdout_text();
        assert!(
            out.contains(&format!("PING{n}-RC=0")),
            "ping {dst}: {}",
            guest.log_tail(20)
        );
    }
    let out = guest.stdout_text();
    assert_eq!(
        out.matches("3 packets transmitted, 3 packets received")
            .count(),
        2,
        "{}",
        guest.log_tail(30)
    );
    let log = std::fs::read_to_string(be.stderr_path()).unwrap();
    assert!(!log.contains("ping_group_range"), "backend warned: {log}");

    writeln!(stdin, "poweroff -f").unwrap();
    let _ = guest.wait_until(secs(30));
}
