//! A small vhost-user-blk frontend for tests and benchmarks: it plays the VMM's part with real
//! memfd shared memory and split virtqueues, and submits virtio-blk requests straight from that
//! memory (no guest). Used by this crate's tests, `tests/tests/blk_*.rs` and `bench/blk`.
//!
//! Each queue has `queue_size / 3` request slots; a slot is a 3-descriptor chain (header, data,
//! status) over a fixed data area of `slot_bytes`. Many requests may be in flight per queue.

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    sync::atomic::{Ordering, fence},
    time::{Duration, Instant},
};

use vhost::{
    VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData,
    vhost_user::{
        Frontend, VhostUserFrontend,
        message::{VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures},
    },
};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::vhost_user::{
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const F_VERSION_1: u64 = 1 << 32;
const F_RING_EVENT_IDX: u64 = 1 << 29;

/// Errors of the test frontend.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// vhost-user message failed.
    #[error("vhost-user {what}: {source}")]
    Vhost {
        /// Which message.
        what: &'static str,
        /// The error.
        #[source]
        source: vhost::Error,
    },
    /// Host resource setup failed.
    #[error("{what}: {source}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// No completion arrived in time.
    #[error("no completion on queue {0} within {1:?}")]
    Timeout(usize, Duration),
    /// No free slot / bad argument.
    #[error("{0}")]
    Invalid(String),
}

fn vh(what: &'static str) -> impl FnOnce(vhost::Error) -> FrontendError {
    move |source| FrontendError::Vhost { what, source }
}

/// Shared guest memory: one memfd mapped into this process.
struct SharedMem {
    fd: OwnedFd,
    ptr: *mut u8,
    size: usize,
}

// SAFETY: the mapping is plain shared memory; concurrent access is coordinated by the
// virtqueue protocol (and the frontend is used from one thread at a time).
unsafe impl Send for SharedMem {}

impl SharedMem {
    fn new(size: usize, name: &str) -> Result<Self, FrontendError> {
        let cname = std::ffi::CString::new(name)
            .map_err(|_| FrontendError::Invalid("bad memfd name".into()))?;
        // SAFETY: memfd_create with a valid C string; the fd is checked below.
        let raw = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(FrontendError::Os {
                what: "memfd_create",
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: raw is a fresh fd that we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on our fd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) } != 0 {
            return Err(FrontendError::Os {
                what: "ftruncate",
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: maps `size` bytes of our memfd shared; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(FrontendError::Os {
                what: "mmap",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(SharedMem {
            fd,
            ptr: ptr.cast(),
            size,
        })
    }

    fn ptr(&self, gpa: u64, len: usize) -> *mut u8 {
        assert!(
            gpa as usize + len <= self.size,
            "test frontend: access outside shared memory"
        );
        // SAFETY: in bounds of the mapping (checked above).
        unsafe { self.ptr.add(gpa as usize) }
    }

    fn write(&self, gpa: u64, data: &[u8]) {
        let p = self.ptr(gpa, data.len());
        // SAFETY: `p` is valid for data.len() bytes of our mapping; the backend does not touch
        // descriptors/buffers we have not handed over yet.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
    }

    fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let p = self.ptr(gpa, len);
        let mut v = vec![0u8; len];
        // SAFETY: `p` is valid for len bytes of our mapping.
        unsafe { std::ptr::copy_nonoverlapping(p, v.as_mut_ptr(), len) };
        v
    }

    fn write_u16(&self, gpa: u64, v: u16) {
        self.write(gpa, &v.to_le_bytes());
    }

    fn read_u16(&self, gpa: u64) -> u16 {
        let p = self.ptr(gpa, 2).cast::<u16>();
        // SAFETY: aligned (ring fields are 2-aligned) and in bounds; volatile because the
        // backend writes it concurrently.
        u16::from_le(unsafe { std::ptr::read_volatile(p) })
    }
}

impl Drop for SharedMem {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.size) };
    }
}

struct Queue {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    data: u64,
    kick: EventFd,
    call: EventFd,
    avail_idx: u16,
    last_used: u16,
    free: Vec<u16>,
}

/// A completed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// Slot id returned by `submit`.
    pub slot: u16,
    /// virtio-blk status byte.
    pub status: u8,
    /// Bytes the device wrote (data + status).
    pub len: u32,
}

