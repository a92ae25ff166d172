//! `filter-rewriter`: TCP sequence translation between the secondary guest (SVM) and the
//! primary's sequence space, so colo-compare can line up both guests' output.
//!
//! Per connection (keyed by [`ConnKey::normalized`], shared with the comparer) it keeps
//! `offset = SVM_ISN − PVM_ISN` (mod 2³²). Frames from the guest ([`Direction::Rx`]) get
//! `seq −= offset`; frames to the guest ([`Direction::Tx`]) get `ack += offset`; checksums are
//! recomputed. What differs from QEMU (reference section 3.5):
//! - connections the guest opens are translated too: the guest's SYN stashes its ISN, and the
//!   peer's SYN+ACK (which acknowledges the primary's ISN) yields the offset;
//! - close tracking compares sequence numbers in one space, so entries of closed connections
//!   are removed (also on RST) instead of leaking;
//! - IPv6 is handled like IPv4.
//!
//! Checkpoint: every offset becomes 0 (after a checkpoint the SVM is a copy of the PVM) and a
//! stashed but unused ISN is forgotten. Failover: existing connections keep being translated;
//! connections not yet tracked are passed through untouched and not tracked.

use std::collections::HashMap;
use std::net::IpAddr;

use colo_proto::packet::{ConnKey, IpProto, Network, Transport, parse_ethernet};
use smoltcp::wire::{IpAddress, TcpPacket, TcpSeqNumber};

use super::{Counters, Direction, Filter, Verdict};
use crate::offload::{F_NEEDS_CSUM, VnetHdr};

/// QEMU wipes its table beyond this many entries; we first drop untranslated ones.
pub const MAX_CONNECTIONS: usize = 16384;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum TcpState {
    /// The guest sent a SYN (it is the client).
    SynSent,
    /// The peer sent a SYN (the guest is the server).
    SynReceived,
    Established,
    /// At least one side sent a FIN.
    Closing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Conn {
    pub state: TcpState,
    /// SVM_ISN − PVM_ISN (mod 2³²).
    pub offset: u32,
    /// The guest's ISN, stashed until the offset can be computed.
    pub svm_isn: Option<u32>,
    /// Sequence number (primary space) just after the guest's FIN, once sent.
    pub guest_fin_end: Option<u32>,
    /// Sequence number just after the peer's FIN, once sent.
    pub peer_fin_end: Option<u32>,
}

#[derive(Default)]
pub struct FilterRewriter {
    conns: HashMap<ConnKey, Conn>,
    failover: bool,
    /// Offsets of the most recently closed connections: a guest may still retransmit its FIN
    /// (or the last ACK) after the close was seen, e.g. when the peer's ACK reaches it late;
    /// those stragglers are translated with the old offset. A new SYN on the key forgets it.
    closed: HashMap<ConnKey, u32>,
    closed_order: std::collections::VecDeque<ConnKey>,
}

/// How many closed connections' offsets are kept for stragglers.
const MAX_CLOSED: usize = 1024;

impl FilterRewriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// The tracked connection of a key (any direction).
    pub fn connection(&self, key: &ConnKey) -> Option<&Conn> {
        self.conns.get(&key.normalized().0)
    }

    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    fn trim(&mut self) {
        if self.conns.len() <= MAX_CONNECTIONS {
            return;
        }
        self.conns.retain(|_, c| c.offset != 0);
        if self.conns.len() > MAX_CONNECTIONS {
            tracing::warn!(
                "filter-rewriter: more than {MAX_CONNECTIONS} translated connections; table wiped"
            );
            self.conns.clear();
        }
    }
}

struct Seg {
    key: ConnKey,
    src: IpAddr,
    dst: IpAddr,
    l4: (usize, usize),
    seq: u32,
    ack: u32,
    syn: bool,
    ack_flag: bool,
    fin: bool,
    rst: bool,
    seq_len: u32,
}

