//! The comparison engine: pure logic, no I/O. Frames go in with the time they arrived (a
//! `Duration` since any fixed epoch), decisions come out.
//!
//! Per flow (an IP connection in the guest's egress direction, or a non-IP class of frames) the
//! engine keeps a primary and a secondary FIFO queue. A primary frame leaves (`Release`) only
//! when the secondary produced the same output, or when a checkpoint made the secondary a copy
//! of the primary (`checkpoint_done`). Differences, timeouts and full queues request a
//! checkpoint (`Checkpoint`); every decision carries its reason.
//!
//! What is compared, and how this differs from QEMU's colo-compare:
//! - **TCP** is compared as a byte stream in sequence space: each primary segment's sequence
//!   range (SYN, payload bytes, FIN) must be covered by the secondary's segments with identical
//!   content, however the two sides segmented it (GSO/TSO sizes, coalesced retransmissions).
//!   TCP/IP headers (ack, window, options, checksums, IP id/TTL) are ignored, as in QEMU.
//!   Sequence arithmetic is wrap-safe (QEMU's sort is not). The secondary's sequence space is
//!   aligned on the SYN/SYN-ACK pair (so captures with different ISNs match even without
//!   filter-rewriter), or head-to-head on the first segments when no handshake was seen.
//!   The handshake offset is only provisional: a filter-rewriter leaves the secondary's
//!   SYN-ACK alone (its ISN) but rewrites every later segment into the primary's sequence
//!   space. So the first secondary segment after the SYN that carries data, FIN or RST
//!   decides: if its seq equals the primary's seq of stream byte 0 (ISN + 1) without offset,
//!   the offset becomes 0 for the rest of the connection (rewritten); otherwise the handshake
//!   offset stays (independent captures). The SYN itself is compared ignoring its ISN.
//!   After a checkpoint the secondary is a copy of the primary, so the offset becomes 0 (unless
//!   [`Engine::keep_seq_alignment_across_checkpoints`] is set, for offline replay of two
//!   independent captures, where it stays).
//! - **Pure ACKs** (no payload, no SYN/FIN/RST) carry no application output: a primary pure ACK
//!   is released as soon as it reaches the head of its connection's queue (never ahead of held
//!   data, unlike QEMU which releases them out of order or holds them until the timeout), and a
//!   secondary pure ACK is dropped at once. **SYN and FIN** occupy sequence space and are
//!   compared like data (a FIN where the other side sends data is a divergence); **RST** must
//!   be matched by a secondary RST at the same stream position.
//! - A missing secondary segment (gap) is **waited for** until `compare_timeout`; QEMU
//!   declares a mismatch at once whenever the secondary trails.
//! - **UDP, ICMP, ICMPv6, other IP** are compared by transport header + payload up to the IP
//!   length (Ethernet padding ignored; the IP header ignored, also for "other" protocols where
//!   QEMU compares the whole frame and so trips on IP ids). **ARP** is compared by its 28-byte
//!   body, **other EtherTypes and unparseable frames** byte for byte. QEMU waves IPv6, ARP,
//!   VLAN-tagged and unparseable primary frames through uncompared. VLAN-tagged frames are
//!   compared too (the VLAN id is part of the flow).
//! - **FIFO** everywhere: per flow, primary frames are released in arrival order (QEMU compares
//!   non-TCP newest-first and its output queue can reverse).
//! - **Timeouts** are exact per frame (`next_deadline`), not rounded up to the scan cycle; a
//!   secondary frame that waits `compare_timeout` for a primary twin is a divergence too.
//! - **Bounded memory without loss**: a queue that reaches `max_queue_size` requests a
//!   checkpoint (QEMU silently drops the primary frame). Primary frames keep being accepted
//!   up to twice the limit; past that, the oldest is released uncompared (`Overflow`) rather
//!   than lost. Secondary frames beyond the limit are dropped. Idle flows with empty queues
//!   expire (scan every `expired_scan_cycle`); QEMU never expires connections and wipes all of
//!   them, queued frames included, at 16384.
//! - Checkpoint requests are **coalesced**: one per checkpoint, repeated only if the checkpoint
//!   is not done within another `compare_timeout` (QEMU sends one per failing comparison).

mod conn;
mod decision;
mod stats;

use std::collections::HashMap;
use std::time::Duration;

