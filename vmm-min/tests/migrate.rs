//! Snapshot/restore and live migration between vmm-min processes on this host (loopback TCP,
//! PVM is fine): a tiny 64-bit ELF guest counts in memory and keeps rewriting a 1 MiB region,
//! so pre-copy has pages to chase. The guest's RAM is dumped at exit (`VMM_MIN_DUMP_RAM`) to
//! check that it carried on from where it was on the other side.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use colo_proto::qmp::QmpClient;
use serde_json::{Value, json};

/// Counter address in guest RAM.
const COUNTER: usize = 0x20_0000;
/// Pattern page written by the guest loader (a data segment of the ELF).
const PATTERN: usize = 0x30_0000;

/// Long-mode guest at 0x100000:
/// ```text
///   xor rcx, rcx
/// outer: mov rdi, 0x400000
/// inner: mov [rdi], rcx ; add rdi, 0x1000 ; cmp rdi, 0x500000 ; jb inner
///   inc rcx ; mov [0x200000], rcx ; jmp outer
/// ```
const DIRTIER: &[u8] = &[
    0x48, 0x31, 0xc9, // xor rcx, rcx
    0x48, 0xc7, 0xc7, 0x00, 0x00, 0x40, 0x00, // mov rdi, 0x400000
    0x48, 0x89, 0x0f, // mov [rdi], rcx
    0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, // add rdi, 0x1000
    0x48, 0x81, 0xff, 0x00, 0x00, 0x50, 0x00, // cmp rdi, 0x500000
    0x72, 0xed, // jb inner
    0x48, 0xff, 0xc1, // inc rcx
    0x48, 0x89, 0x0c, 0x25, 0x00, 0x00, 0x20, 0x00, // mov [0x200000], rcx
    0xeb, 0xd9, // jmp outer
];

/// An ELF64 executable: `code` at 0x100000 (entry) and a pattern page at [`PATTERN`].
fn tiny_elf(code: &[u8]) -> Vec<u8> {
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 13 + 5) as u8).collect();
    let segs: [(u64, &[u8], u32); 2] = [(0x10_0000, code, 5), (PATTERN as u64, &pattern, 6)];
    let mut e = Vec::new();
    e.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    e.extend_from_slice(&2u16.to_le_bytes());
    e.extend_from_slice(&0x3eu16.to_le_bytes());
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&0x10_0000u64.to_le_bytes());
    e.extend_from_slice(&64u64.to_le_bytes());
    e.extend_from_slice(&0u64.to_le_bytes());
    e.extend_from_slice(&0u32.to_le_bytes());
    e.extend_from_slice(&64u16.to_le_bytes());
    e.extend_from_slice(&56u16.to_le_bytes());
    e.extend_from_slice(&(segs.len() as u16).to_le_bytes());
    e.extend_from_slice(&64u16.to_le_bytes());
    e.extend_from_slice(&0u16.to_le_bytes());
    e.extend_from_slice(&0u16.to_le_bytes());
    for (i, (addr, data, flags)) in segs.iter().enumerate() {
        let off = 0x1000u64 * (i as u64 + 1);
        e.extend_from_slice(&1u32.to_le_bytes());
        e.extend_from_slice(&flags.to_le_bytes());
        e.extend_from_slice(&off.to_le_bytes());
        e.extend_from_slice(&addr.to_le_bytes());
        e.extend_from_slice(&addr.to_le_bytes());
        e.extend_from_slice(&(data.len() as u64).to_le_bytes());
        e.extend_from_slice(&(data.len() as u64).to_le_bytes());
        e.extend_from_slice(&0x1000u64.to_le_bytes());
    }
    for (i, (_, data, _)) in segs.iter().enumerate() {
        e.resize(0x1000 * (i + 1), 0);
        e.extend_from_slice(data);
    }
    e
}

