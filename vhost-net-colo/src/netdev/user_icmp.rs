//! ICMP for the `user` netdev: the host side of the guest's pings, and the ICMP errors the host
//! receives for the guest's pings and UDP datagrams ([`super::user_nat`] decides what goes where
//! and builds the frames).
//!
//! - Echo requests to other addresses than the netdev's own go out through unprivileged ICMP
//!   datagram sockets (`socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)`), one per guest address and
//!   echo identifier. The kernel gives each such socket an identifier of its own and rewrites
//!   the requests' identifier to it; replies get the guest's identifier back (sequence and data
//!   untouched, checksum recomputed).
//! - These sockets need the process's group inside `net.ipv4.ping_group_range`, a per-network-
//!   namespace sysctl (Linux's default "1 0" allows nobody, root included); [`ping_unavailable`]
//!   says why, in one line, when they cannot be opened.
//! - With `IP_RECVERR`, ICMP errors for a socket's datagrams (port or host unreachable, time
//!   exceeded) queue on the socket's error queue with the offender and the quoted datagram;
//!   [`read_errors`] reads them, for ping and UDP sockets alike.
//! - A socket idle for [`ICMP_IDLE`] is closed; at most [`MAX_ECHO_SOCKETS`] are open: a new
//!   flow closes the least recently used one (a guest running `ping -c 1` in a loop uses a new
//!   identifier each time and must not lock itself out).

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// An echo socket with neither a request nor a reply for this long is closed.
pub const ICMP_IDLE: Duration = Duration::from_secs(30);
/// Echo sockets open at once (each a host descriptor).
pub const MAX_ECHO_SOCKETS: usize = 64;
/// Reads per socket and round, so one busy socket cannot starve the rest.
const BURST: usize = 64;

/// An ICMP message type the guest gets back from the host's error queue.
pub const DEST_UNREACHABLE: u8 = 3;
pub const TIME_EXCEEDED: u8 = 11;

fn set_recverr(fd: RawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a c_int of the stated size on a socket we own.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_RECVERR,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Asks the kernel to queue ICMP errors for this socket's datagrams (read with [`read_errors`]).
pub fn enable_errors(sock: &impl AsRawFd) -> io::Result<()> {
    set_recverr(sock.as_raw_fd())
}

/// A non-blocking ICMP datagram ("ping") socket with `IP_RECVERR` on.
pub fn open_ping_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked before use.
    let raw = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    set_recverr(fd.as_raw_fd())?;
    Ok(fd)
}

/// `None` when this process may open ping sockets here; else one line saying why not and how
/// to allow it.
pub fn ping_unavailable() -> Option<String> {
    let e = open_ping_socket().err()?;
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ping_group_range")
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unreadable".into());
    // SAFETY: getegid has no preconditions.
    let gid = unsafe { libc::getegid() };
    Some(format!(
        "guest pings of outside addresses get no answer: no ICMP datagram socket ({e}); \
         net.ipv4.ping_group_range of this network namespace is \"{range}\" and must include \
         group {gid} (e.g. sysctl -w net.ipv4.ping_group_range=\"{gid} {gid}\")"
    ))
}

pub(super) fn to_sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn from_sockaddr(sa: &libc::sockaddr_in) -> Option<SocketAddrV4> {
    (sa.sin_family == libc::AF_INET as libc::sa_family_t).then(|| {
        SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
            u16::from_be(sa.sin_port),
        )
    })
}

