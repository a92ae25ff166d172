//! The parser proper.

use std::net::{IpAddr, Ipv4Addr};

use smoltcp::wire::{
    ArpHardware, ArpOperation, ArpPacket, EthernetFrame, EthernetProtocol, Icmpv4Packet,
    Icmpv6Packet, Ipv4Packet, Ipv6Packet, TcpPacket, UdpPacket,
};

use super::key::{ConnKey, IpProto};
use crate::frame::Frame;

/// Ethernet header length without tags.
const ETH_HDR_LEN: usize = 14;
/// TPIDs accepted as VLAN tags: 802.1Q, 802.1ad and the pre-standard 0x9100.
const VLAN_TPIDS: [u16; 3] = [0x8100, 0x88a8, 0x9100];
/// At most this many stacked VLAN tags are walked (more is treated as malformed).
const MAX_VLAN_TAGS: usize = 4;
/// At most this many IPv6 extension headers are walked.
const MAX_IPV6_EXT_HEADERS: usize = 16;

/// A parsed view of one frame. Borrowed from the frame's bytes; cheap to build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedPacket<'a> {
    /// The virtio-net header (empty without one).
    pub vnet_hdr: &'a [u8],
    /// The whole Ethernet frame (after the virtio-net header), padding included.
    pub l2: &'a [u8],
    /// Destination MAC (zero when the frame is shorter than an Ethernet header).
    pub dst_mac: [u8; 6],
    /// Source MAC (zero when the frame is shorter than an Ethernet header).
    pub src_mac: [u8; 6],
    /// VLAN ids: outer tag first, inner (802.1ad stacking) second.
    pub vlans: [Option<u16>; 2],
    /// The EtherType after any VLAN tags (0 when the frame is too short).
    pub ethertype: u16,
    /// Offset of the L3 header inside `l2`.
    pub l3_offset: usize,
    /// The network layer.
    pub net: Network<'a>,
}

/// The network layer of a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Network<'a> {
    /// An Ethernet/IPv4 ARP packet.
    Arp(ArpView<'a>),
    /// IPv4 or IPv6 with its transport.
    Ip(IpInfo, Transport<'a>),
    /// Another EtherType (or ARP for other hardware); `payload` is everything after the tags.
    Other {
        /// The EtherType.
        ethertype: u16,
        /// Bytes after the Ethernet header and tags (padding included).
        payload: &'a [u8],
    },
    /// The frame is too short or a header is inconsistent.
    Malformed {
        /// What was wrong.
        reason: &'static str,
    },
}

/// An Ethernet/IPv4 ARP packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArpView<'a> {
    /// 1 = request, 2 = reply.
    pub operation: u16,
    /// Sender hardware address.
    pub sender_mac: [u8; 6],
    /// Sender protocol address.
    pub sender_ip: Ipv4Addr,
    /// Target hardware address.
    pub target_mac: [u8; 6],
    /// Target protocol address.
    pub target_ip: Ipv4Addr,
    /// The 28 ARP bytes, without Ethernet padding.
    pub bytes: &'a [u8],
}

/// IPv4 fragment information (IPv6 fragment headers are reported the same way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fragment {
    /// Fragment offset in bytes.
    pub offset: u32,
    /// More fragments follow.
    pub more: bool,
    /// Datagram identification.
    pub ident: u32,
}

/// The IP header(s) of a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpInfo {
    /// 4 or 6.
    pub version: u8,
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// The transport protocol (for IPv6: after the extension headers).
    pub protocol: IpProto,
    /// TTL / hop limit.
    pub ttl: u8,
    /// Offset of the transport header inside `l2`.
    pub l4_offset: usize,
    /// End of the IP datagram inside `l2` (from the IP length field; padding excluded).
    pub l4_end: usize,
    /// Set when this packet is a fragment (first or later).
    pub fragment: Option<Fragment>,
}

