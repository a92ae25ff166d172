//! A frontend that connects and leaves again and again must not cost the backend descriptors:
//! vhost-user-backend 0.24 leaks each worker thread's exit-event consumer per connection, and
//! `vhost_user::serve` closes those (found by the `vhost_user_msgs` fuzz target, which ran out
//! of descriptors after ~10 000 sessions). One test per process: it counts this process's
//! descriptors.

#![allow(clippy::unwrap_used)]

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use vhost_user_guards::testing::connect;

use vhost_blk_colo::{
    block::mem::MemNode,
    vhost_user::{self, BlkConfig, VhostUserBlk},
};

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
    vhost_user_guards::testing::check_sessions_leak_no_eventfds(&sock, 25, || {
        // The next accept happens only after the last session's teardown.
        stop.store(true, Ordering::Relaxed);
        drop(connect(&sock));
        server.join().unwrap().unwrap();
    });
}
