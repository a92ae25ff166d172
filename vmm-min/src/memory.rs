//! Guest RAM: one memfd, mapped shared into this process as `vm-memory` regions, so that
//! vhost-user backends can map the same pages (their fd and offset go into SET_MEM_TABLE).
//!
//! Layout (x86_64): RAM from 0 up to the start of the 32-bit MMIO hole, the rest above 4 GiB.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_memory::{Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Start of the 32-bit MMIO hole (devices, IOAPIC, LAPIC live above this).
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// Smallest guest RAM accepted (the boot structures need the first MiB plus a kernel).
pub const MIN_MEMORY: u64 = 16 << 20;

/// The guest memory type used everywhere in vmm-min.
pub type GuestMem = GuestMemoryMmap<()>;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create or ftruncate failed.
    #[error("cannot create a memfd of {size} bytes for guest RAM: {source}")]
    Memfd {
        /// Requested size.
        size: u64,
        /// OS error.
        source: std::io::Error,
    },
    /// The size is not usable.
    #[error("guest memory size {0} bytes is invalid (minimum {MIN_MEMORY}, multiple of 4 KiB)")]
    BadSize(u64),
    /// Mapping failed.
    #[error("cannot map guest RAM: {0}")]
    Map(#[from] vm_memory::mmap::FromRangesError),
}

/// One contiguous piece of guest RAM: guest address, length and offset in the memfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamRange {
    /// Guest physical start address.
    pub guest_addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset of this range inside the memfd.
    pub file_offset: u64,
}

/// Guest RAM: the memfd, the ranges and the mapped `GuestMemoryMmap`. Clones share the same
/// mapping (for the migration thread and the state hooks).
#[derive(Clone)]
pub struct GuestRam {
    file: Arc<File>,
    ranges: Vec<RamRange>,
    mem: GuestMem,
    size: u64,
}

/// Computes the guest ranges for `size` bytes of RAM around the 32-bit hole.
pub fn ram_ranges(size: u64) -> Vec<RamRange> {
    let low = size.min(MMIO_HOLE_START);
    let mut v = vec![RamRange {
        guest_addr: 0,
        len: low,
        file_offset: 0,
    }];
    if size > low {
        v.push(RamRange {
            guest_addr: MMIO_HOLE_END,
            len: size - low,
            file_offset: low,
        });
    }
    v
}