/// The transport layer of an IP packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport<'a> {
    /// TCP.
    Tcp(TcpView<'a>),
    /// UDP.
    Udp(UdpView<'a>),
    /// ICMP for IPv4.
    Icmpv4(IcmpView<'a>),
    /// ICMPv6.
    Icmpv6(IcmpView<'a>),
    /// A fragment of a larger datagram (not reassembled); `data` is the IP payload.
    Fragment {
        /// The fragment's bytes.
        data: &'a [u8],
    },
    /// Another protocol; `data` is the IP payload.
    Other {
        /// The IP payload.
        data: &'a [u8],
    },
    /// The transport header does not fit or is inconsistent; `data` is the IP payload.
    Malformed {
        /// What was wrong.
        reason: &'static str,
        /// The IP payload.
        data: &'a [u8],
    },
}

/// TCP flags as a bit set (the low 9 bits of the header's flag field).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct TcpFlags(pub u16);

impl TcpFlags {
    /// FIN.
    pub const FIN: u16 = 0x001;
    /// SYN.
    pub const SYN: u16 = 0x002;
    /// RST.
    pub const RST: u16 = 0x004;
    /// PSH.
    pub const PSH: u16 = 0x008;
    /// ACK.
    pub const ACK: u16 = 0x010;
    /// URG.
    pub const URG: u16 = 0x020;
    /// ECE.
    pub const ECE: u16 = 0x040;
    /// CWR.
    pub const CWR: u16 = 0x080;
    /// NS.
    pub const NS: u16 = 0x100;

    /// Whether all bits of `mask` are set.
    pub fn has(self, mask: u16) -> bool {
        self.0 & mask == mask
    }
    /// FIN set.
    pub fn fin(self) -> bool {
        self.has(Self::FIN)
    }
    /// SYN set.
    pub fn syn(self) -> bool {
        self.has(Self::SYN)
    }
    /// RST set.
    pub fn rst(self) -> bool {
        self.has(Self::RST)
    }
    /// ACK set.
    pub fn ack(self) -> bool {
        self.has(Self::ACK)
    }
}

impl std::fmt::Display for TcpFlags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const NAMES: [(u16, char); 6] = [
            (TcpFlags::SYN, 'S'),
            (TcpFlags::FIN, 'F'),
            (TcpFlags::RST, 'R'),
            (TcpFlags::PSH, 'P'),
            (TcpFlags::ACK, '.'),
            (TcpFlags::URG, 'U'),
        ];
        for (bit, c) in NAMES {
            if self.has(bit) {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

/// A TCP segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpView<'a> {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgement number (meaningful when ACK is set).
    pub ack: u32,
    /// Flags.
    pub flags: TcpFlags,
    /// Window field (unscaled).
    pub window: u16,
    /// Header length in bytes (options included).
    pub header_len: usize,
    /// Raw options.
    pub options: &'a [u8],
    /// Payload (bounded by the IP length, padding excluded).
    pub payload: &'a [u8],
}

impl TcpView<'_> {
    /// Sequence space the segment occupies: payload plus one for SYN and one for FIN.
    pub fn seq_len(&self) -> u32 {
        // Payload of one IP datagram is < 2^32, so the cast is lossless.
        self.payload.len() as u32 + u32::from(self.flags.syn()) + u32::from(self.flags.fin())
    }
}

/// A UDP datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdpView<'a> {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Payload (bounded by the UDP length field).
    pub payload: &'a [u8],
}

/// An ICMP or ICMPv6 message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IcmpView<'a> {
    /// Message type.
    pub msg_type: u8,
    /// Code.
    pub code: u8,
    /// For echo request/reply: (identifier, sequence number).
    pub echo: Option<(u16, u16)>,
    /// Everything after the 4-byte type/code/checksum header.
    pub body: &'a [u8],
}

impl<'a> ParsedPacket<'a> {
    /// The outermost VLAN id, if any.
    pub fn vlan(&self) -> Option<u16> {
        self.vlans[0]
    }

    /// The IP header information, for IP packets.
    pub fn ip(&self) -> Option<&IpInfo> {
        match &self.net {
            Network::Ip(ip, _) => Some(ip),
            _ => None,
        }
    }

    /// The transport view, for IP packets.
    pub fn transport(&self) -> Option<&Transport<'a>> {
        match &self.net {
            Network::Ip(_, t) => Some(t),
            _ => None,
        }
    }

    /// The TCP view, for TCP segments.
    pub fn tcp(&self) -> Option<&TcpView<'a>> {
        match &self.net {
            Network::Ip(_, Transport::Tcp(t)) => Some(t),
            _ => None,
        }
    }

    /// Bytes from the start of the transport header to the end of the IP datagram (Ethernet
    /// padding excluded), for IP packets.
    pub fn l4_bytes(&self) -> Option<&'a [u8]> {
        let ip = self.ip()?;
        self.l2.get(ip.l4_offset..ip.l4_end)
    }

    /// The connection this packet belongs to, in its direction of travel (IP packets only).
    pub fn conn_key(&self) -> Option<ConnKey> {
        let Network::Ip(ip, t) = &self.net else {
            return None;
        };
        let (src_port, dst_port) = match t {
            Transport::Tcp(t) => (t.src_port, t.dst_port),
            Transport::Udp(u) => (u.src_port, u.dst_port),
            Transport::Icmpv4(i) | Transport::Icmpv6(i) => match i.echo {
                Some((id, _)) => (id, id),
                None => (0, 0),
            },
            Transport::Fragment { .. } | Transport::Other { .. } | Transport::Malformed { .. } => {
                (0, 0)
            }
        };
        Some(ConnKey {
            vlan: self.vlan(),
            protocol: ip.protocol,
            src: ip.src,
            src_port,
            dst: ip.dst,
            dst_port,
        })
    }
}

