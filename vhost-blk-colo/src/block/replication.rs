//! `replication` driver: QEMU's COLO block replication, both modes.
//!
//! **Primary** ([`ReplicationPrimary`]): the node sits under the primary's quorum beside the
//! local disk; its child is an NBD client to the secondary. In stage `running` every write is
//! forwarded; a forwarding failure (dead, slow or unreachable secondary, bounded by the NBD
//! node's timeout) never fails the guest: the error is recorded, the child is dropped, the event
//! `COLO_BLK_SECONDARY_LOST` is emitted and the primary runs on unprotected. Reads are refused
//! (the quorum reads the local disk first).
//!
//! **Secondary** ([`ReplicationSecondary`]): the guest sees the *active* overlay over the
//! *hidden* overlay over the *base* disk. The base is exported by NBD through a
//! copy-before-write node ([`CbwNode`]): before a primary write lands on a base cluster, the old
//! cluster is copied into the hidden disk (once per checkpoint interval). A checkpoint empties
//! active and hidden (time proportional to what they hold); afterwards the base equals the
//! primary's disk. Failover folds hidden and then active into the base while the guest keeps
//! running, cluster by cluster, with progress, then the guest works on the base directly.
//!
//! Stages: `none` → `running` (start) → `done` (stop) or `failover` → `done` /
//! `failover-failed`. I/O in stage `none` fails with EIO as in QEMU.

