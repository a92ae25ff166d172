//! Socket endpoints spelled like QEMU's socket chardevs, for filters and the comparer.
//!
//! An endpoint is described by a chardev-style option string:
//!
//! ```text
//! socket,path=/run/p.sock[,server=on|off][,wait=on|off][,reconnect=SECS|reconnect-ms=MS][,id=ID]
//! socket,host=127.0.0.1,port=9004[,server=on|off][,wait=on|off][,reconnect=SECS][,nodelay=on]
//! unix:/run/p.sock[,server=on][,...]          short form
//! tcp:127.0.0.1:9004[,server=on][,...]        short form
//! ```
//!
//! `server` (also the bare flags `server` and `nowait` of older QEMU command lines, as in the
//! seed recipe) chooses between listening and connecting. A listening endpoint hands out one
//! connected stream at a time: when the peer goes away the owner asks for the next stream and
//! the endpoint accepts the next peer. A connecting endpoint connects, and when asked again
//! after the peer went away it reconnects, retrying every `reconnect` seconds.
//!
//! Differences from QEMU, on purpose:
//! - `wait` defaults to **off** (QEMU's default for servers is on): opening an endpoint never
//!   blocks unless `wait=on` is given, in which case [`ChardevEndpoint::open`] accepts the
//!   first peer before returning.
//! - A connecting endpoint without `reconnect` still retries when its owner asks it to
//!   ([`ChardevEndpoint::next_stream`] with a default interval); [`ChardevEndpoint::connect_once`]
//!   is the single attempt QEMU makes.
//! - TCP streams always get `TCP_NODELAY` (frames are latency-sensitive); `nodelay` is accepted.
//!
//! On top of the endpoint, [`FramedReceiver`] and [`FramedSender`] carry
//! [`crate::frame`] records and survive peer changes.
//!
//! All calls block; the ones that can wait for a peer take a `cancel` flag that they check at
//! least every [`POLL_INTERVAL`], so a process can shut down its threads.

use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::frame::{Frame, FrameIoError, FrameReader, write_frame};

/// How often blocking waits look at their cancel flag.
pub const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// Retry interval of a connecting endpoint that has no `reconnect` option.
pub const DEFAULT_RECONNECT: Duration = Duration::from_secs(1);

/// What can go wrong with a chardev endpoint.
#[derive(Debug, thiserror::Error)]
pub enum ChardevError {
    /// The option string is not a chardev spec we understand.
    #[error("chardev spec {spec:?}: {msg}")]
    Parse { spec: String, msg: String },
    /// Listening failed.
    #[error("chardev {addr}: cannot listen: {source}")]
    Bind { addr: String, source: io::Error },
    /// Accepting a peer failed.
    #[error("chardev {addr}: accept: {source}")]
    Accept { addr: String, source: io::Error },
    /// Connecting failed (a single attempt).
    #[error("chardev {addr}: cannot connect: {source}")]
    Connect { addr: String, source: io::Error },
    /// The cancel flag was raised while waiting for a peer.
    #[error("chardev {addr}: cancelled while waiting for a peer")]
    Cancelled { addr: String },
    /// The peer went away or the stream failed while sending.
    #[error("chardev {addr}: send: {source}")]
    Send { addr: String, source: FrameIoError },
}

/// Where an endpoint listens or connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketAddress {
    Unix(PathBuf),
    Tcp { host: String, port: u16 },
}

impl fmt::Display for SocketAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SocketAddress::Unix(p) => write!(f, "unix:{}", p.display()),
            SocketAddress::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
        }
    }
}

/// A parsed chardev socket spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChardevSpec {
    /// The `id=` given, if any (used by `-chardev` definitions).
    pub id: Option<String>,
    pub addr: SocketAddress,
    /// Listen (`server=on`) or connect.
    pub server: bool,
    /// With `server`: block in [`ChardevEndpoint::open`] until the first peer connects.
    pub wait: bool,
    /// Client retry interval (`reconnect=SECS` or `reconnect-ms=MS`).
    pub reconnect: Option<Duration>,
}

fn parse_bool(spec: &str, key: &str, v: &str) -> Result<bool, ChardevError> {
    match v {
        "on" | "yes" | "true" | "1" => Ok(true),
        "off" | "no" | "false" | "0" => Ok(false),
        _ => Err(ChardevError::Parse {
            spec: spec.to_owned(),
            msg: format!("{key}={v}: expected on or off"),
        }),
    }
}

