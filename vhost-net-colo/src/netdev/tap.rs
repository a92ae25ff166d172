//! `-netdev tap`: a Linux tap interface.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{FromNetdev, NetCounters, Netdev, NetdevError, Sinks};
use crate::filter::ObjectSpec;
use crate::vnet::VNET_HDR_LEN;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
const TUN_F_TSO_ECN: libc::c_uint = 0x08;
const TUN_F_UFO: libc::c_uint = 0x10;
const TUN_F_USO4: libc::c_uint = 0x20;
const TUN_F_USO6: libc::c_uint = 0x40;
/// The offloads asked of a tap with vnet headers: checksum, TSO with ECN (GSO frames whose
/// CWR the segmenter must keep on the first segment only, `VIRTIO_NET_HDR_GSO_ECN`), and UFO
/// (QEMU asks for it too; kernels since 4.14 accept it but never hand UFO frames out).
const OFFLOADS: libc::c_uint = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO;

/// Whether a frame of this virtio-net `gso_type` is USO (`VIRTIO_NET_HDR_GSO_UDP_L4`, with or
/// without the ECN bit): what a kernel without `TUN_F_USO4/6` cannot take whole.
fn is_uso(gso_type: u8) -> bool {
    gso_type & !crate::offload::GSO_ECN == crate::offload::GSO_UDP_L4
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

pub struct Tap {
    id: String,
    ifname: String,
    /// One descriptor per queue (`queues=N`, `IFF_MULTI_QUEUE`), else one.
    files: Vec<Arc<File>>,
    vnet_hdr: bool,
    /// The kernel takes USO frames written to the tap (it knows `TUN_F_USO4/6`, Linux 6.2+);
    /// otherwise they are cut in software first.
    uso: bool,
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
    pub fn open(mut spec: ObjectSpec, sinks: Sinks) -> Result<Arc<Self>, NetdevError> {
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
        let queues = super::take_queues(&mut spec)?;
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
        let mut files = Vec::with_capacity(queues);
        let mut ifname = ifname;
        let mut uso = vnet_hdr;
        for q in 0..queues {
            let file = open_queue(&ifname, vnet_hdr, queues > 1)
                .map_err(|(what, e)| io_err(&format!("queue {q}: {what}"), e))?;
            ifname = file.1;
            uso &= file.2;
            files.push(Arc::new(file.0));
        }
        if let Some(s) = &script {
            run_script(&id, s, &ifname)?;
        }
        let tap = Arc::new(Tap {
            id: id.clone(),
            ifname,
            files,
            vnet_hdr,
            uso,
            downscript,
            down_done: AtomicBool::new(false),
            stop: Arc::new(AtomicBool::new(false)),
            counters: Arc::default(),
        });
        for (q, file) in tap.files.iter().enumerate() {
            let (file, stop, counters, sinks) = (
                file.clone(),
                tap.stop.clone(),
                tap.counters.clone(),
                sinks.clone(),
            );
            std::thread::Builder::new()
                .name(format!("tap-{id}-{q}"))
                .spawn(move || reader(&file, vnet_hdr, &stop, &counters, &sinks))
                .map_err(|e| io_err("spawn reader", e))?;
        }
        Ok(tap)
    }

    pub fn ifname(&self) -> &str {
        &self.ifname
    }
}

/// Opens one queue of tap `ifname` (created when it does not exist; the kernel names it when
/// `ifname` is empty) and returns it with the interface's name and whether the kernel takes
/// USO frames.
fn open_queue(
    ifname: &str,
    vnet_hdr: bool,
    multi_queue: bool,
) -> Result<(File, String, bool), (&'static str, std::io::Error)> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| ("open /dev/net/tun", e))?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP
            | IFF_NO_PI
            | if vnet_hdr { IFF_VNET_HDR } else { 0 }
            | if multi_queue { IFF_MULTI_QUEUE } else { 0 },
        _pad: [0; 22],
    };
    let n = ifname.len().min(libc::IFNAMSIZ - 1);
    req.name[..n].copy_from_slice(&ifname.as_bytes()[..n]);
    // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is (name, flags, padding to
    // the kernel's 40-byte size); the fd is a tun device we own.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if r < 0 {
        return Err(("TUNSETIFF", std::io::Error::last_os_error()));
    }
    let end = req
        .name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(req.name.len());
    let name = String::from_utf8_lossy(&req.name[..end]).into_owned();
    if vnet_hdr {
        let sz: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer. The fd is our tun device.
        let r =
            unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &sz as *const libc::c_int) };
        if r < 0 {
            return Err(("TUNSETVNETHDRSZ", std::io::Error::last_os_error()));
        }
        // We can take every frame: whatever the guest or the chain cannot take is made
        // plain in software (see crate::offload). A kernel that knows USO (it refuses
        // unknown flags) also takes USO frames written to it; it is asked for them only for
        // that probe, then set to OFFLOADS. Older kernels get fewer flags, down to QEMU's
        // basic set.
        let set = |flags: libc::c_uint| {
            // SAFETY: TUNSETOFFLOAD takes the flags by value; the fd is our tun device.
            let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) };
            if r < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        let uso = set(OFFLOADS | TUN_F_USO4 | TUN_F_USO6).is_ok();
        let r = set(OFFLOADS)
            .or_else(|_| set(OFFLOADS & !TUN_F_UFO))
            .or_else(|_| set(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6));
        if let Err(e) = r {
            return Err(("TUNSETOFFLOAD", e));
        }
        return Ok((file, name, uso));
    }
    Ok((file, name, false))
}