use std::{
    sync::{
        Arc, Condvar, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use serde_json::{Value, json};

use super::{
    BlockError, BlockNode, BlockResult, EventSink, NodeRef, Pending, WriteOp, check_range,
    overlay::OverlayNode, qcow2::Qcow2Node,
};

/// What the secondary needs of its active and hidden disks: the native RAM overlay
/// ([`OverlayNode`]) or a qcow2 file ([`Qcow2Node`]).
pub trait OverlayLayer: BlockNode {
    /// Cluster size in bytes.
    fn cluster_size(&self) -> u64;
    /// Number of clusters held.
    fn allocated_count(&self) -> usize;
    /// Held cluster indexes, sorted.
    fn allocated(&self) -> Vec<u64>;
    /// True when cluster `idx` is held.
    fn is_allocated(&self, idx: u64) -> bool;
    /// Drops everything held (time proportional to what is held).
    fn make_empty(&self) -> BlockResult<()>;
    /// Removes cluster `idx` and returns its content.
    fn take_cluster(&self, idx: u64) -> BlockResult<Option<Box<[u8]>>>;
    /// Stores a whole cluster unless it is already held.
    fn insert_if_absent(&self, idx: u64, data: Box<[u8]>) -> BlockResult<()>;
    /// Length of cluster `idx` (the last one may be short).
    fn cluster_len(&self, idx: u64) -> usize;
    /// This layer as a plain block node (the lower node of the layer above).
    fn as_node(self: Arc<Self>) -> NodeRef;
}

impl OverlayLayer for OverlayNode {
    fn cluster_size(&self) -> u64 {
        OverlayNode::cluster_size(self)
    }
    fn allocated_count(&self) -> usize {
        OverlayNode::allocated_count(self)
    }
    fn allocated(&self) -> Vec<u64> {
        OverlayNode::allocated(self)
    }
    fn is_allocated(&self, idx: u64) -> bool {
        OverlayNode::is_allocated(self, idx)
    }
    fn make_empty(&self) -> BlockResult<()> {
        OverlayNode::make_empty(self);
        Ok(())
    }
    fn take_cluster(&self, idx: u64) -> BlockResult<Option<Box<[u8]>>> {
        Ok(OverlayNode::take_cluster(self, idx))
    }
    fn insert_if_absent(&self, idx: u64, data: Box<[u8]>) -> BlockResult<()> {
        OverlayNode::insert_if_absent(self, idx, data)
    }
    fn cluster_len(&self, idx: u64) -> usize {
        OverlayNode::cluster_len(self, idx)
    }
    fn as_node(self: Arc<Self>) -> NodeRef {
        self
    }
}

impl OverlayLayer for Qcow2Node {
    fn cluster_size(&self) -> u64 {
        Qcow2Node::cluster_size(self)
    }
    fn allocated_count(&self) -> usize {
        Qcow2Node::allocated_count(self)
    }
    fn allocated(&self) -> Vec<u64> {
        Qcow2Node::allocated(self)
    }
    fn is_allocated(&self, idx: u64) -> bool {
        Qcow2Node::is_allocated(self, idx)
    }
    fn make_empty(&self) -> BlockResult<()> {
        Qcow2Node::make_empty(self)
    }
    fn take_cluster(&self, idx: u64) -> BlockResult<Option<Box<[u8]>>> {
        Qcow2Node::take_cluster(self, idx)
    }
    fn insert_if_absent(&self, idx: u64, data: Box<[u8]>) -> BlockResult<()> {
        Qcow2Node::insert_if_absent(self, idx, &data)
    }
    fn cluster_len(&self, idx: u64) -> usize {
        Qcow2Node::cluster_len(self, idx)
    }
    fn as_node(self: Arc<Self>) -> NodeRef {
        self
    }
}

/// Which kind of layer a drive option map asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerSpec {
    /// The native RAM overlay with this cluster size.
    Overlay {
        /// Cluster size in bytes.
        cluster: u64,
    },
    /// A qcow2 image file.
    Qcow2 {
        /// The image's path.
        path: std::path::PathBuf,
    },
}

impl LayerSpec {
    /// Interprets one layer's options (`driver`, `file.filename` or `filename`, `cluster-size`),
    /// as found under `file.` (active) or `file.backing.` (hidden) of a secondary replication
    /// drive. Without `driver`, a named file is probed: a qcow2 file gives qcow2; no file gives
    /// the native overlay.
    pub fn from_opts(
        o: &std::collections::BTreeMap<String, String>,
        what: &str,
        default_cluster: u64,
    ) -> BlockResult<Self> {
        let filename = o
            .get("file.filename")
            .or_else(|| o.get("filename"))
            .map(std::path::PathBuf::from);
        let driver = match (o.get("driver").map(String::as_str), &filename) {
            (Some(d), _) => d.to_owned(),
            (None, Some(p)) if super::qcow2::is_qcow2(p) => "qcow2".to_owned(),
            (None, Some(p)) => {
                return Err(BlockError::Config(format!(
                    "{what}: {} is not a qcow2 image (create it with `qemu-img create -f qcow2`)",
                    p.display()
                )));
            }
            (None, None) => "overlay".to_owned(),
        };
        match (driver.as_str(), filename) {
            ("overlay", None) => Ok(LayerSpec::Overlay {
                cluster: o
                    .get("cluster-size")
                    .map(|v| v.parse())
                    .transpose()
                    .map_err(|_| BlockError::Config(format!("{what}: bad cluster-size")))?
                    .unwrap_or(default_cluster),
            }),
            ("overlay", Some(_)) => Err(BlockError::Config(format!(
                "{what}: the native overlay lives in memory and takes no file; use driver=qcow2"
            ))),
            ("qcow2", Some(path)) => Ok(LayerSpec::Qcow2 { path }),
            ("qcow2", None) => Err(BlockError::Config(format!(
                "{what}: driver=qcow2 needs file.filename=<image made by qemu-img create -f qcow2>"
            ))),
            (other, _) => Err(BlockError::Config(format!(
                "{what}: driver {other:?} cannot be an active or hidden disk (overlay or qcow2)"
            ))),
        }
    }

    /// The active and hidden disks of a secondary replication drive: the active disk's options
    /// are `file.*` (without `file.backing.*`), the hidden disk's `file.backing.*` — QEMU's
    /// nesting, e.g. `file.driver=qcow2,file.file.filename=A,file.backing.driver=qcow2,
    /// file.backing.file.filename=H`.
    pub fn secondary_pair(
        o: &std::collections::BTreeMap<String, String>,
        name: &str,
        default_cluster: u64,
    ) -> BlockResult<(LayerSpec, LayerSpec)> {
        let sub = |prefix: &str| -> std::collections::BTreeMap<String, String> {
            let p = format!("{prefix}.");
            o.iter()
                .filter_map(|(k, v)| k.strip_prefix(&p).map(|r| (r.to_owned(), v.clone())))
                .collect()
        };
        let mut ao = sub("file");
        ao.retain(|k, _| k != "backing" && !k.starts_with("backing."));
        let active = LayerSpec::from_opts(&ao, &format!("{name} active disk"), default_cluster)?;
        let hidden = LayerSpec::from_opts(
            &sub("file.backing"),
            &format!("{name} hidden disk"),
            default_cluster,
        )?;
        Ok((active, hidden))
    }

    /// Opens the layer over `lower`.
    pub fn open(&self, lower: NodeRef) -> BlockResult<Arc<dyn OverlayLayer>> {
        Ok(match self {
            LayerSpec::Overlay { cluster } => Arc::new(OverlayNode::new(lower, *cluster)?),
            LayerSpec::Qcow2 { path } => {
                Arc::new(Qcow2Node::open(path, Some(lower), false).map_err(|e| {
                    BlockError::Config(format!("qcow2 image {}: {e}", path.display()))
                })?)
            }
        })
    }
}

/// Replication stage (QEMU's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Not started.
    None,
    /// Replicating.
    Running,
    /// Secondary: folding active and hidden into the base.
    Failover,
    /// Secondary: folding failed.
    FailoverFailed,
    /// Stopped.
    Done,
}

impl Stage {
    /// QEMU's spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            Stage::None => "none",
            Stage::Running => "running",
            Stage::Failover => "failover",
            Stage::FailoverFailed => "failover-failed",
            Stage::Done => "done",
        }
    }
}

