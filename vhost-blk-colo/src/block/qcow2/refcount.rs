//! Refcounts of host clusters and the cluster allocator.
//!
//! The refcount table and every refcount block it names are held decoded in memory (loaded and
//! checked at open; one block describes `cluster_size * 8 / refcount_bits` host clusters, 32768
//! of them with the defaults). Every change is written through to the file at once, before the
//! caller writes anything that refers to the cluster, so a crash leaves at worst a leaked
//! cluster. New clusters are taken at the end of the used area (`end`); a missing refcount block
//! is created at the allocation point and, when it falls in its own range, describes itself.
//! A full refcount table is replaced by a larger copy at the end of the file (header updated
//! with one 12-byte write, old table freed afterwards).

use std::collections::HashMap;

use super::header::{MAX_REFTABLE_BYTES, Qcow2Error, REFT_OFFSET_MASK, RT_OFFSET_FIELD};
use super::io::ImageFile;

/// Writes `buf` at `offset`, with context on failure.
pub(super) fn pwrite(
    file: &ImageFile,
    buf: &[u8],
    offset: u64,
    what: &str,
) -> Result<(), Qcow2Error> {
    file.pwrite(buf, offset, what)
}

/// Reads `buf.len()` bytes at `offset`; bytes past the end of the file read as zero.
pub(super) fn pread(
    file: &ImageFile,
    buf: &mut [u8],
    offset: u64,
    what: &str,
) -> Result<(), Qcow2Error> {
    file.pread(buf, offset, what)
}

/// The refcount structures of one image.
#[derive(Debug)]
pub(super) struct Refcounts {
    cluster_bits: u32,
    order: u32,
    /// Refcount table entries (host offsets of blocks, 0 = none).
    pub table: Vec<u64>,
    pub table_offset: u64,
    pub table_clusters: u64,
    /// Decoded blocks by block index.
    blocks: HashMap<u64, Vec<u64>>,
    /// First host cluster index past everything in use: the allocation cursor.
    pub end: u64,
}

