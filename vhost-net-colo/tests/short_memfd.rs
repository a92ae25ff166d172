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
use vhost_user_guards::testing::file_region;
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
};

#[test]
fn a_region_longer_than_its_memfd_is_refused_and_dropped() {
    let path = Arc::new(NetPath::new("n0", Arc::new(GuestRx::new(64).unwrap())));
    let dev = NetBackend::new(path, [0x52, 0x54, 0, 0x12, 0x34, 0x56], Arc::default()).unwrap();
    let good = file_region::<BitmapMmapRegion>(0, 0x10000, 0x10000);
    let short = file_region::<BitmapMmapRegion>(0x10_0000, 0x20000, 0x10000);
    let mem = GuestMemoryMmap::from_regions(vec![good, short]).unwrap();
    let gm = GuestMemoryAtomic::new(mem);
    let err = dev.update_memory(gm.clone()).unwrap_err();
    assert!(err.to_string().contains("0x100000"), "{err}");
    let now = gm.memory();
    assert_eq!(now.num_regions(), 1, "the short region is still mapped");
    assert!(now.find_region(GuestAddress(0)).is_some());

    // A table whose regions all fit is taken as is.
    let ok = GuestMemoryAtomic::new(
        GuestMemoryMmap::from_regions(vec![file_region::<BitmapMmapRegion>(0, 0x10000, 0x10000)])
            .unwrap(),
    );
    dev.update_memory(ok.clone()).unwrap();
    assert_eq!(ok.memory().num_regions(), 1);
}