fn tcp_segment(frame: &[u8]) -> Option<Seg> {
    let p = parse_ethernet(frame);
    let key = p.conn_key()?;
    let Network::Ip(ip, Transport::Tcp(t)) = &p.net else {
        return None;
    };
    if key.protocol != IpProto::TCP || ip.fragment.is_some_and(|f| f.offset != 0 || f.more) {
        return None;
    }
    Some(Seg {
        key,
        src: ip.src,
        dst: ip.dst,
        l4: (ip.l4_offset, ip.l4_end),
        seq: t.seq,
        ack: t.ack,
        syn: t.flags.syn(),
        ack_flag: t.flags.ack(),
        fin: t.flags.fin(),
        rst: t.flags.rst(),
        seq_len: t.seq_len(),
    })
}

fn ip_address(a: IpAddr) -> IpAddress {
    match a {
        IpAddr::V4(v) => IpAddress::Ipv4(v),
        IpAddr::V6(v) => IpAddress::Ipv6(v),
    }
}

/// Writes new seq/ack numbers and recomputes the TCP checksum, or, when the checksum is
/// `partial` (`NEEDS_CSUM`: the field holds the pseudo-header sum, which covers neither), leaves
/// it for whoever completes it (the tap, the guest, or [`crate::offload::to_plain`]).
fn rewrite(frame: &mut [u8], s: &Seg, seq: u32, ack: u32, partial: bool) -> bool {
    let Some(l4) = frame.get_mut(s.l4.0..s.l4.1) else {
        return false;
    };
    let Ok(mut tcp) = TcpPacket::new_checked(l4) else {
        return false;
    };
    tcp.set_seq_number(TcpSeqNumber(seq as i32));
    tcp.set_ack_number(TcpSeqNumber(ack as i32));
    if !partial {
        tcp.fill_checksum(&ip_address(s.src), &ip_address(s.dst));
    }
    true
}

impl Filter for FilterRewriter {
    fn kind(&self) -> &'static str {
        "filter-rewriter"
    }

    fn receive(&mut self, dir: Direction, frame: &mut Vec<u8>, c: &mut Counters) -> Verdict {
        self.translate(dir, frame, c, None)
    }

    /// TCP GSO frames (and partially checksummed ones) are translated whole: the sequence
    /// space of a 64 KiB frame is that of its segments.
    fn takes_offloaded(&self) -> bool {
        true
    }

    fn receive_offloaded(
        &mut self,
        dir: Direction,
        hdr: &mut VnetHdr,
        frame: &mut Vec<u8>,
        c: &mut Counters,
    ) -> Verdict {
        self.translate(dir, frame, c, Some(hdr))
    }

    fn checkpoint(&mut self) {
        for c in self.conns.values_mut() {
            c.offset = 0;
            c.svm_isn = None;
        }
        self.closed.clear();
        self.closed_order.clear();
    }

    fn failover(&mut self) -> bool {
        self.failover = true;
        self.conns.retain(|_, c| c.offset != 0);
        true
    }

    fn describe(&self) -> serde_json::Value {
        let translated = self.conns.values().filter(|c| c.offset != 0).count();
        serde_json::json!({
            "connections": self.conns.len(),
            "translated": translated,
            "failover": self.failover,
        })
    }
}

