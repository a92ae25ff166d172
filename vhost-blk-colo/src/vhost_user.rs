//! The vhost-user-blk device: virtio-blk requests from the guest's queues onto a block node.
//!
//! Guest memory is `GuestMemoryMmap<BitmapMmapRegion>`, so every byte this backend writes into
//! guest memory (read data, status bytes, used ring) is marked in the frontend's dirty log once
//! it sends `SET_LOG_BASE` (`LOG_SHMFD` + `LOG_ALL` are advertised). Each queue has its own
//! worker thread. [`serve`] serves one frontend connection after another on a socket path.

use std::{
    os::fd::AsRawFd,
    path::Path,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use vhost::vhost_user::{
    Listener,
    message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures},
};
use vhost_user_backend::{
    VhostUserBackend, VhostUserDaemon, VringRwLock, VringT, bitmap::BitmapMmapRegion,
};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryLoadGuard, GuestMemoryMmap, bitmap::Bitmap,
};
use vmm_sys_util::{
    epoll::EventSet,
    event::{EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier},
    eventfd::{EFD_NONBLOCK, EventFd},
};

use crate::block::{BlockError, NodeRef, WriteOp};

/// Sector size of virtio-blk.
pub const SECTOR: u64 = 512;

/// virtio-blk request types.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Flush.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Device id string.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Discard.
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
/// Write zeroes.
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
/// Status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status: I/O error.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status: unsupported request.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Feature bits.
const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_TOPOLOGY: u64 = 1 << 10;
const F_MQ: u64 = 1 << 12;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;
const F_RING_INDIRECT_DESC: u64 = 1 << 28;
const F_RING_EVENT_IDX: u64 = 1 << 29;
const F_VERSION_1: u64 = 1 << 32;

/// Largest data segment (size_max) and number of segments (seg_max) we advertise.
pub const SIZE_MAX: u32 = 1 << 20;
/// Segments per request.
pub const SEG_MAX: u32 = 128;
/// Largest discard / write-zeroes range in sectors.
pub const MAX_DISCARD_SECTORS: u32 = (32 << 20) / SECTOR as u32;
/// Segments in one discard / write-zeroes request.
pub const MAX_DISCARD_SEG: u32 = 16;
/// Largest request payload accepted (bounded memory per request).
pub const MAX_REQUEST_BYTES: usize = 64 << 20;
/// Length of the device id.
pub const ID_BYTES: usize = 20;

type Mem = GuestMemoryMmap<BitmapMmapRegion>;
type Gm = GuestMemoryAtomic<Mem>;