/// Parses a framed packet: skips its virtio-net header, then parses the Ethernet frame.
pub fn parse_frame(frame: &Frame) -> ParsedPacket<'_> {
    if frame.vnet_hdr_len as usize > frame.payload.len() {
        let mut p = parse_ethernet(&[]);
        p.net = Network::Malformed {
            reason: "virtio-net header longer than the frame",
        };
        return p;
    }
    let mut p = parse_ethernet(frame.l2());
    p.vnet_hdr = frame.vnet_hdr();
    p
}

/// Parses a bare Ethernet frame (no virtio-net header, no FCS).
pub fn parse_ethernet(l2: &[u8]) -> ParsedPacket<'_> {
    let mut p = ParsedPacket {
        vnet_hdr: &[],
        l2,
        dst_mac: [0; 6],
        src_mac: [0; 6],
        vlans: [None, None],
        ethertype: 0,
        l3_offset: 0,
        net: Network::Malformed {
            reason: "frame shorter than an Ethernet header",
        },
    };
    let Ok(eth) = EthernetFrame::new_checked(l2) else {
        return p;
    };
    p.dst_mac = eth.dst_addr().0;
    p.src_mac = eth.src_addr().0;
    let mut ethertype = u16::from(eth.ethertype());
    let mut off = ETH_HDR_LEN;
    let mut tags = 0;
    while VLAN_TPIDS.contains(&ethertype) {
        if tags == MAX_VLAN_TAGS {
            p.ethertype = ethertype;
            p.l3_offset = off;
            p.net = Network::Malformed {
                reason: "too many stacked VLAN tags",
            };
            return p;
        }
        let Some(tag) = l2.get(off..off + 4) else {
            p.ethertype = ethertype;
            p.l3_offset = off.min(l2.len());
            p.net = Network::Malformed {
                reason: "truncated VLAN tag",
            };
            return p;
        };
        if tags < 2 {
            p.vlans[tags] = Some(u16::from_be_bytes([tag[0], tag[1]]) & 0x0fff);
        }
        ethertype = u16::from_be_bytes([tag[2], tag[3]]);
        off += 4;
        tags += 1;
    }
    p.ethertype = ethertype;
    p.l3_offset = off;
    let l3 = l2.get(off..).unwrap_or(&[]);
    p.net = match EthernetProtocol::from(ethertype) {
        EthernetProtocol::Ipv4 => parse_ipv4(l3, off),
        EthernetProtocol::Ipv6 => parse_ipv6(l3, off),
        EthernetProtocol::Arp => parse_arp(l3, ethertype),
        EthernetProtocol::Unknown(_) => Network::Other {
            ethertype,
            payload: l3,
        },
    };
    p
}

