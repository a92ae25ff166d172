//! The `comparer` binary in live mode, end to end over real sockets: matching frames are
//! released byte-exact on outdev, a mismatch raises the checkpoint event (QMP) and holds the
//! frames, `colo-checkpoint-done` releases them, `query-colo-compare` counts it all, peers that
//! go away are replaced, and QEMU's Xen-style `notify_dev` strings drive it too.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use colo_proto::frame::{Frame, FrameDecoder, encode};
use colo_proto::packet::build::{Link, udp_frame};
use colo_proto::qmp::QmpClient;
use serde_json::{Value, json};

const EVENT: &str = "COLO_COMPARE_CHECKPOINT_REQUEST";

struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Builds the comparer binary (same profile as this test) and returns its path.
fn comparer_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(build_comparer).clone()
}

fn build_comparer() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().to_path_buf(); // target/<profile>
    let profile_release = dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-q", "-p", "comparer", "--bin", "comparer"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    if profile_release {
        cmd.arg("--release");
    }
    let st = cmd.status().unwrap();
    assert!(st.success(), "building comparer failed");
    let bin = dir.join("comparer");
    assert!(bin.exists(), "{} missing", bin.display());
    bin
}

/// See [`colo_tests::free_tcp_port`]: below the ephemeral range, so no outgoing connection
/// takes it before the process under test binds it.
fn free_port() -> u16 {
    colo_tests::free_tcp_port().unwrap()
}

