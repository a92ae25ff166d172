//! NBD client with pipelining: any number of requests in flight on one connection, replies
//! matched by cookie. Usable from async code (`read`, `write`, ...) and from plain threads
//! (`submit_sync`, which returns a [`ReplyWaiter`] that can be waited on with a timeout).
//!
//! A client made by [`NbdClient::connect_direct`] (the `nbd` block node's) has no reader task:
//! the threads waiting for replies read them from the socket themselves, one at a time (the
//! "reader role"). The reader hands every reply it parses to its waiter and keeps reading until
//! its own reply came; then it passes the role to another waiting thread, if any. At queue
//! depth 1 the thread that sent a request reads its reply itself, so a reply costs one thread
//! wake-up (the socket's) instead of two (reader task, then the waiting thread): on the 2-vCPU
//! bench host each cross-thread wake-up of a replicated write showed as 10-20 µs.

use std::{
    collections::HashMap,
    io::Read,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError},
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter},
    net::TcpStream,
    sync::{mpsc, oneshot},
};

use super::{proto::*, sock::SockWriter};

/// Errors of the NBD client.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NbdClientError {
    /// Socket error.
    #[error("NBD client: {0}")]
    Io(String),
    /// The server broke the protocol.
    #[error("NBD client: protocol error: {0}")]
    Protocol(String),
    /// The server refused an option (negotiation).
    #[error("NBD client: server refused {what}: {message}")]
    Refused {
        /// Which step.
        what: String,
        /// Server's message.
        message: String,
    },
    /// The server answered a request with an error.
    #[error("NBD client: {cmd} at offset {offset} failed with NBD errno {errno}")]
    Remote {
        /// Command name.
        cmd: &'static str,
        /// Offset of the request.
        offset: u64,
        /// NBD errno.
        errno: u32,
    },
    /// The connection is closed.
    #[error("NBD client: disconnected: {0}")]
    Disconnected(String),
    /// Bad argument.
    #[error("NBD client: invalid request: {0}")]
    Invalid(String),
    /// No reply within the time the caller waits.
    #[error("NBD client: no reply to {cmd} at offset {offset} within {timeout:?}")]
    Timeout {
        /// Command name.
        cmd: &'static str,
        /// Offset of the request.
        offset: u64,
        /// How long the caller waited.
        timeout: Duration,
    },
}

type ReplyResult = Result<Vec<u8>, NbdClientError>;

/// What a thread waiting for a reply is woken with.
enum Wake {
    /// Its reply.
    Reply(ReplyResult),
    /// The reader role (direct clients): read the socket until the reply comes.
    Read,
}

enum ReplyTx {
    Async(oneshot::Sender<ReplyResult>),
    Sync(SyncSender<Wake>),
    /// The waiter gave up (timeout); the reply is read and dropped when it comes.
    Abandoned,
}

impl ReplyTx {
    fn send(self, r: ReplyResult) {
        match self {
            ReplyTx::Async(t) => {
                let _ = t.send(r);
            }
            ReplyTx::Sync(t) => {
                let _ = t.try_send(Wake::Reply(r));
            }
            ReplyTx::Abandoned => {}
        }
    }
}

struct Waiter {
    cmd: u16,
    offset: u64,
    read_len: u32,
    reply: ReplyTx,
    /// Direct clients: a thread is blocked waiting for this reply (it may take the reader
    /// role; a request whose thread waits for another one of its requests may not).
    waiting: bool,
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, Waiter>,
    closed: Option<String>,
    /// Direct clients: a waiting thread holds the reader role.
    reading: bool,
}

struct Inner {
    /// Frames to the writer task (generic streams).
    tx: Option<mpsc::UnboundedSender<Vec<u8>>>,
    /// Or written straight from the submitting thread (TCP, [`NbdClient::connect_direct`]).
    direct: Option<SockWriter>,
    /// Direct clients: the receiving side, used by the holder of the reader role only.
    rside: Option<Mutex<ReadSide>>,
    state: Mutex<State>,
    next_cookie: AtomicU64,
    /// When the client was made: the origin of `slow_at`.
    born: Instant,
    /// Nanoseconds after `born` (plus one; 0: never) at which a waiter last got its reply late
    /// ([`SLOW_REPLY`] or more after it started waiting).
    slow_at: AtomicU64,
}

