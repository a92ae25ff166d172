//! The vhost-user control path of vhost-blk-colo as a frontend drives it: the fuzz input is a
//! sequence of vhost-user messages (feature negotiation, SET_OWNER, memory tables and regions
//! over real memfds, ring set-up with bad indices and addresses, kick/call/err eventfds,
//! GET/SET_CONFIG, the dirty log, inflight and device-state requests, GET_QUEUE_NUM,
//! SET/GET_STATUS, unknown requests; sizes that lie, cut bodies, wrong descriptor counts, the
//! connection closed mid-message), sent to `vhost_user::serve` (the binary's serving loop:
//! `VhostUserDaemon` over our `VhostUserBlk`, here over a 64 KiB RAM disk with two queues)
//! through a Unix socket. See `common/vu_msgs.rs`.
//!
//! Checks: no panic; the backend answers the first GET_FEATURES; while every header told the
//! truth, GET_FEATURES is answered; a ring set up validly serves a GET_ID request (status OK,
//! the serial) and, with the dirty log on, marks the used ring's page; after the frontend
//! closes, `serve` returns within 20 s.
#![no_main]

#[path = "common/vu_msgs.rs"]
mod vu_msgs;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock, mpsc};

use libfuzzer_sys::fuzz_target;
use vhost_blk_colo::block::mem::MemNode;
use vhost_blk_colo::vhost_user::{
    BlkConfig, ID_BYTES, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_GET_ID, VhostUserBlk, serve,
};

const SERIAL: &str = "vu-fuzz-serial";

fn probe_bufs(_features: u64) -> Vec<(Vec<u8>, bool)> {
    let mut hdr = VIRTIO_BLK_T_GET_ID.to_le_bytes().to_vec();
    hdr.extend_from_slice(&[0; 12]);
    vec![(hdr, false), (vec![0xee; ID_BYTES], true), (vec![0xee], true)]
}

fn probe_check(w: &[Vec<u8>]) -> Result<(), String> {
    let (Some(id), Some(status)) = (w.first(), w.get(1)) else {
        return Err("buffers missing".into());
    };
    if status.first() != Some(&VIRTIO_BLK_S_OK) {
        return Err(format!("GET_ID status {status:?}"));
    }
    let mut want = SERIAL.as_bytes().to_vec();
    want.resize(ID_BYTES, 0);
    if *id != want {
        return Err(format!("GET_ID returned {id:?}"));
    }
    Ok(())
}

fn socket_path() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        std::env::temp_dir().join(format!("vu-fuzz-blk-{}.sock", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let cfg = BlkConfig {
        num_queues: 2,
        queue_size: 256,
        read_only: false,
        serial: SERIAL.into(),
        blk_size: 512,
        workers: 2,
        max_inflight: 64,
    };
    let dev = Arc::new(VhostUserBlk::new(Arc::new(MemNode::new(64 << 10)), cfg));
    let target = vu_msgs::Target {
        num_queues: 2,
        max_queue_size: 256,
        probe_queue: 0,
        probe_bufs,
        probe_check,
        // `serve` relays sessions through vhost_user_guards::relay, which refuses them.
        short_log_guarded: true,
    };
    let sock = socket_path().clone();
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    {
        let (sock, stop, dev) = (sock.clone(), stop.clone(), dev.clone());
        std::thread::spawn(move || {
            let r = serve(&sock, dev, &stop).map_err(|e| e.to_string());
            let _ = tx.send(r);
        });
    }
    vu_msgs::session(data, &sock, &target, &stop);
    let r = vu_msgs::join_within(&rx, "vhost-blk-colo serve");
    assert!(r.is_ok(), "serve failed: {r:?}");
    let _ = std::fs::remove_file(&sock);
    drop(dev);
    vu_msgs::fd_report(data);
});
