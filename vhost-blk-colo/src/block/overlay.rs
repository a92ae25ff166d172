//! `overlay` driver: a sparse copy-on-write layer in RAM over a backing node.
//!
//! Data lives in clusters (64 KiB by default) held in a map keyed by cluster index: the map's
//! keys are the allocation bitmap. Reads take allocated clusters from the map and the rest from
//! the backing node; a partial write to an unallocated cluster first copies the cluster from the
//! backing node. [`OverlayNode::make_empty`] drops the map, so it costs time proportional to
//! what the overlay holds, not to the disk size. The COLO secondary uses two of these as its
//! active and hidden disks (QEMU's docs put those on a ramdisk too).

use std::{
    collections::HashMap,
    sync::{
        RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use super::{BlockError, BlockNode, BlockResult, NodeRef, Pending, WriteOp, check_op, check_range};

/// Default cluster size.
pub const DEFAULT_CLUSTER: u64 = 64 << 10;

/// A sparse overlay.
pub struct OverlayNode {
    backing: NodeRef,
    size: u64,
    cluster: u64,
    map: RwLock<HashMap<u64, Box<[u8]>>>,
    generation: AtomicU64,
}

impl std::fmt::Debug for OverlayNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OverlayNode")
            .field("size", &self.size)
            .field("allocated", &self.allocated_count())
            .finish()
    }
}

fn poisoned() -> BlockError {
    BlockError::Config("overlay lock poisoned".into())
}

impl OverlayNode {
    /// An empty overlay over `backing` (same size) with clusters of `cluster` bytes.
    pub fn new(backing: NodeRef, cluster: u64) -> BlockResult<Self> {
        if cluster == 0 || !cluster.is_power_of_two() || cluster < 512 {
            return Err(BlockError::Config(format!(
                "overlay cluster size {cluster} must be a power of two >= 512"
            )));
        }
        let size = backing.size();
        Ok(OverlayNode {
            backing,
            size,
            cluster,
            map: RwLock::new(HashMap::new()),
            generation: AtomicU64::new(0),
        })
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.cluster
    }

    /// The backing node.
    pub fn backing(&self) -> &NodeRef {
        &self.backing
    }

    /// Number of allocated clusters.
    pub fn allocated_count(&self) -> usize {
        self.map.read().map(|m| m.len()).unwrap_or(0)
    }

    /// Allocated cluster indexes, sorted.
    pub fn allocated(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .map
            .read()
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default();
        v.sort_unstable();
        v
    }

    /// True when cluster `idx` is allocated here.
    pub fn is_allocated(&self, idx: u64) -> bool {
        self.map
            .read()
            .map(|m| m.contains_key(&idx))
            .unwrap_or(false)
    }

    /// Drops every allocated cluster (the overlay then reads as its backing node).
    pub fn make_empty(&self) {
        if let Ok(mut m) = self.map.write() {
            *m = HashMap::new();
        }
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    /// Removes and returns cluster `idx` (its full `cluster_size` bytes, clipped at the end of
    /// the device).
    pub fn take_cluster(&self, idx: u64) -> Option<Box<[u8]>> {
        self.map.write().ok().and_then(|mut m| m.remove(&idx))
    }

    /// Stores `data` as cluster `idx` unless it is already allocated (copy-before-write).
    pub fn insert_if_absent(&self, idx: u64, data: Box<[u8]>) -> BlockResult<()> {
        let mut m = self.map.write().map_err(|_| poisoned())?;
        m.entry(idx).or_insert(data);
        Ok(())
    }

    /// Length of cluster `idx` (the last one may be short).
    pub fn cluster_len(&self, idx: u64) -> usize {
        let start = idx * self.cluster;
        (self.size - start).min(self.cluster) as usize
    }

    /// Applies `f` to the pieces of `[offset, offset+len)` cut at cluster boundaries:
    /// `(cluster index, offset within cluster, position within the request, length)`.
    fn pieces(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Iterator<Item = (u64, usize, usize, usize)> + '_ {
        let cl = self.cluster;
        let mut pos = 0u64;
        std::iter::from_fn(move || {
            if pos >= len {
                return None;
            }
            let abs = offset + pos;
            let idx = abs / cl;
            let within = abs % cl;
            let n = (cl - within).min(len - pos);
            let item = (idx, within as usize, pos as usize, n as usize);
            pos += n;
            Some(item)
        })
    }

    fn write_piece(
        &self,
        m: &mut HashMap<u64, Box<[u8]>>,
        idx: u64,
        within: usize,
        data: Option<&[u8]>,
        n: usize,
    ) -> BlockResult<()> {
        let clen = self.cluster_len(idx);
        if let Some(c) = m.get_mut(&idx) {
            match data {
                Some(d) => c[within..within + n].copy_from_slice(d),
                None => c[within..within + n].fill(0),
            }
            return Ok(());
        }
        let mut c = vec![0u8; clen].into_boxed_slice();
        if n < clen {
            self.backing.read_at(&mut c, idx * self.cluster)?;
        }
        match data {
            Some(d) => c[within..within + n].copy_from_slice(d),
            None => c[within..within + n].fill(0),
        }
        m.insert(idx, c);
        Ok(())
    }
}

impl BlockNode for OverlayNode {
    fn size(&self) -> u64 {
        self.size
    }

