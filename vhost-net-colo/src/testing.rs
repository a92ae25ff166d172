//! A small vhost-user-net frontend for tests and benchmarks: it plays the VMM's part with memfd
//! shared memory and split virtqueues (receive queue 0, transmit queue 1), and sends and
//! receives frames straight from that memory (no guest).
//!
//! Receive buffers are single writable descriptors of `rx_buf_size` bytes (small sizes exercise
//! `VIRTIO_NET_F_MRG_RXBUF`); transmit requests are single readable descriptors holding the
//! 12-byte virtio-net header and the frame. Completions are found by polling the used rings.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::backend::{VIRTIO_NET_F_MRG_RXBUF, VIRTIO_RING_F_EVENT_IDX};
use crate::vnet::VNET_HDR_LEN;

const DESC_F_WRITE: u16 = 2;

/// Errors of the test frontend.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("vhost-user {what}: {source}")]
    Vhost {
        what: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("{what}: {source}")]
    Os {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn vh(what: &'static str) -> impl FnOnce(vhost::Error) -> FrontendError {
    move |source| FrontendError::Vhost { what, source }
}

struct Mem {
    fd: OwnedFd,
    ptr: *mut u8,
    size: usize,
}

// SAFETY: plain shared memory; access is coordinated through the virtqueue protocol and the
// frontend is used by one thread at a time.
unsafe impl Send for Mem {}

impl Mem {
    fn new(size: usize) -> Result<Self, FrontendError> {
        let os = |what| move |source| FrontendError::Os { what, source };
        // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
        let raw =
            unsafe { libc::memfd_create(c"vhost-net-test-frontend".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(os("memfd_create")(std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on our own descriptor.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) } != 0 {
            return Err(os("ftruncate")(std::io::Error::last_os_error()));
        }
        // SAFETY: maps `size` bytes of our memfd, shared; checked below.
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
            return Err(os("mmap")(std::io::Error::last_os_error()));
        }
        Ok(Self {
            fd,
            ptr: ptr.cast(),
            size,
        })
    }

    fn at(&self, gpa: u64, len: usize) -> *mut u8 {
        assert!(
            gpa as usize + len <= self.size,
            "test frontend: access outside its memory"
        );
        // SAFETY: within the mapping (checked above).
        unsafe { self.ptr.add(gpa as usize) }
    }

    fn write(&self, gpa: u64, data: &[u8]) {
        // SAFETY: `at` checked the range; the backend does not use buffers not yet handed over.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.at(gpa, data.len()), data.len())
        };
    }

    fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        // SAFETY: `at` checked the range.
        unsafe { std::ptr::copy_nonoverlapping(self.at(gpa, len), v.as_mut_ptr(), len) };
        v
    }

    fn w16(&self, gpa: u64, v: u16) {
        // SAFETY: ring fields are 2-aligned and in range; volatile: the backend reads them.
        unsafe { std::ptr::write_volatile(self.at(gpa, 2).cast::<u16>(), v.to_le()) };
    }

    fn r16(&self, gpa: u64) -> u16 {
        // SAFETY: as in `w16`; volatile: the backend writes them.
        u16::from_le(unsafe { std::ptr::read_volatile(self.at(gpa, 2).cast::<u16>()) })
    }

    fn r32(&self, gpa: u64) -> u32 {
        // SAFETY: used-ring fields are 4-aligned and in range.
        u32::from_le(unsafe { std::ptr::read_volatile(self.at(gpa, 4).cast::<u32>()) })
    }

    fn write_desc(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        self.write(table + 16 * u64::from(i), &d);
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.size) };
    }
}

struct Ring {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    bufs: u64,
    buf_size: usize,
    kick: EventFd,
    _call: EventFd,
    avail_idx: u16,
    last_used: u16,
    free: Vec<u16>,
}

impl Ring {
    fn publish(&mut self, mem: &Mem, id: u16) {
        mem.w16(
            self.avail + 4 + 2 * u64::from(self.avail_idx % self.size),
            id,
        );
        self.avail_idx = self.avail_idx.wrapping_add(1);
        fence(Ordering::SeqCst);
        mem.w16(self.avail + 2, self.avail_idx);
        fence(Ordering::SeqCst);
    }