fn parse_arp(l3: &[u8], ethertype: u16) -> Network<'_> {
    let Ok(arp) = ArpPacket::new_checked(l3) else {
        return Network::Malformed {
            reason: "truncated ARP packet",
        };
    };
    if arp.hardware_type() != ArpHardware::Ethernet
        || arp.protocol_type() != EthernetProtocol::Ipv4
        || arp.hardware_len() != 6
        || arp.protocol_len() != 4
    {
        return Network::Other {
            ethertype,
            payload: l3,
        };
    }
    let mac = |b: &[u8]| {
        let mut m = [0u8; 6];
        m.copy_from_slice(b.get(..6).unwrap_or(&[0; 6]));
        m
    };
    let ip = |b: &[u8]| match b.get(..4) {
        Some(&[a, b, c, d]) => Ipv4Addr::new(a, b, c, d),
        _ => Ipv4Addr::UNSPECIFIED,
    };
    let operation = match arp.operation() {
        ArpOperation::Request => 1,
        ArpOperation::Reply => 2,
        ArpOperation::Unknown(n) => n,
    };
    Network::Arp(ArpView {
        operation,
        sender_mac: mac(arp.source_hardware_addr()),
        sender_ip: ip(arp.source_protocol_addr()),
        target_mac: mac(arp.target_hardware_addr()),
        target_ip: ip(arp.target_protocol_addr()),
        bytes: l3.get(..28).unwrap_or(l3),
    })
}

fn parse_ipv4(l3: &[u8], l3_offset: usize) -> Network<'_> {
    let Ok(ip) = Ipv4Packet::new_checked(l3) else {
        return Network::Malformed {
            reason: "truncated or inconsistent IPv4 header",
        };
    };
    if ip.version() != 4 {
        return Network::Malformed {
            reason: "IPv4 EtherType with a non-4 IP version",
        };
    }
    let hlen = usize::from(ip.header_len());
    let total = usize::from(ip.total_len());
    let protocol = IpProto(u8::from(ip.next_header()));
    let frag_off = u32::from(ip.frag_offset());
    let more = ip.more_frags();
    let fragment = (frag_off != 0 || more).then_some(Fragment {
        offset: frag_off,
        more,
        ident: u32::from(ip.ident()),
    });
    let info = IpInfo {
        version: 4,
        src: IpAddr::V4(ip.src_addr()),
        dst: IpAddr::V4(ip.dst_addr()),
        protocol,
        ttl: ip.hop_limit(),
        l4_offset: l3_offset + hlen,
        l4_end: l3_offset + total,
        fragment,
    };
    let data = l3.get(hlen..total).unwrap_or(&[]);
    let transport = if fragment.is_some() {
        Transport::Fragment { data }
    } else {
        parse_transport(protocol, data, false)
    };
    Network::Ip(info, transport)
}

fn parse_ipv6(l3: &[u8], l3_offset: usize) -> Network<'_> {
    let Ok(ip) = Ipv6Packet::new_checked(l3) else {
        return Network::Malformed {
            reason: "truncated or inconsistent IPv6 header",
        };
    };
    if ip.version() != 6 {
        return Network::Malformed {
            reason: "IPv6 EtherType with a non-6 IP version",
        };
    }
    let total = ip.total_len();
    let mut next = u8::from(ip.next_header());
    let mut off = ip.header_len();
    let mut fragment = None;
    let mut walked = 0;
    let mut error = None;
    loop {
        // Hop-by-hop 0, routing 43, destination options 60, mobility 135, HIP 139, shim6 140:
        // generic "(len + 1) * 8" headers. Fragment 44: 8 bytes. AH 51: (len + 2) * 4.
        let len = match next {
            0 | 43 | 60 | 135 | 139 | 140 => l3.get(off + 1).map(|&l| (usize::from(l) + 1) * 8),
            44 => Some(8),
            51 => l3.get(off + 1).map(|&l| (usize::from(l) + 2) * 4),
            _ => break,
        };
        walked += 1;
        let Some(len) = len.filter(|&l| off + l <= total) else {
            error = Some("truncated IPv6 extension header");
            break;
        };
        if walked > MAX_IPV6_EXT_HEADERS {
            error = Some("too many IPv6 extension headers");
            break;
        }
        if next == 44
            && let Some(h) = l3.get(off..off + 8)
        {
            let fo = u16::from_be_bytes([h[2], h[3]]);
            fragment = Some(Fragment {
                offset: u32::from(fo & 0xfff8),
                more: fo & 1 == 1,
                ident: u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
            });
        }
        next = l3.get(off).copied().unwrap_or(59);
        off += len;
    }
    let protocol = IpProto(next);
    let info = IpInfo {
        version: 6,
        src: IpAddr::V6(ip.src_addr()),
        dst: IpAddr::V6(ip.dst_addr()),
        protocol,
        ttl: ip.hop_limit(),
        l4_offset: l3_offset + off.min(total),
        l4_end: l3_offset + total,
        fragment,
    };
    let data = l3.get(off.min(total)..total).unwrap_or(&[]);
    let transport = if let Some(reason) = error {
        Transport::Malformed { reason, data }
    } else if fragment.is_some() {
        Transport::Fragment { data }
    } else {
        parse_transport(protocol, data, true)
    };
    Network::Ip(info, transport)
}