impl FilterRewriter {
    /// The translation of one frame; `hdr` is its virtio-net header when offloads are pending.
    fn translate(
        &mut self,
        dir: Direction,
        frame: &mut [u8],
        c: &mut Counters,
        hdr: Option<&VnetHdr>,
    ) -> Verdict {
        let Some(s) = tcp_segment(frame) else {
            return Verdict::Pass;
        };
        // A partial TCP checksum (pseudo-header sum only) stays partial.
        let partial = hdr.is_some_and(|h| {
            h.flags & F_NEEDS_CSUM != 0
                && usize::from(h.csum_start) == s.l4.0
                && h.csum_offset == 16
        });
        let (nkey, _) = s.key.normalized();
        let tracked = self.conns.contains_key(&nkey);
        if !tracked
            && !s.syn
            && let Some(&offset) = self.closed.get(&nkey)
        {
            // A straggler of a closed connection.
            let (seq, ack) = match dir {
                Direction::Rx => (s.seq.wrapping_sub(offset), s.ack),
                Direction::Tx if s.ack_flag => (s.seq, s.ack.wrapping_add(offset)),
                Direction::Tx => (s.seq, s.ack),
            };
            if (seq, ack) != (s.seq, s.ack) {
                if rewrite(frame, &s, seq, ack, partial) {
                    c.rewritten += 1;
                } else {
                    c.errors += 1;
                }
            }
            return Verdict::Pass;
        }
        if !tracked {
            let opens = s.syn && !s.ack_flag;
            if opens {
                self.closed.remove(&nkey);
            }
            if self.failover || !opens {
                return Verdict::Pass;
            }
            let conn = match dir {
                // The guest opens: stash its ISN.
                Direction::Rx => Conn {
                    state: TcpState::SynSent,
                    offset: 0,
                    svm_isn: Some(s.seq),
                    guest_fin_end: None,
                    peer_fin_end: None,
                },
                Direction::Tx => Conn {
                    state: TcpState::SynReceived,
                    offset: 0,
                    svm_isn: None,
                    guest_fin_end: None,
                    peer_fin_end: None,
                },
            };
            self.conns.insert(nkey, conn);
            self.trim();
            return Verdict::Pass;
        }
        let Some(conn) = self.conns.get_mut(&nkey) else {
            return Verdict::Pass;
        };
        let (mut seq, mut ack) = (s.seq, s.ack);
        let mut remove = s.rst;
        match dir {
            Direction::Rx => {
                if s.syn && s.ack_flag && conn.state == TcpState::SynReceived {
                    // The guest's SYN+ACK: its ISN, the offset comes with the peer's ACK.
                    conn.svm_isn = Some(s.seq);
                } else if s.syn && !s.ack_flag && conn.state == TcpState::SynSent {
                    conn.svm_isn = Some(s.seq); // a retransmitted or new SYN
                }
                if !s.syn {
                    seq = s.seq.wrapping_sub(conn.offset);
                }
                if s.fin {
                    conn.state = TcpState::Closing;
                    conn.guest_fin_end = Some(seq.wrapping_add(s.seq_len));
                }
                // The guest acknowledges the peer's FIN after sending its own: closed.
                if s.ack_flag
                    && conn.guest_fin_end.is_some()
                    && conn.peer_fin_end == Some(s.ack)
                    && !s.fin
                {
                    remove = true;
                }
            }
            Direction::Tx => {
                if s.syn && s.ack_flag && conn.state == TcpState::SynSent {
                    // Guest-opened connection: the peer acknowledges the primary's ISN.
                    if let Some(isn) = conn.svm_isn.take() {
                        conn.offset = isn.wrapping_sub(s.ack.wrapping_sub(1));
                    }
                    conn.state = TcpState::Established;
                } else if s.ack_flag && !s.syn && conn.state == TcpState::SynReceived {
                    // The peer's handshake ACK acknowledges the primary's ISN.
                    if let Some(isn) = conn.svm_isn.take() {
                        conn.offset = isn.wrapping_sub(s.ack.wrapping_sub(1));
                    }
                    conn.state = TcpState::Established;
                }
                if s.ack_flag {
                    ack = s.ack.wrapping_add(conn.offset);
                }
                if s.fin {
                    conn.state = TcpState::Closing;
                    conn.peer_fin_end = Some(s.seq.wrapping_add(s.seq_len));
                }
                // The peer acknowledges the guest's FIN (primary space) after sending its own.
                if s.ack_flag
                    && conn.peer_fin_end.is_some()
                    && conn.guest_fin_end == Some(s.ack)
                    && !s.fin
                {
                    remove = true;
                }
            }
        }
        // Reset connections keep their offset for stragglers too: a guest may still
        // retransmit a FIN it sent before the reset reached it, and that segment must come out
        // in the primary's sequence space like the rest of the connection.
        if remove
            && let Some(gone) = self.conns.remove(&nkey)
            && gone.offset != 0
        {
            if self.closed.insert(nkey, gone.offset).is_none() {
                self.closed_order.push_back(nkey);
            }
            while self.closed_order.len() > MAX_CLOSED {
                if let Some(k) = self.closed_order.pop_front() {
                    self.closed.remove(&k);
                }
            }
        }
        if (seq, ack) != (s.seq, s.ack) {
            if rewrite(frame, &s, seq, ack, partial) {
                c.rewritten += 1;
            } else {
                c.errors += 1;
            }
        }
        Verdict::Pass
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::entry;
    use super::super::*;
    use super::*;
    use colo_proto::packet::build::{Link, TcpSegment, tcp_frame};
    use colo_proto::packet::parse_ethernet;
    use smoltcp::wire::{EthernetFrame, Ipv4Packet};

    const S: u16 = 0x02;
    const A: u16 = 0x10;
    const F: u16 = 0x01;
    const R: u16 = 0x04;
    const P: u16 = 0x08;

    const GUEST: &str = "10.0.0.2:80";
    const CLIENT: &str = "10.0.0.9:40000";
    const PVM_ISN: u32 = 1_000;
    const SVM_ISN: u32 = 0xffff_ff00; // wraps when data flows
    const C_ISN: u32 = 5_000;

    /// A frame from the client to the guest (Tx) or from the guest to the client (Rx).
    fn seg(dir: Direction, seq: u32, ack: u32, flags: u16, payload: &[u8]) -> Vec<u8> {
        let (src, dst, link) = match dir {
            Direction::Tx => (CLIENT, GUEST, Link::default()),
            Direction::Rx => (GUEST, CLIENT, Link::default().reversed()),
        };
        tcp_frame(
            &link,
            &TcpSegment {
                src: src.parse().unwrap(),
                dst: dst.parse().unwrap(),
                seq,
                ack,
                flags,
                window: 1000,
                payload,
            },
        )
    }

    fn seq_ack(frame: &[u8]) -> (u32, u32) {
        let t = parse_ethernet(frame).tcp().cloned().unwrap();
        (t.seq, t.ack)
    }

    fn checksum_ok(frame: &[u8]) -> bool {
        let eth = EthernetFrame::new_checked(frame).unwrap();
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        tcp.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into())
    }

