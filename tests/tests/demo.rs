//! The README's main job, `scripts/demo.sh`, runs to its end: the guest under QEMU TCG with its
//! network in vhost-net-colo and its disk in a primary vhost-blk-colo replicating over NBD to a
//! secondary (the seed's disk commands), the services answer, and after the checkpoint's disk
//! step the secondary's base equals the primary's disk; the guest then runs on and writes again.
//!
//! Like `guest_boot.rs` this test does not skip without QEMU or the guest (CI must run it);
//! `COLO_SKIP_TCG=1` skips it loudly on a machine that cannot run TCG guests.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::process::Command;
use std::time::{Duration, Instant};

use colo_tests::guest::ensure_guest_image;
use colo_tests::{ChildGuard, TestDir, workspace_root};

#[test]
fn demo_runs_the_guest_on_our_backends_and_the_checkpointed_disks_match() {
    if std::env::var_os("COLO_SKIP_TCG").is_some() {
        eprintln!("SKIPPED: COLO_SKIP_TCG is set (the demo needs a TCG guest)");
        return;
    }
    ensure_guest_image().unwrap();
    let dir = TestDir::new().unwrap();
    let root = workspace_root();
    // The demo's own temporary directory goes inside ours, so it is removed with it even if
    // the demo is killed.
    let mut demo = ChildGuard::spawn(
        "demo",
        Command::new("bash")
            .arg(root.join("scripts/demo.sh"))
            .args(["--timeout", "280"])
            .env("TMPDIR", dir.path())
            .current_dir(&root),
        dir.path(),
    )
    .unwrap();
    let status = demo
        .wait_until(Instant::now() + Duration::from_secs(330))
        .unwrap();
    let out = demo.stdout_text();
    assert!(
        status.success(),
        "demo failed ({status}):\n{}",
        demo.log_tail(40)
    );
    for want in [
        "demo: guest READY",
        "<h1>colo guest</h1>",
        "demo: echo: hello colo",
        "REC 1 demo record",
        "the secondary's base equals the primary's disk byte for byte",
        "echo: still here",
        "REC 2 after the checkpoint",
        "\"forwarded-writes\": 2",
        "\"secondary-connected\": true",
    ] {
        assert!(out.contains(want), "demo output lacks {want:?}:\n{out}");
    }
}
