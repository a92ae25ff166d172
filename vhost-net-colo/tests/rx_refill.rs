//! Frames from the netdev that find the guest's receive ring without room wait in the device,
//! and reach the guest once it posts buffers: the receive queue's kick retries them, with no
//! later frame from the netdev needed (for an idle TCP connection that would be a stall until
//! a retransmit). The test frontend posts its buffers and kicks only when a driver would (the
//! device's `avail_event` with EVENT_IDX, `VRING_USED_F_NO_NOTIFY` without), so a device that
//! asks for its kick wrongly is found. Frames no ring of the guest can ever hold are dropped
//! and counted, not held in front of the frames behind them.
//!
//! Real backend binary, real vhost-user socket and shared memory, `stream` netdev whose far
//! end is the test. The waits are generous bounds, not timing assertions.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::os::unix::net::UnixStream;
use std::time::Duration;

use colo_proto::frame::{Frame, write_frame};
use common::{Backend, QmpClient};
use serde_json::json;
use vhost_net_colo::backend::{VIRTIO_NET_F_MRG_RXBUF, VIRTIO_RING_F_EVENT_IDX};
use vhost_net_colo::testing::{NetFrontend, Options};

/// How long a frame may take to arrive before the test calls it lost (a bound, not a speed).
const ARRIVAL: Duration = Duration::from_secs(20);

struct Setup {
    backend: Backend,
    qmp: QmpClient,
    /// The far end of the backend's stream netdev.
    wire: UnixStream,
    _dir: tempfile::TempDir,
}

fn start() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (backend, wire) = common::spawn_with_wire(dir.path(), "", &[], true);
    let qmp = backend.qmp();
    Setup {
        backend,
        qmp,
        wire,
        _dir: dir,
    }
}

impl Setup {
    /// The device counters of `query-net`.
    fn device(&mut self) -> serde_json::Value {
        let net = self.qmp.execute("query-net", json!({})).unwrap();
        net["device"].clone()
    }

    fn counter(&mut self, name: &str) -> u64 {
        let d = self.device();
        d[name]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {name} in {d}"))
    }

    /// A frontend with the given features; checks they were negotiated as asked.
    fn frontend(&self, o: &Options) -> NetFrontend {
        let fe = self.backend.frontend(o);
        let has = |bit: u64| fe.features() & (1 << bit) != 0;
        assert_eq!(
            has(VIRTIO_NET_F_MRG_RXBUF),
            o.mrg_rxbuf,
            "MRG_RXBUF negotiated"
        );
        assert_eq!(
            has(VIRTIO_RING_F_EVENT_IDX),
            o.event_idx,
            "EVENT_IDX negotiated"
        );
        fe
    }

    /// The netdev sends `f` to the guest.
    fn send(&self, f: &[u8]) {
        let mut w = self.wire.try_clone().unwrap();
        write_frame(&mut w, &Frame::ethernet(f.to_vec()), false).unwrap();
    }

    /// Waits until the device has tried to place frames (`rx_passes`) more than `passes` times
    /// and has delivered none: a frame is held for want of buffers.
    fn wait_held(&mut self, passes: u64, what: &str) -> u64 {
        let mut now = passes;
        common::wait_for(
            ARRIVAL,
            &format!("{what}: the device never tried to place the frame"),
            || {
                now = self.counter("rx_passes");
                now > passes
            },
        );
        assert_eq!(
            self.counter("to_guest"),
            0,
            "{what}: delivered without room"
        );
        now
    }
}

/// The combinations of the two features the receive path branches on.
fn combos() -> Vec<(bool, bool)> {
    vec![(true, true), (true, false), (false, true), (false, false)]
}

fn label(mrg: bool, event_idx: bool) -> String {
    format!("MRG_RXBUF {mrg}, EVENT_IDX {event_idx}")
}

/// The guest's receive ring is empty when the only frame arrives; the guest then posts buffers
/// and kicks (as a driver would): the frame arrives.
#[test]
fn a_frame_that_found_the_ring_empty_arrives_when_the_guest_posts_buffers() {
    let mut lost = Vec::new();
    for (mrg, event_idx) in combos() {
        let what = label(mrg, event_idx);
        let mut s = start();
        let o = Options {
            mrg_rxbuf: mrg,
            event_idx,
            rx_buf_size: 2048,
            rx_prefill: Some(0),
            ..Options::default()
        };
        let mut fe = s.frontend(&o);
        let frame = common::numbered_frame(1, 1000);
        s.send(&frame);
        s.wait_held(0, &what);
        let (posted, kicked) = fe.post_rx(usize::from(o.queue_size));
        assert_eq!(posted, usize::from(o.queue_size));
        let Some((got, _)) = fe.recv(ARRIVAL) else {
            // Every combination is tried before the test fails, so it names all that do.
            lost.push(format!(
                "{what}: the frame held for an empty ring never reached the guest after it \
                 posted {posted} buffers (kicked: {kicked})"
            ));
            continue;
        };
        assert_eq!(got, frame, "{what}");
        // The ring works on as before.
        let next = common::numbered_frame(2, 700);
        s.send(&next);
        let (got, _) = fe.recv(ARRIVAL).expect("the next frame");
        assert_eq!(got, next, "{what}");
        assert_eq!(s.counter("to_guest"), 2, "{what}");
    }
    assert!(lost.is_empty(), "{}", lost.join("\n"));
}

