//! Checksum and segmentation offloads done in software.
//!
//! A guest that negotiated `VIRTIO_NET_F_CSUM` / `HOST_TSO4` / `HOST_TSO6` hands the device
//! frames with a partial checksum (`VIRTIO_NET_HDR_F_NEEDS_CSUM`: the pseudo-header sum is in
//! the checksum field, the rest from `csum_start` on is still to be added) and TCP frames of up
//! to 64 KiB to be cut into `gso_size` pieces (`gso_type` TCPV4/TCPV6). A tap with vnet
//! headers gives the same kinds of frames towards the guest. Wherever a frame must be plain —
//! the filter chain (the comparer and the rewriter compare and edit real segments), a netdev
//! without vnet headers, a guest that did not negotiate the offload — [`to_plain`] turns it
//! into complete, checksummed Ethernet frames, as the NIC or the kernel would have sent them:
//! each segment gets the headers of the original with the IPv4 total length and identification
//! (incremented per segment), the IPv6 payload length, the TCP sequence number advanced, FIN
//! and PSH only on the last segment, CWR only on the first, and fresh IPv4 and TCP checksums.
//!
//! ECN (`VIRTIO_NET_HDR_GSO_ECN`, negotiated as `HOST_ECN` / `GUEST_ECN`): the flag says the
//! frame's TCP header may carry CWR and the segmenter must keep it on the first segment only,
//! which is what Linux's `tcp_gso_segment` does for classic ECN (it keeps CWR on every segment
//! only for Accurate ECN, `SKB_GSO_TCP_ACCECN`, which has no virtio GSO type: such frames are
//! segmented before they reach a virtio device or a tap); the frame is otherwise cut as any
//! TCP GSO frame.
//!
//! UDP: a `GSO_UDP` (UFO, `HOST_UFO` / `GUEST_UFO`) frame is one UDP datagram of up to 64 KiB
//! to be sent as IP fragments ([`to_plain`] fragments it: IPv4 fragments with the datagram's
//! identification, MF and offsets in `gso_size & !7` steps, options without the copy bit
//! blanked after the first; IPv6 with a fragment header and an unpredictable identification),
//! as Linux's UFO did and as its tap still does for UFO frames written to it. A `GSO_UDP_L4`
//! (USO) frame is cut into UDP datagrams of `gso_size` bytes of payload, each with its own UDP
//! header, length and checksum.

use smoltcp::wire::{
    EthernetFrame, EthernetProtocol, IpAddress, IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket,
    UdpPacket,
};

use crate::vnet::{VNET_HDR_LEN, complete_checksum};

/// `flags`: the checksum from `csum_start` on has to be completed.
pub const F_NEEDS_CSUM: u8 = 1;
/// `flags`: the checksum has been verified (towards the guest).
pub const F_DATA_VALID: u8 = 2;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_UDP: u8 = 3;
pub const GSO_TCPV6: u8 = 4;
/// UDP segmentation (USO, virtio 1.2 `VIRTIO_NET_HDR_GSO_UDP_L4`).
pub const GSO_UDP_L4: u8 = 5;
pub const GSO_ECN: u8 = 0x80;

/// Errors of [`to_plain`] (the frame is dropped and counted by the caller).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OffloadError {
    #[error("virtio-net header shorter than 10 bytes")]
    ShortHeader,
    #[error("GSO type {0:#x} not supported")]
    GsoType(u8),
    #[error("GSO frame is not Ethernet/{0} TCP")]
    NotTcp(&'static str),
    #[error("UDP GSO frame is not Ethernet/{0} UDP")]
    NotUdp(&'static str),
    #[error("GSO frame too short or malformed")]
    Malformed,
}

/// The fields of a virtio-net header (little endian, as virtio 1.0 has it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn parse(b: &[u8]) -> Result<Self, OffloadError> {
        if b.len() < 10 {
            return Err(OffloadError::ShortHeader);
        }
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Ok(Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }

    /// The 12-byte header (`num_buffers` 0; the receive path fills it in).
    pub fn to_bytes(self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }

    /// True when the frame needs nothing done: no partial checksum, no segmentation.
    pub fn is_plain(&self) -> bool {
        self.flags & F_NEEDS_CSUM == 0 && self.gso_type & !GSO_ECN == GSO_NONE
    }

    /// The `VIRTIO_NET_F_*` feature bits a receiver must have negotiated to take this frame
    /// as it is (`GUEST_CSUM`, `GUEST_TSO4`, `GUEST_TSO6`, `GUEST_ECN`, `GUEST_UFO`).
    pub fn guest_features_needed(&self) -> u64 {
        let mut f = 0;
        if self.flags & F_NEEDS_CSUM != 0 {
            f |= 1 << 1;
        }
        match self.gso_type & !GSO_ECN {
            GSO_TCPV4 => f |= 1 << 1 | 1 << 7,
            GSO_TCPV6 => f |= 1 << 1 | 1 << 8,
            GSO_UDP => f |= 1 << 1 | 1 << 10,
            // GUEST_USO4 and GUEST_USO6 (not offered: such frames are cut in software).
            GSO_UDP_L4 => f |= 1 << 1 | 1 << 54 | 1 << 55,
            _ => {}
        }
        if self.gso_type & GSO_ECN != 0 {
            f |= 1 << 9;
        }
        f
    }
}

