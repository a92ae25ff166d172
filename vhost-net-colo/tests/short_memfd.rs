//! A memory table whose region is longer than the memfd behind it: the backend must refuse
//! it and take the region out, because touching guest memory past the file's end is SIGBUS
//! (found by the `vhost_user_msgs` fuzz target: the used-index read of SET_VRING_ADDR in
//! vhost-user-backend faulted). `update_memory` runs right after the library installed the
//! table, as for SET_MEM_TABLE and ADD_MEM_REG.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use vhost_net_colo::{
    backend::NetBackend,
    path::{GuestRx, NetPath},
};
use vhost_user_backend::{VhostUserBackend, bitmap::BitmapMmapRegion};

#[test]
fn a_region_longer_than_its_memfd_is_refused_and_dropped() {
    let path = Arc::new(NetPath::new("n0", Arc::new(GuestRx::new(64).unwrap())));
    let dev = NetBackend::new(path, [0x52, 0x54, 0, 0x12, 0x34, 0x56], Arc::default()).unwrap();
    vhost_user_guards::testing::check_short_regions_refused::<BitmapMmapRegion>(|gm| {
        dev.update_memory(gm)
    });
}