    fn next_used(&mut self, mem: &Mem) -> Option<(u16, u32)> {
        fence(Ordering::SeqCst);
        if mem.r16(self.used + 2) == self.last_used {
            return None;
        }
        fence(Ordering::Acquire);
        let e = self.used + 4 + 8 * u64::from(self.last_used % self.size);
        let id = mem.r32(e) as u16;
        let len = mem.r32(e + 4);
        self.last_used = self.last_used.wrapping_add(1);
        Some((id, len))
    }

    /// Driver's `used_event` (asks for a call at every completion; we poll anyway).
    fn set_used_event(&self, mem: &Mem) {
        mem.w16(self.avail + 4 + 2 * u64::from(self.size), self.last_used);
    }
}

/// Options of [`NetFrontend::connect`].
#[derive(Debug, Clone)]
pub struct Options {
    pub queue_size: u16,
    pub rx_buf_size: usize,
    pub event_idx: bool,
    pub mrg_rxbuf: bool,
    pub connect_timeout: Duration,
    /// Queue pairs to set up (the device must offer `VIRTIO_NET_F_MQ` for more than 1).
    pub queue_pairs: u16,
    /// Feature bits not to acknowledge even when offered (e.g. the offloads).
    pub refuse_features: u64,
    /// Receive buffers posted at connect, per queue pair (`None`: all); the others are posted
    /// by [`NetFrontend::post_rx`].
    pub rx_prefill: Option<u16>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            queue_size: 256,
            rx_buf_size: 2048,
            event_idx: true,
            mrg_rxbuf: true,
            connect_timeout: Duration::from_secs(10),
            queue_pairs: 1,
            refuse_features: 0,
            rx_prefill: None,
        }
    }
}

/// The test frontend.
pub struct NetFrontend {
    fe: Frontend,
    mem: Mem,
    rx: Ring,
    tx: Ring,
    features: u64,
    /// Queue pairs 1.. (receive, transmit); pair 0 is `rx`/`tx`.
    more: Vec<(Ring, Ring)>,
}