/// With MRG_RXBUF a 3000-byte frame needs three 1024-byte buffers and the ring holds one when
/// it arrives; the guest then posts the other two, one at a time (each with the kick a driver
/// would give) or both at once: the frame arrives, in three buffers.
#[test]
fn a_merged_frame_short_of_buffers_arrives_when_the_guest_posts_the_rest() {
    let mut lost = Vec::new();
    for event_idx in [true, false] {
        for one_at_a_time in [true, false] {
            let what = format!(
                "{}, the rest posted {}",
                label(true, event_idx),
                if one_at_a_time {
                    "one at a time"
                } else {
                    "at once"
                }
            );
            let mut s = start();
            let o = Options {
                mrg_rxbuf: true,
                event_idx,
                rx_buf_size: 1024,
                rx_prefill: Some(1),
                ..Options::default()
            };
            let mut fe = s.frontend(&o);
            let frame = common::numbered_frame(3, 3000);
            s.send(&frame);
            let mut passes = s.wait_held(0, &what);
            let mut kicks = Vec::new();
            if one_at_a_time {
                let (posted, kicked) = fe.post_rx(1);
                assert_eq!(posted, 1);
                kicks.push(kicked);
                if kicked {
                    // The device looks again and still finds too few (two of three).
                    passes = s.wait_held(passes, &what);
                }
                let (posted, kicked) = fe.post_rx(1);
                assert_eq!(posted, 1);
                kicks.push(kicked);
            } else {
                let (posted, kicked) = fe.post_rx(2);
                assert_eq!(posted, 2);
                kicks.push(kicked);
            }
            let Some((got, nbufs)) = fe.recv(ARRIVAL) else {
                // Every combination is tried before the test fails, so it names all that do.
                lost.push(format!(
                    "{what}: the frame held for want of buffers never reached the guest after \
                     it posted the missing ones (kicks given: {kicks:?}, device passes: \
                     {passes})"
                ));
                continue;
            };
            assert_eq!(got, frame, "{what}");
            assert_eq!(nbufs, 3, "{what}: buffers of the frame");
        }
    }
    assert!(lost.is_empty(), "{}", lost.join("\n"));
}

/// Sends a frame of `big` bytes that no ring set up with `options` can hold, then a small one,
/// with EVENT_IDX on and off: the big one is dropped and counted, the small one arrives.
fn check_unplaceable_frame_is_dropped(options: Options, big: usize) {
    let mut lost = Vec::new();
    for event_idx in [true, false] {
        let what = label(options.mrg_rxbuf, event_idx);
        let mut s = start();
        let mut fe = s.frontend(&Options {
            event_idx,
            ..options.clone()
        });
        s.send(&common::numbered_frame(4, big));
        let small = common::numbered_frame(5, 500);
        s.send(&small);
        let Some((got, _)) = fe.recv(ARRIVAL) else {
            lost.push(format!(
                "{what}: the frame behind the unplaceable one never came (device: {})",
                s.device()
            ));
            continue;
        };
        assert_eq!(got, small, "{what}");
        let d = s.device();
        assert_eq!(d["to_guest_dropped_too_big"], 1, "{what}: {d}");
        assert_eq!(d["to_guest"], 1, "{what}: {d}");
    }
    assert!(lost.is_empty(), "{}", lost.join("\n"));
}

/// Without MRG_RXBUF a frame larger than a receive buffer can never be placed.
#[test]
fn a_frame_larger_than_a_buffer_without_merging_is_dropped_and_the_next_arrives() {
    let options = Options {
        mrg_rxbuf: false,
        rx_buf_size: 1024,
        ..Options::default()
    };
    check_unplaceable_frame_is_dropped(options, 3000);
}

/// With MRG_RXBUF a frame larger than the whole ring (8 buffers of 1024 bytes, all posted) can
/// never be placed either.
#[test]
fn a_merged_frame_larger_than_the_whole_ring_is_dropped_and_the_next_arrives() {
    let options = Options {
        mrg_rxbuf: true,
        queue_size: 8,
        rx_buf_size: 1024,
        ..Options::default()
    };
    check_unplaceable_frame_is_dropped(options, 9014);
}
