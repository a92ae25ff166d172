//! Outbound NAT and DNS forwarding of the `user` netdev (what QEMU's slirp gives a guest).
//!
//! Every IPv4 frame from the guest is classified here before smoltcp sees it:
//!
//! - **TCP**: a SYN the guest sends to any address starts a non-blocking `connect` from the host
//!   to that address (`host=` stands for the host's 127.0.0.1, `dns=`:53 for the DNS upstream).
//!   The SYN is held until the connect completes: then a smoltcp socket listening on exactly
//!   that address and port takes the held SYN and the stack relays bytes both ways as it does
//!   for `hostfwd` (half-closes included). A refused connect becomes a RST to the guest, any
//!   other failure or no answer within [`DEFAULT_CONNECT_TIMEOUT`] (`x-connect-timeout=SECS`)
//!   an ICMP host unreachable. Retransmitted SYNs of a pending connect are dropped.
//! - **UDP**: one host UDP socket per guest flow (source address and port); datagrams go out
//!   from it, replies come back to the guest from the address the guest sent to (127.0.0.1 as
//!   `host=`, the DNS upstream as `dns=`:53). A flow idle for [`UDP_IDLE`] (DNS-only flows:
//!   [`UDP_DNS_IDLE`]) is closed. Replies larger than the link MTU are IPv4-fragmented.
//! - **DNS**: UDP (and TCP) to `dns=` (default 10.0.2.3) port 53 goes to the first IPv4
//!   `nameserver` of /etc/resolv.conf (read once when the netdev opens), or to
//!   `x-dns-upstream=IP:PORT` (ours, for tests and for hosts whose resolver is elsewhere).
//! - **ICMP echo** ("ping"): a request to `host=` or `dns=` is answered here by the netdev
//!   itself, as slirp answers its own addresses: the gateway is the netdev, so its answer says
//!   that the guest's link works, needs no host socket or sysctl, and comes with `restrict=on`
//!   too (a real ping of 127.0.0.1 in its place would add a descriptor and the dependency below
//!   and tell nothing more: loopback always answers). A request to any other outside address
//!   goes through an unprivileged ICMP datagram socket ([`super::user_icmp`]), which needs the
//!   process's group in `net.ipv4.ping_group_range` of its network namespace; without it the
//!   netdev says so in one warning when it opens and such requests are dropped (counted,
//!   `icmp_unavailable`). The reply keeps the guest's identifier, sequence and data. A request
//!   the host cannot route at all gets an ICMP net/host unreachable from `host=`.
//! - **ICMP errors** the host receives for the guest's pings and UDP datagrams (`IP_RECVERR`:
//!   port/host/net unreachable, fragmentation needed, time exceeded) reach the guest as ICMP
//!   errors quoting its packet, from the offender (`host=` for the host itself), so a guest's
//!   UDP socket sees `ECONNREFUSED` and `ping` reports the unreachable host. The guest's TTL
//!   goes out with its pings and datagrams (the netdev is no hop, as slirp is not), so a
//!   guest's traceroute gets "time exceeded" from the routers behind the host.
//! - **`restrict=on`**: nothing of the above leaves; the guest reaches only the netdev itself
//!   (ARP, ping, DHCP) and whatever `hostfwd` brings in. Datagrams, pings and connections that
//!   would leave are dropped and counted (a SYN to `host=` gets smoltcp's RST as before).
//!
//! Frames smoltcp must not see are dropped here: ARP for addresses other than `host=`/`dns=`
//! and IPv6 (smoltcp's any-IP mode, which lets it accept TCP for every address, would otherwise
//! answer them all), ICMP other than echo requests to outside addresses, fragments of UDP
//! datagrams and of pings (not reassembled).

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr,
    Icmpv4DstUnreachable, Icmpv4Packet, Icmpv4Repr, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr,
    TcpPacket, TcpSeqNumber, UdpPacket, UdpRepr,
};

use super::user_icmp::{self, EchoSockets, FromHost, HostIcmpError};
use crate::offload::{GSO_UDP, VnetHdr, to_plain};

/// How long a guest's connection waits for the host's `connect` (slirp leaves it to the host
/// kernel; a bounded wait keeps pending state small). `x-connect-timeout=SECS` changes it.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// A UDP flow with no datagram either way for this long is closed (slirp: 240 s).
pub const UDP_IDLE: Duration = Duration::from_secs(120);
/// A flow that only ever talked to the DNS address is closed sooner (slirp: 10 s).
pub const UDP_DNS_IDLE: Duration = Duration::from_secs(10);
/// At most this many connects pending, outbound connections and UDP flows open at once (each
/// holds a host descriptor; the process's default limit is 1024); more are dropped (counted).
pub const MAX_PENDING: usize = 128;
pub const MAX_TCP: usize = 512;
pub const MAX_UDP_FLOWS: usize = 256;
const MTU: usize = 1500;
const DEST_UNREACH: u8 = user_icmp::DEST_UNREACHABLE;
const TIME_EXCEEDED: u8 = user_icmp::TIME_EXCEEDED;

/// Whether `ip` can be the source of a packet (an ICMP answer goes back to it).
fn unicast(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast())
}

/// A guest TCP connection: guest address and port, destination address and port (as the guest
/// sees them).
pub type TcpKey = (Ipv4Addr, u16, Ipv4Addr, u16);

/// How the NAT maps the guest's view to the host's.
#[derive(Clone, Debug)]
pub struct NatConfig {
    pub host: Ipv4Addr,
    pub dns: Ipv4Addr,
    pub net: smoltcp::wire::Ipv4Cidr,
    pub host_mac: [u8; 6],
    /// Where DNS queries go; `None`: no resolver known, queries are dropped (counted).
    pub dns_upstream: Option<SocketAddrV4>,
    pub restrict: bool,
    pub connect_timeout: Duration,
    /// Whether ping sockets can be opened here ([`user_icmp::ping_unavailable`]): echo
    /// requests to outside addresses are forwarded only then.
    pub ping: bool,
}

/// The first IPv4 `nameserver` of a resolv.conf text, port 53.
pub fn resolv_conf_nameserver(text: &str) -> Option<SocketAddrV4> {
    text.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        (w.next() == Some("nameserver"))
            .then(|| w.next()?.parse::<Ipv4Addr>().ok())
            .flatten()
            .map(|ip| SocketAddrV4::new(ip, 53))
    })
}

