//! An error from `handle_event` ends the queue's worker thread in vhost-user-backend (its epoll
//! loop stops) and the ring is dead for the rest of the connection. A frontend can provoke one
//! by message order alone: SET_FEATURES without PROTOCOL_FEATURES (the library enables every
//! ring), then SET_VRING_KICK before SET_MEM_TABLE makes the library call `handle_event` at
//! once, with no memory. Found by the `vhost_user_msgs` fuzz target (a later, valid set-up of
//! that ring never completed a request). `handle_event` must answer Ok and log instead.

#![allow(clippy::unwrap_used)]

use std::{
    sync::{Arc, mpsc},
    time::Duration,
};

use vhost_blk_colo::{
    block::mem::MemNode,
    vhost_user::{BlkConfig, VhostUserBlk},
};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT, bitmap::BitmapMmapRegion};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

#[test]
fn frontend_caused_event_errors_leave_the_queue_thread_running() {
    let dev = VhostUserBlk::new(Arc::new(MemNode::new(1 << 20)), BlkConfig::default());
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::<BitmapMmapRegion>::new());
    let vring = VringRwLock::new(mem, 256).unwrap();
    vring.set_queue_ready(true);
    let vrings = [vring];
    // A started ring and no memory table yet.
    dev.handle_event(0, EventSet::IN, &vrings, 0).unwrap();
    // A kick descriptor that is not an eventfd can also report a hang-up.
    dev.handle_event(0, EventSet::IN | EventSet::HANG_UP, &vrings, 0)
        .unwrap();
    // An event id the device never registered.
    dev.handle_event(7, EventSet::IN, &vrings, 0).unwrap();
}

/// A ring that never runs dry: with EVENT_IDX, the avail index one ahead of ours and the slot
/// it names past the end of guest memory. Nothing can be taken, yet `enable_notification`
/// reports work every time; the queue's event must still end (else its thread never sees a
/// disconnect's exit event: found by the `vhost_user_msgs` fuzz target with a ring whose
/// rings all lay at address 0). It ends and leaves the work to the queue's resume event.
#[test]
fn a_ring_that_never_runs_dry_does_not_hold_its_thread() {
    let dev = Arc::new(VhostUserBlk::new(
        Arc::new(MemNode::new(1 << 20)),
        BlkConfig {
            num_queues: 1,
            ..BlkConfig::default()
        },
    ));
    let mem =
        GuestMemoryMmap::<BitmapMmapRegion>::from_ranges(&[(GuestAddress(0), 0x2000)]).unwrap();
    // desc table at 0 (256 entries), used ring at 0x1000, avail ring at 0x1f00: its slot 200
    // is at 0x1f04 + 400, past the end of memory.
    mem.write_obj(201u16, GuestAddress(0x1f02)).unwrap();
    let gm = GuestMemoryAtomic::new(mem);
    dev.update_memory(gm.clone()).unwrap();
    dev.set_event_idx(true);
    let vring = VringRwLock::new(gm, 256).unwrap();
    vring.set_queue_info(0, 0x1f00, 0x1000).unwrap();
    vring.set_queue_next_avail(200);
    vring.set_queue_event_idx(true);
    vring.set_queue_ready(true);
    let (tx, rx) = mpsc::channel();
    {
        let dev = dev.clone();
        std::thread::spawn(move || {
            let r = dev.handle_event(0, EventSet::IN, &[vring], 0);
            let _ = tx.send(r.is_ok());
        });
    }
    // A guard against the hang this test is about, not a timing assertion.
    let ok = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("handle_event on a ring that never runs dry did not return");
    assert!(ok);
}
