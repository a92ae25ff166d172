//! vmm-min snapshot/restore and live-migration fault tests on this host (host tier: PVM is
//! fine, the guest is the tiny counter guest of `colo_tests::vmm`, which prints an unbroken
//! hexadecimal counter on COM1 and dirties memory; source + destination console output must
//! together be that one unbroken sequence).
//!
//! - a migration through a recording proxy completes; the captured stream replayed into a
//!   fresh destination runs the guest on (positive control); the same stream truncated,
//!   corrupted, foreign, or sent to a destination of another shape is refused: exit 1, a clear
//!   message, the guest never runs there;
//! - the destination SIGKILLed mid-migration: the source reports `failed`, keeps running, its
//!   guest keeps counting; a second migration then completes;
//! - `migrate_cancel`: status `cancelled`, the source runs on, the destination refuses;
//! - snapshot files: `--restore` continues the guest from the snapshot; another memory size,
//!   vCPU count or device list, a truncated or garbage file, a missing file: exit 1, clear
//!   message.
//!
//! Needs `vmm-min --incoming/--restore` (issue 5): without them every test says
//! `SKIPPED: vmm-min has no migrate yet` (detected from `vmm-min --help` at run time).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use colo_tests::process::ChildGuard;
use colo_tests::vmm::{
    COUNTER_GUEST, StreamProxy, counter_lines, feed_stream, tiny_elf, vmm_feature, wait_migration,
};
use colo_tests::{QmpClient, TestDir, cargo_bin, secs};
use serde_json::{Value, json};

const MEM: &str = "64M";

fn bin() -> PathBuf {
    cargo_bin("vmm-min").unwrap()
}

/// False (after a loud SKIPPED line) when this host or this vmm-min cannot run the test.
fn ready(flag: &str) -> bool {
    if !Path::new("/dev/kvm").exists() {
        colo_tests::skipped("no /dev/kvm");
        return false;
    }
    if !vmm_feature(&bin(), flag) {
        colo_tests::skipped(&format!(
            "vmm-min has no migrate yet (no {flag} in vmm-min --help)"
        ));
        return false;
    }
    true
}

struct Vm {
    g: ChildGuard,
    q: Option<QmpClient>,
    serial: PathBuf,
    qmp: PathBuf,
}

impl Vm {
    fn q(&mut self) -> &mut QmpClient {
        if self.q.is_none() {
            self.q = Some(colo_tests::qmp_connect(&self.qmp, secs(30)).unwrap());
        }
        self.q.as_mut().unwrap()
    }