use colo_proto::frame::Frame;

use conn::{Conn, Kind, classify};
pub use decision::{CheckpointReason, Decision, DropReason, Flow, ReleaseReason, Side, to_hex};
pub use stats::{CheckpointCounts, Stats};

use decision::millis;

/// An idle flow with empty queues is forgotten after this long.
pub const IDLE_FLOW_EXPIRY: Duration = Duration::from_secs(60);
/// A TCP connection whose primary sent FIN or RST is forgotten after this long idle (long
/// enough for late or retransmitted secondary segments to still be recognised as stale).
pub const CLOSED_FLOW_EXPIRY: Duration = Duration::from_secs(10);

/// Options of the comparer, named and defaulted as QEMU's `colo-compare` object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CompareConfig {
    /// Longest a frame waits for its twin before a checkpoint is requested (QEMU: 3000 ms).
    pub compare_timeout: Duration,
    /// Period of the expiry scan (QEMU: 1000 ms).
    pub expired_scan_cycle: Duration,
    /// Frames per queue (per flow and side) before a checkpoint is requested (QEMU: 1024).
    pub max_queue_size: usize,
    /// Whether the framing carries a virtio-net header length (QEMU: off). The engine itself
    /// skips `Frame::vnet_hdr_len` bytes either way; this is for the I/O around it.
    pub vnet_hdr_support: bool,
}

impl Default for CompareConfig {
    fn default() -> Self {
        CompareConfig {
            compare_timeout: Duration::from_millis(3000),
            expired_scan_cycle: Duration::from_millis(1000),
            max_queue_size: 1024,
            vnet_hdr_support: false,
        }
    }
}

/// Output side of the engine: decisions, counters, checkpoint coalescing.
#[derive(Debug, Default)]
pub(crate) struct Sink {
    pub(crate) out: Vec<Decision>,
    pub(crate) stats: Stats,
    /// When the outstanding checkpoint request was emitted.
    pending_since: Option<Duration>,
}

impl Sink {
    pub(crate) fn release(&mut self, frame: Frame, flow: &Flow, reason: ReleaseReason) {
        let s = &mut self.stats;
        s.released += 1;
        match reason {
            ReleaseReason::Matched => {
                s.released_matched += 1;
                s.matched += 1;
            }
            ReleaseReason::PureAck => s.released_pure_ack += 1,
            ReleaseReason::AlreadyVerified => s.released_already_verified += 1,
            ReleaseReason::Flushed => s.released_flushed += 1,
            ReleaseReason::Overflow => s.released_overflow += 1,
        }
        self.out.push(Decision::Release {
            frame,
            conn: flow.conn(),
            reason,
        });
    }

    pub(crate) fn drop_secondary(&mut self, frame: Frame, flow: &Flow, reason: DropReason) {
        self.stats.dropped += 1;
        if reason == DropReason::QueueFull {
            self.stats.dropped_queue_full += 1;
        }
        self.out.push(Decision::DropSecondary {
            frame,
            conn: flow.conn(),
            reason,
        });
    }

    /// Requests a checkpoint unless one is outstanding (and not yet overdue).
    pub(crate) fn request(&mut self, reason: CheckpointReason, now: Duration, timeout: Duration) {
        if let Some(since) = self.pending_since
            && now.saturating_sub(since) < timeout
        {
            self.stats.checkpoints.coalesced += 1;
            return;
        }
        self.pending_since = Some(now);
        let c = &mut self.stats.checkpoints;
        match reason {
            CheckpointReason::Timeout { .. } => c.timeout += 1,
            CheckpointReason::PayloadDiffers { .. } => c.payload_differs += 1,
            CheckpointReason::TcpControlDiffers { .. } => c.tcp_control_differs += 1,
            CheckpointReason::QueueFull { .. } => c.queue_full += 1,
        }
        tracing::debug!(%reason, "checkpoint requested");
        self.out.push(Decision::Checkpoint { reason });
    }
}

/// The comparison engine. See the module documentation for the rules.
#[derive(Debug)]
pub struct Engine {
    cfg: CompareConfig,
    conns: HashMap<Flow, Conn>,
    sink: Sink,
    last_scan: Option<Duration>,
    keep_alignment: bool,
}