fn lock_err() -> BlockError {
    BlockError::Replication("lock poisoned".into())
}

/// Shared pieces of the primary node that a pending forward needs when it fails.
#[derive(Clone)]
struct PrimaryShared {
    node_name: Arc<str>,
    child: Arc<RwLock<Option<NodeRef>>>,
    error: Arc<Mutex<Option<String>>>,
    events: EventSink,
}

impl PrimaryShared {
    fn lose(&self, why: &str) {
        if let Ok(mut e) = self.error.lock() {
            *e = Some(why.to_owned());
        }
        let had = self
            .child
            .write()
            .map(|mut c| c.take().is_some())
            .unwrap_or(false);
        if had {
            tracing::warn!(node = %self.node_name, "secondary lost, running unprotected: {why}");
            (self.events)(
                "COLO_BLK_SECONDARY_LOST",
                json!({"node-name": &*self.node_name, "error": why}),
            );
        }
    }
}

/// Chunk size and the chunks written since their last copy, while an initial sync runs.
type DirtyChunks = Mutex<Option<(u64, std::collections::BTreeSet<u64>)>>;

fn mark_dirty(dirty: &DirtyChunks, range: Option<(u64, u64)>) {
    if let Some((offset, len)) = range
        && let Ok(mut d) = dirty.lock()
        && let Some((chunk, set)) = d.as_mut()
    {
        for c in offset / *chunk..=(offset + len - 1) / *chunk {
            set.insert(c);
        }
    }
}

/// The primary side's replication node.
pub struct ReplicationPrimary {
    shared: PrimaryShared,
    size: u64,
    stage: Mutex<Stage>,
    forwarded: Arc<AtomicU64>,
    /// While an initial sync runs: chunk size and the chunks written since their last copy.
    dirty: Arc<DirtyChunks>,
    sync_done: AtomicU64,
    sync_total: AtomicU64,
}

impl std::fmt::Debug for ReplicationPrimary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationPrimary")
            .field("node_name", &self.shared.node_name)
            .finish()
    }
}

impl ReplicationPrimary {
    /// A primary replication node named `node_name` over `child` (the NBD client).
    pub fn new(node_name: &str, child: NodeRef, events: EventSink) -> Self {
        ReplicationPrimary {
            size: child.size(),
            shared: PrimaryShared {
                node_name: node_name.into(),
                child: Arc::new(RwLock::new(Some(child))),
                error: Arc::new(Mutex::new(None)),
                events,
            },
            stage: Mutex::new(Stage::None),
            forwarded: Arc::new(AtomicU64::new(0)),
            dirty: Arc::default(),
            sync_done: AtomicU64::new(0),
            sync_total: AtomicU64::new(0),
        }
    }

    /// Initial disk sync (what QEMU needs `drive-mirror` for): copies `source` (the primary's
    /// local disk) to the secondary through this node's NBD child, in `chunk`-byte pieces,
    /// while the guest runs. Replication must be running, so guest writes are forwarded; the
    /// chunks they touch are copied again until a pass finds none. Progress is in `status()`.
    pub fn sync_from(&self, source: &NodeRef, chunk: u64) -> BlockResult<()> {
        if self.stage() != Stage::Running {
            return Err(BlockError::Replication(format!(
                "{}: sync needs stage running",
                self.shared.node_name
            )));
        }
        if source.size() != self.size || chunk == 0 {
            return Err(BlockError::Config(format!(
                "{}: sync source size or chunk invalid",
                self.shared.node_name
            )));
        }
        let n = self.size.div_ceil(chunk);
        self.sync_total.store(n, Ordering::Relaxed);
        self.sync_done.store(0, Ordering::Relaxed);
        *self.dirty.lock().map_err(|_| lock_err())? = Some((chunk, (0..n).collect()));
        let result = (|| {
            let mut buf = vec![0u8; chunk as usize];
            loop {
                let next = {
                    let mut d = self.dirty.lock().map_err(|_| lock_err())?;
                    d.as_mut().and_then(|(_, set)| set.pop_first())
                };
                let Some(c) = next else { return Ok(()) };
                let off = c * chunk;
                let len = (self.size - off).min(chunk) as usize;
                source.read_at(&mut buf[..len], off)?;
                let child = self.shared.child.read().ok().and_then(|c| c.clone());
                let Some(child) = child else {
                    return Err(BlockError::Replication("secondary lost during sync".into()));
                };
                child.write_at(&buf[..len], off, false)?;
                self.sync_done.fetch_add(1, Ordering::Relaxed);
            }
        })();
        if let Ok(mut d) = self.dirty.lock() {
            *d = None;
        }
        if let Err(e) = &result {
            self.shared.lose(&e.to_string());
        } else if let Some(child) = self.shared.child.read().ok().and_then(|c| c.clone()) {
            child.flush()?;
        }
        result
    }

