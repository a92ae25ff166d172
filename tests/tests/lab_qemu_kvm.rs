//! The KVM lab's proof and baseline: QEMU with `-accel kvm` (a real hardware-style KVM, kvm_amd
//! in the lab's L1 on a PVM host, or the host's own KVM) boots the stock test guest of
//! `scripts/build-guest.sh` to `COLO-GUEST-READY`, and the guest answers HTTP through QEMU's
//! user network. vmm-min's lab tests are compared with the timings this test prints.
//!
//! On a host whose /dev/kvm is not real (PVM) the test re-runs itself inside
//! `scripts/kvm-lab.sh` (see `colo_tests::lab`); it skips loudly when neither works.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const READY: &str = "COLO-GUEST-READY";
/// L2 boot under nested KVM takes 8-20 s (kvm-lab.md); generous for a loaded host.
const BOOT_DEADLINE: Duration = Duration::from_secs(150);
const IO_TIMEOUT: Duration = Duration::from_secs(30);

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The guest (kernel, initramfs), built by the idempotent script when missing or stale. Inside
/// the lab, writes to the cache would be thrown away, so there the files must already exist
/// (the outer run builds them before entering the lab).
fn ensure_guest() -> Result<(PathBuf, PathBuf), String> {
    let script = workspace_root().join("scripts/build-guest.sh");
    if !script.is_file() {
        return Err(format!("{} is missing", script.display()));
    }
    let dir = Command::new(&script)
        .arg("--print-dir")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    let dir = PathBuf::from(String::from_utf8_lossy(&dir.stdout).trim());
    let (k, i) = (dir.join("vmlinuz"), dir.join("initramfs.cpio.gz"));
    if std::env::var_os("KVM_LAB").is_none() {
        let t = Instant::now();
        let out = Command::new(&script)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} failed ({}):\n{}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        eprintln!(
            "lab_qemu_kvm: build-guest.sh took {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    if k.is_file() && i.is_file() {
        Ok((k, i))
    } else {
        Err(format!("no guest in {}", dir.display()))
    }
}

/// QEMU, killed by PID and reaped on drop (also when the test panics).
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn http_get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: guest\r\n\r\n").unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    String::from_utf8_lossy(&resp).into_owned()
}

fn real_kvm_module() -> &'static str {
    if Path::new("/sys/module/kvm_amd").exists() {
        "kvm_amd"
    } else if Path::new("/sys/module/kvm_intel").exists() {
        "kvm_intel"
    } else {
        "none"
    }
}

#[test]
fn qemu_kvm_boots_stock_guest_and_serves_http() {
    let t0 = Instant::now();
    // The guest is built on the host, before entering the lab.
    let guest = ensure_guest();
    if colo_tests::lab::needs_real_kvm("qemu_kvm_boots_stock_guest_and_serves_http") {
        return;
    }
    let (kernel, initrd) = match guest {
        Ok(g) => g,
        Err(e) => panic!("the stock guest is not available: {e}"),
    };
    // Where we are: a real KVM, not PVM.
    assert!(Path::new("/dev/kvm").exists(), "no /dev/kvm");
    assert!(
        !Path::new("/sys/module/kvm_pvm").exists(),
        "/dev/kvm is PVM here; the lab should have been used"
    );
    let module = real_kvm_module();
    assert_ne!(module, "none", "neither kvm_amd nor kvm_intel is loaded");

    // QEMU's files live in the local temporary directory (in the lab: L1 RAM; a 9p share is
    // slower); the serial log is copied to the kept output directory at the end.
    let dir = tempfile::tempdir().unwrap();
    let serial = dir.path().join("serial.log");
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };

    let t_qemu = Instant::now();
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-M", "microvm,rtc=on", "-accel", "kvm", "-cpu", "host"])
        .args(["-m", "256", "-smp", "1", "-nodefaults", "-no-user-config"])
        .args(["-display", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 quiet pci=noearly 8250.nr_uarts=1"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-netdev")
        .arg(format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:80"))
        .args(["-device", "virtio-net-device,netdev=n0"])
        .arg("-drive")
        .arg(format!("if=none,id=d0,file={},format=raw", disk.display()))
        .args(["-device", "virtio-blk-device,drive=d0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut qemu = Qemu(cmd.spawn().expect("start qemu-system-x86_64"));

    // Wait for READY in the serial log, or QEMU's death.
    let deadline = t_qemu + BOOT_DEADLINE;
    let ready_line = loop {
        let log = std::fs::read_to_string(&serial).unwrap_or_default();
        // Only a complete line: QEMU may have written part of it.
        if let Some(l) = log
            .split_inclusive('\n')
            .find(|l| l.contains(READY) && l.ends_with('\n'))
        {
            break l.trim().to_string();
        }
        if let Some(st) = qemu.0.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = qemu.0.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("QEMU exited ({st}) before {READY}:\n{err}\nserial:\n{log}");
        }
        assert!(
            Instant::now() < deadline,
            "no {READY} after {BOOT_DEADLINE:?}; serial:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let boot = t_qemu.elapsed();
    let uptime = ready_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("?")
        .to_string();

    let t_http = Instant::now();
    let page = http_get(port, "/");
    let http = t_http.elapsed();
    assert!(
        page.starts_with("HTTP/1.0 200") || page.starts_with("HTTP/1.1 200"),
        "bad response:\n{page}"
    );
    assert!(
        page.contains("<h1>colo guest</h1><p>This page is the same on every boot.</p>"),
        "unexpected page:\n{page}"
    );
    let up = http_get(port, "/cgi-bin/uptime");
    let up_val: f64 = up
        .rsplit("\r\n\r\n")
        .next()
        .and_then(|b| b.trim().parse().ok())
        .unwrap_or_else(|| panic!("no uptime in:\n{up}"));
    assert!(up_val > 0.0, "uptime {up_val}");

    let log = std::fs::read_to_string(&serial).unwrap_or_default();
    drop(qemu);
    let kept = colo_tests::lab::out_dir().join("lab_qemu_kvm.serial.log");
    let _ = std::fs::write(&kept, &log);
    eprintln!(
        "lab_qemu_kvm: {module}: QEMU start to {READY} {:.1} s (guest uptime {uptime} s), \
         HTTP GET {:.0} ms, whole test (this side) {:.1} s; serial log: {}",
        boot.as_secs_f64(),
        http.as_secs_f64() * 1000.0,
        t0.elapsed().as_secs_f64(),
        kept.display()
    );
    assert!(
        log.contains(READY),
        "serial log lost the READY line:\n{log}"
    );
}
