//! The vhost-user control path of vhost-net-colo as a frontend drives it: the fuzz input is a
//! sequence of vhost-user messages (feature negotiation, SET_OWNER, memory tables and regions
//! over real memfds, ring set-up with bad indices and addresses, kick/call/err eventfds,
//! GET/SET_CONFIG, the dirty log, SEND_RARP, SET_BACKEND_REQ_FD, inflight and device-state
//! requests, GET_QUEUE_NUM, SET/GET_STATUS, unknown requests; sizes that lie, cut bodies,
//! wrong descriptor counts, the connection closed mid-message), sent to `App::serve` (the
//! binary's serving loop: our relay `shim::relay_with` in front of `VhostUserDaemon` over a
//! fresh `NetBackend`) through a Unix socket. The app is made once, as the binary makes it,
//! with a `dgram` netdev on Unix sockets in a private directory (no privileges needed), and
//! serves one connection per input. See vhost-blk-colo's `common/vu_msgs.rs`.
//!
//! Checks: no panic; the backend answers the first GET_FEATURES; while every header told the
//! truth, GET_FEATURES is answered; a transmit ring set up validly completes a frame and,
//! with the dirty log on, marks the used ring's page; after the frontend closes, `serve`
//! returns within 20 s.
#![no_main]

#[path = "../../../vhost-blk-colo/fuzz/fuzz_targets/common/vu_msgs.rs"]
mod vu_msgs;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock, mpsc};

use libfuzzer_sys::fuzz_target;
use vhost_net_colo::app::App;

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// A transmit chain: a zero virtio-net header (12 bytes with VERSION_1) and a 60-byte frame.
fn probe_bufs(_features: u64) -> Vec<(Vec<u8>, bool)> {
    let mut b = vec![0u8; 12];
    let mut frame = vec![0xffu8; 6];
    frame.extend_from_slice(&MAC);
    frame.extend_from_slice(&[0x08, 0x06]);
    frame.resize(60, 0);
    b.extend(frame);
    vec![(b, false)]
}

fn probe_check(_w: &[Vec<u8>]) -> Result<(), String> {
    Ok(())
}

struct Fixture {
    app: Arc<App>,
    socket: PathBuf,
    _dir: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("vu-fuzz-net-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let netdev = format!(
            "dgram,id=d0,local.type=unix,local.path={},remote.type=unix,remote.path={}",
            dir.join("local").display(),
            dir.join("remote").display()
        );
        let app = match App::new(&netdev, &[]) {
            Ok(a) => a,
            Err(e) => panic!("App::new({netdev}): {e}"),
        };
        Fixture {
            app,
            socket: dir.join("vu.sock"),
            _dir: dir,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let target = vu_msgs::Target {
        num_queues: 2,
        max_queue_size: 1024,
        probe_queue: 1,
        probe_bufs,
        probe_check,
        // The relay (`shim::check_log_base`) refuses such logs.
        short_log_guarded: true,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    {
        let (app, sock, stop) = (f.app.clone(), f.socket.clone(), stop.clone());
        std::thread::spawn(move || {
            let r = app
                .serve(&sock.to_string_lossy(), MAC, &stop)
                .map_err(|e| e.to_string());
            let _ = tx.send(r);
        });
    }
    vu_msgs::session(data, &f.socket, &target, &stop);
    let r = vu_msgs::join_within(&rx, "vhost-net-colo serve");
    assert!(r.is_ok(), "serve failed: {r:?}");
    let _ = std::fs::remove_file(&f.socket);
    vu_msgs::fd_report(data);
});