    fn mark_dirty(&self, range: Option<(u64, u64)>) {
        mark_dirty(&self.dirty, range);
    }

    /// Node name.
    pub fn node_name(&self) -> &str {
        &self.shared.node_name
    }

    /// Current stage.
    pub fn stage(&self) -> Stage {
        self.stage.lock().map(|s| *s).unwrap_or(Stage::Done)
    }

    /// Starts replicating.
    pub fn start(&self) -> BlockResult<()> {
        let mut s = self.stage.lock().map_err(|_| lock_err())?;
        if *s == Stage::Running {
            return Err(BlockError::Replication(format!(
                "{}: already running",
                self.shared.node_name
            )));
        }
        *s = Stage::Running;
        Ok(())
    }

    /// Stops replicating (QEMU: stage done; no data moves on the primary).
    pub fn stop(&self) {
        if let Ok(mut s) = self.stage.lock() {
            *s = Stage::Done;
        }
    }

    /// Whether the secondary is still attached.
    pub fn connected(&self) -> bool {
        self.shared
            .child
            .read()
            .map(|c| c.is_some())
            .unwrap_or(false)
    }

    /// Status for `colo-blk-status`.
    pub fn status(&self) -> Value {
        json!({
            "node-name": &*self.shared.node_name,
            "mode": "primary",
            "stage": self.stage().as_str(),
            "secondary-connected": self.connected(),
            "forwarded-writes": self.forwarded.load(Ordering::Relaxed),
            "sync": {"done": self.sync_done.load(Ordering::Relaxed), "total": self.sync_total.load(Ordering::Relaxed)},
            "error": self.shared.error.lock().ok().and_then(|e| e.clone()),
        })
    }
}

impl BlockNode for ReplicationPrimary {
    fn size(&self) -> u64 {
        self.size
    }

    fn driver(&self) -> &'static str {
        "replication"
    }

    fn submits_async(&self) -> bool {
        true
    }

    fn responsive(&self) -> bool {
        // Unprotected (no secondary) or not running: writes complete at once.
        self.shared
            .child
            .read()
            .map(|c| c.as_ref().is_none_or(|n| n.responsive()))
            .unwrap_or(false)
    }

    fn read_at(&self, _buf: &mut [u8], _offset: u64) -> BlockResult<()> {
        Err(BlockError::Replication(format!(
            "{}: reads are not served by a primary replication node",
            self.shared.node_name
        )))
    }

    fn submit(&self, op: WriteOp<'_>) -> Pending {
        let stage = self.stage();
        if stage != Stage::Running {
            return Pending::Ready(Err(BlockError::Replication(format!(
                "{}: {} refused in stage {}",
                self.shared.node_name,
                op.name(),
                stage.as_str()
            ))));
        }
        // While an initial sync runs, the chunks this write touches are marked for copying
        // (again). The quorum starts this node before the local write, so they are marked
        // once more when the completion is collected, which is after the local write: a copy
        // taken from then on reads the new data.
        let range = op.range().filter(|&(_, len)| len > 0);
        self.mark_dirty(range);
        let child = self.shared.child.read().ok().and_then(|c| c.clone());
        let Some(child) = child else {
            // Unprotected: the secondary was dropped; the guest's write is fine without it.
            return Pending::Ready(Ok(()));
        };
        let p = child.submit(op);
        let shared = self.shared.clone();
        let forwarded = self.forwarded.clone();
        let is_write = !matches!(op, WriteOp::Flush);
        let dirty = self.dirty.clone();
        Pending::Wait(Box::new(move || {
            mark_dirty(&dirty, range);
            match p.wait() {
                Ok(()) if is_write => {
                    forwarded.fetch_add(1, Ordering::Relaxed);
                }
                Ok(()) => {}
                // Swallowed: a dead secondary never fails the guest's I/O.
                Err(e) => shared.lose(&e.to_string()),
            }
            Ok(())
        }))
    }
}

/// Byte ranges in use on the secondary, widened to whole clusters of both overlays.
///
/// A primary write through the CBW node (copy old clusters into hidden, then write the base)
/// must not interleave with a secondary guest request that reads the same clusters through
/// hidden from the base (it could see the new base data while hidden is still empty), nor with
/// another primary write of the same clusters. Requests on disjoint ranges proceed in parallel;
/// guest requests never wait for each other.
struct RangeLocks {
    align: u64,
    /// (id, start, end, held by a primary write)
    held: Mutex<Vec<(u64, u64, u64, bool)>>,
    freed: Condvar,
    /// Threads waiting on `freed` (changed under `held`): a release wakes nobody, and costs no
    /// futex syscall, when it is 0, as it is on every request of a queue-depth-1 primary.
    waiters: AtomicU64,
    next: AtomicU64,
}

struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    id: u64,
}