/// The frame described by `hdr` as plain, checksummed Ethernet frames (one, or the segments of
/// a GSO frame).
pub fn to_plain(hdr: &[u8], mut frame: Vec<u8>) -> Result<Vec<Vec<u8>>, OffloadError> {
    let h = VnetHdr::parse(hdr)?;
    match h.gso_type & !GSO_ECN {
        GSO_NONE => {
            complete_checksum(hdr, &mut frame);
            fix_udp_zero(&h, &mut frame);
            Ok(vec![frame])
        }
        GSO_TCPV4 | GSO_TCPV6 => segment_tcp(&h, &frame),
        GSO_UDP => fragment_udp(&h, frame),
        GSO_UDP_L4 => segment_udp(&h, &frame),
        other => Err(OffloadError::GsoType(other)),
    }
}

/// A UDP checksum that computes to 0 is sent as 0xffff (0 means "none").
fn fix_udp_zero(h: &VnetHdr, frame: &mut [u8]) {
    if h.flags & F_NEEDS_CSUM == 0 || h.csum_offset != 6 {
        return;
    }
    let at = h.csum_start as usize + 6;
    if frame.get(at..at + 2) == Some(&[0, 0]) && l4_is_udp(frame) {
        frame[at..at + 2].copy_from_slice(&[0xff, 0xff]);
    }
}

fn l4_is_udp(frame: &[u8]) -> bool {
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return false;
    };
    match eth.ethertype() {
        EthernetProtocol::Ipv4 => Ipv4Packet::new_checked(eth.payload())
            .map(|p| p.next_header() == IpProtocol::Udp)
            .unwrap_or(false),
        EthernetProtocol::Ipv6 => Ipv6Packet::new_checked(eth.payload())
            .map(|p| p.next_header() == IpProtocol::Udp)
            .unwrap_or(false),
        _ => false,
    }
}

fn segment_tcp(h: &VnetHdr, frame: &[u8]) -> Result<Vec<Vec<u8>>, OffloadError> {
    let eth = EthernetFrame::new_checked(frame).map_err(|_| OffloadError::Malformed)?;
    let (v4, ip_hdr_len) = match eth.ethertype() {
        EthernetProtocol::Ipv4 => {
            let p = Ipv4Packet::new_checked(eth.payload()).map_err(|_| OffloadError::Malformed)?;
            if p.next_header() != IpProtocol::Tcp {
                return Err(OffloadError::NotTcp("IPv4"));
            }
            (true, usize::from(p.header_len()))
        }
        EthernetProtocol::Ipv6 => {
            let p = Ipv6Packet::new_checked(eth.payload()).map_err(|_| OffloadError::Malformed)?;
            if p.next_header() != IpProtocol::Tcp {
                return Err(OffloadError::NotTcp(
                    "IPv6 (extension headers not supported)",
                ));
            }
            (false, 40)
        }
        _ => return Err(OffloadError::NotTcp("IP")),
    };
    let l4 = ETH + ip_hdr_len;
    let tcp = TcpPacket::new_checked(frame.get(l4..).ok_or(OffloadError::Malformed)?)
        .map_err(|_| OffloadError::Malformed)?;
    let hlen = l4 + usize::from(tcp.header_len());
    // The IP datagram's end (a GSO frame carries no Ethernet padding, but be exact).
    let end = if v4 {
        ETH + usize::from(
            Ipv4Packet::new_unchecked(&frame[ETH..])
                .total_len()
                .max(ip_hdr_len as u16),
        )
    } else {
        ETH + Ipv6Packet::new_unchecked(&frame[ETH..]).total_len()
    };
    // A 64 KiB GSO frame's IPv4 total length may be set to 0 by some senders: take the frame.
    let end = if end <= hlen {
        frame.len()
    } else {
        end.min(frame.len())
    };
    let payload = &frame[hlen..end];
    let mss = if h.gso_size == 0 {
        payload.len().max(1)
    } else {
        usize::from(h.gso_size)
    };
    let seq0 = tcp.seq_number();
    let (fin, psh, cwr) = (tcp.fin(), tcp.psh(), tcp.cwr());
    let ident0 = if v4 {
        Ipv4Packet::new_unchecked(&frame[ETH..]).ident()
    } else {
        0
    };
    let chunks: Vec<&[u8]> = if payload.is_empty() {
        vec![&[][..]]
    } else {
        payload.chunks(mss).collect()
    };
    let n = chunks.len();
    let mut out = Vec::with_capacity(n);
    let mut off = 0usize;
    for (i, chunk) in chunks.into_iter().enumerate() {
        let mut seg = Vec::with_capacity(hlen + chunk.len());
        seg.extend_from_slice(&frame[..hlen]);
        seg.extend_from_slice(chunk);
        let ip_len = seg.len() - ETH;
        let (src, dst) = if v4 {
            let mut ip = Ipv4Packet::new_unchecked(&mut seg[ETH..]);
            ip.set_total_len(ip_len as u16);
            ip.set_ident(ident0.wrapping_add(i as u16));
            ip.fill_checksum();
            (
                IpAddress::Ipv4(ip.src_addr()),
                IpAddress::Ipv4(ip.dst_addr()),
            )
        } else {
            let mut ip = Ipv6Packet::new_unchecked(&mut seg[ETH..]);
            ip.set_payload_len((ip_len - 40) as u16);
            (
                IpAddress::Ipv6(ip.src_addr()),
                IpAddress::Ipv6(ip.dst_addr()),
            )
        };
        let mut t = TcpPacket::new_unchecked(&mut seg[l4..]);
        t.set_seq_number(seq0 + off);
        let last = i + 1 == n;
        t.set_fin(fin && last);
        t.set_psh(psh && last);
        t.set_cwr(cwr && i == 0);
        t.fill_checksum(&src, &dst);
        off += chunk.len();
        out.push(seg);
    }
    Ok(out)
}