/// Errors of the vhost-user-blk device.
#[derive(Debug, thiserror::Error)]
pub enum VhostBlkError {
    /// A descriptor chain could not be parsed.
    #[error("descriptor chain {head}: {msg}")]
    BadChain {
        /// Chain head index.
        head: u16,
        /// What was wrong.
        msg: String,
    },
    /// Guest memory is not set up yet.
    #[error("no guest memory yet")]
    NoMemory,
    /// Queue handling failed.
    #[error("queue {0}: {1}")]
    Queue(u16, String),
    /// An unknown event arrived.
    #[error("unexpected event {0}")]
    UnknownEvent(u16),
    /// Could not create an event fd.
    #[error("creating the exit event: {0}")]
    Event(#[source] std::io::Error),
    /// vhost-user daemon failure.
    #[error("vhost-user daemon on {path}: {msg}")]
    Daemon {
        /// Socket path.
        path: String,
        /// Error text.
        msg: String,
    },
}

impl From<VhostBlkError> for std::io::Error {
    fn from(e: VhostBlkError) -> Self {
        std::io::Error::other(e)
    }
}

/// Device configuration.
#[derive(Debug, Clone)]
pub struct BlkConfig {
    /// Number of request queues (each served by its own vhost-user-backend thread).
    pub num_queues: usize,
    /// Largest queue size.
    pub queue_size: usize,
    /// Expose the disk read-only (VIRTIO_BLK_F_RO).
    pub read_only: bool,
    /// Device id returned by GET_ID (at most 20 bytes used).
    pub serial: String,
    /// Logical block size reported in the config space.
    pub blk_size: u32,
    /// Threads of the I/O worker pool shared by all queues.
    pub workers: usize,
    /// Requests taken from one queue and not yet completed, at most. When a queue reaches it,
    /// its thread stops taking requests until half of them completed.
    pub max_inflight: usize,
}

impl Default for BlkConfig {
    fn default() -> Self {
        BlkConfig {
            num_queues: 1,
            queue_size: 1024,
            read_only: false,
            serial: "vhost-blk-colo".into(),
            blk_size: 512,
            workers: 4,
            max_inflight: 128,
        }
    }
}

/// Request counters, exposed to the control socket.
#[derive(Debug, Default)]
pub struct BlkStats {
    /// Read requests completed.
    pub reads: AtomicU64,
    /// Write requests completed.
    pub writes: AtomicU64,
    /// Flushes completed.
    pub flushes: AtomicU64,
    /// Requests that failed.
    pub errors: AtomicU64,
    /// Bytes read.
    pub bytes_read: AtomicU64,
    /// Bytes written.
    pub bytes_written: AtomicU64,
}

// ## Concurrency and in-flight bookkeeping
//
// Each queue has its own vhost-user-backend thread (`queues_per_thread`). That thread only
// takes descriptor chains off the avail ring, parses them (cheap: addresses and lengths) and
// hands them to a small worker pool shared by the device, which runs the block I/O
// (`preadv`/`pwritev` straight between the file and guest memory, or the node's own
// `read_at`/`submit`). A lone small read or write on an idle queue of a local disk (no child
// that submits asynchronously, see `BlockNode::submits_async`; up to `INLINE_MAX_BYTES`) runs
// on the queue thread itself, which saves the hand-off latency at queue depth 1; a request
// arriving meanwhile starts when it returns. A worker that finished a request polls the job
// list for a short while before it sleeps (`Pool::spin_for_job`), and the queue thread wakes no
// worker while one polls: at queue depth 1 on a replicated disk the next request is then
// picked up without a wake-up.
//
// Why a thread pool and not io_uring: the disk is a block graph (quorum over a file and an NBD
// replication child, overlays, qcow2) whose nodes are synchronous `BlockNode`s; a pool runs
// every node type in parallel with no change to them, as QEMU's own thread pool does. io_uring
// would only help the raw-file leaf and needs an async node interface first.
//
// Completions are published in the used ring in AVAIL ORDER: each queue keeps a reorder buffer
// (`Reorder`) of the requests it has taken, in the order taken; a request that finishes early
// waits there until every earlier one has finished, and only then are they added to the used
// ring (and the frontend notified, subject to EVENT_IDX). So at any moment
//
//     used idx == number of requests, counted from the ring's start, that are all complete
//
// and this is our in-flight bookkeeping: a frontend that restarts a ring from the used index
// (vmm-min after a backend crash or restart; any frontend after a reconnect) re-submits exactly
// the requests that were never acknowledged, and no acknowledged write is lost or reordered
// behind an unacknowledged one. vhost-user-backend 0.24 answers GET_INFLIGHT_FD and
// SET_INFLIGHT_FD with "not supported" (see its handler.rs), so the INFLIGHT_SHMFD protocol
// feature is not offered; avail-order completion makes it unnecessary for a frontend that
// resumes from the used index. When a ring is stopped (GET_VRING_BASE) or the frontend goes
// away, the queue's in-flight requests are drained (completed and published) first, so the
// avail index we report equals the used index.

/// One parsed virtio-blk request: where its data and status live in guest memory.
struct Req {
    head: u16,
    rtype: u32,
    sector: u64,
    /// Device-readable data after the header.
    out: Vec<(GuestAddress, usize)>,
    /// Device-writable data before the status byte.
    inn: Vec<(GuestAddress, usize)>,
    status: GuestAddress,
}

impl Req {
    /// Bytes of data (excluding header and status).
    fn data_len(&self) -> usize {
        self.out.iter().chain(&self.inn).map(|s| s.1).sum()
    }
}

/// Largest request run on the queue thread itself when the queue is idle (see
/// `process_queue`).
const INLINE_MAX_BYTES: usize = 64 << 10;

/// Requests of one queue taken from the avail ring and not yet in the used ring, in avail
/// order: `(head, Some(used len))` once complete.
#[derive(Default)]
struct Reorder {
    /// Sequence number of `slots[0]`.
    base: u64,
    slots: std::collections::VecDeque<(u16, Option<u32>)>,
    /// The queue thread stopped taking requests at `max_inflight`.
    throttled: bool,
    /// Threads waiting in `QueueCtx::drain`: a completion signals `drained` (a futex syscall)
    /// only when there is one.
    drain_waiters: usize,
}

/// Per-queue state of one frontend connection.
struct QueueCtx {
    index: u16,
    vring: VringRwLock<Gm>,
    state: Mutex<Reorder>,
    drained: Condvar,
    /// Wakes the queue thread when a throttled queue has room again.
    resume: Arc<EventFd>,
    max_inflight: usize,
}

impl QueueCtx {
    fn lock(&self) -> std::sync::MutexGuard<'_, Reorder> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a request taken from the avail ring; returns its sequence number.
    fn push(&self, head: u16) -> u64 {
        let mut st = self.lock();
        st.slots.push_back((head, None));
        st.base + st.slots.len() as u64 - 1
    }

    /// Marks request `seq` complete and publishes every request that is now complete with all
    /// earlier ones, in order.
    fn complete(&self, seq: u64, used_len: u32) {
        let mut st = self.lock();
        let Some(i) = seq.checked_sub(st.base) else {
            return;
        };
        if let Some(slot) = st.slots.get_mut(i as usize) {
            slot.1 = Some(used_len);
        }
        let mut published = 0;
        while let Some(&(head, Some(len))) = st.slots.front() {
            if let Err(e) = self.vring.add_used(head, len) {
                tracing::warn!(queue = self.index, "add_used of chain {head}: {e}");
            }
            st.slots.pop_front();
            st.base += 1;
            published += 1;
        }
        if published == 0 {
            return;
        }
        let notify = !matches!(self.vring.needs_notification(), Ok(false));
        if st.slots.is_empty() && st.drain_waiters > 0 {
            self.drained.notify_all();
        }
        if st.throttled && st.slots.len() <= self.max_inflight / 2 {
            st.throttled = false;
            let _ = self.resume.write(1);
        }
        // Signalled without the reorder lock: the woken frontend's next kick makes the queue
        // thread take that lock, and it must not find it held by this thread.
        drop(st);
        if notify && let Err(e) = self.vring.signal_used_queue() {
            tracing::warn!(queue = self.index, "signalling the used queue: {e}");
        }
    }

