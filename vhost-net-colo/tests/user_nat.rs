//! The `user` netdev's outbound NAT and DNS forwarding against a real TCP/IP stack: a tap in a
//! network namespace the test creates stands for the guest's NIC (address 10.0.2.15/24, default
//! route via 10.0.2.2), and the test relays its frames to and from the device's rings through
//! the test frontend. The test's "guest" programs are sockets opened inside the namespace (the
//! Linux stack makes the frames); the "outside" is listeners the test opens on the host's
//! 127.0.0.1, reached through the `host=` alias 10.0.2.2, and a DNS responder the test runs,
//! named by `x-dns-upstream=127.0.0.1:PORT`. No traffic goes anywhere but loopback: the path
//! for other destinations is the same code with another address, exercised here only through
//! the alias. Pings: the gateway answers itself; for pings of other addresses the backend runs
//! in a second namespace of the test's own, where the test sets `net.ipv4.ping_group_range` (a
//! per-namespace sysctl: the host's stays untouched) and puts 192.0.2.1 on the loopback, so the
//! netdev's ICMP datagram socket reaches it there. Needs root and /dev/net/tun; otherwise it
//! says SKIPPED.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{Backend, NetNs};
use vhost_net_colo::testing::Options;

const HOST_ALIAS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);

/// The "guest": a namespace whose tap is relayed to the backend's rings by a thread.
struct Guest {
    ns: NetNs,
    stop: Arc<AtomicBool>,
    relay: Option<JoinHandle<()>>,
    backend: Backend,
    /// Where the backend runs, when not in the test's own namespace (removed after it stops).
    _backend_ns: Option<NetNs>,
    _dir: tempfile::TempDir,
}

impl Guest {
    /// Starts the backend on `netdev` and a namespace `prefix` configured as QEMU's default
    /// guest; `None` (SKIPPED printed) where this host cannot.
    fn start(prefix: &str, netdev: &str) -> Option<Guest> {
        Self::start_with(prefix, netdev, None)
    }

    /// As [`Guest::start`], the backend running inside `backend_ns` when given.
    fn start_with(prefix: &str, netdev: &str, backend_ns: Option<NetNs>) -> Option<Guest> {
        let ns = common::netns_with_tun(prefix)?;
        let dir = tempfile::tempdir().unwrap();
        let backend = common::spawn_backend(dir.path(), netdev, &[], true, backend_ns.as_ref());
        let mut fe = backend.frontend(&Options::default());
        let tap_name = format!("{prefix}0");
        let mut tap = common::tap_in(&ns, &tap_name);
        ns.ip(&["link", "set", "lo", "up"]).unwrap();
        ns.ip(&["addr", "add", "10.0.2.15/24", "dev", &tap_name])
            .unwrap();
        ns.ip(&["link", "set", &tap_name, "up"]).unwrap();
        ns.ip(&["route", "add", "default", "via", "10.0.2.2"])
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let relay = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop2.load(Ordering::Relaxed) {
                let mut idle = true;
                for _ in 0..64 {
                    match tap.read(&mut buf) {
                        Ok(n) if n > 0 => {
                            fe.send(&buf[..n]).unwrap();
                            idle = false;
                        }
                        _ => break,
                    }
                }
                while let Some((f, _)) = fe.try_recv() {
                    let _ = tap.write(&f);
                    idle = false;
                }
                if idle {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        });
        Some(Guest {
            ns,
            stop,
            relay: Some(relay),
            backend,
            _backend_ns: backend_ns,
            _dir: dir,
        })
    }

    /// Runs `f` on a thread inside the guest's namespace.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        common::in_netns(&self.ns, f)
    }

    /// The netdev's NAT counters (`query-net`).
    fn nat_counters(&self) -> serde_json::Value {
        let mut q = self.backend.qmp();
        let v = q.execute("query-net", serde_json::json!({})).unwrap();
        v["netdev"]["state"]["nat"].clone()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(r) = self.relay.take() {
            let _ = r.join();
        }
    }
}