const ETH: usize = 14;

/// Where a UDP datagram's parts are in an Ethernet frame.
struct UdpLayout {
    v4: bool,
    /// Offset of the UDP header.
    l4: usize,
    /// End of the IP datagram (the frame's end when the IP length is unusable).
    end: usize,
    src: IpAddress,
    dst: IpAddress,
}

fn udp_layout(frame: &[u8]) -> Result<UdpLayout, OffloadError> {
    let eth = EthernetFrame::new_checked(frame).map_err(|_| OffloadError::Malformed)?;
    let (v4, ip_hdr_len, ip_len, src, dst) = match eth.ethertype() {
        EthernetProtocol::Ipv4 => {
            let p = Ipv4Packet::new_checked(eth.payload()).map_err(|_| OffloadError::Malformed)?;
            if p.next_header() != IpProtocol::Udp {
                return Err(OffloadError::NotUdp("IPv4"));
            }
            if p.more_frags() || p.frag_offset() != 0 {
                return Err(OffloadError::Malformed);
            }
            let hl = usize::from(p.header_len());
            (
                true,
                hl,
                usize::from(p.total_len()),
                IpAddress::Ipv4(p.src_addr()),
                IpAddress::Ipv4(p.dst_addr()),
            )
        }
        EthernetProtocol::Ipv6 => {
            let p = Ipv6Packet::new_checked(eth.payload()).map_err(|_| OffloadError::Malformed)?;
            if p.next_header() != IpProtocol::Udp {
                return Err(OffloadError::NotUdp(
                    "IPv6 (extension headers not supported)",
                ));
            }
            (
                false,
                40,
                40 + usize::from(p.payload_len()),
                IpAddress::Ipv6(p.src_addr()),
                IpAddress::Ipv6(p.dst_addr()),
            )
        }
        _ => return Err(OffloadError::NotUdp("IP")),
    };
    let l4 = ETH + ip_hdr_len;
    // As for TCP: a length that does not cover the UDP header (0 from some senders of
    // 64 KiB frames) means "the whole frame".
    let end = if ETH + ip_len < l4 + 8 {
        frame.len()
    } else {
        (ETH + ip_len).min(frame.len())
    };
    if end < l4 + 8 || end - l4 > 0xffff {
        return Err(OffloadError::Malformed);
    }
    Ok(UdpLayout {
        v4,
        l4,
        end,
        src,
        dst,
    })
}

/// Sets the IP length fields of `pkt` (an Ethernet frame) to its size and, for IPv4, the
/// header checksum.
fn set_ip_len(pkt: &mut [u8], v4: bool) {
    let ip_len = pkt.len() - ETH;
    if v4 {
        let mut ip = Ipv4Packet::new_unchecked(&mut pkt[ETH..]);
        ip.set_total_len(ip_len as u16);
        ip.fill_checksum();
    } else {
        Ipv6Packet::new_unchecked(&mut pkt[ETH..]).set_payload_len((ip_len - 40) as u16);
    }
}

/// A UFO frame (`GSO_UDP`): one UDP datagram, checksum completed over the whole of it, sent
/// as IP fragments of `gso_size & !7` bytes of IP payload each (whole when it fits).
fn fragment_udp(h: &VnetHdr, mut frame: Vec<u8>) -> Result<Vec<Vec<u8>>, OffloadError> {
    let l = udp_layout(&frame)?;
    frame.truncate(l.end);
    let udp_len = l.end - l.l4;
    {
        let mut u = UdpPacket::new_unchecked(&mut frame[l.l4..]);
        u.set_len(udp_len as u16);
        if h.flags & F_NEEDS_CSUM != 0 {
            u.fill_checksum(&l.src, &l.dst);
        }
    }
    let unit = usize::from(h.gso_size) & !7;
    if h.gso_size == 0 || udp_len <= unit {
        set_ip_len(&mut frame, l.v4);
        return Ok(vec![frame]);
    }
    if unit == 0 {
        return Err(OffloadError::Malformed);
    }
    let body = &frame[l.l4..];
    let n = body.len().div_ceil(unit);
    let mut out = Vec::with_capacity(n);
    if l.v4 {
        for (i, chunk) in body.chunks(unit).enumerate() {
            let mut p = Vec::with_capacity(l.l4 + chunk.len());
            p.extend_from_slice(&frame[..l.l4]);
            if i > 0 {
                blank_uncopied_options(&mut p[ETH + 20..l.l4]);
            }
            p.extend_from_slice(chunk);
            let mut ip = Ipv4Packet::new_unchecked(&mut p[ETH..]);
            ip.clear_flags();
            ip.set_more_frags(i + 1 < n);
            ip.set_frag_offset((i * unit) as u16);
            set_ip_len(&mut p, true);
            out.push(p);
        }
    } else {
        let ident = ipv6_frag_ident(&l.src, &l.dst);
        for (i, chunk) in body.chunks(unit).enumerate() {
            let mut p = Vec::with_capacity(l.l4 + 8 + chunk.len());
            p.extend_from_slice(&frame[..l.l4]);
            let off_m = ((i * unit) as u16) | u16::from(i + 1 < n);
            p.extend_from_slice(&[u8::from(IpProtocol::Udp), 0]);
            p.extend_from_slice(&off_m.to_be_bytes());
            p.extend_from_slice(&ident.to_be_bytes());
            p.extend_from_slice(chunk);
            Ipv6Packet::new_unchecked(&mut p[ETH..]).set_next_header(IpProtocol::Ipv6Frag);
            set_ip_len(&mut p, false);
            out.push(p);
        }
    }
    Ok(out)
}

