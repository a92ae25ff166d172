use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use smoltcp::wire::{IpAddress, Ipv4Packet, TcpPacket};

use super::build::{Link, TcpSegment, arp_frame, icmp_echo_frame, tcp_frame, udp_frame};
use super::*;
use crate::frame::Frame;

fn v4(a: u8, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, a)), port)
}
fn v6(a: u16, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, a)), port)
}

fn seg(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> TcpSegment<'_> {
    TcpSegment {
        src,
        dst,
        seq: 0xffff_fff0,
        ack: 77,
        flags: TcpFlags::ACK | TcpFlags::PSH,
        window: 512,
        payload,
    }
}

#[test]
fn ipv4_tcp_is_parsed_with_checksum_and_key() {
    let f = tcp_frame(&Link::default(), &seg(v4(1, 80), v4(2, 4000), b"hello"));
    let p = parse_ethernet(&f);
    let t = p.tcp().expect("tcp");
    assert_eq!(
        (t.src_port, t.dst_port, t.seq, t.ack),
        (80, 4000, 0xffff_fff0, 77)
    );
    assert!(t.flags.ack() && !t.flags.syn());
    assert_eq!(t.payload, b"hello");
    assert_eq!(t.seq_len(), 5);
    let ip = Ipv4Packet::new_checked(&f[14..]).unwrap();
    assert!(ip.verify_checksum());
    let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
    assert!(tcp.verify_checksum(
        &IpAddress::Ipv4(ip.src_addr()),
        &IpAddress::Ipv4(ip.dst_addr())
    ));
    let k = p.conn_key().unwrap();
    assert_eq!(k.protocol, IpProto::TCP);
    assert_eq!(
        (k.src, k.src_port, k.dst, k.dst_port),
        (v4(1, 0).ip(), 80, v4(2, 0).ip(), 4000)
    );
    assert_eq!(k.vlan, None);
}

#[test]
fn ethernet_padding_is_not_payload() {
    let mut f = tcp_frame(&Link::default(), &seg(v4(1, 80), v4(2, 4000), b""));
    assert_eq!(f.len(), 54);
    f.resize(60, 0xAA);
    let p = parse_ethernet(&f);
    assert_eq!(p.tcp().unwrap().payload, b"");
    assert_eq!(p.l4_bytes().unwrap().len(), 20);
}

#[test]
fn normalized_key_is_direction_independent() {
    let a = tcp_frame(&Link::default(), &seg(v4(9, 80), v4(2, 4000), b"x"));
    let b = tcp_frame(
        &Link::default().reversed(),
        &seg(v4(2, 4000), v4(9, 80), b"y"),
    );
    let ka = parse_ethernet(&a).conn_key().unwrap();
    let kb = parse_ethernet(&b).conn_key().unwrap();
    assert_ne!(ka, kb);
    assert_eq!(ka.reversed(), kb);
    let (na, sa) = ka.normalized();
    let (nb, sb) = kb.normalized();
    assert_eq!(na, nb);
    assert_ne!(sa, sb);
    assert!(sa, "10.0.0.9 > 10.0.0.2, so the first key is swapped");
    assert_eq!(ka.to_string(), "tcp 10.0.0.9:80 > 10.0.0.2:4000");
}

#[test]
fn vlan_tags_single_and_stacked() {
    let link = Link {
        vlan: Some(42),
        ..Link::default()
    };
    let f = udp_frame(&link, v4(1, 53), v4(2, 999), b"dns");
    let p = parse_ethernet(&f);
    assert_eq!(p.vlans, [Some(42), None]);
    assert_eq!(p.l3_offset, 18);
    assert_eq!(p.conn_key().unwrap().vlan, Some(42));
    let Some(Transport::Udp(u)) = p.transport() else {
        panic!("udp expected: {p:?}")
    };
    assert_eq!(u.payload, b"dns");
    // 802.1ad outer tag 7 around the 802.1Q tag 42.
    let mut q = f[..12].to_vec();
    q.extend_from_slice(&[0x88, 0xa8, 0x00, 0x07]);
    q.extend_from_slice(&f[12..]);
    let p = parse_ethernet(&q);
    assert_eq!(p.vlans, [Some(7), Some(42)]);
    assert_eq!(p.conn_key().unwrap().vlan, Some(7));
    assert!(matches!(p.transport(), Some(Transport::Udp(_))));
}

#[test]
fn arp_is_parsed_without_padding() {
    let f = arp_frame(
        &Link::default(),
        1,
        Ipv4Addr::new(10, 0, 0, 1),
        [0; 6],
        Ipv4Addr::new(10, 0, 0, 2),
    );
    assert_eq!(f.len(), 60);
    let p = parse_ethernet(&f);
    let Network::Arp(a) = &p.net else {
        panic!("arp expected: {p:?}")
    };
    assert_eq!(a.operation, 1);
    assert_eq!(a.sender_ip, Ipv4Addr::new(10, 0, 0, 1));
    assert_eq!(a.target_ip, Ipv4Addr::new(10, 0, 0, 2));
    assert_eq!(a.bytes.len(), 28);
    assert_eq!(p.conn_key(), None);
}