    /// Waits until every request taken from this queue is in the used ring.
    fn drain(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        while !st.slots.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st.drain_waiters += 1;
            st = match self.drained.wait_timeout(st, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
            st.drain_waiters -= 1;
        }
        true
    }
}

struct Job {
    ctx: Arc<QueueCtx>,
    seq: u64,
    req: Req,
    mem: Arc<Mem>,
}

/// What the worker threads need: the node and the counters.
struct Exec {
    node: NodeRef,
    cfg: BlkConfig,
    stats: Arc<BlkStats>,
}

#[derive(Default)]
struct PoolState {
    jobs: std::collections::VecDeque<Job>,
    stop: bool,
}

#[derive(Default)]
struct Pool {
    state: Mutex<PoolState>,
    cv: Condvar,
    /// Workers polling `state` before they sleep: a new job needs no wake-up while > 0.
    spinning: AtomicU64,
    /// Jobs in `state.jobs` (changed under its lock), so a polling worker takes the lock only
    /// when there is one: polling under the lock can make the queue thread, pushing the job
    /// the worker waits for, block on the lock and need a wake-up from the worker. (The
    /// worker-to-queue-thread wake-ups seen in scheduler traces of the replicated bench were
    /// mostly the vring lock, see `process_queue`; this alone did not measurably change p50.)
    queued: AtomicU64,
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Polls for a job for up to [`crate::spin_budget`], for a worker that finished a request.
    /// At queue depth 1 the frontend's next request arrives within this (completion, the
    /// frontend's submission, the kick, the queue thread's hand-off); picking it up saves a
    /// futex wake-up, which on this paravirtualised host also wakes a halted vCPU. Between
    /// polls the worker yields, so other threads of the CPU run first.
    fn spin_for_job(&self) -> Option<Job> {
        if crate::spin_budget().is_zero() {
            return None;
        }
        self.spinning.fetch_add(1, Ordering::SeqCst);
        let t0 = Instant::now();
        let job = loop {
            if self.queued.load(Ordering::SeqCst) > 0
                && let Some(j) = self.pop(&mut self.lock())
            {
                break Some(j);
            }
            if t0.elapsed() >= crate::spin_budget() {
                break None;
            }
            std::thread::yield_now();
        };
        self.spinning.fetch_sub(1, Ordering::SeqCst);
        job
    }

    /// Takes the next job (with `state` locked).
    fn pop(&self, st: &mut PoolState) -> Option<Job> {
        let j = st.jobs.pop_front();
        if j.is_some() {
            self.queued.fetch_sub(1, Ordering::SeqCst);
        }
        j
    }

    fn run(&self, exec: &Exec) {
        let mut spin = false;
        loop {
            let polled = if std::mem::take(&mut spin) {
                self.spin_for_job()
            } else {
                None
            };
            let job = if let Some(j) = polled {
                j
            } else {
                let mut st = self.lock();
                loop {
                    if let Some(j) = self.pop(&mut st) {
                        break j;
                    }
                    if st.stop {
                        return;
                    }
                    st = match self.cv.wait(st) {
                        Ok(g) => g,
                        Err(p) => p.into_inner(),
                    };
                }
            };
            spin = true;
            // A panicking node must not leave the queue waiting for this request forever.
            let len = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                exec.run(&job.mem, &job.req, job.ctx.index)
            }))
            .unwrap_or_else(|_| {
                tracing::error!(queue = job.ctx.index, "request handler panicked");
                match job.mem.write_slice(&[VIRTIO_BLK_S_IOERR], job.req.status) {
                    Ok(()) => 1,
                    Err(_) => 0,
                }
            });
            job.ctx.complete(job.seq, len);
        }
    }
}

/// The vhost-user-blk backend.
pub struct VhostUserBlk {
    exec: Arc<Exec>,
    event_idx: AtomicBool,
    /// A ring's avail index was found too far ahead once (see `avail_overrun`): warned.
    warned_overrun: AtomicBool,
    /// A ring hit `MAX_PASSES` once: warned.
    warned_busy: AtomicBool,
    mem: Mutex<Option<Gm>>,
    pool: Arc<Pool>,
    queues: Mutex<Vec<Option<Arc<QueueCtx>>>>,
    resume: Vec<Arc<EventFd>>,
    /// The exit events handed to this connection's daemon: the descriptor number the
    /// library keeps and a duplicate of ours (see [`vhost_user_guards::leaked_fd`]).
    exit_fds: Mutex<Vec<(std::os::fd::RawFd, EventNotifier)>>,
}

impl std::fmt::Debug for VhostUserBlk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserBlk")
            .field("cfg", &self.exec.cfg)
            .finish()
    }
}

/// Event id of a queue thread's "resume" eventfd (ids up to num_queues are the library's).
fn resume_event(num_queues: usize) -> u16 {
    num_queues as u16 + 1
}