/// Replaces the IPv4 options that are not to be copied into every fragment (copy bit clear)
/// with NOPs, as fragments after the first carry only the copied ones.
fn blank_uncopied_options(opts: &mut [u8]) {
    let mut i = 0;
    while i < opts.len() {
        match opts[i] {
            0 => break,
            1 => i += 1,
            kind => {
                let len = opts.get(i + 1).map_or(0, |&l| usize::from(l));
                if len < 2 || i + len > opts.len() {
                    opts[i..].fill(1);
                    break;
                }
                if kind & 0x80 == 0 {
                    opts[i..i + len].fill(1);
                }
                i += len;
            }
        }
    }
}

/// An IPv6 fragment identification for a datagram from `src` to `dst`: a per-process keyed
/// hash of the pair and a counter, so identifications are not predictable (RFC 7739).
fn ipv6_frag_ident(src: &IpAddress, dst: &IpAddress) -> u32 {
    use std::hash::{BuildHasher, Hash, Hasher};
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU32, Ordering};
    static KEY: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let mut hs = KEY.get_or_init(Default::default).build_hasher();
    src.hash(&mut hs);
    dst.hash(&mut hs);
    let base = hs.finish() as u32;
    base.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A USO frame (`GSO_UDP_L4`): UDP datagrams of `gso_size` payload bytes each, each with the
/// original UDP header (its length and checksum recomputed: the checksum when the sender
/// asked for one, `NEEDS_CSUM` or a non-zero field).
fn segment_udp(h: &VnetHdr, frame: &[u8]) -> Result<Vec<Vec<u8>>, OffloadError> {
    let l = udp_layout(frame)?;
    let hlen = l.l4 + 8;
    let payload = &frame[hlen..l.end];
    let csum = h.flags & F_NEEDS_CSUM != 0
        || !l.v4
        || UdpPacket::new_unchecked(&frame[l.l4..]).checksum() != 0;
    let mss = if h.gso_size == 0 {
        payload.len().max(1)
    } else {
        usize::from(h.gso_size)
    };
    let chunks: Vec<&[u8]> = if payload.is_empty() {
        vec![&[][..]]
    } else {
        payload.chunks(mss).collect()
    };
    let ident0 = if l.v4 {
        Ipv4Packet::new_unchecked(&frame[ETH..]).ident()
    } else {
        0
    };
    let mut out = Vec::with_capacity(chunks.len());
    for (i, chunk) in chunks.into_iter().enumerate() {
        let mut p = Vec::with_capacity(hlen + chunk.len());
        p.extend_from_slice(&frame[..hlen]);
        p.extend_from_slice(chunk);
        if l.v4 {
            Ipv4Packet::new_unchecked(&mut p[ETH..]).set_ident(ident0.wrapping_add(i as u16));
        }
        set_ip_len(&mut p, l.v4);
        let mut u = UdpPacket::new_unchecked(&mut p[l.l4..]);
        u.set_len((8 + chunk.len()) as u16);
        if csum {
            u.fill_checksum(&l.src, &l.dst);
        } else {
            u.set_checksum(0);
        }
        out.push(p);
    }
    Ok(out)
}

