//! vmm-min as the frontend of vhost-net-colo with a `tap` netdev on a bridge inside a network
//! namespace the test creates, with real KVM (here if this host's /dev/kvm is real, else inside
//! the KVM lab). One boot, several checks:
//! - the tap is attached to the bridge by the netdev's `script=`;
//! - the guest's HTTP (port 80) and echo (port 7) answer from inside the namespace;
//! - a `filter-mirror` (queue=tx, what the guest receives) delivers at its outdev exactly the
//!   frames a `filter-dump` of the same direction wrote, in order and byte for byte, and the
//!   HTTP request is among them.
//!
//! The `user` netdev with hostfwd under vmm-min is `vmm_lab.rs`.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use colo_proto::frame::FrameReader;
use colo_proto::packet::{Network, Transport, parse_ethernet};
use colo_tests::process::ChildGuard;
use colo_tests::{Bridge, NetNs, TestDir, cargo_bin, guest_image, lab, require, secs, unique_name};

/// The packets of a classic little-endian pcap file (as filter-dump writes it).
fn read_pcap(path: &Path) -> Vec<Vec<u8>> {
    let b = std::fs::read(path).unwrap();
    assert!(b.len() >= 24, "pcap too short");
    assert_eq!(&b[..4], &[0xd4, 0xc3, 0xb2, 0xa1], "pcap magic");
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= b.len() {
        let incl = u32::from_le_bytes(b[at + 8..at + 12].try_into().unwrap()) as usize;
        let orig = u32::from_le_bytes(b[at + 12..at + 16].try_into().unwrap()) as usize;
        assert_eq!(incl, orig, "dump truncated a packet");
        if at + 16 + incl > b.len() {
            break; // the last record is still being written
        }
        out.push(b[at + 16..at + 16 + incl].to_vec());
        at += 16 + incl;
    }
    out
}