impl VhostUserBlk {
    /// A device over `node`. Starts its worker pool (`cfg.workers` threads, at least one).
    pub fn new(node: NodeRef, cfg: BlkConfig) -> Self {
        let stats: Arc<BlkStats> = Arc::default();
        let exec = Arc::new(Exec {
            node,
            cfg: cfg.clone(),
            stats,
        });
        let pool: Arc<Pool> = Arc::default();
        for i in 0..cfg.workers.max(1) {
            let (p, e) = (pool.clone(), exec.clone());
            let r = std::thread::Builder::new()
                .name(format!("blk-worker{i}"))
                .spawn(move || p.run(&e));
            if let Err(e) = r {
                tracing::warn!("starting I/O worker {i}: {e}");
            }
        }
        let resume = (0..cfg.num_queues)
            .filter_map(|_| EventFd::new(EFD_NONBLOCK).ok().map(Arc::new))
            .collect();
        VhostUserBlk {
            exec,
            event_idx: AtomicBool::new(false),
            warned_overrun: AtomicBool::new(false),
            warned_busy: AtomicBool::new(false),
            mem: Mutex::new(None),
            pool,
            queues: Mutex::new(vec![None; cfg.num_queues]),
            resume,
            exit_fds: Mutex::default(),
        }
    }

    /// Request counters.
    pub fn stats(&self) -> Arc<BlkStats> {
        self.exec.stats.clone()
    }

    fn cfg(&self) -> &BlkConfig {
        &self.exec.cfg
    }

    fn read_only(&self) -> bool {
        self.exec.read_only()
    }

    /// The virtio-blk config space (60 bytes).
    pub fn config_space(&self) -> Vec<u8> {
        let mut c = vec![0u8; 60];
        let capacity = self.exec.node.size() / SECTOR;
        c[0..8].copy_from_slice(&capacity.to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&self.cfg().blk_size.to_le_bytes());
        // topology: physical_block_exp, alignment_offset, min_io_size, opt_io_size
        c[24] = 0;
        c[26..28].copy_from_slice(&1u16.to_le_bytes());
        c[34..36].copy_from_slice(&(self.cfg().num_queues as u16).to_le_bytes());
        c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
        c[44..48].copy_from_slice(&1u32.to_le_bytes());
        c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[52..56].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
        c[56] = 1;
        c
    }

    /// The context of queue `q` on the current connection (created on its first event).
    fn queue_ctx(&self, q: u16, vring: &VringRwLock<Gm>) -> Option<Arc<QueueCtx>> {
        let mut qs = self.queues.lock().ok()?;
        let slot = qs.get_mut(q as usize)?;
        if slot.is_none() {
            *slot = Some(Arc::new(QueueCtx {
                index: q,
                vring: vring.clone(),
                state: Mutex::default(),
                drained: Condvar::new(),
                resume: self.resume.get(q as usize)?.clone(),
                max_inflight: self.cfg().max_inflight.max(1),
            }));
        }
        slot.clone()
    }

    /// Waits until every queue's taken requests are completed and published; with `forget`
    /// the per-connection queue state is dropped afterwards (a new connection starts afresh).
    fn drain_all(&self, forget: bool) {
        let ctxs: Vec<Arc<QueueCtx>> = match self.queues.lock() {
            Ok(q) => q.iter().flatten().cloned().collect(),
            Err(_) => Vec::new(),
        };
        for c in ctxs {
            if !c.drain(DRAIN_TIMEOUT) {
                tracing::warn!(
                    queue = c.index,
                    "requests still in flight after {DRAIN_TIMEOUT:?}"
                );
            }
        }
        if forget && let Ok(mut q) = self.queues.lock() {
            q.iter_mut().for_each(|c| *c = None);
        }
    }