/// A TCP server on 127.0.0.1: per connection it reads until the peer half-closes, then writes
/// back `b"got N from ADDR\n"` followed by the data reversed, and closes.
fn reversing_server() -> (u16, JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let h = std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { break };
            std::thread::spawn(move || {
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let peer = s.peer_addr().unwrap();
                let mut data = Vec::new();
                if s.read_to_end(&mut data).is_err() {
                    return;
                }
                let mut reply = format!("got {} from {}\n", data.len(), peer.ip()).into_bytes();
                data.reverse();
                reply.extend_from_slice(&data);
                let _ = s.write_all(&reply);
            });
        }
    });
    (port, h)
}

/// A port on 127.0.0.1 where nothing listens.
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// A UDP server on 127.0.0.1 answering each datagram with `b"echo:"` + the datagram, and a
/// datagram of `b"big:"` + 4000 bytes to one starting with `b"big"` (larger than the MTU).
fn udp_echo() -> colo_tests::UdpServer {
    colo_tests::UdpServer::start(|d| {
        Some(if d.starts_with(b"big") {
            [b"big:".as_slice(), &payload(4000)].concat()
        } else {
            [b"echo:".as_slice(), d].concat()
        })
    })
    .unwrap()
}

/// A DNS query for `name`, type A, id `id`.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

