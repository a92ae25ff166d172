//! Helpers for vmm-min state, snapshot and migration tests (`tests/tests/vmm_migrate_host.rs`,
//! `vmm_lab_migrate.rs`, `bench/migrate`).
//!
//! - [`COUNTER_GUEST`] + [`tiny_elf`]: a tiny 64-bit guest that prints a hexadecimal counter on
//!   COM1 (one line about every 40 M TSC cycles) and dirties 32 pages of an 8 MiB region per
//!   line; [`counter_lines`] checks that console output is one unbroken sequence, so source +
//!   destination output of a migrated guest can be checked for continuity.
//! - [`vmm_feature`]: whether the built `vmm-min` has a command-line option (run-time detection
//!   of features being built in parallel).
//! - [`StreamProxy`]: a TCP proxy that forwards one connection and records the bytes sent by
//!   the client (the migration stream), optionally throttled.
//! - [`feed_stream`]: sends crafted bytes to a `--incoming` listener over a plain `TcpStream`.
//! - [`in_netns`] / [`connect_in`]: sockets created inside a network namespace (the calling
//!   thread does not change namespace).
//! - [`wait_migration`]: polls `query-migrate` until a final status.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::QmpClient;

/// The counter guest (x86-64 machine code, loaded at 0x100000, entered in long mode with the
/// first 4 GiB identity-mapped, as vmm-min does for an ELF kernel). Source (GNU as, Intel):
///
/// ```text
/// start: xor r8, r8              ; line counter
///        xor r9, r9              ; page index
/// next:  mov ecx, 32             ; dirty 32 pages of the 8 MiB region at 0x400000
/// t:     mov rax, r9
///        and eax, 2047
///        shl rax, 12
///        add rax, 0x400000
///        mov [rax], r8
///        mov [rax+8], r9
///        inc r9
///        dec ecx
///        jnz t
///        mov edx, 0x3f8          ; print r8 (low 32 bits) as 8 hex digits and '\n'
///        mov ebx, 8
///        mov rsi, r8
///        shl rsi, 32
/// h:     rol rsi, 4
///        mov eax, esi
///        and eax, 15
///        cmp al, 10
///        jb d
///        add al, 39
/// d:     add al, 48
///        out dx, al
///        dec ebx
///        jnz h
///        mov al, 10
///        out dx, al
///        inc r8
///        rdtsc                   ; wait 40 M TSC cycles
///        shl rdx, 32
///        or rax, rdx
///        mov rdi, rax
///        add rdi, 40000000
/// w:     pause
///        rdtsc
///        shl rdx, 32
///        or rax, rdx
///        cmp rax, rdi
///        jb w
///        jmp next
/// ```
pub const COUNTER_GUEST: &[u8] = &[
    0x4d, 0x31, 0xc0, 0x4d, 0x31, 0xc9, 0xb9, 0x20, 0x00, 0x00, 0x00, 0x4c, 0x89, 0xc8, 0x25, 0xff,
    0x07, 0x00, 0x00, 0x48, 0xc1, 0xe0, 0x0c, 0x48, 0x05, 0x00, 0x00, 0x40, 0x00, 0x4c, 0x89, 0x00,
    0x4c, 0x89, 0x48, 0x08, 0x49, 0xff, 0xc1, 0xff, 0xc9, 0x75, 0xe0, 0xba, 0xf8, 0x03, 0x00, 0x00,
    0xbb, 0x08, 0x00, 0x00, 0x00, 0x4c, 0x89, 0xc6, 0x48, 0xc1, 0xe6, 0x20, 0x48, 0xc1, 0xc6, 0x04,
    0x89, 0xf0, 0x83, 0xe0, 0x0f, 0x3c, 0x0a, 0x72, 0x02, 0x04, 0x27, 0x04, 0x30, 0xee, 0xff, 0xcb,
    0x75, 0xea, 0xb0, 0x0a, 0xee, 0x49, 0xff, 0xc0, 0x0f, 0x31, 0x48, 0xc1, 0xe2, 0x20, 0x48, 0x09,
    0xd0, 0x48, 0x89, 0xc7, 0x48, 0x81, 0xc7, 0x00, 0x5a, 0x62, 0x02, 0xf3, 0x90, 0x0f, 0x31, 0x48,
    0xc1, 0xe2, 0x20, 0x48, 0x09, 0xd0, 0x48, 0x39, 0xf8, 0x72, 0xf0, 0xeb, 0x89,
];

