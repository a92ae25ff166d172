//! Fuzzes the NBD server's TCP path, the one production uses (`NbdServer::start` →
//! `serve_tcp`): replies written straight to the socket, lone small writes run inline, the poll
//! after an inline write receiving into a carry that runs a lone whole request or feeds the
//! buffered reader. One process-wide multi-thread runtime (2 workers) and one server on
//! 127.0.0.1:0 with two 1 MiB RAM exports, "disk" (writable) and "ro"; each input is one
//! connection.
//!
//! Input: byte 0 picks the mode (bits 0-1: 0 EXPORT_NAME, 1 OPT_GO, 2 raw bytes including the
//! negotiation, 3 EXPORT_NAME without NO_ZEROES; bit 2: the "ro" export; bit 3: end with a
//! reset instead of a half-close), byte 1 the 4 KiB block the probe uses, then chunks: a
//! little-endian u16 header (low 13 bits: length, high 3 bits: a pause of 28 µs each before the
//! chunk) and the chunk's bytes. The pauses let the fuzzer decide where the server's poll sees
//! partial, whole and combined requests.
//!
//! Checked: the server never panics; it keeps reading, and closes within 10 s of the client's
//! half-close; with a valid handshake, every reply is a simple reply carrying a cookie the
//! client sent (no more replies per cookie than requests), and writes whose outcome is known (a
//! cookie used once, a range nothing else of the input wrote, answered without error) read
//! back; afterwards a fresh connection writes 4 KiB and reads the same data back, and every
//! socket the connections took is closed again (also after a reset).
#![no_main]

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc, OnceLock, RwLock,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use libfuzzer_sys::fuzz_target;
use vhost_blk_colo::{
    block::mem::MemNode,
    nbd::{Export, NbdServer, proto::*},
};

const EXPORT_SIZE: usize = 1 << 20;
/// How long the server may take to close after the client's half-close, or to answer.
const BOUND: Duration = Duration::from_secs(10);

struct Fixture {
    _rt: tokio::runtime::Runtime,
    _server: NbdServer,
    addr: SocketAddr,
    /// Open descriptors with no connection open.
    fd_baseline: usize,
    probes: AtomicU64,
}

static FIXTURE: OnceLock<Fixture> = OnceLock::new();

fn fixture() -> &'static Fixture {
    FIXTURE.get_or_init(|| {
        // libFuzzer's main does not set this up as Rust's does: a write to a connection the
        // server closed must be an error here, not a signal.
        // SAFETY: installing SIG_IGN for SIGPIPE.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let node = Arc::new(MemNode::new(EXPORT_SIZE));
        let mut t = BTreeMap::new();
        t.insert(
            "disk".to_string(),
            Export {
                node: node.clone(),
                writable: true,
                description: String::new(),
            },
        );
        t.insert(
            "ro".to_string(),
            Export {
                node,
                writable: false,
                description: String::new(),
            },
        );
        let server = NbdServer::start(
            rt.handle(),
            SocketAddr::from(([127, 0, 0, 1], 0)),
            Arc::new(RwLock::new(t)),
        )
        .expect("NBD server");
        let addr = server.local_addr();
        probe(addr, 0, 0, &[]).expect("first probe");
        // The probe's connection closes on the server's side shortly after ours.
        let t0 = Instant::now();
        let mut fd_baseline = open_fds();
        while t0.elapsed() < Duration::from_millis(200) {
            fd_baseline = fd_baseline.min(open_fds());
            std::thread::sleep(Duration::from_millis(5));
        }
        Fixture {
            _rt: rt,
            _server: server,
            addr,
            fd_baseline,
            probes: AtomicU64::new(1),
        }
    })
}

/// Open socket descriptors (only sockets: libFuzzer's symbolizer opens pipes as it goes).
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// The open descriptors and this process's TCP sockets, for reading a leak.
fn describe_fds() -> String {
    let mut out = String::new();
    if let Ok(d) = std::fs::read_dir("/proc/self/fd") {
        for e in d.flatten() {
            let target = std::fs::read_link(e.path()).unwrap_or_default();
            out += &format!("fd {:?} -> {}\n", e.file_name(), target.display());
        }
    }
    if let Ok(o) = std::process::Command::new("ss").args(["-tanpi"]).output() {
        let pid = format!("pid={},", std::process::id());
        for l in String::from_utf8_lossy(&o.stdout).lines() {
            if l.contains(&pid) {
                out += l;
                out += "\n";
            }
        }
    }
    out
}