/// A reply this late counts against [`NbdClient::responsive`] for [`SLOW_MEMORY`]. Well above
/// the jitter of a loaded host (2 ms was tried: the scheduling outliers of the 2-vCPU bench
/// host crossed it often enough to keep the queue-thread path off most of the time), well
/// below what a guest would notice.
const SLOW_REPLY: Duration = Duration::from_millis(50);

/// How long a late reply is remembered.
const SLOW_MEMORY: Duration = Duration::from_secs(1);

/// Bytes a direct client's reader received and has not consumed yet.
struct ReadSide {
    sock: std::net::TcpStream,
    buf: Vec<u8>,
    /// A READ reply whose data is still arriving: its waiter, the data so far, the length.
    partial: Option<(Waiter, Vec<u8>, usize)>,
    scratch: Box<[u8]>,
    /// Recent outcomes of spinning for a reply.
    spin: super::sock::SpinStats,
}

/// How long an async request on a direct client waits for its reply.
const ASYNC_WAIT: Duration = Duration::from_secs(3600);

/// How long one blocking receive of a direct client's reader lasts before it checks its
/// deadline again.
const READ_TICK: Duration = Duration::from_millis(50);

impl Inner {
    fn new(
        tx: Option<mpsc::UnboundedSender<Vec<u8>>>,
        direct: Option<SockWriter>,
        rside: Option<Mutex<ReadSide>>,
    ) -> Inner {
        Inner {
            tx,
            direct,
            rside,
            state: Mutex::new(State::default()),
            next_cookie: AtomicU64::new(1),
            born: Instant::now(),
            slow_at: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mark_slow(&self) {
        let ns = u64::try_from(self.born.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
        self.slow_at.store(ns + 1, Ordering::Relaxed);
    }

    /// No request in flight and no late reply within [`SLOW_MEMORY`].
    fn responsive(&self) -> bool {
        let slow = self.slow_at.load(Ordering::Relaxed);
        if slow != 0 {
            let since = self
                .born
                .elapsed()
                .as_nanos()
                .saturating_sub(u128::from(slow - 1));
            if since < SLOW_MEMORY.as_nanos() {
                return false;
            }
        }
        let st = self.lock();
        st.closed.is_some() || st.pending.is_empty()
    }

    /// Marks the connection closed and fails every pending request.
    fn close(&self, why: String) {
        tracing::debug!("NBD client connection ends: {why}");
        let drained: Vec<Waiter> = {
            let mut s = self.lock();
            if s.closed.is_none() {
                s.closed = Some(why.clone());
            }
            s.pending.drain().map(|(_, w)| w).collect()
        };
        for w in drained {
            w.reply.send(Err(NbdClientError::Disconnected(why.clone())));
        }
    }

    /// Gives up the reader role: to another waiting thread if there is one.
    fn release_reader(&self) {
        let mut s = self.lock();
        s.reading = false;
        // A waiter that gave up is marked abandoned under this lock before it stops
        // listening, so the role cannot be handed to a thread that is gone.
        s.reading = s.pending.values().any(|w| match &w.reply {
            ReplyTx::Sync(t) if w.waiting => t.try_send(Wake::Read).is_ok(),
            _ => false,
        });
    }
}

impl ReadSide {
    /// One receive (up to [`READ_TICK`]), then every complete reply in the buffer goes to its
    /// waiter. Err: the connection is unusable (the reason).
    fn read_some(&mut self, inner: &Inner, spin: bool) -> Result<(), String> {
        let got = match self.spin_recv(spin) {
            Some(r) => r,
            None => (&self.sock).read(&mut self.scratch),
        };
        match got {
            Ok(0) => return Err("connection closed by the server".into()),
            Ok(n) => self.buf.extend_from_slice(&self.scratch[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                return Ok(());
            }
            Err(e) => return Err(format!("connection closed: {e}")),
        }
        let mut pos = 0;
        let r = loop {
            if let Some((_, data, need)) = &mut self.partial {
                let k = (self.buf.len() - pos).min(*need - data.len());
                data.extend_from_slice(&self.buf[pos..pos + k]);
                pos += k;
                if data.len() < *need {
                    break Ok(());
                }
                if let Some((w, data, _)) = self.partial.take() {
                    w.reply.send(Ok(data));
                }
                continue;
            }
            let Some(hdr) = self.buf.get(pos..pos + 16) else {
                break Ok(());
            };
            let (error, cookie) = match parse_reply_header(hdr) {
                Ok(h) => h,
                Err(why) => break Err(why),
            };
            pos += 16;
            let Some(w) = inner.lock().pending.remove(&cookie) else {
                break Err(format!("reply for unknown cookie {cookie}"));
            };
            if error != 0 {
                w.reply.send(Err(NbdClientError::Remote {
                    cmd: cmd_name(w.cmd),
                    offset: w.offset,
                    errno: error,
                }));
            } else if w.read_len > 0 {
                let need = w.read_len as usize;
                self.partial = Some((w, Vec::with_capacity(need), need));
            } else {
                w.reply.send(Ok(Vec::new()));
            }
        };
        self.buf.drain(..pos);
        r
    }
}

impl ReadSide {
    /// With `spin`, and while spinning has been paying off: polls the socket without sleeping
    /// for up to [`crate::spin_budget`], yielding the CPU between polls (a thread of the secondary may need
    /// it). None: nothing arrived, block. A reply that arrives while the thread spins saves
    /// the sleep and the wake-up (on this paravirtualised 2-vCPU host, waking a halted vCPU
    /// is the dearest part of a loopback round trip).
    fn spin_recv(&mut self, spin: bool) -> Option<std::io::Result<usize>> {
        if !spin || crate::spin_budget().is_zero() {
            return None;
        }
        // Adaptive: keep spinning while at least one spin in four succeeds; probe again
        // every 64 waits otherwise.
        if !self.spin.should_spin() {
            return None;
        }
        let got = self.spin_poll();
        self.spin.record(matches!(got, Some(Ok(_))));
        got
    }

    /// Polls the socket without sleeping for up to [`crate::spin_budget`].
    fn spin_poll(&mut self) -> Option<std::io::Result<usize>> {
        use std::os::fd::AsRawFd;
        let t0 = Instant::now();
        loop {
            // SAFETY: recv into our own scratch buffer of the given length, on our socket.
            let n = unsafe {
                libc::recv(
                    self.sock.as_raw_fd(),
                    self.scratch.as_mut_ptr().cast(),
                    self.scratch.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n >= 0 {
                return Some(Ok(n as usize));
            }
            let e = std::io::Error::last_os_error();
            if !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ) {
                return Some(Err(e));
            }
            if t0.elapsed() >= crate::spin_budget() {
                return None;
            }
            std::thread::yield_now();
        }
    }
}

/// A request sent from a plain thread ([`NbdClient::submit_sync`]), waiting for its reply.
pub struct ReplyWaiter {
    inner: Arc<Inner>,
    cookie: u64,
    cmd: u16,
    offset: u64,
    rx: Receiver<Wake>,
}

impl std::fmt::Debug for ReplyWaiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplyWaiter")
            .field("cookie", &self.cookie)
            .finish()
    }
}

impl ReplyWaiter {
    /// Waits up to `timeout` for the reply: the read data (empty for other commands) or the
    /// error. On a direct client the calling thread may read replies from the socket meanwhile
    /// (its own and others').
    pub fn wait(self, timeout: Duration) -> Result<Vec<u8>, NbdClientError> {
        let t0 = Instant::now();
        let r = self.wait_inner(timeout);
        if t0.elapsed() >= SLOW_REPLY {
            self.inner.mark_slow();
        }
        r
    }

    fn wait_inner(&self, timeout: Duration) -> Result<Vec<u8>, NbdClientError> {
        let deadline = Instant::now() + timeout;
        let lost = || NbdClientError::Disconnected("reply lost".into());
        if self.inner.rside.is_none() {
            return match self.rx.recv_timeout(timeout) {
                Ok(Wake::Reply(r)) => r,
                Ok(Wake::Read) => Err(lost()),
                Err(RecvTimeoutError::Timeout) => self.give_up(timeout),
                Err(RecvTimeoutError::Disconnected) => Err(lost()),
            };
        }
        match self.rx.try_recv() {
            Ok(Wake::Reply(r)) => return r,
            Ok(Wake::Read) => return self.read_until_reply(deadline, timeout),
            Err(TryRecvError::Disconnected) => return Err(lost()),
            Err(TryRecvError::Empty) => {}
        }
        {
            let mut st = self.inner.lock();
            if !st.reading {
                st.reading = true;
                drop(st);
                return self.read_until_reply(deadline, timeout);
            }
            if let Some(w) = st.pending.get_mut(&self.cookie) {
                w.waiting = true;
            }
        }
        // Another thread reads: it hands us our reply, or the role when it leaves.
        match self
            .rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            Ok(Wake::Reply(r)) => r,
            Ok(Wake::Read) => self.read_until_reply(deadline, timeout),
            Err(RecvTimeoutError::Timeout) => self.give_up(timeout),
            Err(RecvTimeoutError::Disconnected) => Err(lost()),
        }
    }

    /// Holding the reader role: reads until this request's reply came (or the deadline).
    fn read_until_reply(&self, deadline: Instant, timeout: Duration) -> ReplyResult {
        let Some(rside) = &self.inner.rside else {
            return Err(NbdClientError::Disconnected("no reader".into()));
        };
        let mut spin = true;
        loop {
            if let Ok(Wake::Reply(r)) = self.rx.try_recv() {
                self.inner.release_reader();
                return r;
            }
            if Instant::now() >= deadline {
                self.inner.release_reader();
                return self.give_up(timeout);
            }
            let res = {
                let mut rs = rside.lock().unwrap_or_else(|p| p.into_inner());
                rs.read_some(&self.inner, std::mem::take(&mut spin))
            };
            if let Err(why) = res {
                self.inner.close(why);
            }
        }
    }

    /// The deadline passed: forgets the request (a late reply is dropped), unless the reply
    /// arrived meanwhile; passes on the reader role if it was handed to us.
    fn give_up(&self, timeout: Duration) -> ReplyResult {
        if let Some(w) = self.inner.lock().pending.get_mut(&self.cookie) {
            w.reply = ReplyTx::Abandoned;
        }
        match self.rx.try_recv() {
            Ok(Wake::Reply(r)) => return r,
            Ok(Wake::Read) => self.inner.release_reader(),
            Err(_) => {}
        }
        Err(NbdClientError::Timeout {
            cmd: cmd_name(self.cmd),
            offset: self.offset,
            timeout,
        })
    }
}

/// A connected NBD client. Cheap to clone; all clones share the connection.
#[derive(Clone)]
pub struct NbdClient {
    inner: Arc<Inner>,
    size: u64,
    flags: u16,
    export: String,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("export", &self.export)
            .field("size", &self.size)
            .finish()
    }
}

fn cmd_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_DISC => "DISC",
        _ => "unknown command",
    }
}

