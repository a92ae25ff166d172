//! One flow: its two queues and the comparison rules.

use std::collections::VecDeque;
use std::time::Duration;

use colo_proto::frame::Frame;
use colo_proto::packet::{Network, Transport, parse_frame};

use super::Sink;
use super::decision::{CheckpointReason, DropReason, Flow, ReleaseReason};

/// Bytes of each side shown in a `PayloadDiffers` reason.
const EXCERPT_LEN: usize = 16;
/// Absolute stream position given to the alignment point (far from 0 so that positions before
/// it stay representable).
const ABS_BASE: u64 = 1 << 40;

/// A TCP segment's comparison-relevant fields. `data` indexes `Frame::payload`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TcpSeg {
    pub seq: u32,
    pub data_start: usize,
    pub data_len: usize,
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
}

impl TcpSeg {
    /// Sequence space occupied: SYN + payload + FIN.
    pub fn seq_len(&self) -> u64 {
        u64::from(self.syn) + self.data_len as u64 + u64::from(self.fin)
    }
    /// No sequence space and no RST: nothing an application produced.
    pub fn is_pure_ack(&self) -> bool {
        self.seq_len() == 0 && !self.rst
    }
}

/// How a frame is compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// In TCP sequence space.
    Tcp(TcpSeg),
    /// By these bytes of `Frame::payload`.
    Bytes { start: usize, end: usize },
}

/// A queued frame.
#[derive(Debug)]
pub(crate) struct Entry {
    pub frame: Frame,
    pub at: Duration,
    pub kind: Kind,
    /// TCP: absolute position up to which this primary segment is already verified.
    pub progress: u64,
}

impl Entry {
    fn bytes(&self) -> &[u8] {
        match self.kind {
            Kind::Bytes { start, end } => self.frame.payload.get(start..end).unwrap_or(&[]),
            Kind::Tcp(t) => self
                .frame
                .payload
                .get(t.data_start..t.data_start + t.data_len)
                .unwrap_or(&[]),
        }
    }
    fn tcp(&self) -> Option<TcpSeg> {
        match self.kind {
            Kind::Tcp(t) => Some(t),
            Kind::Bytes { .. } => None,
        }
    }
}

/// Parses a frame into its flow and comparison kind.
pub(crate) fn classify(frame: &Frame) -> (Flow, Kind) {
    let p = parse_frame(frame);
    let whole = Kind::Bytes {
        start: 0,
        end: frame.payload.len(),
    };
    // The parser succeeded only when vnet_hdr_len <= payload.len(), so `base` is in range.
    let base = p.vnet_hdr.len();
    let vlan = p.vlan();
    match &p.net {
        Network::Ip(ip, t) => {
            let Some(key) = p.conn_key() else {
                return (Flow::Malformed, whole);
            };
            match t {
                Transport::Tcp(t) => (
                    Flow::Ip(key),
                    Kind::Tcp(TcpSeg {
                        seq: t.seq,
                        data_start: base + ip.l4_offset + t.header_len,
                        data_len: t.payload.len(),
                        syn: t.flags.syn(),
                        ack: t.flags.ack(),
                        fin: t.flags.fin(),
                        rst: t.flags.rst(),
                    }),
                ),
                // A TCP header that does not parse must not mix with the flow's segments.
                Transport::Malformed { .. } => (Flow::Malformed, whole),
                _ => (
                    Flow::Ip(key),
                    Kind::Bytes {
                        start: base + ip.l4_offset,
                        end: base + ip.l4_end,
                    },
                ),
            }
        }
        Network::Arp(a) => {
            let start = base + p.l3_offset;
            (
                Flow::Arp { vlan },
                Kind::Bytes {
                    start,
                    end: start + a.bytes.len(),
                },
            )
        }
        Network::Other { ethertype, .. } => (
            Flow::Ether {
                vlan,
                ethertype: *ethertype,
            },
            Kind::Bytes {
                start: base,
                end: frame.payload.len(),
            },
        ),
        Network::Malformed { .. } => (Flow::Malformed, whole),
    }
}

