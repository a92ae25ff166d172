//! The live comparer's event loop and the QMP server.
//!
//! One thread owns everything on the data path: it polls the input sockets (and their
//! listeners while they have no peer), decodes records, drives the engine, and writes released
//! frames to `outdev`; a frame therefore crosses no thread boundary between its arrival and its
//! release. The QMP server runs in its own threads and reaches the loop through a channel plus
//! a wake-up socket.

use std::collections::{BTreeMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use colo_proto::chardev::{ChardevEndpoint, FramedSender, Stream};
use colo_proto::frame::{Frame, FrameDecoder};
use colo_proto::qmp::{QmpError, QmpServer, Registry, serve_stdio, serve_unix};
use serde::Serialize;
use serde_json::{Value, json};

use super::config::QmpAddr;
use super::notify::{self, NotifyMsg};
use super::{CHECKPOINT_EVENT, LiveConfig, LiveError};

/// What the live driver needs from a comparison engine (implemented for
/// [`crate::engine::Engine`] in [`super::adapter`]).
pub trait LiveEngine: Send {
    fn on_primary(&mut self, frame: Frame, now: Duration);
    fn on_secondary(&mut self, frame: Frame, now: Duration);
    fn on_tick(&mut self, now: Duration);
    fn checkpoint_done(&mut self, now: Duration);
    fn next_deadline(&self) -> Option<Duration>;
    /// Moves the pending decisions into `out`.
    fn drain(&mut self, out: &mut Outputs);
    /// The engine's own counters (merged into `query-colo-compare`).
    fn stats_json(&self) -> Value;
}

/// Decisions taken out of the engine, in order.
#[derive(Debug, Default)]
pub struct Outputs {
    pub released: Vec<Frame>,
    pub dropped_secondary: u64,
    /// (reason code, human-readable detail, structured reason)
    pub checkpoints: Vec<(String, String, Value)>,
}

/// Which input a reader serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Input {
    Primary,
    Secondary,
    Notify,
}

enum Msg {
    Frames(Input, Vec<Frame>),
    Connected(Input, Option<Stream>),
    Disconnected(Input, Option<String>),
    CheckpointDone(SyncSender<Value>),
    Query(SyncSender<Value>),
}

/// Counters of the live driver, reported by `query-colo-compare` under `"live"`.
#[derive(Debug, Default, Clone, Serialize)]
pub struct LiveStats {
    pub primary_frames_in: u64,
    pub primary_bytes_in: u64,
    pub secondary_frames_in: u64,
    pub secondary_bytes_in: u64,
    /// Frames written to outdev.
    pub frames_out: u64,
    pub bytes_out: u64,
    /// Released but not yet written (outdev absent or slow).
    pub out_backlog: u64,
    /// Secondary frames dropped by the engine (matched twins and flushes).
    pub secondary_dropped: u64,
    /// Checkpoint requests from the engine, by reason.
    pub checkpoint_requests: BTreeMap<String, u64>,
    /// Notifications sent (QMP event and/or notify_dev).
    pub checkpoint_notifications: u64,
    /// Checkpoint-done received (QMP or notify_dev).
    pub checkpoints_done: u64,
    pub checkpoint_pending: bool,
    /// Connections accepted/made per endpoint.
    pub connections: BTreeMap<&'static str, u64>,
    /// Endpoints with a peer right now.
    pub connected: BTreeMap<&'static str, bool>,
    /// Peers lost with an error (bad record, I/O error).
    pub link_errors: u64,
}

fn input_name(i: Input) -> &'static str {
    match i {
        Input::Primary => "primary_in",
        Input::Secondary => "secondary_in",
        Input::Notify => "notify_dev",
    }
}

/// A running live comparer.
pub struct LiveHandle {
    cancel: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    qmp: Option<QmpServer>,
    done: Arc<(Mutex<bool>, std::sync::Condvar)>,
}