/// What a request carries.
#[derive(Debug, Clone, Copy)]
pub enum Data<'a> {
    /// No data segment.
    None,
    /// Device-readable data (write, discard segments).
    Out(&'a [u8]),
    /// Device-writable space of this many bytes (read, get-id).
    In(usize),
}

/// The test frontend.
pub struct TestFrontend {
    fe: Frontend,
    mem: SharedMem,
    queues: Vec<Queue>,
    slot_bytes: usize,
    features: u64,
    log: Option<SharedMem>,
    protocol: VhostUserProtocolFeatures,
}

impl std::fmt::Debug for TestFrontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestFrontend")
            .field("queues", &self.queues.len())
            .finish()
    }
}

/// Options of [`TestFrontend::connect`].
#[derive(Debug, Clone)]
pub struct FrontendOptions {
    /// Queues to set up.
    pub num_queues: usize,
    /// Descriptors per queue.
    pub queue_size: u16,
    /// Data bytes per request slot.
    pub slot_bytes: usize,
    /// Negotiate VIRTIO_F_RING_EVENT_IDX.
    pub event_idx: bool,
    /// How long to retry connecting.
    pub connect_timeout: Duration,
}

impl Default for FrontendOptions {
    fn default() -> Self {
        FrontendOptions {
            num_queues: 1,
            queue_size: 64,
            slot_bytes: 128 << 10,
            event_idx: false,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl TestFrontend {
    /// Connects to a backend socket and sets up memory and queues.
    pub fn connect(socket: &Path, opts: &FrontendOptions) -> Result<Self, FrontendError> {
        let deadline = Instant::now() + opts.connect_timeout;
        let mut fe = loop {
            match Frontend::connect(socket, opts.num_queues as u64) {
                Ok(f) => break f,
                Err(e) if Instant::now() >= deadline => {
                    return Err(FrontendError::Vhost {
                        what: "connect",
                        source: e,
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let qs = opts.queue_size as u64;
        let slots = (opts.queue_size / 3) as usize;
        let ring_bytes = 16 * qs + (6 + 2 * qs) + (6 + 8 * qs);
        let per_queue =
            ring_bytes.next_multiple_of(4096) + (slots * (16 + opts.slot_bytes + 16)) as u64;
        let size = (per_queue * opts.num_queues as u64 + 4096).next_multiple_of(1 << 20) as usize;
        let mem = SharedMem::new(size, "vhost-blk-test-frontend")?;

        fe.set_owner().map_err(vh("SET_OWNER"))?;
        let avail = fe.get_features().map_err(vh("GET_FEATURES"))?;
        let mut want = avail & !(F_RING_EVENT_IDX | VhostUserVirtioFeatures::LOG_ALL.bits());
        if opts.event_idx {
            want |= avail & F_RING_EVENT_IDX;
        }
        if avail & F_VERSION_1 == 0 {
            return Err(FrontendError::Invalid(
                "backend lacks VIRTIO_F_VERSION_1".into(),
            ));
        }
        fe.set_features(want).map_err(vh("SET_FEATURES"))?;
        let mut protocol = VhostUserProtocolFeatures::empty();
        if avail & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let pf = fe
                .get_protocol_features()
                .map_err(vh("GET_PROTOCOL_FEATURES"))?;
            let keep = VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::LOG_SHMFD;
            fe.set_protocol_features(pf & keep)
                .map_err(vh("SET_PROTOCOL_FEATURES"))?;
            protocol = pf & keep;
        }
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: size as u64,
            userspace_addr: mem.ptr as u64,
            mmap_offset: 0,
            mmap_handle: mem.fd.as_raw_fd(),
        };
        fe.set_mem_table(&[region]).map_err(vh("SET_MEM_TABLE"))?;
        let mut queues = Vec::new();
        for q in 0..opts.num_queues {
            let base = per_queue * q as u64;
            let desc = base;
            let avail_ring = desc + 16 * qs;
            let used = (avail_ring + 6 + 2 * qs).next_multiple_of(4);
            let data = (base + ring_bytes).next_multiple_of(4096);
            let kick = EventFd::new(EFD_NONBLOCK).map_err(|e| FrontendError::Os {
                what: "eventfd",
                source: e,
            })?;
            let call = EventFd::new(EFD_NONBLOCK).map_err(|e| FrontendError::Os {
                what: "eventfd",
                source: e,
            })?;
            fe.set_vring_num(q, opts.queue_size)
                .map_err(vh("SET_VRING_NUM"))?;
            let va = mem.ptr as u64;
            fe.set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: opts.queue_size,
                    queue_size: opts.queue_size,
                    flags: 0,
                    desc_table_addr: va + desc,
                    used_ring_addr: va + used,
                    avail_ring_addr: va + avail_ring,
                    log_addr: None,
                },
            )
            .map_err(vh("SET_VRING_ADDR"))?;
            fe.set_vring_base(q, 0).map_err(vh("SET_VRING_BASE"))?;
            fe.set_vring_call(q, &call).map_err(vh("SET_VRING_CALL"))?;
            fe.set_vring_kick(q, &kick).map_err(vh("SET_VRING_KICK"))?;
            fe.set_vring_enable(q, true)
                .map_err(vh("SET_VRING_ENABLE"))?;
            queues.push(Queue {
                size: opts.queue_size,
                desc,
                avail: avail_ring,
                used,
                data,
                kick,
                call,
                avail_idx: 0,
                last_used: 0,
                free: (0..slots as u16).rev().collect(),
            });
        }
        Ok(TestFrontend {
            fe,
            mem,
            queues,
            slot_bytes: opts.slot_bytes,
            features: want,
            log: None,
            protocol,
        })
    }

    /// Closes the vhost-user connection as a crashing frontend would (the backend sees EOF);
    /// memory and rings stay as they are, for [`TestFrontend::reconnect`].
    pub fn disconnect(&mut self) {
        // SAFETY: shutdown on the connection's socket fd, which `self.fe` keeps open.
        unsafe { libc::shutdown(self.fe.as_raw_fd(), libc::SHUT_RDWR) };
    }

    /// Connects again (to a restarted backend, or after [`TestFrontend::disconnect`]) with the
    /// same memory, and restarts every ring from the used index found in memory, as vmm-min
    /// does: requests the backend took but never made used are taken again. Then kicks every
    /// queue. Dirty logging is not restored.
    pub fn reconnect(&mut self, socket: &Path, timeout: Duration) -> Result<(), FrontendError> {
        self.disconnect();
        let deadline = Instant::now() + timeout;
        let mut fe = loop {
            match Frontend::connect(socket, self.queues.len() as u64) {
                Ok(f) => break f,
                Err(e) if Instant::now() >= deadline => {
                    return Err(FrontendError::Vhost {
                        what: "connect",
                        source: e,
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        fe.set_owner().map_err(vh("SET_OWNER"))?;
        // The reply comes once the backend has accepted this connection (after it finished
        // what the previous one left in flight), so the used indexes below are final.
        let avail = fe.get_features().map_err(vh("GET_FEATURES"))?;
        self.features &= !VhostUserVirtioFeatures::LOG_ALL.bits();
        self.log = None;
        fe.set_features(self.features & avail)
            .map_err(vh("SET_FEATURES"))?;
        if !self.protocol.is_empty() {
            let _ = fe
                .get_protocol_features()
                .map_err(vh("GET_PROTOCOL_FEATURES"))?;
            fe.set_protocol_features(self.protocol)
                .map_err(vh("SET_PROTOCOL_FEATURES"))?;
        }
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: self.mem.size as u64,
            userspace_addr: self.mem.ptr as u64,
            mmap_offset: 0,
            mmap_handle: self.mem.fd.as_raw_fd(),
        };
        fe.set_mem_table(&[region]).map_err(vh("SET_MEM_TABLE"))?;
        let va = self.mem.ptr as u64;
        for (q, queue) in self.queues.iter().enumerate() {
            fe.set_vring_num(q, queue.size)
                .map_err(vh("SET_VRING_NUM"))?;
            fe.set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: queue.size,
                    queue_size: queue.size,
                    flags: 0,
                    desc_table_addr: va + queue.desc,
                    used_ring_addr: va + queue.used,
                    avail_ring_addr: va + queue.avail,
                    log_addr: None,
                },
            )
            .map_err(vh("SET_VRING_ADDR"))?;
            let base = self.mem.read_u16(queue.used + 2);
            fe.set_vring_base(q, base).map_err(vh("SET_VRING_BASE"))?;
            fe.set_vring_call(q, &queue.call)
                .map_err(vh("SET_VRING_CALL"))?;
            fe.set_vring_kick(q, &queue.kick)
                .map_err(vh("SET_VRING_KICK"))?;
            fe.set_vring_enable(q, true)
                .map_err(vh("SET_VRING_ENABLE"))?;
        }
        self.fe = fe;
        for queue in &self.queues {
            queue.kick.write(1).map_err(|e| FrontendError::Os {
                what: "kick",
                source: e,
            })?;
        }
        Ok(())
    }

    /// The used index of queue `q` as the backend last wrote it.
    pub fn used_idx(&self, q: usize) -> u16 {
        fence(Ordering::SeqCst);
        self.mem.read_u16(self.queues[q].used + 2)
    }

    /// The avail index of queue `q` (requests made available so far).
    pub fn avail_idx(&self, q: usize) -> u16 {
        self.queues[q].avail_idx
    }

    /// The negotiated virtio features.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Reads `size` bytes of the device config space.
    pub fn config(&mut self, size: u32) -> Result<Vec<u8>, FrontendError> {
        let buf = vec![0u8; size as usize];
        let (_, payload) = self
            .fe
            .get_config(0, size, VhostUserConfigFlags::WRITABLE, &buf)
            .map_err(vh("GET_CONFIG"))?;
        Ok(payload)
    }

    /// Capacity in sectors from the config space.
    pub fn capacity(&mut self) -> Result<u64, FrontendError> {
        let c = self.config(8)?;
        let mut b = [0u8; 8];
        b.copy_from_slice(&c[..8]);
        Ok(u64::from_le_bytes(b))
    }

    fn slot_gpa(&self, q: usize, slot: u16) -> u64 {
        self.queues[q].data + u64::from(slot) * (16 + self.slot_bytes as u64 + 16)
    }

    /// Free request slots on queue `q`.
    pub fn free_slots(&self, q: usize) -> usize {
        self.queues[q].free.len()
    }

    /// Bytes of data a slot can carry.
    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    /// Puts a request on queue `q` and kicks the backend. Returns its slot.
    pub fn submit(
        &mut self,
        q: usize,
        rtype: u32,
        sector: u64,
        data: Data<'_>,
    ) -> Result<u16, FrontendError> {
        let dlen = match data {
            Data::None => 0,
            Data::Out(d) => d.len(),
            Data::In(n) => n,
        };
        if dlen > self.slot_bytes {
            return Err(FrontendError::Invalid(format!(
                "{dlen} bytes exceed the {}-byte slot",
                self.slot_bytes
            )));
        }
        let slot = self.queues[q]
            .free
            .pop()
            .ok_or_else(|| FrontendError::Invalid(format!("queue {q} is full")))?;
        let gpa = self.slot_gpa(q, slot);
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&rtype.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write(gpa, &hdr);
        if let Data::Out(d) = data {
            self.mem.write(gpa + 16, d);
        }
        let status_gpa = gpa + 16 + self.slot_bytes as u64;
        self.mem.write(status_gpa, &[0xff]);
        let queue = &self.queues[q];
        let d0 = slot * 3;
        let mut descs: Vec<(u64, u32, u16)> = vec![(gpa, 16, 0)];
        match data {
            Data::None => {}
            Data::Out(d) => descs.push((gpa + 16, d.len() as u32, 0)),
            Data::In(n) => descs.push((gpa + 16, n as u32, VRING_DESC_F_WRITE)),
        }
        descs.push((status_gpa, 1, VRING_DESC_F_WRITE));
        let n = descs.len();
        for (i, (addr, len, flags)) in descs.into_iter().enumerate() {
            let idx = d0 + i as u16;
            let next = if i + 1 < n { VRING_DESC_F_NEXT } else { 0 };
            let mut e = [0u8; 16];
            e[0..8].copy_from_slice(&addr.to_le_bytes());
            e[8..12].copy_from_slice(&len.to_le_bytes());
            e[12..14].copy_from_slice(&(flags | next).to_le_bytes());
            e[14..16].copy_from_slice(&(idx + 1).to_le_bytes());
            self.mem.write(queue.desc + 16 * u64::from(idx), &e);
        }
        let ai = queue.avail_idx;
        self.mem
            .write_u16(queue.avail + 4 + 2 * u64::from(ai % queue.size), d0);
        fence(Ordering::SeqCst);
        let queue = &mut self.queues[q];
        queue.avail_idx = ai.wrapping_add(1);
        self.mem.write_u16(queue.avail + 2, queue.avail_idx);
        // used_event (EVENT_IDX): ask for a notification at the next used entry.
        self.mem
            .write_u16(queue.avail + 4 + 2 * u64::from(queue.size), queue.last_used);
        fence(Ordering::SeqCst);
        queue.kick.write(1).map_err(|e| FrontendError::Os {
            what: "kick",
            source: e,
        })?;
        Ok(slot)
    }

    /// Collects completions on queue `q` without waiting.
    pub fn poll(&mut self, q: usize) -> Vec<Completion> {
        let mut out = Vec::new();
        fence(Ordering::SeqCst);
        let used_idx = self.mem.read_u16(self.queues[q].used + 2);
        fence(Ordering::SeqCst);
        while self.queues[q].last_used != used_idx {
            let queue = &self.queues[q];
            let e = queue.used + 4 + 8 * u64::from(queue.last_used % queue.size);
            let b = self.mem.read(e, 8);
            let id = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            let len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            let slot = (id / 3) as u16;
            let status = self
                .mem
                .read(self.slot_gpa(q, slot) + 16 + self.slot_bytes as u64, 1)[0];
            let queue = &mut self.queues[q];
            queue.last_used = queue.last_used.wrapping_add(1);
            queue.free.push(slot);
            out.push(Completion { slot, status, len });
        }
        out
    }

    /// Waits until at least one completion arrives on queue `q`.
    pub fn wait(&mut self, q: usize, timeout: Duration) -> Result<Vec<Completion>, FrontendError> {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.poll(q);
            if !c.is_empty() {
                return Ok(c);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(FrontendError::Timeout(q, timeout));
            }
            let mut pfd = libc::pollfd {
                fd: self.queues[q].call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().clamp(1, 100) as libc::c_int;
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, ms) };
            let _ = self.queues[q].call.read();
        }
    }

    /// Data area of a slot (valid after its completion).
    pub fn slot_data(&self, q: usize, slot: u16, len: usize) -> Vec<u8> {
        self.mem.read(self.slot_gpa(q, slot) + 16, len)
    }

    /// Submits one request and waits for it. Returns (status, data read).
    pub fn request(
        &mut self,
        q: usize,
        rtype: u32,
        sector: u64,
        data: Data<'_>,
    ) -> Result<(u8, Vec<u8>), FrontendError> {
        let slot = self.submit(q, rtype, sector, data)?;
        loop {
            for c in self.wait(q, Duration::from_secs(30))? {
                if c.slot == slot {
                    let n = match data {
                        Data::In(n) => n,
                        _ => 0,
                    };
                    return Ok((c.status, self.slot_data(q, slot, n)));
                }
            }
        }
    }

    /// Reads `len` bytes at `sector`.
    pub fn read(
        &mut self,
        q: usize,
        sector: u64,
        len: usize,
    ) -> Result<(u8, Vec<u8>), FrontendError> {
        self.request(q, VIRTIO_BLK_T_IN, sector, Data::In(len))
    }

    /// Writes `data` at `sector`; returns the status.
    pub fn write(&mut self, q: usize, sector: u64, data: &[u8]) -> Result<u8, FrontendError> {
        self.request(q, VIRTIO_BLK_T_OUT, sector, Data::Out(data))
            .map(|r| r.0)
    }

    /// Flushes; returns the status.
    pub fn flush(&mut self, q: usize) -> Result<u8, FrontendError> {
        self.request(q, VIRTIO_BLK_T_FLUSH, 0, Data::None)
            .map(|r| r.0)
    }

    /// GET_ID.
    pub fn get_id(&mut self, q: usize) -> Result<(u8, Vec<u8>), FrontendError> {
        self.request(q, VIRTIO_BLK_T_GET_ID, 0, Data::In(20))
    }

    /// Discard or write-zeroes with one segment.
    pub fn range_op(
        &mut self,
        q: usize,
        rtype: u32,
        sector: u64,
        sectors: u32,
        flags: u32,
    ) -> Result<u8, FrontendError> {
        let mut seg = [0u8; 16];
        seg[0..8].copy_from_slice(&sector.to_le_bytes());
        seg[8..12].copy_from_slice(&sectors.to_le_bytes());
        seg[12..16].copy_from_slice(&flags.to_le_bytes());
        self.request(q, rtype, 0, Data::Out(&seg)).map(|r| r.0)
    }

    /// Turns on dirty logging: a memfd log shared with the backend, and LOG_ALL.
    pub fn start_dirty_log(&mut self) -> Result<(), FrontendError> {
        let log = SharedMem::new(self.log_bytes(), "vhost-blk-test-log")?;
        self.send_log(log.fd.as_raw_fd())?;
        self.log = Some(log);
        Ok(())
    }

    /// Like [`TestFrontend::start_dirty_log`], but the log lies over a memfd of only
    /// `file_len` bytes: a frontend's bug (or attack) that a backend must refuse, since
    /// marking a page whose bit lies past the file's end is SIGBUS. The log is not kept.
    pub fn start_short_dirty_log(&mut self, file_len: u64) -> Result<(), FrontendError> {
        let file = vhost_user_guards::testing::memfd(file_len);
        self.send_log(file.as_raw_fd())
    }

    /// Bytes of a dirty log covering all of guest memory (one bit per 4 KiB page).
    fn log_bytes(&self) -> usize {
        self.mem
            .size
            .div_ceil(4096)
            .div_ceil(8)
            .next_multiple_of(4096)
    }

    /// SET_LOG_BASE with a log of [`TestFrontend::log_bytes`] over `fd`, then LOG_ALL.
    fn send_log(&mut self, fd: std::os::fd::RawFd) -> Result<(), FrontendError> {
        self.fe
            .set_log_base(
                0,
                Some(VhostUserDirtyLogRegion {
                    mmap_size: self.log_bytes() as u64,
                    mmap_offset: 0,
                    mmap_handle: fd,
                }),
            )
            .map_err(vh("SET_LOG_BASE"))?;
        self.features |= VhostUserVirtioFeatures::LOG_ALL.bits();
        self.fe
            .set_features(self.features)
            .map_err(vh("SET_FEATURES(LOG_ALL)"))
    }

    /// Guest-physical page numbers marked dirty since the last call (clears the log).
    pub fn take_dirty_pages(&mut self) -> Vec<u64> {
        let Some(log) = &self.log else {
            return Vec::new();
        };
        let base = log.ptr(0, log.size);
        let mut out = Vec::new();
        for i in 0..log.size {
            // SAFETY: i < log.size, inside the log mapping. The backend sets bits with atomic
            // ORs; we swap each byte atomically so no bit set meanwhile is lost.
            let cell = unsafe { &*base.add(i).cast::<std::sync::atomic::AtomicU8>() };
            let v = cell.swap(0, Ordering::SeqCst);
            if v != 0 {
                for bit in 0..8 {
                    if v & (1 << bit) != 0 {
                        out.push((i * 8 + bit) as u64);
                    }
                }
            }
        }
        out
    }

    /// Guest-physical address range of a slot's data area (for dirty-log assertions).
    pub fn slot_data_gpa(&self, q: usize, slot: u16) -> u64 {
        self.slot_gpa(q, slot) + 16
    }
}
