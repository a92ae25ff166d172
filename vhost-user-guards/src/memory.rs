//! The `vhost` crates map a SET_MEM_TABLE / ADD_MEM_REG region of any size over any file, and
//! reading or writing guest memory past a memfd's end is SIGBUS, which kills the backend (the
//! `vhost_user_msgs` fuzz targets: a region twice its memfd's size, then SET_VRING_ADDR, whose
//! used-index read in vhost-user-backend's `set_vring_addr` faulted). A backend calls
//! [`drop_regions_past_eof`] from `update_memory`, right after the library installed the new
//! table, so the offending regions are taken out again before any ring is set up in them. A
//! frontend that shrinks the file later can still fault the backend; that needs a SIGBUS
//! handler.

use vm_memory::{
    Address, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion, bitmap::Bitmap,
};

/// Drops from `mem` the regions whose file is shorter than the region and fails naming the
/// first of them; a table whose regions all fit is left as it is.
pub fn drop_regions_past_eof<B>(mem: &GuestMemoryAtomic<GuestMemoryMmap<B>>) -> std::io::Result<()>
where
    B: Bitmap + Clone + 'static,
{
    let mut bad = Vec::new();
    let mut kept = {
        let m = mem.memory();
        for r in m.iter() {
            let Some(fo) = r.file_offset() else { continue };
            let file_len = fo.file().metadata().map(|md| md.len()).unwrap_or(0);
            let end = fo.start().checked_add(r.len());
            if end.is_none_or(|end| end > file_len) {
                bad.push((r.start_addr(), r.len(), fo.start(), file_len));
            }
        }
        if bad.is_empty() {
            return Ok(());
        }
        (*m).clone()
    };
    for &(start, len, _, _) in &bad {
        if let Ok((rest, _)) = kept.remove_region(start, len) {
            kept = rest;
        }
    }
    match mem.lock() {
        Ok(g) => g.replace(kept),
        Err(p) => p.into_inner().replace(kept),
    }
    let (start, len, off, file_len) = bad[0];
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!(
            "memory region at guest {:#x}: {len:#x} bytes from file offset {off:#x}, but the file has {file_len:#x} bytes; region dropped",
            start.raw_value()
        ),
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_region_longer_than_its_file_is_dropped_and_named() {
        crate::testing::check_short_regions_refused::<()>(|gm| super::drop_regions_past_eof(&gm));
    }
}
