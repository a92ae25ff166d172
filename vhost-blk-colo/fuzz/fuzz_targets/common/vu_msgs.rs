//! A fuzzing vhost-user frontend: decodes the fuzz input as a sequence of vhost-user messages
//! and sends them over one connection to a backend served as our binaries serve it, with real
//! file descriptors attached over SCM_RIGHTS (memfds for memory tables and the dirty log,
//! eventfds for kick/call/err, a socket for the backend-request channel).
//!
//! Shared by `vhost-blk-colo/fuzz`'s and `vhost-net-colo/fuzz`'s `vhost_user_msgs` targets
//! (included with `#[path]`). Each message is one of: a well-formed request with
//! fuzzer-chosen fields (indices, addresses, sizes, offsets, flags), the same with its header
//! size lying or its body cut, or raw bytes; then a read of whatever replies are waiting. A
//! "probe" does the whole set-up a frontend does (features, memory table over a fresh memfd,
//! optionally the dirty log with LOG_ALL, one ring) and submits one request; when every
//! message of it was acknowledged, the request must complete (and, with the log, the used
//! ring's page must be marked dirty).
//!
//! The session ends with the socket closed, sometimes in the middle of a message; the caller
//! then checks that the serving thread returns ([`join_within`]).

#![allow(dead_code)]

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

pub const GET_FEATURES: u32 = 1;
pub const SET_FEATURES: u32 = 2;
pub const SET_OWNER: u32 = 3;
pub const RESET_OWNER: u32 = 4;
pub const SET_MEM_TABLE: u32 = 5;
pub const SET_LOG_BASE: u32 = 6;
pub const SET_LOG_FD: u32 = 7;
pub const SET_VRING_NUM: u32 = 8;
pub const SET_VRING_ADDR: u32 = 9;
pub const SET_VRING_BASE: u32 = 10;
pub const GET_VRING_BASE: u32 = 11;
pub const SET_VRING_KICK: u32 = 12;
pub const SET_VRING_CALL: u32 = 13;
pub const SET_VRING_ERR: u32 = 14;
pub const GET_PROTOCOL_FEATURES: u32 = 15;
pub const SET_PROTOCOL_FEATURES: u32 = 16;
pub const GET_QUEUE_NUM: u32 = 17;
pub const SET_VRING_ENABLE: u32 = 18;
pub const SEND_RARP: u32 = 19;
pub const NET_SET_MTU: u32 = 20;
pub const SET_BACKEND_REQ_FD: u32 = 21;
pub const IOTLB_MSG: u32 = 22;
pub const GET_CONFIG: u32 = 24;
pub const SET_CONFIG: u32 = 25;
pub const GET_INFLIGHT_FD: u32 = 31;
pub const SET_INFLIGHT_FD: u32 = 32;
pub const RESET_DEVICE: u32 = 34;
pub const GET_MAX_MEM_SLOTS: u32 = 36;
pub const ADD_MEM_REG: u32 = 37;
pub const REM_MEM_REG: u32 = 38;
pub const SET_STATUS: u32 = 39;
pub const GET_STATUS: u32 = 40;
pub const SET_DEVICE_STATE_FD: u32 = 42;
pub const CHECK_DEVICE_STATE: u32 = 43;

const KNOWN: &[u32] = &[
    GET_FEATURES,
    SET_FEATURES,
    SET_OWNER,
    RESET_OWNER,
    SET_MEM_TABLE,
    SET_LOG_BASE,
    SET_LOG_FD,
    SET_VRING_NUM,
    SET_VRING_ADDR,
    SET_VRING_BASE,
    GET_VRING_BASE,
    SET_VRING_KICK,
    SET_VRING_CALL,
    SET_VRING_ERR,
    GET_PROTOCOL_FEATURES,
    SET_PROTOCOL_FEATURES,
    GET_QUEUE_NUM,
    SET_VRING_ENABLE,
    SEND_RARP,
    NET_SET_MTU,
    SET_BACKEND_REQ_FD,
    IOTLB_MSG,
    23,
    GET_CONFIG,
    SET_CONFIG,
    GET_INFLIGHT_FD,
    SET_INFLIGHT_FD,
    RESET_DEVICE,
    35,
    GET_MAX_MEM_SLOTS,
    ADD_MEM_REG,
    REM_MEM_REG,
    SET_STATUS,
    GET_STATUS,
    41,
    SET_DEVICE_STATE_FD,
    CHECK_DEVICE_STATE,
    44,
];

pub const FLAG_VERSION: u32 = 0x1;
pub const FLAG_REPLY: u32 = 0x4;
pub const FLAG_NEED_REPLY: u32 = 0x8;
const HDR: usize = 12;

