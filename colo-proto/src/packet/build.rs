//! Building well-formed frames (correct lengths and checksums) for tests, fixtures and tools.
//!
//! Addresses decide the IP version: IPv4 endpoints give IPv4 frames, IPv6 endpoints IPv6
//! frames. Mixing versions in one call yields an IPv4 frame with the IPv6 address truncated, so
//! do not.

use std::net::{IpAddr, SocketAddr};

/// Link-layer settings shared by every built frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Link {
    /// Source MAC.
    pub src_mac: [u8; 6],
    /// Destination MAC.
    pub dst_mac: [u8; 6],
    /// An 802.1Q tag with this VLAN id.
    pub vlan: Option<u16>,
}

impl Default for Link {
    fn default() -> Self {
        Link {
            src_mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            dst_mac: [0x52, 0x54, 0, 0x12, 0x34, 0x57],
            vlan: None,
        }
    }
}

impl Link {
    /// The same link with source and destination MACs swapped.
    pub fn reversed(&self) -> Link {
        Link {
            src_mac: self.dst_mac,
            dst_mac: self.src_mac,
            vlan: self.vlan,
        }
    }
}

/// A TCP segment to build.
#[derive(Clone, Copy, Debug)]
pub struct TcpSegment<'a> {
    /// Source endpoint.
    pub src: SocketAddr,
    /// Destination endpoint.
    pub dst: SocketAddr,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgement number.
    pub ack: u32,
    /// Flags ([`super::TcpFlags`] bits).
    pub flags: u16,
    /// Window.
    pub window: u16,
    /// Payload.
    pub payload: &'a [u8],
}

fn sum16(mut acc: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

fn ip_bytes(a: &IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// Wraps an L4 packet (checksum field at `csum_at`, zero) into IP and Ethernet headers.
fn ip_frame(
    link: &Link,
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    mut l4: Vec<u8>,
    csum_at: Option<usize>,
) -> Vec<u8> {
    let v6 = src.is_ipv6();
    let (s, d) = (ip_bytes(&src), ip_bytes(&dst));
    if let Some(at) = csum_at {
        // Pseudo header: addresses, protocol, L4 length.
        let mut acc = sum16(0, &s);
        acc = sum16(acc, &d);
        acc += u32::from(proto);
        acc += l4.len() as u32;
        acc = sum16(acc, &l4);
        let mut c = fold(acc);
        if proto == 17 && c == 0 {
            c = 0xffff;
        }
        if let Some(slot) = l4.get_mut(at..at + 2) {
            slot.copy_from_slice(&c.to_be_bytes());
        }
    }
    let mut f = Vec::with_capacity(l4.len() + 58);
    f.extend_from_slice(&link.dst_mac);
    f.extend_from_slice(&link.src_mac);
    if let Some(v) = link.vlan {
        f.extend_from_slice(&0x8100u16.to_be_bytes());
        f.extend_from_slice(&(v & 0x0fff).to_be_bytes());
    }
    if v6 {
        f.extend_from_slice(&0x86ddu16.to_be_bytes());
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        f.push(proto);
        f.push(64);
        f.extend_from_slice(&s);
        f.extend_from_slice(&d);
    } else {
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        let mut h = [0u8; 20];
        h[0] = 0x45;
        h[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
        h[6] = 0x40; // DF
        h[8] = 64;
        h[9] = proto;
        h[12..16].copy_from_slice(s.get(..4).unwrap_or(&[0; 4]));
        h[16..20].copy_from_slice(d.get(..4).unwrap_or(&[0; 4]));
        let c = fold(sum16(0, &h));
        h[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&h);
    }
    f.extend_from_slice(&l4);
    f
}

/// An Ethernet frame carrying a TCP segment (no options).
pub fn tcp_frame(link: &Link, seg: &TcpSegment<'_>) -> Vec<u8> {
    let mut l4 = Vec::with_capacity(20 + seg.payload.len());
    l4.extend_from_slice(&seg.src.port().to_be_bytes());
    l4.extend_from_slice(&seg.dst.port().to_be_bytes());
    l4.extend_from_slice(&seg.seq.to_be_bytes());
    l4.extend_from_slice(&seg.ack.to_be_bytes());
    let flags = seg.flags & 0x1ff;
    l4.extend_from_slice(&((5u16 << 12) | flags).to_be_bytes());
    l4.extend_from_slice(&seg.window.to_be_bytes());
    l4.extend_from_slice(&[0, 0, 0, 0]);
    l4.extend_from_slice(seg.payload);
    ip_frame(link, seg.src.ip(), seg.dst.ip(), 6, l4, Some(16))
}

/// An Ethernet frame carrying a UDP datagram.
pub fn udp_frame(link: &Link, src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut l4 = Vec::with_capacity(8 + payload.len());
    l4.extend_from_slice(&src.port().to_be_bytes());
    l4.extend_from_slice(&dst.port().to_be_bytes());
    l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    l4.extend_from_slice(&[0, 0]);
    l4.extend_from_slice(payload);
    ip_frame(link, src.ip(), dst.ip(), 17, l4, Some(6))
}

/// An Ethernet frame carrying an ICMP (IPv4) or ICMPv6 (IPv6) echo request or reply.
pub fn icmp_echo_frame(
    link: &Link,
    src: IpAddr,
    dst: IpAddr,
    request: bool,
    ident: u16,
    seq: u16,
    payload: &[u8],
) -> Vec<u8> {
    let v6 = src.is_ipv6();
    let msg_type = match (v6, request) {
        (false, true) => 8,
        (false, false) => 0,
        (true, true) => 128,
        (true, false) => 129,
    };
    let mut l4 = vec![msg_type, 0, 0, 0];
    l4.extend_from_slice(&ident.to_be_bytes());
    l4.extend_from_slice(&seq.to_be_bytes());
    l4.extend_from_slice(payload);
    if v6 {
        ip_frame(link, src, dst, 58, l4, Some(2))
    } else {
        let c = fold(sum16(0, &l4));
        l4[2..4].copy_from_slice(&c.to_be_bytes());
        ip_frame(link, src, dst, 1, l4, None)
    }
}

/// An Ethernet/IPv4 ARP request (`operation` 1) or reply (2), padded to 60 bytes.
pub fn arp_frame(
    link: &Link,
    operation: u16,
    sender_ip: std::net::Ipv4Addr,
    target_mac: [u8; 6],
    target_ip: std::net::Ipv4Addr,
) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    f.extend_from_slice(&link.dst_mac);
    f.extend_from_slice(&link.src_mac);
    if let Some(v) = link.vlan {
        f.extend_from_slice(&0x8100u16.to_be_bytes());
        f.extend_from_slice(&(v & 0x0fff).to_be_bytes());
    }
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4]);
    f.extend_from_slice(&operation.to_be_bytes());
    f.extend_from_slice(&link.src_mac);
    f.extend_from_slice(&sender_ip.octets());
    f.extend_from_slice(&target_mac);
    f.extend_from_slice(&target_ip.octets());
    f.resize(f.len().max(60), 0);
    f
}