/// Counters of the NAT, reported in `describe()`.
#[derive(Debug, Default)]
pub struct NatCounters {
    pub tcp_connects: AtomicU64,
    pub tcp_refused: AtomicU64,
    pub tcp_unreachable: AtomicU64,
    pub tcp_timeouts: AtomicU64,
    pub udp_to_host: AtomicU64,
    pub udp_to_guest: AtomicU64,
    pub udp_flows_expired: AtomicU64,
    pub dns_queries: AtomicU64,
    pub dropped_restricted: AtomicU64,
    pub dropped_other: AtomicU64,
    /// Echo requests to `host=`/`dns=` answered by the netdev.
    pub icmp_echo_local: AtomicU64,
    /// Echo requests sent out through a ping socket, and replies brought back.
    pub icmp_echo_out: AtomicU64,
    pub icmp_echo_in: AtomicU64,
    /// ICMP errors sent to the guest (from the host's error queues or for unroutable pings).
    pub icmp_errors_to_guest: AtomicU64,
    /// Echo requests to outside addresses dropped because ping sockets are not allowed.
    pub icmp_unavailable: AtomicU64,
    pub icmp_sockets_expired: AtomicU64,
}

impl NatCounters {
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "tcp_connects": self.tcp_connects.load(Relaxed),
            "tcp_refused": self.tcp_refused.load(Relaxed),
            "tcp_unreachable": self.tcp_unreachable.load(Relaxed),
            "tcp_timeouts": self.tcp_timeouts.load(Relaxed),
            "udp_to_host": self.udp_to_host.load(Relaxed),
            "udp_to_guest": self.udp_to_guest.load(Relaxed),
            "udp_flows_expired": self.udp_flows_expired.load(Relaxed),
            "dns_queries": self.dns_queries.load(Relaxed),
            "dropped_restricted": self.dropped_restricted.load(Relaxed),
            "dropped_other": self.dropped_other.load(Relaxed),
            "icmp_echo_local": self.icmp_echo_local.load(Relaxed),
            "icmp_echo_out": self.icmp_echo_out.load(Relaxed),
            "icmp_echo_in": self.icmp_echo_in.load(Relaxed),
            "icmp_errors_to_guest": self.icmp_errors_to_guest.load(Relaxed),
            "icmp_unavailable": self.icmp_unavailable.load(Relaxed),
            "icmp_sockets_expired": self.icmp_sockets_expired.load(Relaxed),
        })
    }
}

/// What to do with a frame from the guest.
pub enum Verdict {
    /// Give it to smoltcp.
    Stack(Vec<u8>),
    /// Handled (or dropped) here.
    Done,
}

struct PendingTcp {
    key: TcpKey,
    sock: OwnedFd,
    syn: Vec<u8>,
    started: Instant,
}

/// A connect that completed: the stack makes a smoltcp socket listen on `key`'s destination,
/// feeds it `syn` and relays between it and `host`.
pub struct Connected {
    pub key: TcpKey,
    pub host: TcpStream,
    pub syn: Vec<u8>,
}

struct UdpFlow {
    sock: UdpSocket,
    guest_mac: [u8; 6],
    last: Instant,
    dns_only: bool,
    /// The TTL the socket sends with (the guest's last; 0: the host's default).
    ttl: u8,
}

/// The NAT state, owned by the stack thread.
pub struct Nat {
    cfg: NatConfig,
    pending: Vec<PendingTcp>,
    active: HashSet<TcpKey>,
    udp: HashMap<(Ipv4Addr, u16), UdpFlow>,
    echo: EchoSockets,
    /// A ping socket failed to open after the netdev opened (said once).
    echo_warned: bool,
    last_sweep: Instant,
    ident: u16,
    buf: Vec<u8>,
    pub counters: Arc<NatCounters>,
}

enum Conn {
    Pending,
    Connected,
    Failed(std::io::Error),
}

impl Nat {
    pub fn new(cfg: NatConfig, counters: Arc<NatCounters>) -> Self {
        Self {
            cfg,
            pending: Vec::new(),
            active: HashSet::new(),
            udp: HashMap::new(),
            echo: EchoSockets::default(),
            echo_warned: false,
            last_sweep: Instant::now(),
            ident: 1,
            buf: Vec::new(),
            counters,
        }
    }

    /// True when smoltcp may accept TCP for any address (outbound NAT on).
    pub fn any_ip(&self) -> bool {
        !self.cfg.restrict
    }

    /// Forgets a finished connection (its relay ended).
    pub fn forget(&mut self, key: &TcpKey) {
        self.active.remove(key);
    }

