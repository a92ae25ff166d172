//! `-netdev tap`: a Linux tap interface.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{Deliver, NetCounters, Netdev, NetdevError};
use crate::filter::ObjectSpec;
use crate::vnet::VNET_HDR_LEN;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;

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
    vnet_hdr: bool,
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
    pub fn open(
        mut spec: ObjectSpec,
        deliver: Deliver,
        deliver_vnet: Option<Deliver>,
    ) -> Result<Arc<Self>, NetdevError> {
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
        let vnet_hdr = spec.take_bool("vnet_hdr", true)?;
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
            flags: IFF_TAP | IFF_NO_PI | if vnet_hdr { IFF_VNET_HDR } else { 0 },
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
        if vnet_hdr {
            let sz: libc::c_int = VNET_HDR_LEN as libc::c_int;
            // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer; TUNSETOFFLOAD takes the
            // flags by value. The fd is our tun device.
            let r = unsafe {
                libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &sz as *const libc::c_int)
            };
            if r < 0 {
                return Err(io_err("TUNSETVNETHDRSZ", std::io::Error::last_os_error()));
            }
            // We can take every frame: whatever the guest or the chain cannot take is made
            // plain in software (see crate::offload).
            // SAFETY: as above.
            let r = unsafe {
                libc::ioctl(
                    file.as_raw_fd(),
                    TUNSETOFFLOAD,
                    (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6) as libc::c_ulong,
                )
            };
            if r < 0 {
                return Err(io_err("TUNSETOFFLOAD", std::io::Error::last_os_error()));
            }
        }
        if let Some(s) = &script {
            run_script(&id, s, &ifname)?;
        }
        let tap = Arc::new(Tap {
            id: id.clone(),
            ifname,
            file: Arc::new(file),
            vnet_hdr,
            downscript,
            down_done: AtomicBool::new(false),
            stop: Arc::new(AtomicBool::new(false)),
            counters: Arc::default(),
        });
        let (file, stop, counters) = (tap.file.clone(), tap.stop.clone(), tap.counters.clone());
        std::thread::Builder::new()
            .name(format!("tap-{id}"))
            .spawn(move || {
                let sink: Deliver = match (vnet_hdr, deliver_vnet) {
                    (false, _) => deliver,
                    (true, Some(v)) => v,
                    (true, None) => Arc::new(move |buf: Vec<u8>| {
                        if buf.len() < VNET_HDR_LEN {
                            return;
                        }
                        let (h, f) = buf.split_at(VNET_HDR_LEN);
                        if let Ok(segs) = crate::offload::to_plain(h, f.to_vec()) {
                            for s in segs {
                                deliver(s);
                            }
                        }
                    }),
                };
                reader(&file, &stop, &counters, &sink)
            })
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

    fn vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    fn send_vnet(&self, hdr: &[u8; VNET_HDR_LEN], frame: &[u8]) -> std::io::Result<()> {
        if !self.vnet_hdr {
            let segs = crate::offload::to_plain(hdr, frame.to_vec())
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            for s in segs {
                self.send(&s)?;
            }
            return Ok(());
        }
        self.write_parts(hdr, frame)
    }

    fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        if self.vnet_hdr {
            return self.write_parts(&[0; VNET_HDR_LEN], frame);
        }
        self.write_parts(&[], frame)
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({"ifname": self.ifname, "vnet_hdr": self.vnet_hdr, "counters": self.counters.json()})
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

impl Tap {
    /// One frame, written with a single `writev` (the tap takes one frame per write).
    fn write_parts(&self, hdr: &[u8], frame: &[u8]) -> std::io::Result<()> {
        let mut w = &*self.file;
        let r = w.write_vectored(&[std::io::IoSlice::new(hdr), std::io::IoSlice::new(frame)]);
        match r {
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
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.shutdown();
    }
}