/// A vmm-min process, killed on drop.
struct Vmm {
    child: Child,
    qmp_path: PathBuf,
    stderr_path: PathBuf,
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Vmm {
    fn spawn(dir: &Path, name: &str, args: &[&str]) -> Vmm {
        let qmp_path = dir.join(format!("{name}.qmp"));
        let stderr_path = dir.join(format!("{name}.err"));
        let mem: &[&str] = if args.contains(&"--memory") {
            &[]
        } else {
            &["--memory", "64M"]
        };
        let child = Command::new(env!("CARGO_BIN_EXE_vmm-min"))
            .args(mem)
            .args(["--serial", "null"])
            .arg("--qmp")
            .arg(format!("unix:{}", qmp_path.display()))
            .args(args)
            .env("VMM_MIN_DUMP_RAM", dir.join(format!("{name}.ram")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap();
        Vmm {
            child,
            qmp_path,
            stderr_path,
        }
    }

    fn qmp(&mut self) -> QmpClient {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(c) = QmpClient::connect_unix(&self.qmp_path, Duration::from_secs(20)) {
                return c;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("vmm-min exited early ({st}): {}", self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "no QMP socket: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Waits for the exit status (bounded).
    fn wait(&mut self, within: Duration) -> i32 {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "vmm-min still running: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_stderr(&mut self, needle: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.stderr().contains(needle) {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("vmm-min exited ({st}) before {needle:?}: {}", self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?}: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn skip() -> bool {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: no /dev/kvm");
        return true;
    }
    false
}

/// See [`colo_tests::free_tcp_port`]: below the ephemeral range, so no outgoing connection
/// takes it before the process under test binds it.
fn free_port() -> u16 {
    colo_tests::free_tcp_port().unwrap()
}

fn kernel(dir: &Path) -> PathBuf {
    let p = dir.join("dirtier.elf");
    std::fs::write(&p, tiny_elf(DIRTIER)).unwrap();
    p
}

fn status(q: &mut QmpClient) -> Value {
    q.execute("query-status", Value::Null).unwrap()
}

fn wait_migration(q: &mut QmpClient, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let m = q.execute("query-migrate", Value::Null).unwrap();
        let s = m["status"].as_str().unwrap_or("").to_string();
        if ["completed", "failed", "cancelled"].contains(&s.as_str()) {
            return m;
        }
        assert!(Instant::now() < deadline, "migration stuck: {m}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn counter_in(ram: &Path) -> u64 {
    let b = std::fs::read(ram).unwrap();
    u64::from_le_bytes(b[COUNTER..COUNTER + 8].try_into().unwrap())
}

fn pattern_ok(ram: &Path) -> bool {
    let b = std::fs::read(ram).unwrap();
    (0..4096usize).all(|i| b[PATTERN + i] == (i as u32 * 13 + 5) as u8)
}

/// Lets the guest count, then quits the VMM and returns the counter from its RAM dump.
fn quit_and_count(v: &mut Vmm, q: &mut QmpClient, dir: &Path, name: &str) -> u64 {
    q.execute("quit", Value::Null).unwrap();
    assert_eq!(v.wait(Duration::from_secs(20)), 0, "{}", v.stderr());
    let ram = dir.join(format!("{name}.ram"));
    assert!(pattern_ok(&ram), "{name}: pattern page intact");
    counter_in(&ram)
}

#[test]
fn migrate_live_guest_between_two_processes_over_loopback() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let k = kernel(dir.path());
    let mut src = Vmm::spawn(dir.path(), "src", &["--kernel", k.to_str().unwrap()]);
    let mut sq = src.qmp();
    std::thread::sleep(Duration::from_millis(300));
    let port = free_port();
    let uri = format!("tcp:127.0.0.1:{port}");
    let mut dst = Vmm::spawn(dir.path(), "dst", &["--incoming", &uri]);
    dst.wait_stderr(
        "vmm-min: waiting for migration on 127.0.0.1:",
        Duration::from_secs(20),
    );
    let mut dq = dst.qmp();
    assert_eq!(
        status(&mut dq),
        json!({"running": false, "status": "inmigrate", "singlestep": false})
    );
    sq.execute("migrate-set-parameters", json!({"downtime-limit": 50}))
        .unwrap();
    assert_eq!(
        sq.execute("query-migrate-parameters", Value::Null).unwrap()["downtime-limit"],
        50
    );
    let t = Instant::now();
    assert_eq!(
        sq.execute("migrate", json!({"uri": uri})).unwrap(),
        json!({})
    );
    let m = wait_migration(&mut sq, Duration::from_secs(60));
    let took = t.elapsed();
    assert_eq!(m["status"], "completed", "{m}\n{}", src.stderr());
    let ram = &m["ram"];
    assert_eq!(ram["total"], 64u64 << 20);
    assert!(
        ram["duplicate"].as_u64().unwrap() > 10_000,
        "zero pages as records: {m}"
    );
    assert!(ram["normal"].as_u64().unwrap() >= 256, "{m}");
    assert!(
        ram["transferred"].as_u64().unwrap() < 32 << 20,
        "64 MiB mostly zero: far less than 64 MiB on the wire: {m}"
    );
    assert!(ram["dirty-sync-count"].as_u64().unwrap() >= 2, "{m}");
    assert!(m["downtime"].as_u64().is_some(), "{m}");
    eprintln!(
        "migration of a 64 MiB dirtying guest: {} ms total, {} ms downtime, {} bytes, {} passes (wall {:?})",
        m["total-time"], m["downtime"], ram["transferred"], ram["dirty-sync-count"], took
    );
    let events: Vec<String> = sq
        .queued_events()
        .filter(|e| e.name == "MIGRATION")
        .map(|e| e.data["status"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(events.ends_with(&["completed".to_string()]), "{events:?}");
    assert!(events.contains(&"active".to_string()), "{events:?}");
    assert_eq!(
        status(&mut sq),
        json!({"running": false, "status": "postmigrate", "singlestep": false})
    );
    assert!(
        sq.execute("cont", Value::Null).is_err(),
        "no cont after migration"
    );
    // The destination runs before it acknowledges: completed means running there.
    assert_eq!(status(&mut dq)["status"], "running");
    // The guest carries on at the destination from the source's final counter.
    let src_count = quit_and_count(&mut src, &mut sq, dir.path(), "src");
    std::thread::sleep(Duration::from_millis(300));
    let dst_count = quit_and_count(&mut dst, &mut dq, dir.path(), "dst");
    assert!(src_count > 0);
    assert!(
        dst_count > src_count,
        "destination counter {dst_count} must continue past the source's {src_count}"
    );
}

/// Reads a migration stream (header, then sections: 1 PAGES, 2 STATE, 3 END, 4 SYNC, 5 STOPPED),
/// answering each SYNC with the byte 2, up to and including END; never acknowledges.
fn sync_answering_sink(r: &mut impl Read, answer: &mut impl Write) -> std::io::Result<()> {
    let u64_of = |r: &mut dyn Read| -> std::io::Result<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    };
    let skip = |r: &mut dyn Read, n: u64| -> std::io::Result<()> {
        let got = std::io::copy(&mut r.take(n), &mut std::io::sink())?;
        if got == n {
            Ok(())
        } else {
            Err(std::io::ErrorKind::UnexpectedEof.into())
        }
    };
    skip(r, 12)?;
    let n = u64_of(r)?;
    skip(r, n)?;
    loop {
        let mut tag = [0u8; 1];
        r.read_exact(&mut tag)?;
        match tag[0] {
            1 => {
                let mut c = [0u8; 4];
                r.read_exact(&mut c)?;
                for _ in 0..u32::from_le_bytes(c) {
                    if u64_of(r)? & 0xfff == 0 {
                        skip(r, 4096)?;
                    }
                }
            }
            2 => {
                let n = u64_of(r)?;
                skip(r, n)?;
            }
            3 => {
                u64_of(r)?;
                return Ok(());
            }
            4 => answer.write_all(&[2])?,
            5 => {}
            t => return Err(std::io::Error::other(format!("tag {t}"))),
        }
    }
}

#[test]
fn migrate_to_a_destination_that_dies_or_never_acks_leaves_the_source_running() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let k = kernel(dir.path());
    let mut src = Vmm::spawn(dir.path(), "src", &["--kernel", k.to_str().unwrap()]);
    let mut sq = src.qmp();
    // 1. A "destination" that reads 100 KiB and hangs up.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = vec![0u8; 100 << 10];
        let _ = s.read_exact(&mut buf);
    });
    sq.execute("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}))
        .unwrap();
    let m = wait_migration(&mut sq, Duration::from_secs(60));
    t.join().unwrap();
    assert_eq!(m["status"], "failed", "{m}");
    assert!(m["error-desc"].as_str().unwrap().contains("failed"), "{m}");
    assert_eq!(status(&mut sq)["status"], "running");
    // 2. A destination that takes everything (answering the pre-copy sync requests) but never
    // acknowledges the end: migrate_cancel while the guest is stopped.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let t = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut answer = s.try_clone().unwrap();
        let mut r = std::io::BufReader::new(s);
        let _ = sync_answering_sink(&mut r, &mut answer);
        let mut sink = Vec::new();
        let _ = r.read_to_end(&mut sink);
    });
    sq.execute("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = sq.execute("query-migrate", Value::Null).unwrap();
        if s["status"] == "device" || s["status"] == "failed" {
            break;
        }
        assert!(Instant::now() < deadline, "{s}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Give the source time to write END and wait for the acknowledgement.
    std::thread::sleep(Duration::from_millis(500));
    sq.execute("migrate_cancel", Value::Null).unwrap();
    let m = wait_migration(&mut sq, Duration::from_secs(30));
    t.join().unwrap();
    assert_eq!(m["status"], "cancelled", "{m}");
    assert_eq!(status(&mut sq)["status"], "running", "guest resumed");
    // The guest still counts.
    let c1 = quit_and_count(&mut src, &mut sq, dir.path(), "src");
    assert!(c1 > 0);
}

#[test]
fn incoming_refuses_garbage_truncated_streams_and_other_shapes() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // `quit` while waiting ends it cleanly.
    let port = free_port();
    let mut w = Vmm::spawn(
        dir.path(),
        "w",
        &["--incoming", &format!("tcp:127.0.0.1:{port}")],
    );
    w.wait_stderr("waiting for migration", Duration::from_secs(20));
    let mut wq = w.qmp();
    assert_eq!(status(&mut wq)["status"], "inmigrate");
    assert!(wq.execute("cont", Value::Null).is_err());
    wq.execute("quit", Value::Null).unwrap();
    assert_eq!(w.wait(Duration::from_secs(10)), 0, "{}", w.stderr());
    // Garbage.
    let port = free_port();
    let uri = format!("tcp:127.0.0.1:{port}");
    let mut dst = Vmm::spawn(dir.path(), "g", &["--incoming", &uri]);
    dst.wait_stderr("waiting for migration", Duration::from_secs(20));
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.read_to_end(&mut answer);
    assert_eq!(dst.wait(Duration::from_secs(20)), 1);
    assert!(
        dst.stderr().contains("not a vmm-min state stream"),
        "{}",
        dst.stderr()
    );
    assert_eq!(answer.first(), Some(&0u8), "refusal byte");
    // A source of another shape (128 MiB vs 64 MiB): both sides say why, the source runs on.
    let k = kernel(dir.path());
    let mut src = Vmm::spawn(dir.path(), "src", &["--kernel", k.to_str().unwrap()]);
    let mut sq = src.qmp();
    let port = free_port();
    let uri = format!("tcp:127.0.0.1:{port}");
    let mut dst = Vmm::spawn(dir.path(), "big", &["--incoming", &uri, "--memory", "128M"]);
    dst.wait_stderr("waiting for migration", Duration::from_secs(20));
    sq.execute("migrate", json!({"uri": uri})).unwrap();
    let m = wait_migration(&mut sq, Duration::from_secs(30));
    assert_eq!(m["status"], "failed", "{m}");
    assert!(
        m["error-desc"].as_str().unwrap().contains("does not match"),
        "{m}"
    );
    assert_eq!(dst.wait(Duration::from_secs(20)), 1);
    assert!(dst.stderr().contains("does not match"), "{}", dst.stderr());
    assert_eq!(status(&mut sq)["status"], "running");
    // Bad usage: no kernel and nothing to restore.
    let out = Command::new(env!("CARGO_BIN_EXE_vmm-min"))
        .args(["--memory", "64M"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--kernel is required"));
}

#[test]
fn snapshot_save_file_then_restore_in_a_new_process_continues_the_guest() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let k = kernel(dir.path());
    let snap = dir.path().join("vm.snap");
    let mut a = Vmm::spawn(dir.path(), "a", &["--kernel", k.to_str().unwrap()]);
    let mut aq = a.qmp();
    std::thread::sleep(Duration::from_millis(300));
    aq.execute(
        "snapshot-save-file",
        json!({"path": snap.to_str().unwrap(), "resume": false}),
    )
    .unwrap();
    assert_eq!(status(&mut aq)["status"], "paused");
    assert!(snap.exists());
    // Paused since the save: its final counter is the snapshot's.
    let saved = quit_and_count(&mut a, &mut aq, dir.path(), "a");
    assert!(saved > 0);
    // Restore, run, quit: the counter went on from the saved value.
    let mut b = Vmm::spawn(dir.path(), "b", &["--restore", snap.to_str().unwrap()]);
    let mut bq = b.qmp();
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&mut bq)["status"] != "running" {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    // A save with resume (default) keeps it running.
    let snap2 = dir.path().join("vm2.snap");
    bq.execute(
        "snapshot-save-file",
        json!({"path": snap2.to_str().unwrap()}),
    )
    .unwrap();
    assert_eq!(status(&mut bq)["status"], "running");
    // Failures leave the VM as it was.
    let bad = dir.path().join("no/such/dir/x.snap");
    let e = bq
        .execute("snapshot-save-file", json!({"path": bad.to_str().unwrap()}))
        .unwrap_err();
    assert!(e.to_string().contains("no/such/dir"), "{e}");
    assert_eq!(status(&mut bq)["status"], "running");
    assert!(bq.execute("migrate", json!({"uri": "exec:cat"})).is_err());
    assert!(bq.execute("migrate", json!({"uri": "tcp:nohost"})).is_err());
    assert_eq!(
        bq.execute("query-migrate", Value::Null).unwrap(),
        json!({}),
        "no migration started"
    );
    let restored = quit_and_count(&mut b, &mut bq, dir.path(), "b");
    assert!(
        restored > saved,
        "restored guest counted on: {restored} > {saved}"
    );
    // Refusals: other memory size, corrupt file, truncated file, other version.
    let refuse = |name: &str, file: &Path, extra: &[&str], needle: &str| {
        let mut args = vec!["--restore", file.to_str().unwrap()];
        args.extend_from_slice(extra);
        let mut v = Vmm::spawn(dir.path(), name, &args);
        assert_eq!(v.wait(Duration::from_secs(30)), 1, "{name}: {}", v.stderr());
        assert!(v.stderr().contains(needle), "{name}: {}", v.stderr());
    };
    refuse("shape", &snap, &["--memory", "128M"], "does not match");
    refuse("cpus", &snap, &["--cpus", "2"], "does not match");
    let bytes = std::fs::read(&snap).unwrap();
    let corrupt = dir.path().join("corrupt.snap");
    let mut c = bytes.clone();
    // One bit inside the pattern page's content: only the checksum can tell.
    let pat: Vec<u8> = (0..64u32).map(|i| (i * 13 + 5) as u8).collect();
    let at = c.windows(64).position(|w| w == pat.as_slice()).unwrap() + 100;
    c[at] ^= 0x40;
    std::fs::write(&corrupt, &c).unwrap();
    refuse("corrupt", &corrupt, &[], "corrupt");
    let trunc = dir.path().join("trunc.snap");
    std::fs::write(&trunc, &bytes[..bytes.len() / 2]).unwrap();
    refuse("trunc", &trunc, &[], "truncated");
    let other = dir.path().join("other.snap");
    let mut o = bytes.clone();
    o[8] = 99;
    std::fs::write(&other, &o).unwrap();
    refuse("version", &other, &[], "version 99");
}

/// The stock guest kernel (from `scripts/build-guest.sh`'s cache), if built.
fn stock_guest() -> Option<(PathBuf, PathBuf)> {
    let root = std::env::var_os("COLO_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache"));
    let dir = root.join("guest");
    let (k, i) = (dir.join("vmlinuz"), dir.join("initramfs.cpio.gz"));
    (k.is_file() && i.is_file()).then_some((k, i))
}

/// A stock Linux kernel on 2 vCPUs (on a PVM host it runs emulated and stays in early boot,
/// with real MSR, LAPIC, IOAPIC and clock state) migrates and keeps running on the destination.
#[test]
fn migrate_a_stock_kernel_on_two_vcpus() {
    if skip() {
        return;
    }
    let Some((kernel, initrd)) = stock_guest() else {
        eprintln!("SKIPPED: no guest image in .cache/guest (run scripts/build-guest.sh)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let shape = ["--memory", "256M", "--cpus", "2"];
    let mut args = vec![
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 quiet",
    ];
    args.extend_from_slice(&shape);
    let mut src = Vmm::spawn(dir.path(), "src", &args);
    let mut sq = src.qmp();
    std::thread::sleep(Duration::from_secs(2));
    let port = free_port();
    let uri = format!("tcp:127.0.0.1:{port}");
    let mut dargs = vec!["--incoming", uri.as_str()];
    dargs.extend_from_slice(&shape);
    let mut dst = Vmm::spawn(dir.path(), "dst", &dargs);
    dst.wait_stderr("waiting for migration", Duration::from_secs(20));
    let mut dq = dst.qmp();
    sq.execute("migrate-set-parameters", json!({"max-bandwidth": 0}))
        .unwrap();
    sq.execute("migrate", json!({"uri": uri})).unwrap();
    let m = wait_migration(&mut sq, Duration::from_secs(120));
    assert_eq!(m["status"], "completed", "{m}\n{}", src.stderr());
    eprintln!(
        "stock kernel, 256 MiB, 2 vCPUs: {} ms total, {} ms downtime, {} bytes",
        m["total-time"], m["downtime"], m["ram"]["transferred"]
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(status(&mut dq)["status"], "running", "{}", dst.stderr());
    assert!(
        !dst.stderr().contains("vCPU "),
        "no KVM error on the destination: {}",
        dst.stderr()
    );
    dq.execute("quit", Value::Null).unwrap();
    assert_eq!(dst.wait(Duration::from_secs(20)), 0, "{}", dst.stderr());
    sq.execute("quit", Value::Null).unwrap();
    assert_eq!(src.wait(Duration::from_secs(20)), 0);
}
