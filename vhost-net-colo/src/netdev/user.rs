//! `-netdev user`: a userspace network on smoltcp, so a guest is reachable without root, tap
//! or bridge.
//!
//! The netdev is a small host on the guest's link: it answers ARP and ping at `host=`
//! (default 10.0.2.2, MAC 52:55:0a:00:02:02) in `net=` (default 10.0.2.0/24), and forwards host
//! TCP ports to the guest: `hostfwd=tcp:127.0.0.1:8080-:80` accepts on 127.0.0.1:8080 and, per
//! connection, opens a TCP connection from `host=` to `guest=` (default 10.0.2.15) port 80 and
//! relays bytes both ways (half-closes included). The guest is configured statically or by DHCP:
//! a DHCP server ([`super::dhcp`]) offers `guest=` (alias `dhcpstart=`), the netmask of `net=`,
//! `host=` as router and `dns=` (default the network's .3, 10.0.2.3) as QEMU does. Like slirp it
//! keeps a pool: each client MAC gets its own address, the first `guest=`, the next ones counting
//! up from there (skipping `dns=`), at most 16 clients; a client keeps its address while the
//! netdev runs. `hostfwd` rules without a guest address go to `guest=`. ARP and ping are also
//! answered at `dns=`.
//!
//! Connections and datagrams the guest sends out are made from the host with ordinary sockets
//! (outbound NAT, `host=` standing for the host's 127.0.0.1), and DNS queries to `dns=` go to
//! the host's resolver (or `x-dns-upstream=IP:PORT`); pings of outside addresses go out through
//! ICMP datagram sockets (allowed by `net.ipv4.ping_group_range`; a warning at start when not);
//! `restrict=on` turns all of these off. See [`super::user_nat`] and [`super::user_icmp`].

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr, Ipv4Cidr};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::dhcp::{Dhcp, DhcpServer};
use super::user_nat::{Nat, NatConfig, NatCounters, TcpKey, Verdict};
use super::{Deliver, NetCounters, Netdev, NetdevError};
use crate::filter::ObjectSpec;

/// The MAC of the user network's host (QEMU's slirp uses the same).
pub const HOST_MAC: [u8; 6] = [0x52, 0x55, 0x0a, 0x00, 0x02, 0x02];
const BUF: usize = 256 * 1024;

/// One `hostfwd=tcp:HOSTADDR:HOSTPORT-GUESTADDR:GUESTPORT` rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostFwd {
    pub host: SocketAddr,
    pub guest: Option<Ipv4Addr>,
    pub guest_port: u16,
}

impl HostFwd {
    pub fn parse(s: &str) -> Result<Self, String> {
        let rest = s
            .strip_prefix("tcp:")
            .ok_or_else(|| format!("hostfwd={s}: only tcp: rules are supported"))?;
        let (h, g) = rest
            .split_once('-')
            .ok_or_else(|| format!("hostfwd={s}: expected HOSTADDR:PORT-GUESTADDR:PORT"))?;
        let (ha, hp) = h
            .rsplit_once(':')
            .ok_or_else(|| format!("hostfwd={s}: host part needs ADDR:PORT"))?;
        let ha: Ipv4Addr = if ha.is_empty() {
            Ipv4Addr::UNSPECIFIED
        } else {
            ha.parse()
                .map_err(|_| format!("hostfwd={s}: bad host address {ha}"))?
        };
        let hp: u16 = hp
            .parse()
            .map_err(|_| format!("hostfwd={s}: bad host port {hp}"))?;
        let (ga, gp) = g
            .rsplit_once(':')
            .ok_or_else(|| format!("hostfwd={s}: guest part needs [ADDR]:PORT"))?;
        let guest = if ga.is_empty() {
            None
        } else {
            Some(
                ga.parse()
                    .map_err(|_| format!("hostfwd={s}: bad guest address {ga}"))?,
            )
        };
        let guest_port = gp
            .parse()
            .map_err(|_| format!("hostfwd={s}: bad guest port {gp}"))?;
        Ok(Self {
            host: SocketAddr::new(ha.into(), hp),
            guest,
            guest_port,
        })
    }
}