fn ioe(what: &str) -> impl FnOnce(std::io::Error) -> NbdClientError + '_ {
    move |e| NbdClientError::Io(format!("{what}: {e}"))
}

struct OptReply {
    reply: u32,
    data: Vec<u8>,
}

async fn read_opt_reply<R: AsyncRead + Unpin>(
    rd: &mut R,
    opt: u32,
) -> Result<OptReply, NbdClientError> {
    let magic = rd
        .read_u64()
        .await
        .map_err(ioe("reading an option reply"))?;
    if magic != REPLY_MAGIC {
        return Err(NbdClientError::Protocol(format!(
            "bad option reply magic {magic:#x}"
        )));
    }
    let ropt = rd
        .read_u32()
        .await
        .map_err(ioe("reading an option reply"))?;
    let reply = rd
        .read_u32()
        .await
        .map_err(ioe("reading an option reply"))?;
    let len = rd
        .read_u32()
        .await
        .map_err(ioe("reading an option reply"))?;
    if ropt != opt {
        return Err(NbdClientError::Protocol(format!(
            "reply to option {ropt}, expected {opt}"
        )));
    }
    if len > MAX_OPTION {
        return Err(NbdClientError::Protocol(format!(
            "option reply of {len} bytes"
        )));
    }
    let mut data = vec![0u8; len as usize];
    rd.read_exact(&mut data)
        .await
        .map_err(ioe("reading option reply data"))?;
    Ok(OptReply { reply, data })
}

