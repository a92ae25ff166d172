//! Live migration and snapshot/restore of the stock guest between two vmm-min processes, in the
//! KVM lab (one lab boot for everything, to keep CI time down).
//!
//! Topology (inside L1): a network namespace with a bridge (10.0.5.1/24); the source's and the
//! destination's `vhost-net-colo` each run in that namespace with a `tap` netdev whose up-script
//! puts the tap on the bridge; the clients of the test run in the namespace too. Each side has
//! its own `vhost-blk-colo` on the same raw image (shared storage).
//!
//! Checks, in order:
//! 1. source boots; an echo connection is opened and used, the uptime read, journal records
//!    appended; a client thread appends journal records in a loop on its own connection;
//! 2. `migrate` to `vmm-min --incoming`: `query-migrate` completed with figures, source
//!    `postmigrate`, destination running; a RARP announcement from the guest's MAC reaches the
//!    bridge (sent by vmm-min through VHOST_USER_SEND_RARP; if none comes within 5 s the test
//!    uses vhost-net-colo's QMP `announce-self` so the remaining checks still run, and FAILS at
//!    the end saying so: the RARP path is part of the contract);
//! 3. after it: the echo connection opened before works on the same socket, HTTP answers, the
//!    uptime continues (grew, by no more than the wall time), the loop client's records go on;
//! 4. snapshot of the destination (`snapshot-save-file`, paused), vmm-min SIGKILLed by PID,
//!    `vmm-min --restore` on the same backends: no reboot, the uptime continues from the
//!    snapshot, HTTP, echo and journal answer;
//! 5. every acknowledged record (before, during and after the migration, and after the
//!    restore) is in the image at its slot.

#![allow(clippy::unwrap_used)] // test code

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use colo_tests::process::ChildGuard;
use colo_tests::vmm::{
    connect_in, http_body, http_get_in, is_command_not_found, rarp_socket, vmm_feature,
    wait_migration, wait_rarp,
};
use colo_tests::{Bridge, NetNs, TestDir, cargo_bin, guest_image, lab, secs};
use serde_json::{Value, json};

const TEST: &str = "vmm_lab_live_migration_and_snapshot_restore_keep_the_guest_and_its_services";
const MAC: &str = "52:54:00:12:34:56";
const MAC_BYTES: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const GUEST_IP: [u8; 4] = [10, 0, 5, 15];
const MEM: &str = "256M";

fn guest(port: u16) -> SocketAddr {
    SocketAddr::from((GUEST_IP, port))
}

#[derive(Debug, Clone)]
struct Acked {
    text: String,
    seq: u64,
    sent: Instant,
    acked: Instant,
}

/// One line-based connection to the guest's journal (port 5000).
struct Journal {
    s: TcpStream,
    r: BufReader<TcpStream>,
}

impl Journal {
    fn open(ns: &str, deadline: Instant) -> Journal {
        let s = connect_in(Some(ns), guest(5000), deadline).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let r = BufReader::new(s.try_clone().unwrap());
        Journal { s, r }
    }

    fn request(&mut self, line: &str) -> std::io::Result<String> {
        self.s.write_all(format!("{line}\n").as_bytes())?;
        let mut out = String::new();
        if self.r.read_line(&mut out)? == 0 {
            return Err(std::io::Error::other("connection closed"));
        }
        Ok(out.trim_end().to_string())
    }

    fn append(&mut self, text: &str) -> Acked {
        let sent = Instant::now();
        let l = self.request(&format!("APPEND {text}")).unwrap();
        let seq = l
            .strip_prefix("OK ")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("APPEND {text}: {l:?}"));
        Acked {
            text: text.into(),
            seq,
            sent,
            acked: Instant::now(),
        }
    }
}