/// TCP sequence alignment of a connection.
#[derive(Clone, Copy, Debug)]
struct Align {
    /// Secondary seq − primary seq (mod 2^32).
    delta: u32,
    /// A primary seq and its absolute position; kept at `verified` so that positions within
    /// ±2 GiB of it unwrap correctly however long the stream runs.
    ref_seq: u32,
    ref_abs: u64,
    /// Everything below this absolute position has been compared (or flushed).
    verified: u64,
    /// Absolute position of stream byte 0 (after the SYN if aligned on one).
    base: u64,
    /// The offset comes from the SYN/SYN-ACK pair and is not yet confirmed by a later
    /// secondary segment (it may be 0 after all, if a filter-rewriter sits in between).
    pending: bool,
}

impl Align {
    fn new(p_seq: u32, s_seq: u32, syn: bool) -> Self {
        Align {
            delta: s_seq.wrapping_sub(p_seq),
            ref_seq: p_seq,
            ref_abs: ABS_BASE,
            verified: ABS_BASE,
            base: ABS_BASE + u64::from(syn),
            pending: syn && s_seq != p_seq,
        }
    }
    /// The primary seq at an absolute position.
    fn seq_at(&self, abs: u64) -> u32 {
        self.ref_seq
            .wrapping_add((abs.wrapping_sub(self.ref_abs)) as u32)
    }
    /// Decides a pending handshake offset from the first secondary segment after the
    /// handshake (no SYN; data, FIN or RST): if its seq is the primary's seq of stream byte 0
    /// without offset, the secondary's output was already rewritten into the primary's
    /// sequence space (filter-rewriter) and the offset becomes 0; otherwise the handshake
    /// offset stays (independent captures).
    fn resolve(&mut self, s: &TcpSeg) {
        if self.pending && !s.syn && (s.seq_len() > 0 || s.rst) {
            if s.seq == self.seq_at(self.base) {
                self.delta = 0;
            }
            self.pending = false;
        }
    }
    fn abs(&self, p_seq: u32) -> u64 {
        let d = i64::from(p_seq.wrapping_sub(self.ref_seq) as i32);
        self.ref_abs.saturating_add_signed(d)
    }
    /// Absolute range of a primary segment.
    fn p_range(&self, s: &TcpSeg) -> (u64, u64) {
        let a = self.abs(s.seq);
        (a, a + s.seq_len())
    }
    /// Absolute range of a secondary segment.
    fn s_range(&self, s: &TcpSeg) -> (u64, u64) {
        let a = self.abs(s.seq.wrapping_sub(self.delta));
        (a, a + s.seq_len())
    }
    fn advance(&mut self, to: u64) {
        if to > self.verified {
            self.ref_seq = self.ref_seq.wrapping_add((to - self.ref_abs) as u32);
            self.ref_abs = to;
            self.verified = to;
        }
    }
    fn offset(&self, abs: u64) -> u64 {
        abs.saturating_sub(self.base)
    }
}

/// What occupies one sequence position of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Item {
    Syn,
    /// Payload from this index of the segment's payload.
    Data(usize),
    Fin,
}

impl Item {
    fn name(self) -> &'static str {
        match self {
            Item::Syn => "syn",
            Item::Data(_) => "data",
            Item::Fin => "fin",
        }
    }
}

fn item_at(seg: &TcpSeg, start: u64, pos: u64) -> Item {
    let rel = pos - start;
    if seg.syn && rel == 0 {
        return Item::Syn;
    }
    let i = (rel - u64::from(seg.syn)) as usize;
    if i < seg.data_len {
        Item::Data(i)
    } else {
        Item::Fin
    }
}

/// Per-connection TCP state.
#[derive(Debug, Default)]
struct TcpState {
    align: Option<Align>,
    /// Seq of the primary's SYN the alignment came from.
    p_syn: Option<u32>,
    /// Seq of the secondary's SYN it was matched with (its own ISN: a filter-rewriter leaves
    /// the SYN-ACK alone), to recognise the secondary's retransmissions of it.
    s_syn: Option<u32>,
    /// A primary FIN or RST was released.
    closed: bool,
}

/// One flow.
#[derive(Debug)]
pub(crate) struct Conn {
    flow: Flow,
    pub primary: VecDeque<Entry>,
    pub secondary: VecDeque<Entry>,
    /// A divergence was found; everything waits for `checkpoint_done`.
    pub diverged: bool,
    pub last_active: Duration,
    tcp: TcpState,
}

/// Outcome of one step of the comparison loop.
enum Step {
    /// Something was released; look again.
    Progress,
    /// Nothing more can be decided now.
    Wait,
    /// The flow diverged.
    Diverged(CheckpointReason),
}