impl std::fmt::Debug for LiveHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveHandle").finish_non_exhaustive()
    }
}

impl LiveHandle {
    /// Blocks until `quit` (QMP) or [`LiveHandle::stop`].
    pub fn wait(mut self) {
        {
            let (lock, cv) = &*self.done;
            let mut done = lock.lock().unwrap_or_else(|e| e.into_inner());
            while !*done {
                done = cv.wait(done).unwrap_or_else(|e| e.into_inner());
            }
        }
        // Let the QMP server send the reply to `quit` before it is shut down.
        std::thread::sleep(Duration::from_millis(100));
        self.shutdown();
    }

    /// Stops every thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        if let Some(mut q) = self.qmp.take() {
            q.shutdown();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for LiveHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Opens every endpoint and starts the threads, with the real engine.
pub fn start(config: LiveConfig) -> Result<LiveHandle, LiveError> {
    let engine = super::adapter::new_engine(&config);
    start_with(config, Box::new(engine))
}

/// Same as [`start`] with any engine.
pub fn start_with(
    config: LiveConfig,
    engine: Box<dyn LiveEngine>,
) -> Result<LiveHandle, LiveError> {
    let cancel = Arc::new(AtomicBool::new(false));
    let done = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
    let (tx, rx) = mpsc::sync_channel::<Msg>(1024);
    let vnet = config.vnet_hdr_support;

    // Open every endpoint first, so a bad spec or a busy port fails startup.
    let primary = ChardevEndpoint::open(config.primary_in.clone())?;
    let secondary = ChardevEndpoint::open(config.secondary_in.clone())?;
    let outdev = FramedSender::new(ChardevEndpoint::open(config.outdev.clone())?, vnet);
    let notify = config
        .notify_dev
        .clone()
        .map(ChardevEndpoint::open)
        .transpose()?;

    let mut threads = Vec::new();
    let spawn = |name: &'static str, f: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(f)
            .map_err(|source| LiveError::Thread { name, source })
    };
    let mut ports = Vec::new();
    for (input, ep) in [
        (Input::Primary, Some(primary)),
        (Input::Secondary, Some(secondary)),
        (Input::Notify, notify),
    ] {
        if let Some(ep) = ep {
            ports.push(InputPort {
                input,
                ep,
                stream: None,
                dec: FrameDecoder::new(vnet),
                next_attempt: None,
            });
        }
    }
    let (wake_rx, wake_tx) = UnixStream::pair().map_err(|source| LiveError::Thread {
        name: "wake-up socket",
        source,
    })?;
    let _ = wake_tx.set_nonblocking(true);
    let _ = wake_rx.set_nonblocking(true);
    let wake_tx = Arc::new(wake_tx);

    let qmp = match &config.qmp {
        Some(addr) => {
            let mut reg = Registry::new().with_package("colo comparer");
            let (qtx, w) = (tx.clone(), wake_tx.clone());
            reg.add("query-colo-compare", move |_args| {
                ask(&qtx, &w, Msg::Query).map_err(QmpError::generic)
            });
            let (qtx, w) = (tx.clone(), wake_tx.clone());
            reg.add("colo-checkpoint-done", move |_args| {
                ask(&qtx, &w, Msg::CheckpointDone).map_err(QmpError::generic)
            });
            let d = done.clone();
            reg.add("quit", move |_args| {
                let (lock, cv) = &*d;
                *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
                cv.notify_all();
                Ok(Value::Null)
            });
            let server = match addr {
                QmpAddr::Unix(path) => serve_unix(path, reg),
                QmpAddr::Stdio => serve_stdio(reg),
            };
            Some(server.map_err(|e| LiveError::Qmp(e.to_string()))?)
        }
        None => None,
    };
    let events = qmp.as_ref().map(|q| q.events());
    drop(tx);

