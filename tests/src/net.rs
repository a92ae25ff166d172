//! Network namespaces, veth pairs, bridges and taps that remove themselves on drop.
//!
//! All are made with `ip` (iproute2) and need root (see [`crate::host::root`] /
//! [`crate::host::netns`]). Names come from [`crate::unique_name`], so parallel tests never
//! collide. Traffic stays inside what the test creates.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::unique_name;

/// Runs `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

/// Runs `ip -n NS ARGS` (or plain `ip ARGS` when `ns` is `None`).
pub fn ip_in(ns: Option<&NetNs>, args: &[&str]) -> Result<String> {
    match ns {
        Some(ns) => {
            let mut v = vec!["-n", ns.name()];
            v.extend_from_slice(args);
            ip(&v)
        }
        None => ip(args),
    }
}

/// Runs a command to completion; fails with its stderr unless it exits 0. Returns stdout.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace (`ip netns add`), deleted on drop. Its loopback is up.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates a namespace named `unique_name(prefix)`.
    pub fn new(prefix: &str) -> Result<NetNs> {
        let name = unique_name(prefix);
        ip(&["netns", "add", &name])?;
        let ns = NetNs { name };
        ip_in(Some(&ns), &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside the namespace (`ip netns exec NAME program`); add
    /// arguments and spawn it (e.g. with [`crate::ChildGuard::spawn`]). `ip netns exec` execs
    /// the program, so the PID is the program's.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `program args` inside the namespace to completion; returns stdout.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        run(self.command(program).args(args))
    }

    /// `ip -n NAME args`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        ip_in(Some(self), args)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "delete", &self.name]) {
            eprintln!("[colo-tests] cannot delete netns {}: {e:#}", self.name);
        }
    }
}

/// One end of a link: its name and the namespace it lives in (`None`: the test's own).
#[derive(Debug, Clone)]
struct End {
    name: String,
    ns: Option<String>,
}

fn ip_ns_name(ns: &Option<String>, args: &[&str]) -> Result<String> {
    match ns {
        Some(n) => {
            let mut v = vec!["-n", n.as_str()];
            v.extend_from_slice(args);
            ip(&v)
        }
        None => ip(args),
    }
}

/// A veth pair, created in the current namespace; either end can move into a [`NetNs`].
/// Deleted on drop (deleting one end deletes both; a namespace's deletion also removes it).
#[derive(Debug)]
pub struct Veth {
    a: End,
    b: End,
}

impl Veth {
    /// Creates `unique_name(prefix)` + `a`/`b`-suffixed ends (names ≤ 15 characters).
    pub fn new(prefix: &str) -> Result<Veth> {
        let base = crate::unique_name_max(prefix, 14);
        let (a, b) = (format!("{base}a"), format!("{base}b"));
        ip(&["link", "add", &a, "type", "veth", "peer", "name", &b])?;
        Ok(Veth {
            a: End { name: a, ns: None },
            b: End { name: b, ns: None },
        })
    }

    /// Name of end A.
    pub fn a(&self) -> &str {
        &self.a.name
    }

    /// Name of end B.
    pub fn b(&self) -> &str {
        &self.b.name
    }

    /// Moves end A into `ns`.
    pub fn move_a(&mut self, ns: &NetNs) -> Result<()> {
        move_end(&mut self.a, ns)
    }

    /// Moves end B into `ns`.
    pub fn move_b(&mut self, ns: &NetNs) -> Result<()> {
        move_end(&mut self.b, ns)
    }

    /// Brings end A up and, if given, adds an address (`"10.0.0.1/24"`).
    pub fn up_a(&self, addr: Option<&str>) -> Result<()> {
        up(&self.a, addr)
    }

    /// Brings end B up and, if given, adds an address.
    pub fn up_b(&self, addr: Option<&str>) -> Result<()> {
        up(&self.b, addr)
    }
}

fn move_end(end: &mut End, ns: &NetNs) -> Result<()> {
    ip_ns_name(&end.ns, &["link", "set", &end.name, "netns", ns.name()])?;
    end.ns = Some(ns.name().to_string());
    Ok(())
}

fn up(end: &End, addr: Option<&str>) -> Result<()> {
    if let Some(addr) = addr {
        ip_ns_name(&end.ns, &["addr", "add", addr, "dev", &end.name])?;
    }
    ip_ns_name(&end.ns, &["link", "set", &end.name, "up"])?;
    Ok(())
}

impl Drop for Veth {
    fn drop(&mut self) {
        if ip_ns_name(&self.a.ns, &["link", "del", &self.a.name]).is_err() {
            let _ = ip_ns_name(&self.b.ns, &["link", "del", &self.b.name]);
        }
    }
}