/// For tests: a UDP datagram (10.0.2.15:40000 → 10.0.2.2:9, or fd00::1 → fd00::2) with
/// `payload`, as a guest with UFO (`GSO_UDP`) or USO (`GSO_UDP_L4`) hands it over: the
/// pseudo-header sum in the checksum field (`NEEDS_CSUM`), `gso_size` as given.
pub fn udp_gso_frame(v6: bool, payload: &[u8], gso_type: u8, gso_size: u16) -> (VnetHdr, Vec<u8>) {
    use crate::vnet::ones_complement_sum;
    use smoltcp::wire::{Ipv4Address, Ipv6Address};
    let ip_len = if v6 { 40 } else { 20 };
    let l4 = ETH + ip_len;
    let udp_len = 8 + payload.len();
    let mut f = vec![0u8; l4 + udp_len];
    f[..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    let mut ph = Vec::new();
    if v6 {
        f[12..14].copy_from_slice(&[0x86, 0xdd]);
        let mut ip = Ipv6Packet::new_unchecked(&mut f[ETH..]);
        ip.set_version(6);
        ip.set_payload_len(udp_len as u16);
        ip.set_next_header(IpProtocol::Udp);
        ip.set_hop_limit(64);
        let s = Ipv6Address::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
        let d = Ipv6Address::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
        ip.set_src_addr(s);
        ip.set_dst_addr(d);
        ph.extend_from_slice(&s.octets());
        ph.extend_from_slice(&d.octets());
        ph.extend_from_slice(&(udp_len as u32).to_be_bytes());
        ph.extend_from_slice(&[0, 0, 0, 17]);
    } else {
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        let mut ip = Ipv4Packet::new_unchecked(&mut f[ETH..]);
        ip.set_version(4);
        ip.set_header_len(20);
        ip.set_total_len((20 + udp_len) as u16);
        ip.set_ident(0x1234);
        ip.set_hop_limit(64);
        ip.set_next_header(IpProtocol::Udp);
        let s = Ipv4Address::new(10, 0, 2, 15);
        let d = Ipv4Address::new(10, 0, 2, 2);
        ip.set_src_addr(s);
        ip.set_dst_addr(d);
        ip.fill_checksum();
        ph.extend_from_slice(&s.octets());
        ph.extend_from_slice(&d.octets());
        ph.extend_from_slice(&[0, 17]);
        ph.extend_from_slice(&(udp_len as u16).to_be_bytes());
    }
    {
        let mut u = UdpPacket::new_unchecked(&mut f[l4..]);
        u.set_src_port(40000);
        u.set_dst_port(9);
        u.set_len(udp_len as u16);
        u.payload_mut().copy_from_slice(payload);
        u.set_checksum(ones_complement_sum(&ph));
    }
    let h = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type,
        hdr_len: (l4 + 8) as u16,
        gso_size,
        csum_start: l4 as u16,
        csum_offset: 6,
    };
    (h, f)
}