    let cancel2 = cancel.clone();
    let mut lp = EngineLoop {
        engine,
        outdev,
        backlog: VecDeque::new(),
        notify: None,
        stats: LiveStats::default(),
        config,
        events,
        start: Instant::now(),
        out: Outputs::default(),
        next_outdev_attempt: None,
        last_write: Instant::now(),
        _wake_tx: wake_tx.clone(),
    };
    threads.push(spawn(
        "cmp-engine",
        Box::new(move || lp.run(ports, &wake_rx, &rx, &cancel2)),
    )?);
    Ok(LiveHandle {
        cancel,
        threads,
        qmp,
        done,
    })
}

/// Sends a request to the engine loop, wakes it, and waits for its answer.
fn ask(
    tx: &SyncSender<Msg>,
    wake: &UnixStream,
    mk: fn(SyncSender<Value>) -> Msg,
) -> Result<Value, String> {
    let (rtx, rrx) = mpsc::sync_channel(1);
    tx.send(mk(rtx))
        .map_err(|_| "comparer is shutting down".to_owned())?;
    // A full wake-up socket already holds a wake-up: ignoring WouldBlock is right.
    let _ = (&*wake).write(&[1]);
    rrx.recv_timeout(Duration::from_secs(10))
        .map_err(|_| "comparer engine did not answer within 10 s".to_owned())
}

/// One input endpoint (primary_in, secondary_in, notify_dev) and its current peer.
struct InputPort {
    input: Input,
    ep: ChardevEndpoint,
    stream: Option<Stream>,
    dec: FrameDecoder,
    /// Connecting endpoints: when to try again (None: now).
    next_attempt: Option<Instant>,
}

/// What a poll slot watches.
#[derive(Clone, Copy)]
enum Slot {
    Wake,
    Stream(usize),
    Listener(usize),
}

/// Waits until one of `fds` is ready or `timeout` passes; fills in `revents`.
fn poll_fds(fds: &mut [libc::pollfd], timeout: Duration) -> usize {
    let ms = timeout.as_millis().min(1000) as libc::c_int;
    // SAFETY: `fds` is a valid, exclusively borrowed slice of pollfd for the whole call and
    // its length is passed as nfds; the descriptors are owned by the caller and stay open.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    usize::try_from(r).unwrap_or(0)
}

struct EngineLoop {
    engine: Box<dyn LiveEngine>,
    outdev: FramedSender,
    /// Released frames not yet written, in order.
    backlog: VecDeque<Frame>,
    /// Write half of the notify_dev peer.
    notify: Option<Stream>,
    stats: LiveStats,
    config: LiveConfig,
    events: Option<colo_proto::qmp::EventSink>,
    start: Instant,
    out: Outputs,
    /// When to try connecting/accepting outdev next (None: now).
    next_outdev_attempt: Option<Instant>,
    /// Last successful write to outdev.
    last_write: Instant,
    /// Keeps the sending end of the wake-up socket open (without QMP nobody else holds it,
    /// and a closed peer would make the receiving end readable forever).
    _wake_tx: Arc<UnixStream>,
}

/// Above this many unwritten frames the loop stops reading inputs until outdev drains.
const BACKLOG_LIMIT: usize = 65536;

