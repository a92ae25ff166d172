//! Setup shared by the vhost-net-colo integration tests (`mod common;` in each): the backend
//! binary under a [`ChildGuard`] (logged to the test's directory, killed by PID on drop), the
//! `stream` netdev whose far end is the test, QMP, and namespaces with taps. The guard, the
//! waits and the namespaces are the `colo-tests` harness's.

#![allow(dead_code)] // every test binary uses a part of it

use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub use colo_tests::{ChildGuard, NetNs, QmpClient, secs, skipped};
use vhost_net_colo::testing::{NetFrontend, Options};

/// The backend binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_vhost-net-colo");

/// A running backend: `--socket DIR/vu.sock`, and `--qmp unix:DIR/qmp.sock` when asked for.
pub struct Backend {
    pub proc: ChildGuard,
    /// The vhost-user socket.
    pub sock: PathBuf,
    /// The QMP socket (when started with one).
    pub qmp_path: Option<PathBuf>,
}

impl Backend {
    /// A QMP client on the backend's QMP socket.
    pub fn qmp(&self) -> QmpClient {
        let path = self
            .qmp_path
            .as_ref()
            .expect("backend started without --qmp");
        QmpClient::connect_unix(path, Duration::from_secs(10)).unwrap()
    }

    /// A test frontend on the vhost-user socket.
    pub fn frontend(&self, o: &Options) -> NetFrontend {
        NetFrontend::connect(&self.sock, o).unwrap()
    }
}

/// Starts `vhost-net-colo --socket DIR/vu.sock --netdev NETDEV [--qmp unix:DIR/qmp.sock]
/// EXTRA…`, inside `netns` when given, and waits until its sockets exist.
pub fn spawn_backend(
    dir: &Path,
    netdev: &str,
    extra: &[&str],
    qmp: bool,
    netns: Option<&NetNs>,
) -> Backend {
    let sock = dir.join("vu.sock");
    let qmp_path = qmp.then(|| dir.join("qmp.sock"));
    let mut cmd = match netns {
        Some(ns) => ns.command(BIN),
        None => Command::new(BIN),
    };
    cmd.arg("--socket").arg(&sock).arg("--netdev").arg(netdev);
    if let Some(q) = &qmp_path {
        cmd.arg("--qmp").arg(format!("unix:{}", q.display()));
    }
    cmd.args(extra);
    let mut proc = ChildGuard::spawn("vhost-net-colo", &mut cmd, dir).unwrap();
    let deadline = secs(20);
    while !sock.exists() || qmp_path.as_ref().is_some_and(|q| !q.exists()) {
        proc.ensure_running().unwrap();
        assert!(Instant::now() < deadline, "backend sockets never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    Backend {
        proc,
        sock,
        qmp_path,
    }
}

/// Starts the backend (with QMP) inside `ns` on netdev `t0`: a tap named `ifname` that the
/// backend creates, with more tap options `opts` (e.g. `,queues=2`).
pub fn spawn_with_tap(dir: &Path, ns: &NetNs, ifname: &str, opts: &str, extra: &[&str]) -> Backend {
    let netdev = format!("tap,id=t0,ifname={ifname},script=no,downscript=no{opts}");
    spawn_backend(dir, &netdev, extra, true, Some(ns))
}

/// A `stream` netdev (QEMU's spelling) that connects to the Unix socket `path`.
pub fn stream_netdev(id: &str, path: &Path) -> String {
    format!(
        "stream,id={id},server=off,addr.type=unix,addr.path={}",
        path.display()
    )
}

/// Accepts the one connection on `l` (20 s at most); the stream reads and writes with a 10 s
/// timeout (a backend that stops reading fails the test instead of hanging it).
pub fn accept(l: &UnixListener) -> UnixStream {
    l.set_nonblocking(true).unwrap();
    let deadline = secs(20);
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
                return s;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "nothing connected to the wire");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Starts the backend with netdev `s0`, a `stream` (plus `stream_opts`, e.g. `,queues=4`) whose
/// far end is the returned stream (the test's wire, read timeout 10 s).
pub fn spawn_with_wire(
    dir: &Path,
    stream_opts: &str,
    extra: &[&str],
    qmp: bool,
) -> (Backend, UnixStream) {
    let wire_path = dir.join("wire.sock");
    let l = UnixListener::bind(&wire_path).unwrap();
    let netdev = stream_netdev("s0", &wire_path) + stream_opts;
    let backend = spawn_backend(dir, &netdev, extra, qmp, None);
    let wire = accept(&l);
    (backend, wire)
}

/// Polls `cond` every 20 ms until it holds; fails with `what` after `timeout`.
pub fn wait_for(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A namespace for a test that needs root, `/dev/net/tun` and `ip netns`; `None` (after
/// printing `SKIPPED: …`) where this host lacks one of them.
pub fn netns_with_tun(prefix: &str) -> Option<NetNs> {
    for check in [colo_tests::host::netns(), colo_tests::host::tun()] {
        if let Err(why) = check {
            skipped(&format!("{why} (a tap in a network namespace)"));
            return None;
        }
    }
    match NetNs::new(prefix) {
        Ok(ns) => Some(ns),
        Err(e) => {
            skipped(&format!("ip netns add failed: {e:#}"));
            None
        }
    }
}

/// Runs `f` on a thread that has entered `ns` (setns), and returns what it returns.
pub fn in_netns<T: Send + 'static>(ns: &NetNs, f: impl FnOnce() -> T + Send + 'static) -> T {
    spawn_in_netns(ns, f).join().unwrap()
}

/// Runs `f` on a thread that has entered `ns` (setns); not joined.
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &NetNs,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/run/netns/{}", ns.name());
    std::thread::spawn(move || {
        let file = std::fs::File::open(path).unwrap();
        // SAFETY: setns on this thread only, with a namespace fd we opened.
        let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns");
        f()
    })
}

/// `ip -n NS -d -s -j link show dev IFNAME`: the interface's JSON object.
pub fn link(ns: &NetNs, ifname: &str) -> serde_json::Value {
    let out = ns
        .ip(&["-d", "-s", "-j", "link", "show", "dev", ifname])
        .unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0].take()
}

