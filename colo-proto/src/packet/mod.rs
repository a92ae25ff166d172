//! Packet parsing for the comparer and the filters: an Ethernet frame (after an optional
//! virtio-net header) becomes a [`ParsedPacket`] view with optional VLAN tags, ARP, IPv4, IPv6
//! (extension headers walked), TCP, UDP, ICMP, ICMPv6 or "other", and a [`ConnKey`] that names
//! its connection.
//!
//! Parsing is built on `smoltcp::wire`'s checked views and never panics: anything that does not
//! fit becomes [`Network::Malformed`] / [`Transport::Malformed`] with a short reason, so callers
//! can still compare or forward the raw bytes.
//!
//! Lengths are taken from the headers, not from the buffer: Ethernet padding after the IP
//! datagram is not part of any L4 payload (QEMU's colo-compare counts it as TCP payload).

pub mod build;
mod key;
mod parse;

pub use key::{ConnKey, IpProto};
pub use parse::{
    ArpView, Fragment, IcmpView, IpInfo, Network, ParsedPacket, TcpFlags, TcpView, Transport,
    UdpView, parse_ethernet, parse_frame,
};

#[cfg(test)]
mod tests;
