//! The `user` netdev's DHCP server: answers a guest's DISCOVER with an OFFER and its REQUEST
//! with an ACK (or a NAK for an address that is not the guest's), giving QEMU's user-network
//! defaults: the guest address (10.0.2.15), the netmask of `net=`, the host (10.0.2.2) as
//! router and server, the DNS address (10.0.2.3) and a 24-hour lease. [`DhcpServer::handle`]
//! gives every client the guest address; [`DhcpServer::handle_pool`] asks the caller for each
//! client's (the user netdev keeps slirp's pool of 16). Replies are broadcast (Ethernet and
//! IPv4), which every client accepts before it has an address.

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    DHCP_CLIENT_PORT, DHCP_SERVER_PORT, DhcpMessageType, DhcpPacket, DhcpRepr, EthernetAddress,
    EthernetFrame, EthernetProtocol, EthernetRepr, IpAddress, IpProtocol, Ipv4Address, Ipv4Packet,
    Ipv4Repr, UdpPacket, UdpRepr,
};

/// Lease time handed out, seconds (QEMU's slirp uses 24 hours).
pub const LEASE_SECS: u32 = 86_400;

/// What [`DhcpServer::handle`] made of a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Dhcp {
    /// Not a DHCP request: the frame goes on to the network stack.
    NotDhcp,
    /// A DHCP message for the server: the reply to send, if any.
    Handled(Option<Vec<u8>>),
}

/// The server's configuration.
#[derive(Clone, Debug)]
pub struct DhcpServer {
    pub host_mac: [u8; 6],
    pub host: Ipv4Address,
    pub guest: Ipv4Address,
    pub netmask: Ipv4Address,
    pub dns: Ipv4Address,
}

impl DhcpServer {
    /// Looks at one frame from the guest; every client is offered `guest`.
    pub fn handle(&self, frame: &[u8]) -> Dhcp {
        self.handle_pool(frame, |_| Some(self.guest)).0
    }

