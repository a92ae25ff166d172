//! The `user` netdev's DHCP server (`netdev::dhcp::DhcpServer::handle`) fed guest frames.
//!
//! Input: byte 0 selects the mode. Even: the rest is the DHCP message, which the target wraps
//! in a valid Ethernet/IPv4/UDP frame to port 67 (so that random bytes reach the DHCP parser);
//! odd: the rest is the whole frame. Checks: no panic; a reply is a broadcast IPv4/UDP frame
//! from port 67 to port 68 with valid checksums, carrying a DHCP message of the request's
//! transaction id that parses again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    DHCP_CLIENT_PORT, DHCP_SERVER_PORT, DhcpPacket, DhcpRepr, EthernetAddress, EthernetFrame,
    EthernetProtocol, EthernetRepr, IpAddress, IpProtocol, Ipv4Address, Ipv4Packet, Ipv4Repr,
    UdpPacket, UdpRepr,
};
use vhost_net_colo::netdev::dhcp::{Dhcp, DhcpServer};

fn wrap(msg: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 14 + 20 + 8 + msg.len()];
    let mut f = EthernetFrame::new_unchecked(&mut buf[..]);
    EthernetRepr {
        src_addr: EthernetAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
        dst_addr: EthernetAddress::BROADCAST,
        ethertype: EthernetProtocol::Ipv4,
    }
    .emit(&mut f);
    let caps = ChecksumCapabilities::default();
    let mut ip = Ipv4Packet::new_unchecked(f.payload_mut());
    Ipv4Repr {
        src_addr: Ipv4Address::UNSPECIFIED,
        dst_addr: Ipv4Address::BROADCAST,
        next_header: IpProtocol::Udp,
        payload_len: 8 + msg.len(),
        hop_limit: 64,
    }
    .emit(&mut ip, &caps);
    let mut u = UdpPacket::new_unchecked(ip.payload_mut());
    UdpRepr {
        src_port: DHCP_CLIENT_PORT,
        dst_port: DHCP_SERVER_PORT,
    }
    .emit(
        &mut u,
        &IpAddress::Ipv4(Ipv4Address::UNSPECIFIED),
        &IpAddress::Ipv4(Ipv4Address::BROADCAST),
        msg.len(),
        |p| p.copy_from_slice(msg),
        &caps,
    );
    buf
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let server = DhcpServer {
        host_mac: [0x52, 0x55, 10, 0, 2, 2],
        host: Ipv4Address::new(10, 0, 2, 2),
        guest: Ipv4Address::new(10, 0, 2, 15),
        netmask: Ipv4Address::new(255, 255, 255, 0),
        dns: Ipv4Address::new(10, 0, 2, 3),
    };
    let frame = if mode & 1 == 0 {
        wrap(rest)
    } else {
        rest.to_vec()
    };
    let Dhcp::Handled(Some(reply)) = server.handle(&frame) else {
        return;
    };
    // The request parsed, so the frame carries a DHCP message: its transaction id.
    let xid = {
        let eth = EthernetFrame::new_checked(&frame[..]).expect("handled frame is Ethernet");
        let ip = Ipv4Packet::new_checked(eth.payload()).expect("IPv4");
        let udp = UdpPacket::new_checked(ip.payload()).expect("UDP");
        DhcpPacket::new_checked(udp.payload())
            .expect("DHCP")
            .transaction_id()
    };
    let eth = EthernetFrame::new_checked(&reply[..]).expect("reply is Ethernet");
    assert!(eth.dst_addr().is_broadcast());
    assert_eq!(eth.ethertype(), EthernetProtocol::Ipv4);
    let ip = Ipv4Packet::new_checked(eth.payload()).expect("reply is IPv4");
    assert!(ip.verify_checksum());
    assert_eq!(ip.next_header(), IpProtocol::Udp);
    let udp = UdpPacket::new_checked(ip.payload()).expect("reply is UDP");
    assert!(udp.verify_checksum(
        &IpAddress::Ipv4(ip.src_addr()),
        &IpAddress::Ipv4(ip.dst_addr())
    ));
    assert_eq!(udp.src_port(), DHCP_SERVER_PORT);
    assert_eq!(udp.dst_port(), DHCP_CLIENT_PORT);
    let pkt = DhcpPacket::new_checked(udp.payload()).expect("reply is DHCP");
    let r = DhcpRepr::parse(&pkt).expect("reply parses");
    assert_eq!(r.transaction_id, xid);
});
