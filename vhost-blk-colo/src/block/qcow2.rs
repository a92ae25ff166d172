//! `qcow2` driver: qcow2 files as copy-on-write overlays (the COLO secondary's active and hidden
//! disks as the seed makes them with `qemu-img create -f qcow2`).
//!
//! Overlay semantics like [`super::overlay`]: unallocated clusters read from the *lower* node
//! (the backing node named in the drive options, never a file named in the header), a write to
//! an unallocated cluster allocates one, copying the untouched part of the cluster from the
//! lower node. [`Qcow2Node::make_empty`] (what a checkpoint calls) clears the L1 table, frees
//! every cluster the image holds and truncates the file: its cost is proportional to what the
//! image holds. Flush is `fdatasync`. After our writes and after make-empty, `qemu-img check`
//! reports no errors and no leaks.
//!
//! Supported: version 2 and 3 images with any cluster size (512 B to 2 MiB) and refcount widths
//! of 8 to 64 bits, no backing file in the header, no encryption, no internal snapshots, no
//! compressed clusters, no extended L2 entries, no external data file, no persistent bitmaps;
//! anything else is refused at open with a [`Qcow2Error`] naming it. The header, every table
//! offset and every L1/L2/refcount entry are checked against the file at open (each referenced
//! cluster inside the file, counted exactly once, referenced once), so a corrupt image gives an
//! error, never a panic or a hang, and the write path can rely on those facts.
//!
//! Metadata: the L1 table, every L2 table and every refcount block live decoded in memory
//! (bounded by what the image holds) and each change is written through at once, in the order
//! refcount → table or data → reference (L2 entry, then L1 entry), so a crashed process leaves at
//! worst leaked clusters (`qemu-img check -r leaks` reclaims them; the unit tests cut every
//! operation after each of its file writes and check exactly that); opening an image for writing
//! frees such leaks, so a checkpoint after a crash leaves a clean image. Power-loss ordering would
//! need a barrier between those steps; the COLO overlays are scratch state rebuilt by the next
//! checkpoint, so this driver does not pay for one.
//!
//! Why our own code: the crates we found are read-only (`qcow`, `qcow2`, `qcow2-core`) or
//! async-only with their own I/O engines and header-named backing files (`qcow2-rs`), while this
//! node must serve the synchronous [`BlockNode`] trait over a backing *node* and implement
//! make-empty. Written from the published format description; no QEMU code.

pub mod header;
mod io;
mod refcount;
#[cfg(test)]
mod tests;

use std::{
    collections::HashMap,
    collections::HashSet,
    fs::{File, OpenOptions},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::RwLock,
};

pub use header::Qcow2Error;
use header::{COMPRESSED, COPIED, L1_RESERVED, L2_RESERVED, OFFSET_MASK, ZERO};
use io::ImageFile;
use refcount::{Refcounts, pread, pwrite};

use super::{BlockError, BlockNode, BlockResult, NodeRef, Pending, WriteOp, check_op, check_range};

impl From<Qcow2Error> for BlockError {
    fn from(e: Qcow2Error) -> Self {
        match e {
            Qcow2Error::Io { context, source } => BlockError::Io { context, source },
            other => BlockError::Config(format!("qcow2: {other}")),
        }
    }
}

/// Where a guest cluster's data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Map {
    /// Not in this image: read the lower node.
    Unallocated,
    /// Reads as zeroes (version 3 zero flag), optionally with a preallocated host cluster.
    Zero(Option<u64>),
    /// At this host offset.
    Data(u64),
}

fn map_of(e: u64) -> Map {
    let off = e & OFFSET_MASK;
    if e & ZERO != 0 {
        Map::Zero((off != 0).then_some(off))
    } else if off != 0 {
        Map::Data(off)
    } else {
        Map::Unallocated
    }
}

#[derive(Debug)]
struct Meta {
    l1: Vec<u64>,
    /// L2 tables by L1 index.
    l2: HashMap<u64, Vec<u64>>,
    refs: Refcounts,
    /// Guest clusters with an L2 entry (data or zero).
    allocated: usize,
}

/// A qcow2 image used as an overlay over a lower node.
pub struct Qcow2Node {
    file: ImageFile,
    path: PathBuf,
    lower: Option<NodeRef>,
    size: u64,
    cluster_bits: u32,
    l1_offset: u64,
    read_only: bool,
    meta: RwLock<Meta>,
}