fn parse_transport(protocol: IpProto, data: &[u8], v6: bool) -> Transport<'_> {
    match protocol {
        IpProto::TCP => match TcpPacket::new_checked(data) {
            Ok(t) => {
                let hl = usize::from(t.header_len());
                let mut flags = 0u16;
                for (set, bit) in [
                    (t.fin(), TcpFlags::FIN),
                    (t.syn(), TcpFlags::SYN),
                    (t.rst(), TcpFlags::RST),
                    (t.psh(), TcpFlags::PSH),
                    (t.ack(), TcpFlags::ACK),
                    (t.urg(), TcpFlags::URG),
                    (t.ece(), TcpFlags::ECE),
                    (t.cwr(), TcpFlags::CWR),
                    (t.ns(), TcpFlags::NS),
                ] {
                    if set {
                        flags |= bit;
                    }
                }
                Transport::Tcp(TcpView {
                    src_port: t.src_port(),
                    dst_port: t.dst_port(),
                    seq: t.seq_number().0 as u32,
                    ack: t.ack_number().0 as u32,
                    flags: TcpFlags(flags),
                    window: t.window_len(),
                    header_len: hl,
                    options: data.get(20..hl).unwrap_or(&[]),
                    payload: data.get(hl..).unwrap_or(&[]),
                })
            }
            Err(_) => Transport::Malformed {
                reason: "truncated or inconsistent TCP header",
                data,
            },
        },
        IpProto::UDP => match UdpPacket::new_checked(data) {
            Ok(u) => Transport::Udp(UdpView {
                src_port: u.src_port(),
                dst_port: u.dst_port(),
                payload: data.get(8..usize::from(u.len())).unwrap_or(&[]),
            }),
            Err(_) => Transport::Malformed {
                reason: "truncated or inconsistent UDP header",
                data,
            },
        },
        IpProto::ICMP if !v6 => match Icmpv4Packet::new_checked(data) {
            Ok(i) => Transport::Icmpv4(icmp_view(i.msg_type().into(), i.msg_code(), data, 8, 0)),
            Err(_) => Transport::Malformed {
                reason: "truncated ICMP header",
                data,
            },
        },
        IpProto::ICMPV6 if v6 => match Icmpv6Packet::new_checked(data) {
            Ok(i) => {
                Transport::Icmpv6(icmp_view(i.msg_type().into(), i.msg_code(), data, 128, 129))
            }
            Err(_) => Transport::Malformed {
                reason: "truncated ICMPv6 header",
                data,
            },
        },
        _ => Transport::Other { data },
    }
}

/// Echo request/reply types: IPv4 uses 8/0, IPv6 128/129.
fn icmp_view(msg_type: u8, code: u8, data: &[u8], echo_req: u8, echo_rep: u8) -> IcmpView<'_> {
    let echo = if msg_type == echo_req || msg_type == echo_rep {
        match data.get(4..8) {
            Some(&[a, b, c, d]) => Some((u16::from_be_bytes([a, b]), u16::from_be_bytes([c, d]))),
            _ => None,
        }
    } else {
        None
    };
    IcmpView {
        msg_type,
        code,
        echo,
        body: data.get(4..).unwrap_or(&[]),
    }
}
