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
//! the spec is relayed unchanged.
//!
//! The relay also handles what the `vhost` crate's request handler does not:
//! - `VHOST_USER_SEND_RARP` (request 19, payload a u64 whose low 6 bytes are the MAC, as QEMU
//!   sends it after a migration): handed to [`Hooks::send_rarp`] (the device broadcasts a RARP
//!   announce); acknowledged with 0 when the frontend asked for a reply.
//! - Any request the handler does not know (the crate would drop the connection on it): logged
//!   and consumed; when the frontend asked for a reply (`NEED_REPLY`), answered with a u64 1
//!   (failure, as the REPLY_ACK convention has it). Descriptors sent with it are closed.
//! - `VHOST_USER_SET_BACKEND_REQ_FD` is passed on, and a duplicate of the backend-request
//!   channel is given to [`Hooks::backend_channel`] (the device sends `CONFIG_CHANGE_MSG` on it).
//! - `VHOST_USER_SET_LOG_BASE` whose log does not fit in its memfd: the session ends with an
//!   error instead of the device dying of SIGBUS when it marks a page
//!   (`vhost_user_guards::relay::check_log_base`, which vhost-blk-colo's relay uses too).
//!
//! Everything else, file descriptors included, is passed through as is.

use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use vhost_user_guards::relay::{
    HDR_LEN, SET_LOG_BASE, check_log_base, payload_size, recv_header, send_all,
};

const SET_FEATURES: u32 = 2;
const SET_PROTOCOL_FEATURES: u32 = 16;
const SET_VRING_ENABLE: u32 = 18;
/// `VHOST_USER_SEND_RARP`.
pub const SEND_RARP: u32 = 19;
/// `VHOST_USER_SET_BACKEND_REQ_FD`.
const SET_BACKEND_REQ_FD: u32 = 21;
/// Requests the `vhost` 0.18 backend request handler implements; anything else would make it
/// fail the connection, so the relay answers those itself.
const HANDLED: &[u32] = &[
    1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 21, 24, 25, 28, 29, 30, 31, 32, 33,
    34, 36, 37, 38, 41, 42, 43, 44,
];
const F_PROTOCOL_FEATURES: u64 = 1 << 30;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
/// The largest payload the relay reads. Known messages are far smaller (a memory table with 8
/// regions is 264 bytes, a config read at most 268); the margin lets an unknown request with a
/// large payload be read whole and answered instead of breaking the session.
const MAX_PAYLOAD: usize = 64 * 1024;

fn read_msg(s: &UnixStream) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let Some((hdr, fds)) = recv_header(s)? else {
        return Ok(None);
    };
    let size = payload_size(&hdr);
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

fn field64(msg: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&msg[at..at + 8]);
    u64::from_le_bytes(v)
}

/// What the device does with the messages the relay handles itself.
pub trait Hooks: Send + Sync {
    /// `VHOST_USER_SEND_RARP` with the guest's MAC.
    fn send_rarp(&self, _mac: [u8; 6]) {}
    /// The frontend's backend-request channel (a duplicate of the descriptor passed on to the
    /// daemon), with the protocol features negotiated so far.
    fn backend_channel(&self, _chan: UnixStream, _protocol_features: u64) {}
}

/// Hooks that do nothing (the relay still consumes SEND_RARP and unknown requests).
pub struct NoHooks;
impl Hooks for NoHooks {}

/// The MAC in a SEND_RARP payload: the low 6 bytes of the little-endian u64, i.e. its first
/// 6 bytes in memory, as QEMU copies the MAC into it.
pub fn rarp_mac(payload: &[u8]) -> Option<[u8; 6]> {
    let b = payload.get(..6)?;
    let mut mac = [0u8; 6];
    mac.copy_from_slice(b);
    Some(mac)
}

/// Relays one session until either side closes.
pub fn relay(front: UnixStream, back: UnixStream) -> io::Result<()> {
    relay_with(front, back, &NoHooks)
}

fn reply_u64(w: &Mutex<UnixStream>, req: u32, value: u64) -> io::Result<()> {
    let mut reply = Vec::with_capacity(HDR_LEN + 8);
    reply.extend_from_slice(&req.to_le_bytes());
    reply.extend_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
    reply.extend_from_slice(&8u32.to_le_bytes());
    reply.extend_from_slice(&value.to_le_bytes());
    let w = w.lock().unwrap_or_else(|p| p.into_inner());
    (&*w).write_all(&reply)
}