/// The largest frame a tap hands over (a 64 KiB GSO frame with its Ethernet header).
const MAX_FRAME: usize = 65536 + 4096;
/// Frames shorter than this give back the rest of their receive buffer.
const SHRINK_BELOW: usize = 4096;

/// Frames one drain of the tap takes at most before it hands them over.
const DRAIN_FRAMES: usize = 64;
/// Bytes after which a drain hands its frames over (so a run of 64 KiB GSO frames does not
/// hold back the first for long).
const DRAIN_BYTES: usize = 256 * 1024;

/// One tap queue's reader: waits for the fd, then reads the frames the kernel has (the fd is
/// non-blocking), each straight into the buffer it is handed on in (the vnet header into its
/// own array, with one `readv`): no copy in between. The frames of one drain (at most
/// [`DRAIN_FRAMES`] / [`DRAIN_BYTES`]) go to the path together, as one batch.
fn reader(file: &File, vnet_hdr: bool, stop: &AtomicBool, counters: &NetCounters, sinks: &Sinks) {
    crate::sched::data_thread();
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on our own tun fd.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl >= 0 {
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
    }
    let hlen = if vnet_hdr { VNET_HDR_LEN } else { 0 };
    let mut frame: Vec<u8> = Vec::with_capacity(MAX_FRAME);
    let mut hdr = [0u8; VNET_HDR_LEN];
    let mut got: Vec<FromNetdev> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, count 1.
        let r = unsafe { libc::poll(&mut pfd, 1, 100) };
        if r <= 0 {
            continue;
        }
        let mut bytes = 0usize;
        let mut end = false;
        loop {
            if got.len() >= DRAIN_FRAMES || bytes >= DRAIN_BYTES {
                counters
                    .rx_frames
                    .fetch_add(got.len() as u64, Ordering::Relaxed);
                sinks.deliver_many(std::mem::take(&mut got));
                bytes = 0;
                if stop.load(Ordering::Relaxed) {
                    return;
                }
            }
            if frame.capacity() < MAX_FRAME {
                frame = Vec::with_capacity(MAX_FRAME);
            }
            let iov = [
                libc::iovec {
                    iov_base: hdr.as_mut_ptr().cast(),
                    iov_len: hlen,
                },
                libc::iovec {
                    iov_base: frame.as_mut_ptr().cast(),
                    iov_len: frame.capacity(),
                },
            ];
            // SAFETY: both iovecs point at memory we own and may write for their lengths (the
            // header array; the frame's spare capacity, `len` is 0).
            let n = unsafe { libc::readv(fd, iov.as_ptr(), 2) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    std::io::ErrorKind::Interrupted => continue,
                    std::io::ErrorKind::WouldBlock => break,
                    _ => {
                        tracing::warn!("tap read: {e}");
                        end = true;
                        break;
                    }
                }
            }
            let n = n as usize;
            if n == 0 {
                end = true;
                break;
            }
            if n < hlen {
                continue;
            }
            // SAFETY: readv wrote `n - hlen` bytes into the frame's buffer (within capacity).
            unsafe { frame.set_len(n - hlen) };
            if frame.len() < SHRINK_BELOW {
                frame.shrink_to_fit();
            }
            bytes += frame.len();
            let f = std::mem::take(&mut frame);
            got.push(if vnet_hdr {
                FromNetdev::Vnet(hdr, f)
            } else {
                FromNetdev::Plain(f)
            });
        }
        counters
            .rx_frames
            .fetch_add(got.len() as u64, Ordering::Relaxed);
        sinks.deliver_many(std::mem::take(&mut got));
        if end {
            return;
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
        self.send_vnet_on(0, hdr, frame)
    }

    fn send_on(&self, q: usize, frame: &[u8]) -> std::io::Result<()> {
        if self.vnet_hdr {
            return self.write_parts(q, &[0; VNET_HDR_LEN], frame);
        }
        self.write_parts(q, &[], frame)
    }

    fn send_vnet_on(
        &self,
        q: usize,
        hdr: &[u8; VNET_HDR_LEN],
        frame: &[u8],
    ) -> std::io::Result<()> {
        if !self.vnet_hdr || (!self.uso && is_uso(hdr[1])) {
            let segs = crate::offload::to_plain(hdr, frame.to_vec())
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            for s in segs {
                self.send_on(q, &s)?;
            }
            return Ok(());
        }
        self.write_parts(q, hdr, frame)
    }

    fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        self.send_on(0, frame)
    }

    fn send_guest_iov_on(&self, q: usize, iov: &[libc::iovec]) -> Option<std::io::Result<()>> {
        if !self.vnet_hdr {
            return None;
        }
        if !self.uso {
            // A USO frame goes the copying way (cut in software): its gso_type is byte 1.
            let first = iov.iter().find(|v| v.iov_len > 0)?;
            // A header split after its first byte is taken as USO too (the copying way).
            let uso = first.iov_len <= 1
                // SAFETY: as below, the iovec covers readable guest memory of iov_len bytes.
                || is_uso(unsafe { *(first.iov_base as *const u8).add(1) });
            if uso {
                return None;
            }
        }
        let f = self.files.get(q % self.files.len().max(1))?;
        // SAFETY: the caller hands iovecs over guest memory mapped for the duration of the call
        // (readable; the tap only reads them); the fd is our tun device.
        let r = unsafe { libc::writev(f.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
        Some(self.after_write(if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }))
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({"ifname": self.ifname, "vnet_hdr": self.vnet_hdr, "uso": self.uso, "queues": self.files.len(), "counters": self.counters.json()})
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
    fn write_parts(&self, q: usize, hdr: &[u8], frame: &[u8]) -> std::io::Result<()> {
        let Some(f) = self.files.get(q % self.files.len().max(1)) else {
            return Ok(());
        };
        let mut w = &**f;
        let r = w
            .write_vectored(&[std::io::IoSlice::new(hdr), std::io::IoSlice::new(frame)])
            .map(|_| ());
        self.after_write(r)
    }

    /// Counts a write and turns "interface down / queue full" into a drop.
    fn after_write(&self, r: std::io::Result<()>) -> std::io::Result<()> {
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