    /// Takes requests off queue `q` (up to the in-flight bound) and starts them. Returns
    /// whether any was taken.
    /// True when the guest's avail index is more than the ring's size ahead of ours. No chain
    /// can then be taken (virtio-queue refuses the ring) while `enable_notification` keeps
    /// reporting work, so the EVENT_IDX loop would spin forever on a guest's say-so (found by
    /// the `blk_queue` fuzz target). The ring is left alone until the guest kicks again; the
    /// first time, a warning.
    fn avail_overrun(&self, vring: &VringRwLock<Gm>) -> bool {
        let Some(mem) = self
            .mem
            .lock()
            .ok()
            .and_then(|m| m.as_ref().map(|m| m.memory()))
        else {
            return false;
        };
        let g = vring.get_ref();
        let q = g.get_queue();
        let Ok(ahead) = q
            .avail_idx(&*mem, Ordering::Acquire)
            .map(|avail| (avail - std::num::Wrapping(q.next_avail())).0)
        else {
            return false;
        };
        let overrun = ahead > q.size();
        if overrun && !self.warned_overrun.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "guest's avail index is {ahead} entries ahead on a ring of {}: ring ignored until the next kick",
                q.size()
            );
        }
        overrun
    }

    fn process_queue(&self, vring: &VringRwLock<Gm>, queue: u16) -> Result<bool, VhostBlkError> {
        let mem: GuestMemoryLoadGuard<Mem> = self
            .mem
            .lock()
            .ok()
            .and_then(|m| m.as_ref().map(|m| m.memory()))
            .ok_or(VhostBlkError::NoMemory)?;
        let ctx = self
            .queue_ctx(queue, vring)
            .ok_or(VhostBlkError::UnknownEvent(queue))?;
        let mut batch: Vec<(u64, Req)> = Vec::new();
        let idle = ctx.lock().slots.is_empty();
        loop {
            {
                let mut st = ctx.lock();
                if st.slots.len() >= ctx.max_inflight {
                    st.throttled = true;
                    break;
                }
            }
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let seq = ctx.push(head);
            match parse_chain(chain, &mem) {
                Ok(req) => batch.push((seq, req)),
                Err(e) => {
                    // A malformed chain cannot carry a status byte; return it with len 0.
                    tracing::warn!("queue {queue}: {e}");
                    self.exec.stats.errors.fetch_add(1, Ordering::Relaxed);
                    ctx.complete(seq, 0);
                }
            }
        }
        if batch.is_empty() {
            return Ok(false);
        }
        if idle
            && batch.len() == 1
            && matches!(batch[0].1.rtype, VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT)
            && batch[0].1.data_len() <= INLINE_MAX_BYTES
            && (!self.exec.node.submits_async()
                || (batch[0].1.rtype == VIRTIO_BLK_T_OUT && self.exec.node.responsive()))
        {
            // Queue depth 1 on a local disk: no hand-off. A lone write runs here on a
            // replicated disk too while its secondary is responsive (nothing in flight, no
            // late reply within the last second: `BlockNode::responsive`): the NBD round trip
            // overlaps the local write and this thread reads its own reply, so the write costs
            // no worker wake-up and no contention with a worker for the vring lock (scheduler
            // trace of the replicated 4k QD1 bench: a worker signalling the used ring was
            // preempted by the woken frontend while holding the vring's read lock; the
            // frontend's kick then blocked this thread on that lock: three extra context
            // switches per write). Otherwise a disk with a remote part, whose requests may
            // take up to the NBD timeout, goes to the pool, so the queue keeps taking requests
            // meanwhile. So does a large request: its copy costs far more than the hand-off,
            // and run here it would hold back the requests the frontend is about to add, e.g.
            // the rest of a 1 MiB QD4 batch. (A secondary that hangs right after answering
            // quickly holds this queue for one NBD timeout, after which it is dropped; every
            // write waits for that timeout anyway.)
            if let Some((seq, req)) = batch.pop() {
                let len = self.exec.run(&mem, &req, queue);
                ctx.complete(seq, len);
            }
            return Ok(true);
        }
        let arc_mem = mem.into_inner();
        let n = batch.len();
        {
            let mut st = self.pool.lock();
            for (seq, req) in batch {
                st.jobs.push_back(Job {
                    ctx: ctx.clone(),
                    seq,
                    req,
                    mem: arc_mem.clone(),
                });
            }
            self.pool.queued.fetch_add(n as u64, Ordering::SeqCst);
        }
        // Wake one worker per job (not all of them: idle workers woken for nothing cost
        // context switches on a small host), less the workers polling for jobs.
        let polling = self.pool.spinning.load(Ordering::SeqCst) as usize;
        for _ in 0..n.saturating_sub(polling).min(self.exec.cfg.workers.max(1)) {
            self.pool.cv.notify_one();
        }
        Ok(true)
    }
}

impl Drop for VhostUserBlk {
    fn drop(&mut self) {
        self.pool.lock().stop = true;
        self.pool.cv.notify_all();
    }
}

impl VhostUserBlk {
    /// Closes the exit-event descriptors the connection's daemon leaked (see
    /// [`vhost_user_guards::leaked_fd`]); called once the daemon is dropped.
    fn close_exit_events(&self) {
        let fds = match self.exit_fds.lock() {
            Ok(mut v) => std::mem::take(&mut *v),
            Err(_) => return,
        };
        for (leaked, ours) in fds {
            vhost_user_guards::leaked_fd::close_leaked_fd(leaked, &ours);
        }
    }
}

/// Passes of the EVENT_IDX loop of one queue event before the queue yields to its epoll loop
/// (and continues through its resume event). A guest that keeps adding requests gets them
/// served all the same; this only bounds how long one event may keep the thread.
const MAX_PASSES: u32 = 64;

/// Bound on waiting for in-flight requests when a ring stops or a frontend leaves (NBD
/// requests are bounded by their own timeout, well below this).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Splits a descriptor chain into header, data segments and status byte.
fn parse_chain(
    chain: DescriptorChain<GuestMemoryLoadGuard<Mem>>,
    mem: &Mem,
) -> Result<Req, VhostBlkError> {
    let head = chain.head_index();
    let bad = |msg: String| VhostBlkError::BadChain { head, msg };
    let mut out: Vec<(GuestAddress, usize)> = Vec::new();
    let mut inn: Vec<(GuestAddress, usize)> = Vec::new();
    let mut total: usize = 0;
    for d in chain {
        let len = d.len() as usize;
        total = total.saturating_add(len);
        if total > MAX_REQUEST_BYTES + 4096 {
            return Err(bad("request larger than the device accepts".into()));
        }
        if d.is_write_only() {
            if len > 0 {
                inn.push((d.addr(), len));
            }
        } else if !inn.is_empty() {
            return Err(bad(
                "a device-readable descriptor after a writable one".into()
            ));
        } else if len > 0 {
            out.push((d.addr(), len));
        }
    }
    // The status byte: the last byte of the writable part.
    let Some(last) = inn.last_mut() else {
        return Err(bad("no writable status byte".into()));
    };
    let status = last
        .0
        .checked_add(last.1 as u64 - 1)
        .ok_or_else(|| bad("status address overflows".into()))?;
    last.1 -= 1;
    if last.1 == 0 {
        inn.pop();
    }
    // The 16-byte header: the first bytes of the readable part.
    let mut hdr = [0u8; 16];
    let mut got = 0;
    while got < 16 {
        let Some(&(addr, len)) = out.first() else {
            return Err(bad("request header shorter than 16 bytes".into()));
        };
        let n = len.min(16 - got);
        mem.read_slice(&mut hdr[got..got + n], addr)
            .map_err(|e| bad(format!("request header: {e}")))?;
        got += n;
        if n == len {
            out.remove(0);
        } else {
            out[0] = (addr.unchecked_add(n as u64), len - n);
        }
    }
    let rtype = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let mut s = [0u8; 8];
    s.copy_from_slice(&hdr[8..16]);
    Ok(Req {
        head,
        rtype,
        sector: u64::from_le_bytes(s),
        out,
        inn,
        status,
    })
}

