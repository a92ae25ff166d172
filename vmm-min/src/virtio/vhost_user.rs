//! The vhost-user frontend (`vhost` crate `Frontend`) behind a virtio-MMIO transport, for net
//! and block backends: connection and handshake (features, protocol features REPLY_ACK,
//! CONFIG, MQ, LOG_SHMFD), config space read from the backend (GET_CONFIG) or built here (net
//! MAC), and at DRIVER_OK the memory table (memfd regions) and the rings (num, addresses, base,
//! call, kick, enable). Socket timeouts keep a silent backend from hanging a vCPU forever.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::{QueueState, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_RING_PACKED, VirtioDevice};
use crate::memory::GuestRam;

/// VHOST_USER_F_PROTOCOL_FEATURES.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// virtio device id of net.
pub const VIRTIO_ID_NET: u32 = 1;
/// virtio device id of block.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// VIRTIO_NET_F_MAC.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// VIRTIO_NET_F_STATUS.
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
/// virtio_blk_config size we read (up to and including the write-zeroes fields).
pub const BLK_CONFIG_SIZE: u32 = 60;
/// virtio_net_config size we expose (mac, status, max_virtqueue_pairs, mtu).
pub const NET_CONFIG_SIZE: u32 = 12;
/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
/// How long one vhost-user reply may take.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the SET_LOG_BASE probe may take before the backend counts as unable to log.
pub const LOG_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors of the vhost-user frontend.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    /// Connecting failed.
    #[error("vhost-user backend {path}: cannot connect: {source}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// A request failed (backend error, malformed reply, closed socket, timeout).
    #[error("vhost-user backend {path}: {what} failed: {source}")]
    Request {
        /// Socket path.
        path: PathBuf,
        /// The request.
        what: &'static str,
        /// The error.
        source: vhost::Error,
    },
    /// The backend lacks something we need.
    #[error("vhost-user backend {path}: {what}")]
    Unsupported {
        /// Socket path.
        path: PathBuf,
        /// What is missing.
        what: String,
    },
    /// Bad `--net`/`--disk` option.
    #[error("{0}")]
    Spec(String),
}

/// Device kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// virtio-net.
    Net,
    /// virtio-blk.
    Block,
}

/// `--net vhost-user,socket=PATH,mac=…` or `--disk vhost-user,socket=PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostUserSpec {
    /// Net or block.
    pub kind: Kind,
    /// Backend socket.
    pub socket: PathBuf,
    /// Net: MAC address given to the guest.
    pub mac: Option<[u8; 6]>,
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut m = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        if p.len() != 2 {
            return None;
        }
        m[i] = u8::from_str_radix(p, 16).ok()?;
    }
    Some(m)
}

impl VhostUserSpec {
    /// Parses the option value for `kind` (`vhost-user,socket=PATH[,mac=MAC]`).
    pub fn parse(kind: Kind, s: &str) -> Result<Self, VhostUserError> {
        let opt = if kind == Kind::Net { "--net" } else { "--disk" };
        let mut it = s.split(',');
        let ty = it.next().unwrap_or("");
        if ty != "vhost-user" {
            return Err(VhostUserError::Spec(format!(
                "{opt} {s:?}: only vhost-user is supported (vhost-user,socket=PATH{})",
                if kind == Kind::Net { ",mac=MAC" } else { "" }
            )));
        }
        let mut socket = None;
        let mut mac = None;
        for kv in it {
            let (k, v) = kv.split_once('=').ok_or_else(|| {
                VhostUserError::Spec(format!("{opt} {s:?}: {kv:?} is not key=value"))
            })?;
            match (k, kind) {
                ("socket", _) if !v.is_empty() => socket = Some(PathBuf::from(v)),
                ("mac", Kind::Net) => {
                    mac = Some(parse_mac(v).ok_or_else(|| {
                        VhostUserError::Spec(format!(
                            "{opt}: bad mac {v:?} (want 52:54:00:12:34:56)"
                        ))
                    })?)
                }
                ("id", _) => {}
                _ => {
                    return Err(VhostUserError::Spec(format!(
                        "{opt} {s:?}: unknown or empty option {k:?}"
                    )));
                }
            }
        }
        let socket = socket
            .ok_or_else(|| VhostUserError::Spec(format!("{opt} {s:?}: socket=PATH is required")))?;
        Ok(Self { kind, socket, mac })
    }
}