#[test]
fn icmp_echo_request_and_reply_share_normalized_key() {
    let (a, b) = (v4(1, 0).ip(), v4(2, 0).ip());
    let req = icmp_echo_frame(&Link::default(), a, b, true, 0x1234, 1, b"ping");
    let rep = icmp_echo_frame(&Link::default().reversed(), b, a, false, 0x1234, 1, b"ping");
    let (pq, pr) = (parse_ethernet(&req), parse_ethernet(&rep));
    let Some(Transport::Icmpv4(i)) = pq.transport() else {
        panic!("icmp expected")
    };
    assert_eq!((i.msg_type, i.echo), (8, Some((0x1234, 1))));
    assert_eq!(
        pq.conn_key().unwrap().normalized().0,
        pr.conn_key().unwrap().normalized().0
    );
    let (a6, b6) = (v6(1, 0).ip(), v6(2, 0).ip());
    let req6 = icmp_echo_frame(&Link::default(), a6, b6, true, 9, 2, b"ping6");
    let p6 = parse_ethernet(&req6);
    let Some(Transport::Icmpv6(i)) = p6.transport() else {
        panic!("icmpv6 expected: {p6:?}")
    };
    assert_eq!((i.msg_type, i.echo), (128, Some((9, 2))));
    assert_eq!(p6.conn_key().unwrap().protocol, IpProto::ICMPV6);
}

#[test]
fn ipv6_extension_headers_are_walked() {
    let f = tcp_frame(&Link::default(), &seg(v6(1, 443), v6(2, 5555), b"v6data"));
    let p = parse_ethernet(&f);
    assert_eq!(p.tcp().unwrap().payload, b"v6data");
    assert_eq!(p.ip().unwrap().version, 6);
    // Insert a hop-by-hop header (8 bytes, PadN) and a destination options header.
    let mut g = f[..54].to_vec();
    g[20] = 0; // next header: hop-by-hop
    let plen = u16::from_be_bytes([g[18], g[19]]) + 16;
    g[18..20].copy_from_slice(&plen.to_be_bytes());
    g.extend_from_slice(&[60, 0, 1, 4, 0, 0, 0, 0]);
    g.extend_from_slice(&[6, 0, 1, 4, 0, 0, 0, 0]);
    g.extend_from_slice(&f[54..]);
    let p = parse_ethernet(&g);
    assert_eq!(p.ip().unwrap().protocol, IpProto::TCP);
    assert_eq!(p.ip().unwrap().l4_offset, 14 + 40 + 16);
    assert_eq!(p.tcp().expect("tcp after ext headers").payload, b"v6data");
    // A fragment header makes it a fragment with ports 0.
    let mut h = g.clone();
    h[54 + 8] = 44;
    h[54 + 8 + 1] = 0;
    let p = parse_ethernet(&h);
    assert!(
        matches!(p.transport(), Some(Transport::Fragment { .. })),
        "{p:?}"
    );
    assert_eq!(p.conn_key().unwrap().src_port, 0);
    // An extension header running past the payload is malformed, not a panic.
    let mut m = g.clone();
    m[54 + 1] = 200;
    assert!(matches!(
        parse_ethernet(&m).transport(),
        Some(Transport::Malformed { .. })
    ));
}

#[test]
fn other_ethertype_and_short_frames() {
    let mut f = vec![0u8; 60];
    f[12] = 0x88;
    f[13] = 0xcc; // LLDP
    assert!(matches!(
        parse_ethernet(&f).net,
        Network::Other {
            ethertype: 0x88cc,
            ..
        }
    ));
    assert!(matches!(
        parse_ethernet(&f[..10]).net,
        Network::Malformed { .. }
    ));
}

#[test]
fn vnet_header_is_skipped() {
    let eth = udp_frame(&Link::default(), v4(1, 1), v4(2, 2), b"z");
    let mut payload = vec![0u8; 12];
    payload.extend_from_slice(&eth);
    let fr = Frame {
        vnet_hdr_len: 12,
        payload,
    };
    let p = parse_frame(&fr);
    assert_eq!(p.vnet_hdr.len(), 12);
    assert_eq!(p.l2, &eth[..]);
    assert!(matches!(p.transport(), Some(Transport::Udp(_))));
    let bad = Frame {
        vnet_hdr_len: 500,
        payload: vec![0; 20],
    };
    assert!(matches!(parse_frame(&bad).net, Network::Malformed { .. }));
}

#[test]
fn every_truncation_and_bitflip_parses_without_panic() {
    let frames = [
        tcp_frame(
            &Link {
                vlan: Some(3),
                ..Link::default()
            },
            &seg(v4(1, 80), v4(2, 4000), b"abcdef"),
        ),
        tcp_frame(&Link::default(), &seg(v6(1, 80), v6(2, 4000), b"abcdef")),
        udp_frame(&Link::default(), v6(1, 1), v6(2, 2), b"xyz"),
        icmp_echo_frame(
            &Link::default(),
            v4(1, 0).ip(),
            v4(2, 0).ip(),
            true,
            1,
            1,
            b"p",
        ),
        arp_frame(
            &Link::default(),
            2,
            Ipv4Addr::LOCALHOST,
            [1; 6],
            Ipv4Addr::LOCALHOST,
        ),
    ];
    for f in &frames {
        for n in 0..=f.len() {
            let _ = parse_ethernet(&f[..n]).conn_key();
        }
        for i in 0..f.len() {
            for bit in 0..8 {
                let mut g = f.clone();
                g[i] ^= 1 << bit;
                let p = parse_ethernet(&g);
                let _ = (p.conn_key(), p.l4_bytes());
            }
        }
    }
}