/// An ELF64 executable with one PT_LOAD of `code` at physical 0x100000 and its entry there.
pub fn tiny_elf(code: &[u8]) -> Vec<u8> {
    let mut e = Vec::new();
    e.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&0x10_0000u64.to_le_bytes()); // entry
    e.extend_from_slice(&64u64.to_le_bytes()); // phoff
    e.extend_from_slice(&0u64.to_le_bytes()); // shoff
    e.extend_from_slice(&0u32.to_le_bytes()); // flags
    e.extend_from_slice(&64u16.to_le_bytes()); // ehsize
    e.extend_from_slice(&56u16.to_le_bytes()); // phentsize
    e.extend_from_slice(&1u16.to_le_bytes()); // phnum
    e.extend_from_slice(&64u16.to_le_bytes()); // shentsize
    e.extend_from_slice(&0u16.to_le_bytes()); // shnum
    e.extend_from_slice(&0u16.to_le_bytes()); // shstrndx
    let off = 0x1000u64;
    e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e.extend_from_slice(&5u32.to_le_bytes()); // R+X
    e.extend_from_slice(&off.to_le_bytes());
    e.extend_from_slice(&0x10_0000u64.to_le_bytes()); // vaddr
    e.extend_from_slice(&0x10_0000u64.to_le_bytes()); // paddr
    e.extend_from_slice(&(code.len() as u64).to_le_bytes());
    e.extend_from_slice(&(code.len() as u64).to_le_bytes());
    e.extend_from_slice(&0x1000u64.to_le_bytes());
    e.resize(off as usize, 0);
    e.extend_from_slice(code);
    e
}

/// Checks that `text` (console output of the counter guest, possibly several consoles
/// concatenated in order) is `00000000\n00000001\n…` without gap, repeat or garbage; a last,
/// unterminated line must be a prefix of the next counter. Returns the number of complete
/// lines (the next counter value).
pub fn counter_lines(text: &str) -> Result<u64> {
    let mut n = 0u64;
    let mut rest = text;
    while let Some(pos) = rest.find('\n') {
        let line = &rest[..pos];
        let want = format!("{:08x}", n & 0xffff_ffff);
        if line != want {
            bail!("counter line {n}: expected {want:?}, found {line:?}");
        }
        n += 1;
        rest = &rest[pos + 1..];
    }
    let want = format!("{:08x}", n & 0xffff_ffff);
    if !want.starts_with(rest) {
        bail!("counter line {n} (unterminated): expected a prefix of {want:?}, found {rest:?}");
    }
    Ok(n)
}

/// The output of `vmm-min --help` (empty if it cannot run).
pub fn vmm_help(bin: &Path) -> String {
    Command::new(bin)
        .arg("--help")
        .stdin(Stdio::null())
        .output()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s
        })
        .unwrap_or_default()
}

/// Whether `vmm-min --help` mentions the option `flag` (e.g. `"--incoming"`).
pub fn vmm_feature(bin: &Path, flag: &str) -> bool {
    vmm_help(bin).contains(flag)
}

/// Whether a QMP error means "no such command" (QEMU's `CommandNotFound` class).
pub fn is_command_not_found(e: &crate::QmpClientError) -> bool {
    e.qmp_error().is_some_and(|q| {
        let s = format!("{q:?}");
        s.contains("CommandNotFound")
    })
}