impl RangeLocks {
    fn new(align: u64) -> Self {
        RangeLocks {
            align: align.max(1),
            held: Mutex::new(Vec::new()),
            freed: Condvar::new(),
            waiters: AtomicU64::new(0),
            next: AtomicU64::new(0),
        }
    }

    /// Waits until `[offset, offset+len)` (widened to clusters) overlaps no conflicting holder,
    /// then holds it until the guard drops. `primary` conflicts with everyone; guest requests
    /// conflict only with primary writes.
    fn lock(&self, offset: u64, len: u64, primary: bool) -> BlockResult<RangeGuard<'_>> {
        let start = offset / self.align * self.align;
        let end = offset
            .saturating_add(len)
            .div_ceil(self.align)
            .saturating_mul(self.align);
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut held = self.held.lock().map_err(|_| lock_err())?;
        while held
            .iter()
            .any(|&(_, s, e, p)| (p || primary) && s < end && start < e)
        {
            self.waiters.fetch_add(1, Ordering::Relaxed);
            let r = self.freed.wait(held);
            self.waiters.fetch_sub(1, Ordering::Relaxed);
            held = r.map_err(|_| lock_err())?;
        }
        held.push((id, start, end, primary));
        Ok(RangeGuard { locks: self, id })
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = match self.locks.held.lock() {
            Ok(h) => h,
            Err(p) => p.into_inner(),
        };
        if let Some(i) = held.iter().position(|x| x.0 == self.id) {
            held.swap_remove(i);
        }
        // Read under the lock: a waiter counts itself before it releases `held` in `wait`.
        let wake = self.locks.waiters.load(Ordering::Relaxed) > 0;
        drop(held);
        if wake {
            self.locks.freed.notify_all();
        }
    }
}

fn lcm(a: u64, b: u64) -> u64 {
    fn gcd(a: u64, b: u64) -> u64 {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    if a == 0 || b == 0 {
        a.max(b)
    } else {
        a / gcd(a, b) * b
    }
}

/// State shared by the secondary's guest-facing node, its CBW export node and the failover
/// thread.
struct SecondaryShared {
    active: Arc<dyn OverlayLayer>,
    hidden: Arc<dyn OverlayLayer>,
    base: NodeRef,
    /// Guest I/O and primary writes hold it shared; checkpoints and fold steps hold it
    /// exclusive.
    gate: RwLock<()>,
    /// Orders primary writes against guest I/O and other primary writes on the same clusters.
    ranges: RangeLocks,
    stage: Mutex<Stage>,
    checkpoints: AtomicU64,
    last_checkpoint_us: AtomicU64,
    cbw_copies: AtomicU64,
    fold_done: AtomicU64,
    fold_total: AtomicU64,
    error: Mutex<Option<String>>,
}

impl SecondaryShared {
    fn stage(&self) -> Stage {
        self.stage
            .lock()
            .map(|s| *s)
            .unwrap_or(Stage::FailoverFailed)
    }
    fn set_stage(&self, st: Stage) {
        if let Ok(mut s) = self.stage.lock() {
            *s = st;
        }
    }
}

/// The secondary side's replication node: what the secondary guest reads and writes.
pub struct ReplicationSecondary {
    id: String,
    shared: Arc<SecondaryShared>,
    cbw: Arc<CbwNode>,
    events: EventSink,
}

impl std::fmt::Debug for ReplicationSecondary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationSecondary")
            .field("id", &self.id)
            .finish()
    }
}

impl ReplicationSecondary {
    /// Builds the secondary graph: `active` over `hidden` over `base`. All three must have the
    /// same length and the overlays must be stacked (active's backing is hidden, hidden's is
    /// base) — the constructor builds them that way from the cluster size.
    pub fn new(id: &str, base: NodeRef, cluster: u64, events: EventSink) -> BlockResult<Self> {
        let spec = LayerSpec::Overlay { cluster };
        Self::with_layers(id, base, &spec, &spec, events)
    }

    /// Builds the secondary graph with the given kinds of active and hidden disks (hidden over
    /// `base`, active over hidden). As in QEMU, active, hidden and base must have the same
    /// length.
    pub fn with_layers(
        id: &str,
        base: NodeRef,
        active: &LayerSpec,
        hidden: &LayerSpec,
        events: EventSink,
    ) -> BlockResult<Self> {
        let hidden = hidden.open(base.clone())?;
        let active = active.open(hidden.clone().as_node())?;
        let (a, h, b) = (active.size(), hidden.size(), base.size());
        if a != b || h != b {
            return Err(BlockError::Config(format!(
                "{id}: active disk ({a} bytes), hidden disk ({h} bytes) and secondary disk \
                 ({b} bytes) must have the same length (qemu-img create -f qcow2 FILE {b})"
            )));
        }
        let align = lcm(active.cluster_size(), hidden.cluster_size());
        let shared = Arc::new(SecondaryShared {
            active,
            hidden,
            base,
            gate: RwLock::new(()),
            ranges: RangeLocks::new(align),
            stage: Mutex::new(Stage::None),
            checkpoints: AtomicU64::new(0),
            last_checkpoint_us: AtomicU64::new(0),
            cbw_copies: AtomicU64::new(0),
            fold_done: AtomicU64::new(0),
            fold_total: AtomicU64::new(0),
            error: Mutex::new(None),
        });
        let cbw = Arc::new(CbwNode {
            shared: shared.clone(),
        });
        Ok(ReplicationSecondary {
            id: id.to_owned(),
            shared,
            cbw,
            events,
        })
    }

