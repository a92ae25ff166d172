//! Pieces the vhost-user device tests share: a child process killed on drop, MMIO register
//! access, and a split virtqueue laid out at fixed guest addresses.

#![allow(dead_code)] // each test file uses a part
#![allow(clippy::unwrap_used)] // test code

use std::process::Child;

use vm_memory::{Bytes, GuestAddress};
use vmm_min::devices::bus::BusDevice;
use vmm_min::memory::GuestRam;
use vmm_min::virtio::mmio::MmioTransport;

/// A backend process, killed and reaped on drop.
pub struct Proc(pub Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Writes a 32-bit virtio-MMIO register.
pub fn w(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// Reads a 32-bit virtio-MMIO register.
pub fn r(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

/// Queue 0's descriptor table, avail and used rings, and its size.
pub const DESC: u64 = 0x10000;
pub const AVAIL: u64 = 0x11000;
pub const USED: u64 = 0x12000;
pub const QSIZE: u16 = 16;

/// Writes descriptor `i` of queue 0.
pub fn put_desc(ram: &GuestRam, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let a = DESC + u64::from(i) * 16;
    let m = ram.mem();
    m.write_obj(addr, GuestAddress(a)).unwrap();
    m.write_obj(len, GuestAddress(a + 8)).unwrap();
    m.write_obj(flags, GuestAddress(a + 12)).unwrap();
    m.write_obj(next, GuestAddress(a + 14)).unwrap();
}
