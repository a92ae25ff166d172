//! The test guest of `scripts/build-guest.sh` boots under QEMU TCG (`-M microvm`, virtio-MMIO
//! found through ACPI) and its services answer: HTTP (exact page, uptime CGI), echo, the disk
//! journal (appends, concurrent appends, query), random and the memory dirtier. After QEMU stops,
//! the journal records are read back from the raw image file and compared byte for byte. A second
//! boot on the same image continues the journal numbering and takes its address, netmask and
//! hostname from the kernel's `ip=` option (parsed by /init).
//!
//! The guest is built by the script when missing (it is idempotent). This test does not skip:
//! without QEMU or the guest it fails with the reason, because CI must run it. Set
//! `COLO_SKIP_TCG=1` to skip it loudly on a machine that cannot run TCG guests.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use colo_tests::guest::{READY_MARKER, ensure_guest_image, tcg_append};
use colo_tests::{ChildGuard, MarkerScan, TestDir, free_tcp_port, workspace_root};

const QEMU: &str = "qemu-system-x86_64";
/// TCG on a loaded 2-core host: a boot takes 15-50 s; allow a generous margin.
const BOOT_DEADLINE: Duration = Duration::from_secs(240);
const IO_TIMEOUT: Duration = Duration::from_secs(60);
const SLOT: usize = 512;

/// QEMU running the guest, killed by PID when dropped (also on panic).
struct Guest {
    qemu: ChildGuard,
    serial: PathBuf,
    http: u16,
    echo: u16,
    journal: u16,
    dirty: u16,
    random: u16,
}

impl Guest {
    /// Boots with `extra` on the kernel command line; `guest_ip` is where the port forwards go.
    fn boot(dir: &TestDir, name: &str, disk: &Path, guest_ip: &str, extra: &str) -> Guest {
        let img = ensure_guest_image().unwrap();
        let port = || free_tcp_port().unwrap();
        let (http, echo, journal, dirty, random) = (port(), port(), port(), port(), port());
        let fwd = format!(
            "user,id=n0,hostfwd=tcp:127.0.0.1:{http}-{guest_ip}:80,\
             hostfwd=tcp:127.0.0.1:{echo}-{guest_ip}:7,\
             hostfwd=tcp:127.0.0.1:{journal}-{guest_ip}:5000,\
             hostfwd=tcp:127.0.0.1:{dirty}-{guest_ip}:5001,\
             hostfwd=tcp:127.0.0.1:{random}-{guest_ip}:5002"
        );
        let serial = dir.join(format!("{name}.serial.log"));
        let mut cmd = Command::new(QEMU);
        cmd.args(["-M", "microvm", "-accel", "tcg", "-m", "256", "-nodefaults"])
            .args(["-no-user-config", "-display", "none"])
            .arg("-kernel")
            .arg(&img.kernel)
            .arg("-initrd")
            .arg(&img.initrd)
            .arg("-append")
            .arg(tcg_append(extra))
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .args(["-global", "virtio-mmio.force-legacy=false"])
            .args(["-netdev", &fwd, "-device", "virtio-net-device,netdev=n0"])
            .arg("-drive")
            .arg(format!(
                "if=none,id=d0,file={},format=raw,cache=none,aio=threads",
                disk.display()
            ))
            .args(["-device", "virtio-blk-device,drive=d0"]);
        let qemu = ChildGuard::spawn(name, &mut cmd, dir.path())
            .unwrap_or_else(|e| panic!("{e:#} (install qemu-system-x86)"));
        Guest {
            qemu,
            serial,
            http,
            echo,
            journal,
            dirty,
            random,
        }
    }