    /// The host address the guest means by `ip:port`, `None` when it is not reachable.
    fn map_dst(&self, ip: Ipv4Addr, port: u16) -> Option<SocketAddr> {
        if ip == self.cfg.dns {
            return (port == 53)
                .then_some(self.cfg.dns_upstream)
                .flatten()
                .map(SocketAddr::V4);
        }
        if ip == self.cfg.host {
            return Some(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port));
        }
        if ip.is_broadcast()
            || ip.is_multicast()
            || ip.is_unspecified()
            || ip.is_loopback()
            || self.cfg.net.contains_addr(&ip)
        {
            return None;
        }
        Some(SocketAddr::new(ip.into(), port))
    }

    /// The guest's view of a host address replies come from.
    fn unmap_src(&self, from: SocketAddr) -> Option<(Ipv4Addr, u16)> {
        let SocketAddr::V4(v4) = from else {
            return None;
        };
        if Some(v4) == self.cfg.dns_upstream {
            return Some((self.cfg.dns, 53));
        }
        if v4.ip().is_loopback() {
            return Some((self.cfg.host, v4.port()));
        }
        Some((*v4.ip(), v4.port()))
    }

    fn own(&self, ip: Ipv4Addr) -> bool {
        ip == self.cfg.host || ip == self.cfg.dns
    }

    fn drop_frame(&self) -> Verdict {
        self.counters.dropped_other.fetch_add(1, Relaxed);
        Verdict::Done
    }

    /// Looks at one frame from the guest (DHCP already taken out); `out` sends frames to it.
    pub fn guest_frame(&mut self, frame: Vec<u8>, out: &dyn Fn(Vec<u8>)) -> Verdict {
        let Ok(eth) = EthernetFrame::new_checked(&frame[..]) else {
            return Verdict::Stack(frame);
        };
        match eth.ethertype() {
            EthernetProtocol::Ipv4 => {}
            EthernetProtocol::Arp => {
                let target = ArpPacket::new_checked(eth.payload())
                    .ok()
                    .and_then(|p| ArpRepr::parse(&p).ok());
                return match target {
                    Some(ArpRepr::EthernetIpv4 {
                        target_protocol_addr,
                        ..
                    }) if self.own(target_protocol_addr) => Verdict::Stack(frame),
                    _ => Verdict::Done,
                };
            }
            // smoltcp has no IPv6 address here; with any-IP on it would answer neighbour
            // solicitations for every address (and fail the guest's duplicate address check).
            EthernetProtocol::Ipv6 => return Verdict::Done,
            _ => return Verdict::Stack(frame),
        }
        let src_mac = eth.src_addr().0;
        let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
            return Verdict::Stack(frame);
        };
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        let own = self.own(dst);
        match ip.next_header() {
            IpProtocol::Tcp => {
                let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else {
                    return self.drop_frame();
                };
                let key = (src, tcp.src_port(), dst, tcp.dst_port());
                if !self.active.is_empty() && self.active.contains(&key) {
                    return Verdict::Stack(frame);
                }
                let syn = tcp.syn() && !tcp.ack() && !tcp.rst();
                if !syn {
                    // Hostfwd traffic (to `host=`) or stray segments: smoltcp answers them (RST
                    // for a connection it does not know), unless restricted.
                    if !own && self.cfg.restrict {
                        self.counters.dropped_restricted.fetch_add(1, Relaxed);
                        return Verdict::Done;
                    }
                    return Verdict::Stack(frame);
                }
                if self.pending.iter().any(|p| p.key == key) {
                    return Verdict::Done; // a retransmitted SYN while the host connects
                }
                if self.cfg.restrict {
                    if own {
                        return Verdict::Stack(frame); // smoltcp refuses it, as without NAT
                    }
                    self.counters.dropped_restricted.fetch_add(1, Relaxed);
                    return Verdict::Done;
                }
                let Some(to) = self.map_dst(dst, tcp.dst_port()) else {
                    return if own {
                        Verdict::Stack(frame) // e.g. dns= on another port: smoltcp's RST
                    } else {
                        self.drop_frame()
                    };
                };
                if self.pending.len() >= MAX_PENDING || self.active.len() >= MAX_TCP {
                    return self.drop_frame();
                }
                match start_connect(to) {
                    Ok(sock) => {
                        tracing::debug!("user netdev NAT: {src}:{} -> {to}", tcp.src_port());
                        self.pending.push(PendingTcp {
                            key,
                            sock,
                            syn: frame,
                            started: Instant::now(),
                        });
                    }
                    Err(e) => self.fail_connect(&frame, &e, out),
                }
                Verdict::Done
            }
            IpProtocol::Udp => {
                if self.cfg.restrict {
                    self.counters.dropped_restricted.fetch_add(1, Relaxed);
                    return Verdict::Done;
                }
                if ip.more_frags() || ip.frag_offset() != 0 {
                    return self.drop_frame();
                }
                let Ok(udp) = UdpPacket::new_checked(ip.payload()) else {
                    return self.drop_frame();
                };
                let Some(to) = self.map_dst(dst, udp.dst_port()) else {
                    return self.drop_frame();
                };
                let dns = dst == self.cfg.dns;
                let flow = (src_mac, src, udp.src_port(), ip.hop_limit());
                self.udp_out(flow, to, (dns, udp.payload()), out);
                Verdict::Done
            }
            IpProtocol::Icmp => {
                let to_stack = self.icmp_out(src_mac, &ip, own, out);
                if to_stack {
                    Verdict::Stack(frame)
                } else {
                    Verdict::Done
                }
            }
            _ if own => Verdict::Stack(frame),
            _ => self.drop_frame(),
        }
    }

    /// An ICMP packet from the guest: echo requests are answered (own addresses) or sent out;
    /// other ICMP to own addresses goes to smoltcp (returns true), the rest is dropped.
    fn icmp_out(
        &mut self,
        mac: [u8; 6],
        ip: &Ipv4Packet<&[u8]>,
        own: bool,
        out: &dyn Fn(Vec<u8>),
    ) -> bool {
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        let msg = ip.payload();
        let echo_request = msg.len() >= 8 && msg[..2] == [8, 0];
        if !echo_request {
            if !own {
                self.drop_frame();
            }
            return own;
        }
        if ip.more_frags()
            || ip.frag_offset() != 0
            || !Icmpv4Packet::new_unchecked(msg).verify_checksum()
            || !unicast(src)
        {
            self.drop_frame();
            return false;
        }
        if own {
            self.counters.icmp_echo_local.fetch_add(1, Relaxed);
            let mut f = self.ipv4_frame(mac, dst, src, IpProtocol::Icmp, msg.len(), |p| {
                p.copy_from_slice(msg);
                p[0] = 0; // echo reply
                user_icmp::fill_icmp_checksum(p);
            });
            self.stamp(&mut f);
            out(f);
            return false;
        }
        if self.cfg.restrict {
            self.counters.dropped_restricted.fetch_add(1, Relaxed);
            return false;
        }
        if self.map_dst(dst, 0).is_none() {
            self.drop_frame();
            return false;
        }
        if !self.cfg.ping {
            self.counters.icmp_unavailable.fetch_add(1, Relaxed);
            return false;
        }
        match self.echo.send(mac, src, dst, ip.hop_limit(), msg) {
            Ok(()) => {
                self.counters.icmp_echo_out.fetch_add(1, Relaxed);
            }
            Err(e) => {
                let code = match e.raw_os_error() {
                    Some(libc::ENETUNREACH) => Some(0),
                    Some(libc::EHOSTUNREACH) => Some(1),
                    _ => None,
                };
                match code {
                    Some(code) => {
                        let q = msg.get(..8).unwrap_or_default();
                        let quoted = (src, dst, IpProtocol::Icmp, msg.len(), q);
                        // The gateway (the host) has no route: it says so, as a router would.
                        let head = (self.cfg.host, DEST_UNREACH, code, 0);
                        self.icmp_error(mac, head, quoted, out);
                    }
                    None => {
                        if !self.echo_warned {
                            self.echo_warned = true;
                            tracing::warn!("user netdev: ping to {dst} not sent: {e}");
                        }
                        self.drop_frame();
                    }
                }
            }
        }
        false
    }

    /// Sends the guest an ICMP error `(from, type, code, info)` about its packet `quoted`:
    /// (source, destination, protocol, length, its first bytes after the IP header).
    fn icmp_error(
        &mut self,
        mac: [u8; 6],
        (from, icmp_type, code, info): (Ipv4Addr, u8, u8, u32),
        (qsrc, qdst, qproto, qlen, qdata): (Ipv4Addr, Ipv4Addr, IpProtocol, usize, &[u8]),
        out: &dyn Fn(Vec<u8>),
    ) {
        let len = 8 + 20 + qdata.len();
        let mut f = self.ipv4_frame(mac, from, qsrc, IpProtocol::Icmp, len, |p| {
            p[0] = icmp_type;
            p[1] = code;
            // "Fragmentation needed" carries the next hop's MTU in its last 16 bits.
            if icmp_type == DEST_UNREACH && code == 4 {
                p[6..8].copy_from_slice(&(info.min(0xffff) as u16).to_be_bytes());
            }
            Ipv4Repr {
                src_addr: qsrc,
                dst_addr: qdst,
                next_header: qproto,
                payload_len: qlen,
                hop_limit: 64,
            }
            .emit(
                &mut Ipv4Packet::new_unchecked(&mut p[8..28]),
                &ChecksumCapabilities::default(),
            );
            p[28..].copy_from_slice(qdata);
            user_icmp::fill_icmp_checksum(p);
        });
        self.stamp(&mut f);
        self.counters.icmp_errors_to_guest.fetch_add(1, Relaxed);
        out(f);
    }

    /// The guest's view of who sent an ICMP error about a datagram to `dst` (host view,
    /// `guest_dst` the guest's): the destination itself as the guest named it, `host=` for the
    /// host's own addresses.
    fn unmap_offender(
        &self,
        offender: Option<Ipv4Addr>,
        dst: Ipv4Addr,
        guest_dst: Ipv4Addr,
    ) -> Ipv4Addr {
        match offender {
            None => guest_dst,
            Some(o) if o == dst => guest_dst,
            Some(o) if o.is_loopback() => self.cfg.host,
            Some(o) => o,
        }
    }

    /// Gives the frame the next IP identification and its header checksum.
    fn stamp(&mut self, f: &mut [u8]) {
        if let Some(ipb) = f.get_mut(14..) {
            let mut ip = Ipv4Packet::new_unchecked(ipb);
            ip.set_ident(self.ident);
            ip.fill_checksum();
            self.ident = self.ident.wrapping_add(1);
        }
    }

    /// Sends the guest's datagram from flow `(mac, src, sport, ttl)` to `to`.
    fn udp_out(
        &mut self,
        (mac, src, sport, ttl): ([u8; 6], Ipv4Addr, u16, u8),
        to: SocketAddr,
        (dns, payload): (bool, &[u8]),
        out: &dyn Fn(Vec<u8>),
    ) {
        let key = (src, sport);
        if !self.udp.contains_key(&key) {
            if self.udp.len() >= MAX_UDP_FLOWS {
                self.drop_frame();
                return;
            }
            let sock = match UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
                .and_then(|s| s.set_nonblocking(true).map(|()| s))
            {
                Ok(s) => {
                    // ICMP errors for the flow's datagrams (port unreachable, ...) go back to
                    // the guest; without it Linux drops them for unconnected sockets.
                    if let Err(e) = user_icmp::enable_errors(&s) {
                        tracing::debug!("user netdev NAT: IP_RECVERR: {e}");
                    }
                    s
                }
                Err(e) => {
                    tracing::warn!("user netdev NAT: UDP socket: {e}");
                    self.drop_frame();
                    return;
                }
            };
            self.udp.insert(
                key,
                UdpFlow {
                    sock,
                    guest_mac: mac,
                    last: Instant::now(),
                    dns_only: true,
                    ttl: 0,
                },
            );
        }
        let Some(flow) = self.udp.get_mut(&key) else {
            return;
        };
        flow.last = Instant::now();
        flow.guest_mac = mac;
        flow.dns_only &= dns;
        // The guest's TTL goes out with its datagram (traceroute through the netdev); the
        // netdev is not counted as a hop, as slirp is not.
        if flow.ttl != ttl && ttl > 0 {
            if let Err(e) = flow.sock.set_ttl(u32::from(ttl)) {
                tracing::debug!("user netdev NAT: IP_TTL {ttl}: {e}");
            }
            flow.ttl = ttl;
        }
        let mut res = flow.sock.send_to(payload, to);
        let mut errs = Vec::new();
        if res.is_err() {
            // A send reports the socket's pending error once (an ICMP error for an earlier
            // datagram, queued with IP_RECVERR; or a local one that no read would report, and
            // poll(2) would say POLLERR for ever): the queued errors go to the guest and the
            // datagram is sent again.
            errs = user_icmp::read_errors(flow.sock.as_raw_fd(), &mut [0u8; 2048]);
            res = flow.sock.send_to(payload, to);
        }
        match res {
            Ok(_) => {
                self.counters.udp_to_host.fetch_add(1, Relaxed);
                if dns {
                    self.counters.dns_queries.fetch_add(1, Relaxed);
                }
            }
            Err(e) => {
                tracing::debug!("user netdev NAT: UDP to {to}: {e}");
                self.counters.dropped_other.fetch_add(1, Relaxed);
            }
        }
        for err in errs {
            self.udp_error(mac, (src, sport), &err, out);
        }
    }

    /// Pending connects and UDP flows for the stack's poll(2).
    pub fn poll_fds(&self, fds: &mut Vec<libc::pollfd>) {
        for p in &self.pending {
            fds.push(libc::pollfd {
                fd: p.sock.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            });
        }
        for f in self.udp.values() {
            fds.push(libc::pollfd {
                fd: f.sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        self.echo.poll_fds(fds);
    }

    /// Host-side progress: completed, failed and timed-out connects, UDP replies, idle flows.
    /// Returns the connections ready for smoltcp.
    pub fn poll_host(&mut self, out: &dyn Fn(Vec<u8>)) -> Vec<Connected> {
        let mut ready = Vec::new();
        if !self.pending.is_empty() {
            let timeout = self.cfg.connect_timeout;
            let pending = std::mem::take(&mut self.pending);
            for p in pending {
                match connect_state(&p.sock) {
                    Conn::Connected => {
                        self.counters.tcp_connects.fetch_add(1, Relaxed);
                        self.active.insert(p.key);
                        let host = TcpStream::from(p.sock);
                        let _ = host.set_nodelay(true);
                        ready.push(Connected {
                            key: p.key,
                            host,
                            syn: p.syn,
                        });
                    }
                    Conn::Failed(e) => self.fail_connect(&p.syn, &e, out),
                    Conn::Pending if p.started.elapsed() >= timeout => {
                        self.counters.tcp_timeouts.fetch_add(1, Relaxed);
                        let e = std::io::Error::from(std::io::ErrorKind::TimedOut);
                        self.fail_connect(&p.syn, &e, out);
                    }
                    Conn::Pending => self.pending.push(p),
                }
            }
        }
        self.udp_in(out);
        self.echo_in(out);
        if self.last_sweep.elapsed() >= Duration::from_secs(1) {
            let gone = self.echo.sweep() as u64;
            self.counters.icmp_sockets_expired.fetch_add(gone, Relaxed);
            self.last_sweep = Instant::now();
            let before = self.udp.len();
            self.udp.retain(|_, f| {
                let idle = if f.dns_only { UDP_DNS_IDLE } else { UDP_IDLE };
                f.last.elapsed() < idle
            });
            let gone = (before - self.udp.len()) as u64;
            self.counters.udp_flows_expired.fetch_add(gone, Relaxed);
        }
        ready
    }

    fn udp_in(&mut self, out: &dyn Fn(Vec<u8>)) {
        if self.udp.is_empty() {
            return;
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.resize(65536, 0);
        let mut frames = Vec::new();
        let mut errors = Vec::new();
        for (&(gip, gport), f) in self.udp.iter_mut() {
            // A bounded number per flow and round, so one busy flow cannot starve the rest.
            for _ in 0..64 {
                let (n, from) = match f.sock.recv_from(&mut buf) {
                    Ok(r) => r,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    // The socket's pending error, reported once: its ICMP errors are queued.
                    Err(_) => {
                        for err in user_icmp::read_errors(f.sock.as_raw_fd(), &mut buf) {
                            errors.push((gip, gport, f.guest_mac, err));
                        }
                        continue;
                    }
                };
                f.last = Instant::now();
                frames.push((gip, gport, f.guest_mac, from, buf[..n].to_vec()));
            }
        }
        self.buf = buf;
        for (gip, gport, mac, err) in errors {
            self.udp_error(mac, (gip, gport), &err, out);
        }
        for (gip, gport, mac, from, data) in frames {
            let Some((sip, sport)) = self.unmap_src(from) else {
                self.counters.dropped_other.fetch_add(1, Relaxed);
                continue;
            };
            self.counters.udp_to_guest.fetch_add(1, Relaxed);
            for fr in self.udp_frames(mac, (sip, sport), (gip, gport), &data) {
                out(fr);
            }
        }
    }

    /// An ICMP error about the guest's datagram from `guest` to `err.dst` (host view) goes back
    /// to it, quoting the datagram's UDP header as the guest sent it.
    fn udp_error(
        &mut self,
        mac: [u8; 6],
        guest: (Ipv4Addr, u16),
        err: &HostIcmpError,
        out: &dyn Fn(Vec<u8>),
    ) {
        if !matches!(err.icmp_type, DEST_UNREACH | TIME_EXCEEDED) {
            return;
        }
        let Some((dip, dport)) = self.unmap_src(SocketAddr::V4(err.dst)) else {
            return;
        };
        let from = self.unmap_offender(err.offender, *err.dst.ip(), dip);
        let len = 8 + err.quoted.len();
        let mut udp = [0u8; 8];
        udp[..2].copy_from_slice(&guest.1.to_be_bytes());
        udp[2..4].copy_from_slice(&dport.to_be_bytes());
        udp[4..6].copy_from_slice(&(len.min(0xffff) as u16).to_be_bytes());
        let head = (from, err.icmp_type, err.code, err.info);
        self.icmp_error(mac, head, (guest.0, dip, IpProtocol::Udp, len, &udp), out);
    }

    /// Replies and errors from the echo sockets, to the guest.
    fn echo_in(&mut self, out: &dyn Fn(Vec<u8>)) {
        if self.echo.is_empty() {
            return;
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.resize(65536, 0);
        let got = self.echo.poll(&mut buf);
        self.buf = buf;
        for g in got {
            match g {
                FromHost::Reply {
                    mac,
                    guest,
                    from,
                    icmp,
                } => {
                    if 20 + icmp.len() > MTU {
                        self.drop_frame();
                        continue;
                    }
                    self.counters.icmp_echo_in.fetch_add(1, Relaxed);
                    let mut f =
                        self.ipv4_frame(mac, from, guest, IpProtocol::Icmp, icmp.len(), |p| {
                            p.copy_from_slice(&icmp)
                        });
                    self.stamp(&mut f);
                    out(f);
                }
                FromHost::Error {
                    mac,
                    guest,
                    err,
                    quoted,
                } => {
                    if !matches!(err.icmp_type, DEST_UNREACH | TIME_EXCEEDED) {
                        continue;
                    }
                    let dst = *err.dst.ip();
                    let from = self.unmap_offender(err.offender, dst, dst);
                    let head = (from, err.icmp_type, err.code, err.info);
                    let len = err.quoted.len().max(8);
                    self.icmp_error(mac, head, (guest, dst, IpProtocol::Icmp, len, &quoted), out);
                }
            }
        }
    }

    /// A UDP datagram to the guest as Ethernet frames: IPv4 fragments when it exceeds the MTU,
    /// cut by the same code that cuts a guest's UFO frames ([`crate::offload::to_plain`]).
    fn udp_frames(
        &mut self,
        mac: [u8; 6],
        src: (Ipv4Addr, u16),
        dst: (Ipv4Addr, u16),
        data: &[u8],
    ) -> Vec<Vec<u8>> {
        let mut f = self.ipv4_frame(mac, src.0, dst.0, IpProtocol::Udp, 8 + data.len(), |p| {
            UdpRepr {
                src_port: src.1,
                dst_port: dst.1,
            }
            .emit(
                &mut UdpPacket::new_unchecked(p),
                &IpAddress::Ipv4(src.0),
                &IpAddress::Ipv4(dst.0),
                data.len(),
                |payload| payload.copy_from_slice(data),
                &ChecksumCapabilities::default(),
            )
        });
        let mut ip = Ipv4Packet::new_unchecked(&mut f[14..]);
        ip.set_ident(self.ident);
        ip.fill_checksum();
        self.ident = self.ident.wrapping_add(1);
        let ufo = VnetHdr {
            flags: 0,
            gso_type: GSO_UDP,
            hdr_len: 0,
            gso_size: ((MTU - 20) & !7) as u16,
            csum_start: 0,
            csum_offset: 0,
        };
        match to_plain(&ufo.to_bytes(), f) {
            Ok(frames) => frames,
            Err(e) => {
                tracing::debug!(
                    "user netdev: UDP reply of {} bytes dropped: {e}",
                    data.len()
                );
                self.counters.dropped_other.fetch_add(1, Relaxed);
                Vec::new()
            }
        }
    }

    fn ipv4_frame(
        &self,
        mac: [u8; 6],
        src: Ipv4Addr,
        dst: Ipv4Addr,
        proto: IpProtocol,
        len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> Vec<u8> {
        let mut buf = vec![0u8; 14 + 20 + len];
        let mut eth = EthernetFrame::new_unchecked(&mut buf[..]);
        EthernetRepr {
            src_addr: EthernetAddress(self.cfg.host_mac),
            dst_addr: EthernetAddress(mac),
            ethertype: EthernetProtocol::Ipv4,
        }
        .emit(&mut eth);
        let mut ip = Ipv4Packet::new_unchecked(eth.payload_mut());
        Ipv4Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: proto,
            payload_len: len,
            hop_limit: 64,
        }
        .emit(&mut ip, &ChecksumCapabilities::default());
        fill(ip.payload_mut());
        buf
    }

    /// Tells the guest that its connection (held SYN `syn`) failed: RST when refused, ICMP
    /// host unreachable otherwise.
    fn fail_connect(&self, syn: &[u8], e: &std::io::Error, out: &dyn Fn(Vec<u8>)) {
        tracing::debug!("user netdev NAT: connect failed: {e}");
        let Ok(eth) = EthernetFrame::new_checked(syn) else {
            return;
        };
        let mac = eth.src_addr().0;
        let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
            return;
        };
        let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else {
            return;
        };
        let (gip, sip) = (ip.src_addr(), ip.dst_addr());
        if e.kind() == std::io::ErrorKind::ConnectionRefused {
            self.counters.tcp_refused.fetch_add(1, Relaxed);
            let f = self.ipv4_frame(mac, sip, gip, IpProtocol::Tcp, 20, |p| {
                let mut t = TcpPacket::new_unchecked(p);
                t.set_src_port(tcp.dst_port());
                t.set_dst_port(tcp.src_port());
                t.set_seq_number(TcpSeqNumber(0));
                t.set_ack_number(tcp.seq_number() + 1);
                t.set_header_len(20);
                t.clear_flags();
                t.set_rst(true);
                t.set_ack(true);
                t.set_window_len(0);
                t.set_urgent_at(0);
                t.fill_checksum(&IpAddress::Ipv4(sip), &IpAddress::Ipv4(gip));
            });
            out(f);
            return;
        }
        if e.kind() != std::io::ErrorKind::TimedOut {
            self.counters.tcp_unreachable.fetch_add(1, Relaxed);
        }
        let Ok(header) = Ipv4Repr::parse(&ip, &ChecksumCapabilities::ignored()) else {
            return;
        };
        let Some(data) = ip.payload().get(..8) else {
            return;
        };
        let icmp = Icmpv4Repr::DstUnreachable {
            reason: Icmpv4DstUnreachable::HostUnreachable,
            header,
            data,
        };
        let f = self.ipv4_frame(mac, sip, gip, IpProtocol::Icmp, icmp.buffer_len(), |p| {
            icmp.emit(
                &mut Icmpv4Packet::new_unchecked(p),
                &ChecksumCapabilities::default(),
            )
        });
        out(f);
    }
}

/// Starts a non-blocking TCP connect to `to`.
fn start_connect(to: SocketAddr) -> std::io::Result<OwnedFd> {
    let SocketAddr::V4(v4) = to else {
        return Err(std::io::ErrorKind::Unsupported.into());
    };
    // SAFETY: plain socket(2); the result is checked before use.
    let raw = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*v4.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `sa` is a valid sockaddr_in of the given length, `fd` our socket.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&raw const sa).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if r == 0 {
        return Ok(fd);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EINPROGRESS) {
        Ok(fd)
    } else {
        Err(e)
    }
}

/// Where a non-blocking connect stands: `SO_ERROR` set = failed; a peer name = connected.
fn connect_state(fd: &OwnedFd) -> Conn {
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into a c_int of the stated length on our socket.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&raw mut err).cast(),
            &raw mut len,
        )
    };
    if r != 0 {
        return Conn::Failed(std::io::Error::last_os_error());
    }
    if err != 0 {
        return Conn::Failed(std::io::Error::from_raw_os_error(err));
    }
    // SAFETY: a zeroed sockaddr_storage is a valid out-buffer for getpeername.
    let mut sa: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut sl = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: getpeername into a sockaddr_storage of the stated length on our socket.
    let r = unsafe { libc::getpeername(fd.as_raw_fd(), (&raw mut sa).cast(), &raw mut sl) };
    if r == 0 {
        Conn::Connected
    } else {
        Conn::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_first_ipv4_nameserver() {
        let t = "# c\nsearch x\nnameserver fe80::1\nnameserver 127.0.0.53\nnameserver 9.9.9.9\n";
        assert_eq!(
            resolv_conf_nameserver(t),
            Some("127.0.0.53:53".parse().unwrap())
        );
        assert_eq!(resolv_conf_nameserver("search x\n"), None);
    }

    fn nat() -> Nat {
        Nat::new(
            NatConfig {
                host: Ipv4Addr::new(10, 0, 2, 2),
                dns: Ipv4Addr::new(10, 0, 2, 3),
                net: "10.0.2.0/24".parse().unwrap(),
                host_mac: [0x52, 0x55, 10, 0, 2, 2],
                dns_upstream: Some("127.0.0.1:9".parse().unwrap()),
                restrict: false,
                connect_timeout: Duration::from_secs(2),
                ping: false,
            },
            Arc::default(),
        )
    }

    /// A frame from the guest 10.0.2.15:40000 to `dst`: a TCP SYN or a UDP datagram.
    fn guest_frame(n: &Nat, dst: (Ipv4Addr, u16), syn: bool) -> Vec<u8> {
        let g = Ipv4Addr::new(10, 0, 2, 15);
        let (proto, len) = if syn {
            (IpProtocol::Tcp, 20)
        } else {
            (IpProtocol::Udp, 12)
        };
        let mut f = n.ipv4_frame([2, 0, 0, 0, 0, 15], g, dst.0, proto, len, |p| {
            if syn {
                let mut t = TcpPacket::new_unchecked(p);
                t.set_src_port(40000);
                t.set_dst_port(dst.1);
                t.set_seq_number(TcpSeqNumber(1000));
                t.set_header_len(20);
                t.clear_flags();
                t.set_syn(true);
                t.set_window_len(1000);
                t.fill_checksum(&IpAddress::Ipv4(g), &IpAddress::Ipv4(dst.0));
            } else {
                let mut u = UdpPacket::new_unchecked(p);
                u.set_src_port(40000);
                u.set_dst_port(dst.1);
                u.set_len(12);
                u.payload_mut().copy_from_slice(b"ping");
                u.fill_checksum(&IpAddress::Ipv4(g), &IpAddress::Ipv4(dst.0));
            }
        });
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 15]);
        f
    }

    /// A loopback TCP (`tcp`) or UDP port nothing listens on (bound, then let go).
    fn closed_port(tcp: bool) -> u16 {
        let a = if tcp {
            std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr())
        } else {
            std::net::UdpSocket::bind("127.0.0.1:0").and_then(|u| u.local_addr())
        };
        a.unwrap().port()
    }

    #[test]
    fn malformed_and_truncated_frames_are_dropped_without_panic() {
        let closed = closed_port(true);
        let mut n = nat();
        let out = |_f: Vec<u8>| {};
        let host = Ipv4Addr::new(10, 0, 2, 2);
        for f in [
            guest_frame(&n, (host, closed), true),
            guest_frame(&n, (host, 9), false),
            guest_frame(&n, (Ipv4Addr::new(10, 0, 2, 3), 53), false),
            echo_frame(&n, host, 1, 1, b"abc"),
            echo_frame(&n, Ipv4Addr::new(192, 0, 2, 1), 1, 1, b"abc"),
        ] {
            for len in 0..f.len() {
                let _ = n.guest_frame(f[..len].to_vec(), &out);
            }
        }
        // Random bytes behind an IPv4 Ethernet header and an IPv4 version/length byte.
        let mut x: u64 = 0x1234_5678;
        for _ in 0..5000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let len = (x >> 33) as usize % 120;
            let mut f: Vec<u8> = (0..len)
                .map(|i| (x.rotate_left(i as u32 % 64) >> 7) as u8)
                .collect();
            if f.len() > 15 {
                f[12..14].copy_from_slice(&[0x08, 0x00]);
                f[14] = 0x45;
            }
            let _ = n.guest_frame(f, &out);
        }
        let _ = n.poll_host(&out);
    }

    #[test]
    fn a_refused_connect_becomes_a_valid_rst_to_the_guest() {
        let closed = closed_port(true);
        let mut n = nat();
        let got = std::cell::RefCell::new(Vec::new());
        let out = |f: Vec<u8>| got.borrow_mut().push(f);
        let host = Ipv4Addr::new(10, 0, 2, 2);
        let syn = guest_frame(&n, (host, closed), true);
        assert!(matches!(n.guest_frame(syn.clone(), &out), Verdict::Done));
        // A retransmitted SYN while the connect is pending is dropped.
        assert!(matches!(n.guest_frame(syn, &out), Verdict::Done));
        let deadline = Instant::now() + Duration::from_secs(2);
        while got.borrow().is_empty() && Instant::now() < deadline {
            assert!(n.poll_host(&out).is_empty());
            std::thread::sleep(Duration::from_millis(5));
        }
        let frames = got.borrow();
        assert_eq!(frames.len(), 1);
        let eth = EthernetFrame::new_checked(&frames[0][..]).unwrap();
        assert_eq!(eth.dst_addr().0, [2, 0, 0, 0, 0, 15]);
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!(ip.src_addr(), host);
        let t = TcpPacket::new_checked(ip.payload()).unwrap();
        let (src, dst) = (IpAddress::Ipv4(host), IpAddress::Ipv4(ip.dst_addr()));
        assert!(t.verify_checksum(&src, &dst));
        assert!(t.rst() && t.ack());
        assert_eq!((t.src_port(), t.dst_port()), (closed, 40000));
        assert_eq!(t.ack_number(), TcpSeqNumber(1001));
        assert_eq!(n.counters.tcp_refused.load(Relaxed), 1);
    }

    /// An ICMP echo request from the guest 10.0.2.15 to `dst`.
    fn echo_frame(n: &Nat, dst: Ipv4Addr, id: u16, seq: u16, data: &[u8]) -> Vec<u8> {
        let g = Ipv4Addr::new(10, 0, 2, 15);
        let mut f = n.ipv4_frame(
            [2, 0, 0, 0, 0, 15],
            g,
            dst,
            IpProtocol::Icmp,
            8 + data.len(),
            |p| {
                p[0] = 8;
                p[4..6].copy_from_slice(&id.to_be_bytes());
                p[6..8].copy_from_slice(&seq.to_be_bytes());
                p[8..].copy_from_slice(data);
                user_icmp::fill_icmp_checksum(p);
            },
        );
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 15]);
        f
    }

    /// Checks that `f` is a valid IPv4 ICMP frame to the guest from `src`; returns its ICMP
    /// message.
    fn icmp_to_guest(f: &[u8], src: Ipv4Addr) -> Vec<u8> {
        let eth = EthernetFrame::new_checked(f).unwrap();
        assert_eq!(eth.dst_addr().0, [2, 0, 0, 0, 0, 15]);
        assert_eq!(eth.src_addr().0, [0x52, 0x55, 10, 0, 2, 2]);
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        assert!(ip.verify_checksum(), "IP header checksum");
        assert_eq!(ip.next_header(), IpProtocol::Icmp);
        assert_eq!(
            (ip.src_addr(), ip.dst_addr()),
            (src, Ipv4Addr::new(10, 0, 2, 15))
        );
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum(), "ICMP checksum");
        ip.payload().to_vec()
    }

    #[test]
    fn pings_of_the_gateway_and_dns_are_answered_here_also_when_restricted() {
        for restrict in [false, true] {
            let mut n = nat();
            n.cfg.restrict = restrict;
            let got = std::cell::RefCell::new(Vec::new());
            let out = |f: Vec<u8>| got.borrow_mut().push(f);
            let data: Vec<u8> = (0..56u8).collect();
            for (i, dst) in [Ipv4Addr::new(10, 0, 2, 2), Ipv4Addr::new(10, 0, 2, 3)]
                .into_iter()
                .enumerate()
            {
                let f = echo_frame(&n, dst, 0x4a4b, 7 + i as u16, &data);
                assert!(matches!(n.guest_frame(f, &out), Verdict::Done));
                let frames = std::mem::take(&mut *got.borrow_mut());
                assert_eq!(frames.len(), 1, "restrict={restrict} {dst}");
                let m = icmp_to_guest(&frames[0], dst);
                assert_eq!(&m[..2], &[0, 0], "echo reply");
                assert_eq!(&m[4..8], &[0x4a, 0x4b, 0, 7 + i as u8]);
                assert_eq!(&m[8..], &data[..]);
            }
            assert_eq!(n.counters.icmp_echo_local.load(Relaxed), 2);
        }
    }

    #[test]
    fn pings_that_cannot_leave_are_dropped_and_counted() {
        let out = |_f: Vec<u8>| panic!("nothing goes back to the guest");
        let outside = Ipv4Addr::new(192, 0, 2, 1);
        // restrict=on: nothing leaves.
        let mut n = nat();
        n.cfg.restrict = true;
        n.cfg.ping = true;
        assert!(matches!(
            n.guest_frame(echo_frame(&n, outside, 1, 1, b"x"), &out),
            Verdict::Done
        ));
        assert_eq!(n.counters.dropped_restricted.load(Relaxed), 1);
        assert_eq!(n.counters.icmp_echo_out.load(Relaxed), 0);
        // No ping sockets in this namespace: counted as such.
        let mut n = nat();
        assert!(matches!(
            n.guest_frame(echo_frame(&n, outside, 1, 1, b"x"), &out),
            Verdict::Done
        ));
        assert_eq!(n.counters.icmp_unavailable.load(Relaxed), 1);
        // A bad checksum, a fragment, the guest's own network, broadcast, loopback: dropped.
        let mut bad = echo_frame(&n, Ipv4Addr::new(10, 0, 2, 2), 1, 1, b"x");
        bad[14 + 20 + 8] ^= 1;
        let mut frag = echo_frame(&n, Ipv4Addr::new(10, 0, 2, 2), 1, 1, b"x");
        let mut ip = Ipv4Packet::new_unchecked(&mut frag[14..]);
        ip.set_more_frags(true);
        ip.fill_checksum();
        let before = n.counters.dropped_other.load(Relaxed);
        for f in [
            bad,
            frag,
            echo_frame(&n, Ipv4Addr::new(10, 0, 2, 9), 1, 1, b"x"),
            echo_frame(&n, Ipv4Addr::new(10, 0, 2, 255), 1, 1, b"x"),
            echo_frame(&n, Ipv4Addr::BROADCAST, 1, 1, b"x"),
            echo_frame(&n, Ipv4Addr::LOCALHOST, 1, 1, b"x"),
        ] {
            assert!(matches!(n.guest_frame(f, &out), Verdict::Done));
        }
        assert_eq!(n.counters.dropped_other.load(Relaxed), before + 6);
        assert_eq!(n.counters.icmp_echo_local.load(Relaxed), 0);
    }

    #[test]
    fn a_udp_datagram_to_a_closed_host_port_gets_port_unreachable() {
        let closed = closed_port(false);
        let mut n = nat();
        let got = std::cell::RefCell::new(Vec::new());
        let out = |f: Vec<u8>| got.borrow_mut().push(f);
        let host = Ipv4Addr::new(10, 0, 2, 2);
        let f = guest_frame(&n, (host, closed), false);
        assert!(matches!(n.guest_frame(f, &out), Verdict::Done));
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.borrow().is_empty() && Instant::now() < deadline {
            assert!(n.poll_host(&out).is_empty());
            std::thread::sleep(Duration::from_millis(5));
        }
        let frames = got.borrow();
        assert_eq!(frames.len(), 1);
        let m = icmp_to_guest(&frames[0], host);
        assert_eq!(&m[..2], &[3, 3], "port unreachable");
        // The quoted datagram is the guest's, as it sent it.
        let q = Ipv4Packet::new_unchecked(&m[8..28]);
        assert!(q.verify_checksum());
        assert_eq!(q.next_header(), IpProtocol::Udp);
        assert_eq!(
            (q.src_addr(), q.dst_addr()),
            (Ipv4Addr::new(10, 0, 2, 15), host)
        );
        assert_eq!(&m[28..32], &[0x9c, 0x40, (closed >> 8) as u8, closed as u8]);
        assert_eq!(n.counters.icmp_errors_to_guest.load(Relaxed), 1);
    }

    #[test]
    fn a_pending_port_unreachable_does_not_cost_the_flows_next_datagram() {
        let closed = closed_port(false);
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let open = server.local_addr().unwrap().port();
        let mut n = nat();
        let got = std::cell::RefCell::new(Vec::new());
        let out = |f: Vec<u8>| got.borrow_mut().push(f);
        let host = Ipv4Addr::new(10, 0, 2, 2);
        // The first datagram's port unreachable is pending on the flow's socket (nothing read
        // it) when the second datagram of the same flow is sent.
        let f = guest_frame(&n, (host, closed), false);
        assert!(matches!(n.guest_frame(f, &out), Verdict::Done));
        std::thread::sleep(Duration::from_millis(100));
        let f = guest_frame(&n, (host, open), false);
        assert!(matches!(n.guest_frame(f, &out), Verdict::Done));
        let mut b = [0u8; 16];
        let (len, from) = server.recv_from(&mut b).unwrap();
        assert_eq!(&b[..len], b"ping");
        assert!(from.ip().is_loopback());
        let _ = n.poll_host(&out);
        let frames = got.borrow();
        assert_eq!(frames.len(), 1, "the port unreachable, once");
        let m = icmp_to_guest(&frames[0], host);
        assert_eq!(&m[..2], &[3, 3]);
        assert_eq!(&m[30..32], &closed.to_be_bytes());
        assert_eq!(n.counters.udp_to_host.load(Relaxed), 2);
    }

    #[test]
    fn outside_icmp_ipv6_and_foreign_arp_never_reach_smoltcp() {
        let mut n = nat();
        let out = |_f: Vec<u8>| {};
        let mut icmp = guest_frame(&n, (Ipv4Addr::new(192, 0, 2, 1), 9), false);
        Ipv4Packet::new_unchecked(&mut icmp[14..]).set_next_header(IpProtocol::Icmp);
        assert!(matches!(n.guest_frame(icmp, &out), Verdict::Done));
        let mut v6 = vec![0u8; 60];
        v6[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert!(matches!(n.guest_frame(v6, &out), Verdict::Done));
        // ARP who-has 10.0.2.9 (not ours) and who-has 10.0.2.3 (ours).
        let arp = |target: [u8; 4]| {
            let mut f = vec![0xff; 6];
            f.extend_from_slice(&[2, 0, 0, 0, 0, 15, 0x08, 0x06]);
            f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 15, 10, 0, 2, 15]);
            f.extend_from_slice(&[0; 6]);
            f.extend_from_slice(&target);
            f
        };
        assert!(matches!(
            n.guest_frame(arp([10, 0, 2, 9]), &out),
            Verdict::Done
        ));
        assert!(matches!(
            n.guest_frame(arp([10, 0, 2, 3]), &out),
            Verdict::Stack(_)
        ));
        // Hostfwd traffic (not a SYN) to the host goes to smoltcp.
        let mut ack = guest_frame(&n, (Ipv4Addr::new(10, 0, 2, 2), 49153), true);
        let mut t = TcpPacket::new_unchecked(&mut ack[34..]);
        t.set_syn(false);
        t.set_ack(true);
        assert!(matches!(n.guest_frame(ack, &out), Verdict::Stack(_)));
    }
}