impl EngineLoop {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn run(
        &mut self,
        mut ports: Vec<InputPort>,
        wake: &UnixStream,
        rx: &Receiver<Msg>,
        cancel: &AtomicBool,
    ) {
        self.stats.connected.insert("outdev", false);
        let mut buf = vec![0u8; 256 * 1024];
        let mut fds: Vec<libc::pollfd> = Vec::new();
        let mut slots: Vec<Slot> = Vec::new();
        // Peers accepted at startup (`wait=on`).
        for i in 0..ports.len() {
            if let Some(s) = ports[i].ep.take_pending() {
                self.attach(&mut ports, i, s);
            }
        }
        loop {
            if cancel.load(Ordering::Relaxed) {
                return;
            }
            self.service_outdev();
            let mut wait = Duration::from_millis(50);
            // Connecting inputs without a peer: (re)connect when due.
            for (i, port) in ports.iter_mut().enumerate() {
                if port.stream.is_some() || port.ep.spec().server {
                    continue;
                }
                let now = Instant::now();
                if let Some(t) = port.next_attempt
                    && now < t
                {
                    wait = wait.min(t - now);
                    continue;
                }
                let retry = port
                    .ep
                    .spec()
                    .reconnect
                    .unwrap_or(colo_proto::chardev::DEFAULT_RECONNECT);
                match port.ep.connect_once() {
                    Ok(s) => {
                        port.next_attempt = None;
                        self.attach(&mut ports, i, s);
                        break; // `ports` was borrowed again; look at the rest next round
                    }
                    Err(e) => {
                        tracing::debug!("{e}");
                        port.next_attempt = Some(now + retry);
                        wait = wait.min(retry);
                    }
                }
            }
            let now = self.now();
            if let Some(d) = self.engine.next_deadline() {
                wait = wait.min(d.saturating_sub(now));
            }
            if !self.backlog.is_empty() || !self.outdev.is_connected() {
                // outdev has no peer or is slow: look again soon.
                wait = wait.min(Duration::from_millis(5));
            }
            fds.clear();
            slots.clear();
            fds.push(pollfd(wake.as_raw_fd()));
            slots.push(Slot::Wake);
            if self.backlog.len() < BACKLOG_LIMIT {
                for (i, port) in ports.iter().enumerate() {
                    if let Some(s) = &port.stream {
                        fds.push(pollfd(s.as_raw_fd()));
                        slots.push(Slot::Stream(i));
                    } else if let Some(fd) = port.ep.listener_fd() {
                        fds.push(pollfd(fd));
                        slots.push(Slot::Listener(i));
                    }
                }
            }
            if poll_fds(&mut fds, wait) > 0 {
                for k in 0..fds.len() {
                    if fds[k].revents == 0 {
                        continue;
                    }
                    match slots[k] {
                        Slot::Wake => {
                            let mut sink = [0u8; 64];
                            while matches!((&*wake).read(&mut sink), Ok(n) if n > 0) {}
                        }
                        Slot::Listener(i) => {
                            let never = AtomicBool::new(false);
                            match ports[i].ep.accept(&never, Some(Duration::ZERO)) {
                                Ok(Some(s)) => self.attach(&mut ports, i, s),
                                Ok(None) => {}
                                Err(e) => tracing::warn!("{}: {e}", input_name(ports[i].input)),
                            }
                        }
                        Slot::Stream(i) => self.read_input(&mut ports[i], &mut buf),
                    }
                }
            }
            while let Ok(m) = rx.try_recv() {
                self.handle(m);
            }
            let now = self.now();
            if self.engine.next_deadline().is_some_and(|d| d <= now) {
                self.engine.on_tick(now);
            }
            self.collect();
        }
    }

    /// A new peer on input `i`.
    fn attach(&mut self, ports: &mut [InputPort], i: usize, s: Stream) {
        let port = &mut ports[i];
        tracing::info!("{}: peer connected", input_name(port.input));
        let write_half = if port.input == Input::Notify {
            s.try_clone().ok()
        } else {
            None
        };
        port.dec = FrameDecoder::new(self.config.vnet_hdr_support);
        port.stream = Some(s);
        self.handle(Msg::Connected(port.input, write_half));
    }

