//! Netdevs: where frames go when they leave the filter chain towards the outside, and where
//! frames towards the guest come from. Spelled like QEMU's `-netdev`:
//!
//! - `tap,id=hn0,ifname=tap0[,script=PATH|no][,downscript=PATH|no]`: a Linux tap device
//!   (`/dev/net/tun`, `IFF_TAP|IFF_NO_PI`); the scripts run with the interface name, like
//!   QEMU's ifup/ifdown. `vnet_hdr=on` (the default, as QEMU's when the kernel has it) opens it
//!   with `IFF_VNET_HDR` (12-byte header, `TUNSETOFFLOAD` CSUM/TSO4/TSO6): offloaded frames
//!   pass between guest and tap as they are while the filter chain is empty.
//! - every kind takes `queues=N` (1..=16): the device's queue pairs (`VIRTIO_NET_F_MQ`); a tap
//!   opens one `IFF_MULTI_QUEUE` queue per pair, the others are fed by all pairs.
//! - `stream,id=s0,server=on|off,addr.type=unix,addr.path=P` or
//!   `addr.type=inet,addr.host=H,addr.port=N[,reconnect=SECS]`: frames over a byte stream, each
//!   behind a 4-byte big-endian length, as QEMU's `-netdev stream` and socket chardevs.
//! - `dgram,id=d0,local.type=inet,local.host=H,local.port=N,remote.type=inet,remote.host=H,
//!   remote.port=N` (or `*.type=unix,*.path=P`): one frame per datagram, as QEMU's `-netdev dgram`.
//! - `user,id=n0[,net=10.0.2.0/24][,host=10.0.2.2][,guest=10.0.2.15][,hostfwd=tcp:ADDR:PORT-:GPORT]...`:
//!   a userspace network on smoltcp (see [`user`]); outbound NAT and DNS (`dns=`,
//!   `restrict=on|off`, ours: `x-dns-upstream=IP:PORT`, `x-connect-timeout=SECS`) in [`user_nat`],
//!   ping sockets and ICMP errors in [`user_icmp`].

pub mod dgram;
pub mod dhcp;
pub mod stream;
pub mod tap;
pub mod user;
pub mod user_icmp;
pub mod user_nat;

use std::sync::Arc;

use crate::filter::{FilterError, ObjectSpec};

/// Called with every frame the netdev receives from the outside (towards the guest).
pub type Deliver = Arc<dyn Fn(Vec<u8>) + Send + Sync>;

/// Called with every frame a netdev with vnet headers receives, with its virtio-net header.
pub type DeliverVnet = Arc<dyn Fn([u8; crate::vnet::VNET_HDR_LEN], Vec<u8>) + Send + Sync>;

/// Called with frames that came together (one socket read, one drain of a tap), in order; the
/// path takes them through the chain as one batch ([`crate::path::NetPath::from_netdev_batch`]).
pub type DeliverBatch = Arc<dyn Fn(Vec<FromNetdev>) + Send + Sync>;

pub use crate::path::FromNetdev;

/// Where a netdev hands the frames it receives.
#[derive(Clone)]
pub struct Sinks {
    /// One plain frame.
    pub one: Deliver,
    /// One frame with its virtio-net header (netdevs with vnet headers); without it such
    /// frames are made plain and go to `one`.
    pub vnet: Option<DeliverVnet>,
    /// Several frames at once; without it they go one by one.
    pub batch: Option<DeliverBatch>,
}

impl Sinks {
    /// Hands over frames that came together: as one batch when there are several and a batch
    /// sink exists, else one by one.
    pub fn deliver_many(&self, frames: Vec<FromNetdev>) {
        if let Some(b) = &self.batch
            && frames.len() > 1
        {
            return b(frames);
        }
        for f in frames {
            self.deliver_one(f);
        }
    }

    /// Hands over one frame.
    pub fn deliver_one(&self, f: FromNetdev) {
        match f {
            FromNetdev::Plain(f) => (self.one)(f),
            FromNetdev::Vnet(h, f) => match &self.vnet {
                Some(v) => v(h, f),
                None => {
                    if let Ok(segs) = crate::offload::to_plain(&h, f) {
                        for s in segs {
                            (self.one)(s);
                        }
                    }
                }
            },
        }
    }
}

