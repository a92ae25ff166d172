//! A frontend that connects and leaves again and again must not cost the backend descriptors:
//! vhost-user-backend 0.24 leaks each session's exit-event consumer, and `backend::serve`
//! closes it (found by the `vhost_user_msgs` fuzz target). One test per process: it counts
//! this process's descriptors.

#![allow(clippy::unwrap_used)]

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use vhost_user_guards::testing::connect;

use vhost_net_colo::app::App;

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
    vhost_user_guards::testing::check_sessions_leak_no_eventfds(&sock, 25, || {
        // The next accept happens only after the last session's teardown.
        stop.store(true, Ordering::Relaxed);
        drop(connect(&sock));
        server.join().unwrap().unwrap();
    });
}