    /// The node to export over NBD in place of the base (copy-before-write into hidden).
    pub fn export_node(&self) -> Arc<CbwNode> {
        self.cbw.clone()
    }

    /// The node id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Current stage.
    pub fn stage(&self) -> Stage {
        self.shared.stage()
    }

    /// Starts replication (and does a first checkpoint, as QEMU does).
    pub fn start(&self) -> BlockResult<()> {
        let st = self.stage();
        if st != Stage::None && st != Stage::Done {
            return Err(BlockError::Replication(format!(
                "{}: cannot start in stage {}",
                self.id,
                st.as_str()
            )));
        }
        self.shared.set_stage(Stage::Running);
        self.checkpoint()
    }

    /// Checkpoint: empties active and hidden. Afterwards the base equals the primary's disk.
    pub fn checkpoint(&self) -> BlockResult<()> {
        let st = self.stage();
        if st != Stage::Running {
            return Err(BlockError::Replication(format!(
                "{}: checkpoint in stage {}",
                self.id,
                st.as_str()
            )));
        }
        let t0 = Instant::now();
        let _g = self.shared.gate.write().map_err(|_| lock_err())?;
        self.shared.active.make_empty()?;
        self.shared.hidden.make_empty()?;
        let us = t0.elapsed().as_micros() as u64;
        self.shared.checkpoints.fetch_add(1, Ordering::Relaxed);
        self.shared.last_checkpoint_us.store(us, Ordering::Relaxed);
        Ok(())
    }

    /// Stop without failover: one more checkpoint (drops the secondary's own writes), stage done.
    pub fn stop(&self) -> BlockResult<()> {
        if self.stage() == Stage::Running {
            self.checkpoint()?;
        }
        self.shared.set_stage(Stage::Done);
        Ok(())
    }

    /// Failover: folds hidden and active into the base on a thread while the guest runs.
    /// Emits `BLOCK_JOB_COMPLETED` (type `commit`) at the end, or `BLOCK_JOB_ERROR`.
    pub fn failover(&self) -> BlockResult<std::thread::JoinHandle<()>> {
        let st = self.stage();
        if st != Stage::Running {
            return Err(BlockError::Replication(format!(
                "{}: failover in stage {}",
                self.id,
                st.as_str()
            )));
        }
        self.shared.set_stage(Stage::Failover);
        let sh = self.shared.clone();
        sh.fold_done.store(0, Ordering::Relaxed);
        sh.fold_total.store(
            (sh.hidden.allocated_count() + sh.active.allocated_count()) as u64,
            Ordering::Relaxed,
        );
        let events = self.events.clone();
        let id = self.id.clone();
        std::thread::Builder::new()
            .name("colo-failover".into())
            .spawn(move || {
                let t0 = Instant::now();
                match fold(&sh) {
                    Ok(()) => {
                        sh.set_stage(Stage::Done);
                        let n = sh.fold_done.load(Ordering::Relaxed);
                        tracing::info!(%id, clusters = n, ms = t0.elapsed().as_millis() as u64, "failover commit done");
                        events(
                            "BLOCK_JOB_COMPLETED",
                            json!({"type": "commit", "device": id, "len": sh.fold_total.load(Ordering::Relaxed),
                                   "offset": n, "speed": 0}),
                        );
                    }
                    Err(e) => {
                        sh.set_stage(Stage::FailoverFailed);
                        if let Ok(mut er) = sh.error.lock() {
                            *er = Some(e.to_string());
                        }
                        tracing::error!(%id, "failover commit failed: {e}");
                        events("BLOCK_JOB_ERROR", json!({"device": id, "operation": "write", "action": "stop", "error": e.to_string()}));
                    }
                }
            })
            .map_err(|e| BlockError::io("spawning the failover thread", e))
    }

    /// Status for `colo-blk-status`.
    pub fn status(&self) -> Value {
        let sh = &self.shared;
        json!({
            "node-name": self.id,
            "mode": "secondary",
            "stage": self.stage().as_str(),
            "active-clusters": sh.active.allocated_count(),
            "hidden-clusters": sh.hidden.allocated_count(),
            "cluster-size": sh.active.cluster_size(),
            "active-driver": sh.active.driver(),
            "hidden-driver": sh.hidden.driver(),
            "checkpoints": sh.checkpoints.load(Ordering::Relaxed),
            "last-checkpoint-us": sh.last_checkpoint_us.load(Ordering::Relaxed),
            "copy-before-write-clusters": sh.cbw_copies.load(Ordering::Relaxed),
            "failover": {"done": sh.fold_done.load(Ordering::Relaxed), "total": sh.fold_total.load(Ordering::Relaxed)},
            "error": sh.error.lock().ok().and_then(|e| e.clone()),
        })
    }
}