fn debug() -> bool {
    static D: OnceLock<bool> = OnceLock::new();
    *D.get_or_init(|| std::env::var_os("FUZZ_DEBUG").is_some())
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Handshake {
    ExportName { zeroes: bool },
    Go,
}

fn read_exact(s: &mut TcpStream, n: usize, what: &str) -> Result<Vec<u8>, String> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).map_err(|e| format!("{what}: {e}"))?;
    Ok(b)
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// A client's fixed-newstyle negotiation for `name`; the server is left in transmission.
fn handshake(s: &mut TcpStream, how: Handshake, name: &str) -> Result<(), String> {
    let g = read_exact(s, 18, "greeting")?;
    if be_u64(&g) != NBDMAGIC || be_u64(&g[8..]) != IHAVEOPT {
        return Err(format!("bad greeting {g:02x?}"));
    }
    let zeroes = matches!(how, Handshake::ExportName { zeroes: true });
    let cflags = CFLAG_FIXED_NEWSTYLE | if zeroes { 0 } else { CFLAG_NO_ZEROES };
    let mut out = cflags.to_be_bytes().to_vec();
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    match how {
        Handshake::ExportName { .. } => {
            out.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
            out.extend_from_slice(&(name.len() as u32).to_be_bytes());
            out.extend_from_slice(name.as_bytes());
            s.write_all(&out)
                .map_err(|e| format!("sending EXPORT_NAME: {e}"))?;
            read_exact(s, 10 + if zeroes { 124 } else { 0 }, "EXPORT_NAME answer")?;
        }
        Handshake::Go => {
            out.extend_from_slice(&OPT_GO.to_be_bytes());
            out.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
            out.extend_from_slice(&(name.len() as u32).to_be_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&0u16.to_be_bytes());
            s.write_all(&out).map_err(|e| format!("sending GO: {e}"))?;
            loop {
                let h = read_exact(s, 20, "GO reply")?;
                if be_u64(&h) != REPLY_MAGIC || be_u32(&h[8..]) != OPT_GO {
                    return Err(format!("bad GO reply {h:02x?}"));
                }
                let ty = be_u32(&h[12..]);
                read_exact(s, be_u32(&h[16..]) as usize, "GO reply data")?;
                if ty == REP_ACK {
                    break;
                }
                if ty & REP_FLAG_ERROR != 0 {
                    return Err(format!("GO refused: {ty:#x}"));
                }
            }
        }
    }
    Ok(())
}

fn request(cmd: u16, cookie: u64, offset: u64, len: u32) -> [u8; REQUEST_LEN] {
    Request {
        flags: 0,
        cmd,
        cookie,
        offset,
        len,
    }
    .encode()
}

fn simple_reply(s: &mut TcpStream, cookie: u64, what: &str) -> Result<(), String> {
    let r = read_exact(s, 16, what)?;
    if be_u32(&r) != SIMPLE_REPLY_MAGIC || be_u64(&r[8..]) != cookie || be_u32(&r[4..]) != 0 {
        return Err(format!(
            "{what}: reply {r:02x?}, wanted cookie {cookie:#x}, no error"
        ));
    }
    Ok(())
}

/// A fresh connection: handshake, a 4 KiB WRITE at `block`, a READ of it, compared, DISC; the
/// server must then close.
fn probe(addr: SocketAddr, block: u64, n: u64, written: &[Written]) -> Result<(), String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("probe: connect: {e}"))?;
    s.set_read_timeout(Some(BOUND)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(BOUND))
        .map_err(|e| e.to_string())?;
    let _ = s.set_nodelay(true);
    handshake(&mut s, Handshake::ExportName { zeroes: false }, "disk")
        .map_err(|e| format!("probe: {e}"))?;
    // What the fuzzed connection wrote successfully, where nothing else of it wrote, reads back.
    for (i, w) in written.iter().enumerate() {
        let cookie = 0x5052_4f42_0000_0000 | i as u64;
        s.write_all(&request(CMD_READ, cookie, w.offset, w.data.len() as u32))
            .map_err(|e| format!("probe: READ: {e}"))?;
        simple_reply(&mut s, cookie, "probe: READ reply")?;
        let got = read_exact(&mut s, w.data.len(), "probe: READ data")?;
        if got != w.data {
            return Err(format!(
                "data mix-up: the {} bytes the fuzzed connection's request {:#x} wrote at {} \
                 (answered without error) read back differently",
                w.data.len(),
                w.cookie,
                w.offset
            ));
        }
    }
    let offset = block * 4096;
    let mut x = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let data: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut out = request(CMD_WRITE, 0x5052_4f42_4501, offset, 4096).to_vec();
    out.extend_from_slice(&data);
    s.write_all(&out)
        .map_err(|e| format!("probe: WRITE: {e}"))?;
    simple_reply(&mut s, 0x5052_4f42_4501, "probe: WRITE reply")?;
    s.write_all(&request(CMD_READ, 0x5052_4f42_4502, offset, 4096))
        .map_err(|e| format!("probe: READ: {e}"))?;
    simple_reply(&mut s, 0x5052_4f42_4502, "probe: READ reply")?;
    let got = read_exact(&mut s, 4096, "probe: READ data")?;
    if got != data {
        return Err(format!(
            "probe: block {block} read back differs from what was written"
        ));
    }
    s.write_all(&request(CMD_DISC, 0x5052_4f42_4503, 0, 0))
        .map_err(|e| format!("probe: DISC: {e}"))?;
    let _ = s.shutdown(Shutdown::Write);
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) if rest.is_empty() => Ok(()),
        Ok(_) => Err(format!("probe: {} bytes after DISC", rest.len())),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            Err("probe: server hung: connection not closed after DISC".into())
        }
        Err(_) => Ok(()),
    }
}