/// A TCP proxy on 127.0.0.1 for one connection: forwards client → target (recording those
/// bytes) and target → client. `throttle` (bytes per second) slows the client → target
/// direction. When either side goes away (or on [`StreamProxy::cut`] or drop) both sockets are
/// closed abortively (RST), as a killed peer's kernel would, so the other side's writes fail.
pub struct StreamProxy {
    addr: SocketAddr,
    captured: Arc<Mutex<Vec<u8>>>,
    forwarded: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
    socks: Arc<Mutex<Vec<Arc<TcpStream>>>>,
    acceptor: Option<JoinHandle<()>>,
}

/// SO_LINGER {on, 0}: close() then resets the connection.
fn set_abortive_close(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt(2) on a socket fd we own, with a pointer to a live `linger` of the
    // size we pass.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const l).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

impl StreamProxy {
    /// Listens on 127.0.0.1:0 and forwards the first connection to `target`.
    pub fn start(target: SocketAddr, throttle: Option<u64>) -> Result<StreamProxy> {
        let l = TcpListener::bind("127.0.0.1:0").context("proxy bind")?;
        let addr = l.local_addr()?;
        let captured = Arc::new(Mutex::new(Vec::new()));
        let forwarded = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let socks = Arc::new(Mutex::new(Vec::<Arc<TcpStream>>::new()));
        let (cap, fw, dn, sk) = (
            Arc::clone(&captured),
            Arc::clone(&forwarded),
            Arc::clone(&done),
            Arc::clone(&socks),
        );
        let acceptor = std::thread::spawn(move || {
            let run = || {
                let (client, _) = l.accept().ok()?;
                if dn.load(Ordering::SeqCst) {
                    return None;
                }
                let server = TcpStream::connect(target).ok()?;
                set_abortive_close(&client);
                set_abortive_close(&server);
                let (client, server) = (Arc::new(client), Arc::new(server));
                {
                    let mut v = sk.lock().unwrap_or_else(|p| p.into_inner());
                    v.push(Arc::clone(&client));
                    v.push(Arc::clone(&server));
                }
                let (c2, s2) = (Arc::clone(&client), Arc::clone(&server));
                let back = std::thread::spawn(move || pump(&s2, &c2, None, None, None));
                pump(&client, &server, Some(&cap), Some(&fw), throttle);
                let _ = back.join();
                Some(())
            };
            let _ = run();
            sk.lock().unwrap_or_else(|p| p.into_inner()).clear();
            dn.store(true, Ordering::SeqCst);
        });
        Ok(StreamProxy {
            addr,
            captured,
            forwarded,
            done,
            socks,
            acceptor: Some(acceptor),
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `tcp:127.0.0.1:PORT` for `migrate`.
    pub fn uri(&self) -> String {
        format!("tcp:{}", self.addr)
    }

    /// Bytes forwarded client → target so far.
    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(Ordering::SeqCst)
    }

    /// Whether the connection has ended (both directions).
    pub fn finished(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }

    /// Waits until the connection has ended; then returns everything the client sent.
    pub fn wait_captured(&mut self, deadline: Instant) -> Result<Vec<u8>> {
        crate::wait_until(deadline, "the proxied connection to end", || {
            self.finished()
        })?;
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
        Ok(self.captured())
    }

    /// What the client sent so far.
    pub fn captured(&self) -> Vec<u8> {
        self.captured
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Ends the connection now: both peers see it reset.
    pub fn cut(&self) {
        for s in self.socks.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for StreamProxy {
    fn drop(&mut self) {
        self.cut();
        if !self.finished() {
            self.done.store(true, Ordering::SeqCst);
            // Unblock a pending accept.
            let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        }
    }
}

fn pump(
    from: &TcpStream,
    to: &TcpStream,
    cap: Option<&Mutex<Vec<u8>>>,
    count: Option<&AtomicU64>,
    throttle: Option<u64>,
) {
    let t0 = Instant::now();
    let mut total = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    let chunk = throttle.map_or(buf.len(), |bps| {
        usize::try_from((bps / 20).clamp(512, 64 * 1024)).unwrap_or(4096)
    });
    let (mut from_r, mut to_w) = (from, to);
    loop {
        let n = match from_r.read(&mut buf[..chunk]) {
            Ok(0) => {
                // An orderly end of this direction: pass it on, the other may carry on.
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Err(_) => break,
            Ok(n) => n,
        };
        if let Some(c) = cap {
            c.lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(&buf[..n]);
        }
        if to_w.write_all(&buf[..n]).is_err() {
            break;
        }
        total += n as u64;
        if let Some(c) = count {
            c.store(total, Ordering::SeqCst);
        }
        if let Some(bps) = throttle {
            let due = Duration::from_secs_f64(total as f64 / bps.max(1) as f64);
            let el = t0.elapsed();
            if due > el {
                std::thread::sleep(due - el);
            }
        }
    }
    // One side failed: end both, so the other pump and both peers see it.
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// Connects to `addr` (retrying until `deadline`), sends `bytes`, closes the sending side and
/// reads until the peer closes (or 10 s pass). Errors while writing are returned: a destination
/// may close early when it refuses a stream, which is fine for callers that only care about
/// the destination's verdict.
pub fn feed_stream(addr: SocketAddr, bytes: &[u8], deadline: Instant) -> Result<()> {
    let mut s = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => {
                return Err(e).with_context(|| format!("connect {addr}"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let res = s.write_all(bytes).context("write the stream");
    let _ = s.shutdown(Shutdown::Write);
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    res
}

/// Runs `f` on a new thread that has joined the network namespace `ns` (a name under
/// `/run/netns`, as `ip netns add` makes it). Sockets created there stay in that namespace and
/// can be used from any thread.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let path = format!("/run/netns/{ns}");
    let file = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
    std::thread::spawn(move || -> Result<T> {
        use std::os::fd::AsRawFd;
        // SAFETY: setns(2) on a valid namespace fd we own; it changes only this thread's
        // network namespace and touches no memory.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            bail!("setns {path}: {}", std::io::Error::last_os_error());
        }
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in netns {ns} panicked"))?
}

/// A TCP connection to `addr` made from inside namespace `ns` (or here when `None`), retried
/// until `deadline`.
pub fn connect_in(ns: Option<&str>, addr: SocketAddr, deadline: Instant) -> Result<TcpStream> {
    let connect = move || -> Result<TcpStream> {
        loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                Ok(s) => return Ok(s),
                Err(e) if Instant::now() >= deadline => {
                    return Err(e).with_context(|| format!("connect {addr}"));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    };
    match ns {
        Some(ns) => in_netns(ns, connect),
        None => connect(),
    }
}

/// HTTP/1.0 GET of `path` from `addr` (from inside `ns` when given); the whole answer.
pub fn http_get_in(
    ns: Option<&str>,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<String> {
    let mut s = connect_in(ns, addr, Instant::now() + timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: guest\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .with_context(|| format!("read HTTP answer for {path}"))?;
    Ok(out)
}

/// The body of an HTTP answer (after the blank line).
pub fn http_body(answer: &str) -> &str {
    answer
        .split_once("\r\n\r\n")
        .or_else(|| answer.split_once("\n\n"))
        .map_or("", |(_, b)| b)
}

/// Final `query-migrate` statuses.
pub const MIGRATION_FINAL: &[&str] = &["completed", "failed", "cancelled"];

/// Polls `query-migrate` every 20 ms until its status is final (or, with `until`, one of
/// those); returns the last answer and the largest `ram.remaining` seen while `active` (an
/// estimate of the last dirty set before the switch-over; the final pass may be smaller).
pub fn wait_migration(
    q: &mut QmpClient,
    deadline: Instant,
    until: Option<&[&str]>,
) -> Result<(Value, Option<u64>)> {
    let mut last_active_remaining = None;
    let stop = until.unwrap_or(MIGRATION_FINAL);
    loop {
        let v = q
            .execute("query-migrate", json!({}))
            .context("query-migrate")?;
        let st = v["status"].as_str().unwrap_or("");
        if st == "active"
            && let Some(r) = v["ram"]["remaining"].as_u64()
        {
            last_active_remaining = Some(r);
        }
        if stop.contains(&st) {
            return Ok((v, last_active_remaining));
        }
        if Instant::now() >= deadline {
            bail!("migration still {st:?} at the deadline: {v}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A packet socket in namespace `ns` bound to interface `ifname` that receives only RARP
/// frames (ethertype 0x8035), e.g. the announcements a VMM sends after a migration.
pub fn rarp_socket(ns: &str, ifname: &str) -> Result<std::os::fd::OwnedFd> {
    let ifname = ifname.to_string();
    in_netns(ns, move || {
        use std::os::fd::FromRawFd;
        let cname = std::ffi::CString::new(ifname.clone())?;
        // SAFETY: if_nametoindex reads a valid NUL-terminated string.
        let idx = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if idx == 0 {
            bail!("no interface {ifname}: {}", std::io::Error::last_os_error());
        }
        let proto = 0x8035u16.to_be();
        // SAFETY: plain socket(2) call; the fd is owned by the OwnedFd below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, libc::c_int::from(proto)) };
        if fd < 0 {
            bail!("packet socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh socket we own.
        let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = i32::try_from(idx)?;
        // SAFETY: bind(2) with a pointer to a live sockaddr_ll of the size we pass.
        let rc = unsafe {
            libc::bind(
                fd,
                (&raw const sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            bail!(
                "bind packet socket to {ifname}: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(owned)
    })
}

/// Waits until `timeout` for a RARP frame from `mac` on a [`rarp_socket`]; returns the frame.
pub fn wait_rarp(sock: &std::os::fd::OwnedFd, mac: [u8; 6], timeout: Duration) -> Option<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(1000);
        // SAFETY: poll(2) on one live pollfd.
        let rc = unsafe { libc::poll(&raw mut pfd, 1, ms) };
        if rc <= 0 {
            continue;
        }
        // SAFETY: recv(2) into a live buffer of the length we pass.
        let n = unsafe {
            libc::recv(
                sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        let Ok(n) = usize::try_from(n) else {
            continue;
        };
        if n >= 14 && buf[6..12] == mac && buf[12..14] == [0x80, 0x35] {
            return Some(buf[..n].to_vec());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_lines_accepts_sequences_and_refuses_gaps() {
        assert_eq!(counter_lines("").unwrap(), 0);
        assert_eq!(counter_lines("00000000\n00000001\n0000").unwrap(), 2);
        assert!(counter_lines("00000000\n00000002\n").is_err());
        assert!(counter_lines("00000000\n00000000\n").is_err());
        assert!(counter_lines("00000000\n0001").is_err());
    }

    #[test]
    fn proxy_forwards_records_and_throttles() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = l.local_addr().unwrap();
        let srv = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut v = Vec::new();
            s.read_to_end(&mut v).unwrap();
            s.write_all(b"ok").unwrap();
            v
        });
        let mut p = StreamProxy::start(target, Some(200_000)).unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let t0 = Instant::now();
        feed_stream(p.addr(), &data, crate::secs(10)).unwrap();
        let cap = p.wait_captured(crate::secs(10)).unwrap();
        assert!(t0.elapsed() >= Duration::from_millis(400), "throttled");
        assert_eq!(cap, data);
        assert_eq!(srv.join().unwrap(), data);
        assert_eq!(p.forwarded(), data.len() as u64);
    }
}