    fn chain() -> Chain {
        let mut c = Chain::new();
        c.insert(
            entry("rew0", QueueSel::All, Box::new(FilterRewriter::new())),
            &Position::Tail,
            Insert::Behind,
        )
        .unwrap();
        c
    }

    fn pass(c: &mut Chain, dir: Direction, f: Vec<u8>) -> Vec<u8> {
        match c.process(dir, f) {
            Outcome::Deliver(f) => f,
            Outcome::Consumed => panic!("rewriter consumed a frame"),
        }
    }

    /// A TCP GSO frame of the guest's answer (partial checksum: the pseudo-header sum only)
    /// is translated whole: seq moved into primary space, the partial checksum left as it is,
    /// and the segments the tap (here `to_plain`) cuts from it are valid and line up.
    #[test]
    fn gso_frame_is_translated_whole_and_its_partial_checksum_kept() {
        use crate::offload::{GSO_TCPV4, to_plain};
        use crate::vnet::ones_complement_sum;
        let mut c = chain();
        let (tx, rx) = (Direction::Tx, Direction::Rx);
        assert!(c.takes_offloaded(rx) && c.takes_offloaded(tx));
        pass(&mut c, tx, seg(tx, C_ISN, 0, S, b""));
        pass(&mut c, rx, seg(rx, SVM_ISN, C_ISN + 1, S | A, b""));
        pass(&mut c, tx, seg(tx, C_ISN + 1, PVM_ISN + 1, A, b""));
        let payload: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let mut f = seg(rx, SVM_ISN.wrapping_add(1), C_ISN + 1, A | P, &payload);
        let tcp_len = (f.len() - 34) as u16;
        let mut ph = f[26..34].to_vec();
        ph.extend_from_slice(&[0, 6]);
        ph.extend_from_slice(&tcp_len.to_be_bytes());
        let partial = ones_complement_sum(&ph).to_be_bytes();
        f[34 + 16..34 + 18].copy_from_slice(&partial);
        let mut h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: (f.len() - payload.len()) as u16,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        let out = match c.process_offloaded(rx, &mut h, f) {
            Outcome::Deliver(f) => f,
            Outcome::Consumed => panic!("consumed"),
        };
        assert_eq!(seq_ack(&out), (PVM_ISN + 1, C_ISN + 1));
        assert_eq!(out[34 + 16..34 + 18], partial, "partial checksum kept");
        let segs = to_plain(&h.to_bytes(), out).unwrap();
        assert_eq!(segs.len(), 20_000usize.div_ceil(1448));
        let mut seq = PVM_ISN + 1;
        for s in &segs {
            assert!(checksum_ok(s));
            assert_eq!(seq_ack(s).0, seq);
            seq += (s.len() - 54) as u32;
        }
        assert_eq!(seq, PVM_ISN + 1 + 20_000);
        // A frame without a partial checksum gets a full one, as before.
        let resp = pass(
            &mut c,
            rx,
            seg(rx, SVM_ISN.wrapping_add(20_001), C_ISN + 1, A, b"x"),
        );
        assert!(checksum_ok(&resp));
    }

