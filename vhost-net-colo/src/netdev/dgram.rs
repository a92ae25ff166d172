//! `-netdev dgram`: one frame per datagram (no length prefix), over UDP or Unix datagram
//! sockets, as QEMU's `-netdev dgram` with `local.*` and `remote.*` addresses.

use std::net::{ToSocketAddrs, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use colo_proto::chardev::SocketAddress;

use super::{FromNetdev, NetCounters, Netdev, NetdevError, Sinks, socket_address};
use crate::filter::ObjectSpec;

enum Sock {
    Udp(UdpSocket, std::net::SocketAddr),
    Unix(UnixDatagram, PathBuf, PathBuf),
}

/// Datagrams one read takes at most (the first, then those already waiting).
const DRAIN_MAX: usize = 64;

impl Sock {
    /// A datagram already waiting (`MSG_DONTWAIT`), or `None`.
    fn recv_now(&self, buf: &mut [u8]) -> Option<usize> {
        let fd = match self {
            Sock::Udp(s, _) => s.as_raw_fd(),
            Sock::Unix(s, _, _) => s.as_raw_fd(),
        };
        // SAFETY: `buf` is ours and writable for its length; the fd is our open socket.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        (n >= 0).then_some(n as usize)
    }
}

pub struct DgramNetdev {
    id: String,
    sock: Arc<Sock>,
    stop: Arc<AtomicBool>,
    counters: Arc<NetCounters>,
}

impl DgramNetdev {
    pub fn open(mut spec: ObjectSpec, sinks: Sinks) -> Result<Arc<Self>, NetdevError> {
        let id = spec.id.clone();
        let local = socket_address(&mut spec, "local")?;
        let remote = socket_address(&mut spec, "remote")?;
        spec.finish()?;
        let cfg = |msg: &str| NetdevError::Config {
            id: id.clone(),
            msg: msg.into(),
        };
        let io = |what: &str, e| NetdevError::Io {
            id: id.clone(),
            what: what.into(),
            source: e,
        };
        let sock = match (local, remote) {
            (
                Some(SocketAddress::Tcp { host, port }),
                Some(SocketAddress::Tcp { host: rh, port: rp }),
            ) => {
                let s = UdpSocket::bind((host.as_str(), port)).map_err(|e| io("bind", e))?;
                let remote = (rh.as_str(), rp)
                    .to_socket_addrs()
                    .map_err(|e| io("resolve remote", e))?
                    .next()
                    .ok_or_else(|| cfg("remote address does not resolve"))?;
                Sock::Udp(s, remote)
            }
            (Some(SocketAddress::Unix(l)), Some(SocketAddress::Unix(r))) => {
                let _ = std::fs::remove_file(&l);
                let s = UnixDatagram::bind(&l).map_err(|e| io("bind", e))?;
                Sock::Unix(s, l, r)
            }
            _ => {
                return Err(cfg(
                    "local.* and remote.* must both be given, both inet or both unix",
                ));
            }
        };
        match &sock {
            Sock::Udp(s, _) => s.set_read_timeout(Some(Duration::from_millis(100))),
            Sock::Unix(s, _, _) => s.set_read_timeout(Some(Duration::from_millis(100))),
        }
        .map_err(|e| io("set timeout", e))?;
        let me = Arc::new(DgramNetdev {
            id: id.clone(),
            sock: Arc::new(sock),
            stop: Arc::new(AtomicBool::new(false)),
            counters: Arc::default(),
        });
        let (sock, stop, counters) = (me.sock.clone(), me.stop.clone(), me.counters.clone());
        std::thread::Builder::new()
            .name(format!("dgram-{id}"))
            .spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let r = match &*sock {
                        Sock::Udp(s, _) => s.recv(&mut buf),
                        Sock::Unix(s, _, _) => s.recv(&mut buf),
                    };
                    match r {
                        Ok(n) => {
                            // Datagrams already waiting go with this one, as one batch.
                            let mut frames = vec![FromNetdev::Plain(buf[..n].to_vec())];
                            while frames.len() < DRAIN_MAX {
                                match sock.recv_now(&mut buf) {
                                    Some(n) => frames.push(FromNetdev::Plain(buf[..n].to_vec())),
                                    None => break,
                                }
                            }
                            counters
                                .rx_frames
                                .fetch_add(frames.len() as u64, Ordering::Relaxed);
                            sinks.deliver_many(frames);
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock
                                    | std::io::ErrorKind::TimedOut
                                    | std::io::ErrorKind::Interrupted
                                    | std::io::ErrorKind::ConnectionRefused
                            ) => {}
                        Err(e) => {
                            tracing::warn!("netdev dgram: {e}");
                            break;
                        }
                    }
                }
            })
            .map_err(|e| io("spawn reader", e))?;
        Ok(me)
    }
}

impl Netdev for DgramNetdev {
    fn id(&self) -> &str {
        &self.id
    }

    fn kind(&self) -> &'static str {
        "dgram"
    }

    fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        let r = match &*self.sock {
            Sock::Udp(s, to) => s.send_to(frame, to),
            Sock::Unix(s, _, to) => s.send_to(frame, to),
        };
        match r {
            Ok(_) => self.counters.tx_frames.fetch_add(1, Ordering::Relaxed),
            // No peer yet, or its buffer is full: a datagram link drops.
            Err(_) => self.counters.tx_dropped.fetch_add(1, Ordering::Relaxed),
        };
        Ok(())
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({"counters": self.counters.json()})
    }
}

impl Drop for DgramNetdev {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Sock::Unix(_, l, _) = &*self.sock {
            let _ = std::fs::remove_file(l);
        }
    }
}