    fn serial_log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.serial).unwrap_or_default()).into_owned()
    }

    /// Waits for the READY marker on the serial console; returns the wall time it took.
    fn wait_ready(&mut self, started: Instant) -> Duration {
        let mut scan = MarkerScan::new(&self.serial, READY_MARKER);
        loop {
            if scan.found().unwrap() {
                return started.elapsed();
            }
            if let Err(e) = self.qemu.ensure_running() {
                panic!("{e:#}\nserial:\n{}", self.serial_log());
            }
            assert!(
                started.elapsed() < BOOT_DEADLINE,
                "no {READY_MARKER} within {BOOT_DEADLINE:?}; serial:\n{}",
                self.serial_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops QEMU with SIGTERM (a clean exit: QEMU flushes the disk) and waits for it.
    fn stop(mut self) {
        let st = self.qemu.terminate(Duration::from_secs(20));
        assert!(st.is_some(), "QEMU not reaped");
    }
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

/// Sends `request` (lines), closes the write side and returns everything the service answered.
fn exchange(port: u16, request: &str) -> String {
    let mut s = connect(port);
    s.write_all(request.as_bytes()).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// A line-by-line client: one request, one reply line.
struct LineClient {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl LineClient {
    fn new(port: u16) -> LineClient {
        let w = connect(port);
        let r = BufReader::new(w.try_clone().unwrap());
        LineClient { w, r }
    }
    fn ask(&mut self, line: &str) -> String {
        self.w.write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut reply = String::new();
        self.r.read_line(&mut reply).unwrap();
        assert!(
            reply.ends_with('\n'),
            "truncated reply to {line:?}: {reply:?}"
        );
        reply.trim_end().to_string()
    }
}

/// HTTP/1.0 GET; returns (status line, body).
fn http_get(port: u16, path: &str) -> (String, Vec<u8>) {
    let mut s = connect(port);
    write!(s, "GET {path} HTTP/1.0\r\nHost: guest\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP header end in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head.lines().next().unwrap_or_default().to_string();
    (status, raw[split + 4..].to_vec())
}

/// The exact 512-byte slot the guest writes for record `seq` with `text`.
fn expected_slot(seq: usize, text: &str) -> Vec<u8> {
    let mut slot = format!("COLOJRNL {seq:08} {:03}\n{text}\n", text.len()).into_bytes();
    slot.resize(SLOT, 0);
    slot
}

/// Checks the image holds exactly `records` (seq 1..) and nothing after them.
fn assert_image(disk: &Path, records: &[String]) {
    let img = std::fs::read(disk).unwrap();
    assert!(
        img[..SLOT].iter().all(|&b| b == 0),
        "slot 0 must stay untouched"
    );
    for (i, text) in records.iter().enumerate() {
        let seq = i + 1;
        let got = &img[seq * SLOT..(seq + 1) * SLOT];
        assert_eq!(
            got,
            expected_slot(seq, text).as_slice(),
            "slot {seq} on the image: {:?}",
            String::from_utf8_lossy(got)
        );
    }
    let after = (records.len() + 1) * SLOT;
    assert!(
        img[after..after + SLOT].iter().all(|&b| b == 0),
        "the slot after the last record must be empty"
    );
}

fn expected_query(records: &[String]) -> String {
    let mut q = String::new();
    for (i, text) in records.iter().enumerate() {
        q.push_str(&format!("REC {} {text}\n", i + 1));
    }
    q.push_str(&format!("END {}\n", records.len()));
    q
}

#[test]
fn guest_boots_under_tcg_and_serves_http_echo_journal() {
    if std::env::var_os("COLO_SKIP_TCG").is_some() {
        eprintln!("SKIPPED: COLO_SKIP_TCG is set (guest boot under QEMU TCG not run)");
        return;
    }
    let t = Instant::now();
    ensure_guest_image().unwrap();
    eprintln!("guest_boot: build-guest.sh took {:?}", t.elapsed());
    let tmp = TestDir::new().unwrap();
    let disk = tmp.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();

    // ---- first boot ----
    let started = Instant::now();
    let mut g = Guest::boot(&tmp, "qemu1", &disk, "10.0.2.15", "");
    let ready = g.wait_ready(started);
    eprintln!("guest_boot: first boot to {READY_MARKER}: {ready:?} wall");
    let serial = g.serial_log();
    assert!(
        serial.contains("colo-guest: ["),
        "init output missing:\n{serial}"
    );
    assert!(
        serial.contains("journal on /dev/vda, next seq 1"),
        "{serial}"
    );

    // HTTP: the exact deterministic page, and the uptime CGI.
    let (status, body) = http_get(g.http, "/");
    assert!(status.contains(" 200 "), "GET /: {status}");
    let page = std::fs::read(workspace_root().join("scripts/guest/www/index.html")).unwrap();
    assert_eq!(body, page, "GET / body");
    let (status, body) = http_get(g.http, "/cgi-bin/uptime");
    assert!(status.contains(" 200 "), "GET /cgi-bin/uptime: {status}");
    let up: f64 = String::from_utf8(body).unwrap().trim().parse().unwrap();
    assert!(up > 0.5 && up < 3600.0, "guest uptime {up}");

    // Echo: every byte back, including binary ones.
    let mut payload = b"hello colo\n".to_vec();
    payload.extend((0u8..=255).cycle().take(3000));
    let mut s = connect(g.echo);
    s.write_all(&payload).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    assert_eq!(back, payload, "echo");

    // Journal: sequential appends, then two concurrent clients, then QUERY.
    let mut records: Vec<String> = Vec::new();
    let mut j = LineClient::new(g.journal);
    assert_eq!(j.ask("PING"), "PONG");
    assert_eq!(j.ask("APPEND first record"), "OK 1");
    records.push("first record".into());
    assert_eq!(j.ask("second record, no keyword"), "OK 2");
    records.push("second record, no keyword".into());
    assert!(j.ask("APPEND ").starts_with("ERR"), "empty record");
    assert!(
        j.ask(&format!("APPEND {}", "x".repeat(490)))
            .starts_with("ERR"),
        "too long record"
    );
    let long = "y".repeat(489);
    assert_eq!(j.ask(&format!("APPEND {long}")), "OK 3");
    records.push(long);
    let port = g.journal;
    let workers: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|who| {
            std::thread::spawn(move || {
                let mut c = LineClient::new(port);
                (0..4)
                    .map(|i| {
                        let text = format!("concurrent {who} {i}");
                        let reply = c.ask(&format!("APPEND {text}"));
                        let seq: usize = reply
                            .strip_prefix("OK ")
                            .unwrap_or_else(|| panic!("{text}: {reply}"))
                            .parse()
                            .unwrap();
                        (seq, text)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut concurrent: Vec<(usize, String)> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    concurrent.sort();
    let seqs: BTreeSet<usize> = concurrent.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        seqs,
        (4..=11).collect(),
        "concurrent appends got {concurrent:?}"
    );
    records.extend(concurrent.into_iter().map(|(_, t)| t));
    assert_eq!(exchange(g.journal, "QUERY\n"), expected_query(&records));

    // Random: hex of the asked length, different each time; raw bytes of the asked length.
    let r = exchange(g.random, "HEX 16\nHEX 16\n");
    let lines: Vec<&str> = r.lines().collect();
    assert_eq!(lines.len(), 2, "{r:?}");
    for l in &lines {
        assert!(
            l.len() == 32 && l.bytes().all(|b| b.is_ascii_hexdigit()),
            "{l:?}"
        );
    }
    assert_ne!(lines[0], lines[1], "random answers repeat");
    let mut s = connect(g.random);
    s.write_all(b"1000\n").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    assert_eq!(raw.len(), 1000);

    // Memory dirtier: runs, counts pages, stops.
    let mut d = LineClient::new(g.dirty);
    assert_eq!(d.ask("DIRTY 64 256"), "OK DIRTY 64 256");
    assert!(d.ask("DIRTY x 1").starts_with("ERR"));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = d.ask("STATUS");
        let f: Vec<&str> = st.split(' ').collect();
        assert_eq!(&f[..4], ["STATUS", "running", "64", "256"], "{st}");
        if f[4].parse::<u64>().unwrap() >= 128 {
            break;
        }
        assert!(Instant::now() < deadline, "dirtier made no progress: {st}");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(d.ask("STOP"), "OK STOP");
    assert!(d.ask("STATUS").starts_with("STATUS stopped 0 0 "));

    g.stop();
    assert_image(&disk, &records);

    // ---- second boot on the same disk: numbering continues; address from the kernel's ip= ----
    let started = Instant::now();
    let ip = "ip=10.0.2.16::10.0.2.2:255.255.255.0:colo2:eth0";
    let mut g = Guest::boot(&tmp, "qemu2", &disk, "10.0.2.16", ip);
    let ready = g.wait_ready(started);
    eprintln!("guest_boot: second boot to {READY_MARKER}: {ready:?} wall");
    let next = records.len() + 1;
    assert!(
        g.serial_log()
            .contains(&format!("journal on /dev/vda, next seq {next}")),
        "{}",
        g.serial_log()
    );
    assert!(
        g.serial_log().contains("net eth0 10.0.2.16/24 gw 10.0.2.2"),
        "{}",
        g.serial_log()
    );
    let (_, body) = http_get(g.http, "/cgi-bin/hostname");
    assert_eq!(body, b"colo2\n", "hostname from ip=");
    let mut j = LineClient::new(g.journal);
    assert_eq!(j.ask("APPEND after reboot"), format!("OK {next}"));
    records.push("after reboot".into());
    assert_eq!(exchange(g.journal, "QUERY\n"), expected_query(&records));
    g.stop();
    assert_image(&disk, &records);
}