async fn send_opt<W: AsyncWrite + Unpin>(
    wr: &mut W,
    opt: u32,
    data: &[u8],
) -> Result<(), NbdClientError> {
    let mut v = Vec::with_capacity(16 + data.len());
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    wr.write_all(&v).await.map_err(ioe("sending an option"))?;
    wr.flush().await.map_err(ioe("sending an option"))
}

async fn greet<R, W>(rd: &mut R, wr: &mut W) -> Result<bool, NbdClientError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let magic = rd.read_u64().await.map_err(ioe("reading the greeting"))?;
    let opt = rd.read_u64().await.map_err(ioe("reading the greeting"))?;
    if magic != NBDMAGIC || opt != IHAVEOPT {
        return Err(NbdClientError::Protocol("not a newstyle NBD server".into()));
    }
    let hflags = rd.read_u16().await.map_err(ioe("reading the greeting"))?;
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(NbdClientError::Protocol(
            "server lacks fixed newstyle".into(),
        ));
    }
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let mut cflags = CFLAG_FIXED_NEWSTYLE;
    if no_zeroes {
        cflags |= CFLAG_NO_ZEROES;
    }
    wr.write_all(&cflags.to_be_bytes())
        .await
        .map_err(ioe("sending client flags"))?;
    Ok(no_zeroes)
}

