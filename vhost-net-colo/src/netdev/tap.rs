//! `-netdev tap`: a Linux tap interface.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{Deliver, NetCounters, Netdev, NetdevError};
use crate::filter::ObjectSpec;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

pub struct Tap {
    id: String,
    ifname: String,
    file: Arc<File>,
    downscript: Option<String>,
    down_done: AtomicBool,
    stop: Arc<AtomicBool>,
    counters: Arc<NetCounters>,
}

fn run_script(id: &str, script: &str, ifname: &str) -> Result<(), NetdevError> {
    let status = Command::new(script)
        .arg(ifname)
        .status()
        .map_err(|e| NetdevError::Io {
            id: id.into(),
            what: format!("running {script} {ifname}"),
            source: e,
        })?;
    if !status.success() {
        return Err(NetdevError::Config {
            id: id.into(),
            msg: format!("{script} {ifname} failed: {status}"),
        });
    }
    Ok(())
}

impl Tap {
    pub fn open(mut spec: ObjectSpec, deliver: Deliver) -> Result<Arc<Self>, NetdevError> {
        let id = spec.id.clone();
        let ifname = spec.take("ifname").unwrap_or_default();
        let script = spec.take("script").filter(|s| s != "no" && !s.is_empty());
        let downscript = spec
            .take("downscript")
            .filter(|s| s != "no" && !s.is_empty());
        // Accepted for QEMU compatibility; COLO requires vhost=off and we never use vhost-net.
        if let Some(v) = spec.take("vhost")
            && v != "off"
        {
            return Err(NetdevError::Config {
                id,
                msg: "vhost=on is not supported (the filter chain runs in this process)".into(),
            });
        }
        spec.finish()?;
        if ifname.len() >= libc::IFNAMSIZ {
            return Err(NetdevError::Config {
                id,
                msg: format!(
                    "ifname {ifname:?} is longer than {} bytes",
                    libc::IFNAMSIZ - 1
                ),
            });
        }
        let io_err = |what: &str, e| NetdevError::Io {
            id: id.clone(),
            what: what.into(),
            source: e,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(|e| io_err("open /dev/net/tun", e))?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..ifname.len()].copy_from_slice(ifname.as_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is (name, flags, padding to
        // the kernel's 40-byte size); the fd is a tun device we own.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        if r < 0 {
            return Err(io_err("TUNSETIFF", std::io::Error::last_os_error()));
        }
        let end = req
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(req.name.len());
        let ifname = String::from_utf8_lossy(&req.name[..end]).into_owned();
        if let Some(s) = &script {
            run_script(&id, s, &ifname)?;
        }
        let tap = Arc::new(Tap {
            id: id.clone(),
            ifname,
            file: Arc::new(file),
            downscript,
            down_done: AtomicBool::new(false),
            stop: Arc::new(AtomicBool::new(false)),
            counters: Arc::default(),
        });
        let (file, stop, counters) = (tap.file.clone(), tap.stop.clone(), tap.counters.clone());
        std::thread::Builder::new()
            .name(format!("tap-{id}"))
            .spawn(move || reader(&file, &stop, &counters, &deliver))
            .map_err(|e| io_err("spawn reader", e))?;
        Ok(tap)
    }

    pub fn ifname(&self) -> &str {
        &self.ifname
    }
}

fn reader(file: &File, stop: &AtomicBool, counters: &NetCounters, deliver: &Deliver) {
    let mut buf = vec![0u8; 65536 + 4096];
    let mut reader = file;
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd: file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, count 1.
        let r = unsafe { libc::poll(&mut pfd, 1, 100) };
        if r <= 0 {
            continue;
        }
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                counters
                    .rx_frames
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                deliver(buf[..n].to_vec());
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                tracing::warn!("tap read: {e}");
                break;
            }
        }
    }
}

impl Netdev for Tap {
    fn id(&self) -> &str {
        &self.id
    }

    fn kind(&self) -> &'static str {
        "tap"
    }

    fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        let mut w = &*self.file;
        match w.write(frame) {
            Ok(_) => {
                self.counters.tx_frames.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            // Interface down or queue full: a tap drops, like a wire.
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::EAGAIN))
                    || e.kind() == std::io::ErrorKind::WouldBlock =>
            {
                self.counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({"ifname": self.ifname, "counters": self.counters.json()})
    }

    fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
        if self.down_done.swap(true, Ordering::Relaxed) {
            return;
        }
        if let Some(s) = &self.downscript
            && let Err(e) = run_script(&self.id, s, &self.ifname)
        {
            tracing::warn!("{e}");
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.shutdown();
    }
}