impl FromStr for ChardevSpec {
    type Err = ChardevError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let err = |msg: String| ChardevError::Parse {
            spec: spec.to_owned(),
            msg,
        };
        let mut parts = spec.split(',');
        let head = parts.next().unwrap_or_default();
        let mut path = None;
        let mut host = None;
        let mut port = None;
        if let Some(p) = head.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(err("empty unix socket path".into()));
            }
            path = Some(PathBuf::from(p));
        } else if let Some(hp) = head.strip_prefix("tcp:") {
            let (h, p) = hp
                .rsplit_once(':')
                .ok_or_else(|| err("expected tcp:HOST:PORT".into()))?;
            host = Some(h.trim_start_matches('[').trim_end_matches(']').to_owned());
            port = Some(p.to_owned());
        } else if head != "socket" {
            return Err(err(format!(
                "expected socket,..., unix:PATH or tcp:HOST:PORT, found {head:?}"
            )));
        }
        let mut id = None;
        let mut server = false;
        let mut wait = false;
        let mut reconnect = None;
        for kv in parts {
            let (k, v) = match kv.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (kv, None),
            };
            match (k, v) {
                ("", None) => {}
                ("server", None) => server = true,
                ("server", Some(v)) => server = parse_bool(spec, k, v)?,
                ("nowait", None) => wait = false,
                ("wait", None) => wait = true,
                ("wait", Some(v)) => wait = parse_bool(spec, k, v)?,
                ("nodelay", None) => {}
                ("nodelay" | "ipv4" | "ipv6", Some(v)) => {
                    parse_bool(spec, k, v)?;
                }
                ("id", Some(v)) => id = Some(v.to_owned()),
                ("path", Some(v)) => path = Some(PathBuf::from(v)),
                ("host", Some(v)) => host = Some(v.to_owned()),
                ("port", Some(v)) => port = Some(v.to_owned()),
                ("reconnect", Some(v)) => {
                    let s: u64 = v
                        .parse()
                        .map_err(|_| err(format!("reconnect={v}: expected seconds")))?;
                    reconnect = (s > 0).then(|| Duration::from_secs(s));
                }
                ("reconnect-ms", Some(v)) => {
                    let ms: u64 = v
                        .parse()
                        .map_err(|_| err(format!("reconnect-ms={v}: expected milliseconds")))?;
                    reconnect = (ms > 0).then(|| Duration::from_millis(ms));
                }
                _ => return Err(err(format!("unsupported option {kv:?}"))),
            }
        }
        let addr = match (path, host, port) {
            (Some(p), None, None) => SocketAddress::Unix(p),
            (None, h, Some(p)) => {
                let port = p
                    .parse()
                    .map_err(|_| err(format!("port={p}: expected a number 0-65535")))?;
                let host = match h {
                    Some(h) if !h.is_empty() => h,
                    _ if server => "0.0.0.0".to_owned(),
                    _ => "localhost".to_owned(),
                };
                SocketAddress::Tcp { host, port }
            }
            (Some(_), _, _) => return Err(err("path= cannot be combined with host=/port=".into())),
            (None, _, None) => return Err(err("needs path= or port=".into())),
        };
        Ok(ChardevSpec {
            id,
            addr,
            server,
            wait: server && wait,
            reconnect,
        })
    }
}

impl fmt::Display for ChardevSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.addr)?;
        if self.server {
            write!(f, ",server=on")?;
        }
        Ok(())
    }
}

/// A connected byte stream, Unix or TCP.
#[derive(Debug)]
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        }
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tcp(s) => s.set_write_timeout(t),
        }
    }
}

impl std::os::fd::AsRawFd for Stream {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.write_all(buf),
            Stream::Tcp(s) => s.write_all(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Debug)]
enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

/// One end of a chardev link: listens or connects, and hands out connected streams.
#[derive(Debug)]
pub struct ChardevEndpoint {
    spec: ChardevSpec,
    listener: Option<Listener>,
    /// A stream accepted by `open` (`wait=on`) not yet handed out.
    pending: Option<Stream>,
}

impl ChardevEndpoint {
    /// Parses `spec` and opens it (see [`ChardevEndpoint::open`]).
    pub fn open_str(spec: &str) -> Result<Self, ChardevError> {
        Self::open(spec.parse()?)
    }