/// A Linux bridge, up, deleted on drop.
#[derive(Debug)]
pub struct Bridge {
    end: End,
}

impl Bridge {
    /// Creates a bridge named `unique_name(prefix)` in `ns` (or the current namespace).
    pub fn new(prefix: &str, ns: Option<&NetNs>) -> Result<Bridge> {
        let end = End {
            name: unique_name(prefix),
            ns: ns.map(|n| n.name().to_string()),
        };
        ip_ns_name(
            &end.ns,
            &["link", "add", "name", &end.name, "type", "bridge"],
        )?;
        let br = Bridge { end };
        ip_ns_name(&br.end.ns, &["link", "set", &br.end.name, "up"])?;
        Ok(br)
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.end.name
    }

    /// Enslaves interface `ifname` (in the bridge's namespace) and brings it up.
    pub fn attach(&self, ifname: &str) -> Result<()> {
        ip_ns_name(
            &self.end.ns,
            &["link", "set", ifname, "master", &self.end.name],
        )?;
        ip_ns_name(&self.end.ns, &["link", "set", ifname, "up"])?;
        Ok(())
    }

    /// Adds an address to the bridge itself.
    pub fn add_addr(&self, addr: &str) -> Result<()> {
        ip_ns_name(&self.end.ns, &["addr", "add", addr, "dev", &self.end.name])?;
        Ok(())
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = ip_ns_name(&self.end.ns, &["link", "del", &self.end.name]);
    }
}

/// A persistent tap device (`ip tuntap add … mode tap`), deleted on drop. A process opens it
/// by name through `/dev/net/tun` (`IFF_TAP | IFF_NO_PI`, plus `IFF_VNET_HDR` if made with
/// `vnet_hdr`).
#[derive(Debug)]
pub struct Tap {
    end: End,
}

impl Tap {
    /// Creates a tap named `unique_name(prefix)` in `ns` (or the current namespace).
    pub fn new(prefix: &str, ns: Option<&NetNs>, vnet_hdr: bool) -> Result<Tap> {
        let end = End {
            name: unique_name(prefix),
            ns: ns.map(|n| n.name().to_string()),
        };
        let mut args = vec!["tuntap", "add", "dev", &end.name, "mode", "tap"];
        if vnet_hdr {
            args.push("vnet_hdr");
        }
        ip_ns_name(&end.ns, &args)?;
        Ok(Tap { end })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.end.name
    }

    /// Brings it up and, if given, adds an address.
    pub fn up(&self, addr: Option<&str>) -> Result<()> {
        up(&self.end, addr)
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = ip_ns_name(
            &self.end.ns,
            &["tuntap", "del", "dev", &self.end.name, "mode", "tap"],
        );
    }
}

/// A UDP server on 127.0.0.1 (port picked free) that answers each datagram with what its
/// `reply` function returns for it (nothing for `None`); the thread stops when this is dropped.
pub struct UdpServer {
    pub port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl UdpServer {
    pub fn start(reply: impl Fn(&[u8]) -> Option<Vec<u8>> + Send + 'static) -> Result<Self> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let s = std::net::UdpSocket::bind("127.0.0.1:0").context("bind a UDP server")?;
        s.set_read_timeout(Some(std::time::Duration::from_millis(100)))?;
        let port = s.local_addr()?.port();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stopped.load(Ordering::Relaxed) {
                let Ok((n, from)) = s.recv_from(&mut buf) else {
                    continue;
                };
                if let Some(r) = reply(&buf[..n]) {
                    let _ = s.send_to(&r, from);
                }
            }
        });
        Ok(Self { port, stop })
    }

    /// A DNS responder: every A query gets one answer, 10.9.8.7 (TTL 60); other query types
    /// get an answer with no record.
    pub fn dns() -> Result<Self> {
        Self::start(dns_answer)
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The answer [`UdpServer::dns`] gives to `query` (None for what is not a DNS question).
fn dns_answer(q: &[u8]) -> Option<Vec<u8>> {
    // The question: labels from byte 12 to a zero byte, then type and class.
    let mut at = 12;
    while at < q.len() && q[at] != 0 {
        at += 1 + q[at] as usize;
    }
    let end = at + 5;
    if q.len() < 12 || end > q.len() {
        return None;
    }
    let qtype = u16::from_be_bytes([q[at + 1], q[at + 2]]);
    let mut r = q[..end].to_vec();
    r[2] = 0x81; // response, recursion desired
    r[3] = 0x80; // recursion available, no error
    r[6..12].copy_from_slice(&[0, 0, 0, 0, 0, 0]);
    if qtype == 1 {
        r[7] = 1; // one answer
        r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 9, 8, 7]);
    }
    Some(r)
}