pub const F_RING_EVENT_IDX: u64 = 1 << 29;
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
pub const F_LOG_ALL: u64 = 1 << 26;
pub const F_VERSION_1: u64 = 1 << 32;
pub const PF_MQ: u64 = 1 << 0;
pub const PF_LOG_SHMFD: u64 = 1 << 1;
pub const PF_REPLY_ACK: u64 = 1 << 3;
pub const PF_BACKEND_REQ: u64 = 1 << 5;
pub const PF_CONFIG: u64 = 1 << 9;
pub const PF_INFLIGHT_SHMFD: u64 = 1 << 12;
pub const PF_CONFIGURE_MEM_SLOTS: u64 = 1 << 15;
pub const PF_STATUS: u64 = 1 << 16;
pub const PF_DEVICE_STATE: u64 = 1 << 19;

/// How long a well-behaved backend may take to answer or to end its thread.
pub const BOUND: Duration = Duration::from_secs(20);

/// What differs between the backends.
pub struct Target {
    /// Vrings the backend has.
    pub num_queues: u32,
    /// Its largest queue size.
    pub max_queue_size: u16,
    /// The ring the probe uses.
    pub probe_queue: u32,
    /// The probe request's buffers for these acked features: bytes, device-writable.
    pub probe_bufs: fn(u64) -> Vec<(Vec<u8>, bool)>,
    /// Judges the writable buffers after completion (`Err` = a broken property).
    pub probe_check: fn(&[Vec<u8>]) -> std::result::Result<(), String>,
    /// The backend refuses a dirty log longer than its memfd (else the probe sends such logs
    /// only with FUZZ_SHORT_LOG set).
    pub short_log_guarded: bool,
}

fn debug() -> bool {
    std::env::var_os("FUZZ_DEBUG").is_some()
}

/// One vhost-user message as bytes: header (request, flags, size) and body.
pub fn encode(req: u32, flags: u32, size: u32, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(HDR + body.len());
    m.extend_from_slice(&req.to_le_bytes());
    m.extend_from_slice(&flags.to_le_bytes());
    m.extend_from_slice(&size.to_le_bytes());
    m.extend_from_slice(body);
    m
}

/// A memfd of `size` bytes whose first bytes are `fill`.
pub fn memfd(size: u64, fill: &[u8]) -> OwnedFd {
    // SAFETY: memfd_create with a valid C string; checked below.
    let raw = unsafe { libc::memfd_create(c"vu-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(raw >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ftruncate/pwrite on our fd with a valid buffer.
    unsafe {
        assert!(
            libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) == 0,
            "ftruncate"
        );
        if !fill.is_empty() && size > 0 {
            let n = fill.len().min(size as usize);
            libc::pwrite(fd.as_raw_fd(), fill.as_ptr().cast(), n, 0);
        }
    }
    fd
}

pub fn eventfd() -> OwnedFd {
    // SAFETY: plain eventfd(2); checked below.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(raw >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd we own.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// A shared mapping of a memfd in this process (the probe's guest memory and log).
pub struct Shm {
    pub fd: OwnedFd,
    ptr: *mut u8,
    len: usize,
}

impl Shm {
    pub fn new(len: usize) -> Self {
        let fd = memfd(len as u64, &[]);
        // SAFETY: maps `len` bytes of our memfd (exactly its size); checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert!(ptr != libc::MAP_FAILED, "mmap");
        Shm {
            fd,
            ptr: ptr.cast(),
            len,
        }
    }

    pub fn write(&self, at: usize, b: &[u8]) {
        assert!(at + b.len() <= self.len);
        // SAFETY: in bounds of our mapping (checked).
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), self.ptr.add(at), b.len()) }
    }

    pub fn read(&self, at: usize, n: usize) -> Vec<u8> {
        assert!(at + n <= self.len);
        let mut v = vec![0u8; n];
        // SAFETY: in bounds of our mapping (checked); the backend writes it concurrently,
        // which for plain bytes read once is what a guest sees too.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(at), v.as_mut_ptr(), n) }
        v
    }

    pub fn u16_at(&self, at: usize) -> u16 {
        let b = self.read(at, 2);
        u16::from_le_bytes([b[0], b[1]])
    }
}