    /// A connection to the guest's server: handshake, data both ways, passive close.
    #[test]
    fn server_connection_is_translated_into_primary_space_and_forgotten_on_close() {
        let mut c = chain();
        let tx = Direction::Tx;
        let rx = Direction::Rx;
        pass(&mut c, tx, seg(tx, C_ISN, 0, S, b""));
        // SVM answers with its own ISN; the handshake ACK acknowledges the PVM's ISN.
        let synack = pass(&mut c, rx, seg(rx, SVM_ISN, C_ISN + 1, S | A, b""));
        assert_eq!(seq_ack(&synack), (SVM_ISN, C_ISN + 1));
        let ack = pass(&mut c, tx, seg(tx, C_ISN + 1, PVM_ISN + 1, A, b""));
        assert_eq!(seq_ack(&ack), (C_ISN + 1, SVM_ISN.wrapping_add(1)));
        assert!(checksum_ok(&ack));
        // Request in, 300-byte answer out (crosses the 2^32 wrap in SVM space).
        let req = pass(&mut c, tx, seg(tx, C_ISN + 1, PVM_ISN + 1, A | P, b"GET /"));
        assert_eq!(seq_ack(&req).1, SVM_ISN.wrapping_add(1));
        let resp = pass(
            &mut c,
            rx,
            seg(rx, SVM_ISN.wrapping_add(1), C_ISN + 6, A | P, &[7; 300]),
        );
        assert_eq!(seq_ack(&resp), (PVM_ISN + 1, C_ISN + 6));
        assert!(checksum_ok(&resp));
        let ack2 = pass(&mut c, tx, seg(tx, C_ISN + 6, PVM_ISN + 301, A, b""));
        assert_eq!(seq_ack(&ack2).1, SVM_ISN.wrapping_add(301));
        assert_eq!(c.get("rew0").unwrap().counters.rewritten, 4);
        // Passive close: client FIN, guest FIN, client's last ACK removes the entry.
        pass(&mut c, tx, seg(tx, C_ISN + 6, PVM_ISN + 301, F | A, b""));
        let fin = pass(
            &mut c,
            rx,
            seg(rx, SVM_ISN.wrapping_add(301), C_ISN + 7, F | A, b""),
        );
        assert_eq!(seq_ack(&fin).0, PVM_ISN + 301);
        pass(&mut c, tx, seg(tx, C_ISN + 7, PVM_ISN + 302, A, b""));
        assert_eq!(c.query()[0]["state"]["connections"], 0);
        // The guest had not seen that ACK yet and retransmits its FIN: still translated.
        let again = pass(
            &mut c,
            rx,
            seg(rx, SVM_ISN.wrapping_add(301), C_ISN + 7, F | A, b""),
        );
        assert_eq!(seq_ack(&again).0, PVM_ISN + 301);
        assert!(checksum_ok(&again));
        // A checkpoint forgets closed connections too (offsets are 0 afterwards).
        c.checkpoint();
        let after = pass(
            &mut c,
            rx,
            seg(rx, SVM_ISN.wrapping_add(301), C_ISN + 7, F | A, b""),
        );
        assert_eq!(seq_ack(&after).0, SVM_ISN.wrapping_add(301));
    }

