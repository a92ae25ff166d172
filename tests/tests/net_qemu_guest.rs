//! vhost-net-colo as the network of a real guest: QEMU 7.2 under TCG (`-M microvm`, memfd shared
//! memory, `-netdev vhost-user` + `virtio-net-device`) boots the stock test guest.
//!
//! - `user` netdev with hostfwd: HTTP and echo answer; a `filter-mirror` (queue=tx) delivers
//!   exactly the frames the guest received, in order and byte for byte, as a `filter-dump` pcap
//!   of the same direction shows; filters are removed and re-added (and switched off and on)
//!   while an echo client streams, and the stream comes back intact.
//! - `tap` netdev (with `script=`/`downscript=`) on a bridge inside a namespace the test
//!   creates: HTTP and echo answer from inside the namespace.
//! - backend restart: the backend is killed and started again while a client streams through
//!   the tap; QEMU reconnects and the stream completes intact.
//! - rewriter on real traffic: a primary (user netdev, mirror) and a secondary (redirectors in
//!   and out, rewriter) each run a guest; the secondary's rewritten TCP segments carry the
//!   primary's sequence numbers, and the real `comparer replay` on `filter-dump`s of the
//!   primary's output and of the secondary's rewritten output reports no checkpoint.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use colo_proto::frame::FrameReader;
use colo_proto::packet::parse_ethernet;
use colo_tests::guest::{READY_MARKER, qemu_tcg_guest, vhost_user_net_args};
use colo_tests::{
    Bridge, ChildGuard, GuestImage, NetNs, QmpClient, TestDir, cargo_bin, free_tcp_port, require,
    require_root, secs, unique_name,
};
use serde_json::json;

const BOOT_DEADLINE: u64 = 300;

fn backend(
    dir: &TestDir,
    name: &str,
    args: &[String],
    netns: Option<&NetNs>,
) -> (ChildGuard, PathBuf, PathBuf) {
    let bin = cargo_bin("vhost-net-colo").unwrap();
    let sock = dir.join(format!("{name}.vu.sock"));
    let qmp = dir.join(format!("{name}.qmp.sock"));
    let mut cmd = match netns {
        Some(ns) => ns.command(bin.to_str().unwrap()),
        None => Command::new(&bin),
    };
    cmd.arg("--socket")
        .arg(&sock)
        .arg("--qmp")
        .arg(format!("unix:{}", qmp.display()));
    cmd.args(args);
    cmd.env("RUST_LOG", "vhost_net_colo=debug");
    let g = ChildGuard::spawn(name, &mut cmd, dir.path()).unwrap();
    colo_tests::wait_for_unix_socket(&sock, secs(30)).unwrap();
    colo_tests::wait_for_unix_socket(&qmp, secs(30)).unwrap();
    (g, sock, qmp)
}

fn boot_guest(
    dir: &TestDir,
    name: &str,
    img: &GuestImage,
    sock: &Path,
    extra_append: &str,
) -> (ChildGuard, PathBuf) {
    let serial = dir.join(format!("{name}.serial.log"));
    let g = ChildGuard::spawn(
        name,
        qemu_tcg_guest(img, &format!("colo.services=http,echo {extra_append}"))
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .args(vhost_user_net_args(sock)),
        dir.path(),
    )
    .unwrap();
    (g, serial)
}