fn connect_unix_retry(p: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match UnixStream::connect(p) {
            Ok(s) => return s,
            Err(e) => assert!(Instant::now() < deadline, "connect {}: {e}", p.display()),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn connect_tcp_retry(port: u16) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => return s,
            Err(e) => assert!(Instant::now() < deadline, "connect :{port}: {e}"),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn accept_unix(l: &UnixListener, timeout: Duration) -> UnixStream {
    l.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + timeout;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                return s;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("accept: {e}"),
        }
        assert!(Instant::now() < deadline, "comparer did not connect outdev");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Frames read from a stream within a timeout.
struct Out<S> {
    s: S,
    dec: FrameDecoder,
}

impl<S: Read> Out<S> {
    fn new(s: S, vnet: bool) -> Self {
        Self {
            s,
            dec: FrameDecoder::new(vnet),
        }
    }
}

fn read_frame<S: Read>(
    o: &mut Out<S>,
    timeout: Duration,
    set: impl Fn(&S, Duration),
) -> Option<Frame> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 65536];
    loop {
        if let Some(f) = o.dec.next_frame().unwrap() {
            return Some(f);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        set(&o.s, left);
        match o.s.read(&mut buf) {
            Ok(0) => panic!("outdev closed by the comparer"),
            Ok(n) => o.dec.push(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return None;
            }
            Err(e) => panic!("read: {e}"),
        }
    }
}

fn read_unix(o: &mut Out<UnixStream>, t: Duration) -> Option<Frame> {
    read_frame(o, t, |s, d| s.set_read_timeout(Some(d)).unwrap())
}

fn send(w: &mut impl Write, eth: &[u8]) {
    let mut b = Vec::new();
    encode(&Frame::ethernet(eth.to_vec()), false, &mut b).unwrap();
    w.write_all(&b).unwrap();
}

fn udp(sport: u16, payload: &[u8]) -> Vec<u8> {
    let src = SocketAddr::from((Ipv4Addr::new(10, 0, 0, 1), sport));
    let dst = SocketAddr::from((Ipv4Addr::new(10, 0, 0, 2), 7));
    udp_frame(&Link::default(), src, dst, payload)
}

fn query(q: &mut QmpClient) -> Value {
    q.execute("query-colo-compare", json!({})).unwrap()
}

fn live(v: &Value, k: &str) -> u64 {
    v["live"][k]
        .as_u64()
        .unwrap_or_else(|| panic!("query-colo-compare lacks live.{k}: {v}"))
}

#[test]
fn live_comparer_end_to_end_over_sockets() {
    let bin = comparer_bin();
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let sec_port = free_port();
    let out_l = UnixListener::bind(p("out.sock")).unwrap();
    let child = Command::new(&bin)
        .arg("--primary_in")
        .arg(format!("unix:{},server=on", p("pin.sock").display()))
        .arg("--secondary_in")
        .arg(format!("tcp:127.0.0.1:{sec_port},server=on"))
        .arg("--outdev")
        .arg(format!(
            "socket,path={},reconnect=1",
            p("out.sock").display()
        ))
        .arg("--qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            p("qmp.sock").display()
        ))
        .args(["--compare_timeout", "60000", "--expired_scan_cycle", "1000"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut guard = ChildGuard(child);
    let mut q = QmpClient::connect_unix_retry(
        p("qmp.sock"),
        Instant::now() + Duration::from_secs(10),
        Duration::from_secs(10),
    )
    .unwrap();
    let mut pin = connect_unix_retry(&p("pin.sock"));
    let mut sin = connect_tcp_retry(sec_port);

    // 1. Matching frames are released byte-exact, in order.
    let frames: Vec<Vec<u8>> = (0..20u16)
        .map(|i| udp(1000 + i, &vec![i as u8; 10 + 70 * i as usize]))
        .collect();
    for f in &frames {
        send(&mut pin, f);
    }
    for f in &frames {
        send(&mut sin, f);
    }
    let mut out = Out::new(accept_unix(&out_l, Duration::from_secs(10)), false);
    for (i, f) in frames.iter().enumerate() {
        let got = read_unix(&mut out, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("frame {i} not released"));
        assert_eq!(got.payload, *f, "frame {i} altered");
    }

    // 2. A mismatching pair: checkpoint event with a reason, primary held.
    let held = udp(2000, b"primary says A");
    send(&mut pin, &held);
    send(&mut sin, &udp(2000, b"secondary says B"));
    let ev = q.wait_event(EVENT, Duration::from_secs(5)).unwrap();
    let reason = ev.data["reason"].as_str().unwrap_or_default().to_owned();
    assert_eq!(reason, "payload_differs", "event: {:?}", ev.data);
    assert!(
        ev.data["detail"]
            .as_str()
            .unwrap()
            .contains("differs at byte"),
        "{:?}",
        ev.data
    );
    assert_eq!(ev.data["id"], "comp0");
    assert!(
        read_unix(&mut out, Duration::from_millis(300)).is_none(),
        "mismatching frame released"
    );
    let st = query(&mut q);
    assert!(st["live"]["checkpoint_pending"].as_bool().unwrap());
    let by_reason = st["live"]["checkpoint_requests"].as_object().unwrap();
    assert!(
        by_reason.get(&reason).and_then(Value::as_u64).unwrap_or(0) >= 1,
        "{st}"
    );

    // 3. Checkpoint done: the held primary frame leaves, the secondary one is dropped.
    let r = q.execute("colo-checkpoint-done", json!({})).unwrap();
    assert_eq!(r["released"], 1, "{r}");
    let got = read_unix(&mut out, Duration::from_secs(5)).expect("held frame not released");
    assert_eq!(got.payload, held);

    // 4. Counters.
    let st = query(&mut q);
    assert_eq!(live(&st, "primary_frames_in"), 21, "{st}");
    assert_eq!(live(&st, "secondary_frames_in"), 21, "{st}");
    assert_eq!(live(&st, "frames_out"), 21, "{st}");
    assert_eq!(live(&st, "checkpoints_done"), 1, "{st}");
    assert!(!st["live"]["checkpoint_pending"].as_bool().unwrap());
    assert_eq!(st["live"]["connections"]["primary_in"], 1, "{st}");
    assert_eq!(st["live"]["connections"]["outdev"], 1, "{st}");
    assert_eq!(st["engine"]["matched"], 20, "{st}");
    assert_eq!(st["engine"]["checkpoints"]["payload_differs"], 1, "{st}");
    assert_eq!(st["engine"]["primary_queued"], 0, "{st}");
    assert_eq!(live(&st, "secondary_dropped"), 21, "{st}");

    // 5. Peers go away and come back: primary and secondary reconnect, outdev is reconnected
    //    by the comparer (client with reconnect=1), nothing is lost.
    drop(pin);
    drop(sin);
    drop(out);
    let mut pin = connect_unix_retry(&p("pin.sock"));
    let mut sin = connect_tcp_retry(sec_port);
    let again = udp(3000, b"after reconnect");
    send(&mut pin, &again);
    send(&mut sin, &again);
    let mut out = Out::new(accept_unix(&out_l, Duration::from_secs(10)), false);
    let got =
        read_unix(&mut out, Duration::from_secs(5)).expect("frame after reconnect not released");
    assert_eq!(got.payload, again);
    let st = query(&mut q);
    assert_eq!(st["live"]["connections"]["primary_in"], 2, "{st}");
    assert_eq!(st["live"]["connections"]["secondary_in"], 2, "{st}");
    assert_eq!(st["live"]["connections"]["outdev"], 2, "{st}");
    assert_eq!(live(&st, "frames_out"), 22, "{st}");

    // 6. quit ends the process.
    q.execute("quit", json!({})).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = guard.0.try_wait().unwrap() {
            assert!(st.success(), "comparer exited with {st}");
            break;
        }
        assert!(Instant::now() < deadline, "comparer did not quit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn live_comparer_speaks_qemu_notify_dev_strings() {
    let bin = comparer_bin();
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let out_l = UnixListener::bind(p("out.sock")).unwrap();
    let sock = |id: &str, n: &str, server: bool| {
        format!(
            "socket,id={id},path={}{}",
            p(n).display(),
            if server { ",server=on,wait=off" } else { "" }
        )
    };
    // The seed's spelling: -chardev definitions and a colo-compare object, vnet headers on.
    let child = Command::new(&bin)
        .args(["-chardev", &sock("pin", "pin.sock", true)])
        .args(["-chardev", &sock("sin", "sin.sock", true)])
        .args(["-chardev", &sock("out", "out.sock", false)])
        .args(["-chardev", &sock("ntf", "notify.sock", true)])
        .args(["-object", "iothread,id=it"])
        .args([
            "-object",
            "colo-compare,id=comp7,primary_in=pin,secondary_in=sin,outdev=out,notify_dev=ntf,iothread=it,vnet_hdr_support=on,compare_timeout=60000",
        ])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let _guard = ChildGuard(child);
    let mut ntf = connect_unix_retry(&p("notify.sock"));
    let mut pin = connect_unix_retry(&p("pin.sock"));
    let mut sin = connect_unix_retry(&p("sin.sock"));
    // Controller → comparer messages carry the vnet field (vnet_hdr_support=on), as for QEMU.
    let ctl = |s: &mut UnixStream, msg: &str| {
        let mut b = Vec::new();
        encode(&Frame::ethernet(msg.as_bytes().to_vec()), true, &mut b).unwrap();
        s.write_all(&b).unwrap();
    };
    // Comparer → controller messages never do.
    let mut ntf_in = Out::new(ntf.try_clone().unwrap(), false);
    ctl(&mut ntf, "COLO_USERSPACE_PROXY_INIT");
    let r = read_unix(&mut ntf_in, Duration::from_secs(5)).expect("no init reply");
    assert_eq!(r.payload, b"COLO_COMPARE_GET_XEN_INIT");

    let vnet_frame = |eth: Vec<u8>| {
        let mut payload = vec![0u8; 12];
        payload.extend_from_slice(&eth);
        Frame {
            vnet_hdr_len: 12,
            payload,
        }
    };
    let sendv = |s: &mut UnixStream, f: &Frame| {
        let mut b = Vec::new();
        encode(f, true, &mut b).unwrap();
        s.write_all(&b).unwrap();
    };
    // A matching pair first: released intact with its vnet header.
    let mut out = Out::new(accept_unix(&out_l, Duration::from_secs(10)), true);
    let ok = vnet_frame(udp(3999, b"same on both"));
    sendv(&mut pin, &ok);
    sendv(&mut sin, &ok);
    let got = read_unix(&mut out, Duration::from_secs(5)).expect("matching frame not released");
    assert_eq!(got, ok);

    let held = vnet_frame(udp(4000, b"AAAA"));
    sendv(&mut pin, &held);
    sendv(&mut sin, &vnet_frame(udp(4000, b"BBBB")));
    let r = read_unix(&mut ntf_in, Duration::from_secs(5)).expect("no DO_CHECKPOINT");
    assert_eq!(r.payload, b"DO_CHECKPOINT");
    assert!(
        read_unix(&mut out, Duration::from_millis(300)).is_none(),
        "held frame leaked"
    );
    ctl(&mut ntf, "COLO_CHECKPOINT");
    let got = read_unix(&mut out, Duration::from_secs(5)).expect("COLO_CHECKPOINT did not flush");
    assert_eq!(got, held, "vnet header and frame must come back intact");
}

#[test]
fn live_comparer_drops_a_peer_that_sends_an_impossible_record_and_takes_the_next() {
    let bin = comparer_bin();
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let child = Command::new(&bin)
        .arg("--primary_in")
        .arg(format!("unix:{},server=on", p("pin.sock").display()))
        .arg("--secondary_in")
        .arg(format!("unix:{},server=on", p("sin.sock").display()))
        .arg("--outdev")
        .arg(format!("unix:{},server=on", p("out.sock").display()))
        .arg("--qmp")
        .arg(p("qmp.sock"))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut guard = ChildGuard(child);
    let mut q = QmpClient::connect_unix_retry(
        p("qmp.sock"),
        Instant::now() + Duration::from_secs(10),
        Duration::from_secs(10),
    )
    .unwrap();
    let mut bad = connect_unix_retry(&p("pin.sock"));
    // A record longer than QEMU's 69632-byte maximum: the stream cannot be trusted any more.
    bad.write_all(&(70_000u32).to_be_bytes()).unwrap();
    bad.write_all(&[0u8; 64]).unwrap();
    let mut eof = [0u8; 1];
    bad.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(
        bad.read(&mut eof).unwrap(),
        0,
        "the comparer must hang up on that peer"
    );
    let st = query(&mut q);
    assert_eq!(live(&st, "link_errors"), 1, "{st}");
    assert_eq!(live(&st, "primary_frames_in"), 0, "{st}");
    // The next peer is served normally.
    let mut pin = connect_unix_retry(&p("pin.sock"));
    let mut sin = connect_unix_retry(&p("sin.sock"));
    let mut out = Out::new(connect_unix_retry(&p("out.sock")), false);
    let f = udp(7000, b"after a bad peer");
    send(&mut pin, &f);
    send(&mut sin, &f);
    let got = read_unix(&mut out, Duration::from_secs(5)).expect("not released after a bad peer");
    assert_eq!(got.payload, f);
    assert!(guard.0.try_wait().unwrap().is_none(), "comparer died");
}