/// Guest memory of a segment list as host slices (split where guest regions split).
struct GuestBufs<'m> {
    slices: Vec<vm_memory::VolatileSlice<'m, vm_memory::bitmap::BS<'m, BitmapMmapRegion>>>,
}

impl<'m> GuestBufs<'m> {
    fn new(mem: &'m Mem, segs: &[(GuestAddress, usize)]) -> Option<Self> {
        let mut slices = Vec::with_capacity(segs.len());
        for &(addr, len) in segs {
            for s in mem.get_slices(addr, len) {
                slices.push(s.ok()?);
            }
        }
        Some(GuestBufs { slices })
    }

    fn len(&self) -> usize {
        self.slices.iter().map(|s| s.len()).sum()
    }

    /// Host views of the slices for writing into them.
    ///
    /// # Safety
    /// The segments must be device-writable buffers of a request this device owns until it is
    /// completed, so nothing else in this process accesses them meanwhile.
    unsafe fn io_mut(&self) -> Vec<std::io::IoSliceMut<'_>> {
        self.slices
            .iter()
            .map(|s| {
                let g = s.ptr_guard_mut();
                // SAFETY: `s` covers s.len() bytes of mapped guest memory (mappings live as long
                // as `mem`); exclusivity is the caller's promise. The guest could touch them
                // concurrently (its own bug); bytes are plain data, so that cannot break memory
                // safety here.
                std::io::IoSliceMut::new(unsafe {
                    std::slice::from_raw_parts_mut(g.as_ptr(), s.len())
                })
            })
            .collect()
    }

    /// Host views of the slices for reading.
    fn io(&self) -> Vec<std::io::IoSlice<'_>> {
        self.slices
            .iter()
            .map(|s| {
                let g = s.ptr_guard();
                // SAFETY: `s` covers s.len() bytes of mapped guest memory, device-readable for
                // this request and alive as long as `mem`. Only read.
                std::io::IoSlice::new(unsafe { std::slice::from_raw_parts(g.as_ptr(), s.len()) })
            })
            .collect()
    }

    fn mark_dirty(&self) {
        for s in &self.slices {
            s.bitmap().mark_dirty(0, s.len());
        }
    }
}

impl Exec {
    fn read_only(&self) -> bool {
        self.cfg.read_only || self.node.read_only()
    }