impl Refcounts {
    /// Loads the table and every block it names; validates the offsets.
    pub fn load(
        file: &ImageFile,
        file_len: u64,
        cluster_bits: u32,
        order: u32,
        table_offset: u64,
        table_clusters: u64,
    ) -> Result<Self, Qcow2Error> {
        let cs = 1u64 << cluster_bits;
        let mut raw = vec![0u8; (table_clusters * cs) as usize];
        pread(file, &mut raw, table_offset, "the refcount table")?;
        let table: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        let mut r = Refcounts {
            cluster_bits,
            order,
            table,
            table_offset,
            table_clusters,
            blocks: HashMap::new(),
            end: file_len.div_ceil(cs),
        };
        let mut buf = vec![0u8; cs as usize];
        let mut seen = std::collections::HashSet::new();
        for (b, &e) in r.table.iter().enumerate() {
            if e == 0 {
                continue;
            }
            let off = e & REFT_OFFSET_MASK;
            if e & !REFT_OFFSET_MASK != 0 || off == 0 || off >= file_len {
                return Err(Qcow2Error::Corrupt(format!(
                    "refcount table entry {b} ({e:#x}) is not a cluster inside the file"
                )));
            }
            // Distinct blocks inside the file bound the memory to a multiple of its length.
            if !seen.insert(off) {
                return Err(Qcow2Error::Corrupt(format!(
                    "refcount block at {off:#x} is named twice in the refcount table"
                )));
            }
            pread(file, &mut buf, off, "a refcount block")?;
            let w = 1usize << (order - 3);
            let vals = buf
                .chunks_exact(w)
                .map(|c| c.iter().fold(0u64, |a, &x| (a << 8) | u64::from(x)))
                .collect();
            r.blocks.insert(b as u64, vals);
        }
        Ok(r)
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Host clusters described by one block.
    pub fn per_block(&self) -> u64 {
        (self.cs() * 8) >> self.order
    }

    fn entry_bytes(&self) -> usize {
        1 << (self.order - 3)
    }

    /// Refcount of host cluster `c` (0 where no block exists).
    pub fn get(&self, c: u64) -> u64 {
        let epb = self.per_block();
        self.blocks
            .get(&(c / epb))
            .map(|b| b[(c % epb) as usize])
            .unwrap_or(0)
    }

    /// Host clusters of the refcount table and of every block.
    pub fn metadata_clusters(&self) -> Vec<u64> {
        let cb = self.cluster_bits;
        let first = self.table_offset >> cb;
        let mut v: Vec<u64> = (first..first + self.table_clusters).collect();
        v.extend(
            self.table
                .iter()
                .filter(|&&e| e != 0)
                .map(|e| (e & REFT_OFFSET_MASK) >> cb),
        );
        v
    }

    fn encode(&self, v: u64) -> Vec<u8> {
        let w = self.entry_bytes();
        v.to_be_bytes()[8 - w..].to_vec()
    }

    /// Sets the refcount of `c` in memory and in the file. The block must exist.
    pub fn set(&mut self, file: &ImageFile, c: u64, v: u64) -> Result<(), Qcow2Error> {
        let epb = self.per_block();
        let b = c / epb;
        let blk_off = self.table.get(b as usize).copied().unwrap_or(0) & REFT_OFFSET_MASK;
        let Some(blk) = self.blocks.get_mut(&b).filter(|_| blk_off != 0) else {
            return Err(Qcow2Error::Corrupt(format!(
                "no refcount block for host cluster {c}"
            )));
        };
        blk[(c % epb) as usize] = v;
        let pos = blk_off + (c % epb) * self.entry_bytes() as u64;
        pwrite(file, &self.encode(v), pos, "a refcount")
    }

    /// Sets refcounts in memory only; returns the touched block indexes (write them with
    /// [`Refcounts::write_block`]).
    pub fn set_mem(&mut self, c: u64, v: u64) -> Option<u64> {
        let epb = self.per_block();
        let b = c / epb;
        let blk = self.blocks.get_mut(&b)?;
        blk[(c % epb) as usize] = v;
        Some(b)
    }

    fn block_bytes(&self, vals: &[u64]) -> Vec<u8> {
        let w = self.entry_bytes();
        let mut out = vec![0u8; vals.len() * w];
        for (chunk, &v) in out.chunks_exact_mut(w).zip(vals) {
            if v != 0 {
                chunk.copy_from_slice(&v.to_be_bytes()[8 - w..]);
            }
        }
        out
    }

    /// Writes block `b` whole.
    pub fn write_block(&self, file: &ImageFile, b: u64) -> Result<(), Qcow2Error> {
        let off = self.table.get(b as usize).copied().unwrap_or(0) & REFT_OFFSET_MASK;
        let Some(vals) = self.blocks.get(&b).filter(|_| off != 0) else {
            return Ok(());
        };
        pwrite(file, &self.block_bytes(vals), off, "a refcount block")
    }

    fn write_table_entry(&self, file: &ImageFile, b: u64) -> Result<(), Qcow2Error> {
        let e = self.table[b as usize];
        pwrite(
            file,
            &e.to_be_bytes(),
            self.table_offset + b * 8,
            "a refcount table entry",
        )
    }

    fn has_block(&self, b: u64) -> bool {
        self.table.get(b as usize).is_some_and(|&e| e != 0)
    }

    /// Allocates `n` contiguous host clusters (refcount 1, written) and returns the first
    /// cluster index.
    pub fn alloc(&mut self, file: &ImageFile, n: u64) -> Result<u64, Qcow2Error> {
        let epb = self.per_block();
        loop {
            let s = self.end;
            let last = s
                .checked_add(n - 1)
                .filter(|&l| l < (1u64 << (56 - self.cluster_bits)))
                .ok_or_else(|| Qcow2Error::Corrupt("host offsets exhausted".into()))?;
            if let Some(b) = (s / epb..=last / epb).find(|&b| !self.has_block(b)) {
                self.make_block(file, b)?;
                continue;
            }
            // A cluster already counted here (leftover of a corrupt image): skip past it.
            if let Some(used) = (s..=last).rev().find(|&c| self.get(c) != 0) {
                self.end = used + 1;
                continue;
            }
            for c in s..=last {
                self.set(file, c, 1)?;
            }
            self.end = last + 1;
            return Ok(s);
        }
    }

    /// Creates refcount block `b` at the allocation cursor.
    fn make_block(&mut self, file: &ImageFile, b: u64) -> Result<(), Qcow2Error> {
        if b as usize >= self.table.len() {
            return self.grow_table(file, b + 1);
        }
        let epb = self.per_block();
        let p = self.end;
        let mut vals = vec![0u64; epb as usize];
        if p / epb == b {
            vals[(p % epb) as usize] = 1;
        } else {
            // `p` lies in an earlier range, whose block exists (the caller asks in order).
            self.set(file, p, 1)?;
        }
        let off = p << self.cluster_bits;
        pwrite(file, &self.block_bytes(&vals), off, "a new refcount block")?;
        self.blocks.insert(b, vals);
        self.table[b as usize] = off;
        self.end = p + 1;
        self.write_table_entry(file, b)
    }

    /// Replaces the refcount table with one of at least `min_entries` entries.
    fn grow_table(&mut self, file: &ImageFile, min_entries: u64) -> Result<(), Qcow2Error> {
        let cs = self.cs();
        let epb = self.per_block();
        let p = self.end;
        let want = min_entries
            .max(self.table.len() as u64 * 2)
            .max(p / epb + 16);
        let nc = (want * 8).div_ceil(cs);
        if nc * cs > MAX_REFTABLE_BYTES {
            return Err(Qcow2Error::Unsupported(format!(
                "image too large: the refcount table would exceed {MAX_REFTABLE_BYTES} bytes"
            )));
        }
        let mut table = self.table.clone();
        table.resize((nc * cs / 8) as usize, 0);
        // Clusters [p, next) hold the new table and then any new blocks needed to count them.
        let mut next = p + nc;
        let mut new_blocks: Vec<u64> = Vec::new();
        let mut c = p;
        while c < next {
            let b = c / epb;
            if table[b as usize] == 0 {
                table[b as usize] = next << self.cluster_bits;
                new_blocks.push(b);
                next += 1;
            }
            c += 1;
        }
        for &b in &new_blocks {
            self.blocks.insert(b, vec![0; epb as usize]);
        }
        self.table = table;
        let old_first = self.table_offset >> self.cluster_bits;
        let old_n = self.table_clusters;
        let mut touched = Vec::new();
        for c in p..next {
            if let Some(b) = self.set_mem(c, 1) {
                touched.push(b);
            }
        }
        touched.sort_unstable();
        touched.dedup();
        // New and changed blocks first, then the new table, then the header, then free the
        // old table: a crash in between leaves the old structures valid (and leaks).
        for &b in &touched {
            self.write_block(file, b)?;
        }
        let mut raw = Vec::with_capacity((nc * cs) as usize);
        for e in &self.table {
            raw.extend_from_slice(&e.to_be_bytes());
        }
        pwrite(file, &raw, p << self.cluster_bits, "the new refcount table")?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&(p << self.cluster_bits).to_be_bytes());
        hdr[8..].copy_from_slice(&(nc as u32).to_be_bytes());
        pwrite(
            file,
            &hdr,
            RT_OFFSET_FIELD,
            "the header's refcount table fields",
        )?;
        self.table_offset = p << self.cluster_bits;
        self.table_clusters = nc;
        self.end = next;
        for c in old_first..old_first + old_n {
            self.set(file, c, 0)?;
        }
        tracing::debug!(clusters = nc, "qcow2 refcount table grown");
        Ok(())
    }