impl Engine {
    /// A new engine with no flows.
    pub fn new(cfg: CompareConfig) -> Self {
        Engine {
            cfg: CompareConfig {
                max_queue_size: cfg.max_queue_size.max(1),
                ..cfg
            },
            conns: HashMap::new(),
            sink: Sink::default(),
            last_scan: None,
            keep_alignment: false,
        }
    }

    /// The configuration in force (`max_queue_size` is at least 1).
    pub fn config(&self) -> &CompareConfig {
        &self.cfg
    }

    /// Keep each TCP connection's primary/secondary sequence offset across checkpoints.
    ///
    /// Live, a checkpoint makes the secondary a copy of the primary, so afterwards both use the
    /// primary's sequence numbers (offset 0, the default behaviour). When replaying two captures
    /// taken independently, the secondary capture never went through the checkpoint and keeps
    /// its own ISN: set this so the offset learned from the handshake stays in force.
    pub fn keep_seq_alignment_across_checkpoints(&mut self, keep: bool) {
        self.keep_alignment = keep;
    }

    fn conn_mut(&mut self, flow: Flow, now: Duration) -> &mut Conn {
        if self.last_scan.is_none() {
            self.last_scan = Some(now);
        }
        let stats = &mut self.sink.stats;
        let c = self.conns.entry(flow).or_insert_with(|| {
            stats.connections_total += 1;
            Conn::new(flow, now)
        });
        c.last_active = now;
        c
    }

    /// A frame from the primary arrived at `now`.
    pub fn on_primary(&mut self, frame: Frame, now: Duration) {
        self.sink.stats.primary_in += 1;
        let (flow, kind) = classify(&frame);
        let max = self.cfg.max_queue_size;
        let timeout = self.cfg.compare_timeout;
        self.conn_mut(flow, now);
        let Some(conn) = self.conns.get_mut(&flow) else {
            return;
        };
        if conn.primary.len() >= max {
            self.sink.request(
                CheckpointReason::QueueFull {
                    conn: flow,
                    side: Side::Primary,
                },
                now,
                timeout,
            );
            while conn.primary.len() >= 2 * max {
                if let Some(e) = conn.primary.pop_front() {
                    conn.note_released(&e);
                    self.sink.release(e.frame, &flow, ReleaseReason::Overflow);
                }
            }
        }
        conn.push_primary(frame, kind, now);
        self.compare(flow, now);
    }

    /// A frame from the secondary arrived at `now`.
    pub fn on_secondary(&mut self, frame: Frame, now: Duration) {
        self.sink.stats.secondary_in += 1;
        let (flow, kind) = classify(&frame);
        let max = self.cfg.max_queue_size;
        let timeout = self.cfg.compare_timeout;
        self.conn_mut(flow, now);
        let Some(conn) = self.conns.get_mut(&flow) else {
            return;
        };
        if let Kind::Tcp(seg) = &kind
            && seg.is_pure_ack()
        {
            self.sink.drop_secondary(frame, &flow, DropReason::PureAck);
            return;
        }
        if conn.diverged {
            self.sink
                .drop_secondary(frame, &flow, DropReason::AfterDivergence);
            return;
        }
        if conn.secondary.len() >= max {
            self.sink.request(
                CheckpointReason::QueueFull {
                    conn: flow,
                    side: Side::Secondary,
                },
                now,
                timeout,
            );
            self.sink
                .drop_secondary(frame, &flow, DropReason::QueueFull);
            return;
        }
        conn.push_secondary(frame, kind, now, &mut self.sink);
        self.compare(flow, now);
    }

    fn compare(&mut self, flow: Flow, now: Duration) {
        let timeout = self.cfg.compare_timeout;
        let Some(conn) = self.conns.get_mut(&flow) else {
            return;
        };
        if conn.diverged {
            return;
        }
        if let Some(reason) = conn.compare(&mut self.sink) {
            conn.diverged = true;
            self.sink.request(reason, now, timeout);
            // Secondary frames of a diverged flow are useless until the checkpoint.
            while let Some(e) = conn.secondary.pop_front() {
                self.sink
                    .drop_secondary(e.frame, &flow, DropReason::AfterDivergence);
            }
        }
    }

