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

use super::proto::{CMD_WRITE, REQUEST_LEN, Request};

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

/// A request taken whole off the socket: its header and, for a WRITE, its data.
pub type TakenRequest = ([u8; REQUEST_LEN], Option<Vec<u8>>);

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

    /// Takes the next request off the socket without waiting, if the whole of it (header and,
    /// for a WRITE of at most `max_payload` bytes, its data) and nothing more has arrived;
    /// None leaves the socket as it was (nothing or a partial request arrived, more than one
    /// request, a larger write or a bad header: the caller's normal read path handles those).
    /// For a connection's reader that just saw bytes arrive while polling and has nothing
    /// buffered: one `recvmsg` instead of a trip through the runtime's readiness (an `epoll_wait`, a task wake-up and the reads),
    /// which on the bench host was 3-5 µs of the secondary's share of a replicated write.
    /// Only the connection's reader may call this (it consumes bytes).
    pub fn take_request(&self, max_payload: u32) -> io::Result<Option<TakenRequest>> {
        let mut hdr = [0u8; REQUEST_LEN];
        // SAFETY: recv of at most REQUEST_LEN bytes into a local buffer of that length, on an
        // fd this writer owns; MSG_PEEK leaves the data in the socket.
        let n = unsafe {
            libc::recv(
                self.raw,
                hdr.as_mut_ptr().cast(),
                REQUEST_LEN,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n != REQUEST_LEN as isize {
            return Ok(None);
        }
        let Ok(req) = Request::parse(&hdr) else {
            return Ok(None);
        };
        let payload_len = match req.cmd {
            CMD_WRITE if req.len > max_payload => return Ok(None),
            CMD_WRITE => req.len as usize,
            _ => 0,
        };
        // Exactly this request: a client with more requests in flight is left to the buffered
        // path, which reads them together (and so runs them in parallel).
        let mut avail: libc::c_int = 0;
        // SAFETY: FIONREAD stores one int (the bytes waiting to be read) through the pointer,
        // which points to a local int.
        let r = unsafe { libc::ioctl(self.raw, libc::FIONREAD, &mut avail) };
        if r < 0 || usize::try_from(avail).ok() != Some(REQUEST_LEN + payload_len) {
            return Ok(None);
        }
        // Everything has arrived and this thread is the only reader: read it all.
        let mut payload: Vec<u8> = Vec::with_capacity(payload_len);
        let mut got_hdr = 0usize;
        while got_hdr < REQUEST_LEN || payload.len() < payload_len {
            let spare = payload.spare_capacity_mut();
            let mut iov = [
                libc::iovec {
                    iov_base: hdr[got_hdr..].as_mut_ptr().cast(),
                    iov_len: REQUEST_LEN - got_hdr,
                },
                libc::iovec {
                    iov_base: spare.as_mut_ptr().cast(),
                    iov_len: spare.len(),
                },
            ];
            let first = usize::from(got_hdr == REQUEST_LEN);
            let live = &mut iov[first..];
            // Mutable: the kernel writes `msg_flags` (and the lengths) back into it.
            let mut msg = libc::msghdr {
                msg_name: std::ptr::null_mut(),
                msg_namelen: 0,
                msg_iov: live.as_mut_ptr(),
                msg_iovlen: live.len() as _,
                msg_control: std::ptr::null_mut(),
                msg_controllen: 0,
                msg_flags: 0,
            };
            // SAFETY: the iovecs point into `hdr` past what was read and into the unused
            // capacity of `payload`, both live and writable for this call; recvmsg writes at
            // most their lengths.
            let n = unsafe { libc::recvmsg(self.raw, &mut msg, libc::MSG_DONTWAIT) };
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    // Cannot happen after FIONREAD said it all arrived; wait rather than
                    // lose the part already taken.
                    io::ErrorKind::WouldBlock => {
                        wait_readable(self.raw)?;
                        continue;
                    }
                    _ => return Err(e),
                }
            }
            let mut n = n as usize;
            let h = n.min(REQUEST_LEN - got_hdr);
            got_hdr += h;
            n -= h;
            // SAFETY: recvmsg initialised these `n` bytes of the spare capacity (the header's
            // iovec came first and took `h`), within the capacity of `payload_len`.
            unsafe { payload.set_len(payload.len() + n) };
        }
        Ok(Some((hdr, (req.cmd == CMD_WRITE).then_some(payload))))
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

/// Waits up to a second for `fd` to become readable; a timeout is an error (the caller was
/// told the data had arrived).
fn wait_readable(fd: libc::c_int) -> io::Result<()> {
    match poll_once(fd, libc::POLLIN)? {
        None => Err(io::Error::from(io::ErrorKind::TimedOut)),
        Some(rev) if rev & (libc::POLLERR | libc::POLLNVAL) != 0 => {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        Some(_) => Ok(()),
    }
}

/// Waits up to a second for room to write on `fd`; the caller retries after a timeout.
fn wait_writable(fd: libc::c_int) -> io::Result<()> {
    match poll_once(fd, libc::POLLOUT)? {
        Some(rev) if rev & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 => {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        _ => Ok(()),
    }
}

/// One `poll` of `fd` for `events`, up to a second: the returned events (none when a signal
/// interrupted it: the caller's retry polls again), None on a timeout.
fn poll_once(fd: libc::c_int, events: libc::c_short) -> io::Result<Option<libc::c_short>> {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut p, 1, 1000) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
        return Ok(Some(0));
    }
    Ok((r > 0).then_some(p.revents))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;
    use crate::nbd::proto::CMD_FLUSH;

    fn pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (c, s)
    }

    fn req(cmd: u16, len: u32) -> [u8; REQUEST_LEN] {
        Request {
            flags: 0,
            cmd,
            cookie: 7,
            offset: 4096,
            len,
        }
        .encode()
    }

    /// Waits until `n` bytes are readable on `s` (loopback delivery is quick but not instant).
    fn wait_avail(w: &SockWriter, n: usize) {
        for _ in 0..1000 {
            let mut avail: libc::c_int = 0;
            // SAFETY: FIONREAD stores one int through a pointer to a local int.
            unsafe { libc::ioctl(w.raw, libc::FIONREAD, &mut avail) };
            if avail as usize >= n {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        panic!("{n} bytes never arrived");
    }

    #[test]
    fn take_request_takes_exactly_one_whole_request_or_nothing() {
        let (mut c, mut s) = pair();
        let w = SockWriter::new(std::os::fd::AsFd::as_fd(&s)).unwrap();
        assert!(
            w.take_request(1 << 20).unwrap().is_none(),
            "nothing arrived"
        );

        // A whole WRITE: taken with its data.
        let data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        c.write_all(&req(CMD_WRITE, 5000)).unwrap();
        c.write_all(&data).unwrap();
        wait_avail(&w, REQUEST_LEN + 5000);
        let (hdr, payload) = w.take_request(1 << 20).unwrap().unwrap();
        assert_eq!(hdr, req(CMD_WRITE, 5000));
        assert_eq!(payload.unwrap(), data);

        // A partial WRITE is left in the socket, then taken once complete.
        c.write_all(&req(CMD_WRITE, 100)).unwrap();
        c.write_all(&data[..50]).unwrap();
        wait_avail(&w, REQUEST_LEN + 50);
        assert!(w.take_request(1 << 20).unwrap().is_none());
        c.write_all(&data[50..100]).unwrap();
        wait_avail(&w, REQUEST_LEN + 100);
        let (_, payload) = w.take_request(1 << 20).unwrap().unwrap();
        assert_eq!(payload.unwrap(), &data[..100]);

        // Larger than the limit, or two requests at once: left for the buffered path.
        c.write_all(&req(CMD_WRITE, 200)).unwrap();
        c.write_all(&data[..200]).unwrap();
        wait_avail(&w, REQUEST_LEN + 200);
        assert!(w.take_request(100).unwrap().is_none());
        c.write_all(&req(CMD_FLUSH, 0)).unwrap();
        wait_avail(&w, 2 * REQUEST_LEN + 200);
        assert!(w.take_request(1 << 20).unwrap().is_none());
        let mut rest = vec![0u8; 2 * REQUEST_LEN + 200];
        s.read_exact(&mut rest).unwrap();
        assert_eq!(rest[..REQUEST_LEN], req(CMD_WRITE, 200));
        assert_eq!(rest[REQUEST_LEN + 200..], req(CMD_FLUSH, 0));

        // A request without data is taken without a payload; a bad header is left alone.
        c.write_all(&req(CMD_FLUSH, 0)).unwrap();
        wait_avail(&w, REQUEST_LEN);
        assert_eq!(
            w.take_request(1 << 20).unwrap(),
            Some((req(CMD_FLUSH, 0), None))
        );
        c.write_all(&[0xAB; REQUEST_LEN]).unwrap();
        wait_avail(&w, REQUEST_LEN);
        assert!(w.take_request(1 << 20).unwrap().is_none());
    }
}
