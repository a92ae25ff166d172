//! Rings a frontend can set up so that they never run dry must not hold the ring worker (all
//! queues share one thread): while one event of it loops, a disconnect's exit event waits, so
//! `serve` never returns and no frontend can connect again. Found by vhost-blk-colo's
//! `vhost_user_msgs` fuzz target (a ring started by SET_VRING_KICK without SET_VRING_ADDR: desc,
//! avail and used all at guest address 0); `process_tx` and `process_rx` had the same shape.
//! Each test runs one event on its own thread and guards against the hang with a bounded wait
//! (a guard, not a timing assertion: without the bounds the event never returns).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::{Arc, mpsc};
use std::time::Duration;

use vhost_net_colo::backend::{NetBackend, QUEUE_SIZE};
use vhost_net_colo::path::{GuestRx, NetPath};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

type Gm = GuestMemoryAtomic<GuestMemoryMmap<BitmapMmapRegion>>;

/// Event ids of one queue pair: receive queue 0, transmit queue 1; the moderation timer is
/// `2 * pairs + 2` (its handler looks at the transmit rings whose polls are due).
const RX: u16 = 0;
const TX: u16 = 1;
const TIMER: u16 = 4;

const RING: u16 = 256;

struct Dev {
    dev: Arc<NetBackend>,
    guest: Arc<GuestRx>,
    gm: Gm,
    vrings: Arc<[VringRwLock<Gm>; 2]>,
}

/// A device with one queue pair over 1 MiB of guest memory at 0, both rings `RING` entries,
/// ready and enabled, at their default addresses (0) until the test sets them.
fn dev(event_idx: bool) -> Dev {
    let guest = Arc::new(GuestRx::new(64).unwrap());
    let path = Arc::new(NetPath::new("hn0", guest.clone()));
    let dev =
        Arc::new(NetBackend::new(path, [0x52, 0x54, 0, 0x12, 0x34, 0x56], Arc::default()).unwrap());
    let mem =
        GuestMemoryMmap::<BitmapMmapRegion>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let gm = GuestMemoryAtomic::new(mem);
    dev.update_memory(gm.clone()).unwrap();
    dev.set_event_idx(event_idx);
    let ring = || {
        let v = VringRwLock::new(gm.clone(), RING).unwrap();
        v.set_queue_event_idx(event_idx);
        v.set_queue_ready(true);
        v.set_enabled(true);
        v
    };
    let vrings = Arc::new([ring(), ring()]);
    Dev {
        dev,
        guest,
        gm,
        vrings,
    }
}

impl Dev {
    /// Runs event `id` on a thread of its own; panics if it does not return within the guard.
    fn event(&self, id: u16) {
        let (tx, rx) = mpsc::channel();
        let (dev, vrings) = (self.dev.clone(), self.vrings.clone());
        std::thread::spawn(move || {
            let r = dev.handle_event(id, EventSet::IN, &vrings[..], 0);
            let _ = tx.send(r.is_ok());
        });
        // A guard against the hang these tests are about, not a timing assertion.
        let ok = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("event {id} on a ring that never runs dry did not return"));
        assert!(ok, "event {id}");
    }

    fn read_u16(&self, at: u64) -> u16 {
        u16::from_le(self.gm.memory().read_obj(GuestAddress(at)).unwrap())
    }
}

/// The fuzz finding's ring: started without addresses (desc, avail and used at 0), next avail
/// 0xffff (SET_VRING_BASE). virtio-queue takes nothing from a ring at 0 while
/// `enable_notification` keeps reporting the avail index (0) ahead of ours: with EVENT_IDX the
/// transmit loop repeated for ever.
#[test]
fn a_transmit_ring_without_addresses_does_not_hold_the_thread() {
    let d = dev(true);
    d.vrings[1].set_queue_next_avail(0xffff);
    d.vrings[1].set_queue_next_used(0xffff);
    d.event(TX);
    // And again from the poll it left behind.
    d.event(TIMER);
}

/// A transmit ring that feeds itself: its avail ring lies over its used ring, so every used
/// entry moves the avail index on (one ahead of the used index), and the slots it uncovers
/// name descriptor 0 (a header-only chain, so nothing piles up in memory meanwhile). Nothing
/// ends the inner pop loop but a bound, with or without EVENT_IDX. One event takes at most a
/// full ring of the largest size; the rest is served by the poll it schedules.
#[test]
fn a_transmit_ring_that_feeds_itself_is_served_in_bounded_steps() {
    for event_idx in [true, false] {
        let d = dev(event_idx);
        let (desc, ring) = (0x1000u64, 0x4000u64);
        let m = d.gm.memory();
        // Descriptor 0: 12 readable bytes (a virtio-net header and no frame).
        m.write_obj(0x1_0000u64.to_le(), GuestAddress(desc))
            .unwrap();
        m.write_obj(12u32.to_le(), GuestAddress(desc + 8)).unwrap();
        // Avail index 1 (the used index is 0 in memory, 1 in the device).
        m.write_obj(1u16.to_le(), GuestAddress(ring + 2)).unwrap();
        drop(m);
        let tx = &d.vrings[1];
        tx.set_queue_info(desc, ring, ring).unwrap();
        tx.set_queue_next_avail(0);
        tx.set_queue_next_used(1);

        d.event(TX);
        let after_kick = d.read_u16(ring + 2);
        let taken = after_kick.wrapping_sub(1);
        assert!(
            taken >= 1 && usize::from(taken) <= QUEUE_SIZE,
            "event_idx {event_idx}: one kick took {taken} chains, at most {QUEUE_SIZE} expected"
        );
        // The guest (this ring) still has work: the scheduled poll goes on with it.
        d.event(TIMER);
        let after_poll = d.read_u16(ring + 2);
        let taken = after_poll.wrapping_sub(after_kick);
        assert!(
            taken >= 1 && usize::from(taken) <= QUEUE_SIZE,
            "event_idx {event_idx}: the poll took {taken} chains"
        );
    }
}

/// The receive side of the fuzz finding's ring, with a frame waiting: no chain can be taken,
/// and the "guest added buffers" retry saw the avail index ahead of the none it got, for ever.
/// The frame must still be queued afterwards (waiting for buffers, not lost).
#[test]
fn a_receive_ring_without_addresses_does_not_hold_the_thread() {
    let d = dev(true);
    d.vrings[0].set_queue_next_avail(0xffff);
    d.vrings[0].set_queue_next_used(0xffff);
    d.guest.push(vec![0xab; 60]);
    d.event(RX);
    assert_eq!(d.guest.lock().unwrap().len(), 1, "the frame still waits");
}
