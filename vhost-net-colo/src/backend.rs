//! The vhost-user-net device: virtqueues ⇄ [`NetPath`].
//!
//! - `queues=N` receive/transmit queue pairs (receive 2i, transmit 2i+1; `VIRTIO_NET_F_MQ` and
//!   `max_virtqueue_pairs` when N > 1), 1024 entries each, split rings, `VIRTIO_F_VERSION_1`,
//!   `VIRTIO_RING_F_EVENT_IDX`, `VIRTIO_RING_F_INDIRECT_DESC`. All queues are served by one
//!   worker thread; frames to the guest go to the enabled receive queue their flow hashes to.
//! - The 12-byte virtio-net header; `VIRTIO_NET_F_MRG_RXBUF`: a frame may span several receive
//!   buffers (`num_buffers` set); without it each frame must fit one buffer chain.
//! - Checksum and TCP segmentation offloads both ways (`CSUM`, `HOST_TSO4/6`, `GUEST_CSUM`,
//!   `GUEST_TSO4/6`): offloaded frames go through the filter chain whole with their header
//!   when every filter on the way takes them so (mirror/redirector with `vnet_hdr_support=on`,
//!   rewriter; see [`crate::filter`]) and leave whole to a tap with vnet headers or a guest
//!   that negotiated the offload; wherever that does not hold they are made plain in software
//!   ([`crate::offload`]).
//! - ECN with TSO (`HOST_ECN`, `GUEST_ECN`: `VIRTIO_NET_HDR_GSO_ECN` frames, CWR kept on the
//!   first segment only where cut in software) and UDP fragmentation (`HOST_UFO`,
//!   `GUEST_UFO`: QEMU 7.2 offers both on a tap that takes `TUN_F_UFO`; Linux guests since 4.14
//!   never send UFO, but a frontend may), and USO from the guest (`HOST_USO`, virtio 1.2): the
//!   same rule as TSO, offered whatever the netdev, whole where the far side takes them,
//!   made plain in software elsewhere. `GUEST_USO4/6` are not offered (the tap is not asked
//!   for USO frames).
//! - `VIRTIO_NET_F_MAC` with the MAC from the command line and `VIRTIO_NET_F_STATUS` in config
//!   space (`VHOST_USER_PROTOCOL_F_CONFIG`); `set_link` changes the status and sends
//!   `CONFIG_CHANGE_MSG` when the frontend gave a backend-request channel
//!   (`VHOST_USER_PROTOCOL_F_BACKEND_REQ`).
//! - `VHOST_USER_PROTOCOL_F_RARP`: `SEND_RARP` (handled in [`crate::shim`]) broadcasts QEMU's
//!   RARP announce out of the netdev ([`crate::announce`]).
//! - Dirty-page logging (`LOG_ALL`, `LOG_SHMFD`) through `BitmapMmapRegion` guest memory, so a
//!   COLO/migration frontend sees every page the backend writes.
//!
//! [`serve`] loops: after a frontend disconnects, a new daemon listens again on the socket; a
//! frontend that reconnects gives the ring positions back with `SET_VRING_BASE`.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

use crate::path::NetPath;
use crate::vnet::VNET_HDR_LEN;

type Mem = GuestMemoryMmap<BitmapMmapRegion>;
type GM = GuestMemoryAtomic<Mem>;

pub const QUEUE_SIZE: usize = 1024;
/// Most queue pairs (`queues=N`).
pub const MAX_QUEUE_PAIRS: usize = 16;
pub const VIRTIO_NET_F_MQ: u64 = 22;

pub const VIRTIO_NET_F_CSUM: u64 = 0;
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1;
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 7;
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 8;
pub const VIRTIO_NET_F_HOST_TSO4: u64 = 11;
pub const VIRTIO_NET_F_HOST_TSO6: u64 = 12;
pub const VIRTIO_NET_F_GUEST_ECN: u64 = 9;
pub const VIRTIO_NET_F_GUEST_UFO: u64 = 10;
pub const VIRTIO_NET_F_HOST_ECN: u64 = 13;
pub const VIRTIO_NET_F_HOST_UFO: u64 = 14;
pub const VIRTIO_NET_F_HOST_USO: u64 = 56;
pub const VIRTIO_NET_F_MAC: u64 = 5;
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 15;
pub const VIRTIO_NET_F_STATUS: u64 = 16;
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 28;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 29;
pub const VIRTIO_F_VERSION_1: u64 = 32;
const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// Errors of the vhost-user side.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("vhost-user socket {path}: {msg}")]
    Daemon { path: String, msg: String },
    #[error("vhost-user backend: {0}")]
    Io(#[from] std::io::Error),
}

/// Device counters for `query-filters`/`query-net`.
#[derive(Debug, Default)]
pub struct DevCounters {
    pub tx_frames: AtomicU64,
    pub rx_frames: AtomicU64,
    pub rx_dropped_too_big: AtomicU64,
    pub bad_descriptors: AtomicU64,
    pub connections: AtomicU64,
    /// Interrupts (used-buffer notifications) sent to the guest for its receive queues.
    pub rx_interrupts: AtomicU64,
    /// Interrupts sent to the guest for its transmit queues.
    pub tx_interrupts: AtomicU64,
    /// Transmit-queue kicks from the guest (events handled).
    pub tx_kicks: AtomicU64,
    /// Passes of the receive-ring filler.
    pub rx_passes: AtomicU64,
    /// Interrupts held back by the moderation window (sent later, merged, or found unneeded).
    pub irq_deferred: AtomicU64,
    /// Frames from the guest per transmit queue pair.
    pub from_guest_by_pair: [AtomicU64; MAX_QUEUE_PAIRS],
    /// Frames to the guest per receive queue pair.
    pub to_guest_by_pair: [AtomicU64; MAX_QUEUE_PAIRS],
}

impl DevCounters {
    /// Per-pair frame counts of the first `pairs` pairs.
    pub fn json_pairs(&self, pairs: usize) -> serde_json::Value {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        (0..pairs.min(MAX_QUEUE_PAIRS))
            .map(|i| {
                serde_json::json!({
                    "from_guest": l(&self.from_guest_by_pair[i]),
                    "to_guest": l(&self.to_guest_by_pair[i]),
                })
            })
            .collect()
    }

    pub fn json(&self) -> serde_json::Value {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "from_guest": l(&self.tx_frames),
            "to_guest": l(&self.rx_frames),
            "to_guest_dropped_too_big": l(&self.rx_dropped_too_big),
            "bad_descriptors": l(&self.bad_descriptors),
            "frontend_connections": l(&self.connections),
            "rx_interrupts": l(&self.rx_interrupts),
            "tx_interrupts": l(&self.tx_interrupts),
            "tx_kicks": l(&self.tx_kicks),
            "rx_passes": l(&self.rx_passes),
            "interrupts_deferred": l(&self.irq_deferred),
        })
    }
}

/// One frontend session's device.
pub struct NetBackend {
    path: Arc<NetPath>,
    mac: [u8; 6],
    mem: Mutex<Option<GM>>,
    event_idx: AtomicBool,
    /// A ring's avail index was found too far ahead once (see `avail_overrun`): warned.
    warned_overrun: AtomicBool,
    /// A ring hit `MAX_TX_CHAINS` or `MAX_PASSES` once: warned.
    warned_busy: AtomicBool,
    /// A frame for the guest was dropped once as too big for its receive buffers: warned.
    warned_too_big: AtomicBool,
    acked: AtomicU64,
    exit: Mutex<Option<(EventConsumer, EventNotifier)>>,
    /// Descriptor numbers of the exit-event consumers handed to the daemon, which the library
    /// never closes (see [`vhost_user_guards::leaked_fd`]).
    exit_given: Mutex<Vec<std::os::fd::RawFd>>,
    counters: Arc<DevCounters>,
    /// Queue pairs: receive queue 2i, transmit queue 2i+1.
    pairs: usize,
    /// Interrupt moderation state (see [`IrqModeration`]).
    irq: Mutex<IrqState>,
    irq_mod: IrqModeration,
    irq_timer: IrqTimer,
}