    /// Frees every block among `candidates` that counts nothing but (possibly) itself.
    pub fn release_empty_blocks(
        &mut self,
        file: &ImageFile,
        candidates: &[u64],
    ) -> Result<(), Qcow2Error> {
        let epb = self.per_block();
        for &b in candidates {
            let off = self.table.get(b as usize).copied().unwrap_or(0) & REFT_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            let own = off >> self.cluster_bits;
            let Some(vals) = self.blocks.get(&b) else {
                continue;
            };
            let only_self = vals
                .iter()
                .enumerate()
                .all(|(i, &v)| v == 0 || (own / epb == b && i as u64 == own % epb));
            if !only_self {
                continue;
            }
            self.table[b as usize] = 0;
            self.write_table_entry(file, b)?;
            self.blocks.remove(&b);
            if own / epb != b {
                self.set(file, own, 0)?;
            }
        }
        Ok(())
    }

    /// Host clusters with a non-zero refcount that are not in `referenced`.
    pub fn counted_except(&self, referenced: &std::collections::HashSet<u64>) -> Vec<u64> {
        let epb = self.per_block();
        let mut v = Vec::new();
        for (&b, vals) in &self.blocks {
            for (i, &r) in vals.iter().enumerate() {
                let c = b * epb + i as u64;
                if r != 0 && !referenced.contains(&c) {
                    v.push(c);
                }
            }
        }
        v.sort_unstable();
        v
    }

    /// 1 + the highest host cluster with a non-zero refcount (0 when none).
    pub fn used_end(&self) -> u64 {
        let epb = self.per_block();
        let mut idx: Vec<&u64> = self.blocks.keys().collect();
        idx.sort_unstable_by(|a, b| b.cmp(a));
        for &b in idx {
            if let Some(i) = self.blocks[&b].iter().rposition(|&v| v != 0) {
                return b * epb + i as u64 + 1;
            }
        }
        0
    }
}