impl GuestRam {
    /// Allocates `size` bytes of guest RAM in a fresh memfd.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if size < MIN_MEMORY || !size.is_multiple_of(4096) {
            return Err(MemoryError::BadSize(size));
        }
        // SAFETY: memfd_create with a valid NUL-terminated name; we check the result.
        let fd = unsafe { libc::memfd_create(c"vmm-min-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(MemoryError::Memfd {
                size,
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)
            .map_err(|source| MemoryError::Memfd { size, source })?;
        let file = Arc::new(file);
        let ranges = ram_ranges(size);
        let mem = GuestMem::from_ranges_with_files(ranges.iter().map(|r| {
            (
                GuestAddress(r.guest_addr),
                r.len as usize,
                Some(FileOffset::from_arc(file.clone(), r.file_offset)),
            )
        }))?;
        Ok(Self {
            file,
            ranges,
            mem,
            size,
        })
    }

    /// The mapped guest memory.
    pub fn mem(&self) -> &GuestMem {
        &self.mem
    }

    /// The memfd backing all RAM.
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// Raw fd of the memfd.
    pub fn raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The RAM ranges (guest address, length, memfd offset).
    pub fn ranges(&self) -> &[RamRange] {
        &self.ranges
    }

    /// Host virtual address of each range, in the order of [`GuestRam::ranges`].
    pub fn host_addrs(&self) -> Vec<u64> {
        self.mem
            .iter()
            .map(|r| r.as_ptr() as u64)
            .collect::<Vec<_>>()
    }

    /// End (exclusive) of low RAM (below the hole).
    pub fn low_end(&self) -> u64 {
        self.ranges[0].len
    }

    /// True when `[addr, addr+len)` lies inside RAM.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        self.ranges.iter().any(|r| {
            addr >= r.guest_addr
                && addr
                    .checked_add(len)
                    .is_some_and(|e| e <= r.guest_addr + r.len)
        })
    }

    /// Makes `[gpa, gpa+len)` (inside one RAM range, page aligned) read as zeros, releasing its
    /// pages: a hole punched in the memfd (every mapping, the guest's and backends', sees
    /// zeros); plain zero writes when the file system cannot punch holes.
    pub fn zero_range(&self, gpa: u64, len: u64) -> std::io::Result<()> {
        let r = self
            .ranges
            .iter()
            .find(|r| gpa >= r.guest_addr && gpa.saturating_add(len) <= r.guest_addr + r.len)
            .ok_or_else(|| {
                std::io::Error::other(format!("{gpa:#x}+{len:#x} is not inside one RAM range"))
            })?;
        let off = r.file_offset + (gpa - r.guest_addr);
        // SAFETY: fallocate on our own memfd with a range inside the file; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let zeros = vec![0u8; 1 << 20];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64);
            vm_memory::Bytes::write_slice(
                &self.mem,
                &zeros[..n as usize],
                GuestAddress(gpa + done),
            )
            .map_err(|e| std::io::Error::other(e.to_string()))?;
            done += n;
        }
        Ok(())
    }

    /// The guest-physical extents `[start, end)` whose memfd pages exist (`SEEK_DATA` /
    /// `SEEK_HOLE`), in address order: every page outside them reads as zeros and has never
    /// been touched. Lets a full pass over RAM skip untouched pages without reading (reading
    /// would allocate them).
    pub fn data_extents(&self) -> std::io::Result<Vec<(u64, u64)>> {
        let fd = self.file.as_raw_fd();
        let mut out = Vec::new();
        for r in &self.ranges {
            let (start, end) = (r.file_offset as i64, (r.file_offset + r.len) as i64);
            let mut off = start;
            while off < end {
                // SAFETY: lseek on our own memfd; it moves only the file offset, which nothing
                // else in vmm-min relies on while the VM runs (backends mmap the fd).
                let d = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
                if d < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.raw_os_error() == Some(libc::ENXIO) {
                        break;
                    }
                    return Err(e);
                }
                if d >= end {
                    break;
                }
                // SAFETY: as above.
                let h = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) };
                if h < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let h = h.min(end);
                out.push((
                    r.guest_addr + (d - start) as u64,
                    r.guest_addr + (h - start) as u64,
                ));
                off = h;
            }
        }
        Ok(out)
    }

    /// Last guest address of RAM + 1.
    pub fn last_addr(&self) -> u64 {
        self.mem.last_addr().raw_value() + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn small_ram_is_one_range_below_the_hole() {
        let r = ram_ranges(512 << 20);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].len, 512 << 20);
    }

    #[test]
    fn big_ram_is_split_around_the_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].len, MMIO_HOLE_START);
        assert_eq!(r[1].guest_addr, MMIO_HOLE_END);
        assert_eq!(r[1].len, (4 << 30) - MMIO_HOLE_START);
        assert_eq!(r[1].file_offset, MMIO_HOLE_START);
    }

    #[test]
    fn ram_is_shared_with_the_memfd() {
        use std::os::unix::fs::FileExt;
        let ram = GuestRam::new(32 << 20).unwrap();
        ram.mem()
            .write_obj(0xdead_beefu32, GuestAddress(0x1000))
            .unwrap();
        let mut b = [0u8; 4];
        ram.file().read_exact_at(&mut b, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0xdead_beef);
        assert!(ram.contains(0, 32 << 20));
        assert!(!ram.contains(1, 32 << 20));
    }

    #[test]
    fn untouched_pages_are_holes_and_zeroed_ranges_become_holes_again() {
        let ram = GuestRam::new(32 << 20).unwrap();
        assert_eq!(ram.data_extents().unwrap(), vec![]);
        ram.mem().write_obj(7u8, GuestAddress(0x5000)).unwrap();
        ram.mem().write_obj(7u8, GuestAddress(0x8000)).unwrap();
        let ext = ram.data_extents().unwrap();
        assert!(
            ext.iter().any(|e| e.0 <= 0x5000 && 0x5000 < e.1),
            "{ext:x?}"
        );
        assert!(
            !ext.iter().any(|e| e.0 <= 0x100000 && 0x100000 < e.1),
            "{ext:x?}"
        );
        ram.zero_range(0x5000, 0x4000).unwrap();
        assert_eq!(ram.data_extents().unwrap(), vec![]);
        assert_eq!(ram.mem().read_obj::<u8>(GuestAddress(0x8000)).unwrap(), 0);
        assert!(ram.zero_range(0x1ff_f000, 0x2000).is_err(), "outside RAM");
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(matches!(
            GuestRam::new(1 << 20),
            Err(MemoryError::BadSize(_))
        ));
        assert!(matches!(
            GuestRam::new((32 << 20) + 1),
            Err(MemoryError::BadSize(_))
        ));
    }
}
