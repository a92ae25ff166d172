//! What the engine decides, and why.

use std::time::Duration;

use colo_proto::frame::Frame;
use colo_proto::packet::ConnKey;
use serde::Serialize;

/// Which input a frame came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// The primary VM's output (`primary_in`).
    Primary,
    /// The secondary VM's output (`secondary_in`).
    Secondary,
}

/// The comparison unit a frame belongs to: an IP connection, or a non-IP class of frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Flow {
    /// An IP connection (TCP, UDP, ICMP, ICMPv6, other IP protocols), in the guest's egress
    /// direction.
    Ip(ConnKey),
    /// Ethernet/IPv4 ARP on a VLAN (or untagged).
    Arp {
        /// Outer VLAN id.
        vlan: Option<u16>,
    },
    /// Another EtherType on a VLAN (or untagged).
    Ether {
        /// Outer VLAN id.
        vlan: Option<u16>,
        /// EtherType after the tags.
        ethertype: u16,
    },
    /// Frames that do not parse (runts, broken headers): compared byte for byte.
    Malformed,
}

impl Flow {
    /// The IP connection key, if this flow is one.
    pub fn conn(&self) -> Option<ConnKey> {
        match self {
            Flow::Ip(k) => Some(*k),
            _ => None,
        }
    }
}

impl std::fmt::Display for Flow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Flow::Ip(k) => write!(f, "{k}"),
            Flow::Arp { vlan: Some(v) } => write!(f, "vlan{v} arp"),
            Flow::Arp { vlan: None } => write!(f, "arp"),
            Flow::Ether {
                vlan: Some(v),
                ethertype,
            } => write!(f, "vlan{v} ethertype 0x{ethertype:04x}"),
            Flow::Ether {
                vlan: None,
                ethertype,
            } => write!(f, "ethertype 0x{ethertype:04x}"),
            Flow::Malformed => f.write_str("malformed frames"),
        }
    }
}

/// Why a primary frame was released to the outside world.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseReason {
    /// The secondary produced the same output.
    Matched,
    /// A TCP segment that occupies no sequence space (pure ACK / window update): it carries no
    /// application output, so it leaves uncompared, but only in order behind the connection's
    /// earlier held frames.
    PureAck,
    /// A TCP retransmission of data that was already compared and released.
    AlreadyVerified,
    /// Released by `checkpoint_done` (the secondary now holds the primary's state).
    Flushed,
    /// The connection's primary queue passed twice `max_queue_size` while a checkpoint was
    /// requested and not yet done: its oldest frame leaves uncompared rather than being lost.
    Overflow,
}

/// Why a secondary frame was dropped (secondary frames never leave).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// Its content matched primary output that was released.
    Matched,
    /// A TCP pure ACK: nothing to compare.
    PureAck,
    /// TCP data below what was already compared (retransmission or stale after a flush).
    AlreadyVerified,
    /// Dropped by `checkpoint_done`.
    Flushed,
    /// The connection's secondary queue was full.
    QueueFull,
    /// The connection already diverged; a checkpoint will resynchronise it.
    AfterDivergence,
}

/// Why a checkpoint is requested.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointReason {
    /// A frame waited `compare_timeout` for its twin. `side` is the side whose frame waited:
    /// primary output the secondary never produced, or secondary output the primary never did.
    Timeout {
        /// The flow.
        conn: Flow,
        /// Which side's frame waited.
        side: Side,
        /// How long it waited, in milliseconds.
        waited_ms: u64,
    },
    /// Primary and secondary output differ. For TCP `byte_offset` counts stream bytes after the
    /// SYN (or after the alignment point when no handshake was seen); otherwise it is the offset
    /// inside the compared bytes (transport header + payload for IP, ARP body, whole frame).
    PayloadDiffers {
        /// The flow.
        conn: Flow,
        /// First differing byte.
        byte_offset: u64,
        /// Up to 16 primary bytes from `byte_offset`.
        #[serde(serialize_with = "hex")]
        primary_excerpt: Vec<u8>,
        /// Up to 16 secondary bytes from `byte_offset`.
        #[serde(serialize_with = "hex")]
        secondary_excerpt: Vec<u8>,
    },
    /// TCP control differs at the same stream position: e.g. one side closes (FIN) or resets
    /// (RST) where the other sends data, or one opens (SYN) where the other does not.
    TcpControlDiffers {
        /// The flow.
        conn: Flow,
        /// Stream byte offset (as for `PayloadDiffers`).
        byte_offset: u64,
        /// What the primary has there (`data`, `syn`, `fin`, `rst`).
        primary: &'static str,
        /// What the secondary has there.
        secondary: &'static str,
    },
    /// A connection's queue reached `max_queue_size`.
    QueueFull {
        /// The flow.
        conn: Flow,
        /// Which queue.
        side: Side,
    },
}

impl CheckpointReason {
    /// A short stable name (`timeout`, `payload_differs`, `tcp_control_differs`, `queue_full`).
    pub fn name(&self) -> &'static str {
        match self {
            CheckpointReason::Timeout { .. } => "timeout",
            CheckpointReason::PayloadDiffers { .. } => "payload_differs",
            CheckpointReason::TcpControlDiffers { .. } => "tcp_control_differs",
            CheckpointReason::QueueFull { .. } => "queue_full",
        }
    }
}

impl std::fmt::Display for CheckpointReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckpointReason::Timeout {
                conn,
                side,
                waited_ms,
            } => write!(
                f,
                "timeout: {side:?} frame of {conn} waited {waited_ms} ms for its twin"
            ),
            CheckpointReason::PayloadDiffers {
                conn,
                byte_offset,
                primary_excerpt,
                secondary_excerpt,
            } => write!(
                f,
                "payload differs at byte {byte_offset} of {conn}: primary {} secondary {}",
                to_hex(primary_excerpt),
                to_hex(secondary_excerpt)
            ),
            CheckpointReason::TcpControlDiffers {
                conn,
                byte_offset,
                primary,
                secondary,
            } => write!(
                f,
                "TCP differs at byte {byte_offset} of {conn}: primary has {primary}, secondary has {secondary}"
            ),
            CheckpointReason::QueueFull { conn, side } => {
                write!(f, "queue full: {side:?} queue of {conn}")
            }
        }
    }
}

/// Lower-case hex of `bytes`, space-free.
pub fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn hex<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&to_hex(bytes))
}

/// One decision of the engine. Decisions come out in the order they were taken; per flow,
/// primary frames are released in the order they arrived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Send this primary frame to `outdev`.
    Release {
        /// The frame, as received.
        frame: Frame,
        /// Its IP connection, if it is IP.
        conn: Option<ConnKey>,
        /// Why.
        reason: ReleaseReason,
    },
    /// This secondary frame is done with.
    DropSecondary {
        /// The frame, as received.
        frame: Frame,
        /// Its IP connection, if it is IP.
        conn: Option<ConnKey>,
        /// Why.
        reason: DropReason,
    },
    /// Ask the checkpoint engine for a checkpoint (then call `Engine::checkpoint_done`).
    /// Requests are coalesced: while one is outstanding, no new one is emitted unless it stays
    /// outstanding for another `compare_timeout`.
    Checkpoint {
        /// Why.
        reason: CheckpointReason,
    },
}

/// Milliseconds in a duration, saturating.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