    /// Opens an endpoint: a server binds and listens now (a stale Unix socket file at the path
    /// is replaced; with `wait=on` the first peer is accepted before returning); a client
    /// connects lazily, in [`ChardevEndpoint::next_stream`].
    pub fn open(spec: ChardevSpec) -> Result<Self, ChardevError> {
        let mut ep = ChardevEndpoint {
            listener: None,
            pending: None,
            spec,
        };
        if ep.spec.server {
            let bind_err = |source| ChardevError::Bind {
                addr: ep.spec.addr.to_string(),
                source,
            };
            let listener = match &ep.spec.addr {
                SocketAddress::Unix(path) => {
                    if let Ok(md) = std::fs::symlink_metadata(path)
                        && md.file_type().is_socket()
                    {
                        let _ = std::fs::remove_file(path);
                    }
                    let l = UnixListener::bind(path).map_err(bind_err)?;
                    Listener::Unix(l, path.clone())
                }
                SocketAddress::Tcp { host, port } => {
                    Listener::Tcp(TcpListener::bind((host.as_str(), *port)).map_err(bind_err)?)
                }
            };
            match &listener {
                Listener::Unix(l, _) => l.set_nonblocking(true),
                Listener::Tcp(l) => l.set_nonblocking(true),
            }
            .map_err(bind_err)?;
            ep.listener = Some(listener);
            if ep.spec.wait {
                let never = AtomicBool::new(false);
                ep.pending = ep.accept(&never, None)?;
            }
        }
        Ok(ep)
    }

    pub fn spec(&self) -> &ChardevSpec {
        &self.spec
    }

