//! Interrupt moderation (`COLO_NET_IRQ_US`, `COLO_NET_IRQ_BULK`): while bulk data flows, a
//! queue's interrupts are held back to one per window, but never lost; small frames (request
//! and response traffic) interrupt at once. One test per binary: the window is set in this
//! process's environment, which the backend inherits.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::time::{Duration, Instant};

use colo_proto::frame::{Frame, FrameReader, write_frame};
use vhost_net_colo::backend::VIRTIO_RING_F_EVENT_IDX;
use vhost_net_colo::testing::{NetFrontend, Options};

/// Waits for the next receive interrupt; how long it took.
fn wait_irq(fe: &mut NetFrontend, what: &str) -> Duration {
    let t0 = Instant::now();
    while fe.take_rx_interrupts() == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{what}: no interrupt"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    t0.elapsed()
}

#[test]
fn bulk_interrupts_are_held_back_within_the_window_and_never_lost() {
    const WINDOW: Duration = Duration::from_millis(300);
    // SAFETY: the only test of this binary; no other thread reads the environment now.
    unsafe {
        std::env::set_var("COLO_NET_IRQ_US", WINDOW.as_micros().to_string());
        std::env::set_var("COLO_NET_IRQ_BULK", "16384");
        std::env::set_var("COLO_NET_KICK_US", "2000");
    }
    let dir = tempfile::tempdir().unwrap();
    let (backend, mut wire) = common::spawn_with_wire(dir.path(), "", &[], false);
    let mut fe = backend.frontend(&Options::default());
    assert_ne!(fe.features() & (1 << VIRTIO_RING_F_EVENT_IDX), 0);
    let _ = fe.take_rx_interrupts();
    let mut send = |i: usize, len: usize| {
        let f = common::numbered_frame(i, len);
        write_frame(&mut wire, &Frame::ethernet(f.clone()), false).unwrap();
        f
    };
    let check = |fe: &mut NetFrontend, want: Vec<u8>| {
        let (got, _) = fe
            .recv(Duration::from_secs(10))
            .expect("frame reaches the guest");
        assert_eq!(got, want);
    };
    // A first bulk frame after a quiet time interrupts at once.
    let f = send(0, 20000);
    let t = wait_irq(&mut fe, "first bulk frame");
    assert!(t < WINDOW / 2, "first bulk frame's interrupt took {t:?}");
    check(&mut fe, f);
    // The next bulk frame within the window waits for the window's end, but its interrupt
    // comes (the driver sleeps until it does).
    let f = send(1, 20000);
    let t = wait_irq(&mut fe, "second bulk frame");
    assert!(
        t > WINDOW / 3,
        "second bulk frame's interrupt came after {t:?}: not held back"
    );
    check(&mut fe, f);
    // A small frame right after is not held back (request/response latency).
    let f = send(2, 200);
    let t = wait_irq(&mut fe, "small frame");
    assert!(t < WINDOW / 2, "small frame's interrupt took {t:?}");
    check(&mut fe, f);
    // Transmit with kick moderation (COLO_NET_KICK_US): after bulk passes the worker looks at
    // the ring on its timer; every frame leaves, in order, small ones after bulk ones too.
    let out: Vec<Vec<u8>> = (0..60)
        .map(|i| common::numbered_frame(100 + i, if i % 3 == 2 { 300 } else { 30000 }))
        .collect();
    fe.send_batch(&out[..20]).unwrap();
    for f in &out[20..] {
        fe.send(f).unwrap();
    }
    wire.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut r = FrameReader::new(wire.try_clone().unwrap(), false);
    for (i, want) in out.iter().enumerate() {
        let got = r.read_frame().unwrap().unwrap();
        assert_eq!(&got.payload, want, "guest frame {i}");
    }
}