    /// Runs one request to completion and writes its status byte. Returns the used length
    /// (bytes written into the chain, status included; 0 if even the status byte failed).
    fn run(&self, mem: &Mem, req: &Req, queue: u16) -> u32 {
        let (status, written) = self.execute(mem, req);
        if status != VIRTIO_BLK_S_OK {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        match mem.write_slice(&[status], req.status) {
            Ok(()) => written as u32 + 1,
            Err(e) => {
                tracing::warn!("queue {queue}: status byte of chain {}: {e}", req.head);
                0
            }
        }
    }

    fn execute(&self, mem: &Mem, req: &Req) -> (u8, usize) {
        let fail = |e: BlockError| {
            tracing::warn!(
                rtype = req.rtype,
                sector = req.sector,
                "virtio-blk request failed: {e}"
            );
            (VIRTIO_BLK_S_IOERR, 0)
        };
        let Some(offset) = req.sector.checked_mul(SECTOR) else {
            return (VIRTIO_BLK_S_IOERR, 0);
        };
        match req.rtype {
            VIRTIO_BLK_T_IN => {
                let Some(bufs) = GuestBufs::new(mem, &req.inn) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                let len = bufs.len();
                if len > MAX_REQUEST_BYTES {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                // SAFETY: `inn` are the request's device-writable data buffers, ours until we
                // publish the request.
                let mut io = unsafe { bufs.io_mut() };
                match self.node.read_vectored_at(&mut io, offset) {
                    Ok(()) => {
                        bufs.mark_dirty();
                        self.stats.reads.fetch_add(1, Ordering::Relaxed);
                        self.stats
                            .bytes_read
                            .fetch_add(len as u64, Ordering::Relaxed);
                        (VIRTIO_BLK_S_OK, len)
                    }
                    Err(e) => fail(e),
                }
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only() {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                let Some(bufs) = GuestBufs::new(mem, &req.out) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                let len = bufs.len();
                if len > MAX_REQUEST_BYTES {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                match self.node.write_vectored_at(&bufs.io(), offset, false) {
                    Ok(()) => {
                        self.stats.writes.fetch_add(1, Ordering::Relaxed);
                        self.stats
                            .bytes_written
                            .fetch_add(len as u64, Ordering::Relaxed);
                        (VIRTIO_BLK_S_OK, 0)
                    }
                    Err(e) => fail(e),
                }
            }
            VIRTIO_BLK_T_FLUSH => match self.node.flush() {
                Ok(()) => {
                    self.stats.flushes.fetch_add(1, Ordering::Relaxed);
                    (VIRTIO_BLK_S_OK, 0)
                }
                Err(e) => fail(e),
            },
            VIRTIO_BLK_T_GET_ID => {
                let mut id = [0u8; ID_BYTES];
                let s = self.cfg.serial.as_bytes();
                let n = s.len().min(ID_BYTES);
                id[..n].copy_from_slice(&s[..n]);
                let mut done = 0;
                for &(addr, len) in &req.inn {
                    let k = len.min(ID_BYTES - done);
                    if k == 0 {
                        break;
                    }
                    if mem.write_slice(&id[done..done + k], addr).is_err() {
                        return (VIRTIO_BLK_S_IOERR, 0);
                    }
                    done += k;
                }
                (VIRTIO_BLK_S_OK, done)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                if self.read_only() {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                let total: usize = req.out.iter().map(|s| s.1).sum();
                if total == 0 || !total.is_multiple_of(16) || total > MAX_DISCARD_SEG as usize * 16
                {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                let mut segs = vec![0u8; total];
                let mut pos = 0;
                for &(addr, len) in &req.out {
                    if mem.read_slice(&mut segs[pos..pos + len], addr).is_err() {
                        return (VIRTIO_BLK_S_IOERR, 0);
                    }
                    pos += len;
                }
                for seg in segs.chunks_exact(16) {
                    let mut s = [0u8; 8];
                    s.copy_from_slice(&seg[0..8]);
                    let sector = u64::from_le_bytes(s);
                    let num = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
                    let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
                    if num > MAX_DISCARD_SECTORS
                        || flags & !1 != 0
                        || (req.rtype == VIRTIO_BLK_T_DISCARD && flags != 0)
                    {
                        return (VIRTIO_BLK_S_UNSUPP, 0);
                    }
                    let Some(off) = sector.checked_mul(SECTOR) else {
                        return (VIRTIO_BLK_S_IOERR, 0);
                    };
                    let len = u64::from(num) * SECTOR;
                    let op = if req.rtype == VIRTIO_BLK_T_DISCARD {
                        WriteOp::Discard { offset: off, len }
                    } else {
                        WriteOp::WriteZeroes {
                            offset: off,
                            len,
                            unmap: flags & 1 != 0,
                            fua: false,
                        }
                    };
                    if let Err(e) = self.node.submit(op).wait() {
                        return fail(e);
                    }
                }
                (VIRTIO_BLK_S_OK, 0)
            }
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        }
    }
}

impl VhostUserBackend for VhostUserBlk {
    type Bitmap = BitmapMmapRegion;
    type Vring = VringRwLock<Gm>;

    fn num_queues(&self) -> usize {
        self.cfg().num_queues
    }

    fn max_queue_size(&self) -> usize {
        self.cfg().queue_size
    }

    fn features(&self) -> u64 {
        let mut f = F_VERSION_1
            | F_RING_INDIRECT_DESC
            | F_RING_EVENT_IDX
            | F_SIZE_MAX
            | F_SEG_MAX
            | F_BLK_SIZE
            | F_FLUSH
            | F_TOPOLOGY
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits();
        if self.cfg().num_queues > 1 {
            f |= F_MQ;
        }
        if self.read_only() {
            f |= F_RO;
        } else {
            f |= F_DISCARD | F_WRITE_ZEROES;
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let c = self.config_space();
        let start = (offset as usize).min(c.len());
        let end = start.saturating_add(size as usize).min(c.len());
        let mut out = c[start..end].to_vec();
        out.resize(size as usize, 0);
        out
    }

    fn update_memory(&self, mem: Gm) -> std::io::Result<()> {
        let checked = vhost_user_guards::memory::drop_regions_past_eof(&mem);
        if let Ok(mut m) = self.mem.lock() {
            *m = Some(mem);
        }
        checked
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.cfg().num_queues).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (c, n) = new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()?;
        let ours = n.try_clone().ok()?;
        if let Ok(mut v) = self.exit_fds.lock() {
            v.push((c.as_raw_fd(), ours));
        }
        Some((c, n))
    }

    fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
        // GET_VRING_BASE: finish and publish what this ring has taken, so the avail index the
        // frontend gets back equals the used index.
        let ctx = self
            .queues
            .lock()
            .ok()
            .and_then(|q| q.get(queue_index as usize).cloned().flatten());
        if let Some(c) = ctx
            && !c.drain(DRAIN_TIMEOUT)
        {
            tracing::warn!(queue = queue_index, "ring stopped with requests in flight");
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        thread_id: usize,
    ) -> std::io::Result<()> {
        // An error returned here ends the queue's worker thread (vhost-user-backend's epoll
        // loop stops) and the ring is dead for the rest of the connection, whatever the
        // frontend sets up later. A frontend can cause one by its message order alone: a
        // SET_VRING_KICK on a ring the library already enabled, before SET_MEM_TABLE, makes it
        // call us at once (no memory yet). Found by the `vhost_user_msgs` fuzz target (the
        // ring then never answered again). So nothing is returned: logged, the ring waits
        // for its next kick.
        if let Err(e) = self.queue_event(device_event, evset, vrings, thread_id) {
            static WARNED: AtomicBool = AtomicBool::new(false);
            if WARNED.swap(true, Ordering::Relaxed) {
                tracing::debug!(queue = thread_id, "{e}");
            } else {
                tracing::warn!(
                    queue = thread_id,
                    "{e} (further such errors at debug level)"
                );
            }
        }
        Ok(())
    }
}

impl VhostUserBlk {
    /// One event of queue thread `thread_id`: a kick, or the resume event of a throttled queue.
    fn queue_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock<Gm>],
        thread_id: usize,
    ) -> Result<(), VhostBlkError> {
        if evset != EventSet::IN {
            return Err(VhostBlkError::UnknownEvent(device_event));
        }
        // One queue per thread (`queues_per_thread`): the thread's vring is `vrings[0]`, its
        // device queue index is the thread index. `device_event` is 0 (a kick) or the resume
        // event of a throttled queue.
        let queue = thread_id as u16;
        if device_event == resume_event(self.cfg().num_queues) {
            if let Some(r) = self.resume.get(thread_id) {
                let _ = r.read();
            }
            // Only meaningful on a started ring (an error here would end the queue's thread).
            let ready = vrings
                .first()
                .is_some_and(|v| v.get_ref().get_queue().ready());
            let has_mem = self.mem.lock().is_ok_and(|m| m.is_some());
            if !ready || !has_mem {
                return Ok(());
            }
        } else if device_event != 0 {
            return Err(VhostBlkError::UnknownEvent(device_event));
        }
        let vring = vrings
            .first()
            .ok_or(VhostBlkError::UnknownEvent(device_event))?;
        if self.event_idx.load(Ordering::Relaxed) {
            let mut passes = 0;
            loop {
                // A ring that never runs dry on its own must not keep this thread from its
                // epoll loop, where a disconnect's exit event waits: after MAX_PASSES passes
                // it continues through the resume event. Found by the `vhost_user_msgs`
                // fuzz target: a ring started without SET_VRING_ADDR (desc, avail and used at
                // guest address 0: each used entry moved the avail index on) spun here, and
                // `serve` never returned after the frontend left. Also a head slot in the
                // avail ring past the end of guest memory: nothing can be taken, yet
                // `enable_notification` keeps reporting work.
                passes += 1;
                if passes > MAX_PASSES {
                    if !self.warned_busy.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            "queue {queue}: still busy after {MAX_PASSES} passes; continuing after other events"
                        );
                    }
                    if let Some(r) = self.resume.get(usize::from(queue)) {
                        let _ = r.write(1);
                    }
                    break;
                }
                vring
                    .disable_notification()
                    .map_err(|e| VhostBlkError::Queue(queue, e.to_string()))?;
                self.process_queue(vring, queue)?;
                if !vring
                    .enable_notification()
                    .map_err(|e| VhostBlkError::Queue(queue, e.to_string()))?
                {
                    break;
                }
                if self.avail_overrun(vring) {
                    break;
                }
                let throttled = self
                    .queue_ctx(queue, vring)
                    .is_some_and(|c| c.lock().throttled);
                if throttled {
                    break;
                }
            }
        } else {
            self.process_queue(vring, queue)?;
        }
        Ok(())
    }
}

/// Serves frontends on `socket`, one connection after another, until `stop` is set (checked
/// between connections). One listening socket lives across connections, so a frontend that
/// reconnects while the previous connection is being torn down waits in its backlog. Each
/// connection gets a fresh daemon (fresh vring state) over the same device, behind
/// `vhost_user_guards::relay`: the library maps a SET_LOG_BASE's log whatever its file's
/// length and would die of SIGBUS marking a page past its end, so the relay ends such a
/// session instead (logged); the next frontend is served as usual.
pub fn serve(
    socket: &Path,
    dev: Arc<VhostUserBlk>,
    stop: &AtomicBool,
) -> Result<(), VhostBlkError> {
    let derr = |msg: String| VhostBlkError::Daemon {
        path: socket.display().to_string(),
        msg,
    };
    let listener = Listener::new(socket, true).map_err(|e| derr(e.to_string()))?;
    while !stop.load(Ordering::Relaxed) {
        let front = match listener.accept() {
            Ok(Some(s)) => s,
            Ok(None) => continue,
            Err(e) => return Err(derr(e.to_string())),
        };
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new("vhost-blk-colo".into(), dev.clone(), mem)
            .map_err(|e| derr(e.to_string()))?;
        // Each queue thread also listens to its queue's "resume" eventfd (in-flight bound).
        let ev = u64::from(resume_event(dev.cfg().num_queues));
        for (h, r) in daemon.get_epoll_handlers().iter().zip(&dev.resume) {
            // A wake-up left over from the previous connection is stale.
            let _ = r.read();
            h.register_listener(r.as_raw_fd(), EventSet::IN, ev)
                .map_err(|e| derr(format!("registering the resume event: {e}")))?;
        }
        let (inner, back) = vhost_user_guards::relay::daemon_side()
            .map_err(|e| derr(format!("the daemon's end of the relay: {e}")))?;
        daemon
            .start(&mut Listener::from(inner))
            .map_err(|e| derr(e.to_string()))?;
        match vhost_user_guards::relay::relay(front, back) {
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => tracing::warn!(
                "vhost-user session on {} refused: {e}; session ended",
                socket.display()
            ),
            Err(e) => tracing::debug!("vhost-user relay on {}: {e}", socket.display()),
            Ok(()) => {}
        }
        if let Err(e) = daemon.wait() {
            tracing::warn!("vhost-user connection on {} ended: {e}", socket.display());
        }
        // Dropping the daemon stops its vring worker threads (exit events).
        drop(daemon);
        dev.close_exit_events();
        // Requests still in flight complete (and are published in order) before the next
        // frontend gets the socket.
        dev.drain_all(true);
        tracing::info!(socket = %socket.display(), "frontend disconnected; serving again");
    }
    Ok(())
}