impl Conn {
    pub fn new(flow: Flow, now: Duration) -> Self {
        Conn {
            flow,
            primary: VecDeque::new(),
            secondary: VecDeque::new(),
            diverged: false,
            last_active: now,
            tcp: TcpState::default(),
        }
    }

    pub fn closed(&self) -> bool {
        self.tcp.closed
    }

    pub fn push_primary(&mut self, frame: Frame, kind: Kind, at: Duration) {
        self.primary.push_back(Entry {
            frame,
            at,
            kind,
            progress: 0,
        });
    }

    /// Queues a secondary frame, or drops it at once when it is TCP data entirely below what
    /// was already compared (a retransmission, or stale after a flush), or a retransmission of
    /// the secondary's SYN once that was compared.
    pub fn push_secondary(&mut self, frame: Frame, kind: Kind, at: Duration, sink: &mut Sink) {
        if let (Kind::Tcp(t), Some(al)) = (kind, self.tcp.align.as_ref())
            && (self.is_compared_syn(&t, al)
                || self.is_late_fin(&t)
                || (!al.pending && t.seq_len() > 0 && al.s_range(&t).1 <= al.verified))
        {
            sink.drop_secondary(frame, &self.flow, DropReason::AlreadyVerified);
            return;
        }
        self.secondary.push_back(Entry {
            frame,
            at,
            kind,
            progress: 0,
        });
    }

    /// A bare secondary SYN (or SYN-ACK) with the ISN of the one the alignment was made on,
    /// after that SYN was compared: a retransmission. Its ISN is the secondary's own, so once
    /// the offset resolved to 0 (filter-rewriter) its sequence range says nothing; QEMU drops
    /// secondary segments without payload unconditionally.
    fn is_compared_syn(&self, s: &TcpSeg, al: &Align) -> bool {
        s.syn
            && s.data_len == 0
            && !s.fin
            && !s.rst
            && self.tcp.s_syn == Some(s.seq)
            && al.verified >= al.base
    }

    /// A bare secondary FIN after the primary's FIN (or RST) was released: a retransmission
    /// of a FIN that was compared (or of one the connection no longer needs), whatever its
    /// sequence number says (a filter-rewriter that already forgot the connection leaves it in
    /// the secondary's own space). Nothing the guest produces can follow it; QEMU drops
    /// secondary segments without payload unconditionally.
    fn is_late_fin(&self, s: &TcpSeg) -> bool {
        self.tcp.closed && s.fin && s.data_len == 0 && !s.syn && !s.rst
    }

    /// Bookkeeping for a primary frame that leaves without comparison.
    pub fn note_released(&mut self, e: &Entry) {
        if let Kind::Tcp(t) = e.kind {
            if t.fin || t.rst {
                self.tcp.closed = true;
            }
            if let Some(al) = self.tcp.align.as_mut() {
                let (_, end) = al.p_range(&t);
                al.advance(end);
            }
        }
    }

    /// Runs the comparison as far as it goes. Returns the divergence, if one was found.
    pub fn compare(&mut self, sink: &mut Sink) -> Option<CheckpointReason> {
        loop {
            let step = match self.primary.front().map(|e| e.kind) {
                None => return None,
                Some(Kind::Tcp(seg)) => self.tcp_step(seg, sink),
                Some(Kind::Bytes { .. }) => self.bytes_step(sink),
            };
            match step {
                Step::Progress => {}
                Step::Wait => return None,
                Step::Diverged(r) => return Some(r),
            }
        }
    }

    fn release_front(&mut self, sink: &mut Sink, reason: ReleaseReason) {
        if let Some(e) = self.primary.pop_front() {
            if let Kind::Tcp(t) = e.kind
                && (t.fin || t.rst)
            {
                self.tcp.closed = true;
            }
            sink.release(e.frame, &self.flow, reason);
        }
    }