    #[test]
    fn guest_opened_connection_is_translated_too() {
        let mut c = chain();
        let (tx, rx) = (Direction::Tx, Direction::Rx);
        // The guest (SVM) connects out: its SYN carries SVM_ISN; the peer's SYN+ACK
        // acknowledges the primary guest's ISN.
        pass(&mut c, rx, seg(rx, SVM_ISN, 0, S, b""));
        let synack = pass(&mut c, tx, seg(tx, C_ISN, PVM_ISN + 1, S | A, b""));
        assert_eq!(seq_ack(&synack), (C_ISN, SVM_ISN.wrapping_add(1)));
        assert!(checksum_ok(&synack));
        let out = pass(
            &mut c,
            rx,
            seg(rx, SVM_ISN.wrapping_add(1), C_ISN + 1, A | P, b"hi"),
        );
        assert_eq!(seq_ack(&out), (PVM_ISN + 1, C_ISN + 1));
        // RST forgets it.
        pass(&mut c, tx, seg(tx, C_ISN + 1, PVM_ISN + 3, R | A, b""));
        assert_eq!(c.query()[0]["state"]["connections"], 0);
        // A FIN the guest sent before the reset reached it still comes out in primary space.
        let fin = pass(
            &mut c,
            rx,
            seg(rx, SVM_ISN.wrapping_add(3), C_ISN + 1, F | A, b""),
        );
        assert_eq!(seq_ack(&fin).0, PVM_ISN + 3);
        assert!(checksum_ok(&fin));
    }

    #[test]
    fn checkpoint_zeroes_offsets_and_failover_keeps_old_connections_only() {
        let mut c = chain();
        let (tx, rx) = (Direction::Tx, Direction::Rx);
        pass(&mut c, tx, seg(tx, C_ISN, 0, S, b""));
        pass(&mut c, rx, seg(rx, SVM_ISN, C_ISN + 1, S | A, b""));
        pass(&mut c, tx, seg(tx, C_ISN + 1, PVM_ISN + 1, A, b""));
        let out = pass(
            &mut c,
            rx,
            seg(rx, SVM_ISN.wrapping_add(1), C_ISN + 1, A, b"x"),
        );
        assert_eq!(seq_ack(&out).0, PVM_ISN + 1);
        c.failover();
        assert!(
            c.get("rew0").unwrap().status,
            "the rewriter stays on after failover"
        );
        let out = pass(
            &mut c,
            rx,
            seg(rx, SVM_ISN.wrapping_add(2), C_ISN + 1, A, b"y"),
        );
        assert_eq!(
            seq_ack(&out).0,
            PVM_ISN + 2,
            "old connection still translated"
        );
        // A new connection after failover is neither tracked nor touched.
        let mut other = seg(tx, 1, 0, S, b"");
        other[14 + 20 + 1] ^= 1; // another client port
        let before = other.clone();
        assert_eq!(pass(&mut c, tx, other), before);
        assert_eq!(c.query()[0]["state"]["connections"], 1);
        c.checkpoint();
        let out = pass(&mut c, rx, seg(rx, 77, C_ISN + 1, A, b"z"));
        assert_eq!(seq_ack(&out).0, 77, "offsets are zero after a checkpoint");
    }

    #[test]
    fn non_tcp_and_garbage_pass_untouched() {
        let mut c = chain();
        for f in [
            vec![],
            vec![0xff; 13],
            vec![0; 60],
            seg(Direction::Tx, 1, 2, A, b"")[..40].to_vec(),
        ] {
            assert_eq!(pass(&mut c, Direction::Tx, f.clone()), f);
        }
    }
}