pub struct UserNetdev {
    id: String,
    tx: Mutex<Sender<Vec<u8>>>,
    /// Wakes the stack thread: a guest frame is queued (or the netdev stops).
    wake: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    counters: Arc<NetCounters>,
    nat_counters: Arc<NatCounters>,
    forwards: Vec<(HostFwd, SocketAddr)>,
}

impl UserNetdev {
    pub fn open(mut spec: ObjectSpec, deliver: Deliver) -> Result<Arc<Self>, NetdevError> {
        let id = spec.id.clone();
        let cfg = |msg: String| NetdevError::Config {
            id: id.clone(),
            msg,
        };
        let net: Ipv4Cidr = spec
            .take("net")
            .unwrap_or_else(|| "10.0.2.0/24".into())
            .parse()
            .map_err(|_| cfg("net= must be ADDR/PREFIX".into()))?;
        let host: Ipv4Addr = spec
            .take("host")
            .unwrap_or_else(|| "10.0.2.2".into())
            .parse()
            .map_err(|_| cfg("host= must be an IPv4 address".into()))?;
        let guest: Ipv4Addr = spec
            .take("guest")
            .or_else(|| spec.take("dhcpstart"))
            .unwrap_or_else(|| "10.0.2.15".into())
            .parse()
            .map_err(|_| cfg("guest= must be an IPv4 address".into()))?;
        // QEMU's default DNS address is the network's .3.
        let dns: Ipv4Addr = match spec.take("dns") {
            Some(d) => d
                .parse()
                .map_err(|_| cfg("dns= must be an IPv4 address".into()))?,
            None => {
                let mask = u32::from(net.netmask());
                Ipv4Addr::from((u32::from(net.address()) & mask) | 3)
            }
        };
        let restrict = match spec.take("restrict").as_deref() {
            None | Some("off" | "no" | "false") => false,
            Some("on" | "yes" | "true") => true,
            Some(v) => return Err(cfg(format!("restrict={v}: expected on or off"))),
        };
        let dns_upstream = match spec.take("x-dns-upstream") {
            Some(v) => Some(
                v.parse::<std::net::SocketAddrV4>()
                    .map_err(|_| cfg(format!("x-dns-upstream={v}: expected IPV4:PORT")))?,
            ),
            None => std::fs::read_to_string("/etc/resolv.conf")
                .ok()
                .and_then(|t| super::user_nat::resolv_conf_nameserver(&t)),
        };
        if dns_upstream.is_none() && !restrict {
            tracing::warn!(
                "netdev {id}: no IPv4 nameserver in /etc/resolv.conf: DNS at {dns} will not answer"
            );
        }
        let connect_timeout = match spec.take("x-connect-timeout") {
            Some(v) => match v.parse::<u64>() {
                Ok(n) if (1..=3600).contains(&n) => Duration::from_secs(n),
                _ => {
                    return Err(cfg(format!(
                        "x-connect-timeout={v}: expected 1 to 3600 seconds"
                    )));
                }
            },
            None => super::user_nat::DEFAULT_CONNECT_TIMEOUT,
        };
        // ObjectSpec keeps one value per key: several rules are given as hostfwd=, hostfwd1=, ...
        let mut rules = Vec::new();
        let keys: Vec<String> = spec
            .props
            .keys()
            .filter(|k| k.starts_with("hostfwd"))
            .cloned()
            .collect();
        for k in keys {
            if let Some(v) = spec.take(&k) {
                for r in v.split(';') {
                    rules.push(HostFwd::parse(r).map_err(cfg)?);
                }
            }
        }
        spec.finish()?;
        // Pings of outside addresses need ping sockets; say once, now, when they cannot work.
        let ping_off = if restrict {
            None
        } else {
            super::user_icmp::ping_unavailable()
        };
        if let Some(why) = &ping_off {
            tracing::warn!("netdev {id}: {why}");
        }
        let mut listeners = Vec::new();
        let mut forwards = Vec::new();
        for r in rules {
            let l = TcpListener::bind(r.host).map_err(|e| NetdevError::Io {
                id: id.clone(),
                what: format!("hostfwd listen on {}", r.host),
                source: e,
            })?;
            l.set_nonblocking(true).map_err(|e| NetdevError::Io {
                id: id.clone(),
                what: "hostfwd nonblocking".into(),
                source: e,
            })?;
            let bound = l.local_addr().unwrap_or(r.host);
            forwards.push((r.clone(), bound));
            listeners.push((l, r));
        }
        let (tx, rx) = channel();
        let wake = EventFd::new(EFD_NONBLOCK).map_err(|e| NetdevError::Io {
            id: id.clone(),
            what: "wake eventfd".into(),
            source: e,
        })?;
        let me = Arc::new(UserNetdev {
            id: id.clone(),
            tx: Mutex::new(tx),
            wake: Arc::new(wake),
            stop: Arc::new(AtomicBool::new(false)),
            counters: Arc::default(),
            nat_counters: Arc::default(),
            forwards,
        });
        let nat = Nat::new(
            NatConfig {
                host,
                dns,
                net,
                host_mac: HOST_MAC,
                dns_upstream,
                restrict,
                connect_timeout,
                ping: ping_off.is_none(),
            },
            me.nat_counters.clone(),
        );
        let dhcp = DhcpServer {
            host_mac: HOST_MAC,
            host,
            guest,
            netmask: net.netmask(),
            dns,
        };
        let stack = Stack {
            dhcp,
            leases: Vec::new(),
            dns,
            nat,
            net: Ipv4Cidr::new(host, net.prefix_len()),
            guest,
            listeners,
            rx,
            wake: me.wake.clone(),
            deliver,
            stop: me.stop.clone(),
            counters: me.counters.clone(),
        };
        std::thread::Builder::new()
            .name(format!("user-{id}"))
            .spawn(move || stack.run())
            .map_err(|e| NetdevError::Io {
                id,
                what: "spawn stack".into(),
                source: e,
            })?;
        Ok(me)
    }