/// A WRITE or WRITE_ZEROES of the fuzzed stream: where, what it leaves (zeroes for
/// WRITE_ZEROES), its cookie.
struct Written {
    cookie: u64,
    offset: u64,
    data: Vec<u8>,
}

/// What each cookie's successful reply carries (READ data length, else 0), one entry per
/// request the server will read: the server's own parse. Also the writes whose outcome is
/// known once they succeed: a cookie used once, a range within the export that no other
/// WRITE, WRITE_ZEROES or TRIM of the stream touches.
fn expected_replies(stream: &[u8]) -> (HashMap<u64, Vec<u64>>, Vec<Written>) {
    let mut m: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut writes: Vec<(u16, Written)> = Vec::new();
    let mut rest = stream;
    while let Some(h) = rest.get(..REQUEST_LEN) {
        let Ok(hdr) = <&[u8; REQUEST_LEN]>::try_from(h) else {
            break;
        };
        let Ok(req) = Request::parse(hdr) else { break };
        rest = &rest[REQUEST_LEN..];
        if req.cmd == CMD_DISC {
            break;
        }
        let data = if req.cmd == CMD_READ {
            u64::from(req.len)
        } else {
            0
        };
        m.entry(req.cookie).or_default().push(data);
        let payload = if req.cmd == CMD_WRITE {
            if req.len > MAX_REQUEST {
                break;
            }
            let Some((p, r)) = rest.split_at_checked(req.len as usize) else {
                break;
            };
            rest = r;
            p.to_vec()
        } else {
            vec![0u8; (req.len as usize).min(EXPORT_SIZE + 1)]
        };
        if matches!(req.cmd, CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM) {
            writes.push((
                req.cmd,
                Written {
                    cookie: req.cookie,
                    offset: req.offset,
                    data: payload,
                },
            ));
        }
    }
    let end = |w: &Written| w.offset.saturating_add(w.data.len() as u64);
    let known = writes
        .iter()
        .enumerate()
        .filter(|(i, (cmd, w))| {
            *cmd != CMD_TRIM
                && !w.data.is_empty()
                && end(w) <= EXPORT_SIZE as u64
                && m.get(&w.cookie).is_some_and(|l| l.len() == 1)
                && writes
                    .iter()
                    .enumerate()
                    .all(|(j, (_, o))| j == *i || end(o) <= w.offset || o.offset >= end(w))
        })
        .map(|(_, (_, w))| Written {
            cookie: w.cookie,
            offset: w.offset,
            data: w.data.clone(),
        })
        .collect();
    (m, known)
}