/// Relays one session until either side closes, with `hooks` for the messages the relay
/// handles itself (see the module documentation).
pub fn relay_with(front: UnixStream, back: UnixStream, hooks: &dyn Hooks) -> io::Result<()> {
    let front_w = Arc::new(Mutex::new(front.try_clone()?));
    // Backend → frontend: whole messages, so our own replies never interleave with its.
    let (b, fw) = (back.try_clone()?, front_w.clone());
    let up = std::thread::Builder::new()
        .name("vu-relay-up".into())
        .spawn(move || {
            while let Ok(Some((msg, fds))) = read_msg(&b) {
                let w = fw.lock().unwrap_or_else(|p| p.into_inner());
                if send_all(&w, &msg, &fds).is_err() {
                    break;
                }
            }
            let _ = fw
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .shutdown(std::net::Shutdown::Both);
        })?;
    let mut protocol_acked = false;
    let mut protocol_features = 0u64;
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
            protocol_acked = field64(&msg, HDR_LEN) & F_PROTOCOL_FEATURES != 0;
        }
        if req == SET_PROTOCOL_FEATURES && msg.len() >= HDR_LEN + 8 {
            protocol_features = field64(&msg, HDR_LEN);
        }
        if req == SEND_RARP {
            match rarp_mac(&msg[HDR_LEN..]) {
                Some(mac) => {
                    tracing::info!(
                        "vhost-user SEND_RARP for {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                        mac[0],
                        mac[1],
                        mac[2],
                        mac[3],
                        mac[4],
                        mac[5]
                    );
                    hooks.send_rarp(mac);
                }
                None => tracing::warn!(
                    "vhost-user SEND_RARP with a {}-byte payload",
                    msg.len() - HDR_LEN
                ),
            }
            if flags & FLAG_NEED_REPLY != 0
                && let Err(e) = reply_u64(&front_w, req, 0)
            {
                break Err(e);
            }
            continue;
        }
        if !HANDLED.contains(&req) {
            tracing::warn!(
                "vhost-user request {req} ({} bytes, {} fds) not supported: ignored",
                msg.len() - HDR_LEN,
                fds.len()
            );
            if flags & FLAG_NEED_REPLY != 0
                && let Err(e) = reply_u64(&front_w, req, 1)
            {
                break Err(e);
            }
            continue;
        }
        if req == SET_BACKEND_REQ_FD
            && let Some(fd) = fds.first()
        {
            match fd.try_clone() {
                Ok(dup) => hooks.backend_channel(UnixStream::from(dup), protocol_features),
                Err(e) => tracing::warn!("vhost-user: dup of the backend-request channel: {e}"),
            }
        }
        if req == SET_LOG_BASE
            && let Err(e) = check_log_base(msg.get(HDR_LEN..).unwrap_or_default(), &fds)
        {
            tracing::warn!("vhost-user: {e}; session ended");
            break Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
        if req == SET_VRING_ENABLE && !protocol_acked {
            if msg.len() >= HDR_LEN + 8 {
                early_enables.insert(field(&msg, HDR_LEN), field(&msg, HDR_LEN + 4));
            }
            tracing::debug!(
                "vhost-user: SET_VRING_ENABLE before SET_FEATURES answered by the relay"
            );
            if flags & FLAG_NEED_REPLY != 0
                && let Err(e) = reply_u64(&front_w, SET_VRING_ENABLE, 0)
            {
                break Err(e);
            }
            continue;
        }
        if let Err(e) = send_all(&back, &msg, &fds) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use vhost_user_guards::testing::set_log_base_msg as log_base;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;

    fn memfd(len: u64) -> OwnedFd {
        vhost_user_guards::testing::memfd(len).into()
    }

    /// Relays `msg` with `fd`; returns the relay's result and what reached the daemon's side.
    fn relay_one(msg: &[u8], fd: &OwnedFd) -> (io::Result<()>, Vec<u8>) {
        let (front, relay_front) = UnixStream::pair().unwrap();
        let (relay_back, mut daemon) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || relay(relay_front, relay_back));
        front.send_with_fds(&[msg], &[fd.as_raw_fd()]).unwrap();
        let mut got = vec![0u8; msg.len()];
        let n = daemon.read(&mut got).unwrap_or(0);
        got.truncate(n);
        drop(front);
        (t.join().unwrap(), got)
    }

    #[test]
    fn a_dirty_log_longer_than_its_memfd_ends_the_session() {
        let fd = memfd(0x1000);
        let (r, got) = relay_one(&log_base(0x9000, 0), &fd);
        assert!(got.is_empty(), "the short log reached the daemon");
        let e = r.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("0x9000"), "{e}");
        // Offsets and overflows: vhost_user_guards::relay's tests.
    }

    #[test]
    fn a_dirty_log_within_its_memfd_is_passed_on() {
        let fd = memfd(0x1000);
        let msg = log_base(0x800, 0x800);
        let (r, got) = relay_one(&msg, &fd);
        assert_eq!(got, msg);
        assert!(r.is_ok());
    }
}