/// Interrupt moderation, as a NIC's adaptive coalescing: while bulk data flows (a pass that
/// moved at least `bulk` bytes), a queue's interrupt comes at most once per `window`; an
/// interrupt held back is sent when the window ends, or together with the next one sent for any
/// queue (they share the guest's interrupt line). A pass with less data, or the first after a
/// quiet window, interrupts at once, so request/response latency is untouched. Each interrupt
/// a TCG guest takes costs its vCPU an exit, the virtio-mmio status read and acknowledge, and
/// often a halt/wake-up; through vhost-user it also costs the frontend's main loop a wake-up.
/// `COLO_NET_IRQ_US` (default 1000, 0 = off) and `COLO_NET_IRQ_BULK` (bytes, default 16384).
///
/// `kick_window` (`COLO_NET_KICK_US`, default 1000, 0 = off) does the same for the guest's
/// transmit kicks: after a bulk transmit pass the worker leaves kicks off (EVENT_IDX:
/// `avail_event` not moved) and looks at the ring again when the window ends; a pass that
/// finds little turns kicks back on. On by default since an alternated A/B (7 runs each of
/// `bench/net/guest.sh`, TCG tier) raised bulk throughput without filters by about a third.
#[derive(Debug, Clone, Copy)]
pub struct IrqModeration {
    pub window: std::time::Duration,
    pub bulk: usize,
    pub kick_window: std::time::Duration,
}

impl IrqModeration {
    pub const DEFAULT_US: u64 = 1000;
    pub const DEFAULT_BULK: usize = 16384;

    pub fn from_env() -> Self {
        let num = |k: &str, d: u64| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(d)
        };
        Self {
            window: std::time::Duration::from_micros(num("COLO_NET_IRQ_US", Self::DEFAULT_US)),
            bulk: num("COLO_NET_IRQ_BULK", Self::DEFAULT_BULK as u64) as usize,
            kick_window: std::time::Duration::from_micros(num(
                "COLO_NET_KICK_US",
                Self::DEFAULT_US,
            )),
        }
    }
}

#[derive(Default)]
struct IrqState {
    /// Per queue: when its last interrupt was sent.
    last: Vec<Option<std::time::Instant>>,
    /// Per queue: the used index before the first pass whose interrupt is still owed.
    owed: Vec<Option<u16>>,
    /// When the timer is armed to fire.
    armed: Option<std::time::Instant>,
    /// Per queue pair: its transmit ring is to be looked at when the timer fires (kicks off).
    tx_poll: Vec<bool>,
}

/// A non-blocking one-shot timerfd (the moderation window's end), served by the ring worker.
struct IrqTimer(std::fs::File);

