//! Identity page tables: the first 4 GiB mapped with 2 MiB pages.

use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::layout::{PD_ADDR, PDPT_ADDR, PML4_ADDR};
use crate::memory::GuestMem;

const PRESENT_RW: u64 = 0x3;
const PAGE_SIZE_2M: u64 = 0x80;

/// Writes PML4 → PDPT → 4 page directories identity-mapping 0..4 GiB; returns CR3.
pub fn write_identity_tables(mem: &GuestMem) -> Result<u64, GuestMemoryError> {
    mem.write_obj(PDPT_ADDR | PRESENT_RW, GuestAddress(PML4_ADDR))?;
    for pd in 0..4u64 {
        let pd_addr = PD_ADDR + pd * 0x1000;
        mem.write_obj(pd_addr | PRESENT_RW, GuestAddress(PDPT_ADDR + pd * 8))?;
        let mut entries = [0u8; 4096];
        for i in 0..512u64 {
            let phys = ((pd << 9) + i) << 21;
            let e = phys | PRESENT_RW | PAGE_SIZE_2M;
            entries[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&e.to_le_bytes());
        }
        mem.write_slice(&entries, GuestAddress(pd_addr))?;
    }
    Ok(PML4_ADDR)
}