/// What the frontend negotiated (serde: for snapshots and reconnect).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhostUserState {
    /// Backend's virtio features.
    pub backend_features: u64,
    /// Protocol features acked.
    pub protocol_features: u64,
    /// Features the driver acked.
    pub acked_features: u64,
    /// Config space as last read.
    pub config: Vec<u8>,
    /// Queues as activated.
    pub queues: Vec<QueueState>,
}

/// A virtio device whose data plane is a vhost-user backend.
pub struct VhostUserDevice {
    spec: VhostUserSpec,
    frontend: Frontend,
    ram: RamInfo,
    state: VhostUserState,
    queue_count: usize,
    log: Option<std::sync::Arc<crate::dirty_log::SharedLog>>,
    sock: std::os::unix::net::UnixStream,
    /// Do not ask for LOG_SHMFD (the backend failed the SET_LOG_BASE probe).
    no_log: bool,
    /// Watches the backend socket while the rings run; reconnects when the backend goes away.
    monitor: Option<Monitor>,
    /// A connection the monitor restored, adopted before the next request.
    pending: std::sync::Arc<std::sync::Mutex<Option<Conn>>>,
    /// The memory table (and dirty log) were sent ahead on this connection
    /// ([`VirtioDevice::prepare_incoming`]): the next ring start does not send them again.
    premapped: bool,
}

/// One backend connection: the frontend and a clone of its socket.
struct Conn {
    frontend: Frontend,
    sock: std::os::unix::net::UnixStream,
}