/// Appends `loop-<n>` records until `stop`, reconnecting after errors; only `OK <seq>` counts.
fn loop_client(
    ns: String,
    acked: Arc<Mutex<Vec<Acked>>>,
    errors: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
) {
    let mut n = 0u64;
    let mut conn: Option<Journal> = None;
    while !stop.load(Ordering::SeqCst) {
        if conn.is_none() {
            match connect_in(Some(&ns), guest(5000), secs(5)) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                    let r = BufReader::new(s.try_clone().unwrap());
                    conn = Some(Journal { s, r });
                }
                Err(e) => {
                    errors.lock().unwrap().push(format!("connect: {e:#}"));
                    continue;
                }
            }
        }
        let Some(j) = conn.as_mut() else { continue };
        n += 1;
        let text = format!("loop-{n}");
        let sent = Instant::now();
        match j.request(&format!("APPEND {text}")) {
            Ok(l) => match l.strip_prefix("OK ").and_then(|v| v.parse().ok()) {
                Some(seq) => acked.lock().unwrap().push(Acked {
                    text,
                    seq,
                    sent,
                    acked: Instant::now(),
                }),
                None => errors.lock().unwrap().push(format!("{text}: {l:?}")),
            },
            Err(e) => {
                errors.lock().unwrap().push(format!("{text}: {e}"));
                conn = None;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `n` loop records sent after `after` are acknowledged; `Err` with the count.
fn wait_count(
    acked: &Mutex<Vec<Acked>>,
    after: Instant,
    n: usize,
    deadline: Instant,
    what: &str,
) -> Result<(), String> {
    loop {
        let have = acked
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.sent > after)
            .count();
        if have >= n {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{what}: only {have} of {n} loop records acknowledged"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The guest's uptime from `GET /cgi-bin/uptime`.
fn uptime(ns: &str) -> anyhow::Result<f64> {
    let a = http_get_in(
        Some(ns),
        guest(80),
        "/cgi-bin/uptime",
        Duration::from_secs(30),
    )?;
    let body = http_body(&a).trim();
    body.parse()
        .map_err(|_| anyhow::anyhow!("uptime answer: {a:?}"))
}

fn echo(s: &mut TcpStream, text: &str) {
    s.write_all(text.as_bytes()).unwrap();
    let mut buf = vec![0u8; text.len()];
    s.read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("echo of {text:?}: {e}"));
    assert_eq!(String::from_utf8_lossy(&buf), text);
}

fn http_page(ns: &str) -> String {
    let a = http_get_in(Some(ns), guest(80), "/", Duration::from_secs(30)).unwrap();
    assert!(a.contains("<h1>colo guest</h1>"), "HTTP /: {a}");
    a
}

struct Side {
    _net: ChildGuard,
    net_sock: PathBuf,
    net_qmp: PathBuf,
    _blk: ChildGuard,
    blk_sock: PathBuf,
}

fn side(name: &str, ns: &NetNs, br: &Bridge, img: &Path, dir: &TestDir, logs: &Path) -> Side {
    let net_bin = cargo_bin("vhost-net-colo").unwrap();
    let blk_bin = cargo_bin("vhost-blk-colo").unwrap();
    let tap = colo_tests::unique_name(&format!("t{name}"));
    let up = dir.join(format!("{name}-ifup.sh"));
    std::fs::write(
        &up,
        format!(
            "#!/bin/sh\nip link set \"$1\" up\nip link set \"$1\" master {}\n",
            br.name()
        ),
    )
    .unwrap();
    Command::new("chmod").arg("+x").arg(&up).status().unwrap();
    let net_sock = dir.join(format!("{name}-net.sock"));
    let net_qmp = dir.join(format!("{name}-net.qmp"));
    let mut cmd = ns.command(net_bin.to_str().unwrap());
    cmd.arg("--socket")
        .arg(&net_sock)
        .arg("--netdev")
        .arg(format!("tap,id=hn0,ifname={tap},script={}", up.display()))
        .args(["--mac", MAC])
        .arg("--qmp")
        .arg(format!("unix:{}", net_qmp.display()));
    let net = ChildGuard::spawn(&format!("{name}-vhost-net-colo"), &mut cmd, logs).unwrap();
    colo_tests::wait_for_unix_socket(&net_sock, secs(60)).unwrap();
    let blk_sock = dir.join(format!("{name}-blk.sock"));
    let mut cmd = Command::new(blk_bin);
    cmd.arg("--socket")
        .arg(&blk_sock)
        .arg("--drive")
        .arg(format!(
            "id=d0,driver=raw,file.filename={},file.driver=file",
            img.display()
        ));
    let blk = ChildGuard::spawn(&format!("{name}-vhost-blk-colo"), &mut cmd, logs).unwrap();
    colo_tests::wait_for_unix_socket(&blk_sock, secs(60)).unwrap();
    Side {
        _net: net,
        net_sock,
        net_qmp,
        _blk: blk,
        blk_sock,
    }
}

fn vmm_args(s: &Side, serial: &Path, qmp: &Path) -> Vec<String> {
    vec![
        "--memory".into(),
        MEM.into(),
        "--serial".into(),
        format!("file:{}", serial.display()),
        "--qmp".into(),
        format!("unix:{}", qmp.display()),
        "--net".into(),
        format!("vhost-user,socket={},mac={MAC}", s.net_sock.display()),
        "--disk".into(),
        format!("vhost-user,socket={}", s.blk_sock.display()),
    ]
}

/// Network state for a failure message: links and FDB in the namespace, each backend's counters.
fn diag(ns: &NetNs, br: &Bridge, qmps: &[&Path], img: &Path) -> String {
    let mut out = String::new();
    let recs = disk_records(img);
    out += &format!(
        "journal records on disk: {} (last {:?})\n",
        recs.len(),
        recs.last()
    );
    out += &ns.ip(&["-s", "link"]).unwrap_or_else(|e| format!("{e:#}"));
    out += &colo_tests::net::run(ns.command("bridge").args(["fdb", "show", "br", br.name()]))
        .unwrap_or_else(|e| format!("{e:#}"));
    for q in qmps {
        let v = colo_tests::qmp_connect(q, secs(5))
            .and_then(|mut c| Ok(c.execute("query-net", json!({}))?));
        out += &format!("{}: {v:?}\n", q.display());
    }
    out
}

/// The valid journal records in the image, from slot 1 on (scripts/guest/README.md).
fn disk_records(img: &Path) -> Vec<(u64, String)> {
    let data = std::fs::read(img).unwrap_or_default();
    let mut out = Vec::new();
    for seq in 1u64.. {
        let off = usize::try_from(seq * 512).unwrap_or(usize::MAX);
        let Some(slot) = data.get(off..off.saturating_add(512)) else {
            break;
        };
        let text = String::from_utf8_lossy(slot);
        let head = format!("COLOJRNL {seq:08} ");
        let Some(rest) = text.strip_prefix(&head) else {
            break;
        };
        out.push((seq, rest.split('\n').nth(1).unwrap_or("").to_string()));
    }
    out
}

fn num(v: &Value, ptr: &str) -> f64 {
    v.pointer(ptr)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{ptr} missing in {v}"))
}

#[test]
fn vmm_lab_live_migration_and_snapshot_restore_keep_the_guest_and_its_services() {
    let img_files = match guest_image() {
        Ok(i) => i,
        Err(e) => {
            colo_tests::skipped(&e);
            return;
        }
    };
    // Built on the host side: nothing is built inside the lab.
    let vmm_bin = cargo_bin("vmm-min").unwrap();
    cargo_bin("vhost-net-colo").unwrap();
    cargo_bin("vhost-blk-colo").unwrap();
    let has_migrate = vmm_feature(&vmm_bin, "--incoming") && vmm_feature(&vmm_bin, "--restore");
    let topology_only = std::env::var_os("COLO_MIGRATE_TOPOLOGY_ONLY").is_some();
    if !has_migrate && !topology_only {
        colo_tests::skipped("vmm-min has no migrate yet (no --incoming/--restore in --help)");
        return;
    }
    if lab::needs_real_kvm_within(TEST, Duration::from_secs(1200)) {
        return;
    }
    if !colo_tests::require_root() {
        return;
    }
    let t_test = Instant::now();
    let dir = TestDir::new().unwrap();
    let logs: PathBuf = lab::out_dir().join(format!("vmm-lab-migrate-{}", std::process::id()));
    std::fs::create_dir_all(&logs).unwrap();
    eprintln!("{TEST}: logs in {}", logs.display());

    let ns = NetNs::new("mig").unwrap();
    let br = Bridge::new("migbr", Some(&ns)).unwrap();
    br.add_addr("10.0.5.1/24").unwrap();
    let nsn = ns.name().to_string();
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let a = side("src", &ns, &br, &img, &dir, &logs);
    let b = side("dst", &ns, &br, &img, &dir, &logs);

    // 1. The source.
    let src_serial = logs.join("src.serial");
    let src_qmp = dir.join("src.qmp");
    let mut cmd = Command::new(&vmm_bin);
    cmd.arg("--kernel")
        .arg(&img_files.kernel)
        .arg("--initrd")
        .arg(&img_files.initrd)
        .args([
            "--cmdline",
            "console=ttyS0 quiet pci=noearly colo.ip=10.0.5.15/24 colo.gw=10.0.5.1 colo.services=http,echo,journal,dirty",
        ])
        .args(vmm_args(&a, &src_serial, &src_qmp));
    let mut src = ChildGuard::spawn("src-vmm-min", &mut cmd, &logs).unwrap();
    let t_boot = Instant::now();
    colo_tests::wait_until(secs(300), "COLO-GUEST-READY on the source", || {
        std::fs::read_to_string(&src_serial).is_ok_and(|s| s.contains("COLO-GUEST-READY"))
            || !src.is_running()
    })
    .unwrap();
    src.ensure_running().unwrap();
    eprintln!(
        "{TEST}: source READY after {:.1} s",
        t_boot.elapsed().as_secs_f64()
    );
    let mut sq = colo_tests::qmp_connect(&src_qmp, secs(30)).unwrap();

    let nets = [a.net_qmp.clone(), b.net_qmp.clone()];
    let nets: Vec<&Path> = nets.iter().map(PathBuf::as_path).collect();
    if let Err(err) = connect_in(Some(&nsn), guest(5000), secs(120)) {
        panic!("journal port: {err:#}\n{}", diag(&ns, &br, &nets, &img));
    }
    http_page(&nsn);
    let mut e = connect_in(Some(&nsn), guest(7), secs(120)).unwrap();
    e.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    echo(&mut e, "before the migration\n");
    let up = || {
        uptime(&nsn).unwrap_or_else(|e| panic!("uptime: {e:#}\n{}", diag(&ns, &br, &nets, &img)))
    };
    let u0 = up();
    let t_u0 = Instant::now();
    // The guest's journal listener (busybox `nc -ll -e`, port 5000) sometimes leaves new
    // connections unanswered (SYNs dropped) for 20+ s right after another journal connection,
    // while ports 7 and 80 answer; with or without migration, also with VMM_MIN_VHOST_LOG=0.
    // A guest-side quirk, not the subject here: journal connections get 120 s.
    // One journal connection at a time: with a second, idle journal connection open, the
    // guest's `nc -ll -e` journal listener sometimes stopped accepting (SYNs to port 5000
    // unanswered for 20+ s while ports 7 and 80 answered; seen in 2 of 7 lab runs, before any
    // migration). So the pre/post records use short-lived connections, never overlapping the
    // loop client's.
    let mut j = Journal::open(&nsn, secs(120));
    let mut records: Vec<Acked> = (1..=5).map(|i| j.append(&format!("pre-{i}"))).collect();
    drop(j);

    if !has_migrate {
        eprintln!(
            "{TEST}: topology checked (HTTP, echo, journal through two taps on one bridge); uptime {u0}"
        );
        colo_tests::skipped("vmm-min has no migrate yet (COLO_MIGRATE_TOPOLOGY_ONLY run)");
        return;
    }

    let acked = Arc::new(Mutex::new(Vec::<Acked>::new()));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let cl = {
        let (a2, e2, s2, n2) = (
            Arc::clone(&acked),
            Arc::clone(&errors),
            Arc::clone(&stop),
            nsn.clone(),
        );
        std::thread::spawn(move || loop_client(n2, a2, e2, s2))
    };
    if let Err(m) = wait_count(&acked, t_test, 5, secs(120), "loop before the migration") {
        panic!(
            "{m} (errors {:?})\n{}",
            errors.lock().unwrap(),
            diag(&ns, &br, &nets, &img)
        );
    }

    // 2. The destination and the migration.
    let dst_serial = logs.join("dst.serial");
    let dst_qmp = dir.join("dst.qmp");
    let port = colo_tests::free_tcp_port().unwrap();
    let mut cmd = Command::new(&vmm_bin);
    cmd.args(["--incoming", &format!("tcp:127.0.0.1:{port}")])
        .args(vmm_args(&b, &dst_serial, &dst_qmp));
    let mut dst = ChildGuard::spawn("dst-vmm-min", &mut cmd, &logs).unwrap();
    dst.wait_for_output("waiting for migration on", secs(60))
        .unwrap();
    let mut dq = colo_tests::qmp_connect(&dst_qmp, secs(30)).unwrap();
    let rarp = rarp_socket(&nsn, br.name()).unwrap();
    sq.execute("migrate-set-parameters", json!({"downtime-limit": 300}))
        .unwrap();
    let t_mig = Instant::now();
    sq.execute("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}))
        .unwrap();
    let (done, last_remaining) = wait_migration(&mut sq, secs(240), None).unwrap();
    let t_done = Instant::now();
    assert_eq!(done["status"], "completed", "{done}{}", dst.log_tail(30));
    eprintln!(
        "{TEST}: migration completed after {:.2} s (wall): {done}; last remaining while active: {last_remaining:?}",
        (t_done - t_mig).as_secs_f64()
    );
    assert!(num(&done, "/total-time") > 0.0, "{done}");
    assert!(done.get("downtime").is_some_and(Value::is_number), "{done}");
    assert_eq!(num(&done, "/ram/total") as u64, 256 << 20, "{done}");
    assert!(num(&done, "/ram/transferred") > 1e6, "{done}");
    assert!(num(&done, "/ram/normal") > 100.0, "{done}");
    assert!(num(&done, "/ram/dirty-sync-count") >= 1.0, "{done}");
    let st = sq.execute("query-status", json!({})).unwrap();
    assert_eq!(st["status"], "postmigrate", "{st}");
    let rarp_from_vmm = wait_rarp(&rarp, MAC_BYTES, Duration::from_secs(5)).is_some();
    if !rarp_from_vmm {
        eprintln!(
            "{TEST}: NOTE: no RARP from the guest's MAC within 5 s of the switch-over; using vhost-net-colo announce-self as a stopgap (the test fails at the end)"
        );
        let mut nq = colo_tests::qmp_connect(&b.net_qmp, secs(10)).unwrap();
        match nq.execute("announce-self", json!({})) {
            Ok(_) => {}
            Err(e) if is_command_not_found(&e) => {
                eprintln!("{TEST}: NOTE: vhost-net-colo has no announce-self either")
            }
            Err(e) => panic!("announce-self: {e}"),
        }
    } else {
        eprintln!("{TEST}: RARP from {MAC} seen on the bridge after the switch-over");
    }
    let dst_status = dq.execute("query-status", json!({})).unwrap();
    assert_eq!(dst_status["status"], "running", "{dst_status}");

    // 3. After the migration. Every check is tried and reported, then asserted together, so
    // one lab run shows everything that works and what does not.
    let loop_acks_since = |t: Instant| acked.lock().unwrap().iter().filter(|a| a.sent > t).count();
    let new_echo = connect_in(Some(&nsn), guest(7), secs(120)).and_then(|mut e2| {
        e2.set_read_timeout(Some(Duration::from_secs(30)))?;
        let text = "a new connection to the destination\n";
        e2.write_all(text.as_bytes())?;
        let mut buf = vec![0u8; text.len()];
        e2.read_exact(&mut buf)?;
        anyhow::ensure!(
            buf == text.as_bytes(),
            "echo: {:?}",
            String::from_utf8_lossy(&buf)
        );
        Ok(())
    });
    eprintln!("{TEST}: after the migration: echo on a new connection: {new_echo:?}");
    let page = http_get_in(Some(&nsn), guest(80), "/", Duration::from_secs(30));
    let page_ok = page
        .as_ref()
        .is_ok_and(|p| p.contains("<h1>colo guest</h1>"));
    eprintln!("{TEST}: after the migration: HTTP / answered: {page_ok}");
    e.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let old_echo = (|| -> std::io::Result<()> {
        let text = "after the migration, same socket\n";
        e.write_all(text.as_bytes())?;
        let mut buf = vec![0u8; text.len()];
        e.read_exact(&mut buf)?;
        if buf != text.as_bytes() {
            return Err(std::io::Error::other(format!(
                "{:?}",
                String::from_utf8_lossy(&buf)
            )));
        }
        Ok(())
    })();
    eprintln!("{TEST}: after the migration: echo on the connection opened before: {old_echo:?}");
    let loop_after = {
        let end = secs(60);
        while loop_acks_since(t_done) < 5 && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(100));
        }
        loop_acks_since(t_done)
    };
    eprintln!("{TEST}: after the migration: {loop_after} loop records acknowledged");
    if new_echo.is_err() || !page_ok || old_echo.is_err() || loop_after < 5 {
        // Copied out first: two guards of one mutex in the panic's arguments would deadlock.
        let last = acked.lock().unwrap().last().cloned();
        let errors = errors.lock().unwrap().clone();
        let st = dq.execute("query-status", json!({}));
        panic!(
            "after the migration: new echo {new_echo:?}, HTTP ok {page_ok}, old echo {old_echo:?}, loop records {loop_after} (errors {:?}; last acknowledged {:?}, {:.1} s before the switch-over ended); destination {st:?}\n{}",
            errors,
            last.as_ref().map(|a| (a.seq, &a.text)),
            last.as_ref().map_or(f64::NAN, |a| t_done
                .saturating_duration_since(a.acked)
                .as_secs_f64()),
            diag(&ns, &br, &nets, &img)
        );
    }
    let u1 = up();
    let wall = t_u0.elapsed().as_secs_f64();
    assert!(
        u1 > u0 && u1 - u0 <= wall + 5.0,
        "uptime continues: {u0} -> {u1} over {wall:.1} s wall"
    );
    eprintln!("{TEST}: uptime {u0} -> {u1} ({wall:.1} s wall)");
    stop.store(true, Ordering::SeqCst);
    cl.join().unwrap();
    let mut j = Journal::open(&nsn, secs(120));
    records.extend((1..=5).map(|i| j.append(&format!("post-{i}"))));
    drop(j);

    // 4. Snapshot, kill, restore.
    let us = up();
    let snap = dir.join("vm.snap");
    let t_snap = Instant::now();
    // A debug-build vmm-min checksums and writes ~100 MiB of non-zero pages at L1 (TCG) speed.
    dq.set_timeout(Duration::from_secs(400));
    dq.execute(
        "snapshot-save-file",
        json!({"path": snap.display().to_string(), "resume": false}),
    )
    .unwrap();
    eprintln!(
        "{TEST}: snapshot of {} bytes in {:.2} s",
        std::fs::metadata(&snap).map(|m| m.len()).unwrap_or(0),
        t_snap.elapsed().as_secs_f64()
    );
    drop(dq);
    dst.signal(libc::SIGKILL);
    dst.kill();
    let r_serial = logs.join("restored.serial");
    let r_qmp = dir.join("restored.qmp");
    let mut cmd = Command::new(&vmm_bin);
    cmd.arg("--restore")
        .arg(&snap)
        .args(vmm_args(&b, &r_serial, &r_qmp));
    let t_restore = Instant::now();
    let mut restored = ChildGuard::spawn("restored-vmm-min", &mut cmd, &logs).unwrap();
    let mut rq = colo_tests::qmp_connect(&r_qmp, secs(400)).unwrap();
    colo_tests::wait_until(secs(400), "the restored VM running", || {
        rq.execute("query-status", json!({}))
            .is_ok_and(|s| s["status"] == "running")
    })
    .unwrap();
    http_page(&nsn);
    let u2 = up();
    eprintln!(
        "{TEST}: restored; uptime at the snapshot {us}, after the restore {u2} ({:.1} s wall since the restore started)",
        t_restore.elapsed().as_secs_f64()
    );
    assert!(
        u2 >= us && u2 - us <= t_snap.elapsed().as_secs_f64() + 5.0,
        "uptime continues from the snapshot: {us} -> {u2}"
    );
    let r_console = std::fs::read_to_string(&r_serial).unwrap_or_default();
    assert!(
        !r_console.contains("COLO-GUEST-READY") && !r_console.contains("Linux version"),
        "the restored guest did not reboot: {r_console}"
    );
    let mut e3 = connect_in(Some(&nsn), guest(7), secs(120)).unwrap();
    e3.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    echo(&mut e3, "echo after the restore\n");
    // The journal on a new connection, with the dirtier's port as a control of another
    // `nc -ll -e` service; tried and reported before asserting.
    let dirty_ctl = connect_in(Some(&nsn), guest(5001), secs(20)).and_then(|s| {
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut r = BufReader::new(s.try_clone()?);
        (&s).write_all(b"STATUS\n")?;
        let mut l = String::new();
        r.read_line(&mut l)?;
        Ok(l.trim_end().to_string())
    });
    eprintln!("{TEST}: after the restore: dirtier STATUS on a new connection: {dirty_ctl:?}");
    let new_journal = connect_in(Some(&nsn), guest(5000), secs(120));
    eprintln!(
        "{TEST}: after the restore: new journal connection: {:?}",
        new_journal.as_ref().map(|_| ())
    );
    if new_journal.is_err() {
        panic!(
            "journal after the restore: new connection {:?}, dirtier control {dirty_ctl:?}\n{}",
            new_journal.map(|_| ()),
            diag(&ns, &br, &nets, &img)
        );
    }
    drop(new_journal);
    let mut jr = Journal::open(&nsn, secs(120));
    records.extend((1..=3).map(|i| jr.append(&format!("restored-{i}"))));
    let q = jr.request("QUERY").unwrap();
    assert!(q.starts_with("REC 1 pre-1"), "QUERY after the restore: {q}");
    // The echo connection opened before the migration, across snapshot/kill/restore too
    // (reported, not required: the brief asks for services answering after the restore).
    e.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let old = e.write_all(b"across the restore\n").and_then(|()| {
        let mut b = [0u8; 19];
        e.read_exact(&mut b).map(|()| b)
    });
    eprintln!(
        "{TEST}: the first echo connection after the restore: {:?}",
        old.map(|b| String::from_utf8_lossy(&b).into_owned())
    );
    rq.execute("quit", json!({})).unwrap();
    restored.wait_until(secs(30)).unwrap();
    src.terminate(Duration::from_secs(10));
    drop(a);
    drop(b);

    // 5. Every acknowledged record on disk, at its slot.
    let loops = acked.lock().unwrap().clone();
    let errs = errors.lock().unwrap().clone();
    let during = loops
        .iter()
        .filter(|r| r.sent >= t_mig && r.sent <= t_done)
        .count();
    let max_gap = loops
        .iter()
        .map(|r| r.acked - r.sent)
        .max()
        .unwrap_or_default();
    eprintln!(
        "{TEST}: loop client: {} records, {during} sent during the migration, longest append {:.2} s, errors {errs:?}",
        loops.len(),
        max_gap.as_secs_f64()
    );
    assert!(during >= 1, "records were appended during the migration");
    records.extend(loops);
    let data = std::fs::read(&img).unwrap();
    let mut seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), records.len(), "distinct seqs");
    for r in &records {
        let off = usize::try_from(r.seq * 512).unwrap();
        let slot = &data[off..off + 512];
        let want = format!("COLOJRNL {:08} {:03}\n{}\n", r.seq, r.text.len(), r.text);
        assert_eq!(
            String::from_utf8_lossy(&slot[..want.len()]),
            want,
            "record {:?} (seq {}) in the image",
            r.text,
            r.seq
        );
    }
    eprintln!(
        "{TEST}: all {} acknowledged records are in the image at their slots; test body {:.1} s",
        records.len(),
        t_test.elapsed().as_secs_f64()
    );
    assert!(
        rarp_from_vmm,
        "vmm-min sent no RARP (VHOST_USER_SEND_RARP) after the migration within 5 s; every other check passed (with vhost-net-colo announce-self as a stopgap)"
    );
}