    /// Host addresses actually bound by the hostfwd rules (resolves port 0).
    pub fn forwards(&self) -> &[(HostFwd, SocketAddr)] {
        &self.forwards
    }
}

impl Netdev for UserNetdev {
    fn id(&self) -> &str {
        &self.id
    }

    fn kind(&self) -> &'static str {
        "user"
    }

    fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        let tx = self
            .tx
            .lock()
            .map_err(|_| std::io::Error::other("user netdev lock poisoned"))?;
        if tx.send(frame.to_vec()).is_ok() {
            self.counters.tx_frames.fetch_add(1, Ordering::Relaxed);
            // The stack sleeps in poll(2) on this eventfd and the host sockets.
            let _ = self.wake.write(1);
        } else {
            self.counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn describe(&self) -> serde_json::Value {
        let fwd: Vec<String> = self
            .forwards
            .iter()
            .map(|(r, b)| {
                format!(
                    "tcp:{b}-{}:{}",
                    r.guest.map(|g| g.to_string()).unwrap_or_default(),
                    r.guest_port
                )
            })
            .collect();
        serde_json::json!({
            "hostfwd": fwd,
            "counters": self.counters.json(),
            "nat": self.nat_counters.json(),
        })
    }
}

impl Drop for UserNetdev {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.wake.write(1);
    }
}

/// The smoltcp device: frames from the guest queued in, frames to the guest handed out.
struct Wire {
    rx: VecDeque<Vec<u8>>,
    deliver: Deliver,
    counters: Arc<NetCounters>,
}

struct RxTok(Vec<u8>);
struct TxTok<'a>(&'a Deliver, &'a NetCounters);

impl smoltcp::phy::RxToken for RxTok {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl smoltcp::phy::TxToken for TxTok<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.1.rx_frames.fetch_add(1, Ordering::Relaxed);
        (self.0)(buf);
        r
    }
}

impl Device for Wire {
    type RxToken<'a> = RxTok;
    type TxToken<'a> = TxTok<'a>;