/// Reads the server's replies until it closes; with `expect`, checks them.
fn drain(
    mut s: TcpStream,
    mut expect: Option<HashMap<u64, Vec<u64>>>,
) -> Result<HashSet<u64>, String> {
    let mut problem = None;
    let mut succeeded = HashSet::new();
    let mut checked = 0u32;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if let Some(m) = expect.as_mut() {
            let mut r = [0u8; 16];
            match s.read_exact(&mut r) {
                Ok(()) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err("drain: no close".into());
                }
                Err(_) => break,
            }
            if be_u32(&r) != SIMPLE_REPLY_MAGIC {
                problem = Some(format!("reply with a bad magic: {r:02x?}"));
                expect = None;
                continue;
            }
            let cookie = be_u64(&r[8..]);
            let Some(lens) = m.get_mut(&cookie).filter(|l| !l.is_empty()) else {
                problem = Some(format!(
                    "reply carries cookie {cookie:#x}, which the client never sent (or \
                     more replies than requests)"
                ));
                expect = None;
                continue;
            };
            let ok = be_u32(&r[4..]) == 0;
            if ok {
                succeeded.insert(cookie);
            }
            let data = if !ok {
                0
            } else if lens.iter().all(|&l| l == lens[0]) {
                lens[0]
            } else {
                // Same cookie, different READ lengths: which one this answers is unknown.
                expect = None;
                continue;
            };
            lens.pop();
            checked += 1;
            if data > 0 {
                let mut d = (&mut s).take(data);
                match std::io::copy(&mut d, &mut std::io::sink()) {
                    Ok(n) if n == data => {}
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        return Err("drain: no close".into());
                    }
                    _ => break,
                }
            }
        } else {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err("drain: no close".into());
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }
    if debug() {
        eprintln!("replies checked: {checked}");
    }
    problem.map_or(Ok(succeeded), Err)
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let mode = data.first().copied().unwrap_or(0);
    let block = u64::from(data.get(1).copied().unwrap_or(0)) % (EXPORT_SIZE as u64 / 4096);
    let mut chunks: Vec<(Duration, &[u8])> = Vec::new();
    let mut rest = data.get(2..).unwrap_or_default();
    while let Some(h) = rest.get(..2) {
        let h = u16::from_le_bytes([h[0], h[1]]);
        let len = usize::from(h & 0x1fff).min(rest.len() - 2);
        chunks.push((
            Duration::from_micros(u64::from(h >> 13) * 28),
            &rest[2..2 + len],
        ));
        rest = &rest[2 + len..];
    }
    let name = if mode & 4 != 0 { "ro" } else { "disk" };
    let abort = mode & 8 != 0;
    let how = match mode & 3 {
        0 => Some(Handshake::ExportName { zeroes: false }),
        1 => Some(Handshake::Go),
        3 => Some(Handshake::ExportName { zeroes: true }),
        _ => None,
    };
    if debug() {
        eprintln!(
            "mode {how:?} {name}, probe block {block}, {} chunks, abort {abort}",
            chunks.len()
        );
    }

    let mut s = TcpStream::connect(f.addr).expect("connect");
    let _ = s.set_nodelay(true);
    s.set_read_timeout(Some(BOUND * 2)).expect("timeout");
    s.set_write_timeout(Some(BOUND)).expect("timeout");
    let (expect, mut written) = match how {
        Some(how) => {
            if let Err(e) = handshake(&mut s, how, name) {
                panic!("valid handshake failed: {e}");
            }
            let stream: Vec<u8> = chunks.iter().flat_map(|(_, c)| c.iter().copied()).collect();
            let (m, w) = expected_replies(&stream);
            (Some(m), if name == "disk" { w } else { Vec::new() })
        }
        None => (None, Vec::new()),
    };
    let (tx, rx) = mpsc::channel();
    let rd = s.try_clone().expect("clone");
    let drainer = std::thread::spawn(move || {
        let _ = tx.send(drain(rd, expect));
    });
    for (pause, c) in &chunks {
        if !pause.is_zero() {
            std::thread::sleep(*pause);
        }
        match s.write_all(c) {
            Ok(()) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("server hung: stopped reading for {BOUND:?}")
            }
            // The server closed (a protocol error ends the connection).
            Err(_) => break,
        }
    }
    if abort {
        // A reset instead of a close: SO_LINGER 0, the drain thread woken by SHUT_RD (which
        // sends nothing), then both descriptors closed. The server may still be running
        // requests when the probe starts, so nothing is read back.
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt on our open socket with a pointer to a linger and its size.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&raw const linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        let _ = s.shutdown(Shutdown::Read);
        match rx.recv_timeout(BOUND) {
            Ok(Err(e)) if !e.starts_with("drain: no close") => panic!("{e}"),
            Ok(_) => {}
            Err(_) => panic!("drain thread not woken by SHUT_RD"),
        }
        written.clear();
    } else {
        let _ = s.shutdown(Shutdown::Write);
        match rx.recv_timeout(BOUND) {
            Ok(Ok(succeeded)) => written.retain(|w| succeeded.contains(&w.cookie)),
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => {
                panic!("server hung: connection not closed {BOUND:?} after the client's half-close")
            }
        }
    }
    let _ = drainer.join();
    drop(s);

    let n = f.probes.fetch_add(1, Ordering::Relaxed);
    if debug() {
        eprintln!("writes read back: {}", written.len());
    }
    if let Err(e) = probe(f.addr, block, n, &written) {
        panic!("{e}");
    }
    // Both connections' descriptors (the server's socket and its writer's duplicate) close.
    let t0 = Instant::now();
    loop {
        let fds = open_fds();
        if fds <= f.fd_baseline {
            break;
        }
        if t0.elapsed() > BOUND {
            eprintln!("{}", describe_fds());
            panic!(
                "leaked connection: {fds} sockets open, {} with no connection",
                f.fd_baseline
            );
        }
        std::thread::sleep(Duration::from_micros(200));
    }
});
