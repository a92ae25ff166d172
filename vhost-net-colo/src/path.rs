//! The datapath of one netdev: guest ⇄ filter chain ⇄ netdev.
//!
//! One lock covers the chain and the hand-off at its end, so frames leave in the order they
//! entered, and a filter added or removed at run time sees a frame entirely or not at all
//! (swapping a filter never drops or reorders a frame that was not in the removed filter).
//! One exception: frames an indev injects towards the netdev are written after the lock is let
//! go (see [`NetPath::inject_batch`]); one injecting thread per indev keeps them in order.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::filter::{Chain, Direction, FilterError, Outcome, QueueSel};
use crate::netdev::Netdev;
use crate::offload::{VnetHdr, to_plain};
use crate::vnet::VNET_HDR_LEN;

/// A frame for the guest with its virtio-net header (`num_buffers` is filled in when it is
/// placed in the ring). Plain frames have an all-zero header.
pub struct ToGuest {
    pub hdr: [u8; VNET_HDR_LEN],
    pub frame: Vec<u8>,
}

/// Frames waiting to be written into the guest's receive queue.
pub struct GuestRx {
    queue: Mutex<VecDeque<ToGuest>>,
    room: std::sync::Condvar,
    /// Signalled when frames are queued; the vhost worker listens on it.
    pub kick: EventFd,
    cap: usize,
    pub dropped: AtomicU64,
    pub queued: AtomicU64,
}

impl GuestRx {
    pub fn new(cap: usize) -> std::io::Result<Self> {
        Ok(Self {
            queue: Mutex::new(VecDeque::new()),
            room: std::sync::Condvar::new(),
            kick: EventFd::new(EFD_NONBLOCK)?,
            cap,
            dropped: AtomicU64::new(0),
            queued: AtomicU64::new(0),
        })
    }

    /// Queues a plain frame.
    pub fn push(&self, frame: Vec<u8>) {
        self.push_with_hdr([0; VNET_HDR_LEN], frame);
    }

    /// Queues a frame with the virtio-net header it goes to the guest with.
    pub fn push_with_hdr(&self, hdr: [u8; VNET_HDR_LEN], frame: Vec<u8>) {
        let Ok(mut q) = self.queue.lock() else {
            return;
        };
        if q.len() >= self.cap {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let was_empty = q.is_empty();
        q.push_back(ToGuest { hdr, frame });
        self.queued.fetch_add(1, Ordering::Relaxed);
        drop(q);
        // A queue that already held frames has had its kick: the ring filler takes everything
        // queued when it runs, or waits for the guest's buffers (which wake it) — one wake-up
        // per batch instead of one per frame.
        if was_empty {
            let _ = self.kick.write(1);
        }
    }

    /// Takes every queued frame (the ring filler works on them without holding the lock, so
    /// netdev readers keep queueing meanwhile).
    pub fn take_all(&self) -> VecDeque<ToGuest> {
        self.queue
            .lock()
            .map(|mut q| std::mem::take(&mut *q))
            .unwrap_or_default()
    }

    /// Puts back frames the ring filler could not place, in front of those queued since.
    pub fn put_back(&self, mut rest: VecDeque<ToGuest>) {
        if rest.is_empty() {
            return;
        }
        if let Ok(mut q) = self.queue.lock() {
            rest.append(&mut q);
            *q = rest;
        }
    }

    /// The queue, for the receive-ring filler (which pops from the front and may put a frame
    /// back when the guest has no buffer for it).
    pub fn lock(&self) -> Option<MutexGuard<'_, VecDeque<ToGuest>>> {
        self.queue.lock().ok()
    }

    pub fn clear(&self) {
        if let Ok(mut q) = self.queue.lock() {
            q.clear();
        }
        self.room.notify_all();
    }

    /// Waits (up to `timeout`) until the queue has room: netdev readers call it before taking
    /// a frame through the chain, so a guest that is slow to post buffers slows the netdev down
    /// (a stream socket or tap backs up) instead of losing frames.
    pub fn wait_room(&self, timeout: std::time::Duration) {
        let Ok(q) = self.queue.lock() else { return };
        let _ = self
            .room
            .wait_timeout_while(q, timeout, |q| q.len() >= self.cap);
    }

