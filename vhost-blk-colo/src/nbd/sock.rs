//! Writing NBD frames straight from the thread that has them.
//!
//! The tokio side of a connection keeps reading; a [`SockWriter`] holds a duplicate of the
//! socket's fd and writes whole frames (header and payload gathered with `writev`, no copy into
//! a frame buffer) under a mutex, so frames never interleave. This saves the hand-off to a
//! writer task, one thread wake-up per request: the NBD round trip is what COLO's primary adds
//! to every guest write. The fd is non-blocking (tokio's); a full socket buffer is waited out
//! with `poll`.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, OwnedFd},
    sync::Mutex,
};

/// Recent outcomes of a thread's polling before it sleeps (the NBD server after a lone inline
/// write, the direct client waiting for a reply), halved now and then so the rate follows the
/// recent past.
#[derive(Default)]
pub(crate) struct SpinStats {
    window: u32,
    hits: u32,
    tries: u32,
}

impl SpinStats {
    /// Spin while at least one spin in four paid off; probe every 64th time otherwise.
    pub(crate) fn should_spin(&mut self) -> bool {
        self.tries = self.tries.wrapping_add(1);
        self.hits * 4 >= self.window || self.tries.is_multiple_of(64)
    }

    /// Counts one spin; `hit`: data arrived while spinning.
    pub(crate) fn record(&mut self, hit: bool) {
        if self.window >= 256 {
            self.window /= 2;
            self.hits /= 2;
        }
        self.window += 1;
        self.hits += u32::from(hit);
    }
}

/// A thread-safe frame writer over a duplicated socket fd.
#[derive(Debug)]
pub struct SockWriter {
    fd: Mutex<OwnedFd>,
    /// The same fd, for peeking without the write lock (it lives as long as `fd`).
    raw: libc::c_int,
}

impl SockWriter {
    /// Duplicates `fd` (the connection's socket).
    pub fn new(fd: BorrowedFd<'_>) -> io::Result<Self> {
        let owned = fd.try_clone_to_owned()?;
        let raw = owned.as_raw_fd();
        Ok(SockWriter {
            fd: Mutex::new(owned),
            raw,
        })
    }

    /// Polls the socket for incoming bytes for up to `max` without sleeping, yielding the CPU
    /// between polls. True when something arrived (or the peer closed: the next read tells).
    pub fn spin_until_readable(&self, max: std::time::Duration) -> bool {
        let t0 = std::time::Instant::now();
        let mut b = [0u8; 1];
        loop {
            // SAFETY: recv of at most one byte into a local buffer, on an fd this writer owns;
            // MSG_PEEK leaves the data for the reader.
            let n = unsafe {
                libc::recv(
                    self.raw,
                    b.as_mut_ptr().cast(),
                    1,
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            if n >= 0 {
                return true;
            }
            let e = io::Error::last_os_error();
            if !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) {
                return true;
            }
            if t0.elapsed() >= max {
                return false;
            }
            std::thread::yield_now();
        }
    }

    /// Writes `parts` back to back as one frame.
    pub fn write_frame(&self, parts: &[&[u8]]) -> io::Result<()> {
        let fd = self
            .fd
            .lock()
            .map_err(|_| io::Error::other("socket writer lock poisoned"))?;
        let raw = fd.as_raw_fd();
        let mut iov: Vec<libc::iovec> = parts
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            })
            .collect();
        let mut first = 0;
        while first < iov.len() {
            let live = &iov[first..];
            let cnt = live.len().min(1024) as libc::c_int;
            // sendmsg rather than writev: MSG_NOSIGNAL turns a closed peer into EPIPE instead of
            // a SIGPIPE that would kill the process.
            let msg = libc::msghdr {
                msg_name: std::ptr::null_mut(),
                msg_namelen: 0,
                msg_iov: live.as_ptr() as *mut libc::iovec,
                msg_iovlen: cnt as _,
                msg_control: std::ptr::null_mut(),
                msg_controllen: 0,
                msg_flags: 0,
            };
            // SAFETY: `msg` references iovecs that point into `parts`, borrowed for this call;
            // sendmsg only reads them.
            let n = unsafe { libc::sendmsg(raw, &msg, libc::MSG_NOSIGNAL) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => {
                        wait_writable(raw)?;
                        continue;
                    }
                    _ => return Err(e),
                }
            }
            let mut n = n as usize;
            while n > 0 && first < iov.len() {
                let v = &mut iov[first];
                if n >= v.iov_len {
                    n -= v.iov_len;
                    first += 1;
                } else {
                    // SAFETY: advancing inside the same buffer by less than its length.
                    v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                    v.iov_len -= n;
                    n = 0;
                }
            }
        }
        Ok(())
    }

    /// Shuts down the sending direction (the peer sees end of file).
    pub fn shutdown_write(&self) {
        if let Ok(fd) = self.fd.lock() {
            // SAFETY: shutdown on a valid fd we own.
            unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) };
        }
    }
}

/// Socket buffer size asked for NBD connections: a few 1 MiB requests in flight fit, so a
/// large write is not cut into many small sends and wake-ups (loopback's default send buffer
/// starts at 16 KiB).
pub const SOCK_BUF: libc::c_int = 4 << 20;

/// Sets `SO_SNDBUF` and `SO_RCVBUF` (the kernel caps them at `net.core.[rw]mem_max`). Errors
/// are ignored: the defaults still work.
pub fn set_buffers(fd: BorrowedFd<'_>, bytes: libc::c_int) {
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: setsockopt on a valid fd with a pointer to an int and its size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&raw const bytes).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

fn wait_writable(fd: libc::c_int) -> io::Result<()> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut p, 1, 1000) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    if p.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
        return Err(io::Error::from(io::ErrorKind::BrokenPipe));
    }
    Ok(())
}