fn wait_ready(serial: &Path, guest: &mut ChildGuard) {
    let deadline = secs(BOOT_DEADLINE);
    loop {
        if std::fs::read_to_string(serial)
            .unwrap_or_default()
            .contains(READY_MARKER)
        {
            return;
        }
        guest.ensure_running().unwrap();
        assert!(
            Instant::now() < deadline,
            "guest not ready within {BOOT_DEADLINE} s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn qmp(path: &Path) -> QmpClient {
    colo_tests::qmp_connect(path, secs(20)).unwrap()
}

fn http_get(addr: &str) -> String {
    let deadline = secs(60);
    loop {
        let r = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect(addr)?;
            s.set_read_timeout(Some(Duration::from_secs(20)))?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })();
        match r {
            Ok(body) if body.contains("colo guest") => return body,
            other => {
                assert!(Instant::now() < deadline, "HTTP through {addr}: {other:?}");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}

/// Writes `total` bytes of a pattern to the echo service while reading the echo back; calls
/// `during` once a third has been sent. Returns what came back.
fn echo_stream(addr: &str, total: usize, during: impl FnOnce()) -> Vec<u8> {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut r = s.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => panic!("echo read after {} bytes: {e}", got.len()),
            }
        }
        got
    });
    let data = pattern(total);
    let mut w = s;
    let mut during = Some(during);
    for (i, chunk) in data.chunks(4096).enumerate() {
        w.write_all(chunk).unwrap();
        if i * 4096 >= total / 3
            && let Some(f) = during.take()
        {
            f();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    w.shutdown(Shutdown::Write).unwrap();
    reader.join().unwrap()
}

/// One echo connection: sends `data`, closes the write side, returns what came back.
fn echo_lines(addr: &str, data: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(data).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    got
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// The packets of a classic pcap file (little-endian, as filter-dump writes it).
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
        out.push(b[at + 16..at + 16 + incl].to_vec());
        at += 16 + incl;
    }
    out
}

/// Copies a classic pcap file, leaving out IPv6 frames (EtherType 0x86dd).
fn without_ipv6(from: &Path, to: &Path) {
    let b = std::fs::read(from).unwrap();
    assert!(b.len() >= 24, "pcap too short");
    let mut out = b[..24].to_vec();
    let mut at = 24;
    while at + 16 <= b.len() {
        let incl = u32::from_le_bytes(b[at + 8..at + 12].try_into().unwrap()) as usize;
        let rec = &b[at..at + 16 + incl];
        if rec.get(16 + 12..16 + 14) != Some(&[0x86, 0xdd][..]) {
            out.extend_from_slice(rec);
        }
        at += 16 + incl;
    }
    std::fs::write(to, out).unwrap();
}

/// Reads framed records from a TCP chardev server until the connection closes or `stop`.
/// Frames collected by a reader thread.
type Collected = Arc<Mutex<Vec<Vec<u8>>>>;

fn mirror_reader(port: u16) -> (Collected, std::thread::JoinHandle<()>) {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let frames = Arc::new(Mutex::new(Vec::new()));
    let f = frames.clone();
    let h = std::thread::spawn(move || {
        let mut r = FrameReader::new(s, false);
        while let Ok(Some(fr)) = r.read_frame() {
            f.lock().unwrap().push(fr.payload);
        }
    });
    (frames, h)
}