    /// Non-TCP: the oldest primary frame is matched with the oldest secondary frame that has
    /// the same bytes. If none has, and the oldest secondary frame is not the twin of a later
    /// primary frame either (primary-side reordering, which is waited for), the flow diverged.
    fn bytes_step(&mut self, sink: &mut Sink) -> Step {
        let Some(p) = self.primary.front() else {
            return Step::Wait;
        };
        let pb = p.bytes();
        if let Some(i) = self
            .secondary
            .iter()
            .position(|s| matches!(s.kind, Kind::Bytes { .. }) && s.bytes() == pb)
        {
            if let Some(s) = self.secondary.remove(i) {
                sink.drop_secondary(s.frame, &self.flow, DropReason::Matched);
            }
            self.release_front(sink, ReleaseReason::Matched);
            return Step::Progress;
        }
        let Some(s0) = self
            .secondary
            .iter()
            .find(|s| matches!(s.kind, Kind::Bytes { .. }))
        else {
            return Step::Wait;
        };
        let sb = s0.bytes();
        if self.primary.iter().skip(1).any(|q| q.bytes() == sb) {
            return Step::Wait;
        }
        let off = pb
            .iter()
            .zip(sb)
            .position(|(a, b)| a != b)
            .unwrap_or(pb.len().min(sb.len()));
        Step::Diverged(CheckpointReason::PayloadDiffers {
            conn: self.flow,
            byte_offset: off as u64,
            primary_excerpt: excerpt(pb, off),
            secondary_excerpt: excerpt(sb, off),
        })
    }

    /// TCP: see the module documentation of `engine`.
    fn tcp_step(&mut self, ps: TcpSeg, sink: &mut Sink) -> Step {
        if ps.is_pure_ack() {
            self.release_front(sink, ReleaseReason::PureAck);
            return Step::Progress;
        }
        // Alignment of the secondary's sequence space.
        if ps.syn {
            let retransmitted = self.tcp.align.is_some() && self.tcp.p_syn == Some(ps.seq);
            if !retransmitted {
                let twin = self.secondary.iter().find_map(|e| {
                    e.tcp()
                        .filter(|s| s.syn && s.ack == ps.ack && !s.rst)
                        .map(|s| s.seq)
                });
                match twin {
                    Some(s_seq) => {
                        self.tcp.align = Some(Align::new(ps.seq, s_seq, true));
                        self.tcp.p_syn = Some(ps.seq);
                        self.tcp.s_syn = Some(s_seq);
                        if let Some(p) = self.primary.front_mut() {
                            p.progress = 0;
                        }
                    }
                    None => return Step::Wait,
                }
            }
        } else if self.tcp.align.is_none() {
            let Some(s) = self
                .secondary
                .iter()
                .find_map(|e| e.tcp().filter(|s| !s.is_pure_ack()))
            else {
                return Step::Wait;
            };
            if s.syn {
                return Step::Diverged(CheckpointReason::TcpControlDiffers {
                    conn: self.flow,
                    byte_offset: 0,
                    primary: if ps.data_len > 0 {
                        "data"
                    } else if ps.fin {
                        "fin"
                    } else {
                        "rst"
                    },
                    secondary: "syn",
                });
            }
            self.tcp.align = Some(Align::new(ps.seq, s.seq, false));
        }
        let Some(mut al) = self.tcp.align else {
            return Step::Wait;
        };
        if al.pending && al.verified >= al.base {
            // The SYN was compared: decide the offset from the first later secondary segment.
            if let Some(s) = self
                .secondary
                .iter()
                .find_map(|e| e.tcp().filter(|s| !s.syn && (s.seq_len() > 0 || s.rst)))
            {
                al.resolve(&s);
                self.tcp.align = Some(al);
            }
        }
        let (pa, pe) = al.p_range(&ps);
        if ps.seq_len() > 0 && pe <= al.verified {
            self.release_front(sink, ReleaseReason::AlreadyVerified);
            self.drop_consumed_secondary(sink, al.verified, al.verified, &al);
            return Step::Progress;
        }
        let Some(p) = self.primary.front() else {
            return Step::Wait;
        };
        let pdata = p.bytes();
        let mut cur = pa.max(al.verified).max(p.progress);
        while cur < pe {
            let pi = item_at(&ps, pa, cur);
            let Some((s, sa)) = self.secondary.iter().find_map(|e| {
                let s = e.tcp()?;
                let (sa, se) = al.s_range(&s);
                (sa <= cur && cur < se).then_some((e, sa))
            }) else {
                break;
            };
            let Some(ss) = s.tcp() else {
                break;
            };
            let si = item_at(&ss, sa, cur);
            match (pi, si) {
                (Item::Syn, Item::Syn) | (Item::Fin, Item::Fin) => cur += 1,
                (Item::Data(i), Item::Data(j)) => {
                    let sdata = s.bytes();
                    let a = pdata.get(i..).unwrap_or(&[]);
                    let b = sdata.get(j..).unwrap_or(&[]);
                    let n = a.len().min(b.len());
                    if let Some(k) = a[..n].iter().zip(&b[..n]).position(|(x, y)| x != y) {
                        return Step::Diverged(CheckpointReason::PayloadDiffers {
                            conn: self.flow,
                            byte_offset: al.offset(cur + k as u64),
                            primary_excerpt: excerpt(a, k),
                            secondary_excerpt: excerpt(b, k),
                        });
                    }
                    // n >= 1: both items are data at `cur`.
                    cur += n.max(1) as u64;
                }
                (pi, si) => {
                    return Step::Diverged(CheckpointReason::TcpControlDiffers {
                        conn: self.flow,
                        byte_offset: al.offset(cur),
                        primary: pi.name(),
                        secondary: si.name(),
                    });
                }
            }
        }
        if cur < pe {
            if let Some(p) = self.primary.front_mut() {
                p.progress = cur;
            }
            return Step::Wait;
        }
        // A RST must be matched by a secondary RST at the same stream position.
        let mut rst_twin = None;
        if ps.rst {
            rst_twin = self
                .secondary
                .iter()
                .position(|e| e.tcp().is_some_and(|s| s.rst && al.s_range(&s).1 == pe));
            if rst_twin.is_none() {
                let covering = self.secondary.iter().find_map(|e| {
                    let s = e.tcp()?;
                    let (sa, se) = al.s_range(&s);
                    (sa <= pe && pe < se).then(|| item_at(&s, sa, pe))
                });
                if let Some(si) = covering {
                    return Step::Diverged(CheckpointReason::TcpControlDiffers {
                        conn: self.flow,
                        byte_offset: al.offset(pe),
                        primary: "rst",
                        secondary: si.name(),
                    });
                }
                if let Some(p) = self.primary.front_mut() {
                    p.progress = cur;
                }
                return Step::Wait;
            }
        }
        self.release_front(sink, ReleaseReason::Matched);
        let old = al.verified;
        al.advance(pe);
        self.tcp.align = Some(al);
        if let Some(i) = rst_twin
            && let Some(s) = self.secondary.remove(i)
        {
            sink.drop_secondary(s.frame, &self.flow, DropReason::Matched);
        }
        self.drop_consumed_secondary(sink, old, al.verified, &al);
        Step::Progress
    }

