//! The vhost-user-blk device: virtio-blk requests from the guest's queues onto a block node.
//!
//! Guest memory is `GuestMemoryMmap<BitmapMmapRegion>`, so every byte this backend writes into
//! guest memory (read data, status bytes, used ring) is marked in the frontend's dirty log once
//! it sends `SET_LOG_BASE` (`LOG_SHMFD` + `LOG_ALL` are advertised). Each queue has its own
//! worker thread. [`serve`] serves one frontend connection after another on a socket path.

use std::{
    io::{Read, Write},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use vhost::vhost_user::{
    Listener,
    message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures},
};
use vhost_user_backend::{
    VhostUserBackend, VhostUserDaemon, VringRwLock, VringT, bitmap::BitmapMmapRegion,
};
use virtio_queue::{DescriptorChain, QueueOwnedT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryLoadGuard, GuestMemoryMmap, bitmap::Bitmap,
};
use vmm_sys_util::{
    epoll::EventSet,
    event::{EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier},
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
    /// Number of request queues.
    pub num_queues: usize,
    /// Largest queue size.
    pub queue_size: usize,
    /// Expose the disk read-only (VIRTIO_BLK_F_RO).
    pub read_only: bool,
    /// Device id returned by GET_ID (at most 20 bytes used).
    pub serial: String,
    /// Logical block size reported in the config space.
    pub blk_size: u32,
}