impl std::fmt::Debug for Qcow2Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Node")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("cluster_size", &self.cluster_size())
            .finish()
    }
}

fn poisoned() -> BlockError {
    BlockError::Config("qcow2 lock poisoned".into())
}

fn be_entries(raw: &[u8]) -> Vec<u64> {
    raw.chunks_exact(8)
        .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

/// True when the file at `path` starts with the qcow2 magic (for driver probing).
pub fn is_qcow2(path: &Path) -> bool {
    let mut m = [0u8; 4];
    File::open(path)
        .and_then(|f| f.read_exact_at(&mut m, 0))
        .map(|()| u32::from_be_bytes(m) == header::MAGIC)
        .unwrap_or(false)
}

impl Qcow2Node {
    /// Opens the image at `path` over `lower` (`None`: unallocated clusters read as zeroes).
    pub fn open(path: &Path, lower: Option<NodeRef>, read_only: bool) -> Result<Self, Qcow2Error> {
        let ctx = |what: &str| format!("{what} {}", path.display());
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| Qcow2Error::io(ctx("opening"), e))?;
        Self::from_file(file, path, lower, read_only)
    }

    /// Opens an already open image file (tests and fuzzing use a memfd).
    pub fn from_file(
        file: File,
        path: &Path,
        lower: Option<NodeRef>,
        read_only: bool,
    ) -> Result<Self, Qcow2Error> {
        let file = ImageFile::new(file, path);
        let file_len = file.len()?;
        let mut head = vec![0u8; file_len.min(1 << 21) as usize];
        pread(&file, &mut head, 0, "the header")?;
        let h = header::parse(&head, file_len)?;
        let cb = h.cluster_bits;
        let cs = 1u64 << cb;

        let mut raw = vec![0u8; h.l1_size as usize * 8];
        pread(&file, &mut raw, h.l1_offset, "the L1 table")?;
        let l1 = be_entries(&raw);
        let refs = Refcounts::load(
            &file,
            file_len,
            cb,
            h.refcount_order,
            h.rt_offset,
            u64::from(h.rt_clusters),
        )?;

        // Every cluster the image references, with what references it.
        let mut seen: HashSet<u64> = HashSet::new();
        let mut note = |c: u64, what: &dyn Fn() -> String| -> Result<(), Qcow2Error> {
            if !seen.insert(c) {
                return Err(Qcow2Error::Corrupt(format!(
                    "host cluster {c} is used twice ({})",
                    what()
                )));
            }
            if refs.get(c) != 1 {
                return Err(Qcow2Error::Corrupt(format!(
                    "host cluster {c} ({}) has refcount {}, expected 1 (run `qemu-img check -r all`)",
                    what(),
                    refs.get(c)
                )));
            }
            Ok(())
        };
        note(0, &|| "header".into())?;
        let l1_first = h.l1_offset >> cb;
        for c in l1_first..l1_first + (u64::from(h.l1_size) * 8).div_ceil(cs) {
            note(c, &|| "L1 table".into())?;
        }
        for c in refs.metadata_clusters() {
            note(c, &|| "refcount structure".into())?;
        }
        let mut l2 = HashMap::new();
        let mut allocated = 0;
        let mut tbl = vec![0u8; cs as usize];
        for (i, &e) in l1.iter().enumerate() {
            if e == 0 {
                continue;
            }
            let off = e & OFFSET_MASK;
            if e & L1_RESERVED != 0 || off == 0 || off >= file_len {
                return Err(Qcow2Error::Corrupt(format!(
                    "L1 entry {i} ({e:#x}) is not a cluster inside the file"
                )));
            }
            note(off >> cb, &|| format!("L2 table of L1 entry {i}"))?;
            pread(&file, &mut tbl, off, "an L2 table")?;
            let entries = be_entries(&tbl);
            for (j, &e2) in entries.iter().enumerate() {
                if e2 == 0 {
                    continue;
                }
                let guest = (((i as u64) << (cb - 3)) | j as u64) << cb;
                if e2 & COMPRESSED != 0 {
                    return Err(Qcow2Error::Unsupported(format!(
                        "compressed cluster at guest offset {guest:#x}"
                    )));
                }
                let off2 = e2 & OFFSET_MASK;
                if e2 & L2_RESERVED != 0 || off2 >= file_len || (e2 & ZERO != 0 && h.version < 3) {
                    return Err(Qcow2Error::Corrupt(format!(
                        "L2 entry for guest offset {guest:#x} ({e2:#x}) is invalid"
                    )));
                }
                if guest >= h.size {
                    return Err(Qcow2Error::Corrupt(format!(
                        "L2 entry for guest offset {guest:#x} beyond the virtual size {}",
                        h.size
                    )));
                }
                if off2 != 0 {
                    note(off2 >> cb, &|| format!("data of guest offset {guest:#x}"))?;
                }
                allocated += 1;
            }
            l2.insert(i as u64, entries);
        }
        let max_used = seen.iter().max().map(|&c| c + 1).unwrap_or(0);
        let mut refs = refs;
        if !read_only {
            // Leaked clusters (counted, referenced by nothing: what a crash can leave) are
            // freed, as `qemu-img check -r leaks` would.
            let leaked = refs.counted_except(&seen);
            if !leaked.is_empty() {
                tracing::warn!(
                    image = %path.display(),
                    clusters = leaked.len(),
                    "qcow2: freeing leaked clusters"
                );
                let mut blocks: Vec<u64> =
                    leaked.iter().filter_map(|&c| refs.set_mem(c, 0)).collect();
                blocks.sort_unstable();
                blocks.dedup();
                for b in blocks {
                    refs.write_block(&file, b)?;
                }
            }
        }
        let rt_end = (h.rt_offset >> cb) + u64::from(h.rt_clusters);
        refs.end = refs.end.max(max_used).max(rt_end);
        Ok(Qcow2Node {
            file,
            path: path.to_owned(),
            lower,
            size: h.size,
            cluster_bits: cb,
            l1_offset: h.l1_offset,
            read_only,
            meta: RwLock::new(Meta {
                l1,
                l2,
                refs,
                allocated,
            }),
        })
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Tests: every file write after the next `n` fails, as if the process died there.
    #[cfg(test)]
    pub(crate) fn crash_after(&self, n: i64) {
        self.file
            .budget
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The lower (backing) node.
    pub fn lower(&self) -> Option<&NodeRef> {
        self.lower.as_ref()
    }

    /// Length of guest cluster `idx` (the last one may be short).
    pub fn cluster_len(&self, idx: u64) -> usize {
        let start = idx << self.cluster_bits;
        self.size.saturating_sub(start).min(self.cluster_size()) as usize
    }

    /// Number of guest clusters this image holds.
    pub fn allocated_count(&self) -> usize {
        self.meta.read().map(|m| m.allocated).unwrap_or(0)
    }

    /// Guest cluster indexes this image holds, sorted.
    pub fn allocated(&self) -> Vec<u64> {
        let Ok(m) = self.meta.read() else {
            return Vec::new();
        };
        let shift = self.cluster_bits - 3;
        let mut v: Vec<u64> =
            m.l2.iter()
                .flat_map(|(&i, t)| {
                    t.iter()
                        .enumerate()
                        .filter(|(_, e)| **e != 0)
                        .map(move |(j, _)| (i << shift) | j as u64)
                })
                .collect();
        v.sort_unstable();
        v
    }

    /// True when guest cluster `idx` is held here.
    pub fn is_allocated(&self, idx: u64) -> bool {
        self.meta
            .read()
            .map(|m| self.lookup(&m, idx) != Map::Unallocated)
            .unwrap_or(false)
    }

    fn lookup(&self, m: &Meta, idx: u64) -> Map {
        let shift = self.cluster_bits - 3;
        let e =
            m.l2.get(&(idx >> shift))
                .map(|t| t[(idx & ((1 << shift) - 1)) as usize])
                .unwrap_or(0);
        map_of(e)
    }

    /// Checks that guest cluster `idx` starts inside the device.
    fn check_cluster(&self, op: &'static str, idx: u64) -> BlockResult<()> {
        match idx.checked_shl(self.cluster_bits) {
            Some(start) if idx < (1 << (63 - self.cluster_bits)) && start < self.size => Ok(()),
            _ => Err(BlockError::OutOfRange {
                op,
                offset: idx.saturating_mul(self.cluster_size()),
                len: self.cluster_size(),
                size: self.size,
            }),
        }
    }

    /// Reads from the lower node, zeroes past its end or without one.
    fn read_lower(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        let Some(lower) = &self.lower else {
            buf.fill(0);
            return Ok(());
        };
        let lsize = lower.size();
        let n = lsize.saturating_sub(offset).min(buf.len() as u64) as usize;
        if n > 0 {
            lower.read_at(&mut buf[..n], offset)?;
        }
        buf[n..].fill(0);
        Ok(())
    }

    /// Pieces of `[offset, offset+len)` cut at cluster boundaries:
    /// `(cluster index, offset within cluster, position within the request, length)`.
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, usize, usize, usize)> {
        let cb = self.cluster_bits;
        let cs = 1u64 << cb;
        let mut pos = 0u64;
        std::iter::from_fn(move || {
            if pos >= len {
                return None;
            }
            let abs = offset + pos;
            let within = abs & (cs - 1);
            let n = (cs - within).min(len - pos);
            let item = (abs >> cb, within as usize, pos as usize, n as usize);
            pos += n;
            Some(item)
        })
    }

    /// Writes one L2 entry (memory and file).
    fn set_l2(&self, m: &mut Meta, idx: u64, e: u64) -> BlockResult<()> {
        let shift = self.cluster_bits - 3;
        let l1i = idx >> shift;
        let j = idx & ((1 << shift) - 1);
        let tbl_off = m.l1[l1i as usize] & OFFSET_MASK;
        let Some(t) = m.l2.get_mut(&l1i).filter(|_| tbl_off != 0) else {
            return Err(BlockError::Config(format!(
                "qcow2 {}: no L2 table for cluster {idx}",
                self.path.display()
            )));
        };
        t[j as usize] = e;
        pwrite(&self.file, &e.to_be_bytes(), tbl_off + j * 8, "an L2 entry")?;
        Ok(())
    }

    /// Makes sure the L2 table covering guest cluster `idx` exists.
    fn ensure_l2(&self, m: &mut Meta, idx: u64) -> BlockResult<()> {
        let l1i = idx >> (self.cluster_bits - 3);
        if m.l1[l1i as usize] != 0 {
            return Ok(());
        }
        let c = m.refs.alloc(&self.file, 1)?;
        let off = c << self.cluster_bits;
        let cs = self.cluster_size() as usize;
        pwrite(&self.file, &vec![0u8; cs], off, "a new L2 table")?;
        let e = off | COPIED;
        pwrite(
            &self.file,
            &e.to_be_bytes(),
            self.l1_offset + l1i * 8,
            "an L1 entry",
        )?;
        m.l1[l1i as usize] = e;
        m.l2.insert(l1i, vec![0; cs / 8]);
        Ok(())
    }

    /// Writes `data` (or zeroes) into guest cluster `idx` at `within`, allocating as needed.
    /// Runs under the write lock.
    fn write_piece(
        &self,
        m: &mut Meta,
        idx: u64,
        within: usize,
        data: Option<&[u8]>,
        n: usize,
    ) -> BlockResult<()> {
        let cs = self.cluster_size() as usize;
        let (host, base) = match self.lookup(m, idx) {
            Map::Data(h) => {
                let buf_z;
                let d = match data {
                    Some(d) => d,
                    None => {
                        buf_z = vec![0u8; n];
                        &buf_z
                    }
                };
                return Ok(pwrite(&self.file, d, h + within as u64, "data")?);
            }
            Map::Zero(h) => (h, None),
            Map::Unallocated => (None, Some(())),
        };
        let mut buf = vec![0u8; cs];
        let clen = self.cluster_len(idx);
        if base.is_some() && n < clen {
            self.read_lower(&mut buf[..clen], idx << self.cluster_bits)?;
        }
        match data {
            Some(d) => buf[within..within + n].copy_from_slice(d),
            None => buf[within..within + n].fill(0),
        }
        self.ensure_l2(m, idx)?;
        let h = match host {
            Some(h) => h,
            None => m.refs.alloc(&self.file, 1)? << self.cluster_bits,
        };
        pwrite(&self.file, &buf, h, "a data cluster")?;
        self.set_l2(m, idx, h | COPIED)?;
        if base.is_some() {
            m.allocated += 1;
        }
        Ok(())
    }

    fn write_range(&self, offset: u64, len: u64, data: Option<&[u8]>) -> BlockResult<()> {
        // Fast path: every piece already has a host cluster; no metadata changes.
        {
            let m = self.meta.read().map_err(|_| poisoned())?;
            let all = self
                .pieces(offset, len)
                .all(|(idx, ..)| matches!(self.lookup(&m, idx), Map::Data(_)));
            if all {
                let zero = data
                    .is_none()
                    .then(|| vec![0u8; self.cluster_size() as usize]);
                for (idx, within, pos, n) in self.pieces(offset, len) {
                    let Map::Data(h) = self.lookup(&m, idx) else {
                        continue;
                    };
                    let d = match (data, &zero) {
                        (Some(d), _) => &d[pos..pos + n],
                        (None, Some(z)) => &z[..n],
                        (None, None) => continue,
                    };
                    pwrite(&self.file, d, h + within as u64, "data")?;
                }
                return Ok(());
            }
        }
        let mut m = self.meta.write().map_err(|_| poisoned())?;
        for (idx, within, pos, n) in self.pieces(offset, len) {
            self.write_piece(&mut m, idx, within, data.map(|d| &d[pos..pos + n]), n)?;
        }
        Ok(())
    }

    fn sync(&self) -> BlockResult<()> {
        Ok(self.file.sync()?)
    }

    /// Empties the image: the L1 table is cleared, every cluster it held is freed, refcount
    /// blocks left counting nothing are dropped and the file is truncated to what remains.
    /// Costs time proportional to what the image held.
    pub fn make_empty(&self) -> BlockResult<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly(self.path.display().to_string()));
        }
        let mut m = self.meta.write().map_err(|_| poisoned())?;
        let cb = self.cluster_bits;
        let mut freed = Vec::new();
        let mut l2 = std::mem::take(&mut m.l2);
        for (l1i, t) in l2.drain() {
            freed.push((m.l1[l1i as usize] & OFFSET_MASK) >> cb);
            freed.extend(
                t.iter()
                    .map(|e| e & OFFSET_MASK)
                    .filter(|&o| o != 0)
                    .map(|o| o >> cb),
            );
        }
        m.allocated = 0;
        if freed.is_empty() {
            return Ok(());
        }
        // References first (L1), then refcounts: a crash in between only leaks.
        let dirty: Vec<usize> = (0..m.l1.len()).filter(|&i| m.l1[i] != 0).collect();
        if let (Some(&lo), Some(&hi)) = (dirty.first(), dirty.last()) {
            for i in lo..=hi {
                m.l1[i] = 0;
            }
            let zeros = vec![0u8; (hi - lo + 1) * 8];
            pwrite(
                &self.file,
                &zeros,
                self.l1_offset + lo as u64 * 8,
                "the L1 table",
            )?;
        }
        let mut blocks: Vec<u64> = freed.iter().filter_map(|&c| m.refs.set_mem(c, 0)).collect();
        blocks.sort_unstable();
        blocks.dedup();
        for &b in &blocks {
            m.refs.write_block(&self.file, b)?;
        }
        m.refs.release_empty_blocks(&self.file, &blocks)?;
        let end = m.refs.used_end();
        let flen = self.file.len()?;
        let new_len = end << cb;
        if new_len < flen {
            self.file.set_len(new_len)?;
        }
        let rt_end = (m.refs.table_offset >> cb) + m.refs.table_clusters;
        let file_end = flen.min(new_len).div_ceil(1 << cb);
        m.refs.end = end.max(rt_end).max(file_end);
        Ok(())
    }

    /// Removes guest cluster `idx` from the image and returns its content (its
    /// [`Qcow2Node::cluster_len`] bytes), or `None` when the image does not hold it.
    pub fn take_cluster(&self, idx: u64) -> BlockResult<Option<Box<[u8]>>> {
        self.check_cluster("take-cluster", idx)?;
        let mut m = self.meta.write().map_err(|_| poisoned())?;
        let clen = self.cluster_len(idx);
        let (data, host) = match self.lookup(&m, idx) {
            Map::Unallocated => return Ok(None),
            Map::Zero(h) => (vec![0u8; clen], h),
            Map::Data(h) => {
                let mut d = vec![0u8; clen];
                pread(&self.file, &mut d, h, "a data cluster")?;
                (d, Some(h))
            }
        };
        self.set_l2(&mut m, idx, 0)?;
        if let Some(h) = host {
            m.refs.set(&self.file, h >> self.cluster_bits, 0)?;
        }
        m.allocated = m.allocated.saturating_sub(1);
        Ok(Some(data.into_boxed_slice()))
    }

    /// Stores `data` (a whole cluster, clipped at the end of the device) as guest cluster `idx`
    /// unless the image already holds it (copy-before-write).
    pub fn insert_if_absent(&self, idx: u64, data: &[u8]) -> BlockResult<()> {
        self.check_cluster("insert-cluster", idx)?;
        let mut m = self.meta.write().map_err(|_| poisoned())?;
        if self.lookup(&m, idx) != Map::Unallocated {
            return Ok(());
        }
        let clen = self.cluster_len(idx);
        if data.len() != clen {
            return Err(BlockError::Config(format!(
                "qcow2 {}: cluster {idx} needs {clen} bytes, got {}",
                self.path.display(),
                data.len()
            )));
        }
        self.write_piece(&mut m, idx, 0, Some(data), clen)
    }
}