    /// Drops secondary segments that lie entirely below `verified`: `Matched` if they reach
    /// past `old` (they were just compared), `AlreadyVerified` otherwise.
    fn drop_consumed_secondary(&mut self, sink: &mut Sink, old: u64, verified: u64, al: &Align) {
        let mut i = 0;
        while i < self.secondary.len() {
            let done = self.secondary[i].tcp().and_then(|s| {
                if al.pending && !s.syn {
                    // Its sequence space is not known yet.
                    return None;
                }
                let (_, se) = al.s_range(&s);
                if s.seq_len() > 0 && se <= verified {
                    return Some(se);
                }
                // A retransmitted SYN whose ISN no longer maps below `verified`, or a FIN
                // retransmitted after the close.
                (self.is_compared_syn(&s, al) || self.is_late_fin(&s)).then_some(old)
            });
            match done {
                Some(se) => {
                    if let Some(e) = self.secondary.remove(i) {
                        let reason = if se > old {
                            DropReason::Matched
                        } else {
                            DropReason::AlreadyVerified
                        };
                        sink.drop_secondary(e.frame, &self.flow, reason);
                    }
                }
                None => i += 1,
            }
        }
    }

    /// `checkpoint_done`: release all primary frames, drop all secondary frames.
    pub fn flush(&mut self, sink: &mut Sink, keep_alignment: bool) {
        while let Some(e) = self.primary.pop_front() {
            self.note_released(&e);
            sink.release(e.frame, &self.flow, ReleaseReason::Flushed);
        }
        while let Some(e) = self.secondary.pop_front() {
            sink.drop_secondary(e.frame, &self.flow, DropReason::Flushed);
        }
        self.diverged = false;
        if !keep_alignment && let Some(al) = self.tcp.align.as_mut() {
            al.delta = 0;
            al.pending = false;
        }
    }
}

fn excerpt(b: &[u8], from: usize) -> Vec<u8> {
    let from = from.min(b.len());
    b[from..(from + EXCERPT_LEN).min(b.len())].to_vec()
}
