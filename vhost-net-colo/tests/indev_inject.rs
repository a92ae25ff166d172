//! Frames a `filter-redirector` reads from its indev and sends on to the netdev leave in
//! order, byte for byte, and are written after the chain's lock is let go: a netdev whose peer
//! has stopped reading holds up the indev, not the other direction (netdev to guest through
//! the mirror).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::io::Write;
use std::time::Duration;

use colo_proto::frame::{Frame, FrameReader, encode};
use vhost_net_colo::testing::Options;

/// More than the socket buffers between the backend and the wire hold, so the backend's
/// netdev write blocks until the test reads the wire.
const STALL_FRAMES: usize = 2000;
const STALL_LEN: usize = 9000;

#[test]
fn indev_frames_to_a_stalled_netdev_do_not_hold_up_the_mirror_and_arrive_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (mirror, back) = (dir.path().join("m.sock"), dir.path().join("co.sock"));
    let m_dev = format!("socket,id=mirror0,path={},server=on", mirror.display());
    let co_dev = format!("socket,id=compare_out,path={},server=on", back.display());
    let (b, wire) = common::spawn_with_wire(
        dir.path(),
        "",
        &[
            "--chardev",
            &m_dev,
            "--chardev",
            &co_dev,
            "--object",
            "filter-mirror,id=m0,netdev=s0,queue=tx,outdev=mirror0",
            "--object",
            "filter-redirector,id=redire0,netdev=s0,queue=rx,indev=compare_out",
        ],
        false,
    );
    let mirrored = common::records(common::connect_chardev(&mirror));
    let mut fe = b.frontend(&Options::default());

    // Towards the netdev through the indev: far more than the wire's buffers take while the
    // test does not read it (written on a thread: the indev socket fills up too).
    let injected: Vec<Vec<u8>> = (0..STALL_FRAMES)
        .map(|i| {
            let mut f = common::numbered_frame(i, STALL_LEN);
            f[14..18].copy_from_slice(&(i as u32).to_be_bytes());
            f
        })
        .collect();
    let mut bytes = Vec::new();
    for f in &injected {
        encode(&Frame::ethernet(f.clone()), false, &mut bytes).unwrap();
    }
    let indev = common::connect_chardev(&back);
    let feeder = std::thread::spawn(move || (&indev).write_all(&bytes).map(|()| indev));
    // Let the backend fill the wire's buffers and block in its write.
    std::thread::sleep(Duration::from_millis(500));

    // The other direction meanwhile: frames from the netdev reach the mirror and the guest.
    let mut wire_w = wire.try_clone().unwrap();
    for i in 0..5 {
        let f = common::numbered_frame(10_000 + i, 100);
        let mut rec = Vec::new();
        encode(&Frame::ethernet(f.clone()), false, &mut rec).unwrap();
        wire_w.write_all(&rec).unwrap();
        let got = mirrored
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|e| {
                panic!("netdev frame {i} not mirrored while the netdev write is stalled: {e}")
            });
        assert_eq!(got, f, "netdev frame {i} at mirror0");
        let (g, _) = fe
            .recv(Duration::from_secs(5))
            .unwrap_or_else(|| panic!("netdev frame {i} did not reach the guest"));
        assert_eq!(g, f, "netdev frame {i} at the guest");
    }

    // Now read the wire: every injected frame, in order, byte for byte.
    wire.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut r = FrameReader::new(wire, false);
    for (i, want) in injected.iter().enumerate() {
        let f = r
            .read_frame()
            .unwrap_or_else(|e| panic!("wire frame {i}: {e}"))
            .unwrap_or_else(|| panic!("wire closed before frame {i}"));
        assert_eq!(
            &f.payload[14..18],
            &(i as u32).to_be_bytes(),
            "wire frame {i} out of order"
        );
        assert_eq!(&f.payload, want, "wire frame {i} altered");
    }
    feeder.join().unwrap().unwrap();
}