#[test]
fn guest_reaches_host_services_through_nat_and_dns() {
    let (tcp_port, _srv) = reversing_server();
    let udp = udp_echo();
    let dns = colo_tests::UdpServer::dns().unwrap();
    let (udp_port, dns_port) = (udp.port, dns.port);
    let netdev = format!("user,id=n0,x-dns-upstream=127.0.0.1:{dns_port},x-connect-timeout=3");
    let Some(g) = Guest::start("vnnat", &netdev) else {
        return;
    };

    // TCP both ways with a half-close: the guest sends 300 KB and shuts its write side; the
    // server (which sees the connection come from 127.0.0.1) answers after that EOF.
    let sent = payload(300_000);
    let sent2 = sent.clone();
    let reply = g.run(move || {
        let to = SocketAddr::from((HOST_ALIAS, tcp_port));
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(10)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(&sent2).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut r = Vec::new();
        s.read_to_end(&mut r).unwrap();
        r
    });
    let head = b"got 300000 from 127.0.0.1\n";
    assert!(
        reply.starts_with(head),
        "reply: {:?}",
        String::from_utf8_lossy(&reply[..reply.len().min(80)])
    );
    let mut back = reply[head.len()..].to_vec();
    back.reverse();
    assert!(
        back == sent,
        "relayed data differs ({} bytes back)",
        back.len()
    );

    // Refused on the host: the guest's connect is refused (a RST), promptly.
    let closed = closed_port();
    let (err, took) = g.run(move || {
        let t = Instant::now();
        let to = SocketAddr::from((HOST_ALIAS, closed));
        let e = TcpStream::connect_timeout(&to, Duration::from_secs(10)).unwrap_err();
        (e.kind(), t.elapsed())
    });
    assert_eq!(err, ErrorKind::ConnectionRefused);
    assert!(took < Duration::from_secs(3), "refusal took {took:?}");

    // A host listener whose accept queue is full drops SYNs: the netdev's connect gets no
    // answer. The stack keeps serving other connections meanwhile, and after
    // x-connect-timeout=3 the guest gets host unreachable (ICMP).
    let full = TcpListener::bind("127.0.0.1:0").unwrap();
    let full_port = full.local_addr().unwrap().port();
    // SAFETY: listen(2) again on our listening socket, to shrink its backlog to 0.
    assert_eq!(unsafe { libc::listen(full.as_raw_fd(), 0) }, 0);
    let mut fillers = Vec::new();
    for _ in 0..3 {
        if let Ok(s) = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], full_port)),
            Duration::from_millis(300),
        ) {
            fillers.push(s);
        }
    }
    let (stalled, quick) = std::thread::scope(|sc| {
        let stalled = sc.spawn(|| {
            g.run(move || {
                let t = Instant::now();
                let to = SocketAddr::from((HOST_ALIAS, full_port));
                let r = TcpStream::connect_timeout(&to, Duration::from_secs(20));
                (r.map(|_| ()).map_err(|e| e.kind()), t.elapsed())
            })
        });
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        let quick = g.run(move || {
            let to = SocketAddr::from((HOST_ALIAS, tcp_port));
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"abc").unwrap();
            s.shutdown(Shutdown::Write).unwrap();
            let mut r = String::new();
            s.read_to_string(&mut r).unwrap();
            r
        });
        let quick_took = t.elapsed();
        (stalled.join().unwrap(), (quick, quick_took))
    });
    // The netdev served this one while the other connect hung.
    assert_eq!(quick.0, "got 3 from 127.0.0.1\ncba");
    assert!(quick.1 < Duration::from_millis(1500), "took {:?}", quick.1);
    let (res, took) = stalled;
    assert_eq!(res, Err(ErrorKind::HostUnreachable), "after {took:?}");
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(10),
        "unreachable after {took:?}"
    );
    drop(fillers);

    // UDP: the reply comes back from the address the guest sent to; one larger than the MTU
    // arrives whole (IPv4 fragments, reassembled by the guest's stack).
    let (small, big) = g.run(move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let to = SocketAddr::from((HOST_ALIAS, udp_port));
        s.send_to(b"hello", to).unwrap();
        let mut buf = [0u8; 8192];
        let (n, from) = s.recv_from(&mut buf).unwrap();
        let small = (buf[..n].to_vec(), from);
        s.send_to(b"big please", to).unwrap();
        let (n, from) = s.recv_from(&mut buf).unwrap();
        (small, (buf[..n].to_vec(), from))
    });
    assert_eq!(small.0, b"echo:hello");
    assert_eq!(small.1, SocketAddr::from((HOST_ALIAS, udp_port)));
    assert_eq!(big.0, [b"big:".as_slice(), &payload(4000)].concat());
    assert_eq!(big.1, SocketAddr::from((HOST_ALIAS, udp_port)));

    // DNS at 10.0.2.3:53, answered by the test's responder, the answer from 10.0.2.3:53.
    let (answer, from) = g.run(|| {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.send_to(&dns_query(0x4242, "colo.test"), (DNS, 53))
            .unwrap();
        let mut buf = [0u8; 512];
        let (n, from) = s.recv_from(&mut buf).unwrap();
        (buf[..n].to_vec(), from)
    });
    assert_eq!(from, SocketAddr::V4(SocketAddrV4::new(DNS, 53)));
    assert_eq!(&answer[..2], &[0x42, 0x42]);
    assert_eq!(&answer[answer.len() - 4..], &[10, 9, 8, 7]);

    // DNS over TCP: 10.0.2.3:53 reaches the upstream's port over TCP too (a TCP listener on the
    // responder's port number, when that port is free for TCP).
    match TcpListener::bind(("127.0.0.1", dns_port)) {
        Ok(l) => {
            let srv = std::thread::spawn(move || {
                let (mut s, _) = l.accept().unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut q = [0u8; 4];
                s.read_exact(&mut q).unwrap();
                s.write_all(b"tcp-dns:").unwrap();
                s.write_all(&q).unwrap();
            });
            let got = g.run(|| {
                let to = SocketAddr::from((DNS, 53));
                let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                s.write_all(b"q123").unwrap();
                let mut r = Vec::new();
                s.read_to_end(&mut r).unwrap();
                r
            });
            srv.join().unwrap();
            assert_eq!(got, b"tcp-dns:q123");
        }
        Err(e) => eprintln!("note: DNS over TCP not checked, port {dns_port} busy for TCP: {e}"),
    }

    // busybox nslookup, a real resolver client, when there is one.
    if colo_tests::host::tool("busybox").is_ok() {
        let out =
            g.ns.command("busybox")
                .args(["nslookup", "colo.test", "10.0.2.3"])
                .output()
                .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("10.9.8.7"), "nslookup: {text}");
    }

    let c = g.nat_counters();
    assert!(c["tcp_connects"].as_u64().unwrap() >= 2, "{c}");
    assert!(c["tcp_refused"].as_u64().unwrap() >= 1, "{c}");
    assert!(c["tcp_timeouts"].as_u64().unwrap() >= 1, "{c}");
    assert!(c["dns_queries"].as_u64().unwrap() >= 1, "{c}");
    assert!(c["udp_to_guest"].as_u64().unwrap() >= 3, "{c}");
}

