//! The `user` netdev's outbound NAT and DNS for a real guest: QEMU 7.2 under TCG (`-M microvm`,
//! `-netdev vhost-user`) boots the stock test guest on vhost-net-colo's `user` netdev, and the
//! guest's busybox `nc` fetches a page from an HTTP server the test runs on the host's 127.0.0.1
//! (through the `host=` alias 10.0.2.2), `nslookup` asks 10.0.2.3 and gets the answer of a DNS
//! responder the test runs on 127.0.0.1 (`x-dns-upstream=`), and `nc` to a closed port is
//! refused, and `ping -c 3 10.0.2.2` is answered. (The guest's static busybox `wget` crashes
//! before it connects, so `nc` it is.) All traffic stays on loopback. One boot (~15-50 s under
//! TCG).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use colo_tests::guest::shell_guest_on_vhost_user_net;
use colo_tests::{ChildGuard, TestDir, cargo_bin, require, secs};

/// An HTTP/1.0 server on 127.0.0.1 that answers every request with `body`.
fn http_server(body: &'static str) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { break };
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let _ = write!(
                s,
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

#[test]
fn guest_nc_and_nslookup_reach_the_host_through_the_user_netdev() {
    let img = require!(colo_tests::guest_image());
    let dir = TestDir::new().unwrap();
    let http = http_server("NAT-BODY-from-the-host");
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dns_server = colo_tests::UdpServer::dns().unwrap();
    let dns = dns_server.port;

    let sock = dir.join("vu.sock");
    let mut be_cmd = Command::new(cargo_bin("vhost-net-colo").unwrap());
    be_cmd
        .arg("--socket")
        .arg(&sock)
        .arg("--netdev")
        .arg(format!("user,id=n0,x-dns-upstream=127.0.0.1:{dns}"));
    let _be = ChildGuard::spawn("backend", &mut be_cmd, dir.path()).unwrap();
    colo_tests::wait_for_unix_socket(&sock, secs(30)).unwrap();

    let (mut guest, mut stdin) = shell_guest_on_vhost_user_net(&img, &sock, dir.path()).unwrap();

    // Markers are split in the typed commands so their echo does not match.
    writeln!(
        stdin,
        "printf 'GET /x HTTP/1.0\\r\\n\\r\\n' | timeout 20 nc 10.0.2.2 {http}; echo; echo HTTP1\"\"-DONE"
    )
    .unwrap();
    guest.wait_for_output("HTTP1-DONE", secs(60)).unwrap();
    let out = guest.stdout_text();
    assert!(
        out.contains("NAT-BODY-from-the-host"),
        "{}",
        guest.log_tail(20)
    );

    writeln!(stdin, "nslookup colo.test 10.0.2.3; echo NSLOOKUP\"\"-DONE").unwrap();
    guest.wait_for_output("NSLOOKUP-DONE", secs(60)).unwrap();
    assert!(
        guest.stdout_text().contains("10.9.8.7"),
        "{}",
        guest.log_tail(20)
    );

    writeln!(
        stdin,
        "echo x | timeout 20 nc 10.0.2.2 {closed}; echo NC2\"\"-RC=$?"
    )
    .unwrap();
    guest.wait_for_output("NC2-RC=1", secs(60)).unwrap();
    assert!(
        guest.stdout_text().contains("Connection refused"),
        "{}",
        guest.log_tail(20)
    );

    // busybox ping of the gateway, which the netdev answers itself (no host socket, no sysctl).
    writeln!(stdin, "ping -c 3 10.0.2.2; echo PING\"\"-RC=$?").unwrap();
    guest.wait_for_output("PING-RC=", secs(60)).unwrap();
    let out = guest.stdout_text();
    assert!(
        out.contains("3 packets transmitted, 3 packets received") && out.contains("PING-RC=0"),
        "{}",
        guest.log_tail(20)
    );

    writeln!(stdin, "poweroff -f").unwrap();
    let _ = guest.wait_until(secs(30));
}