impl IrqTimer {
    fn new() -> std::io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain syscall; the result is checked before use.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nothing else owns.
        Ok(Self(unsafe { std::fs::File::from_raw_fd(fd) }))
    }

    fn arm(&self, after: std::time::Duration) {
        let after = after.max(std::time::Duration::from_micros(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: our timerfd; `spec` is a valid itimerspec; no old value asked for.
        let r =
            unsafe { libc::timerfd_settime(self.0.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if r != 0 {
            tracing::debug!("timerfd_settime: {}", std::io::Error::last_os_error());
        }
    }

    /// Clears an expiry (non-blocking).
    fn clear(&self) {
        let mut n = 0u64;
        // SAFETY: reads 8 bytes into `n` from our non-blocking timerfd.
        let _ = unsafe {
            libc::read(
                self.0.as_raw_fd(),
                (&mut n as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }
}

/// Most chains one transmit event takes (a full ring of the largest size); the rest waits for
/// the poll it schedules. A ring whose used index lies over its avail index (a frontend that
/// never set the ring's addresses, or set them so) gets one more chain with every chain we
/// complete: without a bound the pop loop, and the frames it gathers, never end.
const MAX_TX_CHAINS: usize = QUEUE_SIZE;

/// Passes of an EVENT_IDX loop per event (transmit: `enable_notification` reported more;
/// receive: the guest seemed to add buffers). Some rings report work that cannot be taken for
/// ever: found by vhost-blk-colo's `vhost_user_msgs` fuzz target, a ring started without
/// SET_VRING_ADDR (virtio-queue takes nothing from an avail ring at 0, whose index reads
/// ahead of ours), also an avail slot past the end of guest memory. All queues share one
/// worker thread: while it loops, a disconnect's exit event waits and `serve` never returns.
const MAX_PASSES: u32 = 64;

/// Event id of the "frames for the guest are queued" eventfd (ids 0..=queues are taken by the
/// queues and the exit event).
fn guest_rx_event(pairs: usize) -> u16 {
    (2 * pairs + 1) as u16
}

/// Event id of the interrupt-moderation timer.
fn irq_timer_event(pairs: usize) -> u16 {
    (2 * pairs + 2) as u16
}

impl NetBackend {
    pub fn new(
        path: Arc<NetPath>,
        mac: [u8; 6],
        counters: Arc<DevCounters>,
    ) -> std::io::Result<Self> {
        let pairs = path.pairs().clamp(1, MAX_QUEUE_PAIRS);
        Ok(Self {
            pairs,
            path,
            mac,
            mem: Mutex::new(None),
            event_idx: AtomicBool::new(false),
            warned_overrun: AtomicBool::new(false),
            warned_busy: AtomicBool::new(false),
            warned_too_big: AtomicBool::new(false),
            acked: AtomicU64::new(0),
            exit: Mutex::new(Some(new_event_consumer_and_notifier(EventFlag::NONBLOCK)?)),
            exit_given: Mutex::default(),
            counters,
            irq: Mutex::new(IrqState {
                last: vec![None; 2 * pairs],
                owed: vec![None; 2 * pairs],
                armed: None,
                tx_poll: vec![false; pairs],
            }),
            irq_mod: IrqModeration::from_env(),
            irq_timer: IrqTimer::new()?,
        })
    }

    /// Used entries were published on queue `q` in a pass that started at used index
    /// `before` and moved `bytes` bytes: interrupts the guest now, or later within the
    /// moderation window (see [`IrqModeration`]).
    fn used_published(
        &self,
        vrings: &[VringRwLock<GM>],
        mem: &Mem,
        q: usize,
        before: u16,
        bytes: usize,
    ) {
        let Ok(mut st) = self.irq.lock() else { return };
        let Some(owed) = st.owed.get_mut(q) else {
            return;
        };
        owed.get_or_insert(before);
        let now = std::time::Instant::now();
        let m = self.irq_mod;
        if !m.window.is_zero()
            && bytes >= m.bulk
            && let Some(Some(last)) = st.last.get(q)
            && now < *last + m.window
        {
            let due = *last + m.window;
            self.counters.irq_deferred.fetch_add(1, Ordering::Relaxed);
            self.arm_timer(&mut st, due, now);
            return;
        }
        self.flush_interrupts(&mut st, vrings, mem, now);
    }

    /// Sends every owed interrupt the guest asked for (EVENT_IDX) and forgets the rest.
    fn flush_interrupts(
        &self,
        st: &mut IrqState,
        vrings: &[VringRwLock<GM>],
        mem: &Mem,
        now: std::time::Instant,
    ) {
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        for (i, v) in vrings.iter().enumerate() {
            let Some(before) = st.owed.get_mut(i).and_then(|o| o.take()) else {
                continue;
            };
            if event_idx && !needs_interrupt(v, mem, before) {
                continue;
            }
            if i % 2 == 0 {
                self.counters.rx_interrupts.fetch_add(1, Ordering::Relaxed);
            } else {
                self.counters.tx_interrupts.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(l) = st.last.get_mut(i) {
                *l = Some(now);
            }
            if let Err(e) = v.signal_used_queue() {
                tracing::debug!("signal used queue: {e}");
            }
        }
    }

    fn arm_timer(&self, st: &mut IrqState, due: std::time::Instant, now: std::time::Instant) {
        if st.armed.is_none_or(|a| a > due) {
            st.armed = Some(due);
            self.irq_timer.arm(due.saturating_duration_since(now));
        }
    }

    /// Transmit queue pair `pair` is to be looked at when the kick window ends.
    fn schedule_tx_poll(&self, pair: usize) {
        let Ok(mut st) = self.irq.lock() else { return };
        let Some(p) = st.tx_poll.get_mut(pair) else {
            return;
        };
        *p = true;
        let now = std::time::Instant::now();
        self.arm_timer(&mut st, now + self.irq_mod.kick_window, now);
    }

    /// A transmit event reached `MAX_TX_CHAINS` or `MAX_PASSES`: the ring is left to the poll
    /// of the kick window (as after a bulk pass; kicks stay off), so a guest that keeps adding
    /// frames is still served, and other events, a disconnect's too, get their turn.
    fn tx_busy(&self, pair: usize) {
        if !self.warned_busy.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "transmit queue pair {pair}: ring still busy after one event's bound ({MAX_TX_CHAINS} chains or {MAX_PASSES} passes); continuing from a poll"
            );
        }
        self.schedule_tx_poll(pair);
    }

    /// The moderation timer fired: sends what is owed, then looks at the transmit rings whose
    /// kicks are off.
    fn irq_timer_fired(&self, vrings: &[VringRwLock<GM>]) {
        self.irq_timer.clear();
        let Some(mem) = self.memory() else { return };
        let polls: Vec<usize> = {
            let Ok(mut st) = self.irq.lock() else { return };
            st.armed = None;
            self.flush_interrupts(&mut st, vrings, &mem, std::time::Instant::now());
            let polls = st
                .tx_poll
                .iter()
                .enumerate()
                .filter_map(|(i, &p)| p.then_some(i))
                .collect();
            st.tx_poll.iter_mut().for_each(|p| *p = false);
            polls
        };
        drop(mem);
        for pair in polls {
            self.process_tx(vrings, pair);
        }
    }

    /// A frame of `need` bytes (with its header) for the guest was dropped: the receive
    /// buffers it could have, `have` bytes, were all it could ever get. Counted, warned once.
    fn rx_too_big(&self, need: usize, have: usize) {
        self.counters
            .rx_dropped_too_big
            .fetch_add(1, Ordering::Relaxed);
        if !self.warned_too_big.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "a frame of {need} bytes for the guest was dropped: its receive buffers hold {have} (counted in to_guest_dropped_too_big)"
            );
        }
    }

    /// True when the guest's avail index on `vring` is more than the ring's size ahead of
    /// ours. No chain can then be taken (virtio-queue refuses the ring) while
    /// `enable_notification` keeps reporting work, so an EVENT_IDX loop would spin forever on
    /// a guest's say-so (found by the `net_rings` fuzz target). The ring is left alone until
    /// the guest kicks again; the first time, a warning.
    fn avail_overrun(&self, vring: &VringRwLock<GM>, mem: &Mem) -> bool {
        let size = vring.get_ref().get_queue().size();
        let Some(ahead) = avail_ahead(vring, mem) else {
            return false;
        };
        let overrun = ahead > size;
        if overrun && !self.warned_overrun.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "guest's avail index is {ahead} entries ahead on a ring of {size}: ring ignored until the next kick"
            );
        }
        overrun
    }

    fn memory(&self) -> Option<GuestMemoryLoadGuard<Mem>> {
        self.mem.lock().ok()?.as_ref().map(|m| m.memory())
    }

    fn mrg_rxbuf(&self) -> bool {
        self.acked.load(Ordering::Relaxed) & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0
    }

    fn config(&self) -> Vec<u8> {
        // struct virtio_net_config: mac[6], status, max_virtqueue_pairs, mtu.
        let mut c = Vec::with_capacity(12);
        c.extend_from_slice(&self.mac);
        let status = if self.path.link_is_up() {
            VIRTIO_NET_S_LINK_UP
        } else {
            0
        };
        c.extend_from_slice(&status.to_le_bytes());
        c.extend_from_slice(&(self.pairs as u16).to_le_bytes());
        c.extend_from_slice(&1500u16.to_le_bytes());
        c
    }

    /// Guest → outside: pops every transmit chain, then runs the frames through the path.
    fn process_tx(&self, vrings: &[VringRwLock<GM>], pair: usize) {
        let Some(mem) = self.memory() else {
            return;
        };
        let q = 2 * pair + 1;
        let Some(vring) = vrings.get(q) else { return };
        let before = vring.get_ref().get_queue().next_used();
        let mut bytes = 0usize;
        let mut frames = Vec::new();
        let mut sent_direct = 0u64;
        // With an empty chain and a tap with vnet headers, frames go from guest memory to the
        // tap in one writev each (no copy); the first frame that cannot (a buffer outside the
        // mapped regions) ends that for the batch, so frames stay in order.
        let mut direct = self.path.direct_tx();
        // With a chain whose first filter for guest egress writes every frame to a socket
        // (the primary's redirector to the comparer), frames go from guest memory to that
        // socket the same way (one writev, or one copy into the batch's records); the first
        // that cannot ends that for the pass, so frames stay in order.
        let mut raw = if direct.is_none() {
            self.path.guest_raw_batch()
        } else {
            None
        };
        // Bounds of this event (see `MAX_TX_CHAINS`, `MAX_PASSES`): two counters, no extra
        // reads of the ring.
        let (mut taken, mut passes) = (0usize, 0u32);
        loop {
            passes += 1;
            let taken_before = taken;
            if self.event_idx.load(Ordering::Relaxed) {
                let _ = vring.disable_notification();
            }
            while taken < MAX_TX_CHAINS {
                let chain = vring
                    .get_mut()
                    .get_queue_mut()
                    .pop_descriptor_chain(mem.clone());
                let Some(chain) = chain else { break };
                taken += 1;
                let head = chain.head_index();
                if let Some((_, nd)) = &direct {
                    match send_direct(&mem, &chain, &**nd, pair) {
                        Some((r, len)) => {
                            bytes += len;
                            self.path.count_direct(&r);
                            sent_direct += 1;
                            if vring.add_used(head, 0).is_err() {
                                self.counters
                                    .bad_descriptors
                                    .fetch_add(1, Ordering::Relaxed);
                            }
                            continue;
                        }
                        None => direct = None,
                    }
                }
                if let Some(b) = raw.as_mut() {
                    match send_raw(&mem, &chain, &self.path, b) {
                        Some(len) => {
                            bytes += len;
                            sent_direct += 1;
                            if vring.add_used(head, 0).is_err() {
                                self.counters
                                    .bad_descriptors
                                    .fetch_add(1, Ordering::Relaxed);
                            }
                            if b.frames() >= crate::path::BATCH_FRAMES {
                                // End the batch (its records are written) and let the other
                                // direction have the chain's lock, as the copying way does.
                                drop(raw.take());
                                raw = self.path.guest_raw_batch();
                            }
                            continue;
                        }
                        None => raw = None,
                    }
                }
                match read_chain(&mem, chain) {
                    Some(Some(f)) => {
                        bytes += f.1.len();
                        frames.push(f)
                    }
                    Some(None) => {}
                    None => {
                        self.counters
                            .bad_descriptors
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
                if vring.add_used(head, 0).is_err() {
                    self.counters
                        .bad_descriptors
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            if taken >= MAX_TX_CHAINS || passes >= MAX_PASSES {
                self.tx_busy(pair);
                break;
            }
            if !self.event_idx.load(Ordering::Relaxed) {
                break;
            }
            if passes > 1 && taken == taken_before {
                // `enable_notification` reported work and none could be taken (the guest's
                // index only moves on, so this is no race): a broken ring, such as one at
                // address 0 (see `MAX_PASSES`). Left alone until the guest kicks again, as a
                // ring too far ahead (`avail_overrun`), instead of a pass per poll that logs
                // virtio-queue's error.
                break;
            }
            if !self.irq_mod.kick_window.is_zero() && bytes >= self.irq_mod.bulk {
                // Bulk: leave the guest's kicks off and look at the ring again after the
                // window (see `IrqModeration::kick_window`).
                self.schedule_tx_poll(pair);
                break;
            }
            if !vring.enable_notification().unwrap_or(false) || self.avail_overrun(vring, &mem) {
                break;
            }
        }
        drop(direct);
        drop(raw);
        if vring.get_ref().get_queue().next_used() != before {
            self.used_published(vrings, &mem, q, before, bytes);
        }
        let n = frames.len() as u64 + sent_direct;
        self.counters.tx_frames.fetch_add(n, Ordering::Relaxed);
        if let Some(c) = self.counters.from_guest_by_pair.get(pair) {
            c.fetch_add(n, Ordering::Relaxed);
        }
        // One batch: records the chain sends to socket outdevs leave together at its end.
        self.path.from_guest_batch(pair, frames);
    }

    /// Outside → guest: fills receive buffers with queued frames. With several queue pairs,
    /// each frame goes to the receive queue its flow hashes to among the enabled ones (so a
    /// flow stays on one queue); frames leave the pending queue in order, so a full queue
    /// holds back the others until the guest posts buffers.
    fn process_rx(&self, vrings: &[VringRwLock<GM>]) {
        let Some(mem) = self.memory() else {
            return;
        };
        let (rx_pair, rxq): (Vec<usize>, Vec<&VringRwLock<GM>>) = (0..self.pairs)
            .filter_map(|i| vrings.get(2 * i).map(|v| (i, v)))
            .filter(|(_, v)| {
                let g = v.get_ref();
                g.is_enabled() && g.get_queue().ready()
            })
            .unzip();
        if rxq.is_empty() {
            return;
        }
        let mut pending = self.path.guest.take_all();
        if pending.is_empty() {
            return;
        }
        let mrg = self.mrg_rxbuf();
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let mut used = vec![false; rxq.len()];
        let mut moved = vec![0usize; rxq.len()];
        // "Guest added buffers" retries of this event (see `MAX_PASSES`).
        let mut retries = 0u32;
        // With EVENT_IDX, the receive queue whose buffers the frames wait for: its kick was
        // asked for by `kick_on_next_buffer`, which `enable_notification` must not undo.
        let mut waiting: Option<usize> = None;
        // Used index of each receive queue before this pass: the EVENT_IDX decision below
        // needs it, because `add_used_batch` publishes entries without virtio-queue's
        // `num_added` bookkeeping (its `needs_notification` would always say no).
        let used_before: Vec<u16> = rxq
            .iter()
            .map(|v| v.get_ref().get_queue().next_used())
            .collect();
        if event_idx {
            for v in &rxq {
                let _ = v.disable_notification();
            }
        }
        while let Some(frame) = pending.front() {
            let qi = if rxq.len() > 1 {
                flow_hash(&frame.frame) as usize % rxq.len()
            } else {
                0
            };
            let vring = rxq[qi];
            let need = VNET_HDR_LEN + frame.frame.len();
            let mut q = vring.get_mut();
            let queue = q.get_queue_mut();
            let mut chains: Vec<(u16, DescriptorChain<GuestMemoryLoadGuard<Mem>>, usize)> =
                Vec::new();
            let mut have = 0usize;
            while have < need {
                let Some(c) = queue.pop_descriptor_chain(mem.clone()) else {
                    break;
                };
                let room: usize = c.clone().writable().map(|d| d.len() as usize).sum();
                have += room;
                chains.push((c.head_index(), c, room));
                if !mrg {
                    break;
                }
            }
            if have < need {
                let seen = chains.len();
                // Without MRG_RXBUF the frame does not fit a single buffer; with it, not all
                // the buffers the ring can hold at once (the guest has posted every one: no
                // more can come before some are used). Either way it never fits: drop it, as
                // a NIC would, and leave the buffers to the next frame. Held, it would block
                // every frame behind it for ever.
                let never_fits = if mrg {
                    seen >= usize::from(queue.size())
                } else {
                    seen > 0
                };
                for _ in 0..seen {
                    queue.go_to_previous_position();
                }
                drop(q);
                if never_fits {
                    pending.pop_front();
                    self.rx_too_big(need, have);
                    continue;
                }
                // Not enough buffers yet: they are given back and the frames wait for the
                // guest's kick (the frames behind them too). The kick must be asked for at the
                // guest's avail index (see `kick_on_next_buffer`).
                // Retry only if the guest added buffers beyond the ones that were too few,
                // else this would spin forever holding the rx lock. A ring that reports
                // buffers none of which can be taken (see `MAX_PASSES`) looks as if it grew
                // every time: after `MAX_PASSES` retries the frames wait for the next kick, as
                // when the guest has too few buffers.
                if event_idx {
                    let ready = kick_on_next_buffer(vring, &mem);
                    let grew = !self.avail_overrun(vring, &mem)
                        && ready.is_some_and(|ready| usize::from(ready) > seen);
                    if grew && retries < MAX_PASSES {
                        retries += 1;
                        continue;
                    }
                    if grew && !self.warned_busy.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            "receive ring still reports buffers after {MAX_PASSES} retries; frames wait for the next kick"
                        );
                    }
                    waiting = Some(qi);
                }
                break;
            }
            drop(q);
            let n = chains.len();
            let mut hdr = frame.hdr;
            hdr[10..12].copy_from_slice(&(n as u16).to_le_bytes());
            let mut src: Vec<&[u8]> = vec![&hdr, &frame.frame];
            let mut used_bufs = Vec::with_capacity(n);
            for (head, chain, _) in chains {
                let written = match write_chain(&mem, chain, &mut src) {
                    Some(w) => w,
                    None => {
                        self.counters
                            .bad_descriptors
                            .fetch_add(1, Ordering::Relaxed);
                        0
                    }
                };
                used_bufs.push((head, written as u32));
            }
            if add_used_batch(vring, &mem, &used_bufs).is_err() {
                self.counters
                    .bad_descriptors
                    .fetch_add(1, Ordering::Relaxed);
            }
            used[qi] = true;
            moved[qi] += need;
            pending.pop_front();
            self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
            if let Some(c) = self.counters.to_guest_by_pair.get(rx_pair[qi]) {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        if event_idx {
            for (k, v) in rxq.iter().enumerate() {
                if waiting != Some(k) {
                    let _ = v.enable_notification();
                }
            }
        }
        self.path.guest.put_back(pending);
        self.path.guest.notify_room();
        self.counters.rx_passes.fetch_add(1, Ordering::Relaxed);
        for (k, ((u, before), bytes)) in used.into_iter().zip(used_before).zip(moved).enumerate() {
            if u {
                self.used_published(vrings, &mem, 2 * rx_pair[k], before, bytes);
            }
        }
    }
}

/// How many entries the guest's avail index is ahead of ours on `vring`, when it can be read.
fn avail_ahead(vring: &VringRwLock<GM>, mem: &Mem) -> Option<u16> {
    let g = vring.get_ref();
    let q = g.get_queue();
    q.avail_idx(mem, Ordering::Acquire)
        .ok()
        .map(|avail| (avail - std::num::Wrapping(q.next_avail())).0)
}

/// EVENT_IDX: asks for the guest's kick when it next posts a buffer, by setting `avail_event`
/// to the guest's avail index; returns how many entries that index is ahead of ours, read
/// again after the write (a buffer posted before the guest could see it gives no kick, so the
/// caller retries when there are more than it saw). `enable_notification` sets `avail_event`
/// to our own index instead, which lies behind the buffers a receive pass gives back when they
/// are too few for a merged frame: a driver kicks only when its index crosses `avail_event`
/// (the spec's `vring_need_event`), so, already past it, it would never kick again, and the
/// frame would wait until the guest happened to kick for another reason. `None` when the ring
/// cannot be read or written.
fn kick_on_next_buffer(vring: &VringRwLock<GM>, mem: &Mem) -> Option<u16> {
    use vm_memory::{Bytes, GuestAddress};
    let g = vring.get_ref();
    let q = g.get_queue();
    let avail = q.avail_idx(mem, Ordering::Acquire).ok()?;
    // avail_event sits after the used ring's flags, idx and `size` entries.
    let at = GuestAddress(q.used_ring() + 4 + 8 * u64::from(q.size()));
    mem.store(avail.0.to_le(), at, Ordering::Relaxed).ok()?;
    // The write is seen before the index is read again (the driver does the reverse).
    std::sync::atomic::fence(Ordering::SeqCst);
    q.avail_idx(mem, Ordering::Acquire)
        .ok()
        .map(|now| (now - std::num::Wrapping(q.next_avail())).0)
}

/// EVENT_IDX interrupt decision for a queue whose used index moved from `before` to its
/// current value (one pass, or several whose interrupt was held back): interrupt when the
/// guest's `used_event` lies in that range (the virtio spec's `vring_need_event`). An
/// unreadable ring means interrupt.
fn needs_interrupt(vring: &VringRwLock<GM>, mem: &Mem, before: u16) -> bool {
    use vm_memory::{Bytes, GuestAddress};
    let g = vring.get_ref();
    let queue = g.get_queue();
    let now = queue.next_used();
    // used_event sits after the avail ring's flags, idx and `size` entries.
    let at = GuestAddress(queue.avail_ring() + 4 + 2 * u64::from(queue.size()));
    std::sync::atomic::fence(Ordering::SeqCst);
    match mem.load::<u16>(at, Ordering::Acquire) {
        Ok(event) => {
            let event = u16::from_le(event);
            now.wrapping_sub(event).wrapping_sub(1) < now.wrapping_sub(before)
        }
        Err(_) => true,
    }
}

/// A hash of a frame's flow (IP addresses, and ports for TCP/UDP), so the frames of one flow
/// pick the same queue; 0 for frames that are not IP.
pub fn flow_hash(f: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    let mut mix = |b: &[u8]| {
        for &x in b {
            h = (h ^ u32::from(x)).wrapping_mul(0x0100_0193);
        }
    };
    let (l4, proto) = match f.get(12..14) {
        Some([0x08, 0x00]) => {
            let Some(ihl) = f.get(14).map(|b| usize::from(b & 0x0f) * 4) else {
                return 0;
            };
            let (Some(addrs), Some(&proto)) = (f.get(26..34), f.get(23)) else {
                return 0;
            };
            mix(addrs);
            (14 + ihl, proto)
        }
        Some([0x86, 0xdd]) => {
            let (Some(addrs), Some(&proto)) = (f.get(22..54), f.get(20)) else {
                return 0;
            };
            mix(addrs);
            (54, proto)
        }
        _ => return 0,
    };
    if (proto == 6 || proto == 17)
        && let Some(ports) = f.get(l4..l4 + 4)
    {
        mix(ports);
    }
    h
}

/// Puts all buffers of one frame in the used ring and only then moves the used index, so the
/// driver never sees a merged frame with buffers missing (`add_used` publishes one at a time).
fn add_used_batch(vring: &VringRwLock<GM>, mem: &Mem, used: &[(u16, u32)]) -> Result<(), ()> {
    use vm_memory::{Bytes, GuestAddress};
    let mut q = vring.get_mut();
    let queue = q.get_queue_mut();
    let (base, size, next) = (queue.used_ring(), queue.size(), queue.next_used());
    if size == 0 {
        return Err(());
    }
    for (i, &(id, len)) in used.iter().enumerate() {
        let slot = u64::from(next.wrapping_add(i as u16) % size);
        let at = GuestAddress(base + 4 + 8 * slot);
        mem.write_obj(u32::from(id).to_le(), at).map_err(|_| ())?;
        mem.write_obj(len.to_le(), GuestAddress(at.0 + 4))
            .map_err(|_| ())?;
    }
    let new = next.wrapping_add(used.len() as u16);
    std::sync::atomic::fence(Ordering::Release);
    mem.store(new.to_le(), GuestAddress(base + 2), Ordering::Release)
        .map_err(|_| ())?;
    queue.set_next_used(new);
    Ok(())
}

/// The largest frame (after the virtio-net header) taken from the guest: what a QEMU peer
/// accepts (`colo_proto::frame::MAX_PAYLOAD_LEN`, 64 KiB + 4 KiB), more than a GSO frame
/// needs. A chain's length is bounded by guest memory only (its buffers may alias), so without
/// this a guest's chain of large aliased buffers made `read_chain` allocate its whole length,
/// and a failed allocation aborts the backend. A longer chain counts as a bad descriptor.
const MAX_TX_FRAME: usize = colo_proto::frame::MAX_PAYLOAD_LEN;

/// The guest memory of a transmit chain as iovecs, with their total length. `None` when the
/// chain cannot be sent in place (a buffer outside the mapped memory, a device-writable one,
/// nothing after the header): the caller copies it instead ([`read_chain`]).
///
/// The iovecs point into `mem`, mapped while the caller holds it.
fn chain_iov<M: std::ops::Deref<Target = Mem> + Clone>(
    mem: &Mem,
    chain: &DescriptorChain<M>,
) -> Option<(Vec<libc::iovec>, usize)> {
    use vm_memory::GuestMemoryBackend;
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(4);
    let mut total = 0usize;
    for d in chain.clone() {
        if d.is_write_only() {
            return None;
        }
        for s in mem.get_slices(d.addr(), d.len() as usize) {
            let s = s.ok()?;
            iov.push(libc::iovec {
                iov_base: s.ptr_guard().as_ptr() as *mut libc::c_void,
                iov_len: s.len(),
            });
            total += s.len();
        }
        if total > VNET_HDR_LEN + MAX_TX_FRAME {
            return None;
        }
    }
    (total > VNET_HDR_LEN).then_some((iov, total))
}

/// Copies the virtio-net header out of the front of `iov` (which holds more than
/// [`VNET_HDR_LEN`] bytes of mapped guest memory, from [`chain_iov`]) and returns it with the
/// iovecs of the frame after it.
fn split_hdr(iov: &[libc::iovec]) -> ([u8; VNET_HDR_LEN], Vec<libc::iovec>) {
    let mut hdr = [0u8; VNET_HDR_LEN];
    let mut at = 0;
    let mut rest = Vec::with_capacity(iov.len());
    for v in iov {
        let n = (VNET_HDR_LEN - at).min(v.iov_len);
        if n > 0 {
            // SAFETY: `v` covers `v.iov_len` bytes of mapped guest memory (from `get_slices`,
            // mapped while the caller holds the memory); `n` fits both it and the rest of `hdr`.
            unsafe {
                std::ptr::copy_nonoverlapping(v.iov_base as *const u8, hdr[at..].as_mut_ptr(), n)
            };
            at += n;
        }
        if n < v.iov_len {
            rest.push(libc::iovec {
                iov_base: v.iov_base.cast::<u8>().wrapping_add(n).cast(),
                iov_len: v.iov_len - n,
            });
        }
    }
    (hdr, rest)
}

/// Sends one transmit chain straight from guest memory to `nd` (one writev of the guest's
/// buffers, its virtio-net header first); the frame's header, or the send error. `None` when
/// this chain cannot go that way (see [`chain_iov`], or a netdev that cannot): the caller
/// copies it instead.
fn send_direct<M: std::ops::Deref<Target = Mem> + Clone>(
    mem: &Mem,
    chain: &DescriptorChain<M>,
    nd: &dyn crate::netdev::Netdev,
    q: usize,
) -> Option<(std::io::Result<crate::offload::VnetHdr>, usize)> {
    let (iov, total) = chain_iov(mem, chain)?;
    let mut hdr = [0u8; VNET_HDR_LEN];
    let mut at = 0;
    for v in &iov {
        let n = (VNET_HDR_LEN - at).min(v.iov_len);
        // SAFETY: `v` covers `v.iov_len` bytes of mapped guest memory (from `get_slices`, which
        // stays mapped while `mem` is held); `n` fits both it and the rest of `hdr`.
        unsafe {
            std::ptr::copy_nonoverlapping(v.iov_base as *const u8, hdr[at..].as_mut_ptr(), n)
        };
        at += n;
        if at == VNET_HDR_LEN {
            break;
        }
    }
    let h = crate::offload::VnetHdr::parse(&hdr).ok()?;
    Some((nd.send_guest_iov_on(q, &iov)?.map(|()| h), total))
}

/// Hands one transmit chain from guest memory to the chain's first filter, which writes it to
/// its socket outdev (see [`NetPath::from_guest_raw`]): the frame's length, or `None` when
/// this chain cannot go that way (see [`chain_iov`]; a bad header, an offloaded frame the
/// chain would make plain, link down): the caller copies it and every later one instead.
fn send_raw<M: std::ops::Deref<Target = Mem> + Clone>(
    mem: &Mem,
    chain: &DescriptorChain<M>,
    path: &NetPath,
    batch: &mut crate::path::Batch<'_>,
) -> Option<usize> {
    let (iov, _) = chain_iov(mem, chain)?;
    let (hdr, l2) = split_hdr(&iov);
    // SAFETY: the iovecs cover guest memory mapped while `mem` is held, which outlives this
    // call; the outdev copies what it keeps before it returns.
    let raw = unsafe { crate::filter::RawFrame::new(&l2) };
    let len = raw.len();
    path.from_guest_raw(batch, &hdr, raw).then_some(len)
}

/// The virtio-net header and the frame of a transmit chain, each read into its own buffer;
/// `Some(None)` for a chain with no frame after the header, `None` for a bad chain.
type TxFrame = ([u8; VNET_HDR_LEN], Vec<u8>);

fn read_chain<M: std::ops::Deref<Target = Mem> + Clone>(
    mem: &Mem,
    chain: DescriptorChain<M>,
) -> Option<Option<TxFrame>> {
    use std::io::Read;
    let mut r = chain.reader(mem).ok()?;
    let total = r.available_bytes();
    if total <= VNET_HDR_LEN {
        return Some(None);
    }
    if total - VNET_HDR_LEN > MAX_TX_FRAME {
        return None;
    }
    let mut hdr = [0u8; VNET_HDR_LEN];
    r.read_exact(&mut hdr).ok()?;
    let mut buf = vec![0u8; total - VNET_HDR_LEN];
    r.read_exact(&mut buf).ok()?;
    Some(Some((hdr, buf)))
}

/// Writes as much of `src` (consumed from the front) as the chain holds; returns bytes written.
fn write_chain(
    mem: &Mem,
    chain: DescriptorChain<GuestMemoryLoadGuard<Mem>>,
    src: &mut Vec<&[u8]>,
) -> Option<usize> {
    use std::io::Write;
    let mut w = chain.writer(mem).ok()?;
    let mut written = 0;
    while let Some(first) = src.first_mut() {
        let room = w.available_bytes();
        if room == 0 {
            break;
        }
        let n = room.min(first.len());
        w.write_all(&first[..n]).ok()?;
        written += n;
        *first = &first[n..];
        if first.is_empty() {
            src.remove(0);
        }
    }
    Some(written)
}

impl VhostUserBackend for NetBackend {
    type Bitmap = BitmapMmapRegion;
    type Vring = VringRwLock<GM>;

    fn num_queues(&self) -> usize {
        2 * self.pairs
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_NET_F_CSUM)
            | (1 << VIRTIO_NET_F_GUEST_CSUM)
            | (1 << VIRTIO_NET_F_GUEST_TSO4)
            | (1 << VIRTIO_NET_F_GUEST_TSO6)
            | (1 << VIRTIO_NET_F_HOST_TSO4)
            | (1 << VIRTIO_NET_F_HOST_TSO6)
            | (1 << VIRTIO_NET_F_GUEST_ECN)
            | (1 << VIRTIO_NET_F_GUEST_UFO)
            | (1 << VIRTIO_NET_F_HOST_ECN)
            | (1 << VIRTIO_NET_F_HOST_UFO)
            | (1 << VIRTIO_NET_F_HOST_USO)
            | (1 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_MRG_RXBUF)
            | (1 << VIRTIO_NET_F_STATUS)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits()
            | if self.pairs > 1 {
                1 << VIRTIO_NET_F_MQ
            } else {
                0
            }
    }

    fn acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::Relaxed);
        self.path.guest_features.store(features, Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::RARP
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let c = self.config();
        let start = (offset as usize).min(c.len());
        let end = (offset as usize).saturating_add(size as usize).min(c.len());
        let mut v = c[start..end].to_vec();
        v.resize(size as usize, 0);
        v
    }

    fn update_memory(&self, mem: GM) -> std::io::Result<()> {
        let checked = vhost_user_guards::memory::drop_regions_past_eof(&mem);
        if let Ok(mut m) = self.mem.lock() {
            *m = Some(mem);
        }
        self.path.guest_connected.store(true, Ordering::Relaxed);
        checked
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let g = self.exit.lock().ok()?;
        let (c, n) = g.as_ref()?;
        let given = c.try_clone().ok()?;
        if let Ok(mut v) = self.exit_given.lock() {
            v.push(given.as_raw_fd());
        }
        Some((given, n.try_clone().ok()?))
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        crate::sched::data_thread_once();
        let e = device_event as usize;
        if e == guest_rx_event(self.pairs) as usize {
            let _ = self.path.guest.kick.read();
            self.process_rx(vrings);
        } else if e == irq_timer_event(self.pairs) as usize {
            self.irq_timer_fired(vrings);
        } else if e < 2 * self.pairs && e.is_multiple_of(2) {
            self.process_rx(vrings);
        } else if e < 2 * self.pairs {
            self.counters.tx_kicks.fetch_add(1, Ordering::Relaxed);
            self.process_tx(vrings, e / 2);
        }
        Ok(())
    }
}

impl NetBackend {
    /// Closes the exit-event descriptors the session's daemon leaked (see
    /// [`vhost_user_guards::leaked_fd`]); called once the daemon is dropped.
    fn close_exit_events(&self) {
        let given = match self.exit_given.lock() {
            Ok(mut v) => std::mem::take(&mut *v),
            Err(_) => return,
        };
        let Ok(g) = self.exit.lock() else { return };
        let Some((_, n)) = g.as_ref() else { return };
        for fd in given {
            vhost_user_guards::leaked_fd::close_leaked_fd(fd, n);
        }
    }
}

/// What the relay hands to the device: SEND_RARP and the backend-request channel.
struct PathHooks(Arc<NetPath>);

impl crate::shim::Hooks for PathHooks {
    fn send_rarp(&self, mac: [u8; 6]) {
        self.0.announce(crate::announce::rarp_frame(mac));
    }

    fn backend_channel(&self, chan: std::os::unix::net::UnixStream, protocol_features: u64) {
        self.0.set_backend_channel(Some((chan, protocol_features)));
    }
}

/// Serves the vhost-user socket at `socket` until `stop`: one frontend at a time, a new
/// daemon for each. The socket stays bound between sessions, so a frontend that reconnects
/// quickly never finds it missing. Sessions go through [`crate::shim::relay`]; the daemon's
/// end of it comes from `vhost_user_guards::relay::daemon_side`, a listener nothing else can
/// reach (an abstract socket can be reached by any process in the network namespace, and the
/// daemon would serve whoever it accepted first around the relay and its checks).
pub fn serve(
    socket: &str,
    path: Arc<NetPath>,
    mac: [u8; 6],
    counters: Arc<DevCounters>,
    stop: &AtomicBool,
) -> Result<(), BackendError> {
    use std::os::unix::net::UnixListener;

    let daemon_err = |msg: String| BackendError::Daemon {
        path: socket.to_string(),
        msg,
    };
    path.set_mac(mac);
    let _ = std::fs::remove_file(socket);
    let outer = UnixListener::bind(socket)?;
    while !stop.load(Ordering::Relaxed) {
        let (front, _) = outer.accept()?;
        let backend = Arc::new(NetBackend::new(path.clone(), mac, counters.clone())?);
        let mut daemon = VhostUserDaemon::new(
            "vhost-net-colo".to_string(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| daemon_err(e.to_string()))?;
        if let Some(h) = daemon.get_epoll_handlers().first() {
            h.register_listener(
                path.guest.kick.as_raw_fd(),
                EventSet::IN,
                u64::from(guest_rx_event(backend.pairs)),
            )?;
            h.register_listener(
                backend.irq_timer.0.as_raw_fd(),
                EventSet::IN,
                u64::from(irq_timer_event(backend.pairs)),
            )?;
        }
        counters.connections.fetch_add(1, Ordering::Relaxed);
        let (inner, back) = vhost_user_guards::relay::daemon_side()?;
        daemon
            .start(&mut vhost::vhost_user::Listener::from(inner))
            .map_err(|e| daemon_err(e.to_string()))?;
        if let Err(e) = crate::shim::relay_with(front, back, &PathHooks(path.clone())) {
            tracing::debug!("vhost-user relay: {e}");
        }
        let r = daemon.wait();
        for h in daemon.get_epoll_handlers() {
            h.send_exit_event();
        }
        // Joins the daemon's threads; then the exit-event numbers it leaked can be closed.
        drop(daemon);
        backend.close_exit_events();
        path.guest_connected.store(false, Ordering::Relaxed);
        path.set_backend_channel(None);
        path.guest_features.store(0, Ordering::Relaxed);
        path.guest.clear();
        match r {
            Ok(()) => {
                tracing::info!("vhost-user frontend disconnected; listening again on {socket}")
            }
            Err(e) => tracing::info!("vhost-user session on {socket} ended: {e}; listening again"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chardevs::Chardevs;
    use crate::filter::{
        Chain, ChardevLookup, Counters, Entry, FilterMirror, FilterRedirector, Insert, Position,
        QueueSel,
    };
    use crate::path::GuestRx;
    use std::io::Read;
    use vm_memory::{Bytes, GuestAddress};

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const SIZE: u16 = 64;

    /// Guest memory (1 MiB at 0) with one split transmit queue in it.
    struct Ring {
        mem: Mem,
        queue: virtio_queue::Queue,
        next_desc: u16,
        avail: u16,
    }

    impl Ring {
        fn new() -> Self {
            let mem = Mem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
            let mut queue = virtio_queue::Queue::new(SIZE).unwrap();
            queue.set_desc_table_address(Some(DESC as u32), Some(0));
            queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
            queue.set_used_ring_address(Some(USED as u32), Some(0));
            queue.set_ready(true);
            Self {
                mem,
                queue,
                next_desc: 0,
                avail: 0,
            }
        }

        /// Makes `parts` (guest address, bytes, flags) one available chain; a part with bytes is
        /// written at its address first.
        fn add(&mut self, parts: &[(u64, Vec<u8>, u16)]) {
            let head = self.next_desc;
            for (k, (addr, bytes, flags)) in parts.iter().enumerate() {
                let i = self.next_desc;
                self.next_desc += 1;
                if *addr < 0x10_0000 {
                    self.mem.write_slice(bytes, GuestAddress(*addr)).unwrap();
                }
                let last = k + 1 == parts.len();
                let at = GuestAddress(DESC + 16 * u64::from(i));
                self.mem.write_obj(addr.to_le(), at).unwrap();
                self.mem
                    .write_obj((bytes.len() as u32).to_le(), GuestAddress(at.0 + 8))
                    .unwrap();
                let f = flags | if last { 0 } else { 1 };
                self.mem
                    .write_obj(f.to_le(), GuestAddress(at.0 + 12))
                    .unwrap();
                let next = if last { 0 } else { i + 1 };
                self.mem
                    .write_obj(next.to_le(), GuestAddress(at.0 + 14))
                    .unwrap();
            }
            let slot = GuestAddress(AVAIL + 4 + 2 * u64::from(self.avail % SIZE));
            self.mem.write_obj(head.to_le(), slot).unwrap();
            self.avail += 1;
            self.mem
                .write_obj(self.avail.to_le(), GuestAddress(AVAIL + 2))
                .unwrap();
        }
    }

    /// A path whose chain is the primary's (m0 queue=tx to a mirror socket, redire0 queue=rx
    /// without outdev, redire1 queue=rx to the compare socket), both with
    /// `vnet_hdr_support=on` and the tap's header length; the compare socket's peer
    /// (non-blocking).
    fn primary_path(dir: &std::path::Path) -> (NetPath, std::os::unix::net::UnixStream) {
        let devs = Chardevs::default();
        let mut peers = Vec::new();
        for id in ["mirror0", "compare0"] {
            let p = dir.join(format!("{id}.sock"));
            devs.add(&format!("socket,id={id},path={},server=on", p.display()))
                .unwrap();
            peers.push(std::os::unix::net::UnixStream::connect(&p).unwrap());
        }
        let path = NetPath::new("hn0", Arc::new(GuestRx::new(64).unwrap()));
        let mirror = devs.outdev("mirror0").unwrap();
        let compare = devs.outdev("compare0").unwrap();
        let entry = |id: &str, queue, filter| Entry {
            id: id.into(),
            queue,
            status: true,
            counters: Counters::default(),
            filter,
        };
        {
            let mut c = path.chain();
            let add = |c: &mut Chain, e| c.insert(e, &Position::Tail, Insert::Behind).unwrap();
            add(
                &mut c,
                entry(
                    "m0",
                    QueueSel::Tx,
                    Box::new(FilterMirror::new(mirror, true).with_vnet_hdr_len(12)),
                ),
            );
            add(
                &mut c,
                entry(
                    "redire0",
                    QueueSel::Rx,
                    Box::new(FilterRedirector::new(None, true)),
                ),
            );
            add(
                &mut c,
                entry(
                    "redire1",
                    QueueSel::Rx,
                    Box::new(FilterRedirector::new(Some(compare), true).with_vnet_hdr_len(12)),
                ),
            );
        }
        let peer = peers.pop().unwrap();
        peer.set_nonblocking(true).unwrap();
        (path, peer)
    }

    /// Everything the peer has been sent so far.
    fn drain(peer: &mut std::os::unix::net::UnixStream) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            match peer.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("peer read: {e}"),
            }
        }
        out
    }

    fn bytes(seed: u8, n: usize) -> Vec<u8> {
        (0..n).map(|i| seed.wrapping_add((i * 7) as u8)).collect()
    }

    /// A TSO header (GSO TCPv4, partial checksum).
    fn gso_hdr() -> Vec<u8> {
        crate::offload::VnetHdr {
            flags: 1,
            gso_type: 1,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        }
        .to_bytes()
        .to_vec()
    }

    /// The transmit chains of the test: small and large, plain and GSO, the header and the
    /// frame split across descriptors; then a chain with a buffer outside guest memory and one
    /// with a device-writable buffer (neither can go in place), then more good ones.
    fn chains() -> Vec<Vec<(u64, Vec<u8>, u16)>> {
        let hdr0 = vec![0u8; VNET_HDR_LEN];
        let gso = gso_hdr();
        let big = bytes(3, 30_000);
        vec![
            vec![(0x10000, [hdr0.clone(), bytes(1, 60)].concat(), 0)],
            vec![
                (0x11000, hdr0[..5].to_vec(), 0),
                (0x12000, [&hdr0[5..], &bytes(2, 100)[..]].concat(), 0),
                (0x13000, bytes(4, 1), 0),
                (0x14000, bytes(5, 1300), 0),
            ],
            // Written from guest memory at once (larger than what a batch keeps).
            vec![
                (0x20000, gso.clone(), 0),
                (0x30000, big[..20_000].to_vec(), 0),
                (0x40000, big[20_000..].to_vec(), 0),
            ],
            vec![(0x50000, [gso.clone(), bytes(6, 200)].concat(), 0)],
            vec![
                (0x60000, [hdr0.clone(), bytes(7, 60)].concat(), 0),
                (0x20_0000, vec![0; 100], 0),
            ],
            vec![
                (0x61000, [hdr0.clone(), bytes(8, 70)].concat(), 0),
                (0x62000, vec![0; 100], 2),
            ],
            vec![(0x63000, [hdr0.clone(), bytes(9, 80)].concat(), 0)],
            vec![(0x70000, [gso, big].concat(), 0)],
        ]
    }

    /// Runs `chains` through `path` as the transmit worker does: in place while it can, the
    /// first chain that cannot and all after it copied ([`read_chain`]) and sent as one batch.
    /// Returns how many went in place and how many were bad.
    fn transmit(
        path: &NetPath,
        chains: &[Vec<(u64, Vec<u8>, u16)>],
        in_place: bool,
    ) -> (usize, usize) {
        let mut ring = Ring::new();
        for parts in chains {
            ring.add(parts);
        }
        let mut batch = if in_place {
            path.guest_raw_batch()
        } else {
            None
        };
        assert_eq!(batch.is_some(), in_place, "the chain takes frames in place");
        let (mut placed, mut bad) = (0, 0);
        let mut copied = Vec::new();
        let Ring { mem, queue, .. } = &mut ring;
        let mem: &Mem = mem;
        for _ in chains {
            let c = queue.pop_descriptor_chain(mem).unwrap();
            if let Some(b) = batch.as_mut() {
                if send_raw(mem, &c, path, b).is_some() {
                    placed += 1;
                    continue;
                }
                batch = None;
            }
            match read_chain(mem, c) {
                Some(Some(f)) => copied.push(f),
                Some(None) => {}
                None => bad += 1,
            }
        }
        drop(batch);
        path.from_guest_batch(0, copied);
        (placed, bad)
    }

    /// A chain longer than any frame (its buffers alias one 64 KiB area of guest memory, 40
    /// times) is refused by both ways of taking a frame before anything is allocated for it:
    /// `chain_iov` (in place) and `read_chain` (copying) both say bad.
    #[test]
    fn a_chain_longer_than_any_frame_is_refused() {
        let mut ring = Ring::new();
        let parts: Vec<_> = (0..40).map(|_| (0x80000, vec![0u8; 0x10000], 0)).collect();
        ring.add(&parts);
        ring.add(&[(0x10000, [vec![0u8; VNET_HDR_LEN], bytes(1, 60)].concat(), 0)]);
        let Ring { mem, queue, .. } = &mut ring;
        let mem: &Mem = mem;
        let long = queue.pop_descriptor_chain(mem).unwrap();
        assert!(chain_iov(mem, &long).is_none(), "taken in place");
        assert!(read_chain(mem, long).is_none(), "copied");
        // The next chain is taken as usual.
        let ok = queue.pop_descriptor_chain(mem).unwrap();
        assert!(chain_iov(mem, &ok).is_some());
        let (_, frame) = read_chain(mem, ok).unwrap().unwrap();
        assert_eq!(frame, bytes(1, 60));
    }

    /// The records the primary's chain writes to the compare socket for the guest's frames are
    /// the same bytes whether they go from guest memory in place (`send_raw`) or are copied
    /// first (`read_chain`, then the path's batch), in the same order, with the same counters.
    #[test]
    fn frames_sent_in_place_make_the_records_the_copying_way_makes() {
        let cases = chains();
        let dir = tempfile::tempdir().unwrap();
        let (path, mut peer) = primary_path(dir.path());
        let (placed, bad) = transmit(&path, &cases, false);
        assert_eq!((placed, bad), (0, 1));
        let copied = drain(&mut peer);
        let copied_counters = path.chain().query();

        let dir = tempfile::tempdir().unwrap();
        let (path, mut peer) = primary_path(dir.path());
        let (placed, bad) = transmit(&path, &cases, true);
        // The fifth chain (a buffer outside memory) ends the in-place way for the pass.
        assert_eq!((placed, bad), (4, 1));
        let got = drain(&mut peer);
        assert_eq!(got.len(), copied.len());
        assert!(got == copied, "byte for byte, in order");
        assert_eq!(
            path.chain().query(),
            copied_counters,
            "the same filter counters"
        );
        // Records: four before the bad chain, and three after it (the writable one's too).
        let redire1 = &path.chain().get("redire1").unwrap().counters.clone();
        assert_eq!((redire1.sent, redire1.consumed, redire1.errors), (7, 7, 0));
        assert_eq!(path.offload_passthrough.load(Ordering::Relaxed), 3);
    }
}