impl NbdClient {
    /// Connects to `addr` (`host:port`) and opens `export`.
    pub async fn connect(addr: &str, export: &str) -> Result<NbdClient, NbdClientError> {
        let sock = TcpStream::connect(addr)
            .await
            .map_err(|e| NbdClientError::Io(format!("connecting to {addr}: {e}")))?;
        let _ = sock.set_nodelay(true);
        Self::handshake(sock, export).await
    }

    /// Like [`NbdClient::connect`], but requests are written to the socket by the thread that
    /// submits them (no hand-off to a writer task: one thread wake-up less per request). For
    /// clients used from plain threads (the `nbd` block node); an async caller may block its
    /// runtime thread while the socket buffer is full.
    pub async fn connect_direct(addr: &str, export: &str) -> Result<NbdClient, NbdClientError> {
        let sock = TcpStream::connect(addr)
            .await
            .map_err(|e| NbdClientError::Io(format!("connecting to {addr}: {e}")))?;
        let _ = sock.set_nodelay(true);
        super::sock::set_buffers(std::os::fd::AsFd::as_fd(&sock), super::sock::SOCK_BUF);
        let (mut rd, mut wr) = tokio::io::split(sock);
        let (size, flags) = negotiate(&mut rd, &mut wr, export).await?;
        // From here on plain blocking I/O: requests are written by the submitting threads,
        // replies read by the waiting ones.
        let sock = rd
            .unsplit(wr)
            .into_std()
            .map_err(|e| NbdClientError::Io(format!("taking over the socket: {e}")))?;
        sock.set_nonblocking(false)
            .and_then(|()| sock.set_read_timeout(Some(READ_TICK)))
            .map_err(|e| NbdClientError::Io(format!("setting up the socket: {e}")))?;
        let direct = SockWriter::new(std::os::fd::AsFd::as_fd(&sock))
            .map_err(|e| NbdClientError::Io(format!("duplicating the socket: {e}")))?;
        let inner = Arc::new(Inner::new(
            None,
            Some(direct),
            Some(Mutex::new(ReadSide {
                sock,
                buf: Vec::with_capacity(64 << 10),
                partial: None,
                scratch: vec![0u8; 256 << 10].into_boxed_slice(),
                spin: Default::default(),
            })),
        ));
        Ok(NbdClient {
            inner,
            size,
            flags,
            export: export.to_owned(),
        })
    }