    /// Reads what input `port` has (poll said it would not block) and feeds the engine.
    fn read_input(&mut self, port: &mut InputPort, buf: &mut [u8]) {
        let Some(stream) = &mut port.stream else {
            return;
        };
        let gone = match stream.read(buf) {
            Ok(0) => Some(port.dec.finish().err().map(|e| e.to_string())),
            Ok(n) => {
                port.dec.push(&buf[..n]);
                let mut batch = Vec::new();
                let err = loop {
                    match port.dec.next_frame() {
                        Ok(Some(f)) => batch.push(f),
                        Ok(None) => break None,
                        Err(e) => break Some(e.to_string()),
                    }
                };
                if !batch.is_empty() {
                    self.handle(Msg::Frames(port.input, batch));
                }
                err.map(Some)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                None
            }
            Err(e) => Some(Some(e.to_string())),
        };
        if let Some(reason) = gone {
            if let Some(r) = &reason {
                tracing::warn!("{}: link dropped: {r}", input_name(port.input));
            } else {
                tracing::info!("{}: peer went away", input_name(port.input));
            }
            if let Some(s) = port.stream.take() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            self.handle(Msg::Disconnected(port.input, reason));
        }
    }

    fn handle(&mut self, m: Msg) {
        let now = self.now();
        match m {
            Msg::Frames(Input::Primary, frames) => {
                for f in frames {
                    self.stats.primary_frames_in += 1;
                    self.stats.primary_bytes_in += f.payload.len() as u64;
                    self.engine.on_primary(f, now);
                }
            }
            Msg::Frames(Input::Secondary, frames) => {
                for f in frames {
                    self.stats.secondary_frames_in += 1;
                    self.stats.secondary_bytes_in += f.payload.len() as u64;
                    self.engine.on_secondary(f, now);
                }
            }
            Msg::Frames(Input::Notify, frames) => {
                for f in frames {
                    match NotifyMsg::parse(&f) {
                        NotifyMsg::ProxyInit => self.notify_send(notify::GET_XEN_INIT),
                        NotifyMsg::CheckpointDone => self.checkpoint_done(),
                        NotifyMsg::Unknown(b) => tracing::warn!(
                            "notify_dev: unknown message {:?}",
                            String::from_utf8_lossy(&b)
                        ),
                    }
                }
            }
            Msg::Connected(input, stream) => {
                let name = input_name(input);
                *self.stats.connections.entry(name).or_default() += 1;
                self.stats.connected.insert(name, true);
                if input == Input::Notify {
                    self.notify = stream;
                }
            }
            Msg::Disconnected(input, reason) => {
                self.stats.connected.insert(input_name(input), false);
                if reason.is_some() {
                    self.stats.link_errors += 1;
                }
                if input == Input::Notify {
                    self.notify = None;
                }
            }
            Msg::CheckpointDone(reply) => {
                let before = self.stats.frames_out + self.backlog.len() as u64;
                let dropped_before = self.stats.secondary_dropped;
                self.checkpoint_done();
                let released = self.stats.frames_out + self.backlog.len() as u64 - before;
                let dropped = self.stats.secondary_dropped - dropped_before;
                let _ = reply.send(json!({"released": released, "dropped": dropped}));
            }
            Msg::Query(reply) => {
                self.stats.out_backlog = self.backlog.len() as u64;
                let _ = reply.send(json!({
                    "id": self.config.id,
                    "vnet_hdr_support": self.config.vnet_hdr_support,
                    "compare_timeout": self.config.compare_timeout.as_millis() as u64,
                    "expired_scan_cycle": self.config.expired_scan_cycle.as_millis() as u64,
                    "max_queue_size": self.config.max_queue_size,
                    "live": self.stats,
                    "engine": self.engine.stats_json(),
                }));
            }
        }
    }

    fn checkpoint_done(&mut self) {
        self.stats.checkpoints_done += 1;
        self.stats.checkpoint_pending = false;
        let now = self.now();
        self.engine.checkpoint_done(now);
        self.collect();
    }