/// Errors of netdev creation and I/O.
#[derive(Debug, thiserror::Error)]
pub enum NetdevError {
    #[error("netdev {id}: {msg}")]
    Config { id: String, msg: String },
    #[error("netdev {id}: {what}: {source}")]
    Io {
        id: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Spec(#[from] FilterError),
    #[error("netdev {id}: {source}")]
    Chardev {
        id: String,
        #[source]
        source: colo_proto::chardev::ChardevError,
    },
}

/// A started netdev.
pub trait Netdev: Send + Sync {
    fn id(&self) -> &str;
    fn kind(&self) -> &'static str;
    /// Sends one frame to the outside. A netdev without a peer drops it (`Ok`).
    fn send(&self, frame: &[u8]) -> std::io::Result<()>;
    /// True when the netdev carries virtio-net headers (a tap with `vnet_hdr=on`): it takes
    /// [`Netdev::send_vnet`] frames with offloads as they are, and hands received frames with
    /// their header to the `deliver_vnet` sink.
    fn vnet_hdr(&self) -> bool {
        false
    }
    /// Sends one frame with its virtio-net header. Netdevs without vnet headers get the plain
    /// frame(s) (checksum completed, GSO frames segmented in software).
    fn send_vnet(
        &self,
        hdr: &[u8; crate::vnet::VNET_HDR_LEN],
        frame: &[u8],
    ) -> std::io::Result<()> {
        let segs = crate::offload::to_plain(hdr, frame.to_vec())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        for s in segs {
            self.send(&s)?;
        }
        Ok(())
    }
    /// Sends on queue `q` (a multi-queue tap has one per queue pair; others have one).
    fn send_on(&self, _q: usize, frame: &[u8]) -> std::io::Result<()> {
        self.send(frame)
    }
    /// [`Netdev::send_vnet`] on queue `q`.
    fn send_vnet_on(
        &self,
        _q: usize,
        hdr: &[u8; crate::vnet::VNET_HDR_LEN],
        frame: &[u8],
    ) -> std::io::Result<()> {
        self.send_vnet(hdr, frame)
    }
    /// Writes one frame straight from the guest's transmit buffers on queue `q`: `iov` is the
    /// whole descriptor chain, the 12-byte virtio-net header first, which a netdev with vnet
    /// headers of that size takes as its own (one `writev`, no copy). `None` when the netdev
    /// cannot (the caller copies the frame and uses [`Netdev::send_vnet_on`]).
    fn send_guest_iov_on(&self, _q: usize, _iov: &[libc::iovec]) -> Option<std::io::Result<()>> {
        None
    }
    /// Releases the netdev before the process exits (the tap runs its `downscript=`).
    fn shutdown(&self) {}
    /// Counters for `query-netdevs`-like reports.
    fn describe(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

/// Parses `-netdev TYPE,id=...,...` and starts it; received frames go to `deliver`.
pub fn open(spec: &str, deliver: Deliver) -> Result<Arc<dyn Netdev>, NetdevError> {
    open_with(spec, deliver, None)
}

/// As [`open`]; a netdev with vnet headers hands its frames (with their header) to
/// `deliver_vnet` when given (else they are made plain and go to `deliver`).
pub fn open_with(
    spec: &str,
    deliver: Deliver,
    deliver_vnet: Option<DeliverVnet>,
) -> Result<Arc<dyn Netdev>, NetdevError> {
    open_sinks(
        spec,
        Sinks {
            one: deliver,
            vnet: deliver_vnet,
            batch: None,
        },
    )
}

/// Opens the netdev of `path`: its frames go to the path, several that came together as one
/// batch ([`crate::path::NetPath::from_netdev_batch`]).
pub fn open_for_path(
    spec: &str,
    path: Arc<crate::path::NetPath>,
) -> Result<Arc<dyn Netdev>, NetdevError> {
    let (p, pv, pb) = (path.clone(), path.clone(), path);
    open_sinks(
        spec,
        Sinks {
            one: Arc::new(move |f| p.from_netdev(f)),
            vnet: Some(Arc::new(move |h, f| pv.from_netdev_hdr(h, f))),
            batch: Some(Arc::new(move |frames| pb.from_netdev_batch(frames))),
        },
    )
}

/// As [`open_with`], with every sink given.
pub fn open_sinks(spec: &str, sinks: Sinks) -> Result<Arc<dyn Netdev>, NetdevError> {
    let mut spec = ObjectSpec::parse_cli(spec)?;
    if spec.qom_type != "tap" {
        // One netdev fed by all queue pairs.
        take_queues(&mut spec)?;
    }
    match spec.qom_type.as_str() {
        "tap" => Ok(tap::Tap::open(spec, sinks)?),
        "stream" => Ok(stream::StreamNetdev::open(spec, sinks)?),
        "dgram" => Ok(dgram::DgramNetdev::open(spec, sinks)?),
        "user" => Ok(user::UserNetdev::open(spec, sinks.one)?),
        other => Err(NetdevError::Config {
            id: spec.id.clone(),
            msg: format!("unknown netdev type {other:?} (tap, stream, dgram, user)"),
        }),
    }
}

/// `queues=N` of a netdev spec (1 when absent): the device's queue pairs. A tap opens one queue
/// per pair (`IFF_MULTI_QUEUE`); the other netdevs are fed by all pairs.
pub fn take_queues(spec: &mut ObjectSpec) -> Result<usize, NetdevError> {
    let Some(v) = spec.take("queues") else {
        return Ok(1);
    };
    match v.parse::<usize>() {
        Ok(n) if (1..=crate::backend::MAX_QUEUE_PAIRS).contains(&n) => Ok(n),
        _ => Err(NetdevError::Config {
            id: spec.id.clone(),
            msg: format!(
                "queues={v}: expected 1 to {}",
                crate::backend::MAX_QUEUE_PAIRS
            ),
        }),
    }
}

/// Builds a chardev-style spec string from QEMU's `addr.type=...` socket-address options
/// under `prefix` (`addr`, `local`, `remote`).
pub(crate) fn socket_address(
    spec: &mut ObjectSpec,
    prefix: &str,
) -> Result<Option<colo_proto::chardev::SocketAddress>, NetdevError> {
    let id = spec.id.clone();
    let Some(ty) = spec.take(&format!("{prefix}.type")) else {
        return Ok(None);
    };
    match ty.as_str() {
        "unix" => {
            let path = spec
                .take(&format!("{prefix}.path"))
                .ok_or_else(|| NetdevError::Config {
                    id,
                    msg: format!("{prefix}.type=unix needs {prefix}.path"),
                })?;
            Ok(Some(colo_proto::chardev::SocketAddress::Unix(path.into())))
        }
        "inet" => {
            let host = spec
                .take(&format!("{prefix}.host"))
                .unwrap_or_else(|| "0.0.0.0".into());
            let port = spec
                .take(&format!("{prefix}.port"))
                .ok_or_else(|| NetdevError::Config {
                    id: id.clone(),
                    msg: format!("{prefix}.type=inet needs {prefix}.port"),
                })?;
            let port = port.parse().map_err(|_| NetdevError::Config {
                id,
                msg: format!("{prefix}.port={port}: not a port number"),
            })?;
            Ok(Some(colo_proto::chardev::SocketAddress::Tcp { host, port }))
        }
        other => Err(NetdevError::Config {
            id,
            msg: format!("{prefix}.type={other}: expected unix or inet"),
        }),
    }
}

/// Counts frames in and out.
#[derive(Debug, Default)]
pub struct NetCounters {
    pub rx_frames: std::sync::atomic::AtomicU64,
    pub tx_frames: std::sync::atomic::AtomicU64,
    pub tx_dropped: std::sync::atomic::AtomicU64,
}

impl NetCounters {
    pub fn json(&self) -> serde_json::Value {
        use std::sync::atomic::Ordering::Relaxed;
        serde_json::json!({
            "from_outside": self.rx_frames.load(Relaxed),
            "to_outside": self.tx_frames.load(Relaxed),
            "to_outside_dropped": self.tx_dropped.load(Relaxed),
        })
    }
}
