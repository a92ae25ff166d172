//! A SET_LOG_BASE whose log is longer than the memfd behind it: vhost-user-backend 0.24 maps
//! it anyway and the queue thread dies of SIGBUS marking the first page whose bit lies past the
//! file's end (found by the `vhost_user_msgs` fuzz target). `vhost_user::serve` relays each
//! session through `vhost_user_guards::relay`, which ends such a session before the daemon
//! sees the log; the backend lives on and serves the next frontend. Without the relay this
//! test dies of SIGBUS at the read after the short log (its own process, hence its own file).

#![allow(clippy::unwrap_used)]

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use vhost_blk_colo::{
    block::mem::MemNode,
    testing::{FrontendOptions, TestFrontend},
    vhost_user::{self, BlkConfig, VIRTIO_BLK_S_OK, VhostUserBlk},
};
use vhost_user_guards::testing::connect;

#[test]
fn a_short_dirty_log_ends_the_session_and_the_next_frontend_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("blk.sock");
    let dev = Arc::new(VhostUserBlk::new(
        Arc::new(MemNode::new(1 << 20)),
        BlkConfig::default(),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let (sock, stop) = (sock.clone(), stop.clone());
        std::thread::spawn(move || vhost_user::serve(&sock, dev, &stop))
    };
    let opts = FrontendOptions::default();

    let mut fe = TestFrontend::connect(&sock, &opts).unwrap();
    assert_eq!(fe.write(0, 8, &[0x5a; 4096]).unwrap(), VIRTIO_BLK_S_OK);
    // A log covering all of guest memory over an empty memfd: every bit lies past its end.
    let refused = fe.start_short_dirty_log(0);
    // Without the relay the log is taken, and this read's marking is SIGBUS.
    let read = refused.is_ok().then(|| fe.read(0, 8, 4096));
    assert!(
        refused.is_err(),
        "a dirty log over an empty memfd was accepted (read: {read:?})"
    );
    // The session is over.
    assert!(fe.config(60).is_err());
    drop(fe);

    // The next frontend is served, and a log that fits is taken and marked.
    let mut fe = TestFrontend::connect(&sock, &opts).unwrap();
    let (st, data) = fe.read(0, 8, 4096).unwrap();
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert!(data.iter().all(|&b| b == 0x5a));
    fe.start_dirty_log().unwrap();
    let _ = fe.take_dirty_pages();
    let slot = fe
        .submit(
            0,
            vhost_user::VIRTIO_BLK_T_IN,
            8,
            vhost_blk_colo::testing::Data::In(4096),
        )
        .unwrap();
    let done = fe.wait(0, std::time::Duration::from_secs(10)).unwrap();
    assert_eq!(done[0].status, VIRTIO_BLK_S_OK);
    let page = fe.slot_data_gpa(0, slot) / 4096;
    assert!(
        fe.take_dirty_pages().contains(&page),
        "page {page} not marked"
    );
    drop(fe);

    // The next accept ends the serving loop.
    stop.store(true, Ordering::Relaxed);
    drop(connect(&sock));
    server.join().unwrap().unwrap();
}
