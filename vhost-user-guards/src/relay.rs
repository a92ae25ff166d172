//! vhost-user-backend 0.24 maps `mmap_size` bytes of a `VHOST_USER_SET_LOG_BASE` descriptor
//! from `mmap_offset` whatever the file's length (`MmapLogReg::from_file`), and marking a page
//! whose bit lies past the file's end is SIGBUS in a queue thread
//! (`AtomicBitmapMmap::mark_dirty`): one message from a frontend kills the backend. The message
//! never reaches a `VhostUserBackend` (no hook sees it before the mapping is used), so the
//! check has to sit on the socket: [`relay`] passes a session between the frontend and the
//! daemon message by message, file descriptors included, and ends it when a SET_LOG_BASE's log
//! does not fit in its file ([`check_log_base`]). [`daemon_side`] makes the daemon's end of it.
//!
//! Only the control socket goes through the relay; kicks and calls are eventfds the frontend
//! hands over, so the data path never does. A frontend that shrinks the file after SET_LOG_BASE
//! can still fault the backend; that needs a SIGBUS handler.

use std::{
    io::{self, Read},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::net::{UnixListener, UnixStream},
    },
    path::PathBuf,
};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// The vhost-user message header: request, flags, payload size (u32 each, little-endian).
pub const HDR_LEN: usize = 12;
/// `VHOST_USER_SET_LOG_BASE`.
pub const SET_LOG_BASE: u32 = 6;
/// The most descriptors one message may carry (the `vhost` crate's `MAX_ATTACHED_FD_ENTRIES`).
pub const MAX_FDS: usize = 32;
/// The largest payload the `vhost` crate accepts (`MAX_MSG_SIZE`); it refuses a header with a
/// larger one before reading any payload.
const VHOST_MAX_PAYLOAD: usize = 0x1000;

/// Why a SET_LOG_BASE was refused.
#[derive(Debug, thiserror::Error)]
pub enum LogBaseError {
    /// The log's descriptor could not be looked at.
    #[error("SET_LOG_BASE: the log's descriptor: {0}")]
    Fstat(#[source] io::Error),
    /// The log reaches past the end of its file (or its end overflows).
    #[error(
        "SET_LOG_BASE: a log of {size:#x} bytes at offset {offset:#x} of a {file_len:#x}-byte file"
    )]
    PastEnd {
        /// `mmap_size`.
        size: u64,
        /// `mmap_offset`.
        offset: u64,
        /// The file's length.
        file_len: u64,
    },
}

/// The request code of a header.
pub fn request(hdr: &[u8; HDR_LEN]) -> u32 {
    u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]])
}

/// The payload size a header announces.
pub fn payload_size(hdr: &[u8; HDR_LEN]) -> usize {
    u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at.checked_add(8)?)?;
    let mut v = [0u8; 8];
    v.copy_from_slice(s);
    Some(u64::from_le_bytes(v))
}

/// Checks that the dirty log a SET_LOG_BASE payload (`mmap_size`, `mmap_offset`) names lies
/// within the file of its first descriptor. A payload too short or a message without a
/// descriptor is left to the library, which refuses it.
pub fn check_log_base(payload: &[u8], fds: &[OwnedFd]) -> Result<(), LogBaseError> {
    let (Some(fd), Some(size), Some(offset)) =
        (fds.first(), u64_at(payload, 0), u64_at(payload, 8))
    else {
        return Ok(());
    };
    let file_len = fd
        .try_clone()
        .and_then(|f| std::fs::File::from(f).metadata())
        .map(|m| m.len())
        .map_err(LogBaseError::Fstat)?;
    match offset.checked_add(size) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(LogBaseError::PastEnd {
            size,
            offset,
            file_len,
        }),
    }
}