    /// The listening socket's descriptor (servers only), for a caller's own `poll` loop: it
    /// becomes readable when a peer waits to be accepted with [`ChardevEndpoint::accept`].
    pub fn listener_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        match &self.listener {
            Some(Listener::Unix(l, _)) => Some(l.as_raw_fd()),
            Some(Listener::Tcp(l)) => Some(l.as_raw_fd()),
            None => None,
        }
    }

    /// Takes the stream accepted by `open` with `wait=on`, if it was not handed out yet.
    pub fn take_pending(&mut self) -> Option<Stream> {
        self.pending.take()
    }

    /// The address actually bound (resolves `port=0` of a TCP server).
    pub fn local_addr(&self) -> SocketAddress {
        match &self.listener {
            Some(Listener::Tcp(l)) => match l.local_addr() {
                Ok(a) => SocketAddress::Tcp {
                    host: a.ip().to_string(),
                    port: a.port(),
                },
                Err(_) => self.spec.addr.clone(),
            },
            _ => self.spec.addr.clone(),
        }
    }

    fn addr_string(&self) -> String {
        self.spec.addr.to_string()
    }

    /// Server only: accepts the next peer, waiting up to `timeout` (`Ok(None)` on timeout).
    pub fn accept(
        &self,
        cancel: &AtomicBool,
        timeout: Option<Duration>,
    ) -> Result<Option<Stream>, ChardevError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let Some(listener) = &self.listener else {
            return Err(ChardevError::Accept {
                addr: self.addr_string(),
                source: io::Error::new(ErrorKind::InvalidInput, "not a server endpoint"),
            });
        };
        loop {
            let r = match listener {
                Listener::Unix(l, _) => l.accept().map(|(s, _)| Stream::Unix(s)),
                Listener::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
            };
            match r {
                Ok(s) => {
                    let setup = match &s {
                        Stream::Unix(u) => u.set_nonblocking(false),
                        Stream::Tcp(t) => {
                            t.set_nonblocking(false).and_then(|()| t.set_nodelay(true))
                        }
                    };
                    setup.map_err(|source| ChardevError::Accept {
                        addr: self.addr_string(),
                        source,
                    })?;
                    return Ok(Some(s));
                }
                Err(e)
                    if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
                // A peer that went away between SYN and accept: try the next one.
                Err(e) if e.kind() == ErrorKind::ConnectionAborted => {}
                Err(source) => {
                    return Err(ChardevError::Accept {
                        addr: self.addr_string(),
                        source,
                    });
                }
            }
            if cancel.load(Ordering::Relaxed) {
                return Err(ChardevError::Cancelled {
                    addr: self.addr_string(),
                });
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(None);
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Client only: one connection attempt (QEMU's behaviour without `reconnect`), of up to
    /// 5 s per resolved address.
    pub fn connect_once(&self) -> Result<Stream, ChardevError> {
        self.connect_within(Duration::from_secs(5))
    }

    /// Client only: one connection attempt, giving up on a TCP address after `timeout` (for
    /// callers that must not stall for long: a peer host that is down answers nothing).
    pub fn connect_within(&self, timeout: Duration) -> Result<Stream, ChardevError> {
        let cerr = |source| ChardevError::Connect {
            addr: self.addr_string(),
            source,
        };
        match &self.spec.addr {
            SocketAddress::Unix(p) => UnixStream::connect(p).map(Stream::Unix).map_err(cerr),
            SocketAddress::Tcp { host, port } => {
                let mut last = io::Error::new(ErrorKind::NotFound, "no address resolved");
                for a in (host.as_str(), *port).to_socket_addrs().map_err(cerr)? {
                    match TcpStream::connect_timeout(&a, timeout) {
                        Ok(s) => {
                            s.set_nodelay(true).map_err(cerr)?;
                            return Ok(Stream::Tcp(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(cerr(last))
            }
        }
    }

    /// The next connected stream: a server accepts the next peer; a client connects, retrying
    /// every `reconnect` interval (or `default_retry`) until it succeeds or `cancel` is raised.
    pub fn next_stream(
        &mut self,
        cancel: &AtomicBool,
        default_retry: Duration,
    ) -> Result<Stream, ChardevError> {
        if let Some(s) = self.pending.take() {
            return Ok(s);
        }
        if self.spec.server {
            return match self.accept(cancel, None)? {
                Some(s) => Ok(s),
                None => Err(ChardevError::Cancelled {
                    addr: self.addr_string(),
                }),
            };
        }
        let interval = self.spec.reconnect.unwrap_or(default_retry);
        loop {
            match self.connect_once() {
                Ok(s) => return Ok(s),
                Err(e) => tracing::debug!("{e}; retrying in {interval:?}"),
            }
            let until = Instant::now() + interval;
            while Instant::now() < until {
                if cancel.load(Ordering::Relaxed) {
                    return Err(ChardevError::Cancelled {
                        addr: self.addr_string(),
                    });
                }
                std::thread::sleep(POLL_INTERVAL.min(interval));
            }
        }
    }
}

impl Drop for ChardevEndpoint {
    fn drop(&mut self) {
        if let Some(Listener::Unix(_, path)) = &self.listener {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// What a [`FramedReceiver`] delivers.
#[derive(Debug)]
pub enum RecvEvent {
    /// A new peer is connected.
    Connected,
    /// One record.
    Frame(Frame),
    /// The peer went away (cleanly: `None`; or with the reason: a bad record, an I/O error).
    /// The receiver waits for the next peer on the following call.
    Disconnected(Option<String>),
}

/// Receives framed records from an endpoint, following peer changes.
#[derive(Debug)]
pub struct FramedReceiver {
    endpoint: ChardevEndpoint,
    vnet_hdr_support: bool,
    reader: Option<FrameReader<Stream>>,
    /// A clone of the current stream, so another thread can shut it down.
    current: std::sync::Arc<std::sync::Mutex<Option<Stream>>>,
}

impl FramedReceiver {
    pub fn new(endpoint: ChardevEndpoint, vnet_hdr_support: bool) -> Self {
        Self {
            endpoint,
            vnet_hdr_support,
            reader: None,
            current: Default::default(),
        }
    }

    pub fn endpoint(&self) -> &ChardevEndpoint {
        &self.endpoint
    }

    /// A handle that shuts the current stream down (unblocks a `recv` in another thread).
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.current.clone())
    }

    /// Blocks until something happens: a peer connects, a record arrives, the peer leaves.
    /// Errors only when `cancel` is raised or the endpoint itself fails.
    pub fn recv(&mut self, cancel: &AtomicBool) -> Result<RecvEvent, ChardevError> {
        let Some(reader) = &mut self.reader else {
            let stream = self.endpoint.next_stream(cancel, DEFAULT_RECONNECT)?;
            if let Ok(mut cur) = self.current.lock() {
                *cur = stream.try_clone().ok();
            }
            self.reader = Some(FrameReader::new(stream, self.vnet_hdr_support));
            return Ok(RecvEvent::Connected);
        };
        let res = reader.read_frame();
        match res {
            Ok(Some(f)) => Ok(RecvEvent::Frame(f)),
            Ok(None) => {
                self.drop_stream();
                Ok(RecvEvent::Disconnected(None))
            }
            Err(e) => {
                self.drop_stream();
                Ok(RecvEvent::Disconnected(Some(format!(
                    "{}: {e}",
                    self.endpoint.addr_string()
                ))))
            }
        }
    }

    fn drop_stream(&mut self) {
        self.reader = None;
        if let Ok(mut cur) = self.current.lock() {
            *cur = None;
        }
    }
}

/// Shuts down the stream a [`FramedReceiver`] currently reads, from any thread.
#[derive(Clone, Debug)]
pub struct ShutdownHandle(std::sync::Arc<std::sync::Mutex<Option<Stream>>>);

impl ShutdownHandle {
    pub fn shutdown(&self) {
        if let Ok(cur) = self.0.lock()
            && let Some(s) = cur.as_ref()
        {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// Sends framed records to an endpoint, reconnecting after the peer went away.
#[derive(Debug)]
pub struct FramedSender {
    endpoint: ChardevEndpoint,
    vnet_hdr_support: bool,
    stream: Option<Stream>,
    buf: Vec<u8>,
}

impl FramedSender {
    pub fn new(endpoint: ChardevEndpoint, vnet_hdr_support: bool) -> Self {
        Self {
            endpoint,
            vnet_hdr_support,
            stream: None,
            buf: Vec::new(),
        }
    }

    pub fn endpoint(&self) -> &ChardevEndpoint {
        &self.endpoint
    }

    pub fn is_connected(&self) -> bool {
        self.stream.is_some()
    }

    /// Waits for a peer (server: accepts; client: connects, retrying) if there is none.
    /// Returns true when a new connection was made.
    pub fn ensure_connected(&mut self, cancel: &AtomicBool) -> Result<bool, ChardevError> {
        if self.stream.is_some() {
            return Ok(false);
        }
        self.stream = Some(self.endpoint.next_stream(cancel, DEFAULT_RECONNECT)?);
        Ok(true)
    }

    /// Server only: takes a waiting peer if one is there, without blocking.
    pub fn poll_connect(&mut self) -> Result<bool, ChardevError> {
        if self.stream.is_some() {
            return Ok(false);
        }
        if let Some(s) = self.endpoint.pending.take() {
            self.stream = Some(s);
            return Ok(true);
        }
        if !self.endpoint.spec.server {
            return match self.endpoint.connect_once() {
                Ok(s) => {
                    self.stream = Some(s);
                    Ok(true)
                }
                Err(_) => Ok(false),
            };
        }
        let never = AtomicBool::new(false);
        match self.endpoint.accept(&never, Some(Duration::ZERO))? {
            Some(s) => {
                self.stream = Some(s);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Sends one record on the current connection (connecting first if needed). On a write
    /// error the connection is dropped and the error returned: the caller decides whether to
    /// send the frame again on the next connection.
    pub fn send(&mut self, frame: &Frame, cancel: &AtomicBool) -> Result<(), ChardevError> {
        self.ensure_connected(cancel)?;
        self.send_batch(std::slice::from_ref(frame))
    }

    /// Sends several records in one write on the current connection (no connection: error).
    pub fn send_batch(&mut self, frames: &[Frame]) -> Result<(), ChardevError> {
        let addr = self.endpoint.addr_string();
        let Some(stream) = &mut self.stream else {
            return Err(ChardevError::Send {
                addr,
                source: FrameIoError::Io(io::Error::new(ErrorKind::NotConnected, "no peer")),
            });
        };
        self.buf.clear();
        for f in frames {
            crate::frame::encode(f, self.vnet_hdr_support, &mut self.buf).map_err(|e| {
                ChardevError::Send {
                    addr: addr.clone(),
                    source: e.into(),
                }
            })?;
        }
        if let Err(e) = stream.write_all(&self.buf) {
            self.stream = None;
            return Err(ChardevError::Send {
                addr,
                source: e.into(),
            });
        }
        Ok(())
    }

    /// Writes one record with [`write_frame`] (no batching), dropping the connection on error.
    pub fn send_one(&mut self, frame: &Frame) -> Result<(), ChardevError> {
        let addr = self.endpoint.addr_string();
        let Some(stream) = &mut self.stream else {
            return Err(ChardevError::Send {
                addr,
                source: FrameIoError::Io(io::Error::new(ErrorKind::NotConnected, "no peer")),
            });
        };
        write_frame(stream, frame, self.vnet_hdr_support).map_err(|source| {
            self.stream = None;
            ChardevError::Send { addr, source }
        })
    }

    /// Drops the current connection (the next send reconnects).
    pub fn disconnect(&mut self) {
        if let Some(s) = self.stream.take() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// The current stream, if connected.
    pub fn stream(&self) -> Option<&Stream> {
        self.stream.as_ref()
    }

    /// A clone of the current stream (e.g. to watch for the peer closing it).
    pub fn stream_clone(&self) -> Option<Stream> {
        self.stream.as_ref().and_then(|s| s.try_clone().ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_spellings() {
        let s: ChardevSpec = "socket,id=c0,path=/tmp/x.sock,server=on,wait=off"
            .parse()
            .unwrap();
        assert_eq!(s.addr, SocketAddress::Unix("/tmp/x.sock".into()));
        assert!(s.server && !s.wait);
        assert_eq!(s.id.as_deref(), Some("c0"));
        let s: ChardevSpec = "socket,id=mirror0,host=10.22.1.2,port=9003,server,nowait"
            .parse()
            .unwrap();
        assert_eq!(
            s.addr,
            SocketAddress::Tcp {
                host: "10.22.1.2".into(),
                port: 9003
            }
        );
        assert!(s.server && !s.wait);
        let s: ChardevSpec = "socket,host=h,port=1,reconnect=2".parse().unwrap();
        assert!(!s.server);
        assert_eq!(s.reconnect, Some(Duration::from_secs(2)));
        let s: ChardevSpec = "tcp:127.0.0.1:9004,server=on".parse().unwrap();
        assert!(s.server);
        assert_eq!(
            s.addr,
            SocketAddress::Tcp {
                host: "127.0.0.1".into(),
                port: 9004
            }
        );
        let s: ChardevSpec = "unix:/p.sock".parse().unwrap();
        assert!(!s.server);
        let s: ChardevSpec = "socket,port=5,server=on".parse().unwrap();
        assert_eq!(
            s.addr,
            SocketAddress::Tcp {
                host: "0.0.0.0".into(),
                port: 5
            }
        );
    }

    #[test]
    fn rejects_bad_specs_with_a_reason() {
        for bad in [
            "",
            "file:/x",
            "socket",
            "socket,path=/x,port=3",
            "socket,port=99999",
            "socket,path=/x,server=maybe",
            "socket,path=/x,telnet=on",
            "tcp:nohostport",
            "unix:",
            "socket,path=/x,reconnect=x",
        ] {
            let e = bad.parse::<ChardevSpec>().unwrap_err();
            assert!(matches!(e, ChardevError::Parse { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn server_and_client_exchange_frames_and_reconnect() {
        let dir = tempfile_dir();
        let path = dir.join("s.sock");
        let spec = format!("socket,path={},server=on,wait=off", path.display());
        let server = ChardevEndpoint::open_str(&spec).unwrap();
        let mut rx = FramedReceiver::new(server, false);
        let client = ChardevEndpoint::open_str(&format!("unix:{}", path.display())).unwrap();
        let mut tx = FramedSender::new(client, false);
        let cancel = AtomicBool::new(false);
        for round in 0..2u8 {
            let f = Frame::ethernet(vec![round; 60]);
            tx.send(&f, &cancel).unwrap();
            assert!(matches!(rx.recv(&cancel).unwrap(), RecvEvent::Connected));
            match rx.recv(&cancel).unwrap() {
                RecvEvent::Frame(g) => assert_eq!(g, f),
                other => panic!("{other:?}"),
            }
            tx.disconnect();
            assert!(matches!(
                rx.recv(&cancel).unwrap(),
                RecvEvent::Disconnected(None)
            ));
        }
        cancel.store(true, Ordering::Relaxed);
        assert!(matches!(
            rx.recv(&cancel),
            Err(ChardevError::Cancelled { .. })
        ));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn tcp_port_zero_reports_the_bound_port() {
        let ep = ChardevEndpoint::open_str("tcp:127.0.0.1:0,server=on").unwrap();
        let SocketAddress::Tcp { port, .. } = ep.local_addr() else {
            panic!("not tcp");
        };
        assert_ne!(port, 0);
        let c = ChardevEndpoint::open_str(&format!("tcp:127.0.0.1:{port}")).unwrap();
        c.connect_once().unwrap();
        let cancel = AtomicBool::new(false);
        assert!(
            ep.accept(&cancel, Some(Duration::from_secs(5)))
                .unwrap()
                .is_some()
        );
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "colo-chardev-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