impl BlockNode for Qcow2Node {
    fn size(&self) -> u64 {
        self.size
    }

    fn driver(&self) -> &'static str {
        "qcow2"
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        check_range("read", offset, buf.len() as u64, self.size)?;
        let m = self.meta.read().map_err(|_| poisoned())?;
        // Runs of pieces that can be served by one call: unallocated (one lower read), zero,
        // or data at contiguous host offsets (one pread).
        #[derive(Clone, Copy, PartialEq)]
        enum Run {
            Lower,
            Zero,
            Host(u64),
        }
        let mut run: Option<(Run, usize, usize)> = None; // (kind, start pos, length)
        let flush = |buf: &mut [u8], r: (Run, usize, usize)| -> BlockResult<()> {
            let (kind, pos, len) = r;
            let piece = &mut buf[pos..pos + len];
            match kind {
                Run::Lower => self.read_lower(piece, offset + pos as u64),
                Run::Zero => {
                    piece.fill(0);
                    Ok(())
                }
                Run::Host(h) => Ok(pread(&self.file, piece, h, "data")?),
            }
        };
        for (idx, within, pos, n) in self.pieces(offset, buf.len() as u64) {
            let kind = match self.lookup(&m, idx) {
                Map::Unallocated => Run::Lower,
                Map::Zero(_) => Run::Zero,
                Map::Data(h) => Run::Host(h + within as u64),
            };
            run = match run {
                Some((k, p, l)) if k == kind && !matches!(k, Run::Host(_)) => Some((k, p, l + n)),
                Some((Run::Host(h0), p, l)) if kind == Run::Host(h0 + l as u64) => {
                    Some((Run::Host(h0), p, l + n))
                }
                Some(prev) => {
                    flush(buf, prev)?;
                    Some((kind, pos, n))
                }
                None => Some((kind, pos, n)),
            };
        }
        if let Some(r) = run {
            flush(buf, r)?;
        }
        Ok(())
    }

    fn submit(&self, op: WriteOp<'_>) -> Pending {
        Pending::Ready((|| {
            check_op(&op, self.size)?;
            if self.read_only && !matches!(op, WriteOp::Flush) {
                return Err(BlockError::ReadOnly(self.path.display().to_string()));
            }
            match op {
                WriteOp::Write { buf, offset, fua } => {
                    self.write_range(offset, buf.len() as u64, Some(buf))?;
                    if fua { self.sync() } else { Ok(()) }
                }
                WriteOp::WriteZeroes {
                    offset, len, fua, ..
                } => {
                    self.write_range(offset, len, None)?;
                    if fua { self.sync() } else { Ok(()) }
                }
                // Discarded data may read as anything; keeping it is the cheapest valid answer.
                WriteOp::Discard { .. } => Ok(()),
                WriteOp::Flush => self.sync(),
            }
        })())
    }
}