fn errno(e: vmm_sys_util::errno::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

/// Reads one message header and the descriptors that came with it; `None` when the peer
/// closed before a new message. Descriptors arriving with any part of the header are kept, as
/// the `vhost` crate keeps them.
pub fn recv_header(s: &UnixStream) -> io::Result<Option<([u8; HDR_LEN], Vec<OwnedFd>)>> {
    let mut hdr = [0u8; HDR_LEN];
    let mut got = 0;
    let mut fds: Vec<OwnedFd> = Vec::new();
    while got < HDR_LEN {
        let mut raw = [-1 as RawFd; MAX_FDS];
        let rest = hdr.get_mut(got..).unwrap_or_default();
        let mut iov = [libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        }];
        // SAFETY: the iovec points into `hdr` from `got` on, which is writable for its length.
        let (n, nfds) = match unsafe { s.recv_with_fds(&mut iov, &mut raw) } {
            Ok(r) => r,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(errno(e)),
        };
        for &fd in raw.iter().take(nfds) {
            // SAFETY: recvmsg gave us these descriptors; nobody else owns them.
            fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        got += n;
    }
    Ok(Some((hdr, fds)))
}

/// Sends all of `bytes`, `fds` with the first byte; a closed peer is EPIPE, not SIGPIPE.
pub fn send_all(s: &UnixStream, mut bytes: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let mut raw = &raw[..];
    while !bytes.is_empty() {
        match s.send_with_fds(&[bytes], raw) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                bytes = bytes.get(n..).unwrap_or_default();
                raw = &[];
            }
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => return Err(errno(e)),
        }
    }
    Ok(())
}

/// Passes messages from `from` to `to` until `from` closes; with `check`, a SET_LOG_BASE is
/// read whole and passed on only if its log fits ([`check_log_base`]). Anything else goes on
/// as it comes: the header with its descriptors at once, then the payload, so the daemon sees
/// (and refuses) a bad header as early as it would without the relay.
fn forward(from: &UnixStream, to: &UnixStream, check: bool) -> io::Result<()> {
    let mut buf = vec![0u8; VHOST_MAX_PAYLOAD];
    while let Some((hdr, fds)) = recv_header(from)? {
        let size = payload_size(&hdr);
        if check && request(&hdr) == SET_LOG_BASE && size <= VHOST_MAX_PAYLOAD {
            let mut msg = hdr.to_vec();
            msg.resize(HDR_LEN + size, 0);
            (&*from).read_exact(msg.get_mut(HDR_LEN..).unwrap_or_default())?;
            check_log_base(msg.get(HDR_LEN..).unwrap_or_default(), &fds)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            send_all(to, &msg, &fds)?;
            continue;
        }
        send_all(to, &hdr, &fds)?;
        drop(fds);
        let mut left = size;
        while left > 0 {
            let chunk = buf
                .get_mut(..left.min(VHOST_MAX_PAYLOAD))
                .unwrap_or_default();
            let n = match (&*from).read(chunk) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            send_all(to, chunk.get(..n).unwrap_or_default(), &[])?;
            left -= n;
        }
    }
    Ok(())
}

/// Relays one session between the frontend (`front`) and the daemon (`back`) until either
/// side closes: the daemon's messages go back on a thread of their own, unchanged. A
/// SET_LOG_BASE whose log does not fit in its file ends the session with an
/// [`io::ErrorKind::InvalidData`] error naming it, before the daemon sees it; both sockets are
/// shut down when the relay returns.
pub fn relay(front: UnixStream, back: UnixStream) -> io::Result<()> {
    let (b, f) = (back.try_clone()?, front.try_clone()?);
    let up = std::thread::Builder::new()
        .name("vu-relay-up".into())
        .spawn(move || {
            let _ = forward(&b, &f, false);
            let _ = f.shutdown(std::net::Shutdown::Both);
        })?;
    let res = forward(&front, &back, true);
    let _ = back.shutdown(std::net::Shutdown::Both);
    let _ = front.shutdown(std::net::Shutdown::Both);
    let _ = up.join();
    res
}

