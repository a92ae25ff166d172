//! An error from `handle_event` ends the queue's worker thread in vhost-user-backend (its epoll
//! loop stops) and the ring is dead for the rest of the connection. A frontend can provoke one
//! by message order alone: SET_FEATURES without PROTOCOL_FEATURES (the library enables every
//! ring), then SET_VRING_KICK before SET_MEM_TABLE makes the library call `handle_event` at
//! once, with no memory. Found by the `vhost_user_msgs` fuzz target (a later, valid set-up of
//! that ring never completed a request). `handle_event` must answer Ok and log instead.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use vhost_blk_colo::{
    block::mem::MemNode,
    vhost_user::{BlkConfig, VhostUserBlk},
};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT, bitmap::BitmapMmapRegion};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
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