    /// Takes the engine's decisions: released frames go out, checkpoint requests are notified.
    fn collect(&mut self) {
        let mut out = std::mem::take(&mut self.out);
        self.engine.drain(&mut out);
        self.stats.secondary_dropped += out.dropped_secondary;
        out.dropped_secondary = 0;
        if !out.released.is_empty() {
            self.backlog.extend(out.released.drain(..));
            self.service_outdev();
        }
        for (reason, detail, data) in out.checkpoints.drain(..) {
            // The engine already coalesces requests (one per pending checkpoint, repeated
            // while it stays pending); each one it emits is passed on.
            *self
                .stats
                .checkpoint_requests
                .entry(reason.clone())
                .or_default() += 1;
            self.stats.checkpoint_pending = true;
            self.stats.checkpoint_notifications += 1;
            tracing::info!("checkpoint requested: {detail}");
            if let Some(ev) = &self.events {
                ev.emit(
                    CHECKPOINT_EVENT,
                    json!({"id": self.config.id, "reason": reason, "detail": detail, "data": data}),
                );
            }
            self.notify_send(notify::DO_CHECKPOINT);
        }
        self.out = out;
    }

    fn notify_send(&mut self, msg: &str) {
        let Some(s) = &mut self.notify else { return };
        let Ok(bytes) = notify::encode_msg(msg) else {
            return;
        };
        let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
        if let Err(e) = s.write_all(&bytes) {
            tracing::warn!("notify_dev: sending {msg}: {e}");
            self.notify = None;
        }
    }

    /// Keeps outdev connected (a server accepts, a client connects, retrying at its
    /// `reconnect` interval) and writes the backlog to it.
    fn service_outdev(&mut self) {
        // A peer that closed while we were idle: a TCP write would still succeed once and
        // its frames would be lost, so look before writing after a pause. (While frames flow,
        // a closed peer shows up as a write error, and the frames are kept.)
        if self.outdev.is_connected()
            && !self.backlog.is_empty()
            && self.last_write.elapsed() > Duration::from_millis(1)
            && self.outdev.stream().is_some_and(peer_closed)
        {
            self.outdev.disconnect();
            self.stats.connected.insert("outdev", false);
        }
        if !self.outdev.is_connected() {
            let now = Instant::now();
            if self.next_outdev_attempt.is_some_and(|t| now < t) {
                return;
            }
            let spec = self.outdev.endpoint().spec();
            let retry = if spec.server {
                Duration::from_millis(5)
            } else {
                spec.reconnect
                    .unwrap_or(colo_proto::chardev::DEFAULT_RECONNECT)
            };
            self.next_outdev_attempt = Some(now + retry);
            match self.outdev.poll_connect() {
                Ok(true) => {
                    tracing::info!("outdev: peer connected");
                    self.next_outdev_attempt = None;
                    *self.stats.connections.entry("outdev").or_default() += 1;
                    self.stats.connected.insert("outdev", true);
                }
                Ok(false) => return,
                Err(e) => {
                    tracing::warn!("outdev: {e}");
                    return;
                }
            }
        }
        while !self.backlog.is_empty() {
            let (front, _) = self.backlog.as_slices();
            let batch = &front[..front.len().min(256)];
            let n = batch.len();
            match self.outdev.send_batch(batch) {
                Ok(()) => {
                    self.last_write = Instant::now();
                    self.stats.frames_out += n as u64;
                    self.stats.bytes_out +=
                        batch.iter().map(|f| f.payload.len() as u64).sum::<u64>();
                    self.backlog.drain(..n);
                }
                Err(e) => {
                    tracing::warn!("{e}; frames kept for the next peer");
                    self.stats.connected.insert("outdev", false);
                    self.stats.link_errors += 1;
                    return;
                }
            }
        }
    }
}

fn pollfd(fd: std::os::fd::RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Whether the peer of `s` has closed its end (readable with EOF or hung up), without blocking.
fn peer_closed(s: &Stream) -> bool {
    let fd = s.as_raw_fd();
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd for the duration of the call; nfds is 1; timeout 0 so
    // the call does not block. `fd` is owned by `s`, which outlives the call.
    let r = unsafe { libc::poll(&mut pfd, 1, 0) };
    r > 0 && pfd.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0
}