impl Default for BlkConfig {
    fn default() -> Self {
        BlkConfig {
            num_queues: 1,
            queue_size: 1024,
            read_only: false,
            serial: "vhost-blk-colo".into(),
            blk_size: 512,
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

/// The vhost-user-blk backend.
pub struct VhostUserBlk {
    node: NodeRef,
    cfg: BlkConfig,
    event_idx: AtomicBool,
    mem: Mutex<Option<Gm>>,
    stats: Arc<BlkStats>,
}

impl std::fmt::Debug for VhostUserBlk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserBlk")
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl VhostUserBlk {
    /// A device over `node`.
    pub fn new(node: NodeRef, cfg: BlkConfig) -> Self {
        VhostUserBlk {
            node,
            cfg,
            event_idx: AtomicBool::new(false),
            mem: Mutex::new(None),
            stats: Arc::default(),
        }
    }

    /// Request counters.
    pub fn stats(&self) -> Arc<BlkStats> {
        self.stats.clone()
    }

    fn read_only(&self) -> bool {
        self.cfg.read_only || self.node.read_only()
    }

    /// The virtio-blk config space (60 bytes).
    pub fn config_space(&self) -> Vec<u8> {
        let mut c = vec![0u8; 60];
        let capacity = self.node.size() / SECTOR;
        c[0..8].copy_from_slice(&capacity.to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&self.cfg.blk_size.to_le_bytes());
        // topology: physical_block_exp, alignment_offset, min_io_size, opt_io_size
        c[24] = 0;
        c[26..28].copy_from_slice(&1u16.to_le_bytes());
        c[34..36].copy_from_slice(&(self.cfg.num_queues as u16).to_le_bytes());
        c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
        c[44..48].copy_from_slice(&1u32.to_le_bytes());
        c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[52..56].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
        c[56] = 1;
        c
    }

    fn process_queue(&self, vring: &VringRwLock<Gm>, queue: u16) -> Result<bool, VhostBlkError> {
        let mem: GuestMemoryLoadGuard<Mem> = self
            .mem
            .lock()
            .ok()
            .and_then(|m| m.as_ref().map(|m| m.memory()))
            .ok_or(VhostBlkError::NoMemory)?;
        let chains: Vec<DescriptorChain<GuestMemoryLoadGuard<Mem>>> = vring
            .get_mut()
            .get_queue_mut()
            .iter(mem.clone())
            .map_err(|e| VhostBlkError::Queue(queue, e.to_string()))?
            .collect();
        if chains.is_empty() {
            return Ok(false);
        }
        // Start every request of the batch first (writes to a quorum with an NBD child are in
        // flight together), then complete them in order.
        let mut started = Vec::with_capacity(chains.len());
        for chain in chains {
            let head = chain.head_index();
            match self.start_chain(chain, &mem) {
                Ok(s) => started.push((head, Some(s))),
                Err(e) => {
                    // A malformed chain cannot carry a status byte; return it with len 0.
                    tracing::warn!("queue {queue}: {e}");
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    started.push((head, None));
                }
            }
        }
        for (head, s) in started {
            let used_len = match s {
                None => 0,
                Some(s) => {
                    let (status, written) = match s.outcome {
                        Outcome::Done(st, n) => (st, n),
                        Outcome::Wait(p, bytes) => match p.wait() {
                            Ok(()) => {
                                self.stats.writes.fetch_add(1, Ordering::Relaxed);
                                self.stats.bytes_written.fetch_add(bytes, Ordering::Relaxed);
                                (VIRTIO_BLK_S_OK, 0)
                            }
                            Err(e) => {
                                tracing::warn!("virtio-blk write failed: {e}");
                                (VIRTIO_BLK_S_IOERR, 0)
                            }
                        },
                    };
                    if status != VIRTIO_BLK_S_OK {
                        self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    match mem.write_slice(&[status], s.status_addr) {
                        Ok(()) => written as u32 + 1,
                        Err(e) => {
                            tracing::warn!("queue {queue}: status byte of chain {head}: {e}");
                            0
                        }
                    }
                }
            };
            vring
                .add_used(head, used_len)
                .map_err(|e| VhostBlkError::Queue(queue, e.to_string()))?;
        }
        if vring
            .needs_notification()
            .map_err(|e| VhostBlkError::Queue(queue, e.to_string()))?
        {
            vring
                .signal_used_queue()
                .map_err(|e| VhostBlkError::Queue(queue, e.to_string()))?;
        }
        Ok(true)
    }

    /// Parses one request and starts it; writes may still be in flight afterwards.
    fn start_chain(
        &self,
        chain: DescriptorChain<GuestMemoryLoadGuard<Mem>>,
        mem: &Mem,
    ) -> Result<Started, VhostBlkError> {
        let head = chain.head_index();
        let bad = |msg: String| VhostBlkError::BadChain { head, msg };
        let last = chain
            .clone()
            .last()
            .ok_or_else(|| bad("empty chain".into()))?;
        if !last.is_write_only() || last.len() == 0 {
            return Err(bad(
                "the last descriptor is not a writable status byte".into()
            ));
        }
        let status_addr = last
            .addr()
            .checked_add(u64::from(last.len()) - 1)
            .ok_or_else(|| bad("status address overflows".into()))?;
        // Single-segment fast path: header in its own descriptor, the data in exactly one
        // descriptor, then the status byte. The node then reads/writes guest memory directly.
        let descs: Vec<_> = chain.clone().collect();
        let direct = match descs.as_slice() {
            [h, d, st]
                if h.len() == 16 && !h.is_write_only() && st.len() == 1 && st.is_write_only() =>
            {
                Some((d.addr(), d.len() as usize, d.is_write_only()))
            }
            _ => None,
        };
        let mut reader = chain.clone().reader(mem).map_err(|e| bad(e.to_string()))?;
        let mut writer = chain.writer(mem).map_err(|e| bad(e.to_string()))?;
        let mut hdr = [0u8; 16];
        reader
            .read_exact(&mut hdr)
            .map_err(|e| bad(format!("request header: {e}")))?;
        let avail = writer.available_bytes();
        if avail == 0 {
            return Err(bad("no writable status byte".into()));
        }
        let _status_w = writer.split_at(avail - 1).map_err(|e| bad(e.to_string()))?;
        let rtype = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let mut s = [0u8; 8];
        s.copy_from_slice(&hdr[8..16]);
        let sector = u64::from_le_bytes(s);
        let wlen = writer.available_bytes();
        let rlen = reader.available_bytes();
        let outcome = match (rtype, direct) {
            (VIRTIO_BLK_T_IN, Some((addr, len, true)))
                if len == wlen && len <= MAX_REQUEST_BYTES =>
            {
                self.read_direct(mem, addr, len, sector)
            }
            (VIRTIO_BLK_T_OUT, Some((addr, len, false)))
                if len == rlen && len <= MAX_REQUEST_BYTES =>
            {
                self.write_direct(mem, addr, len, sector)
            }
            _ => self.execute(rtype, sector, &mut reader, &mut writer, wlen, rlen),
        };
        Ok(Started {
            status_addr,
            outcome,
        })
    }

    /// Reads from the node straight into one guest buffer, then marks it dirty.
    fn read_direct(&self, mem: &Mem, addr: GuestAddress, len: usize, sector: u64) -> Outcome {
        let Some(offset) = sector.checked_mul(SECTOR) else {
            return Outcome::Done(VIRTIO_BLK_S_IOERR, 0);
        };
        let Ok(vs) = mem.get_slice(addr, len) else {
            return Outcome::Done(VIRTIO_BLK_S_IOERR, 0);
        };
        let guard = vs.ptr_guard_mut();
        // SAFETY: `vs` covers `len` bytes of mapped guest memory that the driver handed to us
        // as device-writable for this request; nothing else in this process touches it until
        // the request completes. The guest could write it concurrently (its own bug); bytes
        // are plain data, so that cannot break memory safety here.
        let buf = unsafe { std::slice::from_raw_parts_mut(guard.as_ptr(), len) };
        match self.node.read_at(buf, offset) {
            Ok(()) => {
                vs.bitmap().mark_dirty(0, len);
                self.stats.reads.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .bytes_read
                    .fetch_add(len as u64, Ordering::Relaxed);
                Outcome::Done(VIRTIO_BLK_S_OK, len)
            }
            Err(e) => {
                tracing::warn!(sector, "virtio-blk read failed: {e}");
                Outcome::Done(VIRTIO_BLK_S_IOERR, 0)
            }
        }
    }

    /// Submits a write straight from one guest buffer.
    fn write_direct(&self, mem: &Mem, addr: GuestAddress, len: usize, sector: u64) -> Outcome {
        if self.read_only() {
            return Outcome::Done(VIRTIO_BLK_S_IOERR, 0);
        }
        let Some(offset) = sector.checked_mul(SECTOR) else {
            return Outcome::Done(VIRTIO_BLK_S_IOERR, 0);
        };
        let Ok(vs) = mem.get_slice(addr, len) else {
            return Outcome::Done(VIRTIO_BLK_S_IOERR, 0);
        };
        let guard = vs.ptr_guard();
        // SAFETY: `vs` covers `len` bytes of mapped guest memory, device-readable for this
        // request. The slice lives only during `submit`, which copies what it keeps.
        let buf = unsafe { std::slice::from_raw_parts(guard.as_ptr(), len) };
        let p = self.node.submit(WriteOp::Write {
            buf,
            offset,
            fua: false,
        });
        Outcome::Wait(p, len as u64)
    }

    fn execute<R: Read, W: Write>(
        &self,
        rtype: u32,
        sector: u64,
        reader: &mut R,
        writer: &mut W,
        wlen: usize,
        rlen: usize,
    ) -> Outcome {
        let fail = |e: BlockError| {
            tracing::warn!(rtype, sector, "virtio-blk request failed: {e}");
            Outcome::Done(VIRTIO_BLK_S_IOERR, 0)
        };
        let Some(offset) = sector.checked_mul(SECTOR) else {
            return Outcome::Done(VIRTIO_BLK_S_IOERR, 0);
        };
        match rtype {
            VIRTIO_BLK_T_IN => {
                let Some(len) = Some(wlen).filter(|&l| l <= MAX_REQUEST_BYTES) else {
                    return Outcome::Done(VIRTIO_BLK_S_IOERR, 0);
                };
                let r = with_scratch(len, |buf| {
                    self.node.read_at(buf, offset).map_err(Some)?;
                    writer.write_all(buf).map_err(|_| None)
                });
                match r {
                    Ok(()) => {}
                    Err(Some(e)) => return fail(e),
                    Err(None) => return Outcome::Done(VIRTIO_BLK_S_IOERR, 0),
                }
                self.stats.reads.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .bytes_read
                    .fetch_add(len as u64, Ordering::Relaxed);
                Outcome::Done(VIRTIO_BLK_S_OK, len)
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only() {
                    return Outcome::Done(VIRTIO_BLK_S_IOERR, 0);
                }
                if rlen > MAX_REQUEST_BYTES {
                    return Outcome::Done(VIRTIO_BLK_S_IOERR, 0);
                }
                // The node copies what it keeps (NBD frames) during submit, so the scratch
                // buffer is free again when submit returns.
                let r = with_scratch(rlen, |buf| {
                    reader.read_exact(buf).map_err(|_| ())?;
                    Ok(self.node.submit(WriteOp::Write {
                        buf,
                        offset,
                        fua: false,
                    }))
                });
                match r {
                    Ok(p) => Outcome::Wait(p, rlen as u64),
                    Err(()) => Outcome::Done(VIRTIO_BLK_S_IOERR, 0),
                }
            }
            VIRTIO_BLK_T_FLUSH => match self.node.flush() {
                Ok(()) => {
                    self.stats.flushes.fetch_add(1, Ordering::Relaxed);
                    Outcome::Done(VIRTIO_BLK_S_OK, 0)
                }
                Err(e) => fail(e),
            },
            VIRTIO_BLK_T_GET_ID => {
                let mut id = [0u8; ID_BYTES];
                let s = self.cfg.serial.as_bytes();
                let n = s.len().min(ID_BYTES);
                id[..n].copy_from_slice(&s[..n]);
                let room = wlen.min(ID_BYTES);
                if writer.write_all(&id[..room]).is_err() {
                    return Outcome::Done(VIRTIO_BLK_S_IOERR, 0);
                }
                Outcome::Done(VIRTIO_BLK_S_OK, room)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                if self.read_only() {
                    return Outcome::Done(VIRTIO_BLK_S_IOERR, 0);
                }
                let mut segs = Vec::new();
                if reader
                    .take(u64::from(MAX_DISCARD_SEG) * 16 + 1)
                    .read_to_end(&mut segs)
                    .is_err()
                    || segs.is_empty()
                    || segs.len() % 16 != 0
                    || segs.len() > MAX_DISCARD_SEG as usize * 16
                {
                    return Outcome::Done(VIRTIO_BLK_S_IOERR, 0);
                }
                for seg in segs.chunks_exact(16) {
                    let mut s = [0u8; 8];
                    s.copy_from_slice(&seg[0..8]);
                    let sector = u64::from_le_bytes(s);
                    let num = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
                    let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
                    if num > MAX_DISCARD_SECTORS
                        || flags & !1 != 0
                        || (rtype == VIRTIO_BLK_T_DISCARD && flags != 0)
                    {
                        return Outcome::Done(VIRTIO_BLK_S_UNSUPP, 0);
                    }
                    let Some(off) = sector.checked_mul(SECTOR) else {
                        return Outcome::Done(VIRTIO_BLK_S_IOERR, 0);
                    };
                    let len = u64::from(num) * SECTOR;
                    let op = if rtype == VIRTIO_BLK_T_DISCARD {
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
                Outcome::Done(VIRTIO_BLK_S_OK, 0)
            }
            _ => Outcome::Done(VIRTIO_BLK_S_UNSUPP, 0),
        }
    }
}

thread_local! {
    // Per worker thread bounce buffer, reused across requests (no zeroing, no page faults).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn with_scratch<T>(len: usize, f: impl FnOnce(&mut [u8]) -> T) -> T {
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut v) => {
            if v.len() < len {
                v.resize(len, 0);
            }
            f(&mut v[..len])
        }
        Err(_) => f(&mut vec![0u8; len]),
    })
}

/// A started request.
enum Outcome {
    /// Finished: status and bytes written into the chain.
    Done(u8, usize),
    /// A write in flight (bytes).
    Wait(crate::block::Pending, u64),
}

struct Started {
    status_addr: GuestAddress,
    outcome: Outcome,
}

impl VhostUserBackend for VhostUserBlk {
    type Bitmap = BitmapMmapRegion;
    type Vring = VringRwLock<Gm>;

    fn num_queues(&self) -> usize {
        self.cfg.num_queues
    }

    fn max_queue_size(&self) -> usize {
        self.cfg.queue_size
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
        if self.cfg.num_queues > 1 {
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
        if let Ok(mut m) = self.mem.lock() {
            *m = Some(mem);
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.cfg.num_queues).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        if evset != EventSet::IN {
            return Err(VhostBlkError::UnknownEvent(device_event).into());
        }
        let vring = vrings
            .get(device_event as usize)
            .ok_or(VhostBlkError::UnknownEvent(device_event))?;
        if self.event_idx.load(Ordering::Relaxed) {
            loop {
                vring
                    .disable_notification()
                    .map_err(|e| VhostBlkError::Queue(device_event, e.to_string()))?;
                self.process_queue(vring, device_event)?;
                if !vring
                    .enable_notification()
                    .map_err(|e| VhostBlkError::Queue(device_event, e.to_string()))?
                {
                    break;
                }
            }
        } else {
            self.process_queue(vring, device_event)?;
        }
        Ok(())
    }
}

/// Serves frontends on `socket`, one connection after another, until `stop` is set (checked
/// between connections). One listening socket lives across connections, so a frontend that
/// reconnects while the previous connection is being torn down waits in its backlog. Each
/// connection gets a fresh daemon (fresh vring state) over the same device.
pub fn serve(
    socket: &Path,
    dev: Arc<VhostUserBlk>,
    stop: &AtomicBool,
) -> Result<(), VhostBlkError> {
    let derr = |msg: String| VhostBlkError::Daemon {
        path: socket.display().to_string(),
        msg,
    };
    let mut listener = Listener::new(socket, true).map_err(|e| derr(e.to_string()))?;
    while !stop.load(Ordering::Relaxed) {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new("vhost-blk-colo".into(), dev.clone(), mem)
            .map_err(|e| derr(e.to_string()))?;
        daemon
            .start(&mut listener)
            .map_err(|e| derr(e.to_string()))?;
        if let Err(e) = daemon.wait() {
            tracing::warn!("vhost-user connection on {} ended: {e}", socket.display());
        }
        // Dropping the daemon stops its vring worker threads (exit events).
        drop(daemon);
        tracing::info!(socket = %socket.display(), "frontend disconnected; serving again");
    }
    Ok(())
}