    fn console(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// Lines printed on this VM's console (a migrated or restored guest starts mid-sequence;
    /// continuity is checked on concatenations with `counter_lines`).
    fn lines(&self) -> u64 {
        self.console().matches('\n').count() as u64
    }

    fn status(&mut self) -> String {
        self.q().execute("query-status", json!({})).unwrap()["status"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

fn spawn(dir: &TestDir, name: &str, args: &[String]) -> Vm {
    let serial = dir.join(format!("{name}.serial"));
    let qmp = dir.join(format!("{name}.qmp"));
    let mut cmd = Command::new(bin());
    if !args.iter().any(|a| a == "--memory") {
        cmd.args(["--memory", MEM]);
    }
    cmd.arg("--serial")
        .arg(format!("file:{}", serial.display()))
        .arg("--qmp")
        .arg(format!("unix:{}", qmp.display()))
        .args(args);
    let g = ChildGuard::spawn(name, &mut cmd, dir.path()).unwrap();
    Vm {
        g,
        q: None,
        serial,
        qmp,
    }
}

/// A source running the counter guest; returns once it has dirtied its whole 8 MiB region.
fn source(dir: &TestDir, name: &str, extra: &[String]) -> Vm {
    let k = dir.join("counter.elf");
    if !k.exists() {
        std::fs::write(&k, tiny_elf(COUNTER_GUEST)).unwrap();
    }
    let mut args = vec![
        "--kernel".to_string(),
        k.display().to_string(),
        "--cmdline".into(),
        "console=ttyS0".into(),
    ];
    args.extend_from_slice(extra);
    let mut vm = spawn(dir, name, &args);
    let start = vm.lines();
    let deadline = secs(60);
    // 64 lines touch every page of the 8 MiB region once: from then on the guest's RAM holds
    // more than 8 MiB of non-zero pages to migrate.
    while vm.lines() < start + 80 {
        vm.g.ensure_running().unwrap();
        assert!(
            Instant::now() < deadline,
            "the counter guest does not count"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    vm
}

/// `vmm-min --incoming tcp:127.0.0.1:PORT` (a port free a moment ago, retried if taken);
/// returns once it says it is listening, with the address it printed.
fn dest(dir: &TestDir, name: &str, extra: &[String]) -> (Vm, SocketAddr) {
    for attempt in 0..5 {
        let port = colo_tests::free_tcp_port().unwrap();
        let mut args = vec!["--incoming".to_string(), format!("tcp:127.0.0.1:{port}")];
        args.extend_from_slice(extra);
        let mut vm = spawn(dir, &format!("{name}-{attempt}"), &args);
        match vm.g.wait_for_output("waiting for migration on", secs(30)) {
            Ok(()) => {
                let text = format!("{}{}", vm.g.stdout_text(), vm.g.stderr_text());
                let addr = text
                    .lines()
                    .find_map(|l| l.split("waiting for migration on ").nth(1))
                    .and_then(|a| a.trim().trim_start_matches("tcp:").parse().ok())
                    .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], port)));
                return (vm, addr);
            }
            Err(e) if attempt < 4 && format!("{e:#}").contains("in use") => continue,
            Err(e) => panic!("destination did not listen: {e:#}"),
        }
    }
    panic!("no free port for the destination after 5 attempts")
}

/// The destination refused what it got: exit 1 within 30 s, something on stderr, no panic,
/// and the guest never ran (its console stayed empty). Returns the message.
fn refused(vm: &mut Vm, what: &str) -> String {
    let st = vm.g.wait_until(secs(30)).unwrap_or_else(|e| {
        panic!("{what}: the destination did not exit: {e:#}");
    });
    let err = vm.g.stderr_text();
    assert_eq!(
        st.code(),
        Some(1),
        "{what}: exit status{}",
        vm.g.log_tail(20)
    );
    assert!(!err.contains("panicked"), "{what}: panic: {err}");
    let msg: String = err
        .lines()
        .filter(|l| !l.contains("PVM") && !l.contains("waiting for migration"))
        .collect::<Vec<_>>()
        .join(" | ");
    assert!(!msg.trim().is_empty(), "{what}: no error message: {err}");
    assert_eq!(vm.console(), "", "{what}: the guest ran on the destination");
    eprintln!("{what}: refused: {msg}");
    msg
}

fn migrate(vm: &mut Vm, uri: &str) {
    vm.q()
        .execute("migrate", json!({ "uri": uri }))
        .unwrap_or_else(|e| panic!("migrate {uri}: {e}"));
}

/// The counter keeps going on `vm` (at least `n` more lines within 30 s), unbroken.
fn keeps_counting(vm: &mut Vm, n: u64, what: &str) {
    let start = vm.lines();
    let deadline = secs(30);
    while vm.lines() < start + n {
        vm.g.ensure_running().unwrap();
        assert!(
            Instant::now() < deadline,
            "{what}: the guest stopped counting at {}",
            vm.lines()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn num(v: &Value, ptr: &str) -> u64 {
    v.pointer(ptr)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{ptr} missing in {v}"))
}

/// A migration through a recording proxy; then the captured stream, replayed, cut, corrupted or
/// sent to a destination of another shape.
#[test]
fn vmm_migrate_host_completes_and_refuses_truncated_corrupt_and_foreign_streams() {
    if !ready("--incoming") {
        return;
    }
    let dir = TestDir::new().unwrap();
    let mut src = source(&dir, "src", &[]);
    let (mut dst, daddr) = dest(&dir, "dst", &[]);
    let mut proxy = StreamProxy::start(daddr, None).unwrap();
    let t0 = Instant::now();
    migrate(&mut src, &proxy.uri());
    let (done, _) = wait_migration(src.q(), secs(120), None).unwrap();
    assert_eq!(done["status"], "completed", "{done}");
    eprintln!(
        "migration completed in {:.2} s (wall): {done}",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(num(&done, "/ram/total"), 64 << 20);
    assert!(num(&done, "/ram/transferred") > 8 << 20, "{done}");
    assert!(
        num(&done, "/ram/normal") >= 2048,
        "the pages of the dirtied region were sent: {done}"
    );
    assert!(num(&done, "/ram/duplicate") > 0, "zero pages: {done}");
    assert!(done.get("total-time").is_some() && done.get("downtime").is_some());
    let ev = src
        .q()
        .wait_event("MIGRATION", Duration::from_secs(10))
        .unwrap();
    assert!(ev.data["status"].is_string(), "{ev:?}");
    assert_eq!(src.status(), "postmigrate");
    // The destination carries on from where the source stopped.
    keeps_counting(&mut dst, 10, "destination");
    assert_eq!(dst.status(), "running");
    let both = format!("{}{}", src.console(), dst.console());
    counter_lines(&both).unwrap_or_else(|e| panic!("source + destination console: {e:#}"));
    let stream = proxy.wait_captured(secs(30)).unwrap();
    eprintln!("captured stream: {} bytes", stream.len());
    assert!(stream.len() > 8 << 20);
    src.q().execute("quit", json!({})).unwrap();
    assert_eq!(src.g.wait_until(secs(30)).unwrap().code(), Some(0));
    dst.g.terminate(Duration::from_secs(5));

    // Positive control: the same bytes, replayed with a plain TcpStream, run the guest on.
    let (mut rep, raddr) = dest(&dir, "replay", &[]);
    feed_stream(raddr, &stream, secs(30)).unwrap();
    keeps_counting(&mut rep, 5, "replayed stream");
    let replay = rep.console();
    let last_src = src.console();
    counter_lines(&format!("{last_src}{replay}"))
        .unwrap_or_else(|e| panic!("source + replayed console: {e:#}"));
    rep.g.terminate(Duration::from_secs(5));

    let len = stream.len();
    let mut cases: Vec<(String, Vec<u8>)> = vec![
        ("empty stream".into(), Vec::new()),
        ("magic only".into(), stream[..8].to_vec()),
        ("cut at 1/3".into(), stream[..len / 3].to_vec()),
        ("cut at 2/3".into(), stream[..2 * len / 3].to_vec()),
        ("last byte missing".into(), stream[..len - 1].to_vec()),
        ("last 64 bytes missing".into(), stream[..len - 64].to_vec()),
    ];
    for (name, at) in [
        ("magic", 3),
        ("header", 12),
        ("page data at 1/2", len / 2),
        ("page data at 3/4", 3 * len / 4),
        ("state near the end", len - 300),
        ("last byte", len - 1),
    ] {
        let mut s = stream.clone();
        s[at] ^= 0x5a;
        cases.push((format!("corrupt {name} (byte {at})"), s));
    }
    cases.push((
        "HTTP request".into(),
        b"GET / HTTP/1.0\r\nHost: x\r\n\r\n".to_vec(),
    ));
    cases.push((
        "64 KiB of pseudo-random bytes".into(),
        (0..65536u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect(),
    ));
    for (i, (name, bytes)) in cases.iter().enumerate() {
        let (mut d, a) = dest(&dir, &format!("bad{i}"), &[]);
        let _ = feed_stream(a, bytes, secs(30));
        refused(&mut d, name);
    }
    // The good stream, but a destination of another shape.
    for (name, extra) in [
        (
            "other memory size",
            vec!["--memory".to_string(), "128M".into()],
        ),
        ("other vCPU count", vec!["--cpus".to_string(), "2".into()]),
    ] {
        let (mut d, a) = dest(&dir, &format!("shape-{}", name.replace(' ', "-")), &extra);
        let _ = feed_stream(a, &stream, secs(30));
        let msg = refused(&mut d, name);
        assert!(
            msg.to_lowercase().contains("memory")
                || msg.to_lowercase().contains("cpu")
                || msg.to_lowercase().contains("shape"),
            "{name}: the message says what differs: {msg}"
        );
    }
}

/// The destination is SIGKILLed mid-migration: the source fails the migration and carries on.
#[test]
fn vmm_migrate_host_destination_killed_mid_migration_source_carries_on() {
    if !ready("--incoming") {
        return;
    }
    let dir = TestDir::new().unwrap();
    let mut src = source(&dir, "src", &[]);
    let (mut dst, daddr) = dest(&dir, "dst", &[]);
    // 1 MB/s through the proxy: the ~9 MB of non-zero pages take several seconds.
    let proxy = StreamProxy::start(daddr, Some(1_000_000)).unwrap();
    migrate(&mut src, &proxy.uri());
    colo_tests::wait_until(secs(60), "1 MB of stream forwarded", || {
        proxy.forwarded() > 1_000_000
    })
    .unwrap();
    let mid = src.q().execute("query-migrate", json!({})).unwrap();
    assert!(
        ["setup", "active"].contains(&mid["status"].as_str().unwrap_or("")),
        "{mid}"
    );
    let before = src.lines();
    dst.g.signal(libc::SIGKILL);
    dst.g.kill();
    let (end, _) = wait_migration(src.q(), secs(60), None).unwrap();
    assert_eq!(end["status"], "failed", "{end}");
    eprintln!("after the destination was killed: {end}");
    assert!(
        end["error-desc"].as_str().is_some_and(|s| !s.is_empty()),
        "error-desc says why: {end}"
    );
    let ev = src
        .q()
        .wait_event("MIGRATION", Duration::from_secs(10))
        .unwrap();
    assert!(ev.data["status"].is_string());
    assert_eq!(src.status(), "running");
    keeps_counting(&mut src, 20, "source after the failed migration");
    assert!(src.lines() > before + 20);
    counter_lines(&src.console()).unwrap();
    assert_eq!(
        dst.console(),
        "",
        "the killed destination never ran the guest"
    );

    // The source can still migrate.
    let (mut dst2, daddr2) = dest(&dir, "dst2", &[]);
    migrate(&mut src, &format!("tcp:{daddr2}"));
    let (end2, _) = wait_migration(src.q(), secs(120), None).unwrap();
    assert_eq!(end2["status"], "completed", "{end2}");
    keeps_counting(&mut dst2, 10, "second destination");
    counter_lines(&format!("{}{}", src.console(), dst2.console())).unwrap();
}

/// `migrate_cancel` mid-migration: cancelled, the source runs on, the destination refuses the
/// partial stream. Also `migrate-set-parameters` / `query-migrate-parameters`.
#[test]
fn vmm_migrate_host_cancel_resumes_source_and_destination_refuses() {
    if !ready("--incoming") {
        return;
    }
    let dir = TestDir::new().unwrap();
    let mut src = source(&dir, "src", &[]);
    src.q()
        .execute(
            "migrate-set-parameters",
            json!({"downtime-limit": 150, "max-bandwidth": 2_000_000}),
        )
        .unwrap();
    let p = src
        .q()
        .execute("query-migrate-parameters", json!({}))
        .unwrap();
    assert_eq!(p["downtime-limit"], 150, "{p}");
    assert_eq!(p["max-bandwidth"], 2_000_000, "{p}");
    let (mut dst, daddr) = dest(&dir, "dst", &[]);
    let proxy = StreamProxy::start(daddr, Some(1_000_000)).unwrap();
    migrate(&mut src, &proxy.uri());
    colo_tests::wait_until(secs(60), "500 kB of stream forwarded", || {
        proxy.forwarded() > 500_000
    })
    .unwrap();
    src.q().execute("migrate_cancel", json!({})).unwrap();
    let (end, _) = wait_migration(src.q(), secs(60), None).unwrap();
    assert_eq!(end["status"], "cancelled", "{end}");
    assert_eq!(src.status(), "running");
    keeps_counting(&mut src, 20, "source after cancel");
    counter_lines(&src.console()).unwrap();
    refused(&mut dst, "stream of a cancelled migration");
}

fn snapshot(vm: &mut Vm, path: &Path, resume: bool) -> Value {
    vm.q()
        .execute(
            "snapshot-save-file",
            json!({"path": path.display().to_string(), "resume": resume}),
        )
        .unwrap()
}

fn start_blk(dir: &TestDir, name: &str) -> (ChildGuard, PathBuf) {
    let img = dir.join(format!("{name}.img"));
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let sock = dir.join(format!("{name}.sock"));
    let mut cmd = Command::new(cargo_bin("vhost-blk-colo").unwrap());
    cmd.arg("--socket").arg(&sock).arg("--drive").arg(format!(
        "id=d0,driver=raw,file.filename={},file.driver=file",
        img.display()
    ));
    let g = ChildGuard::spawn(name, &mut cmd, dir.path()).unwrap();
    colo_tests::wait_for_unix_socket(&sock, secs(60)).unwrap();
    (g, sock)
}

/// `--restore` continues the guest from the snapshot; snapshots of another shape, cut or
/// garbage files are refused.
#[test]
fn vmm_snapshot_restore_continues_and_incompatible_snapshots_are_refused() {
    if !ready("--restore") {
        return;
    }
    let dir = TestDir::new().unwrap();
    let mut src = source(&dir, "src", &[]);
    let snap = dir.join("vm.snap");
    // resume: false -> the VM stays paused after the save.
    let before = src.console().len();
    snapshot(&mut src, &snap, false);
    assert_eq!(src.status(), "paused");
    let at_save = src.console();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(src.console(), at_save, "a paused VM prints nothing");
    assert!(at_save.len() >= before);
    src.q().execute("quit", json!({})).unwrap();
    src.g.wait_until(secs(30)).unwrap();

    // Restore: the guest continues exactly where it was saved.
    let mut r = spawn(
        &dir,
        "restored",
        &["--restore".into(), snap.display().to_string()],
    );
    keeps_counting(&mut r, 10, "restored VM");
    counter_lines(&format!("{at_save}{}", r.console()))
        .unwrap_or_else(|e| panic!("saved + restored console: {e:#}"));
    assert_eq!(r.status(), "running");
    // Snapshot with resume: true keeps it running.
    let snap2 = dir.join("vm2.snap");
    snapshot(&mut r, &snap2, true);
    assert_eq!(r.status(), "running");
    keeps_counting(&mut r, 5, "VM after a snapshot with resume");
    r.g.terminate(Duration::from_secs(5));

    let data = std::fs::read(&snap).unwrap();
    let cut = dir.join("cut.snap");
    std::fs::write(&cut, &data[..data.len() / 2]).unwrap();
    let flipped = dir.join("flipped.snap");
    let mut f = data.clone();
    let mid = f.len() / 2;
    f[mid] ^= 0x5a;
    std::fs::write(&flipped, &f).unwrap();
    let garbage = dir.join("garbage.snap");
    std::fs::write(
        &garbage,
        (0..100_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let empty = dir.join("empty.snap");
    std::fs::write(&empty, b"").unwrap();
    let (_blk, blk_sock) = start_blk(&dir, "blk");
    let s = snap.display().to_string();
    let cases: Vec<(&str, Vec<String>, &[&str])> = vec![
        (
            "other memory size",
            vec![
                "--restore".into(),
                s.clone(),
                "--memory".into(),
                "128M".into(),
            ],
            &["memory", "shape"],
        ),
        (
            "other vCPU count",
            vec!["--restore".into(), s.clone(), "--cpus".into(), "2".into()],
            &["cpu", "shape"],
        ),
        (
            "other device list",
            vec![
                "--restore".into(),
                s.clone(),
                "--disk".into(),
                format!("vhost-user,socket={}", blk_sock.display()),
            ],
            &["device", "shape", "disk"],
        ),
        (
            "truncated file",
            vec!["--restore".into(), cut.display().to_string()],
            &[],
        ),
        (
            "one byte flipped",
            vec!["--restore".into(), flipped.display().to_string()],
            &[],
        ),
        (
            "garbage file",
            vec!["--restore".into(), garbage.display().to_string()],
            &[],
        ),
        (
            "empty file",
            vec!["--restore".into(), empty.display().to_string()],
            &[],
        ),
        (
            "missing file",
            vec![
                "--restore".into(),
                dir.join("nope.snap").display().to_string(),
            ],
            &["nope.snap"],
        ),
    ];
    for (i, (name, args, words)) in cases.into_iter().enumerate() {
        let mut v = spawn(&dir, &format!("bad{i}"), &args);
        let msg = refused(&mut v, name);
        if !words.is_empty() {
            let low = msg.to_lowercase();
            assert!(
                words.iter().any(|w| low.contains(w)),
                "{name}: the message says what is wrong ({words:?}): {msg}"
            );
        }
    }
}
