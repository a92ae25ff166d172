//! Writing NBD frames straight from the thread that has them.
//!
//! The tokio side of a connection keeps reading; a [`SockWriter`] holds a duplicate of the
//! socket's fd and writes whole frames (header and payload gathered with `writev`, no copy into
//! a frame buffer) under a mutex, so frames never interleave. This saves the hand-off to a
//! writer task, one thread wake-up per request: the NBD round trip is what COLO's primary adds
//! to every guest write. The fd is non-blocking (tokio's); a full socket buffer is waited out
//! with `poll`.
//!
//! Reading stays with the runtime, except while the server polls for a client's next request
//! (see [`SockWriter::spin_receive`]): what arrives then is received into a [`Carry`], which
//! the connection's reader ([`Carried`]) yields first.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, OwnedFd},
    pin::Pin,
    sync::Mutex,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, ReadBuf};

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

/// Bytes a connection's reader took off the socket outside the runtime (while polling), to be
/// read before anything else the socket holds.
#[derive(Debug)]
pub struct Carry {
    buf: Vec<u8>,
    pos: usize,
    /// A receive error met while polling, for the reader's next read (a socket reports an
    /// error such as a reset only once).
    error: Option<io::Error>,
    /// The peer closed while polling.
    eof: bool,
}

impl Carry {
    /// A carry that receives up to `capacity` bytes at a time.
    pub fn new(capacity: usize) -> Self {
        Carry {
            buf: Vec::with_capacity(capacity),
            pos: 0,
            error: None,
            eof: false,
        }
    }

    /// Nothing carried: every byte received so far has been read, and no end or error waits.
    pub fn is_empty(&self) -> bool {
        self.pos == self.buf.len() && self.error.is_none() && !self.eof
    }

    /// The carried bytes when they are exactly one whole request: its header and, for a WRITE,
    /// its data, borrowed (a request that arrived alone runs without being copied). None when
    /// the carry holds less, more, or a header that does not parse.
    pub fn lone_request(&self) -> Option<(Request, Option<&[u8]>)> {
        let bytes = self.buf.get(self.pos..)?;
        let hdr: &[u8; REQUEST_LEN] = bytes.get(..REQUEST_LEN)?.try_into().ok()?;
        let req = Request::parse(hdr).ok()?;
        let rest = &bytes[REQUEST_LEN..];
        match req.cmd {
            CMD_WRITE if rest.len() == req.len as usize => Some((req, Some(rest))),
            CMD_WRITE => None,
            _ if rest.is_empty() => Some((req, None)),
            _ => None,
        }
    }

    /// Drops the carried bytes (after [`Carry::lone_request`] ran them).
    pub fn clear(&mut self) {
        self.pos = self.buf.len();
    }

    /// One non-blocking receive into the free capacity (only when the carry is drained). Some
    /// when bytes, the end or an error came; None when nothing was waiting.
    fn receive(&mut self, fd: libc::c_int) -> Option<()> {
        if !self.is_empty() {
            return Some(());
        }
        self.buf.clear();
        self.pos = 0;
        let spare = self.buf.spare_capacity_mut();
        if spare.is_empty() {
            // A zero-length receive would read as the peer's close.
            return None;
        }
        // SAFETY: recv of at most `spare.len()` bytes into the vector's unused capacity, which
        // is live and writable for this call, on a socket fd the caller owns.
        let n = unsafe {
            libc::recv(
                fd,
                spare.as_mut_ptr().cast(),
                spare.len(),
                libc::MSG_DONTWAIT,
            )
        };
        match n {
            0 => self.eof = true,
            n if n > 0 => {
                // SAFETY: recv initialised these `n` bytes (at most the spare capacity).
                unsafe { self.buf.set_len(n as usize) };
            }
            _ => {
                let e = io::Error::last_os_error();
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) {
                    return None;
                }
                self.error = Some(e);
            }
        }
        Some(())
    }
}

/// A reader that yields a [`Carry`]'s bytes (then its end or error) before its inner reader's.
#[derive(Debug)]
pub struct Carried<R> {
    /// What was received outside the runtime.
    pub carry: Carry,
    inner: R,
}

