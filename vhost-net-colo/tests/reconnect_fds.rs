//! A frontend that connects and leaves again and again must not cost the backend descriptors:
//! vhost-user-backend 0.24 leaks each session's exit-event consumer, and `backend::serve`
//! closes it (found by the `vhost_user_msgs` fuzz target). One test per process: it counts
//! this process's descriptors.

#![allow(clippy::unwrap_used)]

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use vhost_net_colo::app::App;

/// Descriptors open in this process that are eventfds.
fn eventfds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter(|p| p.to_string_lossy().contains("eventfd"))
        .count()
}

fn connect(sock: &Path) -> UnixStream {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        match UnixStream::connect(sock) {
            Ok(s) => return s,
            Err(e) => {
                assert!(
                    Instant::now() < end,
                    "connecting to {}: {e}",
                    sock.display()
                );
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

/// One short session: GET_FEATURES and its answer, then the frontend leaves.
fn session(sock: &Path) {
    let mut s = connect(sock);
    let mut hdr = Vec::new();
    hdr.extend_from_slice(&1u32.to_le_bytes()); // GET_FEATURES
    hdr.extend_from_slice(&1u32.to_le_bytes()); // version 1
    hdr.extend_from_slice(&0u32.to_le_bytes());
    s.write_all(&hdr).unwrap();
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(reply[0], 1, "reply to GET_FEATURES");
}

#[test]
fn reconnecting_frontends_leak_no_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let netdev = format!(
        "dgram,id=d0,local.type=unix,local.path={},remote.type=unix,remote.path={}",
        dir.path().join("local").display(),
        dir.path().join("remote").display()
    );
    let app = App::new(&netdev, &[]).unwrap();
    let sock = dir.path().join("net.sock");
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let (app, sock, stop) = (app.clone(), sock.clone(), stop.clone());
        std::thread::spawn(move || {
            app.serve(
                &sock.to_string_lossy(),
                [0x52, 0x54, 0, 0x12, 0x34, 0x56],
                &stop,
            )
        })
    };
    // The first session settles whatever is created once.
    session(&sock);
    let before = eventfds();
    let sessions = 25;
    for _ in 0..sessions {
        session(&sock);
    }
    // The last session is torn down before the next accept; this one ends the loop.
    stop.store(true, Ordering::Relaxed);
    drop(connect(&sock));
    server.join().unwrap().unwrap();
    let after = eventfds();
    // Without the fix: one more per session.
    assert!(
        after < before + sessions / 2,
        "{} eventfds left open by {sessions} sessions ({before} before, {after} after)",
        after.saturating_sub(before)
    );
}
