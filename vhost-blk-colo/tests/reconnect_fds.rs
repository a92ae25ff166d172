//! A frontend that connects and leaves again and again must not cost the backend descriptors:
//! vhost-user-backend 0.24 leaks each worker thread's exit-event consumer per connection, and
//! `vhost_user::serve` closes those (found by the `vhost_user_msgs` fuzz target, which ran out
//! of descriptors after ~10 000 sessions). One test per process: it counts this process's
//! descriptors.

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

use vhost_blk_colo::{
    block::mem::MemNode,
    vhost_user::{self, BlkConfig, VhostUserBlk},
};

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
            Err(e) if Instant::now() < end => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("connecting to {}: {e}", sock.display()),
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
    let sock = dir.path().join("blk.sock");
    let cfg = BlkConfig {
        num_queues: 4,
        workers: 1,
        ..BlkConfig::default()
    };
    let dev = Arc::new(VhostUserBlk::new(Arc::new(MemNode::new(1 << 20)), cfg));
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let (sock, stop) = (sock.clone(), stop.clone());
        std::thread::spawn(move || vhost_user::serve(&sock, dev, &stop))
    };
    // The first session settles whatever is created once.
    session(&sock);
    let before = eventfds();
    let sessions = 25;
    for _ in 0..sessions {
        session(&sock);
    }
    // Let the last session's teardown finish: the next accept only happens after it.
    stop.store(true, Ordering::Relaxed);
    drop(connect(&sock));
    server.join().unwrap().unwrap();
    let after = eventfds();
    // Without the fix: about 4 more per session (one per queue thread).
    assert!(
        after < before + sessions,
        "{} eventfds left open by {sessions} sessions ({before} before, {after} after)",
        after.saturating_sub(before)
    );
}