    /// As [`DhcpServer::handle`], with the address for a client chosen by `lease` from its
    /// hardware address (`None`: no address left, no answer). Also returns the client and its
    /// address when it was answered, so that the caller keeps the lease.
    pub fn handle_pool(
        &self,
        frame: &[u8],
        lease: impl FnOnce([u8; 6]) -> Option<Ipv4Address>,
    ) -> (Dhcp, Option<([u8; 6], Ipv4Address)>) {
        const NOT_DHCP: (Dhcp, Option<([u8; 6], Ipv4Address)>) = (Dhcp::NotDhcp, None);
        const DROPPED: (Dhcp, Option<([u8; 6], Ipv4Address)>) = (Dhcp::Handled(None), None);
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            return NOT_DHCP;
        };
        if eth.ethertype() != EthernetProtocol::Ipv4 {
            return NOT_DHCP;
        }
        let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
            return NOT_DHCP;
        };
        if ip.next_header() != IpProtocol::Udp {
            return NOT_DHCP;
        }
        let Ok(udp) = UdpPacket::new_checked(ip.payload()) else {
            return NOT_DHCP;
        };
        if udp.dst_port() != DHCP_SERVER_PORT {
            return NOT_DHCP;
        }
        let Ok(pkt) = DhcpPacket::new_checked(udp.payload()) else {
            return DROPPED;
        };
        let client = pkt.client_hardware_address().0;
        let Some(yours) = lease(client) else {
            tracing::debug!("DHCP: no address left for {client:02x?}");
            return DROPPED;
        };
        let Ok(req) = DhcpRepr::parse(&pkt) else {
            return DROPPED;
        };
        // Addressed to another server (a REQUEST naming a different server identifier).
        if let Some(sid) = req.server_identifier
            && sid != self.host
        {
            return DROPPED;
        }
        let reply_type = match req.message_type {
            DhcpMessageType::Discover => DhcpMessageType::Offer,
            DhcpMessageType::Request => {
                let asked = req.requested_ip.unwrap_or(req.client_ip);
                if asked == yours || asked.is_unspecified() {
                    DhcpMessageType::Ack
                } else {
                    DhcpMessageType::Nak
                }
            }
            _ => return DROPPED,
        };
        tracing::debug!(
            "DHCP {:?} from {} -> {:?}",
            req.message_type,
            req.client_hardware_address,
            reply_type
        );
        let reply = self.reply(&req, reply_type, yours);
        (Dhcp::Handled(Some(reply)), Some((client, yours)))
    }

    fn reply(
        &self,
        req: &DhcpRepr<'_>,
        message_type: DhcpMessageType,
        yours: Ipv4Address,
    ) -> Vec<u8> {
        let nak = message_type == DhcpMessageType::Nak;
        let dns = [self.dns].into_iter().collect();
        let repr = DhcpRepr {
            message_type,
            transaction_id: req.transaction_id,
            secs: 0,
            client_hardware_address: req.client_hardware_address,
            client_ip: Ipv4Address::UNSPECIFIED,
            your_ip: if nak { Ipv4Address::UNSPECIFIED } else { yours },
            server_ip: self.host,
            router: (!nak).then_some(self.host),
            subnet_mask: (!nak).then_some(self.netmask),
            relay_agent_ip: Ipv4Address::UNSPECIFIED,
            broadcast: true,
            requested_ip: None,
            client_identifier: None,
            server_identifier: Some(self.host),
            parameter_request_list: None,
            dns_servers: (!nak).then_some(dns),
            max_size: None,
            lease_duration: (!nak).then_some(LEASE_SECS),
            renew_duration: None,
            rebind_duration: None,
            additional_options: &[],
        };
        let dhcp_len = repr.buffer_len();
        let udp = UdpRepr {
            src_port: DHCP_SERVER_PORT,
            dst_port: DHCP_CLIENT_PORT,
        };
        let ip = Ipv4Repr {
            src_addr: self.host,
            dst_addr: Ipv4Address::BROADCAST,
            next_header: IpProtocol::Udp,
            payload_len: 8 + dhcp_len,
            hop_limit: 64,
        };
        let eth = EthernetRepr {
            src_addr: EthernetAddress(self.host_mac),
            dst_addr: EthernetAddress::BROADCAST,
            ethertype: EthernetProtocol::Ipv4,
        };
        let mut buf = vec![0u8; 14 + 20 + 8 + dhcp_len];
        let mut f = EthernetFrame::new_unchecked(&mut buf[..]);
        eth.emit(&mut f);
        let caps = ChecksumCapabilities::default();
        let mut ipp = Ipv4Packet::new_unchecked(f.payload_mut());
        ip.emit(&mut ipp, &caps);
        let mut up = UdpPacket::new_unchecked(ipp.payload_mut());
        udp.emit(
            &mut up,
            &IpAddress::Ipv4(self.host),
            &IpAddress::Ipv4(Ipv4Address::BROADCAST),
            dhcp_len,
            |p| {
                let mut d = DhcpPacket::new_unchecked(p);
                if let Err(e) = repr.emit(&mut d) {
                    tracing::warn!("DHCP reply: {e}");
                }
            },
            &caps,
        );
        buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    fn server() -> DhcpServer {
        DhcpServer {
            host_mac: [0x52, 0x55, 10, 0, 2, 2],
            host: Ipv4Address::new(10, 0, 2, 2),
            guest: Ipv4Address::new(10, 0, 2, 15),
            netmask: Ipv4Address::new(255, 255, 255, 0),
            dns: Ipv4Address::new(10, 0, 2, 3),
        }
    }

    /// A client message as a DHCP client sends it (from 0.0.0.0:68 to 255.255.255.255:67).
    fn client_msg(
        t: DhcpMessageType,
        requested: Option<Ipv4Address>,
        sid: Option<Ipv4Address>,
    ) -> Vec<u8> {
        let repr = DhcpRepr {
            message_type: t,
            transaction_id: 0x1234_5678,
            secs: 0,
            client_hardware_address: EthernetAddress(CLIENT),
            client_ip: Ipv4Address::UNSPECIFIED,
            your_ip: Ipv4Address::UNSPECIFIED,
            server_ip: Ipv4Address::UNSPECIFIED,
            router: None,
            subnet_mask: None,
            relay_agent_ip: Ipv4Address::UNSPECIFIED,
            broadcast: false,
            requested_ip: requested,
            client_identifier: Some(EthernetAddress(CLIENT)),
            server_identifier: sid,
            parameter_request_list: Some(&[1, 3, 6, 51]),
            dns_servers: None,
            max_size: Some(1500),
            lease_duration: None,
            renew_duration: None,
            rebind_duration: None,
            additional_options: &[],
        };
        let n = repr.buffer_len();
        let mut buf = vec![0u8; 14 + 20 + 8 + n];
        let mut f = EthernetFrame::new_unchecked(&mut buf[..]);
        EthernetRepr {
            src_addr: EthernetAddress(CLIENT),
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
            payload_len: 8 + n,
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
            n,
            |p| repr.emit(&mut DhcpPacket::new_unchecked(p)).unwrap(),
            &caps,
        );
        buf
    }

    type Reply = (
        DhcpMessageType,
        Ipv4Address,
        Option<Ipv4Address>,
        Option<Ipv4Address>,
        Vec<Ipv4Address>,
        Option<u32>,
        Option<Ipv4Address>,
    );

    fn parse_reply(f: &[u8]) -> Reply {
        let eth = EthernetFrame::new_checked(f).unwrap();
        assert!(eth.dst_addr().is_broadcast());
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        assert!(ip.verify_checksum());
        let udp = UdpPacket::new_checked(ip.payload()).unwrap();
        assert!(udp.verify_checksum(
            &IpAddress::Ipv4(ip.src_addr()),
            &IpAddress::Ipv4(ip.dst_addr())
        ));
        assert_eq!((udp.src_port(), udp.dst_port()), (67, 68));
        let p = DhcpPacket::new_checked(udp.payload()).unwrap();
        let r = DhcpRepr::parse(&p).unwrap();
        assert_eq!(r.transaction_id, 0x1234_5678);
        assert_eq!(r.client_hardware_address, EthernetAddress(CLIENT));
        (
            r.message_type,
            r.your_ip,
            r.router,
            r.subnet_mask,
            r.dns_servers.map(|d| d.to_vec()).unwrap_or_default(),
            r.lease_duration,
            r.server_identifier,
        )
    }

    #[test]
    fn discover_gets_an_offer_and_request_an_ack_with_qemus_defaults() {
        let s = server();
        let Dhcp::Handled(Some(offer)) =
            s.handle(&client_msg(DhcpMessageType::Discover, None, None))
        else {
            panic!("no offer");
        };
        let (t, yi, router, mask, dns, lease, sid) = parse_reply(&offer);
        assert_eq!(t, DhcpMessageType::Offer);
        assert_eq!(yi, Ipv4Address::new(10, 0, 2, 15));
        assert_eq!(router, Some(Ipv4Address::new(10, 0, 2, 2)));
        assert_eq!(mask, Some(Ipv4Address::new(255, 255, 255, 0)));
        assert_eq!(dns, vec![Ipv4Address::new(10, 0, 2, 3)]);
        assert_eq!(lease, Some(LEASE_SECS));
        assert_eq!(sid, Some(Ipv4Address::new(10, 0, 2, 2)));
        let Dhcp::Handled(Some(ack)) =
            s.handle(&client_msg(DhcpMessageType::Request, Some(yi), sid))
        else {
            panic!("no ack");
        };
        let (t, yi, ..) = parse_reply(&ack);
        assert_eq!(t, DhcpMessageType::Ack);
        assert_eq!(yi, Ipv4Address::new(10, 0, 2, 15));
    }

    #[test]
    fn wrong_address_gets_a_nak_and_other_servers_requests_are_ignored() {
        let s = server();
        let Dhcp::Handled(Some(nak)) = s.handle(&client_msg(
            DhcpMessageType::Request,
            Some(Ipv4Address::new(192, 168, 1, 9)),
            None,
        )) else {
            panic!("no nak");
        };
        let (t, yi, router, ..) = parse_reply(&nak);
        assert_eq!(t, DhcpMessageType::Nak);
        assert!(yi.is_unspecified());
        assert_eq!(router, None);
        assert_eq!(
            s.handle(&client_msg(
                DhcpMessageType::Request,
                Some(Ipv4Address::new(10, 0, 2, 15)),
                Some(Ipv4Address::new(10, 0, 2, 99)),
            )),
            Dhcp::Handled(None)
        );
        assert_eq!(
            s.handle(&client_msg(DhcpMessageType::Release, None, None)),
            Dhcp::Handled(None)
        );
    }

    #[test]
    fn other_frames_and_garbage_pass_or_are_dropped_without_panic() {
        let s = server();
        let mut f = client_msg(DhcpMessageType::Discover, None, None);
        // Not port 67.
        let mut other = f.clone();
        other[14 + 20 + 2..14 + 20 + 4].copy_from_slice(&53u16.to_be_bytes());
        assert_eq!(s.handle(&other), Dhcp::NotDhcp);
        assert_eq!(s.handle(&[0u8; 10]), Dhcp::NotDhcp);
        // A truncated DHCP payload behind a valid UDP header.
        f.truncate(14 + 20 + 8 + 20);
        let ulen = (8 + 20) as u16;
        f[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&ulen.to_be_bytes());
        f[14 + 2..14 + 4].copy_from_slice(&(20 + ulen).to_be_bytes());
        assert!(matches!(s.handle(&f), Dhcp::Handled(None) | Dhcp::NotDhcp));
    }
}