/// The one's-complement sum of `data` (RFC 1071), folded, not inverted.
fn sum16(data: &[u8]) -> u16 {
    let mut s: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// Writes the internet checksum of an ICMP message into its bytes 2..4.
pub fn fill_icmp_checksum(msg: &mut [u8]) {
    if msg.len() < 4 {
        return;
    }
    msg[2..4].copy_from_slice(&[0, 0]);
    let c = !sum16(msg);
    msg[2..4].copy_from_slice(&c.to_be_bytes());
}

/// The checksum after one 16-bit word of the summed data changed from `old` to `new`
/// (RFC 1624, eqn. 3): for quoting an echo request whose data was cut short.
pub fn checksum_adjust(csum: u16, old: u16, new: u16) -> u16 {
    let mut s = u32::from(!csum) + u32::from(!old) + u32::from(new);
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// An ICMP error the host received for one of a socket's datagrams.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostIcmpError {
    pub icmp_type: u8,
    pub code: u8,
    /// The ICMP message's `ee_info` (the next-hop MTU of "fragmentation needed").
    pub info: u32,
    /// Who sent the error.
    pub offender: Option<Ipv4Addr>,
    /// Where the datagram was going (the host's view).
    pub dst: SocketAddrV4,
    /// What the error quoted of the datagram after its transport header (UDP), or from its
    /// ICMP header on (ping sockets).
    pub quoted: Vec<u8>,
}

/// Reads the error queue of `fd` (`IP_RECVERR`) empty and returns the ICMP errors in it (local
/// errors, e.g. a too-large datagram, are read and dropped).
pub fn read_errors(fd: RawFd, buf: &mut [u8]) -> Vec<HostIcmpError> {
    let mut errs = Vec::new();
    for _ in 0..BURST {
        // SAFETY: all-zero sockaddr_in and msghdr are valid values.
        let mut name: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        let mut ctrl = [0u64; 64];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: as above.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&raw mut name).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = ctrl.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&ctrl) as _;
        // SAFETY: every pointer in `msg` points at a live buffer of the stated length.
        let n = unsafe { libc::recvmsg(fd, &raw mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
        if n < 0 {
            break;
        }
        let n = (n as usize).min(buf.len());
        // SAFETY: `msg` was filled by recvmsg; the CMSG macros stay within msg_controllen.
        let mut c = unsafe { libc::CMSG_FIRSTHDR(&raw const msg) };
        while !c.is_null() {
            // SAFETY: `c` is a control message header inside `ctrl` (CMSG_FIRSTHDR/NXTHDR).
            let (level, ty, len) = unsafe { ((*c).cmsg_level, (*c).cmsg_type, (*c).cmsg_len) };
            if level == libc::IPPROTO_IP && ty == libc::IP_RECVERR {
                // SAFETY: as above; the data of a control message follows its header.
                let data = unsafe { libc::CMSG_DATA(c) };
                #[allow(clippy::unnecessary_cast)] // cmsg_len is not usize on every libc
                let have = (len as usize).saturating_sub(data as usize - c as usize);
                let ee_len = std::mem::size_of::<libc::sock_extended_err>();
                if have >= ee_len {
                    // SAFETY: `have` bytes of control data are at `data`; unaligned read.
                    let ee: libc::sock_extended_err =
                        unsafe { std::ptr::read_unaligned(data.cast()) };
                    let offender = (have >= ee_len + std::mem::size_of::<libc::sockaddr_in>())
                        .then(|| {
                            // SAFETY: the offender's address follows the extended error
                            // (SO_EE_OFFENDER), within `have`.
                            let sa: libc::sockaddr_in =
                                unsafe { std::ptr::read_unaligned(data.add(ee_len).cast()) };
                            from_sockaddr(&sa).map(|a| *a.ip())
                        })
                        .flatten();
                    if ee.ee_origin == libc::SO_EE_ORIGIN_ICMP
                        && let Some(dst) = from_sockaddr(&name)
                    {
                        errs.push(HostIcmpError {
                            icmp_type: ee.ee_type,
                            code: ee.ee_code,
                            info: ee.ee_info,
                            offender,
                            dst,
                            quoted: buf.get(..n).unwrap_or_default().to_vec(),
                        });
                    }
                }
            }
            // SAFETY: as above.
            c = unsafe { libc::CMSG_NXTHDR(&raw const msg, c) };
        }
    }
    errs
}

struct EchoSock {
    fd: OwnedFd,
    mac: [u8; 6],
    last: Instant,
    /// The TTL the socket sends with (the guest's last; 0: the host's default).
    ttl: u8,
}

/// Something for the guest from the echo sockets.
#[derive(Debug)]
pub enum FromHost {
    /// An echo reply: the ICMP message with the guest's identifier and a fresh checksum.
    Reply {
        mac: [u8; 6],
        guest: Ipv4Addr,
        from: Ipv4Addr,
        icmp: Vec<u8>,
    },
    /// An ICMP error about one of the guest's echo requests; `quoted` is the request's first 8
    /// bytes as the guest sent them (its identifier, its checksum).
    Error {
        mac: [u8; 6],
        guest: Ipv4Addr,
        err: HostIcmpError,
        quoted: [u8; 8],
    },
}

/// The ping sockets of the guest's echo flows, by guest address and echo identifier.
#[derive(Default)]
pub struct EchoSockets {
    socks: HashMap<(Ipv4Addr, u16), EchoSock>,
    /// Errors read while sending, for the next [`EchoSockets::poll`].
    queued: Vec<FromHost>,
}

impl EchoSockets {
    pub fn len(&self) -> usize {
        self.socks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.socks.is_empty()
    }

    /// Sends the guest's echo request `icmp` (ICMP header and data, as the guest sent it) from
    /// `guest` to `dst` with the guest's `ttl` through the flow's socket, opening it (and
    /// closing the least recently used one at the limit) when needed.
    pub fn send(
        &mut self,
        mac: [u8; 6],
        guest: Ipv4Addr,
        dst: Ipv4Addr,
        ttl: u8,
        icmp: &[u8],
    ) -> io::Result<()> {
        let Some(id) = icmp.get(4..6).map(|b| u16::from_be_bytes([b[0], b[1]])) else {
            return Err(io::ErrorKind::InvalidInput.into());
        };
        let key = (guest, id);
        if !self.socks.contains_key(&key) {
            if self.socks.len() >= MAX_ECHO_SOCKETS
                && let Some(oldest) = self
                    .socks
                    .iter()
                    .min_by_key(|(_, s)| s.last)
                    .map(|(k, _)| *k)
            {
                self.socks.remove(&oldest);
            }
            let fd = open_ping_socket()?;
            self.socks.insert(
                key,
                EchoSock {
                    fd,
                    mac,
                    last: Instant::now(),
                    ttl: 0,
                },
            );
        }
        let Some(s) = self.socks.get_mut(&key) else {
            return Err(io::ErrorKind::NotFound.into());
        };
        s.mac = mac;
        s.last = Instant::now();
        // The guest's TTL goes out with its request (ping -t, traceroute -I); the netdev is not
        // counted as a hop, as slirp is not.
        if s.ttl != ttl && ttl > 0 {
            let v = libc::c_int::from(ttl);
            // SAFETY: setsockopt with a c_int of the stated size on our socket.
            let r = unsafe {
                libc::setsockopt(
                    s.fd.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_TTL,
                    (&raw const v).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if r == 0 {
                s.ttl = ttl;
            }
        }
        let sa = to_sockaddr(SocketAddrV4::new(dst, 0));
        let send = || {
            // SAFETY: sendto from a live buffer of its length to a valid sockaddr_in.
            let r = unsafe {
                libc::sendto(
                    s.fd.as_raw_fd(),
                    icmp.as_ptr().cast(),
                    icmp.len(),
                    0,
                    (&raw const sa).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        if send().is_ok() {
            return Ok(());
        }
        // A send reports the socket's pending error once (an ICMP error for an earlier request,
        // queued with IP_RECVERR; or a local one that no read would report, and poll(2) would
        // say POLLERR for ever): the queued errors go to the guest with the next poll, and the
        // request is sent again.
        for err in read_errors(s.fd.as_raw_fd(), &mut [0u8; 2048]) {
            if let Some(quoted) = quote_request(&err.quoted, id) {
                self.queued.push(FromHost::Error {
                    mac,
                    guest,
                    err,
                    quoted,
                });
            }
        }
        send()
    }

    /// The sockets for the stack's poll(2).
    pub fn poll_fds(&self, fds: &mut Vec<libc::pollfd>) {
        for s in self.socks.values() {
            fds.push(libc::pollfd {
                fd: s.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
    }

    /// Reads what arrived: replies, and errors (read from the error queue when a read reports
    /// one). `buf` is scratch space.
    pub fn poll(&mut self, buf: &mut [u8]) -> Vec<FromHost> {
        let mut got = std::mem::take(&mut self.queued);
        for (&(guest, id), s) in self.socks.iter_mut() {
            for _ in 0..BURST {
                // SAFETY: an all-zero sockaddr_in is valid.
                let mut from: libc::sockaddr_in = unsafe { std::mem::zeroed() };
                let mut fl = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
                // SAFETY: recvfrom into a live buffer of its length and a sockaddr_in.
                let n = unsafe {
                    libc::recvfrom(
                        s.fd.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT,
                        (&raw mut from).cast(),
                        &raw mut fl,
                    )
                };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::WouldBlock {
                        break;
                    }
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    // The socket's pending error, reported once: its ICMP errors are queued.
                    for err in read_errors(s.fd.as_raw_fd(), buf) {
                        if let Some(quoted) = quote_request(&err.quoted, id) {
                            got.push(FromHost::Error {
                                mac: s.mac,
                                guest,
                                err,
                                quoted,
                            });
                        }
                    }
                    continue;
                }
                s.last = Instant::now();
                let Some(msg) = buf.get_mut(..n as usize) else {
                    break;
                };
                let Some(src) = from_sockaddr(&from) else {
                    continue;
                };
                // Only echo replies arrive on a ping socket; check anyway.
                if msg.len() < 8 || msg[0] != 0 {
                    continue;
                }
                msg[4..6].copy_from_slice(&id.to_be_bytes());
                fill_icmp_checksum(msg);
                got.push(FromHost::Reply {
                    mac: s.mac,
                    guest,
                    from: *src.ip(),
                    icmp: msg.to_vec(),
                });
            }
        }
        got
    }

    /// Closes the sockets idle for [`ICMP_IDLE`]; returns how many.
    pub fn sweep(&mut self) -> usize {
        let before = self.socks.len();
        self.socks.retain(|_, s| s.last.elapsed() < ICMP_IDLE);
        before - self.socks.len()
    }
}

/// The first 8 bytes of the guest's echo request, from the kernel's copy `sent` (whose
/// identifier is the socket's): the guest's identifier back, the checksum adjusted to it.
fn quote_request(sent: &[u8], guest_id: u16) -> Option<[u8; 8]> {
    let mut q: [u8; 8] = sent.get(..8)?.try_into().ok()?;
    let kid = u16::from_be_bytes([q[4], q[5]]);
    let csum = u16::from_be_bytes([q[2], q[3]]);
    q[2..4].copy_from_slice(&checksum_adjust(csum, kid, guest_id).to_be_bytes());
    q[4..6].copy_from_slice(&guest_id.to_be_bytes());
    Some(q)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_match_a_full_recomputation() {
        let mut m = vec![8u8, 0, 0, 0, 0x12, 0x34, 0, 7];
        m.extend((0..57u8).map(|i| i.wrapping_mul(37)));
        fill_icmp_checksum(&mut m);
        assert_eq!(sum16(&m), 0xffff, "a filled checksum sums to all ones");
        let old = u16::from_be_bytes([m[2], m[3]]);
        let adjusted = checksum_adjust(old, 0x1234, 0xbeef);
        m[4..6].copy_from_slice(&0xbeef_u16.to_be_bytes());
        fill_icmp_checksum(&mut m);
        assert_eq!(adjusted, u16::from_be_bytes([m[2], m[3]]));
        let q = quote_request(&m, 0x0101).unwrap();
        assert_eq!(&q[4..6], &[1, 1]);
        m[4..6].copy_from_slice(&[1, 1]);
        fill_icmp_checksum(&mut m);
        assert_eq!(&q[2..4], &m[2..4]);
        assert!(quote_request(&m[..7], 1).is_none());
        // Odd lengths and short messages do not panic.
        fill_icmp_checksum(&mut [1, 2, 3]);
        let _ = sum16(&[0xff]);
    }

    /// Runs `f` on a thread in a network namespace of its own (unshare), with `lo` up and
    /// ping sockets allowed for every group there; `None` (SKIPPED printed) where this process
    /// may not. The namespace goes away with the thread.
    fn in_own_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        std::thread::spawn(move || {
            // SAFETY: unshare of this thread's network namespace only.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                eprintln!(
                    "SKIPPED: unshare(CLONE_NEWNET): {} (needs root)",
                    io::Error::last_os_error()
                );
                return None;
            }
            // /proc/sys/net and a child process see the calling thread's namespace.
            std::fs::write("/proc/sys/net/ipv4/ping_group_range", "0 2147483647").ok()?;
            let up = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status();
            if !up.is_ok_and(|s| s.success()) {
                eprintln!("SKIPPED: ip link set lo up failed in a new namespace");
                return None;
            }
            Some(f())
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    }

    #[test]
    fn echo_replies_come_back_with_the_guests_identifier() {
        let r = in_own_netns(|| {
            assert_eq!(ping_unavailable(), None);
            let mut e = EchoSockets::default();
            let g = Ipv4Addr::new(10, 0, 2, 15);
            let mut req = vec![8u8, 0, 0, 0, 0xab, 0xcd, 0, 1];
            req.extend_from_slice(b"colo ping payload");
            fill_icmp_checksum(&mut req);
            e.send([2; 6], g, Ipv4Addr::LOCALHOST, 64, &req).unwrap();
            req[7] = 2;
            e.send([2; 6], g, Ipv4Addr::LOCALHOST, 64, &req).unwrap();
            assert_eq!(e.len(), 1, "one socket per guest address and identifier");
            let mut buf = vec![0u8; 65536];
            let mut replies = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(5);
            while replies.len() < 2 && Instant::now() < deadline {
                replies.extend(e.poll(&mut buf));
                std::thread::sleep(Duration::from_millis(5));
            }
            // At the limit a new flow closes the least recently used one, not itself.
            for id in 0..MAX_ECHO_SOCKETS as u16 {
                let mut other = req.clone();
                other[4..6].copy_from_slice(&id.to_be_bytes());
                e.send(
                    [2; 6],
                    Ipv4Addr::new(10, 0, 2, 16),
                    Ipv4Addr::LOCALHOST,
                    64,
                    &other,
                )
                .unwrap();
            }
            assert_eq!(e.len(), MAX_ECHO_SOCKETS);
            assert!(
                !e.socks.contains_key(&(g, 0xabcd)),
                "the oldest flow was closed"
            );
            assert!(e.socks.contains_key(&(Ipv4Addr::new(10, 0, 2, 16), 0)));
            replies
        });
        let Some(replies) = r else { return };
        assert_eq!(replies.len(), 2, "{replies:?}");
        for (i, r) in replies.iter().enumerate() {
            let FromHost::Reply {
                guest, from, icmp, ..
            } = r
            else {
                panic!("not a reply: {r:?}");
            };
            assert_eq!(*guest, Ipv4Addr::new(10, 0, 2, 15));
            assert_eq!(*from, Ipv4Addr::LOCALHOST);
            assert_eq!(&icmp[..2], &[0, 0], "echo reply");
            assert_eq!(&icmp[4..8], &[0xab, 0xcd, 0, i as u8 + 1]);
            assert_eq!(&icmp[8..], b"colo ping payload");
            assert_eq!(sum16(icmp), 0xffff, "checksum");
        }
    }
}