    fn driver(&self) -> &'static str {
        "overlay"
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        check_range("read", offset, buf.len() as u64, self.size)?;
        let m = self.map.read().map_err(|_| poisoned())?;
        for (idx, within, pos, n) in self.pieces(offset, buf.len() as u64) {
            match m.get(&idx) {
                Some(c) => buf[pos..pos + n].copy_from_slice(&c[within..within + n]),
                None => self
                    .backing
                    .read_at(&mut buf[pos..pos + n], offset + pos as u64)?,
            }
        }
        Ok(())
    }

    fn submit(&self, op: WriteOp<'_>) -> Pending {
        Pending::Ready((|| {
            check_op(&op, self.size)?;
            match op {
                WriteOp::Write { buf, offset, .. } => {
                    let mut m = self.map.write().map_err(|_| poisoned())?;
                    for (idx, within, pos, n) in self.pieces(offset, buf.len() as u64) {
                        self.write_piece(&mut m, idx, within, Some(&buf[pos..pos + n]), n)?;
                    }
                    Ok(())
                }
                WriteOp::WriteZeroes { offset, len, .. } => {
                    let mut m = self.map.write().map_err(|_| poisoned())?;
                    for (idx, within, _, n) in self.pieces(offset, len) {
                        self.write_piece(&mut m, idx, within, None, n)?;
                    }
                    Ok(())
                }
                // Discarded data may read as anything; keeping it is the cheapest valid answer.
                WriteOp::Discard { .. } | WriteOp::Flush => Ok(()),
            }
        })())
    }
}

/// Checks that a node's size matches, for layered graphs.
pub fn check_same_size(what: &str, a: u64, b: u64) -> BlockResult<()> {
    if a != b {
        return Err(BlockError::Config(format!(
            "{what}: sizes differ ({a} vs {b} bytes)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::block::mem::MemNode;

    #[test]
    fn overlay_shadows_backing_and_make_empty_reverts() {
        let base = Arc::new(MemNode::from_vec(vec![7u8; 1 << 20]));
        let ov = OverlayNode::new(base.clone(), 4096).unwrap();
        ov.write_at(&[1; 100], 4090, false).unwrap();
        let mut b = vec![0u8; 200];
        ov.read_at(&mut b, 4000).unwrap();
        assert_eq!(&b[..90], &[7; 90][..]);
        assert_eq!(&b[90..190], &[1; 100][..]);
        assert_eq!(&b[190..], &[7; 10][..]);
        assert_eq!(ov.allocated(), vec![0, 1]);
        assert!(base.snapshot().iter().all(|&x| x == 7), "backing untouched");
        ov.write_zeroes(8192, 4096, true).unwrap();
        let mut z = vec![1u8; 4096];
        ov.read_at(&mut z, 8192).unwrap();
        assert!(z.iter().all(|&x| x == 0));
        ov.make_empty();
        assert_eq!(ov.allocated_count(), 0);
        ov.read_at(&mut b, 4000).unwrap();
        assert!(b.iter().all(|&x| x == 7));
        assert!(OverlayNode::new(base, 1000).is_err());
    }
}