    fn receive(&mut self, _t: Instant) -> Option<(RxTok, TxTok<'_>)> {
        let f = self.rx.pop_front()?;
        Some((RxTok(f), TxTok(&self.deliver, &self.counters)))
    }

    fn transmit(&mut self, _t: Instant) -> Option<TxTok<'_>> {
        Some(TxTok(&self.deliver, &self.counters))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = 1514;
        c
    }
}

struct Fwd {
    host: TcpStream,
    handle: SocketHandle,
    to_guest: Vec<u8>,
    to_host: Vec<u8>,
    host_eof: bool,
    fin_sent: bool,
    host_write_shut: bool,
    /// An outbound (NAT) connection: its key and when its smoltcp socket took the SYN.
    nat: Option<(TcpKey, std::time::Instant)>,
}

/// DHCP clients with an address at once (slirp's NB_BOOTP_CLIENTS).
const DHCP_POOL: usize = 16;

/// A smoltcp TCP socket for one relayed connection.
fn relay_socket() -> tcp::Socket<'static> {
    let mut sock = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; BUF]),
        tcp::SocketBuffer::new(vec![0; BUF]),
    );
    sock.set_nagle_enabled(false);
    sock
}

struct Stack {
    dhcp: DhcpServer,
    /// DHCP clients by MAC and their addresses, in the order they came.
    leases: Vec<([u8; 6], Ipv4Addr)>,
    dns: Ipv4Addr,
    nat: Nat,
    net: Ipv4Cidr,
    guest: Ipv4Addr,
    listeners: Vec<(TcpListener, HostFwd)>,
    rx: Receiver<Vec<u8>>,
    wake: Arc<EventFd>,
    deliver: Deliver,
    stop: Arc<AtomicBool>,
    counters: Arc<NetCounters>,
}

impl Stack {
    /// Blocks in poll(2) until the wake eventfd, a hostfwd listener or a relayed host socket is
    /// ready (readable when its connection can take more for the guest, writable when bytes for
    /// the host wait), or `wait` passed. Interrupted or failed polls just return: the loop
    /// re-checks everything anyway.
    fn wait_ready(&self, fwds: &[Fwd], wait: Duration) {
        let mut fds = Vec::with_capacity(1 + self.listeners.len() + fwds.len());
        self.nat.poll_fds(&mut fds);
        let entry = |fd, events| libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        fds.push(entry(self.wake.as_raw_fd(), libc::POLLIN));
        for (l, _) in &self.listeners {
            fds.push(entry(l.as_raw_fd(), libc::POLLIN));
        }
        for f in fwds {
            let mut ev = 0;
            if !f.host_eof && f.to_guest.len() < BUF {
                ev |= libc::POLLIN;
            }
            if !f.to_host.is_empty() {
                ev |= libc::POLLOUT;
            }
            if ev != 0 {
                fds.push(entry(f.host.as_raw_fd(), ev));
            }
        }
        let ts = libc::timespec {
            tv_sec: wait.as_secs() as libc::time_t,
            tv_nsec: wait.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd entries that lives across the
        // call; `ts` is a valid timespec; no signal mask is passed.
        unsafe {
            libc::ppoll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                &raw const ts,
                std::ptr::null(),
            )
        };
    }

    /// The address for DHCP client `mac`: its lease, else the next free one from `guest=`
    /// (`dhcpstart=`) up, skipping `host=` and `dns=` (at most [`DHCP_POOL`] clients, as slirp).
    fn lease_for(&self, mac: [u8; 6]) -> Option<Ipv4Addr> {
        if let Some((_, ip)) = self.leases.iter().find(|(m, _)| *m == mac) {
            return Some(*ip);
        }
        if self.leases.len() >= DHCP_POOL {
            return None;
        }
        let bcast = self.net.broadcast();
        (u32::from(self.guest)..)
            .take(256)
            .map(Ipv4Addr::from)
            .take_while(|ip| self.net.contains_addr(ip) && Some(*ip) != bcast)
            .find(|ip| {
                *ip != self.net.address()
                    && *ip != self.dns
                    && !self.leases.iter().any(|(_, l)| l == ip)
            })
    }