    /// Lists the exports of the server at `addr`.
    pub async fn list(addr: &str) -> Result<Vec<String>, NbdClientError> {
        let sock = TcpStream::connect(addr)
            .await
            .map_err(|e| NbdClientError::Io(format!("connecting to {addr}: {e}")))?;
        let (mut rd, mut wr) = tokio::io::split(sock);
        greet(&mut rd, &mut wr).await?;
        send_opt(&mut wr, OPT_LIST, &[]).await?;
        let mut names = Vec::new();
        loop {
            let r = read_opt_reply(&mut rd, OPT_LIST).await?;
            match r.reply {
                REP_ACK => break,
                REP_SERVER => {
                    let n = r
                        .data
                        .get(0..4)
                        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize);
                    let name = n.and_then(|n| r.data.get(4..4 + n)).ok_or_else(|| {
                        NbdClientError::Protocol("malformed NBD_REP_SERVER".into())
                    })?;
                    names.push(String::from_utf8_lossy(name).into_owned());
                }
                other => {
                    return Err(NbdClientError::Refused {
                        what: "NBD_OPT_LIST".into(),
                        message: format!("reply {other:#x}: {}", String::from_utf8_lossy(&r.data)),
                    });
                }
            }
        }
        let _ = send_opt(&mut wr, OPT_ABORT, &[]).await;
        Ok(names)
    }

    /// Negotiates on an established stream.
    pub async fn handshake<S>(stream: S, export: &str) -> Result<NbdClient, NbdClientError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let (size, flags) = negotiate(&mut rd, &mut wr, export).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer_task(BufWriter::new(wr), rx));
        let inner = Arc::new(Inner::new(Some(tx), None, None));
        tokio::spawn(reader_task(rd, inner.clone()));
        Ok(NbdClient {
            inner,
            size,
            flags,
            export: export.to_owned(),
        })
    }

    /// True when a small request is expected to be answered within about a round trip:
    /// nothing is in flight and no reply came late ([`SLOW_REPLY`]) within the last
    /// [`SLOW_MEMORY`]. (A closed client fails requests at once, which is quick too.)
    pub fn responsive(&self) -> bool {
        self.inner.responsive()
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Transmission flags sent by the server.
    pub fn flags(&self) -> u16 {
        self.flags
    }

    /// True when the export is read-only.
    pub fn read_only(&self) -> bool {
        self.flags & TFLAG_READ_ONLY != 0
    }

    /// The reason the connection closed, if it did.
    pub fn closed(&self) -> Option<String> {
        self.inner.state.lock().ok().and_then(|s| s.closed.clone())
    }

    fn submit(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: Option<&[u8]>,
        reply: ReplyTx,
    ) -> Result<u64, NbdClientError> {
        if len > MAX_REQUEST {
            return Err(NbdClientError::Invalid(format!(
                "{} of {len} bytes exceeds {MAX_REQUEST}",
                cmd_name(cmd)
            )));
        }
        let cookie = self.inner.next_cookie.fetch_add(1, Ordering::Relaxed);
        let hdr = Request {
            flags,
            cmd,
            cookie,
            offset,
            len,
        }
        .encode();
        let mut st = self
            .inner
            .state
            .lock()
            .map_err(|_| NbdClientError::Disconnected("state lock poisoned".into()))?;
        if let Some(why) = &st.closed {
            return Err(NbdClientError::Disconnected(why.clone()));
        }
        let read_len = if cmd == CMD_READ { len } else { 0 };
        st.pending.insert(
            cookie,
            Waiter {
                cmd,
                offset,
                read_len,
                reply,
                waiting: false,
            },
        );
        if let Some(tx) = &self.inner.tx {
            let mut frame = Vec::with_capacity(REQUEST_LEN + data.map_or(0, <[u8]>::len));
            frame.extend_from_slice(&hdr);
            if let Some(d) = data {
                frame.extend_from_slice(d);
            }
            if tx.send(frame).is_err() {
                st.pending.remove(&cookie);
                return Err(NbdClientError::Disconnected("writer stopped".into()));
            }
            return Ok(cookie);
        }
        // Direct: the waiter is registered first (the reply may come back at once); the state
        // lock is not held while writing, so the reader can match replies meanwhile.
        drop(st);
        let Some(w) = &self.inner.direct else {
            return Err(NbdClientError::Disconnected("no writer".into()));
        };
        if let Err(e) = w.write_frame(&[&hdr, data.unwrap_or(&[])]) {
            if let Ok(mut st) = self.inner.state.lock() {
                st.pending.remove(&cookie);
            }
            return Err(NbdClientError::Disconnected(format!(
                "sending a request: {e}"
            )));
        }
        Ok(cookie)
    }

    /// Sends a request from a plain thread; [`ReplyWaiter::wait`] yields the read data (empty
    /// for other commands) or the error.
    pub fn submit_sync(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: Option<&[u8]>,
    ) -> Result<ReplyWaiter, NbdClientError> {
        // Room for a reply and a reader-role hand-over.
        let (tx, rx) = std::sync::mpsc::sync_channel(2);
        let cookie = self.submit(cmd, flags, offset, len, data, ReplyTx::Sync(tx))?;
        Ok(ReplyWaiter {
            inner: self.inner.clone(),
            cookie,
            cmd,
            offset,
            rx,
        })
    }

    async fn request(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: Option<&[u8]>,
    ) -> ReplyResult {
        if self.inner.rside.is_some() {
            // A direct client's replies are read by waiting threads.
            let w = self.submit_sync(cmd, flags, offset, len, data)?;
            return tokio::task::spawn_blocking(move || w.wait(ASYNC_WAIT))
                .await
                .map_err(|e| NbdClientError::Disconnected(format!("reply waiter: {e}")))?;
        }
        let (tx, rx) = oneshot::channel();
        self.submit(cmd, flags, offset, len, data, ReplyTx::Async(tx))?;
        rx.await
            .map_err(|_| NbdClientError::Disconnected("reply dropped".into()))?
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, NbdClientError> {
        self.request(CMD_READ, 0, offset, len, None).await
    }

    /// Writes `data` at `offset`.
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), NbdClientError> {
        let len = u32::try_from(data.len())
            .map_err(|_| NbdClientError::Invalid("write too large".into()))?;
        self.request(
            CMD_WRITE,
            if fua { CMD_FLAG_FUA } else { 0 },
            offset,
            len,
            Some(data),
        )
        .await
        .map(drop)
    }

    /// Flushes.
    pub async fn flush(&self) -> Result<(), NbdClientError> {
        self.request(CMD_FLUSH, 0, 0, 0, None).await.map(drop)
    }

    /// Trims a range.
    pub async fn trim(&self, offset: u64, len: u32) -> Result<(), NbdClientError> {
        self.request(CMD_TRIM, 0, offset, len, None).await.map(drop)
    }

    /// Zeroes a range.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        no_hole: bool,
    ) -> Result<(), NbdClientError> {
        self.request(
            CMD_WRITE_ZEROES,
            if no_hole { CMD_FLAG_NO_HOLE } else { 0 },
            offset,
            len,
            None,
        )
        .await
        .map(drop)
    }

    /// Sends NBD_CMD_DISC; pending requests still get their replies.
    pub fn disconnect(&self) {
        let hdr = Request {
            flags: 0,
            cmd: CMD_DISC,
            cookie: 0,
            offset: 0,
            len: 0,
        }
        .encode();
        if let Some(tx) = &self.inner.tx {
            let _ = tx.send(hdr.to_vec());
        } else if let Some(w) = &self.inner.direct {
            let _ = w.write_frame(&[&hdr]);
            w.shutdown_write();
        }
    }
}