fn fold(sh: &SecondaryShared) -> BlockResult<()> {
    let cl = sh.active.cluster_size();
    let hcl = sh.hidden.cluster_size();
    for idx in sh.hidden.allocated() {
        let _g = sh.gate.write().map_err(|_| lock_err())?;
        if let Some(data) = sh.hidden.take_cluster(idx)? {
            if !(hcl == cl && sh.active.is_allocated(idx)) {
                sh.base.write_at(&data, idx * hcl, false)?;
            }
            sh.fold_done.fetch_add(1, Ordering::Relaxed);
        }
    }
    loop {
        let list = sh.active.allocated();
        if list.is_empty() {
            break;
        }
        for idx in list {
            let _g = sh.gate.write().map_err(|_| lock_err())?;
            if let Some(data) = sh.active.take_cluster(idx)? {
                sh.base.write_at(&data, idx * cl, false)?;
                sh.fold_done.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    // Final step under the gate: anything written meanwhile, then switch the guest to the base.
    let _g = sh.gate.write().map_err(|_| lock_err())?;
    for idx in sh.active.allocated() {
        if let Some(data) = sh.active.take_cluster(idx)? {
            sh.base.write_at(&data, idx * cl, false)?;
            sh.fold_done.fetch_add(1, Ordering::Relaxed);
        }
    }
    sh.base.flush()?;
    sh.set_stage(Stage::Done);
    Ok(())
}

impl BlockNode for ReplicationSecondary {
    fn size(&self) -> u64 {
        self.shared.base.size()
    }

    fn driver(&self) -> &'static str {
        "replication"
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        let _g = self.shared.gate.read().map_err(|_| lock_err())?;
        let _r = self.shared.ranges.lock(offset, buf.len() as u64, false)?;
        match self.shared.stage() {
            Stage::None => Err(BlockError::Replication(format!(
                "{}: read in stage none",
                self.id
            ))),
            Stage::Done => self.shared.base.read_at(buf, offset),
            _ => self.shared.active.read_at(buf, offset),
        }
    }

    fn submit(&self, op: WriteOp<'_>) -> Pending {
        let Ok(_g) = self.shared.gate.read() else {
            return Pending::Ready(Err(lock_err()));
        };
        let _r = match op.range() {
            Some((offset, len)) => match self.shared.ranges.lock(offset, len, false) {
                Ok(g) => Some(g),
                Err(e) => return Pending::Ready(Err(e)),
            },
            None => None,
        };
        let r = match self.shared.stage() {
            Stage::None => Err(BlockError::Replication(format!(
                "{}: {} in stage none",
                self.id,
                op.name()
            ))),
            Stage::Done => self.shared.base.submit(op).wait(),
            _ => self.shared.active.submit(op).wait(),
        };
        Pending::Ready(r)
    }
}

/// The base disk as the secondary's NBD server exports it: reads pass through; while
/// replication runs, every modifying request first copies the clusters it touches from the
/// base into the hidden disk (unless already there).
pub struct CbwNode {
    shared: Arc<SecondaryShared>,
}

impl std::fmt::Debug for CbwNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CbwNode")
    }
}

impl BlockNode for CbwNode {
    fn size(&self) -> u64 {
        self.shared.base.size()
    }

    fn driver(&self) -> &'static str {
        "copy-before-write"
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> BlockResult<()> {
        self.shared.base.read_at(buf, offset)
    }