impl<R> Carried<R> {
    /// Wraps `inner` with an empty carry of `capacity` bytes.
    pub fn new(inner: R, capacity: usize) -> Self {
        Carried {
            carry: Carry::new(capacity),
            inner,
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Carried<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let c = &mut this.carry;
        if c.pos < c.buf.len() {
            let n = out.remaining().min(c.buf.len() - c.pos);
            out.put_slice(&c.buf[c.pos..c.pos + n]);
            c.pos += n;
            return Poll::Ready(Ok(()));
        }
        if let Some(e) = c.error.take() {
            return Poll::Ready(Err(e));
        }
        if c.eof {
            // Leaves `out` unfilled: end of file.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, out)
    }
}

/// A thread-safe frame writer over a duplicated socket fd.
#[derive(Debug)]
pub struct SockWriter {
    fd: Mutex<OwnedFd>,
    /// The same fd, for the connection's reader to receive on while polling, without the write
    /// lock (it lives as long as `fd`).
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

    /// Polls the socket for up to `max` without sleeping, yielding the CPU between polls, and
    /// receives what arrives into `carry` (which the caller's reader then yields before the
    /// socket's next bytes, see [`Carried`]). True when something arrived, or the peer closed
    /// or failed (the next read tells). Each poll is one non-blocking `recv` of up to
    /// `carry`'s free capacity, so a request caught here costs no further system call: a peek
    /// followed by reads cost two or three more per request, 2-4 µs of the secondary's share
    /// of a replicated write on the bench host. Only the connection's reader may call this.
    pub fn spin_receive(&self, max: std::time::Duration, carry: &mut Carry) -> bool {
        let t0 = std::time::Instant::now();
        loop {
            match carry.receive(self.raw) {
                Some(()) => return true,
                None if t0.elapsed() >= max => return false,
                None => std::thread::yield_now(),
            }
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
    use std::io::Write;

    use tokio::io::AsyncReadExt;

    use super::*;

    fn pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (c, s)
    }

    const LONG: std::time::Duration = std::time::Duration::from_secs(5);

    #[tokio::test]
    async fn polled_bytes_are_read_before_the_sockets_next_ones() {
        let (mut c, s) = pair();
        s.set_nonblocking(true).unwrap();
        let w = SockWriter::new(std::os::fd::AsFd::as_fd(&s)).unwrap();
        let s = tokio::net::TcpStream::from_std(s).unwrap();
        let mut rd = Carried::new(s, 8);
        assert!(
            !w.spin_receive(std::time::Duration::ZERO, &mut rd.carry),
            "nothing was sent"
        );
        assert!(rd.carry.is_empty());

        // 12 bytes waiting: the poll takes the carry's 8, the socket keeps 4; 4 more follow.
        c.write_all(b"0123456789ab").unwrap();
        assert!(w.spin_receive(LONG, &mut rd.carry));
        assert!(!rd.carry.is_empty());
        // A carry not yet read is not received into again.
        assert!(w.spin_receive(LONG, &mut rd.carry));
        c.write_all(b"cdef").unwrap();
        let mut got = [0u8; 16];
        rd.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"0123456789abcdef");
        assert!(rd.carry.is_empty());

        // The peer's close, met while polling, is the reader's end of file.
        drop(c);
        assert!(w.spin_receive(LONG, &mut rd.carry));
        assert!(!rd.carry.is_empty(), "an end waits");
        assert_eq!(rd.read(&mut got).await.unwrap(), 0);
    }

    fn carry_of(bytes: &[u8]) -> Carry {
        let mut c = Carry::new(bytes.len());
        c.buf.extend_from_slice(bytes);
        c
    }

    fn request(cmd: u16, len: u32) -> Vec<u8> {
        crate::nbd::proto::Request {
            flags: 0,
            cmd,
            cookie: 7,
            offset: 4096,
            len,
        }
        .encode()
        .to_vec()
    }

    #[test]
    fn a_lone_request_is_taken_only_when_the_carry_holds_exactly_it() {
        use crate::nbd::proto::CMD_FLUSH;
        let mut write = request(CMD_WRITE, 5);
        write.extend_from_slice(b"hello");
        let c = carry_of(&write);
        let (req, data) = c.lone_request().unwrap();
        assert_eq!(
            (req.cmd, req.len, data),
            (CMD_WRITE, 5, Some(&b"hello"[..]))
        );
        let c = carry_of(&request(CMD_FLUSH, 0));
        let (req, data) = c.lone_request().unwrap();
        assert_eq!((req.cmd, data), (CMD_FLUSH, None));

        // Short data, a second request behind, a cut header, a bad magic: not lone.
        assert!(carry_of(&write[..write.len() - 1]).lone_request().is_none());
        let mut two = write.clone();
        two.extend_from_slice(&request(CMD_FLUSH, 0));
        assert!(carry_of(&two).lone_request().is_none());
        assert!(carry_of(&write[..REQUEST_LEN - 1]).lone_request().is_none());
        assert!(carry_of(&[0xAB; REQUEST_LEN]).lone_request().is_none());

        // Partly read, or cleared: only what is left counts.
        let mut c = carry_of(&two);
        c.pos = write.len();
        assert_eq!(c.lone_request().unwrap().0.cmd, CMD_FLUSH);
        c.clear();
        assert!(c.is_empty() && c.lone_request().is_none());
    }
}