/// Fixed-newstyle negotiation up to transmission: (export size, transmission flags).
async fn negotiate<R, W>(rd: &mut R, wr: &mut W, export: &str) -> Result<(u64, u16), NbdClientError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let no_zeroes = greet(rd, wr).await?;
    send_opt(wr, OPT_GO, &encode_info_request(export, &[])).await?;
    let mut info: Option<(u64, u16)> = None;
    loop {
        let r = read_opt_reply(rd, OPT_GO).await?;
        match r.reply {
            REP_ACK => break,
            REP_INFO
                if r.data.len() >= 12
                    && u16::from_be_bytes([r.data[0], r.data[1]]) == INFO_EXPORT =>
            {
                let mut s = [0u8; 8];
                s.copy_from_slice(&r.data[2..10]);
                info = Some((
                    u64::from_be_bytes(s),
                    u16::from_be_bytes([r.data[10], r.data[11]]),
                ));
            }
            REP_ERR_UNSUP => {
                // Old server: fall back to NBD_OPT_EXPORT_NAME.
                send_opt(wr, OPT_EXPORT_NAME, export.as_bytes()).await?;
                let size = rd
                    .read_u64()
                    .await
                    .map_err(ioe("reading EXPORT_NAME reply (is the export name right?)"))?;
                let flags = rd
                    .read_u16()
                    .await
                    .map_err(ioe("reading EXPORT_NAME reply"))?;
                if !no_zeroes {
                    let mut z = [0u8; 124];
                    rd.read_exact(&mut z)
                        .await
                        .map_err(ioe("reading EXPORT_NAME padding"))?;
                }
                info = Some((size, flags));
                break;
            }
            other if other & REP_FLAG_ERROR != 0 => {
                return Err(NbdClientError::Refused {
                    what: format!("export {export:?}"),
                    message: format!("reply {other:#x}: {}", String::from_utf8_lossy(&r.data)),
                });
            }
            _ => {}
        }
    }
    let Some((size, flags)) = info else {
        return Err(NbdClientError::Protocol(
            "server sent no NBD_INFO_EXPORT".into(),
        ));
    };
    Ok((size, flags))
}

