//! The primary's chain with a consumer between `compare0` and `compare_out` that reads the one
//! and writes the other on a single thread, blocking (QEMU's colo-compare, our `comparer` and
//! `socat -u` all move frames this way). While its write into our indev waits, it reads
//! nothing from our outdev; so if the backend stopped reading the indev while a filter waits to
//! write the outdev, each side would wait for the other. The backend must keep reading: every
//! frame the guest sends reaches the netdev, in order, with no filter error.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use colo_proto::frame::FrameReader;
use serde_json::json;
use vhost_net_colo::testing::Options;

/// Far more than the socket buffers on the way hold (about 27 MB).
const FRAMES: usize = 3000;
const LEN: usize = 9000;

#[test]
fn a_relay_that_blocks_on_the_indev_before_reading_the_outdev_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (out, back) = (dir.path().join("c0.sock"), dir.path().join("co.sock"));
    let out_dev = format!("socket,id=compare0,path={},server=on", out.display());
    let back_dev = format!("socket,id=compare_out,path={},server=on", back.display());
    let (b, wire) = common::spawn_with_wire(
        dir.path(),
        "",
        &[
            "--chardev",
            &out_dev,
            "--chardev",
            &back_dev,
            "--object",
            "filter-redirector,id=redire0,netdev=s0,queue=rx,indev=compare_out",
            "--object",
            "filter-redirector,id=redire1,netdev=s0,queue=rx,outdev=compare0",
        ],
        true,
    );
    let mut from_backend = common::connect_chardev(&out);
    let mut to_backend = common::connect_chardev(&back);
    // The coupled relay: read what is there, write all of it, only then read again.
    let relay = std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from_backend.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if to_backend.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    });
    // The wire is read on a thread of its own, as fast as frames come.
    let (tx, wire_frames) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        wire.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut r = FrameReader::new(wire, false);
        for _ in 0..FRAMES {
            match r.read_frame() {
                Ok(Some(f)) => {
                    if tx.send(f.payload).is_err() {
                        return;
                    }
                }
                _ => return,
            }
        }
    });

    let mut fe = b.frontend(&Options::default());
    let frames: Vec<Vec<u8>> = (0..FRAMES)
        .map(|i| common::numbered_frame(i, LEN))
        .collect();
    for chunk in frames.chunks(32) {
        fe.send_batch(chunk).unwrap();
    }
    for (i, want) in frames.iter().enumerate() {
        let got = wire_frames
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("frame {i} of {FRAMES} did not reach the netdev: {e}"));
        assert!(got == *want, "frame {i} altered or out of order");
    }
    let filters = b.qmp().execute("query-filters", json!({})).unwrap();
    for f in filters.as_array().unwrap() {
        assert_eq!(f["counters"]["errors"], 0, "filter errors: {f}");
    }
    reader.join().unwrap();
    drop(b);
    relay.join().unwrap();
}