/// A directory only this user can enter, removed on drop.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn new() -> io::Result<Self> {
        use std::os::unix::ffi::{OsStrExt, OsStringExt};
        let mut tmpl = std::env::temp_dir()
            .join("vhost-user-relay-XXXXXX")
            .into_os_string()
            .into_vec();
        if tmpl.contains(&0) {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        tmpl.push(0);
        // SAFETY: a NUL-terminated template ending in XXXXXX, which mkdtemp fills in place.
        let p = unsafe { libc::mkdtemp(tmpl.as_mut_ptr().cast()) };
        if p.is_null() {
            return Err(io::Error::last_os_error());
        }
        tmpl.pop();
        Ok(Self(std::ffi::OsStr::from_bytes(&tmpl).into()))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The daemon's side of a relay: a listener with one connection pending, and that connection's
/// other end for [`relay`]'s `back`. Give the listener to `VhostUserDaemon::start` (as
/// `vhost::vhost_user::Listener::from`). The listener was bound in a directory only this user
/// can enter (mode 0700, from `mkdtemp`), which is gone by the time this returns, so nothing
/// else can connect to it and reach the daemon around the relay (an abstract socket could be
/// reached by any process in the network namespace).
pub fn daemon_side() -> io::Result<(UnixListener, UnixStream)> {
    let dir = PrivateDir::new()?;
    let path = dir.0.join("s");
    let listener = UnixListener::bind(&path)?;
    let back = UnixStream::connect(&path)?;
    drop(dir);
    Ok((listener, back))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::fd::AsFd;

    use super::*;
    use crate::testing::{memfd, set_log_base_msg as log_base};

    fn owned(f: &std::fs::File) -> OwnedFd {
        f.as_fd().try_clone_to_owned().unwrap()
    }

    #[test]
    fn check_log_base_wants_the_log_inside_its_file() {
        let f = [owned(&memfd(0x1000))];
        let ok = |size: u64, offset: u64| check_log_base(&log_base(size, offset)[HDR_LEN..], &f);
        assert!(ok(0x1000, 0).is_ok());
        assert!(ok(0x800, 0x800).is_ok());
        assert!(matches!(
            ok(0x9000, 0),
            Err(LogBaseError::PastEnd {
                size: 0x9000,
                offset: 0,
                file_len: 0x1000
            })
        ));
        // An offset that moves a fitting size past the end, or overflows.
        assert!(ok(0x1000, 0x1000).is_err());
        assert!(ok(1, u64::MAX).is_err());
        assert!(ok(u64::MAX, 1).is_err());
        // Left to the library: no descriptor, a short payload.
        assert!(check_log_base(&log_base(0x9000, 0)[HDR_LEN..], &[]).is_ok());
        assert!(check_log_base(&[0; 8], &f).is_ok());
    }

    /// A relay between a frontend end and a daemon end, on a thread.
    struct Session {
        front: UnixStream,
        daemon: UnixStream,
        relay: std::thread::JoinHandle<io::Result<()>>,
    }

    impl Session {
        fn new() -> Self {
            let (front, relay_front) = UnixStream::pair().unwrap();
            let (listener, back) = daemon_side().unwrap();
            let relay = std::thread::spawn(move || relay(relay_front, back));
            let (daemon, _) = listener.accept().unwrap();
            Self {
                front,
                daemon,
                relay,
            }
        }

        fn end(self) -> io::Result<()> {
            drop(self.front);
            self.relay.join().unwrap()
        }
    }

    /// Reads one message and its descriptors from `s`.
    fn recv_msg(s: &UnixStream) -> (Vec<u8>, Vec<OwnedFd>) {
        let (hdr, fds) = recv_header(s).unwrap().unwrap();
        let mut msg = hdr.to_vec();
        msg.resize(HDR_LEN + payload_size(&hdr), 0);
        (&*s).read_exact(&mut msg[HDR_LEN..]).unwrap();
        (msg, fds)
    }

    fn same_file(a: &OwnedFd, b: &std::fs::File) -> bool {
        use std::os::unix::fs::MetadataExt;
        let ma = std::fs::File::from(a.try_clone().unwrap())
            .metadata()
            .unwrap();
        let mb = b.metadata().unwrap();
        (ma.dev(), ma.ino()) == (mb.dev(), mb.ino())
    }

    #[test]
    fn a_dirty_log_longer_than_its_file_ends_the_session_before_the_daemon() {
        let s = Session::new();
        let log = memfd(0x1000);
        send_all(&s.front, &log_base(0x9000, 0), &[owned(&log)]).unwrap();
        // The relay ends the session: the daemon's end sees the end of the stream, no message.
        let mut got = Vec::new();
        (&s.daemon).read_to_end(&mut got).unwrap();
        assert!(got.is_empty(), "the short log reached the daemon: {got:?}");
        let e = s.end().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("0x9000"), "{e}");
    }

    #[test]
    fn messages_and_descriptors_pass_unchanged_both_ways() {
        let s = Session::new();
        let log = memfd(0x2000);
        let other = memfd(0x10);
        // A fitting log, then a message with two descriptors and a payload, then none.
        let fitting = log_base(0x1000, 0x1000);
        send_all(&s.front, &fitting, &[owned(&log)]).unwrap();
        let mut two = 24u32.to_le_bytes().to_vec(); // SET_INFLIGHT_FD-like: any request
        two.extend_from_slice(&1u32.to_le_bytes());
        two.extend_from_slice(&3u32.to_le_bytes());
        two.extend_from_slice(b"abc");
        send_all(&s.front, &two, &[owned(&other), owned(&log)]).unwrap();
        let bare = [1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
        send_all(&s.front, &bare, &[]).unwrap();

        let (m, fds) = recv_msg(&s.daemon);
        assert_eq!(m, fitting);
        assert_eq!(fds.len(), 1);
        assert!(same_file(&fds[0], &log));
        let (m, fds) = recv_msg(&s.daemon);
        assert_eq!(m, two);
        assert_eq!(fds.len(), 2);
        assert!(same_file(&fds[0], &other) && same_file(&fds[1], &log));
        let (m, fds) = recv_msg(&s.daemon);
        assert_eq!((m, fds.len()), (bare.to_vec(), 0));

        // A reply with a descriptor, back to the frontend.
        let mut reply = 23u32.to_le_bytes().to_vec();
        reply.extend_from_slice(&5u32.to_le_bytes());
        reply.extend_from_slice(&8u32.to_le_bytes());
        reply.extend_from_slice(&7u64.to_le_bytes());
        send_all(&s.daemon, &reply, &[owned(&other)]).unwrap();
        let (m, fds) = recv_msg(&s.front);
        assert_eq!(m, reply);
        assert!(fds.len() == 1 && same_file(&fds[0], &other));
        s.end().unwrap();
    }

    #[test]
    fn the_daemon_closing_ends_the_session() {
        let s = Session::new();
        drop(s.daemon);
        // The frontend's end is shut down by the relay.
        let mut got = Vec::new();
        (&s.front).read_to_end(&mut got).unwrap();
        assert!(got.is_empty());
        drop(s.front);
        s.relay.join().unwrap().unwrap();
    }

    #[test]
    fn the_daemon_side_leaves_no_name_behind() {
        let (listener, back) = daemon_side().unwrap();
        let (accepted, _) = listener.accept().unwrap();
        // The pending connection is `back`'s.
        send_all(&back, b"x", &[]).unwrap();
        let mut b = [0u8; 1];
        (&accepted).read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
        let addr = listener.local_addr().unwrap();
        let dir = addr.as_pathname().and_then(|p| p.parent()).unwrap();
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}
