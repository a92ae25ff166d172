//! A vhost-user message relay between the frontend and the `vhost-user-backend` daemon that
//! papers over one ordering difference.
//!
//! QEMU's virtio-net (7.2 and later) sends `VHOST_USER_SET_VRING_ENABLE` when the device is
//! realized and again while the guest negotiates features, i.e. before `SET_FEATURES` has
//! acknowledged `VHOST_USER_F_PROTOCOL_FEATURES`. The rust-vmm `vhost` crate treats that as a
//! protocol error and drops the connection. The relay answers such early enables itself (an
//! ack of 0 when the frontend asked for one), remembers the last state asked for each ring, and
//! replays those enables right after passing on a `SET_FEATURES` that acknowledges protocol
//! features (QEMU 7.2 does not send them again). A frontend that follows the message order of
//! the spec is relayed unchanged. Everything else, file descriptors
//! included, is passed through as is.

use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const HDR_LEN: usize = 12;
const SET_FEATURES: u32 = 2;
const SET_VRING_ENABLE: u32 = 18;
const F_PROTOCOL_FEATURES: u64 = 1 << 30;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
/// The largest payload a vhost-user message has (memory table with 8 regions and the like).
const MAX_PAYLOAD: usize = 4096;
const MAX_FDS: usize = 32;

fn read_msg(s: &UnixStream) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut hdr = [0u8; HDR_LEN];
    let mut got = 0;
    let mut fds: Vec<OwnedFd> = Vec::new();
    while got < HDR_LEN {
        let mut raw = [-1 as RawFd; MAX_FDS];
        let mut iov = [libc::iovec {
            iov_base: hdr[got..].as_mut_ptr() as *mut libc::c_void,
            iov_len: HDR_LEN - got,
        }];
        // SAFETY: the iovec points into `hdr` from `got` on, which is writable for its length.
        let (n, nfds) = unsafe { s.recv_with_fds(&mut iov, &mut raw) }
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
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
    let size = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("vhost-user message with a {size}-byte payload"),
        ));
    }
    let mut msg = hdr.to_vec();
    msg.resize(HDR_LEN + size, 0);
    let mut r = s;
    r.read_exact(&mut msg[HDR_LEN..])?;
    Ok(Some((msg, fds)))
}

fn field(msg: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([msg[at], msg[at + 1], msg[at + 2], msg[at + 3]])
}

/// Relays one session until either side closes.
pub fn relay(front: UnixStream, back: UnixStream) -> io::Result<()> {
    let front_w = Arc::new(Mutex::new(front.try_clone()?));
    // Backend → frontend: whole messages, so our own replies never interleave with its.
    let (b, fw) = (back.try_clone()?, front_w.clone());
    let up = std::thread::Builder::new()
        .name("vu-relay-up".into())
        .spawn(move || {
            while let Ok(Some((msg, fds))) = read_msg(&b) {
                let raw: Vec<RawFd> = fds.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
                let w = fw.lock().unwrap_or_else(|p| p.into_inner());
                let r = if raw.is_empty() {
                    (&*w).write_all(&msg)
                } else {
                    w.send_with_fds(&[&msg[..]], &raw)
                        .map(|_| ())
                        .map_err(|e| io::Error::from_raw_os_error(e.errno()))
                };
                if r.is_err() {
                    break;
                }
            }
            let _ = fw
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .shutdown(std::net::Shutdown::Both);
        })?;
    let mut protocol_acked = false;
    let mut early_enables: std::collections::BTreeMap<u32, u32> = Default::default();
    let res = loop {
        let (msg, fds) = match read_msg(&front) {
            Ok(Some(m)) => m,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        let req = field(&msg, 0);
        let flags = field(&msg, 4);
        tracing::trace!(
            req,
            flags,
            len = msg.len(),
            fds = fds.len(),
            "vhost-user request"
        );
        if req == SET_FEATURES && msg.len() >= HDR_LEN + 8 {
            let mut v = [0u8; 8];
            v.copy_from_slice(&msg[HDR_LEN..HDR_LEN + 8]);
            protocol_acked = u64::from_le_bytes(v) & F_PROTOCOL_FEATURES != 0;
        }
        if req == SET_VRING_ENABLE && !protocol_acked {
            if msg.len() >= HDR_LEN + 8 {
                early_enables.insert(field(&msg, HDR_LEN), field(&msg, HDR_LEN + 4));
            }
            tracing::debug!(
                "vhost-user: SET_VRING_ENABLE before SET_FEATURES answered by the relay"
            );
            if flags & FLAG_NEED_REPLY != 0 {
                let mut reply = Vec::with_capacity(HDR_LEN + 8);
                reply.extend_from_slice(&SET_VRING_ENABLE.to_le_bytes());
                reply.extend_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
                reply.extend_from_slice(&8u32.to_le_bytes());
                reply.extend_from_slice(&0u64.to_le_bytes());
                let w = front_w.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = (&*w).write_all(&reply) {
                    break Err(e);
                }
            }
            continue;
        }
        let raw: Vec<RawFd> = fds.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
        let r = if raw.is_empty() {
            (&back).write_all(&msg)
        } else {
            back.send_with_fds(&[&msg[..]], &raw)
                .map(|_| ())
                .map_err(|e| io::Error::from_raw_os_error(e.errno()))
        };
        if let Err(e) = r {
            break Err(e);
        }
        if req == SET_FEATURES && protocol_acked {
            for (index, num) in std::mem::take(&mut early_enables) {
                let mut m = Vec::with_capacity(HDR_LEN + 8);
                m.extend_from_slice(&SET_VRING_ENABLE.to_le_bytes());
                m.extend_from_slice(&FLAG_VERSION.to_le_bytes());
                m.extend_from_slice(&8u32.to_le_bytes());
                m.extend_from_slice(&index.to_le_bytes());
                m.extend_from_slice(&num.to_le_bytes());
                if let Err(e) = (&back).write_all(&m) {
                    tracing::debug!("vhost-user relay: replaying SET_VRING_ENABLE: {e}");
                }
            }
        }
    };
    let _ = back.shutdown(std::net::Shutdown::Both);
    let _ = front.shutdown(std::net::Shutdown::Both);
    let _ = up.join();
    res
}