impl Drop for Shm {
    fn drop(&mut self) {
        // SAFETY: our mapping of `len` bytes.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// The frontend's end of the connection.
pub struct Conn {
    pub s: UnixStream,
    /// Bytes received and not yet parsed into replies.
    rx: Vec<u8>,
    /// Replies seen: (request, body).
    pub replies: Vec<(u32, Vec<u8>)>,
    /// The backend closed the connection.
    pub closed: bool,
    /// Every header so far told the truth about its body (the backend's reader and ours
    /// agree on message boundaries).
    pub honest: bool,
    /// Our copies of the kick eventfds sent, by ring index.
    pub kicks: Vec<(u8, OwnedFd)>,
}

impl Conn {
    pub fn connect(socket: &Path) -> UnixStream {
        let t0 = Instant::now();
        loop {
            match UnixStream::connect(socket) {
                Ok(s) => return s,
                Err(e) => {
                    assert!(
                        t0.elapsed() < BOUND,
                        "the backend did not listen on {} within {BOUND:?}: {e}",
                        socket.display()
                    );
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        }
    }

    pub fn new(s: UnixStream) -> Self {
        Conn {
            s,
            rx: Vec::new(),
            replies: Vec::new(),
            closed: false,
            honest: true,
            kicks: Vec::new(),
        }
    }

    /// Sends `bytes` with `fds` attached to the first byte.
    pub fn send(&mut self, bytes: &[u8], fds: &[RawFd]) {
        if self.closed {
            return;
        }
        let r = if fds.is_empty() {
            (&self.s).write_all(bytes).map(|_| bytes.len())
        } else {
            self.s
                .send_with_fds(&[bytes], fds)
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
        };
        match r {
            Ok(n) if n < bytes.len() => {
                if (&self.s).write_all(&bytes[n..]).is_err() {
                    self.closed = true;
                }
            }
            Ok(_) => {}
            Err(_) => self.closed = true,
        }
    }

    /// Takes what has arrived within `wait` (none: only what is there now) and parses
    /// complete replies; received descriptors are closed.
    pub fn pump(&mut self, wait: Option<Duration>) {
        if self.closed {
            return;
        }
        let deadline = wait.map(|w| Instant::now() + w);
        loop {
            let timeout_ms = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()).as_millis() as i32,
                None => 0,
            };
            let mut pfd = libc::pollfd {
                fd: self.s.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
            if n <= 0 {
                return;
            }
            let mut buf = [0u8; 8192];
            let mut raw = [-1 as RawFd; 8];
            let mut iov = [libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            }];
            // SAFETY: the iovec points into `buf`, writable for its length.
            let r = unsafe { self.s.recv_with_fds(&mut iov, &mut raw) };
            match r {
                Ok((0, _)) | Err(_) => {
                    self.closed = true;
                    return;
                }
                Ok((n, nfds)) => {
                    for &fd in raw.iter().take(nfds) {
                        // SAFETY: recvmsg handed us this descriptor; we close it.
                        drop(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                    self.rx.extend_from_slice(&buf[..n]);
                    while self.rx.len() >= HDR {
                        let size =
                            u32::from_le_bytes([self.rx[8], self.rx[9], self.rx[10], self.rx[11]])
                                as usize;
                        if self.rx.len() < HDR + size {
                            break;
                        }
                        let req = u32::from_le_bytes([self.rx[0], self.rx[1], self.rx[2], self.rx[3]]);
                        let body = self.rx[HDR..HDR + size].to_vec();
                        self.rx.drain(..HDR + size);
                        self.replies.push((req, body));
                    }
                    if deadline.is_none() {
                        continue;
                    }
                    return;
                }
            }
        }
    }

    /// Waits for a reply to `req`; `None` when the backend closed the connection or nothing
    /// came within `wait`.
    pub fn reply(&mut self, req: u32, wait: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(i) = self.replies.iter().position(|r| r.0 == req) {
                let r = self.replies.remove(i).1;
                self.replies.drain(..i);
                return Some(r);
            }
            if self.closed {
                return None;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.pump(Some(left));
        }
    }

    /// A request whose header tells the truth, with fds.
    pub fn request(&mut self, req: u32, flags: u32, body: &[u8], fds: &[RawFd]) {
        self.send(&encode(req, flags, body.len() as u32, body), fds);
    }

    /// GET_FEATURES and its answer: `None` when the connection is gone (or, with lying
    /// headers before, when the backend is still reading a body we never sent).
    pub fn sync(&mut self) -> Option<u64> {
        if self.closed {
            return None;
        }
        self.request(GET_FEATURES, FLAG_VERSION, &[], &[]);
        let wait = if self.honest {
            BOUND
        } else {
            Duration::from_millis(50)
        };
        let r = self.reply(GET_FEATURES, wait);
        match r {
            Some(b) if b.len() >= 8 => Some(u64::from_le_bytes(b[..8].try_into().ok()?)),
            Some(_) => None,
            None => {
                assert!(
                    self.closed || !self.honest,
                    "the backend did not answer GET_FEATURES within {BOUND:?} (connection open, \
                     every message so far well-framed)"
                );
                None
            }
        }
    }

    /// Sends with NEED_REPLY and returns the u64 ack (0 = success), `None` if none came.
    fn acked(&mut self, req: u32, body: &[u8], fds: &[RawFd]) -> Option<u64> {
        self.request(req, FLAG_VERSION | FLAG_NEED_REPLY, body, fds);
        let r = self.reply(req, BOUND)?;
        Some(u64::from_le_bytes(r.get(..8)?.try_into().ok()?))
    }
}

fn u32s(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn u64s(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn vring_state(index: u32, num: u32) -> Vec<u8> {
    u32s(&[index, num])
}

fn vring_addr(index: u32, flags: u32, desc: u64, used: u64, avail: u64, log: u64) -> Vec<u8> {
    let mut b = u32s(&[index, flags]);
    b.extend(u64s(&[desc, used, avail, log]));
    b
}

fn region(gpa: u64, size: u64, uaddr: u64, off: u64) -> Vec<u8> {
    u64s(&[gpa, size, uaddr, off])
}

/// Where the probe puts things in its guest memory.
const P_DESC: u64 = 0x0;
const P_AVAIL: u64 = 0x1000;
const P_USED: u64 = 0x2000;
const P_BUFS: u64 = 0x3000;
const P_MEM: usize = 0x10000;
const P_UADDR: u64 = 0x7f00_0000_0000;

fn pick_index(u: &mut Unstructured<'_>, t: &Target) -> Result<u32> {
    Ok(match u.int_in_range(0..=5u8)? {
        0..=2 => u.int_in_range(0..=t.num_queues.saturating_sub(1))?,
        3 => t.num_queues,
        4 => *u.choose(&[255, 256, 0x100 | 1, u32::MAX, 0x8000_0000])?,
        _ => u.arbitrary()?,
    })
}

fn pick_u64(u: &mut Unstructured<'_>) -> Result<u64> {
    Ok(match u.int_in_range(0..=7u8)? {
        0 => 0,
        1 => P_UADDR + u.int_in_range(0..=0x1_0000u64)?,
        2 => u.int_in_range(0..=0x2_0000u64)?,
        3 => u64::MAX - u.int_in_range(0..=0x1000u64)?,
        4 => 1u64 << u.int_in_range(0..=63u32)?,
        5 => 0x1000 * u.int_in_range(0..=64u64)?,
        _ => u.arbitrary()?,
    })
}

fn pick_size(u: &mut Unstructured<'_>) -> Result<u64> {
    Ok(match u.int_in_range(0..=7u8)? {
        0 => 0,
        1 => 0x1000,
        2 => 0x1_0000,
        3 => 0x1000 * u.int_in_range(1..=32u64)?,
        4 => u.int_in_range(1..=0x1fffu64)?,
        5 => 1u64 << u.int_in_range(0..=47u32)?,
        6 => u64::MAX - u.int_in_range(0..=0xfffu64)?,
        _ => u.arbitrary()?,
    })
}

/// A memfd size: usually small, sometimes empty or shorter than the region that names it.
fn pick_fd_size(u: &mut Unstructured<'_>) -> Result<u64> {
    Ok(match u.int_in_range(0..=4u8)? {
        0 => 0,
        1 => 0x1000,
        2 => 0x1_0000,
        3 => 0x1000 * u.int_in_range(1..=64u64)?,
        _ => u.int_in_range(1..=0x4_0000u64)?,
    })
}

/// One region for SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG and its memfd.
fn pick_region(u: &mut Unstructured<'_>) -> Result<(Vec<u8>, OwnedFd)> {
    let gpa = match u.int_in_range(0..=3u8)? {
        0 => 0,
        1 => 0x1000 * u.int_in_range(0..=64u64)?,
        _ => pick_u64(u)?,
    };
    let size = pick_size(u)?;
    let uaddr = match u.int_in_range(0..=2u8)? {
        0 => P_UADDR.wrapping_add(gpa),
        _ => pick_u64(u)?,
    };
    let off = match u.int_in_range(0..=3u8)? {
        0 | 1 => 0,
        2 => 0x1000 * u.int_in_range(0..=16u64)?,
        _ => pick_u64(u)?,
    };
    let fill_len = u.int_in_range(0..=64usize)?;
    let fill = u.bytes(fill_len)?.to_vec();
    let fd = memfd(pick_fd_size(u)?, &fill);
    Ok((region(gpa, size, uaddr, off), fd))
}

/// Which descriptors to attach: `want` of the right kind, sometimes none or extra.
fn fds_for(u: &mut Unstructured<'_>, want: usize, kind: u8) -> Result<Vec<OwnedFd>> {
    let n = match u.int_in_range(0..=9u8)? {
        0 => 0,
        1 => want + 1,
        2 => u.int_in_range(0..=4usize)?,
        _ => want,
    };
    (0..n)
        .map(|_| {
            Ok(match (kind, u.int_in_range(0..=7u8)?) {
                (_, 0) => eventfd(),
                (_, 1) => memfd(pick_fd_size(u)?, &[]),
                (0, _) => eventfd(),
                (1, _) => memfd(pick_fd_size(u)?, &[]),
                _ => {
                    let (a, _b) = UnixStream::pair().map_err(|_| {
                        libfuzzer_sys::arbitrary::Error::IncorrectFormat
                    })?;
                    OwnedFd::from(a)
                }
            })
        })
        .collect()
}

/// Sends one fuzzer-chosen message.
fn message(u: &mut Unstructured<'_>, c: &mut Conn, t: &Target) -> Result<()> {
    let req = match u.int_in_range(0..=9u8)? {
        0 => u.arbitrary()?,
        _ => *u.choose(KNOWN)?,
    };
    let mut fds: Vec<OwnedFd> = Vec::new();
    let body: Vec<u8> = match req {
        SET_FEATURES | SET_PROTOCOL_FEATURES | SET_STATUS | SEND_RARP | NET_SET_MTU => {
            let v = match u.int_in_range(0..=3u8)? {
                0 => u.arbitrary()?,
                1 if req == SET_FEATURES => {
                    F_VERSION_1 | F_PROTOCOL_FEATURES | (u.arbitrary::<u64>()? & (F_RING_EVENT_IDX | F_LOG_ALL))
                }
                1 if req == SET_PROTOCOL_FEATURES => u.arbitrary::<u64>()? & 0xf_ffff,
                _ => u.int_in_range(0..=0xffu64)?,
            };
            u64s(&[v])
        }
        SET_MEM_TABLE => {
            let n = u.int_in_range(0..=4u32)?;
            let num = match u.int_in_range(0..=7u8)? {
                0 => u.arbitrary()?,
                1 => n + 1,
                _ => n,
            };
            let mut b = u32s(&[num, 0]);
            for _ in 0..n {
                let (r, fd) = pick_region(u)?;
                b.extend(r);
                fds.push(fd);
            }
            if u.int_in_range(0..=7u8)? == 0 {
                fds = fds_for(u, n as usize, 1)?;
            }
            b
        }
        ADD_MEM_REG | REM_MEM_REG => {
            let (r, fd) = pick_region(u)?;
            let mut b = u64s(&[0]);
            b.extend(r);
            if req == ADD_MEM_REG || u.int_in_range(0..=3u8)? == 0 {
                fds.push(fd);
            }
            b
        }
        SET_LOG_BASE => {
            let size = match u.int_in_range(0..=3u8)? {
                0 => u.int_in_range(0..=64u64)?,
                1 => pick_size(u)?,
                _ => u.int_in_range(1..=0x2000u64)?,
            };
            let mut off = match u.int_in_range(0..=3u8)? {
                0 | 1 => 0,
                _ => pick_u64(u)?,
            };
            let mut fd_size = pick_fd_size(u)?;
            if !t.short_log_guarded && std::env::var_os("FUZZ_SHORT_LOG").is_none() {
                // A log past its memfd's end is the open upstream SIGBUS (see the README):
                // such logs only with FUZZ_SHORT_LOG set.
                let mut size = size;
                if off.checked_add(size).is_none_or(|end| end > 1 << 24) {
                    off = 0;
                    size = size.min(1 << 24);
                }
                fd_size = fd_size.max(off + size);
                fds.push(memfd(fd_size, &[]));
                u64s(&[size, off])
            } else {
                fds.push(memfd(fd_size, &[]));
                u64s(&[size, off])
            }
        }
        SET_LOG_FD => {
            fds.push(eventfd());
            Vec::new()
        }
        SET_VRING_NUM | SET_VRING_BASE | GET_VRING_BASE | SET_VRING_ENABLE => {
            let num = match u.int_in_range(0..=4u8)? {
                0 => u.arbitrary()?,
                1 => u32::from(t.max_queue_size) + u.int_in_range(0..=1u32)?,
                2 => u.int_in_range(0..=1u32)?,
                _ => 1 << u.int_in_range(0..=16u32)?,
            };
            vring_state(pick_index(u, t)?, num)
        }
        SET_VRING_ADDR => {
            let flags = if u.ratio(1, 8)? { u.arbitrary()? } else { 0 };
            vring_addr(
                pick_index(u, t)?,
                flags,
                pick_u64(u)?,
                pick_u64(u)?,
                pick_u64(u)?,
                pick_u64(u)?,
            )
        }
        SET_VRING_KICK | SET_VRING_CALL | SET_VRING_ERR => {
            let idx = u64::from(pick_index(u, t)?);
            let nofd = u.ratio(1, 6)?;
            let v = if nofd { idx | 0x100 } else { idx & 0xff };
            if !nofd || u.ratio(1, 4)? {
                let e = eventfd();
                if req == SET_VRING_KICK
                    && let Ok(dup) = e.try_clone()
                {
                    c.kicks.push((v as u8, dup));
                }
                fds.push(e);
            }
            u64s(&[v])
        }
        GET_CONFIG | SET_CONFIG => {
            let off: u32 = match u.int_in_range(0..=3u8)? {
                0 => 0x100,
                1 => u.int_in_range(0..=0x120u32)?,
                2 => u.arbitrary()?,
                _ => u.int_in_range(0..=64u32)?,
            };
            let size: u32 = match u.int_in_range(0..=3u8)? {
                0 => u.int_in_range(0..=64u32)?,
                1 => u.int_in_range(0..=0x1010u32)?,
                2 => u.arbitrary()?,
                _ => *u.choose(&[1, 4, 6, 8, 60, 0x1000, 0x1000u32.wrapping_sub(off)])?,
            };
            let flags: u32 = if u.ratio(1, 6)? {
                u.arbitrary()?
            } else {
                u.int_in_range(0..=1u32)?
            };
            let mut b = u32s(&[off, size, flags]);
            let pay = if u.ratio(1, 4)? {
                u.int_in_range(0..=300usize)?
            } else {
                (size as usize).min(0x1100)
            };
            b.extend(u.bytes(pay.min(u.len()))?.iter().copied());
            b.resize(12 + pay, 0);
            b
        }
        SET_BACKEND_REQ_FD => {
            fds = fds_for(u, 1, 2)?;
            Vec::new()
        }
        GET_INFLIGHT_FD | SET_INFLIGHT_FD => {
            if req == SET_INFLIGHT_FD {
                fds.push(memfd(pick_fd_size(u)?, &[]));
            }
            let mut b = u64s(&[pick_size(u)?, pick_u64(u)?]);
            b.extend_from_slice(&u.arbitrary::<u16>()?.to_le_bytes());
            b.extend_from_slice(&u.arbitrary::<u16>()?.to_le_bytes());
            b.extend_from_slice(&[0; 4]);
            b
        }
        SET_DEVICE_STATE_FD => {
            fds = fds_for(u, 1, 2)?;
            u32s(&[u.int_in_range(0..=2u32)?, u.int_in_range(0..=2u32)?])
        }
        _ => {
            let n = u.int_in_range(0..=48usize)?;
            u.bytes(n.min(u.len()))?.to_vec()
        }
    };
    if req != SET_MEM_TABLE
        && req != SET_BACKEND_REQ_FD
        && req != SET_DEVICE_STATE_FD
        && u.ratio(1, 12)?
    {
        fds.extend(fds_for(u, 1, 0)?);
    }
    let flags = match u.int_in_range(0..=9u8)? {
        0 => u.arbitrary()?,
        1 => FLAG_VERSION | FLAG_REPLY,
        2..=4 => FLAG_VERSION | FLAG_NEED_REPLY,
        5 => 0,
        _ => FLAG_VERSION,
    };
    // The body as sent and the size the header claims: usually the truth, sometimes cut,
    // padded or a lie.
    let mut body = body;
    let mut size = body.len() as u32;
    match u.int_in_range(0..=15u8)? {
        0 => {
            let cut = u.int_in_range(0..=body.len())?;
            body.truncate(cut);
            size = cut as u32;
        }
        1 => {
            let extra = u.int_in_range(1..=16usize)?;
            body.resize(body.len() + extra, 0);
            size = body.len() as u32;
        }
        2 => {
            size = match u.int_in_range(0..=2u8)? {
                0 => size.saturating_add(u.int_in_range(1..=16u32)?),
                1 => size.saturating_sub(u.int_in_range(1..=8u32)?),
                _ => u.arbitrary()?,
            };
            if size as usize != body.len() {
                c.honest = false;
            }
        }
        _ => {}
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    if debug() {
        eprintln!(
            "msg req={req} flags={flags:#x} size={size} body={} fds={} {:02x?}",
            body.len(),
            raw.len(),
            &body[..body.len().min(48)]
        );
    }
    c.send(&encode(req, flags, size, &body), &raw);
    Ok(())
}

/// The whole set-up of one ring, then one request on it. Returns early (no verdict) when the
/// backend refused a step or the connection is gone: earlier messages may have made that
/// legitimate. Panics when every step was acknowledged but the request never completed.
fn probe(u: &mut Unstructured<'_>, c: &mut Conn, t: &Target) -> Result<()> {
    // After a header that lied, the backend may be waiting for body bytes that never come (or
    // parse ours from the middle): no verdict, and no 20 s waits for replies.
    if !c.honest {
        return Ok(());
    }
    let Some(offered) = c.sync() else {
        return Ok(());
    };
    let event_idx = u.arbitrary::<bool>()?;
    let log = u.arbitrary::<bool>()?;
    let gpa: u64 = *u.choose(&[0, 0x10_0000, 0x4000_0000])?;
    // A memory region (or dirty log) longer than the memfd behind it: touching the part past
    // the file's end is SIGBUS, so the backend must refuse it.
    let short_mem = u.ratio(1, 8)?;
    let short_log = log && u.ratio(1, 4)? && (t.short_log_guarded || std::env::var_os("FUZZ_SHORT_LOG").is_some());
    // At least as many descriptors as the probe chain has (3).
    let qsize = *u.choose(&[4u16, 8, 16, 256])?.min(&t.max_queue_size);
    let mut feat = F_VERSION_1 | F_PROTOCOL_FEATURES;
    if event_idx {
        feat |= F_RING_EVENT_IDX;
    }
    if log {
        feat |= F_LOG_ALL;
    }
    feat &= offered | F_PROTOCOL_FEATURES;
    let pf = PF_REPLY_ACK | PF_LOG_SHMFD | PF_CONFIG | PF_MQ;
    if debug() {
        eprintln!(
            "probe gpa={gpa:#x} qsize={qsize} event_idx={event_idx} log={log} short_mem={short_mem} short_log={short_log}"
        );
    }
    // The ring may be running from earlier messages: stop it first (ignore the answer).
    c.request(
        GET_VRING_BASE,
        FLAG_VERSION,
        &vring_state(t.probe_queue, 0),
        &[],
    );
    if c.reply(GET_VRING_BASE, BOUND).is_none() {
        return Ok(());
    }
    // REPLY_ACK works once both are set, so these two go without NEED_REPLY.
    c.request(SET_FEATURES, FLAG_VERSION, &u64s(&[feat]), &[]);
    c.request(SET_PROTOCOL_FEATURES, FLAG_VERSION, &u64s(&[pf]), &[]);
    if c.acked(SET_OWNER, &[], &[]) != Some(0) {
        return Ok(());
    }
    let mem = Shm::new(P_MEM);
    let mut table = u32s(&[1, 0]);
    let declared = if short_mem { 2 * P_MEM } else { P_MEM } as u64;
    table.extend(region(gpa, declared, P_UADDR, 0));
    if c.acked(SET_MEM_TABLE, &table, &[mem.fd.as_raw_fd()]) != Some(0) {
        return Ok(());
    }
    if short_mem {
        // The used ring past the memfd's end: the backend reads it on SET_VRING_ADDR.
        let q = t.probe_queue;
        let _ = c.acked(SET_VRING_NUM, &vring_state(q, u32::from(qsize)), &[]);
        let _ = c.acked(
            SET_VRING_ADDR,
            &vring_addr(
                q,
                0,
                P_UADDR + P_DESC,
                P_UADDR + P_MEM as u64 + P_USED,
                P_UADDR + P_AVAIL,
                0,
            ),
            &[],
        );
        panic!("probe: a memory region twice as long as its memfd was accepted");
    }
    // One bit per 4 KiB page of guest-physical space up to the end of our memory.
    let log_len = ((gpa as usize + P_MEM) / 0x1000).div_ceil(8).max(1);
    let logmem = Shm::new(log_len.next_multiple_of(0x1000));
    if log {
        // With `short_log`, a one-page memfd behind a log declared as long as needed.
        let short = memfd(0x1000, &[]);
        let fd = if short_log { &short } else { &logmem.fd };
        c.request(
            SET_LOG_BASE,
            FLAG_VERSION,
            &u64s(&[logmem.len as u64, 0]),
            &[fd.as_raw_fd()],
        );
        if c.reply(SET_LOG_BASE, BOUND).is_none() {
            return Ok(());
        }
        // FUZZ_SHORT_LOG=continue goes on to the request (to see what the backend does).
        assert!(
            !short_log
                || logmem.len <= 0x1000
                || std::env::var("FUZZ_SHORT_LOG").as_deref() == Ok("continue"),
            "probe: a dirty log of {:#x} bytes over a one-page memfd was accepted",
            logmem.len
        );
    }
    let q = t.probe_queue;
    if c.acked(SET_VRING_NUM, &vring_state(q, u32::from(qsize)), &[]) != Some(0)
        || c.acked(
            SET_VRING_ADDR,
            &vring_addr(
                q,
                0,
                P_UADDR + P_DESC,
                P_UADDR + P_USED,
                P_UADDR + P_AVAIL,
                0,
            ),
            &[],
        ) != Some(0)
        || c.acked(SET_VRING_BASE, &vring_state(q, 0), &[]) != Some(0)
    {
        return Ok(());
    }
    let call = eventfd();
    let kick = eventfd();
    if c.acked(SET_VRING_CALL, &u64s(&[u64::from(q)]), &[call.as_raw_fd()]) != Some(0)
        || c.acked(SET_VRING_KICK, &u64s(&[u64::from(q)]), &[kick.as_raw_fd()]) != Some(0)
        || c.acked(SET_VRING_ENABLE, &vring_state(q, 1), &[]) != Some(0)
    {
        return Ok(());
    }
    // The request: one chain, its buffers one after the other from P_BUFS.
    let bufs = (t.probe_bufs)(feat);
    let mut at = P_BUFS;
    let mut places = Vec::new();
    for (i, (b, writable)) in bufs.iter().enumerate() {
        let mut flags = 0u16;
        if i + 1 < bufs.len() {
            flags |= 1;
        }
        if *writable {
            flags |= 2;
        }
        mem.write(at as usize, b);
        let mut d = (gpa + at).to_le_bytes().to_vec();
        d.extend((b.len() as u32).to_le_bytes());
        d.extend(flags.to_le_bytes());
        d.extend(((i + 1) as u16).to_le_bytes());
        mem.write((P_DESC + 16 * i as u64) as usize, &d);
        places.push((at as usize, b.len(), *writable));
        at += (b.len() as u64).next_multiple_of(16);
    }
    // avail: flags 0, idx 1, ring[0] = 0 (head); used_event after the ring.
    mem.write(P_AVAIL as usize + 4, &0u16.to_le_bytes());
    std::sync::atomic::fence(Ordering::SeqCst);
    mem.write(P_AVAIL as usize + 2, &1u16.to_le_bytes());
    std::sync::atomic::fence(Ordering::SeqCst);
    // SAFETY: an 8-byte write to our eventfd.
    unsafe { libc::write(kick.as_raw_fd(), 1u64.to_le_bytes().as_ptr().cast(), 8) };
    let t0 = Instant::now();
    while mem.u16_at(P_USED as usize + 2) == 0 {
        if t0.elapsed() > BOUND {
            // The connection may have been dropped by the backend in the meantime (a reply
            // we did not wait for): only an open connection makes this a hang.
            c.pump(None);
            assert!(
                c.closed,
                "probe: a request on ring {q} (size {qsize}, event_idx {event_idx}, log {log}, \
                 guest memory at {gpa:#x}) did not complete within {BOUND:?}, every set-up \
                 message acknowledged"
            );
            return Ok(());
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    std::sync::atomic::fence(Ordering::SeqCst);
    let id = mem.read(P_USED as usize + 4, 4);
    assert_eq!(id, [0, 0, 0, 0], "probe: used entry names another chain");
    let written: Vec<Vec<u8>> = places
        .iter()
        .filter(|p| p.2)
        .map(|p| mem.read(p.0, p.1))
        .collect();
    if let Err(e) = (t.probe_check)(&written) {
        panic!("probe: {e}");
    }
    if log && !short_log {
        let page = ((gpa + P_USED) / 0x1000) as usize;
        let byte = logmem.read(page / 8, 1)[0];
        assert!(
            byte & (1 << (page % 8)) != 0,
            "probe: the used ring (guest page {page:#x}) was written but not marked in the dirty log"
        );
    }
    if debug() {
        eprintln!("probe ok");
    }
    Ok(())
}

/// Runs one session from the fuzz input over a fresh connection to `socket`; `stop` is set
/// once the backend has taken the connection (so that its serving loop ends after it).
pub fn session(data: &[u8], socket: &Path, t: &Target, stop: &AtomicBool) {
    let mut u = Unstructured::new(data);
    let mut c = Conn::new(Conn::connect(socket));
    // The backend has accepted us once it answers.
    let first = c.sync();
    stop.store(true, Ordering::Relaxed);
    assert!(
        first.is_some(),
        "the backend did not answer the first GET_FEATURES"
    );
    let _ = run_ops(&mut u, &mut c, t);
    if debug() {
        eprintln!("closing the connection");
    }
    let _ = c.s.shutdown(std::net::Shutdown::Both);
}

thread_local! {
    static START: Instant = Instant::now();
}

fn run_ops(u: &mut Unstructured<'_>, c: &mut Conn, t: &Target) -> Result<()> {
    let mut ops = 0;
    while !u.is_empty() && ops < 64 && !c.closed {
        ops += 1;
        let op = u.int_in_range(0..=19u8)?;
        if debug() {
            eprintln!("op {op} at {:?}", START.with(|s| s.elapsed()));
        }
        match op {
            0..=13 => message(u, c, t)?,
            14 => {
                // Raw bytes: a header and whatever follows.
                let n = u.int_in_range(0..=64usize)?;
                let b = u.bytes(n.min(u.len()))?.to_vec();
                c.honest = false;
                c.send(&b, &[]);
            }
            15 => {
                // Close in the middle of a message.
                let req = *u.choose(KNOWN)?;
                let size = u.int_in_range(1..=300u32)?;
                let sent = u.int_in_range(0..=size as usize + HDR - 1)?;
                let mut m = encode(req, FLAG_VERSION, size, &vec![0u8; size as usize]);
                m.truncate(sent);
                c.send(&m, &[]);
                return Ok(());
            }
            16 => {
                if !c.kicks.is_empty() {
                    let i = u.choose_index(c.kicks.len())?;
                    // SAFETY: an 8-byte write to our eventfd.
                    unsafe {
                        libc::write(
                            c.kicks[i].1.as_raw_fd(),
                            1u64.to_le_bytes().as_ptr().cast(),
                            8,
                        )
                    };
                }
            }
            17 => {
                let _ = c.sync();
            }
            _ => probe(u, c, t)?,
        }
        c.pump(None);
    }
    Ok(())
}

/// Waits for the serving thread's end (it sends on `rx` when it returns); a hang is a bug.
pub fn join_within<T: std::fmt::Debug>(rx: &Receiver<T>, what: &str) -> T {
    let t0 = Instant::now();
    match rx.recv_timeout(BOUND) {
        Ok(v) => {
            if debug() {
                eprintln!("serve returned after {:?}", t0.elapsed());
            }
            v
        }
        Err(RecvTimeoutError::Timeout) => panic!(
            "{what}: the serving thread did not return within {BOUND:?} after the frontend closed the connection"
        ),
        Err(RecvTimeoutError::Disconnected) => {
            panic!("{what}: the serving thread ended without a result (it panicked)")
        }
    }
}

/// With `FUZZ_DEBUG_FDS` set: reports descriptors this input left open (a leak check).
pub fn fd_report(data: &[u8]) {
    use std::sync::Mutex;
    static LAST: Mutex<Option<Vec<String>>> = Mutex::new(None);
    if std::env::var_os("FUZZ_DEBUG_FDS").is_none() {
        return;
    }
    let now: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|p| p.display().to_string())
                .collect()
        })
        .unwrap_or_default();
    let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(prev) = last.as_ref()
        && now.len() > prev.len()
    {
        let threads = std::fs::read_dir("/proc/self/task").map(|d| d.count()).unwrap_or(0);
        let mut new = now.clone();
        for p in prev {
            if let Some(i) = new.iter().position(|x| x == p) {
                new.remove(i);
            }
        }
        eprintln!(
            "FDS {} -> {} (threads {threads}) after {data:02x?}: {new:?}",
            prev.len(),
            now.len()
        );
    }
    *last = Some(now);
}
