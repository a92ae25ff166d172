//! `scripts/kvm-lab.sh` itself: inside the lab `/dev/kvm` is a real KVM with nested paging, the
//! command's stdout and stderr come back separately and its exit status is returned; a hung
//! command is ended at the deadline with status 124 and nothing is left behind.
//!
//! These run on any host with QEMU (the lab is QEMU TCG); they skip loudly when the lab cannot
//! run (no QEMU, no kernel package obtainable).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

fn runner(test: &str) -> Option<PathBuf> {
    match colo_tests::lab::runner() {
        Ok(p) => Some(p),
        Err(reason) => {
            eprintln!("SKIPPED: {test}: the KVM lab is unavailable: {reason}");
            None
        }
    }
}

#[test]
fn lab_has_real_kvm_and_returns_status_and_streams() {
    let test = "lab_has_real_kvm_and_returns_status_and_streams";
    let Some(script) = runner(test) else { return };
    let _lock = colo_tests::lab::lock(test).unwrap();
    let t = Instant::now();
    let out = Command::new(&script)
        .args(["-t", "300", "--", "sh", "-c"])
        .arg(
            "ls -l /dev/kvm; dmesg | grep -i svm; echo \"lab=$KVM_LAB cwd=$(pwd) \
             marker=$LAB_TEST_MARKER\"; echo to-stderr >&2; exit 7",
        )
        .env("LAB_TEST_MARKER", "m-42")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let secs = t.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{test}: {secs:.1} s\n--- stdout\n{stdout}--- stderr\n{stderr}");
    assert_eq!(out.status.code(), Some(7), "exit status; stderr:\n{stderr}");
    assert!(
        stdout.contains("10, 232") && stdout.contains("/dev/kvm"),
        "{stdout}"
    );
    assert!(
        stdout.contains("SVM: kvm: Nested Paging enabled"),
        "{stdout}"
    );
    let cwd = format!("lab=1 cwd={} marker=m-42", env!("CARGO_MANIFEST_DIR"));
    assert!(
        stdout.contains(&cwd),
        "environment/cwd not passed: {stdout}"
    );
    assert!(!stdout.contains("to-stderr"), "stderr leaked into stdout");
    assert!(stderr.contains("to-stderr"), "{stderr}");
    assert!(!stdout.contains('\r'), "raw serial: no CR added");
}

#[test]
fn lab_ends_a_hung_command_at_the_deadline() {
    let test = "lab_ends_a_hung_command_at_the_deadline";
    let Some(script) = runner(test) else { return };
    let _lock = colo_tests::lab::lock(test).unwrap();
    let share = tempfile::tempdir().unwrap();
    let t = Instant::now();
    // The command writes its L1 PID to a -w share, then hangs.
    let out = Command::new(&script)
        .args(["-t", "45", "-w"])
        .arg(share.path())
        .args(["--", "sh", "-c"])
        .arg(format!(
            "echo started; echo $$ > {}/pid; sleep 10000",
            share.path().display()
        ))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let secs = t.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{test}: {secs:.1} s; stderr:\n{stderr}");
    assert_eq!(out.status.code(), Some(124), "stderr:\n{stderr}");
    assert!(secs < 45.0 + 15.0, "deadline overshot: {secs:.1} s");
    assert!(stderr.contains("deadline of 45 s reached"), "{stderr}");
    // QEMU is gone (killed by PID and reaped).
    let pid: u32 = stderr
        .split("QEMU (PID ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no QEMU PID in:\n{stderr}"));
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert!(
        !String::from_utf8_lossy(&cmdline).contains("kvm-lab."),
        "QEMU {pid} still running"
    );
    // It really ran (and the -w share was written through) before it was ended.
    assert!(stdout.contains("started"), "{stdout}");
    assert!(
        share.path().join("pid").is_file(),
        "nothing written to the -w share"
    );
}