    /// True when a frame queued now would not have to wait for room (see [`GuestRx::wait_room`]).
    pub fn has_room(&self) -> bool {
        self.queue
            .lock()
            .map(|q| q.len() < self.cap)
            .unwrap_or(true)
    }

    /// Called by the ring filler after taking frames.
    pub fn notify_room(&self) {
        // Through the lock: a reader that found the queue full is waiting by now, not between
        // its check and its wait (where the notification would be lost).
        drop(self.queue.lock());
        self.room.notify_all();
    }
}

/// Frames one batch takes through the chain before it lets go of the chain's lock (and writes
/// what its outdevs kept), so the other direction never waits long.
pub const BATCH_FRAMES: usize = 64;

/// A frame from the netdev: plain, or with its virtio-net header (a tap with vnet headers).
pub enum FromNetdev {
    Plain(Vec<u8>),
    Vnet([u8; VNET_HDR_LEN], Vec<u8>),
}

/// The chain's lock held for a batch of frames (one transmit pass, one netdev read): socket
/// outdevs keep the records of the batch and write them together when it ends, in order, with
/// the lock still held (so a filter removed after the batch has nothing kept, and the records
/// of one outdev leave in the order its frames came). Dropping the batch ends it.
pub struct Batch<'a> {
    chain: MutexGuard<'a, Chain>,
    frames: usize,
}

impl std::ops::Deref for Batch<'_> {
    type Target = Chain;
    fn deref(&self) -> &Chain {
        &self.chain
    }
}

impl std::ops::DerefMut for Batch<'_> {
    fn deref_mut(&mut self) -> &mut Chain {
        &mut self.chain
    }
}

impl Batch<'_> {
    /// Frames taken in this batch so far.
    pub fn frames(&self) -> usize {
        self.frames
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        self.chain.end_batch();
    }
}

/// The datapath of one netdev.
pub struct NetPath {
    pub netdev_id: String,
    chain: Mutex<Chain>,
    netdev: Mutex<Option<Arc<dyn Netdev>>>,
    pub guest: Arc<GuestRx>,
    pub to_netdev_errors: AtomicU64,
    /// Frames from the outside that arrived while no frontend was set up (queued, bounded).
    pub no_guest: AtomicU64,
    pub guest_connected: std::sync::atomic::AtomicBool,
    /// Link state (`set_link`): while down, frames are dropped in both directions.
    pub link_up: std::sync::atomic::AtomicBool,
    /// Frames dropped because the link was down.
    pub link_down_dropped: AtomicU64,
    /// RARP announces sent to the netdev (SEND_RARP, `announce-self`).
    pub announced: AtomicU64,
    /// Queue pairs of the device (`queues=N`).
    pairs: std::sync::atomic::AtomicUsize,
    /// Virtio features the frontend acknowledged (which offloads the guest takes).
    pub guest_features: AtomicU64,
    /// Offloaded frames that could not be made plain (bad or unsupported headers): dropped.
    pub offload_errors: AtomicU64,
    /// Offloaded frames passed through with their header (empty chain, capable peer).
    pub offload_passthrough: AtomicU64,
    /// Offloaded frames made plain in software (checksum completed and/or segmented).
    pub offload_software: AtomicU64,
    /// The guest MAC (config space; announces).
    pub mac: Mutex<[u8; 6]>,
    /// The frontend's backend-request channel, when it negotiated one (with the protocol
    /// features then negotiated).
    backend_chan: Mutex<Option<(std::os::unix::net::UnixStream, u64)>>,
}

/// `VHOST_USER_PROTOCOL_F_BACKEND_REQ`.
const PROTOCOL_F_BACKEND_REQ: u64 = 1 << 5;
/// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`.
const BACKEND_CONFIG_CHANGE_MSG: u32 = 2;

