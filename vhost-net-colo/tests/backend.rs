//! The vhost-user-net device through a real vhost-user socket, driven by the test frontend
//! (`vhost_net_colo::testing`: memfd memory, split virtqueues), with a `stream` netdev whose
//! other end is the test.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use colo_proto::frame::{Frame, FrameReader, write_frame};
use common::Backend;
use vhost_net_colo::backend::{VIRTIO_NET_F_MRG_RXBUF, VIRTIO_RING_F_EVENT_IDX};
use vhost_net_colo::testing::Options;

struct Setup {
    backend: Backend,
    /// The far end of the backend's stream netdev.
    wire: UnixStream,
    _dir: tempfile::TempDir,
}

fn start(extra: &[&str]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (backend, wire) = common::spawn_with_wire(dir.path(), "", extra, false);
    Setup {
        backend,
        wire,
        _dir: dir,
    }
}

const SIZES: [usize; 8] = [60, 61, 128, 500, 1514, 1000, 4000, 9014];

fn exchange(s: &Setup, o: &Options) {
    let mut fe = s.backend.frontend(o);
    // Guest -> netdev, in order.
    let out: Vec<Vec<u8>> = (0..200)
        .map(|i| common::numbered_frame(i, SIZES[i % SIZES.len()]))
        .collect();
    fe.send_batch(&out[..100]).unwrap();
    for f in &out[100..] {
        fe.send(f).unwrap();
    }
    let mut r = FrameReader::new(s.wire.try_clone().unwrap(), false);
    s.wire
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    for (i, want) in out.iter().enumerate() {
        let got = r.read_frame().unwrap().unwrap();
        assert_eq!(&got.payload, want, "guest frame {i}");
    }
    // Netdev -> guest, in order; large frames span several buffers with MRG_RXBUF.
    let mut w = s.wire.try_clone().unwrap();
    let inbound: Vec<Vec<u8>> = (0..200)
        .map(|i| common::numbered_frame(i + 7, SIZES[(i + 3) % SIZES.len()]))
        .collect();
    let mut max_bufs = 0;
    let mut next = 0;
    for f in &inbound {
        write_frame(&mut w, &Frame::ethernet(f.clone()), false).unwrap();
    }
    let mrg = fe.features() & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
    while next < inbound.len() {
        let want = &inbound[next];
        if !mrg && want.len() + 12 > o.rx_buf_size {
            next += 1; // dropped by the device: it does not fit one buffer
            continue;
        }
        let (got, nbufs) = fe
            .recv(Duration::from_secs(10))
            .expect("frame to the guest");
        assert_eq!(&got, want, "netdev frame {next}");
        max_bufs = max_bufs.max(nbufs);
        next += 1;
    }
    if mrg {
        let need = (9014usize + 12).div_ceil(o.rx_buf_size) as u16;
        assert_eq!(
            max_bufs, need,
            "a 9014-byte frame in {}-byte buffers",
            o.rx_buf_size
        );
    } else {
        assert_eq!(max_bufs, 1);
    }
}

#[test]
fn frames_cross_the_device_both_ways_in_order_with_merged_buffers_and_event_idx() {
    let s = start(&[]);
    exchange(
        &s,
        &Options {
            rx_buf_size: 1024,
            ..Options::default()
        },
    );
}

#[test]
fn frames_cross_the_device_without_event_idx_or_merged_buffers() {
    let s = start(&[]);
    let o = Options {
        event_idx: false,
        mrg_rxbuf: false,
        rx_buf_size: 2048,
        ..Options::default()
    };
    exchange(&s, &o);
}

#[test]
fn mac_and_link_status_are_in_config_space_and_features_are_offered() {
    let s = start(&["--mac", "52:54:00:ab:cd:ef"]);
    let mut fe = s.backend.frontend(&Options::default());
    let cfg = fe.config(8).unwrap();
    assert_eq!(&cfg[..6], &[0x52, 0x54, 0, 0xab, 0xcd, 0xef]);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]) & 1, 1, "link up");
    let f = fe.features();
    assert_ne!(f & (1 << VIRTIO_RING_F_EVENT_IDX), 0);
    assert_ne!(f & (1 << VIRTIO_NET_F_MRG_RXBUF), 0);
    for bit in [0, 1, 7, 8, 11, 12] {
        assert_ne!(
            f & (1 << bit),
            0,
            "checksum/TSO offload feature {bit} offered"
        );
    }
}

#[test]
fn serves_again_after_the_frontend_disconnects() {
    let s = start(&[]);
    for round in 0..3 {
        let mut fe = s.backend.frontend(&Options::default());
        let f = common::numbered_frame(round, 100);
        fe.send(&f).unwrap();
        let mut r = FrameReader::new(s.wire.try_clone().unwrap(), false);
        s.wire
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        assert_eq!(r.read_frame().unwrap().unwrap().payload, f, "round {round}");
        let mut w = s.wire.try_clone().unwrap();
        write_frame(
            &mut w,
            &Frame::ethernet(common::numbered_frame(round + 50, 200)),
            false,
        )
        .unwrap();
        let (got, _) = fe
            .recv(Duration::from_secs(10))
            .expect("frame to the guest");
        assert_eq!(
            got,
            common::numbered_frame(round + 50, 200),
            "round {round}"
        );
        drop(fe);
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn bad_command_lines_are_refused_with_a_message() {
    for rest in [
        &["--netdev", "bogus,id=x"][..],
        &["--netdev", "user,id=n0", "--mac", "zz"],
        &[
            "--netdev",
            "user,id=n0",
            "--object",
            "filter-mirror,id=m,netdev=n0",
        ],
        &[
            "--netdev",
            "user,id=n0",
            "--object",
            "filter-rewriter,id=r,netdev=other",
        ],
        &["--netdev", "user,id=n0,hostfwd=tcp:1.2.3.4"],
        &["--netdev", "stream,id=s"],
    ] {
        let args = [&["--socket", "/tmp/x.sock"][..], rest].concat();
        let out = Command::new(common::BIN).args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("Error"), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// With EVENT_IDX, a frame the device puts in the receive ring must come with an interrupt
/// when the driver's `used_event` asks for one (the test frontend asks for one at every
/// completion). A device that publishes used entries without telling the guest leaves a real
/// guest deaf until some other interrupt happens.
#[test]
fn receive_interrupts_are_sent_with_event_idx() {
    let s = start(&[]);
    let mut fe = s.backend.frontend(&Options::default());
    assert_ne!(
        fe.features() & (1 << VIRTIO_RING_F_EVENT_IDX),
        0,
        "EVENT_IDX negotiated"
    );
    let _ = fe.take_rx_interrupts();
    let mut w = s.wire.try_clone().unwrap();
    for i in 0..5 {
        let f = common::numbered_frame(i, 200);
        write_frame(&mut w, &Frame::ethernet(f.clone()), false).unwrap();
        // Wait for the interrupt before taking the frame, as a driver asleep would: taking it
        // first moves `used_event` on, and a device that reads it after that rightly stays
        // quiet (the race made this test fail now and then under load).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut irqs = fe.take_rx_interrupts();
        while irqs == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
            irqs = fe.take_rx_interrupts();
        }
        assert!(irqs > 0, "frame {i}: no receive interrupt with EVENT_IDX");
        let (got, _) = fe
            .recv(Duration::from_secs(10))
            .expect("frame reaches the guest");
        assert_eq!(got, f);
    }
}