/// For tests and benchmarks: a TCP frame (10.0.2.15:40000 → 10.0.2.2:7, or fd00::1 → fd00::2;
/// sequence number starting at 2^32-10; PSH, CWR, `fin` as asked; a timestamp option) as a guest
/// with TSO hands it over, with its GSO header: pseudo-header sum in the checksum field,
/// the IPv4 header checksum possibly stale.
pub fn tcp_gso_frame(v6: bool, payload: &[u8], fin: bool, mss: u16) -> (VnetHdr, Vec<u8>) {
    use crate::vnet::ones_complement_sum;
    use smoltcp::wire::{Ipv4Address, Ipv6Address, TcpSeqNumber};
    let ip_len = if v6 { 40 } else { 20 };
    let l4 = 14 + ip_len;
    let tcp_len = 32; // with a 12-byte timestamp option
    let mut f = vec![0u8; l4 + tcp_len + payload.len()];
    f[..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    let (src, dst);
    if v6 {
        f[12..14].copy_from_slice(&[0x86, 0xdd]);
        let mut ip = Ipv6Packet::new_unchecked(&mut f[14..]);
        ip.set_version(6);
        ip.set_payload_len((tcp_len + payload.len()) as u16);
        ip.set_next_header(IpProtocol::Tcp);
        ip.set_hop_limit(64);
        let s = Ipv6Address::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
        let d = Ipv6Address::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
        ip.set_src_addr(s);
        ip.set_dst_addr(d);
        (src, dst) = (IpAddress::Ipv6(s), IpAddress::Ipv6(d));
    } else {
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        let mut ip = Ipv4Packet::new_unchecked(&mut f[14..]);
        ip.set_version(4);
        ip.set_header_len(20);
        ip.set_total_len((20 + tcp_len + payload.len()).min(0xffff) as u16);
        ip.set_ident(0xfff0);
        ip.set_dont_frag(true);
        ip.set_hop_limit(64);
        ip.set_next_header(IpProtocol::Tcp);
        let s = Ipv4Address::new(10, 0, 2, 15);
        let d = Ipv4Address::new(10, 0, 2, 2);
        ip.set_src_addr(s);
        ip.set_dst_addr(d);
        (src, dst) = (IpAddress::Ipv4(s), IpAddress::Ipv4(d));
    }
    {
        let mut t = TcpPacket::new_unchecked(&mut f[l4..]);
        t.set_src_port(40000);
        t.set_dst_port(7);
        t.set_seq_number(TcpSeqNumber(-10)); // wraps during the stream
        t.set_ack_number(TcpSeqNumber(5));
        t.set_header_len(tcp_len as u8);
        t.set_ack(true);
        t.set_psh(true);
        t.set_fin(fin);
        t.set_cwr(true);
        t.set_window_len(500);
        t.payload_mut().copy_from_slice(payload);
    }
    // The options: NOP NOP TS.
    f[l4 + 20..l4 + 32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
    // Partial checksum: the pseudo-header sum (length of this frame's TCP part), not inverted.
    let len = (f.len() - l4) as u32;
    let mut ph = Vec::new();
    match (src, dst) {
        (IpAddress::Ipv4(s), IpAddress::Ipv4(d)) => {
            ph.extend_from_slice(&s.octets());
            ph.extend_from_slice(&d.octets());
            ph.extend_from_slice(&[0, 6]);
            ph.extend_from_slice(&(len as u16).to_be_bytes());
        }
        (IpAddress::Ipv6(s), IpAddress::Ipv6(d)) => {
            ph.extend_from_slice(&s.octets());
            ph.extend_from_slice(&d.octets());
            ph.extend_from_slice(&len.to_be_bytes());
            ph.extend_from_slice(&[0, 0, 0, 6]);
        }
        _ => unreachable!(),
    }
    let s = ones_complement_sum(&ph);
    f[l4 + 16..l4 + 18].copy_from_slice(&s.to_be_bytes());
    let h = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
        hdr_len: (l4 + tcp_len) as u16,
        gso_size: mss,
        csum_start: l4 as u16,
        csum_offset: 16,
    };
    (h, f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::TcpSeqNumber;

    /// The addresses and the payload of a parsed IPv4 packet (checksums need the addresses).
    fn v4_parts(ip: &Ipv4Packet<&[u8]>) -> (IpAddress, IpAddress, Vec<u8>) {
        let (s, d) = (ip.src_addr(), ip.dst_addr());
        (
            IpAddress::Ipv4(s),
            IpAddress::Ipv4(d),
            ip.payload().to_vec(),
        )
    }

    /// As [`v4_parts`] for IPv6.
    fn v6_parts(ip: &Ipv6Packet<&[u8]>) -> (IpAddress, IpAddress, Vec<u8>) {
        let (s, d) = (ip.src_addr(), ip.dst_addr());
        (
            IpAddress::Ipv6(s),
            IpAddress::Ipv6(d),
            ip.payload().to_vec(),
        )
    }

    const MSS: usize = 1448;

    fn check_segments(v6: bool, total: usize, fin: bool) {
        let payload: Vec<u8> = (0..total).map(|i| (i * 7 + i / 251) as u8).collect();
        let (h, f) = tcp_gso_frame(v6, &payload, fin, MSS as u16);
        let segs = to_plain(&h.to_bytes(), f).unwrap();
        assert_eq!(segs.len(), total.div_ceil(MSS).max(1), "segment count");
        let mut joined = Vec::new();
        let mut expect_seq = TcpSeqNumber(-10);
        for (i, s) in segs.iter().enumerate() {
            let last = i + 1 == segs.len();
            let eth = EthernetFrame::new_checked(&s[..]).unwrap();
            let (src, dst, tcp_bytes) = if v6 {
                let ip = Ipv6Packet::new_checked(eth.payload()).unwrap();
                assert_eq!(ip.payload_len() as usize, ip.payload().len());
                v6_parts(&ip)
            } else {
                let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
                assert!(ip.verify_checksum(), "IPv4 header checksum of segment {i}");
                assert_eq!(ip.total_len() as usize, eth.payload().len());
                assert_eq!(ip.ident(), 0xfff0u16.wrapping_add(i as u16));
                v4_parts(&ip)
            };
            let t = TcpPacket::new_checked(&tcp_bytes[..]).unwrap();
            assert!(t.verify_checksum(&src, &dst), "TCP checksum of segment {i}");
            assert_eq!(t.seq_number(), expect_seq, "seq of segment {i}");
            assert!(t.payload().len() <= MSS);
            assert_eq!(t.fin(), fin && last);
            assert_eq!(t.psh(), last);
            assert_eq!(t.cwr(), i == 0);
            assert!(t.ack());
            assert_eq!(t.header_len(), 32, "options kept");
            expect_seq += t.payload().len();
            joined.extend_from_slice(t.payload());
        }
        assert_eq!(joined, payload, "payload intact and in order");
    }

    #[test]
    fn tcpv4_gso_frames_are_segmented_with_valid_checksums() {
        for total in [1, MSS, MSS + 1, 10 * MSS + 17, 65_000] {
            check_segments(false, total, false);
        }
        check_segments(false, 3 * MSS + 5, true);
    }

    #[test]
    fn tcpv6_gso_frames_are_segmented_with_valid_checksums() {
        for total in [1, MSS - 1, 5 * MSS, 40_000] {
            check_segments(true, total, total == 1);
        }
    }

    #[test]
    fn partial_checksum_without_gso_is_completed() {
        let (mut h, f) = tcp_gso_frame(false, &[1, 2, 3, 4, 5], false, MSS as u16);
        h.gso_type = GSO_NONE;
        h.gso_size = 0;
        let out = to_plain(&h.to_bytes(), f).unwrap();
        assert_eq!(out.len(), 1);
        let ip = Ipv4Packet::new_checked(&out[0][14..]).unwrap();
        let t = TcpPacket::new_checked(ip.payload()).unwrap();
        assert!(t.verify_checksum(
            &IpAddress::Ipv4(ip.src_addr()),
            &IpAddress::Ipv4(ip.dst_addr())
        ));
    }

    #[test]
    fn bad_gso_frames_are_errors_not_panics() {
        let (h, f) = tcp_gso_frame(false, &[0; 3000], false, MSS as u16);
        assert_eq!(
            to_plain(&h.to_bytes()[..4], f.clone()),
            Err(OffloadError::ShortHeader)
        );
        let mut udp = h;
        udp.gso_type = GSO_UDP;
        assert!(to_plain(&udp.to_bytes(), f.clone()).is_err());
        for cut in [0, 10, 14, 20, 40, 60] {
            assert!(
                to_plain(&h.to_bytes(), f[..cut].to_vec()).is_err(),
                "cut {cut}"
            );
        }
        let mut arp = f.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert!(to_plain(&h.to_bytes(), arp).is_err());
        // A stale header length or gso_size of 0 do not break it.
        let mut z = h;
        z.gso_size = 0;
        assert_eq!(to_plain(&z.to_bytes(), f).unwrap().len(), 1);
    }

    /// `GSO_ECN`: CWR (set by the sender) stays on the first segment only, as Linux's
    /// tcp_gso_segment does; ECE and the IP header's ECN field are on every segment.
    #[test]
    fn ecn_gso_frames_keep_cwr_on_the_first_segment_only() {
        for v6 in [false, true] {
            let payload: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
            let (mut h, mut f) = tcp_gso_frame(v6, &payload, false, MSS as u16);
            h.gso_type |= GSO_ECN;
            let l4 = if v6 { 54 } else { 34 };
            TcpPacket::new_unchecked(&mut f[l4..]).set_ece(true);
            if v6 {
                f[14] = 0x60; // traffic class 0x02: ECT(0)
                f[15] = 0x20;
            } else {
                Ipv4Packet::new_unchecked(&mut f[14..]).set_ecn(2);
            }
            assert_eq!(h.guest_features_needed() & (1 << 9), 1 << 9, "GUEST_ECN");
            let segs = to_plain(&h.to_bytes(), f).unwrap();
            assert_eq!(segs.len(), 4);
            for (i, s) in segs.iter().enumerate() {
                let t = TcpPacket::new_checked(&s[l4..]).unwrap();
                assert_eq!(t.cwr(), i == 0, "CWR on segment {i} (v6 {v6})");
                assert!(t.ece(), "ECE on segment {i}");
                if v6 {
                    assert_eq!(
                        Ipv6Packet::new_checked(&s[14..]).unwrap().traffic_class(),
                        2
                    );
                } else {
                    let ip = Ipv4Packet::new_checked(&s[14..]).unwrap();
                    assert_eq!(ip.ecn(), 2);
                    assert!(ip.verify_checksum());
                }
            }
        }
    }

    /// Reassembles IP fragments (in order) and returns the UDP datagram, checking every
    /// fragment's header on the way.
    fn reassemble(frags: &[Vec<u8>], v6: bool, unit: usize) -> (IpAddress, IpAddress, Vec<u8>) {
        let mut data = Vec::new();
        let mut addrs = None;
        let mut ident = None;
        for (i, p) in frags.iter().enumerate() {
            let last = i + 1 == frags.len();
            let (off, more, id, body, a) = if v6 {
                let ip = Ipv6Packet::new_checked(&p[14..]).unwrap();
                assert_eq!(usize::from(ip.payload_len()), p.len() - 54);
                assert_eq!(ip.next_header(), IpProtocol::Ipv6Frag);
                let fh = &ip.payload()[..8];
                assert_eq!(fh[0], 17, "next header UDP");
                let om = u16::from_be_bytes([fh[2], fh[3]]);
                let id = u32::from_be_bytes([fh[4], fh[5], fh[6], fh[7]]);
                (
                    usize::from(om & !7),
                    om & 1 == 1,
                    id,
                    ip.payload()[8..].to_vec(),
                    (
                        IpAddress::Ipv6(ip.src_addr()),
                        IpAddress::Ipv6(ip.dst_addr()),
                    ),
                )
            } else {
                let ip = Ipv4Packet::new_checked(&p[14..]).unwrap();
                assert!(ip.verify_checksum(), "IPv4 header checksum, fragment {i}");
                assert_eq!(usize::from(ip.total_len()), p.len() - 14);
                assert!(!ip.dont_frag());
                (
                    usize::from(ip.frag_offset()),
                    ip.more_frags(),
                    u32::from(ip.ident()),
                    ip.payload().to_vec(),
                    (
                        IpAddress::Ipv4(ip.src_addr()),
                        IpAddress::Ipv4(ip.dst_addr()),
                    ),
                )
            };
            assert_eq!(more, !last, "MF, fragment {i}");
            assert_eq!(off, data.len(), "offset, fragment {i}");
            assert!(last || body.len() == unit, "fragment {i} size");
            assert_eq!(*ident.get_or_insert(id), id, "same identification");
            addrs = Some(a);
            data.extend_from_slice(&body);
        }
        let (s, d) = addrs.unwrap();
        (s, d, data)
    }

    #[test]
    fn ufo_frames_become_ip_fragments_that_reassemble_to_a_valid_datagram() {
        for v6 in [false, true] {
            for (total, gso) in [
                (100usize, 1472u16),
                (1472, 1472),
                (4000, 1480),
                (65_000, 1450),
            ] {
                let payload: Vec<u8> = (0..total).map(|i| (i * 13 + i / 97) as u8).collect();
                let (h, f) = udp_gso_frame(v6, &payload, GSO_UDP, gso);
                assert_eq!(h.guest_features_needed(), 1 << 1 | 1 << 10);
                let frags = to_plain(&h.to_bytes(), f).unwrap();
                let unit = usize::from(gso) & !7;
                assert_eq!(
                    frags.len(),
                    (total + 8).div_ceil(unit),
                    "{total}/{gso} v6 {v6}"
                );
                let (s, d, dgram) = if frags.len() == 1 {
                    let p = &frags[0];
                    if v6 {
                        let ip = Ipv6Packet::new_checked(&p[14..]).unwrap();
                        assert_eq!(ip.next_header(), IpProtocol::Udp);
                        v6_parts(&ip)
                    } else {
                        let ip = Ipv4Packet::new_checked(&p[14..]).unwrap();
                        assert!(ip.verify_checksum() && !ip.more_frags());
                        v4_parts(&ip)
                    }
                } else {
                    reassemble(&frags, v6, unit)
                };
                let u = UdpPacket::new_checked(&dgram[..]).unwrap();
                assert!(u.verify_checksum(&s, &d), "UDP checksum {total} v6 {v6}");
                assert_eq!(usize::from(u.len()), total + 8);
                assert_eq!(u.payload(), &payload[..]);
            }
        }
    }

    #[test]
    fn ipv4_options_without_the_copy_bit_leave_later_fragments() {
        let mut opts = [7u8, 7, 4, 0, 0, 0, 0, 0x94, 4, 0, 0, 0];
        blank_uncopied_options(&mut opts);
        assert_eq!(opts, [1, 1, 1, 1, 1, 1, 1, 0x94, 4, 0, 0, 0]);
        let mut bad = [0x44u8, 40, 0];
        blank_uncopied_options(&mut bad);
        assert_eq!(bad, [1, 1, 1]);
    }

    #[test]
    fn uso_frames_become_udp_datagrams_with_valid_checksums() {
        for v6 in [false, true] {
            let payload: Vec<u8> = (0..10_000u32).map(|i| (i * 3) as u8).collect();
            let (h, f) = udp_gso_frame(v6, &payload, GSO_UDP_L4, 1400);
            let segs = to_plain(&h.to_bytes(), f).unwrap();
            assert_eq!(segs.len(), 8);
            let mut joined = Vec::new();
            for (i, p) in segs.iter().enumerate() {
                let (s, d, l4) = if v6 {
                    let ip = Ipv6Packet::new_checked(&p[14..]).unwrap();
                    assert_eq!(usize::from(ip.payload_len()), p.len() - 54);
                    v6_parts(&ip)
                } else {
                    let ip = Ipv4Packet::new_checked(&p[14..]).unwrap();
                    assert!(ip.verify_checksum());
                    assert_eq!(ip.ident(), 0x1234u16.wrapping_add(i as u16));
                    assert!(!ip.more_frags() && ip.frag_offset() == 0);
                    v4_parts(&ip)
                };
                let u = UdpPacket::new_checked(&l4[..]).unwrap();
                assert!(u.verify_checksum(&s, &d), "segment {i}");
                assert_eq!(usize::from(u.len()), l4.len());
                assert!(u.payload().len() <= 1400);
                joined.extend_from_slice(u.payload());
            }
            assert_eq!(joined, payload);
        }
    }

    #[test]
    fn bad_udp_gso_frames_are_errors_not_panics() {
        let (h, f) = udp_gso_frame(false, &[0; 3000], GSO_UDP, 1480);
        for cut in [0, 14, 30, 40] {
            assert!(
                to_plain(&h.to_bytes(), f[..cut].to_vec()).is_err(),
                "cut {cut}"
            );
        }
        let mut small = h;
        small.gso_size = 7;
        assert_eq!(
            to_plain(&small.to_bytes(), f.clone()),
            Err(OffloadError::Malformed)
        );
        let mut frag = f.clone();
        Ipv4Packet::new_unchecked(&mut frag[14..]).set_more_frags(true);
        assert!(to_plain(&h.to_bytes(), frag).is_err());
        let (t, tf) = tcp_gso_frame(false, &[0; 3000], false, MSS as u16);
        let mut uso = t;
        uso.gso_type = GSO_UDP_L4;
        assert_eq!(
            to_plain(&uso.to_bytes(), tf),
            Err(OffloadError::NotUdp("IPv4"))
        );
        // A datagram whose IP length runs past the frame is malformed.
        let (u, uf) = udp_gso_frame(true, &[9; 3000], GSO_UDP_L4, 1000);
        assert_eq!(
            to_plain(&u.to_bytes(), uf[..2000].to_vec()),
            Err(OffloadError::Malformed)
        );
    }

    #[test]
    fn header_round_trips_and_names_needed_features() {
        let (h, _) = tcp_gso_frame(true, &[0; 10], false, MSS as u16);
        assert_eq!(VnetHdr::parse(&h.to_bytes()).unwrap(), h);
        assert!(!h.is_plain());
        assert_eq!(h.guest_features_needed(), 1 << 1 | 1 << 8);
        assert!(VnetHdr::default().is_plain());
        assert_eq!(VnetHdr::default().guest_features_needed(), 0);
    }
}