/// The interface's received-packet count.
pub fn rx_packets(ns: &NetNs, ifname: &str) -> u64 {
    link(ns, ifname)["stats64"]["rx"]["packets"]
        .as_u64()
        .unwrap()
}

/// An Ethernet frame of `len` bytes (experimental EtherType 0x88b5) whose payload is derived
/// from `i`, so each frame of a test sequence differs from its neighbours.
pub fn numbered_frame(i: usize, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    for (j, b) in f[14..].iter_mut().enumerate() {
        *b = (i + j * 3) as u8;
    }
    f
}

/// Adds, over QMP, a listening Unix socket chardev `id` at `path`.
pub fn add_socket_chardev(qmp: &mut QmpClient, id: &str, path: &Path) {
    qmp.execute(
        "chardev-add",
        serde_json::json!({"id": id, "spec": format!("socket,path={},server=on,wait=off", path.display())}),
    )
    .unwrap();
}

/// Adds, over QMP, `filter-mirror` `m0` on netdev `t0` for `queue`, with `vnet_hdr_support`,
/// writing to a new listening chardev `mc0` at `path`; the mirror's records as they arrive
/// there (see [`vnet_records`]).
pub fn add_vnet_mirror(
    qmp: &mut QmpClient,
    queue: &str,
    path: &Path,
) -> std::sync::mpsc::Receiver<(Vec<u8>, Vec<u8>)> {
    add_socket_chardev(qmp, "mc0", path);
    qmp.execute(
        "object-add",
        serde_json::json!({"qom-type": "filter-mirror", "id": "m0", "netdev": "t0",
                           "queue": queue, "outdev": "mc0", "vnet_hdr_support": "on"}),
    )
    .unwrap();
    vnet_records(connect_chardev(path))
}

/// Connects to a listening chardev's Unix socket once it exists.
pub fn connect_chardev(path: &Path) -> UnixStream {
    wait_for(Duration::from_secs(10), "chardev socket", || path.exists());
    UnixStream::connect(path).unwrap()
}

/// Reads the records arriving on `s` on a thread of its own: their payloads, in order.
pub fn records(s: UnixStream) -> std::sync::mpsc::Receiver<Vec<u8>> {
    record_stream(s, false, |f| f.payload)
}

/// As [`records`] for QEMU's framing with `vnet_hdr_support`: each record's virtio-net header
/// and frame.
pub fn vnet_records(s: UnixStream) -> std::sync::mpsc::Receiver<(Vec<u8>, Vec<u8>)> {
    record_stream(s, true, |f| (f.vnet_hdr().to_vec(), f.l2().to_vec()))
}

fn record_stream<T: Send + 'static>(
    s: UnixStream,
    vnet_hdr: bool,
    take: fn(colo_proto::frame::Frame) -> T,
) -> std::sync::mpsc::Receiver<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut r = colo_proto::frame::FrameReader::new(s, vnet_hdr);
        while let Ok(Some(f)) = r.read_frame() {
            if tx.send(take(f)).is_err() {
                break;
            }
        }
    });
    rx
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates tap `name` inside namespace `ns` (from a thread that enters it), non-blocking, and
/// returns its fd: the test plays the far end of a link whose other end is a real stack.
pub fn tap_in(ns: &NetNs, name: &str) -> std::fs::File {
    let name = name.to_string();
    in_netns(ns, move || {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap();
        let mut req = IfReq {
            name: [0; 16],
            flags: 0x0002 | 0x1000, // IFF_TAP | IFF_NO_PI
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF with an ifreq-sized struct on our tun fd.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), 0x4004_54ca, &mut req as *mut IfReq) };
        assert!(r >= 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
        // SAFETY: F_SETFL on our own fd.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        f
    })
}

/// Makes the backend's tap `tap` in `ns` the guest's peer: 10.0.2.2/24, up (and `lo` up), and,
/// with `guest_mac`, the guest's 10.0.2.15 resolved to that MAC statically (no ARP needed).
pub fn tap_as_peer(ns: &NetNs, tap: &str, guest_mac: Option<&str>) {
    ns.ip(&["addr", "add", "10.0.2.2/24", "dev", tap]).unwrap();
    ns.ip(&["link", "set", tap, "up"]).unwrap();
    ns.ip(&["link", "set", "lo", "up"]).unwrap();
    if let Some(mac) = guest_mac {
        let neigh = [
            "neigh",
            "add",
            "10.0.2.15",
            "lladdr",
            mac,
            "dev",
            tap,
            "nud",
            "permanent",
        ];
        ns.ip(&neigh).unwrap();
    }
}