impl NetFrontend {
    /// Connects, negotiates and sets up both queues; all receive buffers are posted.
    pub fn connect(socket: &Path, o: &Options) -> Result<Self, FrontendError> {
        let deadline = Instant::now() + o.connect_timeout;
        let mut fe = loop {
            match Frontend::connect(socket, 2 * u64::from(o.queue_pairs.max(1))) {
                Ok(f) => break f,
                Err(e) if Instant::now() >= deadline => return Err(vh("connect")(e)),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let qs = u64::from(o.queue_size);
        let ring_bytes = (16 * qs + 6 + 2 * qs).next_multiple_of(4) + 6 + 8 * qs;
        let tx_buf = 65536 + VNET_HDR_LEN;
        let per_rx = ring_bytes.next_multiple_of(4096) + qs * o.rx_buf_size as u64;
        let per_tx = ring_bytes.next_multiple_of(4096) + qs * tx_buf as u64;
        let pairs = u64::from(o.queue_pairs.max(1));
        let size = ((per_rx + per_tx) * pairs).next_multiple_of(1 << 20) as usize;
        let mem = Mem::new(size)?;

        fe.set_owner().map_err(vh("SET_OWNER"))?;
        let avail = fe.get_features().map_err(vh("GET_FEATURES"))?;
        let mut want = avail
            & !(1 << VIRTIO_RING_F_EVENT_IDX
                | 1 << VIRTIO_NET_F_MRG_RXBUF
                | VhostUserVirtioFeatures::LOG_ALL.bits());
        if o.event_idx {
            want |= avail & (1 << VIRTIO_RING_F_EVENT_IDX);
        }
        if o.mrg_rxbuf {
            want |= avail & (1 << VIRTIO_NET_F_MRG_RXBUF);
        }
        want &= !o.refuse_features;
        fe.set_features(want).map_err(vh("SET_FEATURES"))?;
        if avail & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let pf = fe
                .get_protocol_features()
                .map_err(vh("GET_PROTOCOL_FEATURES"))?;
            let keep = VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK;
            fe.set_protocol_features(pf & keep)
                .map_err(vh("SET_PROTOCOL_FEATURES"))?;
        }
        fe.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: size as u64,
            userspace_addr: mem.ptr as u64,
            mmap_offset: 0,
            mmap_handle: mem.fd.as_raw_fd(),
        }])
        .map_err(vh("SET_MEM_TABLE"))?;
        let mut rings = Vec::new();
        let layout: Vec<(usize, u64, usize)> = (0..pairs)
            .flat_map(|p| {
                let base = p * (per_rx + per_tx);
                [
                    (2 * p as usize, base, o.rx_buf_size),
                    (2 * p as usize + 1, base + per_rx, tx_buf),
                ]
            })
            .collect();
        for (q, base, buf_size) in layout {
            let desc = base;
            let avail_ring = desc + 16 * qs;
            let used = (avail_ring + 6 + 2 * qs).next_multiple_of(4);
            let bufs = (base + ring_bytes).next_multiple_of(4096);
            let ev = || {
                EventFd::new(EFD_NONBLOCK).map_err(|source| FrontendError::Os {
                    what: "eventfd",
                    source,
                })
            };
            let (kick, call) = (ev()?, ev()?);
            fe.set_vring_num(q, o.queue_size)
                .map_err(vh("SET_VRING_NUM"))?;
            let va = mem.ptr as u64;
            fe.set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: o.queue_size,
                    queue_size: o.queue_size,
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
            rings.push(Ring {
                size: o.queue_size,
                desc,
                avail: avail_ring,
                used,
                bufs,
                buf_size,
                kick,
                _call: call,
                avail_idx: 0,
                last_used: 0,
                free: (0..o.queue_size).rev().collect(),
            });
        }
        let mut pairs_v = Vec::new();
        let mut it = rings.into_iter();
        let prefill = o.rx_prefill.unwrap_or(o.queue_size).min(o.queue_size);
        while let (Some(mut rx), Some(tx)) = (it.next(), it.next()) {
            for i in 0..o.queue_size {
                let addr = rx.bufs + u64::from(i) * rx.buf_size as u64;
                mem.write_desc(rx.desc, i, addr, rx.buf_size as u32, DESC_F_WRITE);
                if i < prefill {
                    rx.publish(&mem, i);
                }
            }
            rx.free = (prefill..o.queue_size).rev().collect();
            rx.set_used_event(&mem);
            tx.set_used_event(&mem);
            pairs_v.push((rx, tx));
        }
        for q in 0..2 * pairs as usize {
            fe.set_vring_enable(q, true)
                .map_err(vh("SET_VRING_ENABLE"))?;
        }
        for (rx, _) in &pairs_v {
            let _ = rx.kick.write(1);
        }
        let mut pv = pairs_v.into_iter();
        let (rx, tx) = pv
            .next()
            .ok_or_else(|| FrontendError::Invalid("no queue pair".into()))?;
        let more: Vec<(Ring, Ring)> = pv.collect();
        Ok(Self {
            fe,
            mem,
            rx,
            tx,
            features: want,
            more,
        })
    }

    pub fn features(&self) -> u64 {
        self.features
    }

    /// Queue pairs set up.
    pub fn queue_pairs(&self) -> usize {
        1 + self.more.len()
    }

    /// Queues one frame on the transmit queue of pair `pair` and kicks.
    pub fn send_on(&mut self, pair: usize, frame: &[u8]) -> Result<(), FrontendError> {
        if pair == 0 {
            return self.send(frame);
        }
        let mem = &self.mem;
        let (_, tx) = self
            .more
            .get_mut(pair - 1)
            .ok_or_else(|| FrontendError::Invalid(format!("no queue pair {pair}")))?;
        if frame.len() + VNET_HDR_LEN > tx.buf_size {
            return Err(FrontendError::Invalid(format!(
                "frame of {} bytes",
                frame.len()
            )));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let id = loop {
            while let Some((id, _)) = tx.next_used(mem) {
                tx.free.push(id);
            }
            tx.set_used_event(mem);
            if let Some(id) = tx.free.pop() {
                break id;
            }
            let _ = tx.kick.write(1);
            if Instant::now() > deadline {
                return Err(FrontendError::Invalid(
                    "transmit queue never drained".into(),
                ));
            }
            std::thread::yield_now();
        };
        let addr = tx.bufs + u64::from(id) * tx.buf_size as u64;
        mem.write(addr, &[0u8; VNET_HDR_LEN]);
        mem.write(addr + VNET_HDR_LEN as u64, frame);
        mem.write_desc(tx.desc, id, addr, (VNET_HDR_LEN + frame.len()) as u32, 0);
        tx.publish(mem, id);
        let _ = tx.kick.write(1);
        Ok(())
    }

    /// The next frame received on pair `pair`'s receive queue, if one is there (single-buffer
    /// frames; header removed).
    pub fn try_recv_on(&mut self, pair: usize) -> Option<Vec<u8>> {
        if pair == 0 {
            return self.try_recv().map(|(f, _)| f);
        }
        let mem = &self.mem;
        let (rx, _) = self.more.get_mut(pair - 1)?;
        let (id, len) = rx.next_used(mem)?;
        let addr = rx.bufs + u64::from(id) * rx.buf_size as u64;
        let data = mem.read(addr, len as usize);
        rx.publish(mem, id);
        rx.set_used_event(mem);
        let _ = rx.kick.write(1);
        Some(data.get(VNET_HDR_LEN..).unwrap_or(&[]).to_vec())
    }

    /// Disables (or enables again) the queues of pair `pair` (`SET_VRING_ENABLE`), as a
    /// driver that uses fewer pairs makes its frontend do.
    pub fn set_pair_enabled(&mut self, pair: usize, on: bool) -> Result<(), FrontendError> {
        for q in [2 * pair, 2 * pair + 1] {
            self.fe
                .set_vring_enable(q, on)
                .map_err(vh("SET_VRING_ENABLE"))?;
        }
        Ok(())
    }

    /// The device config space (`mac`, `status`, ...).
    pub fn config(&mut self, size: u32) -> Result<Vec<u8>, FrontendError> {
        let buf = vec![0u8; size as usize];
        let (_, data) = self
            .fe
            .get_config(0, size, VhostUserConfigFlags::WRITABLE, &buf)
            .map_err(vh("GET_CONFIG"))?;
        Ok(data)
    }

    fn reclaim_tx(&mut self) {
        while let Some((id, _)) = self.tx.next_used(&self.mem) {
            self.tx.free.push(id);
        }
        self.tx.set_used_event(&self.mem);
    }

    /// Queues one frame on the transmit queue (waits for a free descriptor) and kicks.
    pub fn send(&mut self, frame: &[u8]) -> Result<(), FrontendError> {
        self.send_batch(std::slice::from_ref(&frame))
    }

    /// Queues several frames, then kicks once.
    pub fn send_batch<F: AsRef<[u8]>>(&mut self, frames: &[F]) -> Result<(), FrontendError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        for f in frames {
            self.queue_tx(&[0u8; VNET_HDR_LEN], f.as_ref(), deadline)?;
        }
        let _ = self.tx.kick.write(1);
        Ok(())
    }

    /// Queues one frame with the given virtio-net header (offloads) and kicks.
    pub fn send_vnet(
        &mut self,
        hdr: &[u8; VNET_HDR_LEN],
        frame: &[u8],
    ) -> Result<(), FrontendError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        self.queue_tx(hdr, frame, deadline)?;
        let _ = self.tx.kick.write(1);
        Ok(())
    }

    /// Puts one frame behind `hdr` into a free transmit buffer (kicking and reclaiming until
    /// one is free, up to `deadline`) and publishes it, without a final kick.
    fn queue_tx(
        &mut self,
        hdr: &[u8; VNET_HDR_LEN],
        frame: &[u8],
        deadline: Instant,
    ) -> Result<(), FrontendError> {
        if frame.len() + VNET_HDR_LEN > self.tx.buf_size {
            return Err(FrontendError::Invalid(format!(
                "frame of {} bytes",
                frame.len()
            )));
        }
        let id = loop {
            self.reclaim_tx();
            if let Some(id) = self.tx.free.pop() {
                break id;
            }
            let _ = self.tx.kick.write(1);
            if Instant::now() > deadline {
                return Err(FrontendError::Invalid(
                    "transmit queue never drained".into(),
                ));
            }
            std::thread::yield_now();
        };
        let addr = self.tx.bufs + u64::from(id) * self.tx.buf_size as u64;
        self.mem.write(addr, hdr);
        self.mem.write(addr + VNET_HDR_LEN as u64, frame);
        self.mem.write_desc(
            self.tx.desc,
            id,
            addr,
            (VNET_HDR_LEN + frame.len()) as u32,
            0,
        );
        self.tx.publish(&self.mem, id);
        Ok(())
    }

    /// Waits up to `timeout` for the next received frame; returns its virtio-net header too.
    pub fn recv_vnet(&mut self, timeout: Duration) -> Option<([u8; VNET_HDR_LEN], Vec<u8>)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((id, len)) = self.rx.next_used(&self.mem) {
                let addr = self.rx.bufs + u64::from(id) * self.rx.buf_size as u64;
                let first = self.mem.read(addr, len as usize);
                let mut hdr = [0u8; VNET_HDR_LEN];
                let n = first.len().min(VNET_HDR_LEN);
                hdr[..n].copy_from_slice(&first[..n]);
                let nbufs = u16::from_le_bytes([hdr[10], hdr[11]]).max(1);
                let mut data = first.get(VNET_HDR_LEN..).unwrap_or(&[]).to_vec();
                let mut ids = vec![id];
                for _ in 1..nbufs {
                    let Some((id, len)) = self.rx.next_used(&self.mem) else {
                        break;
                    };
                    let addr = self.rx.bufs + u64::from(id) * self.rx.buf_size as u64;
                    data.extend_from_slice(&self.mem.read(addr, len as usize));
                    ids.push(id);
                }
                for id in ids {
                    self.rx.publish(&self.mem, id);
                }
                self.rx.set_used_event(&self.mem);
                let _ = self.rx.kick.write(1);
                return Some((hdr, data));
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::yield_now();
        }
    }

    /// The next received frame (header removed, merged buffers joined), if one is there.
    /// Also returns the `num_buffers` the device wrote.
    pub fn try_recv(&mut self) -> Option<(Vec<u8>, u16)> {
        let (id, len) = self.rx.next_used(&self.mem)?;
        let addr = self.rx.bufs + u64::from(id) * self.rx.buf_size as u64;
        let first = self.mem.read(addr, len as usize);
        let nbufs = first
            .get(10..12)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .unwrap_or(1)
            .max(1);
        let mut data = first.get(VNET_HDR_LEN..).unwrap_or(&[]).to_vec();
        let mut ids = vec![id];
        for _ in 1..nbufs {
            // The device publishes all buffers of a frame before the used index moves past them.
            let Some((id, len)) = self.rx.next_used(&self.mem) else {
                break;
            };
            let addr = self.rx.bufs + u64::from(id) * self.rx.buf_size as u64;
            data.extend_from_slice(&self.mem.read(addr, len as usize));
            ids.push(id);
        }
        for id in ids {
            self.rx.publish(&self.mem, id);
        }
        self.rx.set_used_event(&self.mem);
        let _ = self.rx.kick.write(1);
        Some((data, nbufs))
    }

    /// Posts up to `n` receive buffers the frontend holds (not posted at connect, see
    /// [`Options::rx_prefill`]) on pair 0 and notifies the device only when a driver would:
    /// with EVENT_IDX when the avail index passed the device's `avail_event` (the virtio
    /// spec's `vring_need_event`), else unless the device set `VRING_USED_F_NO_NOTIFY`. The
    /// other receive paths of this frontend kick every time; this one finds a device that
    /// asks for its kicks wrongly. Returns how many were posted and whether it kicked.
    pub fn post_rx(&mut self, n: usize) -> (usize, bool) {
        let event_idx = self.features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let old = self.rx.avail_idx;
        let mut posted = 0;
        while posted < n {
            let Some(id) = self.rx.free.pop() else { break };
            self.rx.publish(&self.mem, id);
            posted += 1;
        }
        if posted == 0 {
            return (0, false);
        }
        let new = self.rx.avail_idx;
        // `publish` fenced after the index: the device's notification fields are read after it.
        let kick = if event_idx {
            let avail_event = self.mem.r16(self.rx.used + 4 + 8 * u64::from(self.rx.size));
            new.wrapping_sub(avail_event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            self.mem.r16(self.rx.used) & 1 == 0
        };
        if kick {
            let _ = self.rx.kick.write(1);
        }
        (posted, kick)
    }

    /// How many interrupts (call eventfd writes) the device sent for pair 0's receive queue
    /// since the last call of this function (the eventfd is drained).
    pub fn take_rx_interrupts(&mut self) -> u64 {
        self.rx._call.read().unwrap_or(0)
    }

    /// Waits up to `timeout` for the next received frame.
    pub fn recv(&mut self, timeout: Duration) -> Option<(Vec<u8>, u16)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(f) = self.try_recv() {
                return Some(f);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::yield_now();
        }
    }
}
