//! The vhost-user shared dirty log: one bit per 4 KiB guest page, in a memfd the backend maps
//! (SET_LOG_BASE with LOG_SHMFD) and sets bits in while VHOST_F_LOG_ALL is negotiated.
//! vmm-min reads and clears it word by word with atomic swaps, so no bit set concurrently by the
//! backend is lost.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU64, Ordering};

/// VHOST_F_LOG_ALL.
pub const VHOST_F_LOG_ALL: u64 = 1 << 26;

/// Errors creating the log.
#[derive(Debug, thiserror::Error)]
#[error("vhost-user dirty log of {bytes} bytes: {source}")]
pub struct LogError {
    bytes: u64,
    source: std::io::Error,
}

/// A shared dirty bitmap covering guest physical addresses `0..pages*4096`.
pub struct SharedLog {
    file: File,
    ptr: *mut AtomicU64,
    words: usize,
}

// SAFETY: the mapping is only accessed through atomics; the pointer stays valid until drop.
unsafe impl Send for SharedLog {}
// SAFETY: as above, all access is atomic.
unsafe impl Sync for SharedLog {}

impl SharedLog {
    /// A zeroed log for guest physical addresses below `gpa_end`.
    pub fn new(gpa_end: u64) -> Result<Self, LogError> {
        let pages = gpa_end.div_ceil(4096);
        let words = pages.div_ceil(64) as usize;
        let bytes = (words * 8).max(4096) as u64;
        let err = |source| LogError { bytes, source };
        // SAFETY: memfd_create with a valid C string; result checked.
        let fd = unsafe { libc::memfd_create(c"vmm-min-dirty-log".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(bytes).map_err(err)?;
        // SAFETY: mapping `bytes` of a file of that length, shared, read-write; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(err(std::io::Error::last_os_error()));
        }
        Ok(Self {
            file,
            ptr: p.cast(),
            words,
        })
    }

    /// The memfd (for SET_LOG_BASE).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Size of the mapping the backend should map.
    pub fn mmap_size(&self) -> u64 {
        ((self.words * 8).max(4096)) as u64
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        // SAFETY: i < words, inside the live mapping; AtomicU64 has u64's layout and the
        // mapping is page aligned.
        unsafe { &*self.ptr.add(i) }
    }

    /// Returns the bitmap for pages `first_page..first_page+pages` and clears those bits.
    /// `first_page` must be a multiple of 64.
    pub fn take(&self, first_page: u64, pages: u64) -> Vec<u64> {
        let start = (first_page / 64) as usize;
        let n = pages.div_ceil(64) as usize;
        (start..start + n)
            .map(|i| {
                if i < self.words {
                    self.word(i).swap(0, Ordering::AcqRel)
                } else {
                    0
                }
            })
            .collect()
    }
}

impl Drop for SharedLog {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what new() mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.mmap_size() as usize) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn bits_written_through_the_fd_are_taken_once() {
        let log = SharedLog::new(64 << 20).unwrap();
        // A "backend" sets pages 3 and 70 through its own view of the file.
        log.file()
            .write_all_at(&(1u64 << 3).to_le_bytes(), 0)
            .unwrap();
        log.file()
            .write_all_at(&(1u64 << 6).to_le_bytes(), 8)
            .unwrap();
        let b = log.take(0, 128);
        assert_eq!(b, vec![1 << 3, 1 << 6]);
        assert_eq!(log.take(0, 128), vec![0, 0]);
    }
}