/// The reconnect thread of one activated device (stopped and joined on drop).
struct Monitor {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Wakes the thread out of its poll at once (stopping the rings must not wait for it).
    wake: Option<EventFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(w) = &self.wake {
            let _ = w.write(1);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a reconnect needs to restore the rings of an activated device.
struct RestoreJob {
    spec: VhostUserSpec,
    ram: RamInfo,
    no_log: bool,
    log: Option<std::sync::Arc<crate::dirty_log::SharedLog>>,
    acked_features: u64,
    queues: Vec<QueueState>,
    kicks: Vec<EventFd>,
    call: EventFd,
}

/// True once the peer of `sock` hung up (or the socket failed); waits up to 200 ms.
fn hung_up(sock: &std::os::unix::net::UnixStream, wake: Option<&EventFd>) -> bool {
    use std::os::fd::AsRawFd;
    let mut p = [
        libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        },
        libc::pollfd {
            fd: wake.map_or(-1, AsRawFd::as_raw_fd),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: two valid pollfds (a negative fd is ignored by poll), count 2.
    let n = unsafe { libc::poll(p.as_mut_ptr(), 2, 1000) };
    n > 0 && p[0].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
}

impl RestoreJob {
    /// Connects to the backend again and restores features, memory table, dirty log and each
    /// ring from the used index in guest memory (requests the old backend had taken but not
    /// completed are taken again), then kicks every queue.
    fn restore(&self) -> Result<Conn, VhostUserError> {
        let mut d = VhostUserDevice::connect_inner(
            self.spec.clone(),
            self.ram.clone(),
            Duration::from_millis(500),
            self.no_log,
        )?;
        if let Some(log) = &self.log {
            d.set_dirty_log(log.clone())?;
        }
        d.state.acked_features = self.acked_features;
        let bases: Vec<u16> = self
            .queues
            .iter()
            .map(|q| {
                vm_memory::Bytes::read_obj::<u16>(&self.ram.mem, GuestAddress(q.used + 2))
                    .unwrap_or(0)
            })
            .collect();
        {
            let _w = Watchdog::arm(&d.sock);
            d.start_rings(&self.queues, &self.kicks, &self.call, Some(&bases))?;
        }
        for k in &self.kicks {
            let _ = k.write(1);
        }
        let sock = d
            .sock
            .try_clone()
            .map_err(|source| VhostUserError::Connect {
                path: self.spec.socket.clone(),
                source,
            })?;
        Ok(Conn {
            frontend: d.frontend.clone(),
            sock,
        })
    }

    fn run(
        self,
        mut watch: std::os::unix::net::UnixStream,
        pending: std::sync::Arc<std::sync::Mutex<Option<Conn>>>,
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
        wake: Option<EventFd>,
    ) {
        use std::sync::atomic::Ordering;
        while !stop.load(Ordering::SeqCst) {
            if !hung_up(&watch, wake.as_ref()) {
                continue;
            }
            tracing::warn!(socket = %self.spec.socket.display(), "vhost-user backend went away: reconnecting");
            while !stop.load(Ordering::SeqCst) {
                match self.restore() {
                    Ok(conn) => match conn.sock.try_clone() {
                        Ok(w) => {
                            watch = w;
                            *pending
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(conn);
                            tracing::warn!(socket = %self.spec.socket.display(), "vhost-user backend reconnected, rings restored");
                            break;
                        }
                        Err(e) => tracing::warn!("vhost-user reconnect: socket clone: {e}"),
                    },
                    Err(e) => {
                        tracing::debug!("vhost-user reconnect attempt failed: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        }
    }
}

/// What the frontend needs to know about guest RAM.
#[derive(Clone)]
pub struct RamInfo {
    regions: Vec<VhostUserMemoryRegionInfo>,
    mem: crate::memory::GuestMem,
}

impl RamInfo {
    /// From the VM's RAM.
    pub fn new(ram: &GuestRam) -> Self {
        let regions = ram
            .ranges()
            .iter()
            .zip(ram.host_addrs())
            .map(|(r, host)| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.guest_addr,
                memory_size: r.len,
                userspace_addr: host,
                mmap_offset: r.file_offset,
                mmap_handle: ram.raw_fd(),
            })
            .collect();
        Self {
            regions,
            mem: ram.mem().clone(),
        }
    }

    fn hva(&self, gpa: u64, len: u64) -> Option<u64> {
        let end = gpa.checked_add(len)?;
        let r = self
            .regions
            .iter()
            .find(|r| gpa >= r.guest_phys_addr && end <= r.guest_phys_addr + r.memory_size)?;
        let _ = self.mem.get_host_address(GuestAddress(gpa)).ok()?;
        Some(r.userspace_addr + (gpa - r.guest_phys_addr))
    }
}

/// Shuts the backend socket down if a request sequence takes longer than [`REPLY_TIMEOUT`]:
/// the vhost crate retries reads that time out, so a silent backend would block forever; a
/// shut-down socket makes the pending read fail instead.
struct Watchdog {
    done: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn arm(sock: &std::os::unix::net::UnixStream) -> Self {
        Self::arm_for(sock, REPLY_TIMEOUT)
    }

    fn arm_for(sock: &std::os::unix::net::UnixStream, timeout: Duration) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let thread = sock.try_clone().ok().and_then(|s| {
            std::thread::Builder::new()
                .name("vhost-user-watchdog".into())
                .spawn(move || {
                    if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                        rx.recv_timeout(timeout)
                    {
                        tracing::warn!("vhost-user backend did not answer in time: disconnecting");
                        let _ = s.shutdown(std::net::Shutdown::Both);
                    }
                })
                .ok()
        });
        Self {
            done: Some(tx),
            thread,
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // Disarm and let the thread end by itself: once `done` is sent (or dropped) it only
        // returns. Joining would wait for it to be scheduled, which in a migration's
        // switch-over (a real-time thread, a busy host) cost up to 17 ms.
        if let Some(tx) = self.done.take() {
            let _ = tx.send(());
        }
        drop(self.thread.take());
    }
}

/// Ours: the protocol features we can use.
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::RARP
}

/// VHOST_USER_SEND_RARP.
pub const VHOST_USER_SEND_RARP: u32 = 19;

/// Transport features never offered to the guest (no IOMMU, split rings only, no in-order,
/// no notification data, no ring reset).
const TRANSPORT_MASK: u64 = crate::dirty_log::VHOST_F_LOG_ALL
    | VIRTIO_F_ACCESS_PLATFORM
    | VIRTIO_F_RING_PACKED
    | (1 << 35)
    | (1 << 38)
    | (1 << 40);

/// Net features that need the control queue or multiqueue (not offered: 2 queues only).
const NET_MASK: u64 = (0x7f << 17) | (0x7f << 57);
/// VIRTIO_BLK_F_MQ (one request queue here).
const BLK_MASK: u64 = 1 << 12;

fn connect(
    path: &Path,
    deadline: Duration,
) -> Result<std::os::unix::net::UnixStream, VhostUserError> {
    let end = Instant::now() + deadline;
    loop {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e)
                if Instant::now() < end
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(source) => {
                return Err(VhostUserError::Connect {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
    }
}

impl VhostUserDevice {
    /// Connects to the backend (waiting up to `connect_wait` for its socket) and negotiates.
    pub fn connect(
        spec: VhostUserSpec,
        ram: RamInfo,
        connect_wait: Duration,
    ) -> Result<Self, VhostUserError> {
        Self::connect_inner(spec, ram, connect_wait, false)
    }

    fn connect_inner(
        spec: VhostUserSpec,
        ram: RamInfo,
        connect_wait: Duration,
        no_log: bool,
    ) -> Result<Self, VhostUserError> {
        let sock = connect(&spec.socket, connect_wait)?;
        let to = |source| VhostUserError::Connect {
            path: spec.socket.clone(),
            source,
        };
        sock.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(to)?;
        sock.set_write_timeout(Some(REPLY_TIMEOUT)).map_err(to)?;
        let queue_count = 2usize.min(if spec.kind == Kind::Net { 2 } else { 1 });
        let watch_sock = sock.try_clone().map_err(to)?;
        let frontend = Frontend::from_stream(sock, queue_count as u64);
        let mut dev = Self {
            spec,
            frontend,
            ram,
            state: VhostUserState::default(),
            queue_count,
            log: None,
            sock: watch_sock,
            no_log,
            monitor: None,
            pending: std::sync::Arc::new(std::sync::Mutex::new(None)),
            premapped: false,
        };
        let _w = Watchdog::arm(&dev.sock);
        dev.handshake()?;
        Ok(dev)
    }

    fn req(&self, what: &'static str) -> impl FnOnce(vhost::Error) -> VhostUserError + '_ {
        move |source| VhostUserError::Request {
            path: self.spec.socket.clone(),
            what,
            source,
        }
    }

    fn handshake(&mut self) -> Result<(), VhostUserError> {
        self.frontend.set_owner().map_err(self.req("SET_OWNER"))?;
        let features = self
            .frontend
            .get_features()
            .map_err(self.req("GET_FEATURES"))?;
        self.state.backend_features = features;
        if features & super::VIRTIO_F_VERSION_1 == 0 {
            return Err(VhostUserError::Unsupported {
                path: self.spec.socket.clone(),
                what: "backend does not offer VIRTIO_F_VERSION_1 (legacy-only)".into(),
            });
        }
        let mut proto = VhostUserProtocolFeatures::empty();
        if features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            let offered = self
                .frontend
                .get_protocol_features()
                .map_err(self.req("GET_PROTOCOL_FEATURES"))?;
            proto = offered & wanted_protocol_features();
            if self.no_log {
                proto.remove(VhostUserProtocolFeatures::LOG_SHMFD);
            }
            self.frontend
                .set_protocol_features(proto)
                .map_err(self.req("SET_PROTOCOL_FEATURES"))?;
        }
        self.state.protocol_features = proto.bits();
        if proto.contains(VhostUserProtocolFeatures::MQ) {
            let n = self
                .frontend
                .get_queue_num()
                .map_err(self.req("GET_QUEUE_NUM"))?;
            let need = if self.spec.kind == Kind::Net { 2 } else { 1 };
            if n < need as u64 {
                return Err(VhostUserError::Unsupported {
                    path: self.spec.socket.clone(),
                    what: format!("backend has {n} queues, {need} needed"),
                });
            }
        }
        self.state.config = self.read_backend_config()?;
        tracing::info!(
            socket = %self.spec.socket.display(),
            features = format_args!("{features:#x}"),
            protocol = format_args!("{:#x}", proto.bits()),
            "vhost-user backend connected"
        );
        Ok(())
    }

    fn config_size(&self) -> u32 {
        match self.spec.kind {
            Kind::Net => NET_CONFIG_SIZE,
            Kind::Block => BLK_CONFIG_SIZE,
        }
    }

    fn read_backend_config(&mut self) -> Result<Vec<u8>, VhostUserError> {
        let size = self.config_size();
        let mut cfg = vec![0u8; size as usize];
        let proto = VhostUserProtocolFeatures::from_bits_truncate(self.state.protocol_features);
        if proto.contains(VhostUserProtocolFeatures::CONFIG) {
            let (_, data) = self
                .frontend
                .get_config(0, size, VhostUserConfigFlags::WRITABLE, &cfg)
                .map_err(self.req("GET_CONFIG"))?;
            let n = data.len().min(cfg.len());
            cfg[..n].copy_from_slice(&data[..n]);
        } else if self.spec.kind == Kind::Block {
            return Err(VhostUserError::Unsupported {
                path: self.spec.socket.clone(),
                what: "block backend without the CONFIG protocol feature (capacity unknown)".into(),
            });
        }
        if self.spec.kind == Kind::Net {
            if let Some(mac) = self.spec.mac {
                cfg[0..6].copy_from_slice(&mac);
            }
            // Link up.
            cfg[6..8].copy_from_slice(&1u16.to_le_bytes());
        }
        Ok(cfg)
    }

    /// Makes the backend log its guest-memory writes into `log` from activation on, if it
    /// offers VHOST_F_LOG_ALL and LOG_SHMFD and answers a SET_LOG_BASE probe correctly.
    /// Call before activation. Returns whether the backend will log.
    ///
    /// The probe: vhost 0.18 waits for a 16-byte SET_LOG_BASE reply; libvhost-user
    /// (qemu-storage-daemon 7.2) sends 8, which would stall the frontend. The probe runs under a
    /// [`LOG_PROBE_TIMEOUT`] watchdog; on failure the backend is reconnected and negotiated
    /// without LOG_SHMFD (a warning says its writes are not tracked) and `Ok(false)` returned.
    pub fn set_dirty_log(
        &mut self,
        log: std::sync::Arc<crate::dirty_log::SharedLog>,
    ) -> Result<bool, VhostUserError> {
        let proto = VhostUserProtocolFeatures::from_bits_truncate(self.state.protocol_features);
        if !proto.contains(VhostUserProtocolFeatures::LOG_SHMFD)
            || self.state.backend_features & crate::dirty_log::VHOST_F_LOG_ALL == 0
        {
            return Ok(false);
        }
        let probe = {
            use std::os::fd::AsRawFd;
            let _w = Watchdog::arm_for(&self.sock, LOG_PROBE_TIMEOUT);
            let region = vhost::VhostUserDirtyLogRegion {
                mmap_size: log.mmap_size(),
                mmap_offset: 0,
                mmap_handle: log.file().as_raw_fd(),
            };
            self.frontend.set_log_base(0, Some(region))
        };
        match probe {
            Ok(()) => {
                self.log = Some(log);
                Ok(true)
            }
            Err(e) => {
                tracing::warn!(
                    socket = %self.spec.socket.display(),
                    "backend offers LOG_SHMFD but SET_LOG_BASE failed ({e}): reconnecting \
                     without the shared dirty log; its writes to guest memory are not tracked"
                );
                let _ = self.sock.shutdown(std::net::Shutdown::Both);
                let fresh =
                    Self::connect_inner(self.spec.clone(), self.ram.clone(), REPLY_TIMEOUT, true)?;
                *self = fresh;
                Ok(false)
            }
        }
    }

    /// Whether the backend logs its writes into the shared dirty log.
    pub fn logs_dirty_pages(&self) -> bool {
        self.log.is_some()
    }

    /// Negotiated state.
    pub fn state(&self) -> &VhostUserState {
        &self.state
    }

    /// The backend socket.
    pub fn socket(&self) -> &Path {
        &self.spec.socket
    }

    /// Takes over a connection the monitor restored.
    fn adopt(&mut self) {
        let conn = self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(c) = conn {
            self.frontend = c.frontend;
            self.sock = c.sock;
            self.premapped = false;
        }
    }

    /// Starts the reconnect monitor for the rings just activated.
    fn start_monitor(&mut self, queues: &[QueueState], kicks: &[EventFd], call: &EventFd) {
        let clones = (|| -> std::io::Result<_> {
            let kicks = kicks
                .iter()
                .map(EventFd::try_clone)
                .collect::<std::io::Result<Vec<_>>>()?;
            Ok((kicks, call.try_clone()?, self.sock.try_clone()?))
        })();
        let (kicks, call, watch) = match clones {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(socket = %self.spec.socket.display(), "no reconnect monitor: {e}");
                return;
            }
        };
        let job = RestoreJob {
            spec: self.spec.clone(),
            ram: self.ram.clone(),
            no_log: self.no_log,
            log: self.log.clone(),
            acked_features: self.state.acked_features,
            queues: queues.to_vec(),
            kicks,
            call,
        };
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, pending) = (stop.clone(), self.pending.clone());
        let wake = EventFd::new(libc::EFD_NONBLOCK).ok();
        let wake2 = wake.as_ref().and_then(|w| w.try_clone().ok());
        let thread = std::thread::Builder::new()
            .name("vhost-user-reconnect".into())
            .spawn(move || job.run(watch, pending, s, wake2))
            .map_err(|e| tracing::warn!("no reconnect monitor: {e}"))
            .ok();
        self.monitor = Some(Monitor { stop, wake, thread });
    }

    /// SET_MEM_TABLE, and SET_LOG_BASE (answered: the backend has both) when `logging`.
    fn send_mem_table(&mut self, logging: bool) -> Result<(), VhostUserError> {
        self.frontend
            .set_mem_table(&self.ram.regions)
            .map_err(self.req("SET_MEM_TABLE"))?;
        if logging && let Some(log) = &self.log {
            use std::os::fd::AsRawFd;
            let region = vhost::VhostUserDirtyLogRegion {
                mmap_size: log.mmap_size(),
                mmap_offset: 0,
                mmap_handle: log.file().as_raw_fd(),
            };
            self.frontend
                .set_log_base(0, Some(region))
                .map_err(self.req("SET_LOG_BASE"))?;
        }
        Ok(())
    }

    fn start_rings(
        &mut self,
        queues: &[QueueState],
        kicks: &[EventFd],
        call: &EventFd,
        bases: Option<&[u16]>,
    ) -> Result<(), VhostUserError> {
        let mut f = self.state.acked_features;
        if self.state.backend_features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            f |= VHOST_USER_F_PROTOCOL_FEATURES;
        }
        let logging = self.log.is_some()
            && self.state.backend_features & crate::dirty_log::VHOST_F_LOG_ALL != 0;
        if logging {
            f |= crate::dirty_log::VHOST_F_LOG_ALL;
        }
        let t0 = Instant::now();
        self.frontend
            .set_features(f)
            .map_err(self.req("SET_FEATURES"))?;
        let premapped = std::mem::take(&mut self.premapped);
        if !premapped {
            self.send_mem_table(logging)?;
        }
        let t_mem = t0.elapsed();
        for (i, q) in queues.iter().enumerate().take(self.queue_count) {
            if !q.ready {
                continue;
            }
            let n = u64::from(q.size);
            let bad = |what: &str| VhostUserError::Unsupported {
                path: self.spec.socket.clone(),
                what: format!("queue {i}: {what} outside guest RAM"),
            };
            let desc = self
                .ram
                .hva(q.desc, 16 * n)
                .ok_or_else(|| bad("descriptor table"))?;
            let avail = self
                .ram
                .hva(q.avail, 6 + 2 * n)
                .ok_or_else(|| bad("avail ring"))?;
            let used = self
                .ram
                .hva(q.used, 6 + 8 * n)
                .ok_or_else(|| bad("used ring"))?;
            self.frontend
                .set_vring_num(i, q.size)
                .map_err(self.req("SET_VRING_NUM"))?;
            let cfg = VringConfigData {
                queue_max_size: q.max_size,
                queue_size: q.size,
                // VHOST_VRING_F_LOG: the backend logs used-ring writes at `log_addr` (a GPA).
                flags: u32::from(logging),
                desc_table_addr: desc,
                used_ring_addr: used,
                avail_ring_addr: avail,
                log_addr: logging.then_some(q.used),
            };
            self.frontend
                .set_vring_addr(i, &cfg)
                .map_err(self.req("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(i, bases.and_then(|b| b.get(i)).copied().unwrap_or(0))
                .map_err(self.req("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_call(i, call)
                .map_err(self.req("SET_VRING_CALL"))?;
            let kick = kicks.get(i).ok_or_else(|| bad("kick eventfd"))?;
            self.frontend
                .set_vring_kick(i, kick)
                .map_err(self.req("SET_VRING_KICK"))?;
            if self.state.backend_features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
                self.frontend
                    .set_vring_enable(i, true)
                    .map_err(self.req("SET_VRING_ENABLE"))?;
            }
        }
        self.state.queues = queues.to_vec();
        tracing::info!(
            socket = %self.spec.socket.display(),
            premapped,
            features_mem_table_log_us = t_mem.as_micros(),
            rings_us = (t0.elapsed() - t_mem).as_micros(),
            "vhost-user rings started"
        );
        Ok(())
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        match self.spec.kind {
            Kind::Net => VIRTIO_ID_NET,
            Kind::Block => VIRTIO_ID_BLOCK,
        }
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; self.queue_count]
    }

    fn device_features(&self) -> u64 {
        let mut f = self.state.backend_features & !VHOST_USER_F_PROTOCOL_FEATURES & !TRANSPORT_MASK;
        match self.spec.kind {
            Kind::Net => {
                f &= !NET_MASK;
                if self.spec.mac.is_some() {
                    f |= VIRTIO_NET_F_MAC;
                }
                f |= VIRTIO_NET_F_STATUS;
            }
            Kind::Block => f &= !BLK_MASK,
        }
        f
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        let cfg = &self.state.config;
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| cfg.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let Ok(off) = usize::try_from(offset) else {
            return;
        };
        if off + data.len() > self.state.config.len() {
            return;
        }
        self.state.config[off..off + data.len()].copy_from_slice(data);
        self.adopt();
        let proto = VhostUserProtocolFeatures::from_bits_truncate(self.state.protocol_features);
        if proto.contains(VhostUserProtocolFeatures::CONFIG)
            && let Err(e) =
                self.frontend
                    .set_config(off as u32, VhostUserConfigFlags::WRITABLE, data)
        {
            tracing::warn!(socket = %self.spec.socket.display(), "SET_CONFIG failed: {e}");
        }
    }

    fn activate(
        &mut self,
        features: u64,
        queues: &[QueueState],
        kicks: &[EventFd],
        call: &EventFd,
    ) -> Result<(), String> {
        self.monitor = None;
        self.adopt();
        self.state.acked_features = features;
        self.start_rings(queues, kicks, call, None)
            .map_err(|e| e.to_string())?;
        self.start_monitor(queues, kicks, call);
        Ok(())
    }

    fn pause_rings(&mut self) -> Result<Vec<u16>, String> {
        self.monitor = None;
        self.adopt();
        let _w = Watchdog::arm(&self.sock);
        let mut bases = Vec::new();
        for i in 0..self.queue_count {
            if self.state.queues.get(i).is_some_and(|q| q.ready) {
                let b = self
                    .frontend
                    .get_vring_base(i)
                    .map_err(|e| self.req("GET_VRING_BASE")(e).to_string())?;
                bases.push(b as u16);
            } else {
                bases.push(0);
            }
        }
        tracing::debug!(socket = %self.spec.socket.display(), ?bases, "rings stopped");
        Ok(bases)
    }

    fn resume_rings(
        &mut self,
        features: u64,
        queues: &[QueueState],
        kicks: &[EventFd],
        call: &EventFd,
        bases: &[u16],
    ) -> Result<(), String> {
        let t0 = Instant::now();
        self.monitor = None;
        self.adopt();
        self.state.acked_features = features;
        let t_stop = t0.elapsed();
        {
            let _w = Watchdog::arm(&self.sock);
            self.start_rings(queues, kicks, call, Some(bases))
                .map_err(|e| e.to_string())?;
        }
        let t_rings = t0.elapsed();
        self.start_monitor(queues, kicks, call);
        tracing::info!(
            socket = %self.spec.socket.display(),
            old_monitor_us = t_stop.as_micros(),
            rings_with_watchdog_us = (t_rings - t_stop).as_micros(),
            new_monitor_us = (t0.elapsed() - t_rings).as_micros(),
            "vhost-user rings resumed"
        );
        Ok(())
    }

    fn prepare_incoming(&mut self) -> Result<(), String> {
        self.monitor = None;
        self.adopt();
        let logging = self.log.is_some()
            && self.state.backend_features & crate::dirty_log::VHOST_F_LOG_ALL != 0;
        let _w = Watchdog::arm(&self.sock);
        self.send_mem_table(logging).map_err(|e| e.to_string())?;
        self.premapped = true;
        Ok(())
    }

    fn announce(&mut self) {
        if self.spec.kind != Kind::Net {
            return;
        }
        let proto = VhostUserProtocolFeatures::from_bits_truncate(self.state.protocol_features);
        if !proto.contains(VhostUserProtocolFeatures::RARP) {
            tracing::warn!(
                socket = %self.spec.socket.display(),
                "net backend does not offer the RARP protocol feature: no announcement after \
                 migration (the switch learns the guest's port when the guest next sends)"
            );
            return;
        }
        self.adopt();
        let mut mac = [0u8; 8];
        match self.spec.mac {
            Some(m) => mac[..6].copy_from_slice(&m),
            None => mac[..6].copy_from_slice(self.state.config.get(..6).unwrap_or(&[0; 6])),
        }
        // Header: request, flags (version 1, no NEED_REPLY: no answer comes), payload size;
        // payload: u64 holding the MAC in its first 6 bytes (as QEMU sends it).
        let mut msg = Vec::with_capacity(20);
        msg.extend_from_slice(&VHOST_USER_SEND_RARP.to_le_bytes());
        msg.extend_from_slice(&1u32.to_le_bytes());
        msg.extend_from_slice(&8u32.to_le_bytes());
        msg.extend_from_slice(&mac);
        match std::io::Write::write_all(&mut &self.sock, &msg) {
            Ok(()) => {
                tracing::info!(socket = %self.spec.socket.display(), "SEND_RARP sent");
            }
            Err(e) => {
                tracing::warn!(socket = %self.spec.socket.display(), "SEND_RARP: {e}");
            }
        }
    }

    fn reset(&mut self) {
        // Stop the rings: GET_VRING_BASE makes the backend stop processing them.
        self.monitor = None;
        self.adopt();
        self.premapped = false;
        let _w = Watchdog::arm(&self.sock);
        for i in 0..self.queue_count {
            if self.state.queues.get(i).is_some_and(|q| q.ready)
                && let Err(e) = self.frontend.get_vring_base(i)
            {
                tracing::warn!(socket = %self.spec.socket.display(), queue = i, "GET_VRING_BASE on reset: {e}");
            }
        }
        self.state.queues.clear();
        self.state.acked_features = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_say_why() {
        let n = VhostUserSpec::parse(
            Kind::Net,
            "vhost-user,socket=/tmp/n.sock,mac=52:54:00:12:34:56",
        )
        .unwrap();
        assert_eq!(n.socket, PathBuf::from("/tmp/n.sock"));
        assert_eq!(n.mac, Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        let d = VhostUserSpec::parse(Kind::Block, "vhost-user,socket=/tmp/d.sock").unwrap();
        assert_eq!(d.mac, None);
        for bad in [
            "tap,socket=/x",
            "vhost-user",
            "vhost-user,socket=",
            "vhost-user,socket=/x,mac=zz:54:00:12:34:56",
            "vhost-user,socket=/x,mac=52:54:00:12:34",
            "vhost-user,socket=/x,bogus=1",
            "vhost-user,socket",
        ] {
            let e = VhostUserSpec::parse(Kind::Net, bad)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("--net"), "{bad}: {e}");
        }
        assert!(
            VhostUserSpec::parse(Kind::Block, "vhost-user,socket=/x,mac=52:54:00:12:34:56")
                .is_err()
        );
    }
}