impl NetPath {
    pub fn new(netdev_id: &str, guest: Arc<GuestRx>) -> Self {
        Self {
            netdev_id: netdev_id.to_string(),
            chain: Mutex::new(Chain::new()),
            netdev: Mutex::new(None),
            guest,
            to_netdev_errors: AtomicU64::new(0),
            no_guest: AtomicU64::new(0),
            guest_connected: std::sync::atomic::AtomicBool::new(false),
            link_up: std::sync::atomic::AtomicBool::new(true),
            link_down_dropped: AtomicU64::new(0),
            announced: AtomicU64::new(0),
            pairs: std::sync::atomic::AtomicUsize::new(1),
            guest_features: AtomicU64::new(0),
            offload_errors: AtomicU64::new(0),
            offload_passthrough: AtomicU64::new(0),
            offload_software: AtomicU64::new(0),
            mac: Mutex::new([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
            backend_chan: Mutex::new(None),
        }
    }

    pub fn pairs(&self) -> usize {
        self.pairs.load(Ordering::Relaxed)
    }

    pub fn set_pairs(&self, n: usize) {
        self.pairs.store(n.max(1), Ordering::Relaxed);
    }

    pub fn mac(&self) -> [u8; 6] {
        *self.mac.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_mac(&self, mac: [u8; 6]) {
        *self.mac.lock().unwrap_or_else(|p| p.into_inner()) = mac;
    }

    pub fn link_is_up(&self) -> bool {
        self.link_up.load(Ordering::Relaxed)
    }

    /// Sets the link state; true when it changed. Tells the frontend (config change) if it can.
    pub fn set_link(&self, up: bool) -> bool {
        let changed = self.link_up.swap(up, Ordering::SeqCst) != up;
        if changed {
            match self.notify_config_change() {
                Ok(true) => {
                    tracing::info!("link {}: frontend notified", if up { "up" } else { "down" })
                }
                Ok(false) => tracing::info!(
                    "link {}: the frontend has no backend-request channel; the guest sees it when it reads config space",
                    if up { "up" } else { "down" }
                ),
                Err(e) => tracing::warn!("link change: CONFIG_CHANGE_MSG to the frontend: {e}"),
            }
        }
        changed
    }

    /// Remembers the frontend's backend-request channel (from the vhost-user relay).
    pub fn set_backend_channel(&self, chan: Option<(std::os::unix::net::UnixStream, u64)>) {
        *self.backend_chan.lock().unwrap_or_else(|p| p.into_inner()) = chan;
    }

    /// Sends `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` (no reply asked for) on the backend-request
    /// channel. Ok(false) when there is none.
    pub fn notify_config_change(&self) -> std::io::Result<bool> {
        use std::io::Write;
        let g = self.backend_chan.lock().unwrap_or_else(|p| p.into_inner());
        let Some((chan, pf)) = g.as_ref() else {
            return Ok(false);
        };
        if pf & PROTOCOL_F_BACKEND_REQ == 0 {
            return Ok(false);
        }
        let mut m = Vec::with_capacity(12);
        m.extend_from_slice(&BACKEND_CONFIG_CHANGE_MSG.to_le_bytes());
        m.extend_from_slice(&1u32.to_le_bytes()); // version 1, no NEED_REPLY
        m.extend_from_slice(&0u32.to_le_bytes());
        let mut w = chan;
        w.write_all(&m)?;
        Ok(true)
    }

    /// Sends a frame the device itself originates (a RARP announce) straight to the netdev,
    /// after the filter chain; dropped while the link is down.
    pub fn announce(&self, frame: Vec<u8>) {
        if !self.link_is_up() {
            self.link_down_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.announced.fetch_add(1, Ordering::Relaxed);
        self.deliver(Direction::Rx, frame);
    }

    pub fn set_netdev(&self, n: Arc<dyn Netdev>) {
        if let Ok(mut g) = self.netdev.lock() {
            *g = Some(n);
        }
    }

    pub fn netdev(&self) -> Option<Arc<dyn Netdev>> {
        self.netdev.lock().ok().and_then(|g| g.clone())
    }

    /// The chain, for edits and queries. Hold it briefly.
    pub fn chain(&self) -> MutexGuard<'_, Chain> {
        // A panic inside a filter poisons the lock; the chain itself stays consistent (filters
        // are only ever called one at a time), so keep going.
        self.chain.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn deliver(&self, dir: Direction, frame: Vec<u8>) {
        self.deliver_on(0, dir, frame)
    }

    /// As `deliver`; frames to the netdev leave on its queue `q` (a multi-queue tap).
    fn deliver_on(&self, q: usize, dir: Direction, frame: Vec<u8>) {
        // Also covers frames injected from an indev while the link is down.
        if !self.link_is_up() {
            self.link_down_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match dir {
            Direction::Tx => {
                // Queued even while no frontend has set up memory yet (frames that arrive while
                // the rings are being set up are kept); the queue is bounded and emptied when
                // a frontend goes away.
                if !self.guest_connected.load(Ordering::Relaxed) {
                    self.no_guest.fetch_add(1, Ordering::Relaxed);
                }
                self.guest.push(frame);
            }
            Direction::Rx => {
                let nd = self.netdev.lock().ok().and_then(|g| g.clone());
                if let Some(nd) = nd
                    && let Err(e) = nd.send_on(q, &frame)
                {
                    self.to_netdev_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("netdev {}: send: {e}", self.netdev_id);
                }
            }
        }
    }

    /// For the transmit worker: the chain's lock and the netdev when frames from the guest may
    /// go straight from guest memory to it (empty chain, link up, a netdev with vnet headers,
    /// which takes the guest's header as it is). Hold the guard while sending, so a filter
    /// added meanwhile sees every later frame.
    pub fn direct_tx(&self) -> Option<(MutexGuard<'_, Chain>, Arc<dyn Netdev>)> {
        if !self.link_is_up() {
            return None;
        }
        let chain = self.chain();
        if !chain.is_empty() {
            return None;
        }
        let nd = self.netdev()?;
        nd.vnet_hdr().then_some((chain, nd))
    }

    /// Counts a frame the transmit worker sent straight to the netdev (see
    /// [`NetPath::direct_tx`]), or the error it got.
    pub fn count_direct(&self, r: &std::io::Result<VnetHdr>) {
        match r {
            Ok(h) if !h.is_plain() => {
                self.offload_passthrough.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(e) => {
                self.to_netdev_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("netdev {}: send: {e}", self.netdev_id);
            }
        }
    }

    /// For the transmit worker: an open batch when frames from the guest may go from guest
    /// memory straight into the chain's first filter (link up, and the first filter guest
    /// egress meets consumes it into a socket outdev, as the primary's `redirector
    /// queue=rx outdev=...` does): see [`NetPath::from_guest_raw`]. Held while frames are sent,
    /// so a filter added or removed meanwhile sees every later frame; ending it writes the
    /// records kept, as [`NetPath::from_guest_batch`]'s batches do.
    pub fn guest_raw_batch(&self) -> Option<Batch<'_>> {
        if !self.link_is_up() {
            return None;
        }
        let mut chain = self.chain();
        if !chain.first_consumes_raw(Direction::Rx) {
            return None;
        }
        chain.begin_batch();
        Some(Batch { chain, frames: 0 })
    }

    /// A frame from the guest, its virtio-net header `hdr` and its frame `l2` in place, in a
    /// batch from [`NetPath::guest_raw_batch`]: consumed by the chain's first filter with the
    /// same record and counters as [`NetPath::from_guest_batch`] gives it. False when it cannot
    /// go that way (link down, a bad header, an offloaded frame the chain would make plain):
    /// nothing was done, and the caller sends this frame and every later one the copying way.
    pub fn from_guest_raw(
        &self,
        batch: &mut Batch<'_>,
        hdr: &[u8; VNET_HDR_LEN],
        l2: crate::filter::RawFrame<'_>,
    ) -> bool {
        if !self.link_is_up() {
            return false;
        }
        let Ok(h) = VnetHdr::parse(hdr) else {
            return false;
        };
        let offloaded = !h.is_plain();
        if !batch
            .chain
            .consume_raw(Direction::Rx, offloaded.then_some(&h), l2)
        {
            return false;
        }
        if offloaded {
            self.offload_passthrough.fetch_add(1, Ordering::Relaxed);
        }
        batch.frames += 1;
        true
    }

    /// A frame the guest sent (guest egress, `rx`).
    pub fn from_guest(&self, frame: Vec<u8>) {
        self.from_guest_on(0, frame)
    }

    /// A frame the guest sent on queue pair `q`.
    pub fn from_guest_on(&self, q: usize, frame: Vec<u8>) {
        if !self.link_is_up() {
            self.link_down_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut chain = self.chain();
        self.guest_plain_locked(&mut chain, q, frame);
    }

    /// As [`NetPath::from_guest_on`] with the chain's lock held.
    fn guest_plain_locked(&self, chain: &mut Chain, q: usize, frame: Vec<u8>) {
        if !self.link_is_up() {
            self.link_down_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if let Outcome::Deliver(f) = chain.process(Direction::Rx, frame) {
            self.deliver_on(q, Direction::Rx, f);
        }
    }

    /// A frame the guest sent with its virtio-net header. An offloaded frame goes through the
    /// chain whole when every filter on its way takes it so ([`Chain::takes_offloaded`]) and
    /// leaves with its header (segmented in software only for a netdev without vnet headers);
    /// otherwise it is made plain (checksums completed, GSO frames segmented) and each piece
    /// goes through the chain.
    pub fn from_guest_vnet(&self, hdr: &[u8], frame: Vec<u8>) {
        self.from_guest_vnet_on(0, hdr, frame)
    }

    /// As [`NetPath::from_guest_vnet`], from queue pair `q`.
    pub fn from_guest_vnet_on(&self, q: usize, hdr: &[u8], frame: Vec<u8>) {
        let h = match VnetHdr::parse(hdr) {
            Ok(h) => h,
            Err(_) => {
                self.offload_errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        if h.is_plain() {
            return self.from_guest_on(q, frame);
        }
        if !self.link_is_up() {
            self.link_down_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.guest_offloaded_locked(&mut self.chain(), q, h, hdr, frame);
    }

    /// The frames of one transmit pass from queue pair `q`, each with its virtio-net header,
    /// in order: as [`NetPath::from_guest_vnet_on`] one by one, but in batches of up to
    /// [`BATCH_FRAMES`] under one hold of the chain's lock, so socket outdevs write the
    /// records of a batch together when it ends. One frame goes alone, as before.
    pub fn from_guest_batch(&self, q: usize, frames: Vec<([u8; VNET_HDR_LEN], Vec<u8>)>) {
        if frames.len() <= 1 {
            for (hdr, f) in frames {
                self.from_guest_vnet_on(q, &hdr, f);
            }
            return;
        }
        let mut batch: Option<Batch<'_>> = None;
        for (hdr, f) in frames {
            let b = self.batch_slot(&mut batch);
            match VnetHdr::parse(&hdr) {
                Ok(h) if h.is_plain() => self.guest_plain_locked(b, q, f),
                Ok(h) => self.guest_offloaded_locked(b, q, h, &hdr, f),
                Err(_) => {
                    self.offload_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Opens a batch: the chain's lock, held until the batch is dropped (see [`Batch`]).
    pub fn batch(&self) -> Batch<'_> {
        let mut chain = self.chain();
        chain.begin_batch();
        Batch { chain, frames: 0 }
    }

    /// The open batch for one more frame (a new one when there is none or the open one has
    /// taken [`BATCH_FRAMES`]).
    fn batch_slot<'a, 'b>(&'a self, batch: &'b mut Option<Batch<'a>>) -> &'b mut Chain {
        if batch.as_ref().is_some_and(|b| b.frames >= BATCH_FRAMES) {
            *batch = None;
        }
        let b = batch.get_or_insert_with(|| self.batch());
        b.frames += 1;
        &mut b.chain
    }

    /// An offloaded frame from the guest (header `h`, raw `hdr`), with the chain's lock held.
    fn guest_offloaded_locked(
        &self,
        chain: &mut Chain,
        q: usize,
        h: VnetHdr,
        hdr: &[u8],
        frame: Vec<u8>,
    ) {
        if !self.link_is_up() {
            self.link_down_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if chain.takes_offloaded(Direction::Rx) {
            let mut h = h;
            match chain.process_offloaded(Direction::Rx, &mut h, frame) {
                Outcome::Deliver(f) => self.deliver_offloaded(q, Direction::Rx, h, f),
                Outcome::Consumed => {
                    self.offload_passthrough.fetch_add(1, Ordering::Relaxed);
                }
            }
            return;
        }
        match to_plain(hdr, frame) {
            Ok(segs) => {
                self.offload_software.fetch_add(1, Ordering::Relaxed);
                for s in segs {
                    self.guest_plain_locked(chain, q, s);
                }
            }
            Err(e) => {
                self.offload_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("frame from the guest dropped: {e}");
            }
        }
    }

    /// Frames from the netdev that came together (one socket read, one drain of a tap), in
    /// order: as [`NetPath::from_netdev`] / [`NetPath::from_netdev_hdr`] one by one, but in
    /// batches under one hold of the chain's lock (see [`NetPath::from_guest_batch`]). When
    /// the guest's queue is full the batch ends (its records are written) before the wait for
    /// room. One frame goes alone, as before.
    pub fn from_netdev_batch(&self, frames: Vec<FromNetdev>) {
        if frames.len() <= 1 {
            for f in frames {
                match f {
                    FromNetdev::Plain(f) => self.from_netdev(f),
                    FromNetdev::Vnet(h, f) => self.from_netdev_hdr(h, f),
                }
            }
            return;
        }
        let mut batch: Option<Batch<'_>> = None;
        for f in frames {
            let (hdr, buf) = match f {
                FromNetdev::Plain(f) => {
                    self.netdev_plain_batched(&mut batch, f);
                    continue;
                }
                FromNetdev::Vnet(h, f) => (h, f),
            };
            let Ok(h) = VnetHdr::parse(&hdr) else {
                self.offload_errors.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            if h.is_plain() {
                self.netdev_plain_batched(&mut batch, buf);
                continue;
            }
            if !self.link_is_up() {
                self.link_down_dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let chain = self.ingress_slot(&mut batch);
            let Some(buf) = self.offloaded_to_guest(chain, h, buf) else {
                continue;
            };
            match to_plain(&hdr, buf) {
                Ok(segs) => {
                    self.offload_software.fetch_add(1, Ordering::Relaxed);
                    for s in segs {
                        self.netdev_plain_batched(&mut batch, s);
                    }
                }
                Err(e) => {
                    self.offload_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("frame to the guest dropped: {e}");
                }
            }
        }
    }

    /// An offloaded frame from the netdev through `chain` whole, when the chain takes it so
    /// (then on to the guest with its header, or consumed). Otherwise hands `buf` back, to be
    /// made plain by the caller.
    fn offloaded_to_guest(&self, chain: &mut Chain, h: VnetHdr, buf: Vec<u8>) -> Option<Vec<u8>> {
        if !chain.takes_offloaded(Direction::Tx) {
            return Some(buf);
        }
        let mut h = h;
        match chain.process_offloaded(Direction::Tx, &mut h, buf) {
            Outcome::Deliver(f) => self.deliver_offloaded(0, Direction::Tx, h, f),
            Outcome::Consumed => {
                self.offload_passthrough.fetch_add(1, Ordering::Relaxed);
            }
        }
        None
    }

    /// A plain frame from the netdev in a batch (see [`NetPath::from_netdev`]).
    fn netdev_plain_batched<'a>(&'a self, batch: &mut Option<Batch<'a>>, frame: Vec<u8>) {
        if !self.link_is_up() {
            self.link_down_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let chain = self.ingress_slot(batch);
        if let Outcome::Deliver(f) = chain.process(Direction::Tx, frame) {
            self.deliver(Direction::Tx, f);
        }
    }

    /// As [`NetPath::batch_slot`] for a frame towards the guest: when the guest's queue is
    /// full, the open batch ends (its records written, the lock let go) before the wait for
    /// room, as [`NetPath::from_netdev`] waits.
    fn ingress_slot<'a, 'b>(&'a self, batch: &'b mut Option<Batch<'a>>) -> &'b mut Chain {
        if self.guest_connected.load(Ordering::Relaxed) && !self.guest.has_room() {
            *batch = None;
            self.guest.wait_room(std::time::Duration::from_secs(1));
        }
        self.batch_slot(batch)
    }

    /// A frame (`buf`) and its virtio-net header from a netdev with vnet headers. Goes through
    /// the chain whole when the chain takes it so, and to the guest with its header when the
    /// guest negotiated the offloads it uses; otherwise made plain.
    pub fn from_netdev_hdr(&self, hdr: [u8; VNET_HDR_LEN], buf: Vec<u8>) {
        let Ok(h) = VnetHdr::parse(&hdr) else {
            self.offload_errors.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if h.is_plain() {
            return self.from_netdev(buf);
        }
        if !self.link_is_up() {
            self.link_down_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self.guest_connected.load(Ordering::Relaxed) {
            self.guest.wait_room(std::time::Duration::from_secs(1));
        }
        let Some(buf) = self.offloaded_to_guest(&mut self.chain(), h, buf) else {
            return;
        };
        match to_plain(&hdr, buf) {
            Ok(segs) => {
                self.offload_software.fetch_add(1, Ordering::Relaxed);
                for s in segs {
                    self.from_netdev(s);
                }
            }
            Err(e) => {
                self.offload_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("frame to the guest dropped: {e}");
            }
        }
    }

    /// A frame the netdev received (guest ingress, `tx`). Waits a little for room in the
    /// guest's queue first (outside the chain lock), so the netdev is back-pressured.
    pub fn from_netdev(&self, frame: Vec<u8>) {
        if !self.link_is_up() {
            self.link_down_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self.guest_connected.load(Ordering::Relaxed) {
            self.guest.wait_room(std::time::Duration::from_secs(1));
        }
        let mut chain = self.chain();
        if let Outcome::Deliver(f) = chain.process(Direction::Tx, frame) {
            self.deliver(Direction::Tx, f);
        }
    }

    /// A frame that leaves the chain with offloads pending: to a netdev with vnet headers or a
    /// guest that negotiated them whole with its header, else made plain in software first.
    fn deliver_offloaded(&self, q: usize, dir: Direction, h: VnetHdr, frame: Vec<u8>) {
        if !self.link_is_up() {
            self.link_down_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let whole = match dir {
            Direction::Rx => self.netdev().is_some_and(|nd| nd.vnet_hdr()),
            Direction::Tx => {
                let need = h.guest_features_needed();
                self.guest_features.load(Ordering::Relaxed) & need == need
            }
        };
        if whole {
            self.offload_passthrough.fetch_add(1, Ordering::Relaxed);
            match dir {
                Direction::Rx => {
                    if let Some(nd) = self.netdev()
                        && let Err(e) = nd.send_vnet_on(q, &h.to_bytes(), &frame)
                    {
                        self.to_netdev_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!("netdev {}: send: {e}", self.netdev_id);
                    }
                }
                Direction::Tx => self.guest.push_with_hdr(h.to_bytes(), frame),
            }
            return;
        }
        match to_plain(&h.to_bytes(), frame) {
            Ok(segs) => {
                self.offload_software.fetch_add(1, Ordering::Relaxed);
                for s in segs {
                    self.deliver_on(q, dir, s);
                }
            }
            Err(e) => {
                self.offload_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("offloaded frame dropped: {e}");
            }
        }
    }

    /// Records read from filter `id`'s indev, in order, under one hold of the chain's lock:
    /// each is injected from the filter's position in the direction(s) of its `queue`. A
    /// record that came with a virtio-net header asking for offloads goes on whole while the
    /// filters after `id` take it so, and leaves with its header (a tap with vnet headers
    /// segments it); otherwise it is made plain first. An error (the filter is gone) stops at
    /// that record.
    ///
    /// What leaves towards the netdev is sent after the chain's lock is let go: a netdev write
    /// can take long (a tap write runs the host's network stack up to the receiving socket; a
    /// stream netdev blocks while its peer does not read), and the other direction (netdev to
    /// guest, through the mirror) must not wait for it. Each indev has one injecting thread,
    /// so its frames still leave in the order they were read.
    pub fn inject_batch(
        &self,
        id: &str,
        recs: Vec<(Option<VnetHdr>, Vec<u8>)>,
    ) -> Result<(), FilterError> {
        let mut to_netdev = Vec::new();
        let r = {
            let mut chain = self.chain();
            recs.into_iter()
                .try_for_each(|(h, f)| self.inject_in(&mut chain, id, h, f, &mut to_netdev))
        };
        for (h, f) in to_netdev {
            match h {
                None => self.deliver(Direction::Rx, f),
                Some(h) => self.deliver_offloaded(0, Direction::Rx, h, f),
            }
        }
        r
    }

    /// One record of [`NetPath::inject_batch`], with the chain's lock held: frames for the
    /// guest are queued at once, frames for the netdev (with their header when offloaded)
    /// collected into `to_netdev`, in order.
    fn inject_in(
        &self,
        chain: &mut Chain,
        id: &str,
        hdr: Option<VnetHdr>,
        mut frame: Vec<u8>,
        to_netdev: &mut Vec<(Option<VnetHdr>, Vec<u8>)>,
    ) -> Result<(), FilterError> {
        let queue = chain
            .get(id)
            .map(|e| (e.queue, e.status))
            .ok_or_else(|| FilterError::NotFound(id.to_string()))?;
        if !queue.1 {
            // QEMU reads indev only while the filter is on; frames read meanwhile are dropped.
            return Ok(());
        }
        let dirs: &[Direction] = match queue.0 {
            QueueSel::Tx => &[Direction::Tx],
            QueueSel::Rx => &[Direction::Rx],
            QueueSel::All => &[Direction::Tx, Direction::Rx],
        };
        let mut out = |d: Direction, h: Option<VnetHdr>, f: Vec<u8>| match (d, h) {
            (Direction::Rx, h) => to_netdev.push((h, f)),
            (Direction::Tx, None) => self.deliver(d, f),
            (Direction::Tx, Some(h)) => self.deliver_offloaded(0, d, h, f),
        };
        for (k, &d) in dirs.iter().enumerate() {
            // The last direction takes the frame itself; only `queue=all` copies it.
            let frame = if k + 1 < dirs.len() {
                frame.clone()
            } else {
                std::mem::take(&mut frame)
            };
            let Some(h) = hdr else {
                if let Outcome::Deliver(f) = chain.inject_from(id, d, frame)? {
                    out(d, None, f);
                }
                continue;
            };
            if chain.takes_offloaded_after(id, d)? {
                let mut h = h;
                match chain.inject_offloaded_from(id, d, &mut h, frame)? {
                    Outcome::Deliver(f) => out(d, Some(h), f),
                    Outcome::Consumed => {
                        self.offload_passthrough.fetch_add(1, Ordering::Relaxed);
                    }
                }
                continue;
            }
            match to_plain(&h.to_bytes(), frame) {
                Ok(segs) => {
                    self.offload_software.fetch_add(1, Ordering::Relaxed);
                    for s in segs {
                        if let Outcome::Deliver(f) = chain.inject_from(id, d, s)? {
                            out(d, None, f);
                        }
                    }
                }
                Err(e) => {
                    self.offload_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("injected frame dropped: {e}");
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::testutil::entry;
    use crate::filter::{FilterRedirector, Insert, Position};

    /// Records read from an indev are injected in order, batch after batch; a batch for a
    /// filter that is gone is refused.
    #[test]
    fn an_indev_batch_injects_its_records_in_order() {
        let path = NetPath::new("hn0", Arc::new(GuestRx::new(64).unwrap()));
        path.chain()
            .insert(
                entry(
                    "r0",
                    QueueSel::Tx,
                    Box::new(FilterRedirector::new(None, false)),
                ),
                &Position::Tail,
                Insert::Behind,
            )
            .unwrap();
        let frames: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 60 + usize::from(i)]).collect();
        path.inject_batch("r0", vec![(None, frames[0].clone())])
            .unwrap();
        path.inject_batch(
            "r0",
            frames[1..].iter().map(|f| (None, f.clone())).collect(),
        )
        .unwrap();
        let got: Vec<Vec<u8>> = path.guest.take_all().into_iter().map(|t| t.frame).collect();
        assert_eq!(got, frames);
        assert_eq!(path.chain().get("r0").unwrap().counters.injected, 5);
        assert!(matches!(
            path.inject_batch("gone", vec![(None, vec![1; 60])]),
            Err(FilterError::NotFound(_))
        ));
        assert!(path.guest.take_all().is_empty());
    }
}