#[test]
fn guest_answers_through_user_netdev_and_mirror_matches_dump_across_filter_swaps() {
    let img = require!(colo_tests::guest_image());
    let dir = TestDir::new().unwrap();
    let (http, echo, mport) = (
        free_tcp_port().unwrap(),
        free_tcp_port().unwrap(),
        free_tcp_port().unwrap(),
    );
    let dump = dir.join("tx.pcap");
    let swap_dump = dir.join("swap.pcap");
    let args: Vec<String> = vec![
        "--netdev".into(),
        format!("user,id=n0,hostfwd=tcp:127.0.0.1:{http}-:80,hostfwd=tcp:127.0.0.1:{echo}-:7"),
        "--chardev".into(),
        format!("socket,id=mirror0,host=127.0.0.1,port={mport},server=on,wait=off"),
        "--object".into(),
        "filter-mirror,id=m0,netdev=n0,queue=tx,outdev=mirror0".into(),
        "--object".into(),
        format!(
            "filter-dump,id=d0,netdev=n0,queue=tx,file={}",
            dump.display()
        ),
    ];
    let (_be, sock, qmp_path) = backend(&dir, "backend", &args, None);
    let (mirrored, reader) = mirror_reader(mport);
    let (mut guest, serial) = boot_guest(&dir, "guest", &img, &sock, "");
    wait_ready(&serial, &mut guest);

    let body = http_get(&format!("127.0.0.1:{http}"));
    assert!(body.starts_with("HTTP/1."), "{body}");

    // Stream through echo while filters are removed, re-added and switched.
    let mut q = qmp(&qmp_path);
    let total = 300 * 1024;
    let back = echo_stream(&format!("127.0.0.1:{echo}"), total, || {
        for round in 0..3 {
            q.execute(
                "object-add",
                json!({"qom-type":"filter-dump","id":"swap","netdev":"n0","queue":"all",
                       "file": swap_dump.display().to_string(), "position":"head"}),
            )
            .unwrap();
            q.execute(
                "object-add",
                json!({"qom-type":"filter-rewriter","id":"rw","netdev":"n0","queue":"all",
                       "position":"id=m0","insert":"before"}),
            )
            .unwrap();
            q.execute(
                "qom-set",
                json!({"path":"swap","property":"status","value":"off"}),
            )
            .unwrap();
            std::thread::sleep(Duration::from_millis(50 * (round + 1)));
            q.execute(
                "qom-set",
                json!({"path":"swap","property":"status","value":"on"}),
            )
            .unwrap();
            q.execute("object-del", json!({"id":"swap"})).unwrap();
            q.execute("object-del", json!({"id":"rw"})).unwrap();
        }
    });
    assert_eq!(back.len(), total, "echo stream length");
    assert!(back == pattern(total), "echo stream corrupted");

    let filters = q.execute("query-filters", json!({})).unwrap();
    let ids: Vec<&str> = filters
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["m0", "d0"]);
    let m0 = &filters[0]["counters"];
    assert!(m0["sent"].as_u64().unwrap() > 50, "{filters}");
    assert_eq!(m0["errors"], 0, "{filters}");

    // Mirror output == dump of the same direction, in order, byte for byte. Traffic may still
    // trickle (ACKs), so compare the common prefix and wait until both agree in length.
    let deadline = secs(20);
    loop {
        let got = mirrored.lock().unwrap().clone();
        let want = read_pcap(&dump);
        let n = got.len().min(want.len());
        for i in 0..n {
            assert_eq!(got[i], want[i], "frame {i} differs");
        }
        if got.len() == want.len() && n > 50 {
            let has_get = got.iter().any(|f| f.windows(5).any(|w| w == b"GET /"));
            assert!(has_get, "the HTTP request is among the mirrored frames");
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
    drop(guest);
    drop(reader);
}

#[test]
fn guest_answers_through_tap_on_a_bridge_in_a_namespace() {
    let img = require!(colo_tests::guest_image());
    if !require_root() {
        return;
    }
    require!(colo_tests::host::netns());
    require!(colo_tests::host::tun());
    let dir = TestDir::new().unwrap();
    let ns = NetNs::new("vnc").unwrap();
    let br = Bridge::new("vncbr", Some(&ns)).unwrap();
    br.add_addr("10.0.3.1/24").unwrap();
    let tap = unique_name("vnct");
    let up = dir.join("ifup.sh");
    let down = dir.join("ifdown.sh");
    let mark = dir.join("downscript-ran");
    std::fs::write(
        &up,
        format!(
            "#!/bin/sh\nip link set \"$1\" up\nip link set \"$1\" master {}\n",
            br.name()
        ),
    )
    .unwrap();
    std::fs::write(
        &down,
        format!(
            "#!/bin/sh\nip link set \"$1\" nomaster\necho \"$1\" > {}\n",
            mark.display()
        ),
    )
    .unwrap();
    for p in [&up, &down] {
        Command::new("chmod").arg("+x").arg(p).status().unwrap();
    }
    let args: Vec<String> = vec![
        "--netdev".into(),
        format!(
            "tap,id=hn0,ifname={tap},script={},downscript={}",
            up.display(),
            down.display()
        ),
    ];
    let (mut be, sock, qmp_path) = backend(&dir, "backend", &args, Some(&ns));
    let links = ns.ip(&["link", "show", "master", br.name()]).unwrap();
    assert!(
        links.contains(&tap),
        "script= attached the tap to the bridge: {links}"
    );
    let (mut guest, serial) = boot_guest(
        &dir,
        "guest",
        &img,
        &sock,
        "colo.ip=10.0.3.15/24 colo.gw=10.0.3.1",
    );
    wait_ready(&serial, &mut guest);

    let deadline = secs(60);
    let body = loop {
        let out = ns
            .command("curl")
            .args(["-s", "-m", "20", "http://10.0.3.15/"])
            .output()
            .unwrap();
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        if body.contains("colo guest") {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "no HTTP answer from the guest through the tap"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(body.contains("same on every boot"));
    let out = ns
        .command("bash")
        .args([
            "-c",
            "exec 3<>/dev/tcp/10.0.3.15/7; printf colo-echo-test >&3; timeout 20 head -c 14 <&3",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "colo-echo-test");

    let mut q = qmp(&qmp_path);
    let net = q.execute("query-net", json!({})).unwrap();
    assert_eq!(net["netdev"]["type"], "tap");
    assert!(net["device"]["from_guest"].as_u64().unwrap() > 5, "{net}");
    drop(q);
    drop(guest);
    be.terminate(Duration::from_secs(10));
    let ran = std::fs::read_to_string(&mark).unwrap_or_default();
    assert_eq!(
        ran.trim(),
        tap,
        "downscript= ran with the interface name on SIGTERM"
    );
}

/// A guest's TCP segment as the stand-in comparer sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seg {
    ports: (u16, u16),
    syn: bool,
    fin: bool,
    seq: u32,
    len: u32,
}

fn tcp_seg(f: &[u8]) -> Option<Seg> {
    let p = parse_ethernet(f);
    let t = p.tcp()?;
    Some(Seg {
        ports: (t.src_port, t.dst_port),
        syn: t.flags.syn(),
        fin: t.flags.fin(),
        seq: t.seq,
        len: t.payload.len() as u32,
    })
}

fn tcp_payload(f: &[u8]) -> Vec<u8> {
    parse_ethernet(f)
        .tcp()
        .map(|t| t.payload.to_vec())
        .unwrap_or_default()
}

/// Whether the secondary's (rewritten) output already covers primary segment `p`: a SYN for a
/// SYN; for data and FIN, secondary data of the same connection starting at or before `p` and
/// reaching at least as far in the (primary's) sequence space, and a FIN at the same place for
/// a FIN. Segmentation may differ between the guests.
fn covered(p: &Seg, secondary: &[Seg]) -> bool {
    let same: Vec<&Seg> = secondary.iter().filter(|s| s.ports == p.ports).collect();
    if p.syn {
        return same.iter().any(|s| s.syn);
    }
    let end = p.seq.wrapping_add(p.len);
    let data_ok = p.len == 0
        || same.iter().any(|s| {
            !s.syn
                && s.seq.wrapping_sub(p.seq) as i32 <= 0
                && s.seq.wrapping_add(s.len).wrapping_sub(end) as i32 >= 0
        })
        // or pieces that together reach the end from the start
        || {
            let mut reach = p.seq;
            let mut progressed = true;
            while progressed && (reach.wrapping_sub(end) as i32) < 0 {
                progressed = false;
                for s in &same {
                    let s_end = s.seq.wrapping_add(s.len);
                    if !s.syn && s.seq.wrapping_sub(reach) as i32 <= 0 && s_end.wrapping_sub(reach) as i32 > 0 {
                        reach = s_end;
                        progressed = true;
                    }
                }
            }
            reach.wrapping_sub(end) as i32 >= 0
        };
    let fin_ok = !p.fin
        || same
            .iter()
            .any(|s| s.fin && s.seq.wrapping_add(s.len) == end);
    data_ok && fin_ok
}

/// A stand-in for colo-compare on the primary: each TCP segment of the primary guest that
/// carries data, SYN or FIN is released (written to redire0's indev) only once the secondary's
/// rewritten output covers it ([`covered`]), so the client cannot run ahead of the secondary,
/// as under COLO. Returns the number of primary
/// segments that found no twin within `wait`.
fn stand_in_compare(
    primary_out: u16,
    secondary_out: u16,
    release: u16,
    wait: Duration,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(usize, usize)> {
    std::thread::spawn(move || {
        let (p_frames, _ph) = mirror_reader(primary_out);
        let (s_frames, _sh) = mirror_reader(secondary_out);
        let mut out = TcpStream::connect(("127.0.0.1", release)).unwrap();
        let mut next = 0;
        let (mut matched, mut unmatched) = (0, 0);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let frame = p_frames.lock().unwrap().get(next).cloned();
            let Some(frame) = frame else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            next += 1;
            if let Some(seg) = tcp_seg(&frame).filter(|g| g.syn || g.fin || g.len > 0) {
                let deadline = Instant::now() + wait;
                loop {
                    let sec: Vec<Seg> = s_frames
                        .lock()
                        .unwrap()
                        .iter()
                        .filter_map(|f| tcp_seg(f))
                        .collect();
                    if covered(&seg, &sec) {
                        matched += 1;
                        break;
                    }
                    if Instant::now() > deadline {
                        eprintln!("stand-in compare: no secondary twin for {seg:?}");
                        unmatched += 1;
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            colo_proto::frame::write_frame(
                &mut out,
                &colo_proto::frame::Frame::ethernet(frame),
                false,
            )
            .unwrap();
        }
        (matched, unmatched)
    })
}

#[test]
fn rewriter_puts_the_secondarys_segments_into_the_primarys_sequence_space() {
    // Two independently booted guests stand in for a COLO pair here, and they are not in
    // lockstep: when the secondary's ARP entry for the gateway expires, its ARP request goes to
    // the stand-in comparer (as COLO's redirector sends it) and no reply comes back, so its echo
    // stalls. That is an artefact of this test's design, not of the rewriter; it was seen in 2
    // of about 8 runs on a loaded host. One retry, said loudly; a second failure fails. A
    // checkpoint reported by the comparer is never retried: that is what the test is about.
    if let Err(e) = std::panic::catch_unwind(rewriter_scenario) {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        if msg.contains(NO_RETRY) {
            std::panic::resume_unwind(e);
        }
        eprintln!(
            "RETRY: rewriter_puts_the_secondarys_segments_into_the_primarys_sequence_space failed \
             once (known hazard: the two unsynchronised guests' ARP); running it again"
        );
        rewriter_scenario();
    }
}

/// Marks a failure of the rewriter test that its retry must not hide.
const NO_RETRY: &str = "not retried";

fn rewriter_scenario() {
    let img = require!(colo_tests::guest_image());
    let dir = TestDir::new().unwrap();
    let port = || free_tcp_port().unwrap();
    let (echo, mport, pout, sout, rel) = (port(), port(), port(), port(), port());
    let raw = dir.join("secondary-raw.pcap");
    let pdump = dir.join("primary.pcap");
    let sdump = dir.join("secondary.pcap");
    // Primary: the seed's m0, redire0, redire1 on a user netdev.
    let pargs: Vec<String> = vec![
        "--netdev".into(),
        format!("user,id=hn0,hostfwd=tcp:127.0.0.1:{echo}-:7"),
        "--chardev".into(),
        format!("socket,id=mirror0,host=127.0.0.1,port={mport},server=on,wait=off"),
        "--chardev".into(),
        format!("socket,id=compare0,host=127.0.0.1,port={pout},server=on,wait=off"),
        "--chardev".into(),
        format!("socket,id=compare_out,host=127.0.0.1,port={rel},server=on,wait=off"),
        "--object".into(),
        "filter-mirror,id=m0,netdev=hn0,queue=tx,outdev=mirror0".into(),
        "--object".into(),
        "filter-redirector,id=redire0,netdev=hn0,queue=rx,indev=compare_out".into(),
        "--object".into(),
        "filter-redirector,id=redire1,netdev=hn0,queue=rx,outdev=compare0".into(),
    ];
    // Secondary: the seed's f1, f2, rew0, a dump of the guest's raw output and one of its
    // rewritten output (rx walks tail to head: raw, rew0, sd, f2).
    let sargs: Vec<String> = vec![
        "--netdev".into(),
        "user,id=hn0".into(),
        "--chardev".into(),
        format!("socket,id=red0,host=127.0.0.1,port={mport},reconnect=1"),
        "--chardev".into(),
        format!("socket,id=red1,host=127.0.0.1,port={sout},server=on,wait=off"),
        "--object".into(),
        "filter-redirector,id=f1,netdev=hn0,queue=tx,indev=red0".into(),
        "--object".into(),
        "filter-redirector,id=f2,netdev=hn0,queue=rx,outdev=red1".into(),
        "--object".into(),
        "filter-rewriter,id=rew0,netdev=hn0,queue=all".into(),
        "--object".into(),
        format!(
            "filter-dump,id=raw,netdev=hn0,queue=rx,file={}",
            raw.display()
        ),
    ];
    let (_p, psock, pq) = backend(&dir, "primary", &pargs, None);
    let (_s, ssock, sq) = backend(&dir, "secondary", &sargs, None);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cmp = stand_in_compare(pout, sout, rel, Duration::from_secs(30), stop.clone());
    let (mut pg, pserial) = boot_guest(&dir, "pguest", &img, &psock, "");
    let (mut sg, sserial) = boot_guest(&dir, "sguest", &img, &ssock, "");
    wait_ready(&pserial, &mut pg);
    wait_ready(&sserial, &mut sg);
    // Dumps for the real comparer, added once both guests are up: two independent boots
    // differ in what they send while booting (IPv6 DAD nonces), which under COLO cannot happen
    // (the secondary starts as a copy of the primary). On the primary, pd at the tail sees the
    // guest's output first (rx walks tail to head), before redire1 takes it to the comparer; on
    // the secondary, sd right behind f2 sees the output after rew0 rewrote it (raw, rew0, sd,
    // f2).
    qmp(&pq)
        .execute(
            "object-add",
            json!({"qom-type":"filter-dump","id":"pd","netdev":"hn0","queue":"rx",
                   "file": pdump.display().to_string()}),
        )
        .unwrap();
    qmp(&sq)
        .execute(
            "object-add",
            json!({"qom-type":"filter-dump","id":"sd","netdev":"hn0","queue":"rx",
                   "file": sdump.display().to_string(), "position":"id=f2","insert":"behind"}),
        )
        .unwrap();

    // Echo only: busybox httpd's `Date:` header makes two guests' HTTP answers differ whenever
    // their replies straddle a second, which a real comparer rightly reports.
    for i in 0..3 {
        let line = format!("colo rewriter line {i}\n").repeat(40);
        let got = echo_lines(&format!("127.0.0.1:{echo}"), line.as_bytes());
        assert_eq!(got, line.as_bytes(), "echo through the primary");
    }
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (matched, unmatched) = cmp.join().unwrap();
    // Every data/SYN/FIN segment of the primary had a twin from the secondary after rewriting:
    // 3 connections × (SYN+ACK, response data, FIN) at least.
    assert!(matched >= 9, "matched {matched}");
    assert_eq!(unmatched, 0, "primary segments without a rewritten twin");
    // Before the rewriter, the secondary's data segments were in its own sequence space.
    let raw_data: Vec<Seg> = read_pcap(&raw)
        .iter()
        .filter_map(|f| tcp_seg(f))
        .filter(|s| s.len > 0)
        .collect();
    assert!(!raw_data.is_empty(), "the secondary answered");

    // The real comparer on the two dumps: the rewritten secondary output lines up with the
    // primary's, so nothing diverges and every primary frame is released.
    // IPv6 autoconfiguration (MLD reports, router solicitations) still runs for a few seconds
    // after READY, on each guest's own timer; two independent boots send different numbers of
    // those, so the comparison covers IPv4 and ARP only.
    let (pdump4, sdump4) = (dir.join("primary-v4.pcap"), dir.join("secondary-v4.pcap"));
    without_ipv6(&pdump, &pdump4);
    without_ipv6(&sdump, &sdump4);
    let (pdump, sdump) = (pdump4, sdump4);
    let events = dir.join("replay.jsonl");
    let out = Command::new(cargo_bin("comparer").unwrap())
        .arg("replay")
        .arg("--primary")
        .arg(&pdump)
        .arg("--secondary")
        .arg(&sdump)
        .arg("--events")
        .arg(&events)
        // Two TCG guests on a loaded host: the secondary may trail by seconds (the stand-in
        // above waited up to 30 s too).
        .args(["--compare_timeout", "30000"])
        .output()
        .unwrap();
    let summary = String::from_utf8_lossy(&out.stdout);
    eprintln!("{summary}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "comparer replay failed");
    let primary_frames = read_pcap(&pdump).len();
    let (mut released, mut checkpoints) = (std::collections::BTreeSet::new(), Vec::new());
    for l in std::fs::read_to_string(&events).unwrap().lines() {
        let ev: serde_json::Value = serde_json::from_str(l).unwrap();
        match ev["decision"].as_str().unwrap() {
            "release" => {
                released.insert(ev["index"].as_u64().unwrap());
            }
            "checkpoint" => checkpoints.push(ev),
            _ => {}
        }
    }
    assert!(
        primary_frames >= 9,
        "primary dump holds {primary_frames} frames"
    );
    assert_eq!(
        released.len(),
        primary_frames,
        "every primary frame released once"
    );
    // No checkpoint at all: the rewritten secondary output lines up with the primary's. The
    // two independently booted guests retransmit differently (an extra SYN-ACK or FIN on one
    // side); the comparer releases the primary's and drops the secondary's retransmissions of
    // what was already compared (since comparer 2dd4af5 also a secondary SYN-ACK retransmitted
    // with its own ISN after the rewriter put the rest into the primary's space), as QEMU drops
    // secondary segments without payload.
    assert!(
        checkpoints.is_empty(),
        "{NO_RETRY}: comparer replay reported checkpoints: {checkpoints:?}"
    );
    // The dumps are also compared directly: every payload byte and every FIN of the primary's
    // TCP segments is found at the same sequence number, with the same ports, in the
    // rewritten secondary's segments (however the two guests segmented: one may send data and
    // FIN together, the other apart).
    let sec: Vec<(Seg, Vec<u8>)> = read_pcap(&sdump)
        .into_iter()
        .filter_map(|f| tcp_seg(&f).map(|g| (g, tcp_payload(&f))))
        .collect();
    let byte_at = |ports: (u16, u16), seq: u32| {
        sec.iter().find_map(|(s, spl)| {
            let off = seq.wrapping_sub(s.seq) as usize;
            (s.ports == ports && !s.syn && off < spl.len()).then(|| spl[off])
        })
    };
    let fin_at = |ports: (u16, u16), seq: u32| {
        sec.iter().any(|(s, spl)| {
            s.ports == ports && s.fin && s.seq.wrapping_add(spl.len() as u32) == seq
        })
    };
    let mut checked = 0;
    for f in read_pcap(&pdump) {
        let Some(g) = tcp_seg(&f).filter(|g| !g.syn && (g.len > 0 || g.fin)) else {
            continue;
        };
        let pl = tcp_payload(&f);
        for (i, b) in pl.iter().enumerate() {
            assert_eq!(
                byte_at(g.ports, g.seq.wrapping_add(i as u32)),
                Some(*b),
                "payload byte {i} of {g:?} has no rewritten secondary twin in sequence space"
            );
        }
        if g.fin {
            assert!(
                fin_at(g.ports, g.seq.wrapping_add(pl.len() as u32)),
                "the FIN of {g:?} has no rewritten secondary twin in sequence space"
            );
        }
        checked += 1;
    }
    assert!(checked >= 6, "checked {checked} data/FIN segments");

    let mut q = qmp(&sq);
    let f = q.execute("query-filters", json!({})).unwrap();
    let rew = f
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == "rew0")
        .unwrap();
    assert!(rew["counters"]["rewritten"].as_u64().unwrap() >= 9, "{f}");
    q.execute("colo-net-checkpoint", json!({})).unwrap();
    q.execute("colo-net-failover", json!({})).unwrap();
    let f = q.execute("query-filters", json!({})).unwrap();
    for x in f.as_array().unwrap() {
        let want = if x["id"] == "rew0" { "on" } else { "off" };
        assert_eq!(x["status"], want, "after failover: {x}");
    }
}

/// Streams through the guest's echo service from inside the namespace while the backend is
/// killed (SIGKILL) and started again on the same socket: QEMU reconnects (`reconnect=1`), the
/// new backend resumes the rings it is given, the tap comes back on the bridge through
/// `script=`, and the stream completes intact.
#[test]
fn stream_survives_a_backend_restart() {
    let img = require!(colo_tests::guest_image());
    if !require_root() {
        return;
    }
    require!(colo_tests::host::netns());
    require!(colo_tests::host::tun());
    require!(colo_tests::host::tool("python3"));
    let dir = TestDir::new().unwrap();
    let ns = NetNs::new("vnr").unwrap();
    let br = Bridge::new("vnrbr", Some(&ns)).unwrap();
    br.add_addr("10.0.4.1/24").unwrap();
    let tap = unique_name("vnrt");
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
    let args: Vec<String> = vec![
        "--netdev".into(),
        format!("tap,id=hn0,ifname={tap},script={}", up.display()),
    ];
    let (mut be, sock, _q) = backend(&dir, "backend", &args, Some(&ns));
    let serial = dir.join("guest.serial.log");
    let mut guest = ChildGuard::spawn(
        "guest",
        qemu_tcg_guest(
            &img,
            "colo.services=echo colo.ip=10.0.4.15/24 colo.gw=10.0.4.1",
        )
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-chardev")
        .arg(format!("socket,id=c1,path={},reconnect=1", sock.display()))
        .args(["-netdev", "vhost-user,id=n1,chardev=c1"])
        .args([
            "-device",
            "virtio-net-device,netdev=n1,mac=52:54:00:12:34:56",
        ]),
        dir.path(),
    )
    .unwrap();
    wait_ready(&serial, &mut guest);
    let client = dir.join("client.py");
    std::fs::write(
        &client,
        r#"
import socket, sys, threading, time
total = 3 * 1024 * 1024
data = bytes(range(251)) * (total // 251 + 1)
data = data[:total]
s = socket.create_connection(("10.0.4.15", 7), timeout=120)
got = bytearray()
def rd():
    while len(got) < total:
        b = s.recv(65536)
        if not b:
            break
        got.extend(b)
t = threading.Thread(target=rd); t.start()
for i in range(0, total, 8192):
    s.sendall(data[i:i + 8192])
    if i == 64 * 8192:
        print("STREAMING", flush=True)
    time.sleep(0.004)
t.join(180)
print("OK" if bytes(got) == data else "BAD %d of %d" % (len(got), total))
"#,
    )
    .unwrap();
    // Wait for the echo service, then stream in the background.
    let deadline = secs(60);
    loop {
        let out = ns
            .command("bash")
            .args([
                "-c",
                "exec 3<>/dev/tcp/10.0.4.15/7; printf x >&3; timeout 10 head -c 1 <&3",
            ])
            .output()
            .unwrap();
        if out.stdout == b"x" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "echo never answered through the tap"
        );
    }
    let mut cl =
        ChildGuard::spawn("client", ns.command("python3").arg(&client), dir.path()).unwrap();
    cl.wait_for_output("STREAMING", secs(120)).unwrap();
    be.kill();
    drop(be);
    std::thread::sleep(Duration::from_millis(500));
    let (_be2, _s2, q2) = backend(&dir, "backend", &args, Some(&ns));
    let status = cl.wait_until(secs(240)).unwrap();
    assert!(status.success(), "client: {}", cl.stderr_text());
    let out = cl.stdout_text();
    assert_eq!(
        out.lines().last(),
        Some("OK"),
        "stream after the restart: {out}"
    );
    // The new backend carried the rest of the stream.
    let net = qmp(&q2).execute("query-net", json!({})).unwrap();
    assert!(net["device"]["from_guest"].as_u64().unwrap() > 100, "{net}");
    assert!(net["device"]["to_guest"].as_u64().unwrap() > 100, "{net}");
}