    fn submit(&self, op: WriteOp<'_>) -> Pending {
        let sh = &self.shared;
        let r = (|| {
            let _g = sh.gate.read().map_err(|_| lock_err())?;
            let _r = match op.range() {
                Some((offset, len)) => Some(sh.ranges.lock(offset, len, true)?),
                None => None,
            };
            if let (Stage::Running, Some((offset, len))) = (sh.stage(), op.range())
                && len > 0
            {
                check_range(op.name(), offset, len, sh.base.size())?;
                let cl = sh.hidden.cluster_size();
                for idx in offset / cl..=(offset + len - 1) / cl {
                    if !sh.hidden.is_allocated(idx) {
                        let mut data = vec![0u8; sh.hidden.cluster_len(idx)].into_boxed_slice();
                        sh.base.read_at(&mut data, idx * cl)?;
                        sh.hidden.insert_if_absent(idx, data)?;
                        sh.cbw_copies.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            sh.base.submit(op).wait()
        })();
        Pending::Ready(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{mem::MemNode, null_events};

    #[test]
    fn secondary_sees_its_view_until_checkpoint_then_base_equals_primary() {
        let base = Arc::new(MemNode::from_vec(vec![1u8; 1 << 20]));
        let r =
            ReplicationSecondary::new("active-disk0", base.clone(), 65536, null_events()).unwrap();
        let mut b = vec![0u8; 4096];
        assert!(r.read_at(&mut b, 0).is_err(), "stage none refuses I/O");
        r.start().unwrap();
        let exp = r.export_node();
        // The primary writes 2 at 0; the secondary guest writes 3 at 128 KiB.
        exp.write_at(&[2; 4096], 0, false).unwrap();
        r.write_at(&[3; 4096], 131072, false).unwrap();
        r.read_at(&mut b, 0).unwrap();
        assert!(
            b.iter().all(|&x| x == 1),
            "secondary still sees the pre-write content (hidden)"
        );
        r.read_at(&mut b, 131072).unwrap();
        assert!(b.iter().all(|&x| x == 3));
        assert_eq!(
            base.snapshot()[131072],
            1,
            "guest writes do not reach the base"
        );
        r.checkpoint().unwrap();
        r.read_at(&mut b, 0).unwrap();
        assert!(
            b.iter().all(|&x| x == 2),
            "after checkpoint the secondary sees the primary's data"
        );
        r.read_at(&mut b, 131072).unwrap();
        assert!(
            b.iter().all(|&x| x == 1),
            "the secondary's own write is dropped"
        );
        assert_eq!(r.status()["active-clusters"], 0);
    }

    #[test]
    fn range_locks_block_only_overlapping_conflicts() {
        use std::{sync::mpsc, time::Duration};
        let locks = Arc::new(RangeLocks::new(65536));
        let g = locks.lock(4096, 4096, true).unwrap();
        // Disjoint primary write and a guest read elsewhere: no wait.
        let _a = locks.lock(65536, 4096, true).unwrap();
        let _b = locks.lock(131072, 512, false).unwrap();
        // Two guest requests on the same cluster: no wait.
        let _c = locks.lock(131072, 512, false).unwrap();
        // A guest read of the same cluster (other bytes) waits for the primary write.
        let (tx, rx) = mpsc::channel();
        let l2 = locks.clone();
        let t = std::thread::spawn(move || {
            let _g = l2.lock(60000, 10, false).unwrap();
            tx.send(()).unwrap();
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "overlapping request must wait"
        );
        drop(g);
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        t.join().unwrap();
        assert_eq!(lcm(65536, 4096), 65536);
        assert_eq!(lcm(0, 512), 512);
    }

    #[test]
    fn failover_folds_active_and_hidden_into_base() {
        let base = Arc::new(MemNode::from_vec(vec![1u8; 1 << 20]));
        let r =
            ReplicationSecondary::new("active-disk0", base.clone(), 65536, null_events()).unwrap();
        r.start().unwrap();
        r.export_node().write_at(&[2; 4096], 0, false).unwrap();
        r.write_at(&[3; 4096], 131072, false).unwrap();
        r.write_at(&[4; 100], 70000, false).unwrap();
        let mut view = vec![0u8; 1 << 20];
        r.read_at(&mut view, 0).unwrap();
        r.failover().unwrap().join().unwrap();
        assert_eq!(r.stage(), Stage::Done);
        assert_eq!(base.snapshot(), view, "the base holds the secondary's view");
        r.write_at(&[5; 512], 0, false).unwrap();
        assert_eq!(
            base.snapshot()[0],
            5,
            "after failover the guest writes the base"
        );
    }

    #[test]
    fn primary_swallows_secondary_errors_and_drops_the_child() {
        struct Down;
        impl BlockNode for Down {
            fn size(&self) -> u64 {
                4096
            }
            fn driver(&self) -> &'static str {
                "down"
            }
            fn read_at(&self, _: &mut [u8], _: u64) -> BlockResult<()> {
                Err(BlockError::Remote("down".into()))
            }
            fn submit(&self, _: WriteOp<'_>) -> Pending {
                Pending::Ready(Err(BlockError::Remote("down".into())))
            }
        }
        let seen = Arc::new(Mutex::new(Vec::<String>::new()));
        let s2 = seen.clone();
        let p = ReplicationPrimary::new(
            "node0",
            Arc::new(Down),
            Arc::new(move |n: &str, _| s2.lock().unwrap().push(n.into())),
        );
        assert!(
            p.write_at(&[1; 512], 0, false).is_err(),
            "stage none: EIO as QEMU"
        );
        p.start().unwrap();
        p.write_at(&[1; 512], 0, false).unwrap();
        assert!(!p.connected());
        p.write_at(&[1; 512], 0, false).unwrap();
        assert_eq!(seen.lock().unwrap().as_slice(), ["COLO_BLK_SECONDARY_LOST"]);
    }
}
