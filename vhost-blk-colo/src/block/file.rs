//! `file` driver: a raw image in a host file or block device.
//!
//! Uses `pread`/`pwrite` (thread-safe, no shared cursor). With `direct` the file is opened with
//! `O_DIRECT` and unaligned requests go through an aligned bounce buffer. Discard punches holes,
//! write-zeroes uses `FALLOCATE_ZERO_RANGE` and falls back to writing zeroes.

use std::{
    alloc::{Layout, alloc_zeroed, dealloc},
    fs::{File, OpenOptions},
    os::unix::{fs::FileExt, fs::OpenOptionsExt, io::AsRawFd},
    path::{Path, PathBuf},
};

use super::{BlockError, BlockNode, BlockResult, Pending, WriteOp, check_op, check_range};

const DIRECT_ALIGN: usize = 4096;

/// A raw file node.
#[derive(Debug)]
pub struct FileNode {
    file: File,
    path: PathBuf,
    size: u64,
    read_only: bool,
    direct: bool,
}

impl FileNode {
    /// Opens `path`. The size is the file's length (block devices: their capacity).
    pub fn open(path: &Path, read_only: bool, direct: bool) -> BlockResult<Self> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(!read_only);
        if direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts
            .open(path)
            .map_err(|e| BlockError::io(format!("opening {}", path.display()), e))?;
        let size = file_size(&file)
            .map_err(|e| BlockError::io(format!("size of {}", path.display()), e))?;
        Ok(FileNode {
            file,
            path: path.to_owned(),
            size,
            read_only,
            direct,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn ctx(&self, op: &str, offset: u64, len: usize) -> String {
        format!("{op} of {len} bytes at {offset} in {}", self.path.display())
    }

    fn aligned(&self, offset: u64, len: usize, addr: usize) -> bool {
        !self.direct
            || (offset.is_multiple_of(DIRECT_ALIGN as u64)
                && len.is_multiple_of(DIRECT_ALIGN)
                && addr.is_multiple_of(DIRECT_ALIGN))
    }

    fn write_inner(&self, buf: &[u8], offset: u64) -> BlockResult<()> {
        if self.aligned(offset, buf.len(), buf.as_ptr() as usize) {
            return self
                .file
                .write_all_at(buf, offset)
                .map_err(|e| BlockError::io(self.ctx("write", offset, buf.len()), e));
        }
        // O_DIRECT with an unaligned request: read-modify-write of the covering aligned range.
        let start = offset / DIRECT_ALIGN as u64 * DIRECT_ALIGN as u64;
        let end = (offset + buf.len() as u64).div_ceil(DIRECT_ALIGN as u64) * DIRECT_ALIGN as u64;
        let mut bounce = AlignedBuf::new((end - start) as usize)?;
        let pos = (offset - start) as usize;
        let covered_end = end.min(self.size);
        let head_len = (covered_end - start) as usize;
        let head_len = head_len.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        read_full(&self.file, &mut bounce.as_mut()[..head_len], start)
            .map_err(|e| BlockError::io(self.ctx("read (bounce)", start, head_len), e))?;
        bounce.as_mut()[pos..pos + buf.len()].copy_from_slice(buf);
        self.file
            .write_all_at(bounce.as_ref(), start)
            .map_err(|e| BlockError::io(self.ctx("write (bounce)", start, bounce.len), e))
    }

    fn sync(&self) -> BlockResult<()> {
        self.file
            .sync_data()
            .map_err(|e| BlockError::io(format!("fdatasync of {}", self.path.display()), e))
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> std::io::Result<()> {
        let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate on a valid, owned fd with plain integer arguments.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, l) };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    fn zero_by_writing(&self, offset: u64, len: u64) -> BlockResult<()> {
        const CHUNK: u64 = 1 << 20;
        let zeroes = AlignedBuf::new(CHUNK as usize)?;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK) as usize;
            self.write_inner(&zeroes.as_ref()[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

fn read_full(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                // Past the end of file: the rest reads as zeroes.
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn file_size(file: &File) -> std::io::Result<u64> {
    let meta = file.metadata()?;
    use std::os::unix::fs::FileTypeExt;
    if meta.file_type().is_block_device() {
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 into `size`, which lives for the call.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), 0x8008_1272, &mut size as *mut u64) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(size)
    } else {
        Ok(meta.len())
    }
}

impl BlockNode for FileNode {
    fn size(&self) -> u64 {
        self.size
    }

    fn driver(&self) -> &'static str {
        "raw"
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        check_range("read", offset, buf.len() as u64, self.size)?;
        if self.aligned(offset, buf.len(), buf.as_ptr() as usize) {
            return read_full(&self.file, buf, offset)
                .map_err(|e| BlockError::io(self.ctx("read", offset, buf.len()), e));
        }
        let start = offset / DIRECT_ALIGN as u64 * DIRECT_ALIGN as u64;
        let end = (offset + buf.len() as u64).div_ceil(DIRECT_ALIGN as u64) * DIRECT_ALIGN as u64;
        let mut bounce = AlignedBuf::new((end - start) as usize)?;
        read_full(&self.file, bounce.as_mut(), start)
            .map_err(|e| BlockError::io(self.ctx("read (bounce)", start, bounce.len), e))?;
        let pos = (offset - start) as usize;
        let n = buf.len();
        buf.copy_from_slice(&bounce.as_ref()[pos..pos + n]);
        Ok(())
    }

    fn submit(&self, op: WriteOp<'_>) -> Pending {
        Pending::Ready(self.apply(op))
    }

    fn read_vectored_at(
        &self,
        bufs: &mut [std::io::IoSliceMut<'_>],
        offset: u64,
    ) -> BlockResult<()> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        check_range("read", offset, total as u64, self.size)?;
        if bufs.len() == 1 || !self.vec_aligned(offset, bufs.iter().map(|b| (b.as_ptr(), b.len())))
        {
            return self.read_vectored_fallback(bufs, offset);
        }
        let mut iov: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: every iovec points into one of `bufs`, each exclusively borrowed for the
        // call; preadv writes at most iov_len bytes into each.
        rw_vectored(&mut iov, offset, total, |iov, off| unsafe {
            libc::preadv(self.file.as_raw_fd(), iov.as_ptr(), iov.len() as i32, off)
        })
        .map_err(|e| BlockError::io(self.ctx("readv", offset, total), e))
    }

    fn write_vectored_at(
        &self,
        bufs: &[std::io::IoSlice<'_>],
        offset: u64,
        fua: bool,
    ) -> BlockResult<()> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        check_range("write", offset, total as u64, self.size)?;
        if self.read_only {
            return Err(BlockError::ReadOnly(self.path.display().to_string()));
        }
        if let [one] = bufs {
            return self.apply(WriteOp::Write {
                buf: one,
                offset,
                fua,
            });
        }
        if !self.vec_aligned(offset, bufs.iter().map(|b| (b.as_ptr(), b.len()))) {
            let mut tmp = Vec::with_capacity(total);
            for b in bufs {
                tmp.extend_from_slice(b);
            }
            return self.apply(WriteOp::Write {
                buf: &tmp,
                offset,
                fua,
            });
        }
        let mut iov: Vec<libc::iovec> = bufs
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: every iovec points into one of `bufs`, borrowed for the call; pwritev only
        // reads from them.
        rw_vectored(&mut iov, offset, total, |iov, off| unsafe {
            libc::pwritev(self.file.as_raw_fd(), iov.as_ptr(), iov.len() as i32, off)
        })
        .map_err(|e| BlockError::io(self.ctx("writev", offset, total), e))?;
        if fua { self.sync() } else { Ok(()) }
    }
}

/// Runs `op` (preadv/pwritev) until `total` bytes moved, advancing the iovecs after short
/// transfers. A read that hits end of file zero-fills the rest.
fn rw_vectored(
    iov: &mut [libc::iovec],
    offset: u64,
    total: usize,
    op: impl Fn(&[libc::iovec], libc::off_t) -> isize,
) -> std::io::Result<()> {
    let mut done = 0usize;
    let mut first = 0usize;
    while done < total {
        let Ok(off) = libc::off_t::try_from(offset + done as u64) else {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        };
        let live = &iov[first..];
        let n = op(&live[..live.len().min(1024)], off);
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            // End of file while reading: the rest reads as zeroes.
            for v in &iov[first..] {
                // SAFETY: each remaining iovec is valid for iov_len writable bytes (reads only
                // reach this point; a zero-length pwritev result cannot happen with bytes left).
                unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
            }
            return Ok(());
        }
        let mut n = n as usize;
        done += n;
        while n > 0 && first < iov.len() {
            let v = &mut iov[first];
            if n >= v.iov_len {
                n -= v.iov_len;
                first += 1;
            } else {
                // SAFETY: advancing inside the same buffer by less than its length.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                v.iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(())
}

impl FileNode {
    fn vec_aligned(&self, offset: u64, segs: impl Iterator<Item = (*const u8, usize)>) -> bool {
        if !self.direct {
            return true;
        }
        let mut ok = offset.is_multiple_of(DIRECT_ALIGN as u64);
        for (p, l) in segs {
            ok &= (p as usize).is_multiple_of(DIRECT_ALIGN) && l.is_multiple_of(DIRECT_ALIGN);
        }
        ok
    }

    fn read_vectored_fallback(
        &self,
        bufs: &mut [std::io::IoSliceMut<'_>],
        mut offset: u64,
    ) -> BlockResult<()> {
        for b in bufs.iter_mut() {
            self.read_at(b, offset)?;
            offset += b.len() as u64;
        }
        Ok(())
    }
}

impl FileNode {
    fn apply(&self, op: WriteOp<'_>) -> BlockResult<()> {
        check_op(&op, self.size)?;
        if self.read_only && !matches!(op, WriteOp::Flush) {
            return Err(BlockError::ReadOnly(self.path.display().to_string()));
        }
        match op {
            WriteOp::Write { buf, offset, fua } => {
                self.write_inner(buf, offset)?;
                if fua { self.sync() } else { Ok(()) }
            }
            WriteOp::Flush => self.sync(),
            WriteOp::Discard { offset, len } => {
                if len == 0 {
                    return Ok(());
                }
                // Discard is advisory: an unsupported punch-hole is not an error.
                let _ = self.fallocate(
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                );
                Ok(())
            }
            WriteOp::WriteZeroes {
                offset,
                len,
                unmap,
                fua,
            } => {
                if len == 0 {
                    return Ok(());
                }
                let mode = if unmap {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                };
                if self.fallocate(mode, offset, len).is_err() {
                    self.zero_by_writing(offset, len)?;
                }
                if fua { self.sync() } else { Ok(()) }
            }
        }
    }
}

/// A zeroed heap buffer aligned for O_DIRECT.
struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
    layout: Layout,
}

// SAFETY: the buffer is exclusively owned heap memory.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn new(len: usize) -> BlockResult<Self> {
        let layout = Layout::from_size_align(len.max(DIRECT_ALIGN), DIRECT_ALIGN)
            .map_err(|_| BlockError::Config(format!("bad bounce buffer size {len}")))?;
        // SAFETY: layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(BlockError::io(
                "allocating a bounce buffer",
                std::io::Error::from_raw_os_error(libc::ENOMEM),
            ));
        }
        Ok(AlignedBuf { ptr, len, layout })
    }
    fn as_ref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len (<= layout size) initialised bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated with this layout in `new`.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_zero_roundtrip_and_range_checks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, vec![0x11u8; 1 << 20]).unwrap();
        for direct in [false, true] {
            let node = match FileNode::open(&p, false, direct) {
                Ok(n) => n,
                Err(e) if direct => {
                    eprintln!("SKIPPED: O_DIRECT not supported here: {e}");
                    continue;
                }
                Err(e) => panic!("{e}"),
            };
            assert_eq!(node.size(), 1 << 20);
            node.write_at(&[0xab; 100], 4000, false).unwrap();
            let mut b = [0u8; 200];
            node.read_at(&mut b, 3950).unwrap();
            assert_eq!(&b[..50], &[0x11; 50]);
            assert_eq!(&b[50..150], &[0xab; 100]);
            assert_eq!(&b[150..], &[0x11; 50]);
            node.write_zeroes(8192, 4096, false).unwrap();
            let mut z = [1u8; 4096];
            node.read_at(&mut z, 8192).unwrap();
            assert!(z.iter().all(|&x| x == 0));
            assert!(matches!(
                node.read_at(&mut b, (1 << 20) - 10),
                Err(BlockError::OutOfRange { .. })
            ));
            let e = node.write_at(&b, 1 << 20, false).unwrap_err();
            assert_eq!(e.errno(), libc::ENOSPC);
            node.flush().unwrap();
        }
        let node = FileNode::open(&p, false, false).unwrap();
        let (a, b2) = ([0x5au8; 700], [0xa5u8; 3396]);
        node.write_vectored_at(
            &[std::io::IoSlice::new(&a), std::io::IoSlice::new(&b2)],
            65536,
            false,
        )
        .unwrap();
        let (mut x, mut y) = ([0u8; 100], [0u8; 3996]);
        node.read_vectored_at(
            &mut [
                std::io::IoSliceMut::new(&mut x),
                std::io::IoSliceMut::new(&mut y),
            ],
            65536,
        )
        .unwrap();
        assert_eq!(x, [0x5a; 100]);
        assert!(y[..600].iter().all(|&v| v == 0x5a) && y[600..].iter().all(|&v| v == 0xa5));
        let ro = FileNode::open(&p, true, false).unwrap();
        assert!(matches!(
            ro.write_at(&[1], 0, false),
            Err(BlockError::ReadOnly(_))
        ));
    }
}