async fn writer_task<W: AsyncWrite + Unpin>(
    mut wr: BufWriter<W>,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
) {
    while let Some(frame) = rx.recv().await {
        let disc = frame.len() == REQUEST_LEN && frame[6..8] == CMD_DISC.to_be_bytes();
        if wr.write_all(&frame).await.is_err() {
            return;
        }
        if disc {
            let _ = wr.flush().await;
            let _ = wr.shutdown().await;
            return;
        }
        if rx.is_empty() && wr.flush().await.is_err() {
            return;
        }
    }
    let _ = wr.shutdown().await;
}

/// A simple reply's 16-byte header: (error, cookie). Err: not a simple reply (the reason).
fn parse_reply_header(hdr: &[u8]) -> Result<(u32, u64), String> {
    let magic = u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(format!("unexpected reply magic {magic:#x}"));
    }
    let error = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
    let mut c = [0u8; 8];
    c.copy_from_slice(&hdr[8..16]);
    Ok((error, u64::from_be_bytes(c)))
}

async fn reader_task<R: AsyncRead + Unpin>(mut rd: R, inner: Arc<Inner>) {
    let why = loop {
        let mut hdr = [0u8; 16];
        if let Err(e) = rd.read_exact(&mut hdr).await {
            break format!("connection closed: {e}");
        }
        let (error, cookie) = match parse_reply_header(&hdr) {
            Ok(h) => h,
            Err(why) => break why,
        };
        let waiter = inner
            .state
            .lock()
            .ok()
            .and_then(|mut s| s.pending.remove(&cookie));
        let Some(w) = waiter else {
            break format!("reply for unknown cookie {cookie}");
        };
        if error != 0 {
            w.reply.send(Err(NbdClientError::Remote {
                cmd: cmd_name(w.cmd),
                offset: w.offset,
                errno: error,
            }));
            continue;
        }
        let mut data = vec![0u8; w.read_len as usize];
        if let Err(e) = rd.read_exact(&mut data).await {
            w.reply.send(Err(NbdClientError::Disconnected(format!(
                "reading READ data: {e}"
            ))));
            break format!("reading READ data: {e}");
        }
        w.reply.send(Ok(data));
    };
    inner.close(why);
}