#[test]
fn restrict_on_lets_nothing_out_but_hostfwd_still_works() {
    let (tcp_port, _srv) = reversing_server();
    let udp = udp_echo();
    let dns = colo_tests::UdpServer::dns().unwrap();
    let (udp_port, dns_port) = (udp.port, dns.port);
    // hostfwd to the guest's port 7000, where the test listens inside the namespace.
    let netdev = format!(
        "user,id=n0,restrict=on,x-dns-upstream=127.0.0.1:{dns_port},hostfwd=tcp:127.0.0.1:0-:7000"
    );
    let Some(g) = Guest::start("vnrst", &netdev) else {
        return;
    };
    let (err, udp, dns) = g.run(move || {
        let to = SocketAddr::from((HOST_ALIAS, tcp_port));
        let e = TcpStream::connect_timeout(&to, Duration::from_secs(5))
            .map(|_| ())
            .map_err(|e| e.kind());
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(700)))
            .unwrap();
        let mut buf = [0u8; 512];
        s.send_to(b"hello", (HOST_ALIAS, udp_port)).unwrap();
        let udp = s.recv_from(&mut buf).is_ok();
        s.send_to(&dns_query(7, "colo.test"), (DNS, 53)).unwrap();
        let dns = s.recv_from(&mut buf).is_ok();
        (e, udp, dns)
    });
    // The SYN to the host alias meets the netdev's own stack, which refuses it.
    assert_eq!(err, Err(ErrorKind::ConnectionRefused));
    // Pings: the gateway answers itself; nothing goes out for the outside.
    let got = g.run(|| {
        raw_ping(
            &[HOST_ALIAS, OUTSIDE],
            9,
            1,
            b"r",
            2,
            Duration::from_secs(2),
            None,
        )
    });
    assert_eq!(
        replies(&got, HOST_ALIAS, 9, b"r"),
        vec![(1, true)],
        "{got:?}"
    );
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(!udp, "a UDP reply came through restrict=on");
    assert!(!dns, "a DNS answer came through restrict=on");

    // hostfwd still brings connections in.
    let l = g.run(|| TcpListener::bind("10.0.2.15:7000").unwrap());
    let mut q = g.backend.qmp();
    let v = q.execute("query-net", serde_json::json!({})).unwrap();
    let fwd = v["netdev"]["state"]["hostfwd"][0]
        .as_str()
        .unwrap()
        .to_string();
    let host: SocketAddr = fwd
        .strip_prefix("tcp:")
        .unwrap()
        .split('-')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let mut c = TcpStream::connect(host).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"in").unwrap();
    l.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = loop {
        match l.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "hostfwd brought no connection");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut two = [0u8; 2];
    s.read_exact(&mut two).unwrap();
    assert_eq!(&two, b"in");
    s.write_all(b"ok").unwrap();
    c.read_exact(&mut two).unwrap();
    assert_eq!(&two, b"ok");

    let c = g.nat_counters();
    assert!(c["dropped_restricted"].as_u64().unwrap() >= 3, "{c}");
    assert_eq!(c["icmp_echo_out"].as_u64().unwrap(), 0, "{c}");
    assert_eq!(c["tcp_connects"].as_u64().unwrap(), 0, "{c}");
}