    /// A frame from the guest: DHCP is answered here, outbound traffic goes to the NAT, the
    /// rest to smoltcp.
    fn take_frame(&mut self, dev: &mut Wire, f: Vec<u8>) {
        let (verdict, leased) = self.dhcp.handle_pool(&f, |mac| self.lease_for(mac));
        if let Some(lease) = leased
            && !self.leases.iter().any(|(m, _)| *m == lease.0)
        {
            self.leases.push(lease);
        }
        match verdict {
            Dhcp::NotDhcp => {
                let out = |fr: Vec<u8>| {
                    self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
                    (self.deliver)(fr);
                };
                if let Verdict::Stack(f) = self.nat.guest_frame(f, &out) {
                    dev.rx.push_back(f);
                }
            }
            Dhcp::Handled(Some(reply)) => {
                self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
                (self.deliver)(reply);
            }
            Dhcp::Handled(None) => {}
        }
    }

    fn run(mut self) {
        let start = std::time::Instant::now();
        let now = || Instant::from_micros(start.elapsed().as_micros() as i64);
        let mut dev = Wire {
            rx: VecDeque::new(),
            deliver: self.deliver.clone(),
            counters: self.counters.clone(),
        };
        let mut iface = Interface::new(
            Config::new(EthernetAddress(HOST_MAC).into()),
            &mut dev,
            now(),
        );
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::Ipv4(self.net));
            if self.dns != self.net.address() {
                let _ = a.push(IpCidr::Ipv4(Ipv4Cidr::new(self.dns, self.net.prefix_len())));
            }
        });
        // Outbound NAT: smoltcp accepts TCP for every address (the NAT decides what reaches it).
        iface.set_any_ip(self.nat.any_ip());
        let mut sockets = SocketSet::new(Vec::new());
        let mut fwds: Vec<Fwd> = Vec::new();
        let mut next_port: u16 = 49152;
        let mut chunk = vec![0u8; 64 * 1024];
        while !self.stop.load(Ordering::Relaxed) {
            // Sleep until a guest frame is queued, a host socket is ready or smoltcp has a
            // timer due (at most 20 ms, so a stop is seen).
            let wait = iface
                .poll_delay(now(), &sockets)
                .map(|d| Duration::from_micros(d.total_micros()))
                .unwrap_or(Duration::from_millis(20))
                .min(Duration::from_millis(20));
            self.wait_ready(&fwds, wait);
            // Reset the eventfd before draining, so a frame queued from now on wakes us again.
            let _ = self.wake.read();
            loop {
                match self.rx.try_recv() {
                    Ok(f) => self.take_frame(&mut dev, f),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
            // Outbound connects that completed: a socket listening on their destination takes
            // the held SYN.
            let out = |fr: Vec<u8>| {
                self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
                (self.deliver)(fr);
            };
            for c in self.nat.poll_host(&out) {
                let mut sock = relay_socket();
                sock.set_timeout(Some(smoltcp::time::Duration::from_secs(120)));
                let ep = (IpAddress::Ipv4(c.key.2), c.key.3);
                if let Err(e) = sock.listen(ep) {
                    tracing::warn!("user netdev NAT: listen on {}:{}: {e}", c.key.2, c.key.3);
                    self.nat.forget(&c.key);
                    continue;
                }
                let _ = c.host.set_nonblocking(true);
                fwds.push(Fwd {
                    host: c.host,
                    handle: sockets.add(sock),
                    to_guest: Vec::new(),
                    to_host: Vec::new(),
                    host_eof: false,
                    fin_sent: false,
                    host_write_shut: false,
                    nat: Some((c.key, std::time::Instant::now())),
                });
                dev.rx.push_back(c.syn);
            }
            iface.poll(now(), &mut dev, &mut sockets);

            // New host connections.
            for (l, rule) in &self.listeners {
                while let Ok((s, _)) = l.accept() {
                    let _ = s.set_nonblocking(true);
                    let _ = s.set_nodelay(true);
                    let mut sock = relay_socket();
                    next_port = if next_port >= 65000 {
                        49152
                    } else {
                        next_port + 1
                    };
                    let dst = IpAddress::Ipv4(rule.guest.unwrap_or(self.guest));
                    if let Err(e) = sock.connect(iface.context(), (dst, rule.guest_port), next_port)
                    {
                        tracing::warn!("user netdev: connect to guest: {e}");
                        continue;
                    }
                    let handle = sockets.add(sock);
                    fwds.push(Fwd {
                        host: s,
                        handle,
                        to_guest: Vec::new(),
                        to_host: Vec::new(),
                        host_eof: false,
                        fin_sent: false,
                        host_write_shut: false,
                        nat: None,
                    });
                }
            }

            // Relay.
            let mut finished = Vec::new();
            fwds.retain_mut(|f| {
                let sock = sockets.get_mut::<tcp::Socket>(f.handle);
                // host -> guest
                if !f.host_eof && f.to_guest.len() < BUF {
                    match f.host.read(&mut chunk) {
                        Ok(0) => f.host_eof = true,
                        Ok(n) => f.to_guest.extend_from_slice(&chunk[..n]),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => f.host_eof = true,
                    }
                }
                if !f.to_guest.is_empty()
                    && sock.can_send()
                    && let Ok(n) = sock.send_slice(&f.to_guest)
                {
                    f.to_guest.drain(..n);
                }
                if f.host_eof && f.to_guest.is_empty() && !f.fin_sent && sock.may_send() {
                    sock.close();
                    f.fin_sent = true;
                }
                // guest -> host
                while sock.can_recv() && f.to_host.len() < BUF {
                    match sock.recv_slice(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => f.to_host.extend_from_slice(&chunk[..n]),
                    }
                }
                if !f.to_host.is_empty() {
                    match f.host.write(&f.to_host) {
                        Ok(n) => {
                            f.to_host.drain(..n);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => {
                            sock.abort();
                            f.to_host.clear();
                            f.host_eof = true;
                        }
                    }
                }
                if f.to_host.is_empty()
                    && !sock.may_recv()
                    && !f.host_write_shut
                    && !matches!(
                        sock.state(),
                        tcp::State::SynSent | tcp::State::Listen | tcp::State::SynReceived
                    )
                {
                    let _ = f.host.shutdown(std::net::Shutdown::Write);
                    f.host_write_shut = true;
                }
                // An outbound connection whose socket is back to listening: the guest reset it
                // during the handshake (or never took it).
                let reset = f.nat.is_some_and(|(_, t)| {
                    sock.state() == tcp::State::Listen && t.elapsed() > Duration::from_secs(1)
                });
                let done = reset
                    || matches!(sock.state(), tcp::State::Closed | tcp::State::TimeWait)
                        && f.to_host.is_empty();
                if done {
                    let _ = f.host.shutdown(std::net::Shutdown::Both);
                    sockets.remove(f.handle);
                    if let Some((k, _)) = f.nat {
                        finished.push(k);
                    }
                }
                !done
            });
            for k in &finished {
                self.nat.forget(k);
            }
            iface.poll(now(), &mut dev, &mut sockets);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostfwd_rules_parse_like_qemu() {
        let r = HostFwd::parse("tcp:127.0.0.1:8080-:80").unwrap();
        assert_eq!(r.host, "127.0.0.1:8080".parse().unwrap());
        assert_eq!((r.guest, r.guest_port), (None, 80));
        let r = HostFwd::parse("tcp::2222-10.0.2.9:22").unwrap();
        assert_eq!(r.guest, Some(Ipv4Addr::new(10, 0, 2, 9)));
        for bad in [
            "udp:1.2.3.4:1-:2",
            "tcp:1.2.3.4:1",
            "tcp:x:1-:2",
            "tcp:1.2.3.4:99999-:2",
            "tcp:1.2.3.4:1-:z",
        ] {
            assert!(HostFwd::parse(bad).is_err(), "{bad}");
        }
    }
}