    /// Time passed: fires timeouts and the periodic expiry scan. Call it at `next_deadline`
    /// (calling it more often is harmless).
    pub fn on_tick(&mut self, now: Duration) {
        let timeout = self.cfg.compare_timeout;
        // The oldest waiting frame over all flows (ties broken by flow order, so the outcome
        // does not depend on hash order).
        let mut oldest: Option<(Duration, Flow, Side)> = None;
        for (flow, c) in &self.conns {
            for (side, q) in [(Side::Primary, &c.primary), (Side::Secondary, &c.secondary)] {
                if let Some(e) = q.front()
                    && now.saturating_sub(e.at) >= timeout
                {
                    let cand = (e.at, *flow, side);
                    if oldest.is_none_or(|o| (cand.0, cand.1) < (o.0, o.1)) {
                        oldest = Some(cand);
                    }
                }
            }
        }
        if let Some((at, flow, side)) = oldest {
            self.sink.request(
                CheckpointReason::Timeout {
                    conn: flow,
                    side,
                    waited_ms: millis(now.saturating_sub(at)),
                },
                now,
                timeout,
            );
        }
        let due = self
            .last_scan
            .is_none_or(|t| now.saturating_sub(t) >= self.cfg.expired_scan_cycle);
        if due {
            self.last_scan = Some(now);
            self.expire(now);
        }
    }

    fn expire(&mut self, now: Duration) {
        let timeout = self.cfg.compare_timeout;
        let before = self.conns.len();
        self.conns.retain(|_, c| {
            let idle = now.saturating_sub(c.last_active);
            let empty = c.primary.is_empty() && c.secondary.is_empty() && !c.diverged;
            !(empty
                && (idle >= IDLE_FLOW_EXPIRY
                    || (c.closed() && idle >= CLOSED_FLOW_EXPIRY.max(3 * timeout))))
        });
        self.sink.stats.connections_expired += (before - self.conns.len()) as u64;
    }

    /// A checkpoint completed: release every held primary frame (per flow in arrival order)
    /// and drop every held secondary frame. Flow state (TCP alignment) is kept; the secondary's
    /// sequence offset becomes 0 unless `keep_seq_alignment_across_checkpoints` is set.
    pub fn checkpoint_done(&mut self, now: Duration) {
        let _ = now;
        self.sink.stats.checkpoints_done += 1;
        self.sink.pending_since = None;
        let mut flows: Vec<Flow> = self.conns.keys().copied().collect();
        flows.sort_unstable();
        for flow in flows {
            if let Some(c) = self.conns.get_mut(&flow) {
                c.flush(&mut self.sink, self.keep_alignment);
            }
        }
    }

    /// Decisions taken since the last call, in order.
    pub fn take_decisions(&mut self) -> Vec<Decision> {
        std::mem::take(&mut self.sink.out)
    }

    /// When `on_tick` next has something to do (a frame reaching `compare_timeout`, a repeated
    /// checkpoint request, or the expiry scan); `None` when nothing is tracked.
    pub fn next_deadline(&self) -> Option<Duration> {
        let timeout = self.cfg.compare_timeout;
        let mut frame_deadline: Option<Duration> = None;
        for c in self.conns.values() {
            for e in [c.primary.front(), c.secondary.front()]
                .into_iter()
                .flatten()
            {
                let d = e.at + timeout;
                frame_deadline = Some(frame_deadline.map_or(d, |x| x.min(d)));
            }
        }
        if let (Some(d), Some(since)) = (frame_deadline, self.sink.pending_since) {
            frame_deadline = Some(d.max(since + timeout));
        }
        let scan = if self.conns.is_empty() {
            None
        } else {
            Some(
                self.last_scan
                    .map_or(Duration::ZERO, |t| t + self.cfg.expired_scan_cycle),
            )
        };
        match (frame_deadline, scan) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether a checkpoint request is outstanding (emitted, `checkpoint_done` not yet called).
    pub fn checkpoint_pending(&self) -> bool {
        self.sink.pending_since.is_some()
    }

    /// Counters, with queue depths and flow counts as of now.
    pub fn stats(&self) -> Stats {
        let mut s = self.sink.stats.clone();
        s.connections = self.conns.len() as u64;
        for c in self.conns.values() {
            s.primary_queued += c.primary.len() as u64;
            s.secondary_queued += c.secondary.len() as u64;
            s.max_queue_depth = s
                .max_queue_depth
                .max(c.primary.len() as u64)
                .max(c.secondary.len() as u64);
        }
        s
    }
}

#[cfg(test)]
mod tests;