/// Runs a shell snippet inside the namespace; its stdout.
fn ns_sh(ns: &NetNs, script: &str) -> String {
    let out = ns.command("bash").args(["-c", script]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn vmm_lab_guest_serves_http_and_echo_through_tap_on_a_bridge_and_mirror_matches_dump() {
    // Built on the host: inside the lab nothing is built.
    cargo_bin("vhost-net-colo").unwrap();
    cargo_bin("vmm-min").unwrap();
    if lab::needs_real_kvm_within(
        "vmm_lab_guest_serves_http_and_echo_through_tap_on_a_bridge_and_mirror_matches_dump",
        Duration::from_secs(600),
    ) {
        return;
    }
    let img = require!(guest_image());
    require!(colo_tests::host::netns());
    require!(colo_tests::host::tun());
    require!(colo_tests::host::tool("curl"));
    let t0 = Instant::now();
    let dir = TestDir::new().unwrap();
    let ns = NetNs::new("vln").unwrap();
    let br = Bridge::new("vlnbr", Some(&ns)).unwrap();
    br.add_addr("10.0.6.1/24").unwrap();
    let tap = unique_name("vlnt");
    let up = dir.join("ifup.sh");
    std::fs::write(
        &up,
        format!(
            "#!/bin/sh\nip link set \"$1\" up\nip link set \"$1\" master {}\n",
            br.name()
        ),
    )
    .unwrap();
    Command::new("chmod").arg("+x").arg(&up).status().unwrap();
    let sock = dir.join("net.sock");
    let mirror = dir.join("mirror0.sock");
    let dump = dir.join("tx.pcap");
    let qmp = dir.join("qmp.sock");
    let mut ncmd = ns.command(cargo_bin("vhost-net-colo").unwrap().to_str().unwrap());
    ncmd.arg("--socket").arg(&sock).args([
        "--netdev",
        &format!("tap,id=hn0,ifname={tap},script={}", up.display()),
        "--mac",
        "52:54:00:12:34:56",
        "--qmp",
        &format!("unix:{}", qmp.display()),
        "--chardev",
        &format!(
            "socket,id=mirror0,path={},server=on,wait=off",
            mirror.display()
        ),
        "--object",
        "filter-mirror,id=m0,netdev=hn0,queue=tx,outdev=mirror0",
        "--object",
        &format!(
            "filter-dump,id=d0,netdev=hn0,queue=tx,file={}",
            dump.display()
        ),
    ]);
    let _net = ChildGuard::spawn("vhost-net-colo", &mut ncmd, dir.path()).unwrap();
    colo_tests::wait_for_unix_socket(&sock, secs(60)).unwrap();
    colo_tests::wait_for_unix_socket(&mirror, secs(60)).unwrap();
    let links = ns.ip(&["link", "show", "master", br.name()]).unwrap();
    assert!(
        links.contains(&tap),
        "script= attached the tap to the bridge: {links}"
    );
    // The mirror's outdev, read from the start.
    let frames: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let reader = {
        let s = UnixStream::connect(&mirror).unwrap();
        let f = frames.clone();
        std::thread::spawn(move || {
            let mut r = FrameReader::new(s, false);
            while let Ok(Some(fr)) = r.read_frame() {
                f.lock().unwrap().push(fr.payload);
            }
        })
    };

    let mut cmd = Command::new(cargo_bin("vmm-min").unwrap());
    cmd.arg("--kernel")
        .arg(&img.kernel)
        .arg("--initrd")
        .arg(&img.initrd)
        .args([
            "--cmdline",
            "console=ttyS0 quiet pci=noearly colo.services=http,echo colo.ip=10.0.6.15/24 \
             colo.gw=10.0.6.1",
            "--memory",
            "512M",
            "--serial",
            "stdio",
            "--net",
            &format!("vhost-user,socket={},mac=52:54:00:12:34:56", sock.display()),
        ]);
    let mut vmm = ChildGuard::spawn("vmm-min", &mut cmd, dir.path()).unwrap();
    vmm.wait_for_output("COLO-GUEST-READY", secs(240)).unwrap();
    let ready = t0.elapsed();

    // HTTP from inside the namespace.
    let deadline = secs(60);
    loop {
        let page = ns_sh(&ns, "curl -s -m 20 http://10.0.6.15/");
        if page.contains("<h1>colo guest</h1>") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "HTTP through the tap: {page:?}{}",
            vmm.log_tail(20)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Echo: 40 lines on one connection come back unchanged (a new connection per attempt,
    // until a deadline, as for HTTP: the guest may be slow to answer under TCG-in-the-lab).
    let lines: String = (0..40).map(|i| format!("echo through tap {i}\n")).collect();
    std::fs::write(dir.join("lines"), &lines).unwrap();
    let deadline = secs(120);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let got = ns_sh(
            &ns,
            &format!(
                "exec 3<>/dev/tcp/10.0.6.15/7 && cat {} >&3 && timeout 30 head -c {} <&3",
                dir.join("lines").display(),
                lines.len()
            ),
        );
        if got == lines {
            break;
        }
        let net = colo_tests::qmp_connect(&qmp, secs(10))
            .and_then(|mut q| Ok(q.execute("query-net", serde_json::json!({}))?))
            .map(|v| v.to_string())
            .unwrap_or_else(|e| format!("query-net: {e:#}"));
        eprintln!(
            "echo attempt {attempts}: {} of {} bytes back; backend: {net}",
            got.len(),
            lines.len()
        );
        assert!(Instant::now() < deadline, "echo through the tap: {got:?}");
    }
    if attempts > 1 {
        eprintln!("vmm_lab_net: echo answered at attempt {attempts}");
    }

    // Mirror output == dump of the same direction, in order, byte for byte. The tap is on the
    // bridge before the mirror's client connects (wait=off: a mirror without a client drops
    // frames, as QEMU's), so the dump may begin with a few frames the mirror never had: the
    // bridge's IPv6 autoconfiguration, no TCP. Late frames (ACKs, autoconfiguration) may still
    // trickle in, so wait until both agree in length.
    let deadline = secs(30);
    loop {
        let got = frames.lock().unwrap().clone();
        let want = read_pcap(&dump);
        assert!(!got.is_empty(), "nothing mirrored");
        let skip = (0..want.len())
            .find(|&k| {
                let n = got.len().min(want.len() - k);
                got[..n] == want[k..k + n]
            })
            .unwrap_or_else(|| {
                panic!(
                    "the mirrored frames ({}) are not a run of the dumped frames ({})",
                    got.len(),
                    want.len()
                )
            });
        for (i, f) in want[..skip].iter().enumerate() {
            let p = parse_ethernet(f);
            assert!(
                !matches!(p.net, Network::Ip(_, Transport::Tcp(_))),
                "dumped frame {i}, before the mirror's first, is TCP"
            );
        }
        let n = want.len() - skip;
        if got.len() == n && n > 10 {
            assert!(
                got.iter().any(|f| f.windows(5).any(|w| w == b"GET /")),
                "the HTTP request is among the mirrored frames"
            );
            assert!(
                got.iter()
                    .any(|f| f.windows(16).any(|w| w == b"echo through tap")),
                "the echo lines are among the mirrored frames"
            );
            eprintln!(
                "vmm_lab_net: READY after {:.1} s, {} frames mirrored = dumped ({} dumped \
                 before the mirror's client), all checks after {:.1} s",
                ready.as_secs_f64(),
                n,
                skip,
                t0.elapsed().as_secs_f64()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "mirror {} frames, dump {}",
            got.len(),
            want.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(vmm);
    drop(reader);
}
