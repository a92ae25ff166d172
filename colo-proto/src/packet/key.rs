//! Connection keys.

use std::net::IpAddr;

/// IP protocol numbers the key cares about (the raw number is kept for everything else).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct IpProto(pub u8);

impl IpProto {
    /// ICMP for IPv4.
    pub const ICMP: IpProto = IpProto(1);
    /// TCP.
    pub const TCP: IpProto = IpProto(6);
    /// UDP.
    pub const UDP: IpProto = IpProto(17);
    /// ICMPv6.
    pub const ICMPV6: IpProto = IpProto(58);
}

impl std::fmt::Display for IpProto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            IpProto::TCP => f.write_str("tcp"),
            IpProto::UDP => f.write_str("udp"),
            IpProto::ICMP => f.write_str("icmp"),
            IpProto::ICMPV6 => f.write_str("icmpv6"),
            IpProto(n) => write!(f, "ip-proto-{n}"),
        }
    }
}

/// Identifies one connection (flow) of IP traffic, in the direction the packet travelled.
///
/// Ports: TCP and UDP ports; for ICMP/ICMPv6 echo request/reply the echo identifier is put in
/// both `src_port` and `dst_port` (so a request and its reply share a normalised key); other
/// protocols, ICMP errors and non-first IPv4 fragments use 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct ConnKey {
    /// The outermost VLAN id (802.1Q/802.1ad), if the frame was tagged.
    pub vlan: Option<u16>,
    /// IP protocol of the transport (after IPv6 extension headers).
    pub protocol: IpProto,
    /// Source address.
    pub src: IpAddr,
    /// Source port (see the type's doc for non-port protocols).
    pub src_port: u16,
    /// Destination address.
    pub dst: IpAddr,
    /// Destination port.
    pub dst_port: u16,
}

impl ConnKey {
    /// The same key seen from the other end.
    pub fn reversed(&self) -> ConnKey {
        ConnKey {
            vlan: self.vlan,
            protocol: self.protocol,
            src: self.dst,
            src_port: self.dst_port,
            dst: self.src,
            dst_port: self.src_port,
        }
    }

    /// A direction-independent key: both directions of one connection give the same key.
    /// Returns the key and whether it was swapped relative to `self` (endpoints are ordered so
    /// that `(src, src_port) <= (dst, dst_port)`).
    pub fn normalized(&self) -> (ConnKey, bool) {
        if (self.src, self.src_port) <= (self.dst, self.dst_port) {
            (*self, false)
        } else {
            (self.reversed(), true)
        }
    }
}

impl std::fmt::Display for ConnKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(v) = self.vlan {
            write!(f, "vlan{v} ")?;
        }
        let ep = |f: &mut std::fmt::Formatter<'_>, a: &IpAddr, p: u16| match a {
            IpAddr::V4(a) => write!(f, "{a}:{p}"),
            IpAddr::V6(a) => write!(f, "[{a}]:{p}"),
        };
        write!(f, "{} ", self.protocol)?;
        ep(f, &self.src, self.src_port)?;
        f.write_str(" > ")?;
        ep(f, &self.dst, self.dst_port)
    }
}