#[test]
fn dhcp_pool_gives_two_clients_distinct_leases_from_dhcpstart() {
    use std::os::unix::fs::PermissionsExt;
    if let Err(why) = colo_tests::host::tool("busybox") {
        common::skipped(&format!("{why} (udhcpc)"));
        return;
    }
    let Some(ns) = common::netns_with_tun("vnpool") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let backend = common::spawn_backend(
        dir.path(),
        "user,id=n0,dhcpstart=10.0.2.20",
        &[],
        false,
        None,
    );
    let mut fe = backend.frontend(&Options::default());
    // Two NICs on the same link (a hub): every frame from the netdev goes to both.
    let names = ["vnpool0", "vnpool1"];
    let mut taps: Vec<File> = names.iter().map(|n| common::tap_in(&ns, n)).collect();
    let mut clients = Vec::new();
    for (i, n) in names.iter().enumerate() {
        ns.ip(&["link", "set", n, "up"]).unwrap();
        let out = dir.path().join(format!("lease{i}.txt"));
        let script = dir.path().join(format!("udhcpc{i}.sh"));
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho \"$1 ip=$ip router=$router\" >> {}\n",
                out.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let c = common::ChildGuard::spawn(
            &format!("udhcpc{i}"),
            ns.command("busybox")
                .args(["udhcpc", "-i", n, "-f", "-q", "-n", "-t", "5", "-T", "1"])
                .arg("-s")
                .arg(&script),
            dir.path(),
        )
        .unwrap();
        clients.push((c, out));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = vec![0u8; 65536];
    let mut done = [None, None];
    while done.iter().any(Option::is_none) {
        assert!(Instant::now() < deadline, "udhcpc did not finish");
        for (i, (c, _)) in clients.iter_mut().enumerate() {
            if done[i].is_none() {
                done[i] = c.try_wait();
            }
        }
        let mut idle = true;
        for t in taps.iter_mut() {
            if let Ok(n) = t.read(&mut buf)
                && n > 0
            {
                fe.send(&buf[..n]).unwrap();
                idle = false;
            }
        }
        while let Some((f, _)) = fe.try_recv() {
            for t in taps.iter_mut() {
                let _ = t.write(&f);
            }
            idle = false;
        }
        if idle {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let leases: Vec<String> = clients
        .iter()
        .map(|(_, out)| std::fs::read_to_string(out).unwrap_or_default())
        .collect();
    for (i, st) in done.iter().enumerate() {
        assert!(st.unwrap().success(), "udhcpc{i} failed: {leases:?}");
    }
    let mut ips: Vec<&str> = leases
        .iter()
        .map(|l| {
            l.lines()
                .find(|x| x.starts_with("bound "))
                .and_then(|x| x.split_whitespace().nth(1))
                .unwrap_or("")
        })
        .collect();
    ips.sort();
    assert_eq!(ips, ["ip=10.0.2.20", "ip=10.0.2.21"], "{leases:?}");
    drop(backend);
}

#[test]
fn bad_nat_options_are_refused_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("x.sock");
    for (netdev, says) in [
        ("user,id=n0,restrict=maybe", "restrict=maybe"),
        (
            "user,id=n0,x-dns-upstream=10.0.2.3",
            "x-dns-upstream=10.0.2.3",
        ),
        (
            "user,id=n0,x-dns-upstream=nohost:53",
            "x-dns-upstream=nohost:53",
        ),
        ("user,id=n0,x-connect-timeout=0", "x-connect-timeout=0"),
        ("user,id=n0,x-connect-timeout=abc", "x-connect-timeout=abc"),
    ] {
        let out = std::process::Command::new(common::BIN)
            .arg("--socket")
            .arg(&sock)
            .args(["--netdev", netdev])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{netdev} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{netdev}: {err}");
        assert!(!err.contains("panicked"), "{netdev}: {err}");
    }
}

/// An address on the backend namespace's loopback (TEST-NET-1): the "outside" pings reach.
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// An address the backend namespace has no route to (TEST-NET-3).
const NO_ROUTE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);

/// A namespace for the backend: `lo` up with [`OUTSIDE`] on it, `net.ipv4.ping_group_range` set
/// to `range` there (only there: the sysctl is per namespace).
fn backend_ns(prefix: &str, range: &'static str) -> Option<NetNs> {
    let ns = common::netns_with_tun(prefix)?;
    ns.ip(&["addr", "add", "192.0.2.1/32", "dev", "lo"])
        .unwrap();
    // /proc/sys/net is the namespace of the thread that opens it.
    common::in_netns(&ns, move || {
        std::fs::write("/proc/sys/net/ipv4/ping_group_range", range).unwrap();
        let now = std::fs::read_to_string("/proc/sys/net/ipv4/ping_group_range").unwrap();
        assert_eq!(now.split_whitespace().collect::<Vec<_>>().join(" "), range);
    });
    Some(ns)
}

/// The internet checksum of `data` is right (it sums to all ones).
fn checksum_ok(data: &[u8]) -> bool {
    let mut s: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s == 0xffff
}

/// An ICMP message that reached the guest: who sent it and the message (header on).
#[derive(Debug)]
struct Icmp {
    from: Ipv4Addr,
    msg: Vec<u8>,
}

/// From a raw ICMP socket in the calling thread's namespace (the guest's): echo requests with
/// identifier `id`, sequence 1..=`count` and `data` to each of `dsts` (with TTL `ttl` when
/// given), then every ICMP message
/// that arrives until `expect` of them did or `wait` passed. The IP header and ICMP checksums
/// of each are checked here.
fn raw_ping(
    dsts: &[Ipv4Addr],
    id: u16,
    count: u16,
    data: &[u8],
    expect: usize,
    wait: Duration,
    ttl: Option<u8>,
) -> Vec<Icmp> {
    // SAFETY: plain socket(2); checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor, owned from here on.
    let sock: std::os::fd::OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
    if let Some(ttl) = ttl {
        let v = libc::c_int::from(ttl);
        // SAFETY: setsockopt with a c_int of the stated size on our socket.
        let r = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_TTL,
                (&raw const v).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "IP_TTL");
    }
    for &dst in dsts {
        for seq in 1..=count {
            let mut m = vec![8u8, 0, 0, 0];
            m.extend_from_slice(&id.to_be_bytes());
            m.extend_from_slice(&seq.to_be_bytes());
            m.extend_from_slice(data);
            let mut s: u32 = m
                .chunks(2)
                .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
                .sum();
            while s > 0xffff {
                s = (s & 0xffff) + (s >> 16);
            }
            m[2..4].copy_from_slice(&(!(s as u16)).to_be_bytes());
            let sa = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from(dst).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sendto from a live buffer to a valid sockaddr_in.
            let r = unsafe {
                libc::sendto(
                    sock.as_raw_fd(),
                    m.as_ptr().cast(),
                    m.len(),
                    0,
                    (&raw const sa).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            assert_eq!(
                r,
                m.len() as isize,
                "sendto {dst}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    let mut got = Vec::new();
    let deadline = Instant::now() + wait;
    let mut buf = vec![0u8; 65536];
    while got.len() < expect && Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one valid pollfd.
        unsafe { libc::poll(&raw mut pfd, 1, left.as_millis().max(1) as libc::c_int) };
        // SAFETY: recv into a live buffer of its length.
        let n = unsafe {
            libc::recv(
                sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n <= 0 {
            continue;
        }
        let p = &buf[..n as usize];
        let ihl = usize::from(p[0] & 0x0f) * 4;
        assert!(checksum_ok(&p[..ihl]), "IP header checksum: {p:?}");
        let msg = p[ihl..].to_vec();
        let from = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
        // The raw socket also sees the guest's own requests (to itself they are not: they go
        // out of the tap), and nothing else pings here; keep replies and errors.
        if msg.first() == Some(&8) {
            continue;
        }
        assert!(checksum_ok(&msg), "ICMP checksum from {from}: {msg:?}");
        got.push(Icmp { from, msg });
    }
    got
}

/// The echo replies among `got` from `from` with identifier `id`: their sequence numbers, and
/// whether each carried `data`.
fn replies(got: &[Icmp], from: Ipv4Addr, id: u16, data: &[u8]) -> Vec<(u16, bool)> {
    let mut r: Vec<(u16, bool)> = got
        .iter()
        .filter(|i| i.from == from && i.msg[..2] == [0, 0] && i.msg[4..6] == id.to_be_bytes())
        .map(|i| {
            (
                u16::from_be_bytes([i.msg[6], i.msg[7]]),
                &i.msg[8..] == data,
            )
        })
        .collect();
    r.sort();
    r
}

#[test]
fn guest_pings_the_gateway_and_through_a_ping_socket_the_outside() {
    let Some(bns) = backend_ns("vnicb", "0 2147483647") else {
        return;
    };
    let Some(g) = Guest::start_with("vnicg", "user,id=n0", Some(bns)) else {
        return;
    };
    let data: Vec<u8> = (0..56u8).map(|i| i.wrapping_mul(41)).collect();
    let d2 = data.clone();
    // Three pings each of the gateway, the DNS address, an address behind the host's ping
    // socket, and one with no route behind the host.
    let got = g.run(move || {
        raw_ping(
            &[HOST_ALIAS, DNS, OUTSIDE, NO_ROUTE],
            0x4a4b,
            3,
            &d2,
            12,
            Duration::from_secs(10),
            None,
        )
    });
    let all_three = vec![(1, true), (2, true), (3, true)];
    for from in [HOST_ALIAS, DNS, OUTSIDE] {
        assert_eq!(
            replies(&got, from, 0x4a4b, &data),
            all_three,
            "{from}: {got:?}"
        );
    }
    // No route on the host: the gateway says net unreachable, quoting the guest's request.
    let unreach: Vec<&Icmp> = got.iter().filter(|i| i.msg[0] == 3).collect();
    assert_eq!(unreach.len(), 3, "{got:?}");
    for u in unreach {
        assert_eq!(u.from, HOST_ALIAS);
        assert_eq!(u.msg[1], 0, "net unreachable");
        let quoted = &u.msg[8..];
        assert_eq!(&quoted[16..20], &NO_ROUTE.octets(), "quoted destination");
        assert_eq!(&quoted[20..22], &[8, 0], "quoted echo request");
        assert_eq!(
            &quoted[24..26],
            &0x4a4b_u16.to_be_bytes(),
            "guest's identifier"
        );
    }

    // A UDP datagram to a closed port of the host (alias): the host's port unreachable reaches
    // the guest's connected socket as ECONNREFUSED.
    let refused = g.run(|| {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect((HOST_ALIAS, 9)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.send(b"anyone?").unwrap();
        let mut b = [0u8; 16];
        s.recv(&mut b).map_err(|e| e.kind())
    });
    assert_eq!(refused, Err(ErrorKind::ConnectionRefused));

    // The system's ping in the guest: busybox's (raw socket, like the test guest's).
    if colo_tests::host::tool("busybox").is_ok() {
        for dst in ["10.0.2.2", "192.0.2.1"] {
            let out =
                g.ns.command("busybox")
                    .args(["ping", "-c", "3", "-W", "5", dst])
                    .output()
                    .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "busybox ping {dst}: {text}");
            assert!(text.contains("3 packets received"), "{text}");
        }
    }

    let c = g.nat_counters();
    assert!(c["icmp_echo_local"].as_u64().unwrap() >= 6, "{c}");
    assert!(c["icmp_echo_out"].as_u64().unwrap() >= 3, "{c}");
    assert!(c["icmp_echo_in"].as_u64().unwrap() >= 3, "{c}");
    assert!(c["icmp_errors_to_guest"].as_u64().unwrap() >= 4, "{c}");
    assert_eq!(c["icmp_unavailable"].as_u64().unwrap(), 0, "{c}");
}

#[test]
fn without_ping_group_range_the_netdev_warns_and_only_the_gateway_answers() {
    let Some(bns) = backend_ns("vnicn", "1 0") else {
        return;
    };
    let Some(g) = Guest::start_with("vnicm", "user,id=n0", Some(bns)) else {
        return;
    };
    let log = std::fs::read_to_string(g.backend.proc.stderr_path()).unwrap();
    let warning: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("net.ipv4.ping_group_range"))
        .collect();
    assert_eq!(warning.len(), 1, "one warning at start: {log}");
    assert!(warning[0].contains("\"1 0\""), "{}", warning[0]);
    let got = g.run(|| {
        raw_ping(
            &[HOST_ALIAS, OUTSIDE],
            7,
            2,
            b"abc",
            4,
            Duration::from_secs(3),
            None,
        )
    });
    assert_eq!(
        replies(&got, HOST_ALIAS, 7, b"abc"),
        vec![(1, true), (2, true)]
    );
    assert!(replies(&got, OUTSIDE, 7, b"abc").is_empty(), "{got:?}");
    let c = g.nat_counters();
    assert_eq!(c["icmp_unavailable"].as_u64().unwrap(), 2, "{c}");
    assert_eq!(c["icmp_echo_out"].as_u64().unwrap(), 0, "{c}");
}

#[test]
fn a_ping_with_ttl_1_gets_time_exceeded_from_the_router_behind_the_host() {
    // backend namespace --veth-- "far" namespace, a router (forwarding on) for 198.18.2.0/24.
    let Some(bns) = backend_ns("vnict", "0 2147483647") else {
        return;
    };
    let far = NetNs::new("vnicf").unwrap();
    let mut veth = colo_tests::Veth::new("vnicv").unwrap();
    veth.move_a(&bns).unwrap();
    veth.move_b(&far).unwrap();
    veth.up_a(Some("198.18.0.1/24")).unwrap();
    veth.up_b(Some("198.18.0.2/24")).unwrap();
    bns.ip(&["route", "add", "198.18.2.0/24", "via", "198.18.0.2"])
        .unwrap();
    far.ip(&["route", "add", "default", "via", "198.18.0.1"])
        .unwrap();
    common::in_netns(&far, || {
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap();
    });
    let Some(g) = Guest::start_with("vnicu", "user,id=n0", Some(bns)) else {
        return;
    };
    let beyond = Ipv4Addr::new(198, 18, 2, 1);
    let got = g.run(move || {
        raw_ping(
            &[beyond],
            0x5151,
            3,
            b"ttl",
            3,
            Duration::from_secs(10),
            Some(1),
        )
    });
    let exceeded: Vec<&Icmp> = got.iter().filter(|i| i.msg[..2] == [11, 0]).collect();
    assert_eq!(exceeded.len(), 3, "{got:?}");
    let mut seqs = Vec::new();
    for e in exceeded {
        assert_eq!(e.from, Ipv4Addr::new(198, 18, 0, 2), "the router said it");
        let quoted = &e.msg[8..];
        assert_eq!(&quoted[12..16], &[10, 0, 2, 15], "quoted source: the guest");
        assert_eq!(&quoted[16..20], &beyond.octets(), "quoted destination");
        assert_eq!(&quoted[20..22], &[8, 0], "quoted echo request");
        assert_eq!(
            &quoted[24..26],
            &0x5151_u16.to_be_bytes(),
            "guest's identifier"
        );
        seqs.push(u16::from_be_bytes([quoted[26], quoted[27]]));
    }
    seqs.sort();
    assert_eq!(seqs, [1, 2, 3]);
    drop(g);
    drop(veth);
    drop(far);
}
