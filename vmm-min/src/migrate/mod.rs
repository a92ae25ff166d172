//! Live migration control (QEMU's QMP shape): the source's migration thread with its status,
//! counters and parameters ([`Migration`]), the destination's receive ([`incoming`]), and the
//! QMP commands ([`register`]). The byte format is [`crate::state::migration`].
//!
//! Source: `migrate {"uri": "tcp:HOST:PORT"}` answers at once; a thread connects, sends every
//! page (zero pages as 8-byte records), then passes over the pages dirtied meanwhile (KVM log ∪
//! vhost-user shared log) until the remaining set would be sent within `downtime-limit` at the
//! measured rate (or after [`MAX_PASSES`]), then stops the vCPUs, stops the rings
//! (`GET_VRING_BASE`), sends the rest, the state and END, and waits for the destination's
//! acknowledgement (one byte [`ACK_OK`] once the stream verified and the state is restored).
//! Only then is the migration `completed`; the source stays stopped (`postmigrate`) until
//! `quit`. Any failure or `migrate_cancel` before that resumes the guest (rings restarted from
//! their bases, kicked) and ends in `failed` / `cancelled` with `error-desc`.
//!
//! Destination: `--incoming tcp:HOST:PORT` listens, takes one stream, writes pages into RAM as
//! they come, and starts the guest only after a valid END (checksum) and a successful restore.
//! On any error it answers [`ACK_REFUSED`] followed by the reason and exits with status 1.

use std::cell::Cell;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use colo_proto::qmp::{EventSink, QmpError, Registry, args};
use serde_json::{Value, json};

use crate::control::RunState;
use crate::state::format::PAGE_SIZE;
use crate::state::live::LiveVm;
use crate::state::migration::{
    Marker, SYNC_DONE, StreamWriter, all_pages, pages_from_bitmaps, receive_with,
};

/// Most dirty-page passes before the source stops the guest regardless of the estimate.
pub const MAX_PASSES: u64 = 30;
/// Pages per write between cancellation / bandwidth / progress checks (1 MiB).
const CHUNK: usize = 256;
/// The destination's answer once it has everything and restored the state.
pub const ACK_OK: u8 = 1;
/// The destination's answer when it refuses the stream (the reason follows as text).
pub const ACK_REFUSED: u8 = 0;
/// How long the source waits for the acknowledgement.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the destination waits for the next bytes of a started stream.
pub const STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// QEMU's default `downtime-limit` (ms).
pub const DEFAULT_DOWNTIME_LIMIT_MS: u64 = 300;
/// QEMU's default `max-bandwidth` (bytes/s).
pub const DEFAULT_MAX_BANDWIDTH: u64 = 128 << 20;

/// Errors of the migration control.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// Bad `uri` / `--incoming` value.
    #[error("{0:?}: expected tcp:HOST:PORT")]
    Uri(String),
    /// Network.
    #[error("{what} {addr}: {source}")]
    Net {
        /// The step.
        what: &'static str,
        /// HOST:PORT.
        addr: String,
        /// OS error.
        source: std::io::Error,
    },
    /// The stream (format, checksum, shape, I/O).
    #[error(transparent)]
    Format(#[from] crate::state::FormatError),
    /// Pausing, capturing, restoring.
    #[error(transparent)]
    Live(#[from] crate::state::LiveError),
    /// Dirty log.
    #[error(transparent)]
    Vm(#[from] crate::vm::VmError),
    /// The destination refused the stream or did not acknowledge it.
    #[error("destination: {0}")]
    Destination(String),
    /// `migrate_cancel`.
    #[error("cancelled")]
    Cancelled,
}

/// Parses `tcp:HOST:PORT` into `HOST:PORT`.
pub fn parse_tcp_uri(uri: &str) -> Result<String, MigrateError> {
    let rest = uri
        .strip_prefix("tcp:")
        .ok_or_else(|| MigrateError::Uri(uri.into()))?;
    match rest.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => Ok(rest.to_string()),
        _ => Err(MigrateError::Uri(uri.into())),
    }
}

/// QEMU's migration status names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// No migration yet.
    None,
    /// Connecting.
    Setup,
    /// Pre-copy passes.
    Active,
    /// Guest stopped, last pages and state on the way.
    Device,
    /// The destination has everything.
    Completed,
    /// Failed (the guest runs on here).
    Failed,
    /// Cancelled (the guest runs on here).
    Cancelled,
}

impl Status {
    /// The QMP name.
    pub fn name(self) -> &'static str {
        match self {
            Status::None => "none",
            Status::Setup => "setup",
            Status::Active => "active",
            Status::Device => "device",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }

    fn running(self) -> bool {
        matches!(self, Status::Setup | Status::Active | Status::Device)
    }
}

/// `migrate-set-parameters` values we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Longest acceptable downtime, ms.
    pub downtime_limit_ms: u64,
    /// Bandwidth cap of the pre-copy passes, bytes/s (0: none).
    pub max_bandwidth: u64,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            downtime_limit_ms: DEFAULT_DOWNTIME_LIMIT_MS,
            max_bandwidth: DEFAULT_MAX_BANDWIDTH,
        }
    }
}

#[derive(Debug, Clone)]
struct Info {
    status: Status,
    start: Option<Instant>,
    setup_ms: u64,
    total_ms: Option<u64>,
    downtime_ms: Option<u64>,
    expected_downtime_ms: u64,
    transferred: u64,
    remaining: u64,
    total: u64,
    duplicate: u64,
    normal: u64,
    dirty_rate: u64,
    mbps: f64,
    passes: u64,
    error: Option<String>,
}

impl Default for Info {
    fn default() -> Self {
        Self {
            status: Status::None,
            start: None,
            setup_ms: 0,
            total_ms: None,
            downtime_ms: None,
            expected_downtime_ms: 0,
            transferred: 0,
            remaining: 0,
            total: 0,
            duplicate: 0,
            normal: 0,
            dirty_rate: 0,
            mbps: 0.0,
            passes: 0,
            error: None,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn ms(d: Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX)
}

/// The source side: one outgoing migration at a time.
pub struct Migration {
    live: Arc<LiveVm>,
    events: EventSink,
    params: Mutex<Params>,
    info: Mutex<Info>,
    cancel: AtomicBool,
    /// A migration or a snapshot holds the VM state (one at a time).
    busy: AtomicBool,
    conn: Mutex<Option<TcpStream>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Sends pages in chunks, with bandwidth cap, cancellation and progress.
struct Sender<'a> {
    m: &'a Migration,
    w: StreamWriter<TcpStream>,
    last_print: Instant,
    pass: u64,
}

impl Sender<'_> {
    fn send(
        &mut self,
        pages: &[u64],
        throttle: bool,
        data: Option<&[(u64, u64)]>,
    ) -> Result<(), MigrateError> {
        let ram = self.m.live.ram().clone();
        let pass_start = Instant::now();
        let bytes_at_start = self.w.stats().bytes;
        for (i, chunk) in pages.chunks(CHUNK).enumerate() {
            if self.m.cancel.load(Ordering::SeqCst) {
                return Err(MigrateError::Cancelled);
            }
            self.w.send_pages_in(&ram, chunk, data)?;
            let st = self.w.stats();
            let left = (pages.len() - (i * CHUNK + chunk.len())) as u64 * PAGE_SIZE;
            let bw = self.m.params().max_bandwidth;
            if throttle && bw > 0 {
                let due = Duration::from_secs_f64((st.bytes - bytes_at_start) as f64 / bw as f64);
                let spent = pass_start.elapsed();
                if due > spent {
                    std::thread::sleep(due - spent);
                }
            }
            let elapsed = self.m.elapsed();
            {
                let mut info = lock(&self.m.info);
                info.transferred = st.bytes;
                info.duplicate = st.zero_pages;
                info.normal = st.pages;
                info.remaining = left;
                let secs = elapsed.as_secs_f64();
                if secs > 0.0 {
                    info.mbps = st.bytes as f64 * 8.0 / secs / 1e6;
                }
            }
            if elapsed > Duration::from_secs(2)
                && self.last_print.elapsed() >= Duration::from_secs(1)
            {
                self.last_print = Instant::now();
                let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
                eprintln!(
                    "vmm-min: migration pass {}, {:.1} MiB sent, {:.1} MiB remaining, {:.1} MiB/s",
                    self.pass,
                    mib(st.bytes),
                    mib(left),
                    mib(st.bytes) / elapsed.as_secs_f64().max(0.001)
                );
            }
        }
        Ok(())
    }
}

impl Migration {
    /// The controller over `live`, emitting `MIGRATION` events to `events`.
    pub fn new(live: Arc<LiveVm>, events: EventSink) -> Arc<Self> {
        Arc::new(Self {
            live,
            events,
            params: Mutex::new(Params::default()),
            info: Mutex::new(Info::default()),
            cancel: AtomicBool::new(false),
            busy: AtomicBool::new(false),
            conn: Mutex::new(None),
            thread: Mutex::new(None),
        })
    }

    /// Current parameters.
    pub fn params(&self) -> Params {
        *lock(&self.params)
    }

    /// Sets parameters (applies to the running migration from its next pass).
    pub fn set_params(&self, p: Params) {
        *lock(&self.params) = p;
    }

    /// Current status.
    pub fn status(&self) -> Status {
        lock(&self.info).status
    }

    fn elapsed(&self) -> Duration {
        lock(&self.info)
            .start
            .map(|s| s.elapsed())
            .unwrap_or_default()
    }

    fn set_status(&self, s: Status) {
        {
            let mut info = lock(&self.info);
            if info.status == s {
                return;
            }
            info.status = s;
        }
        tracing::info!(status = s.name(), "migration");
        self.events.emit("MIGRATION", json!({"status": s.name()}));
    }

    /// Starts a migration to `uri` (`tcp:HOST:PORT`) in a thread.
    pub fn start(self: &Arc<Self>, uri: &str) -> Result<(), String> {
        let addr = parse_tcp_uri(uri).map_err(|e| e.to_string())?;
        match self.live.control().run_state() {
            RunState::Shutdown => return Err("the VM has shut down".into()),
            RunState::InMigrate => return Err("an incoming migration is in progress".into()),
            RunState::PostMigrate => {
                return Err("the guest has already been migrated away".into());
            }
            RunState::Running | RunState::Paused => {}
        }
        if self
            .busy
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return Err("a migration or a snapshot is already running".into());
        }
        {
            let mut info = lock(&self.info);
            *info = Info {
                start: Some(Instant::now()),
                total: self.live.ram().size(),
                ..Info::default()
            };
        }
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
        self.cancel.store(false, Ordering::SeqCst);
        self.set_status(Status::Setup);
        let me = self.clone();
        let t = std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || {
                me.run(&addr);
                me.busy.store(false, Ordering::SeqCst);
            })
            .map_err(|e| {
                self.busy.store(false, Ordering::SeqCst);
                self.set_status(Status::Failed);
                format!("cannot start the migration thread: {e}")
            })?;
        *lock(&self.thread) = Some(t);
        Ok(())
    }

    /// `migrate_cancel`: stops a running migration (the guest runs on here).
    pub fn cancel(&self) {
        if !self.status().running() {
            return;
        }
        self.cancel.store(true, Ordering::SeqCst);
        if let Some(c) = &*lock(&self.conn) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    /// After a failed write: the destination may have said why it refused the stream.
    fn refusal(&self) -> Option<String> {
        let c = lock(&self.conn).as_ref()?.try_clone().ok()?;
        c.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
        let mut b = Vec::new();
        let _ = (&c).take(4097).read_to_end(&mut b);
        match b.split_first() {
            Some((&ACK_REFUSED, why)) => Some(String::from_utf8_lossy(why).trim().to_string()),
            _ => None,
        }
    }

    fn run(&self, addr: &str) {
        let mut stopped = None;
        let r = self.migrate(addr, &mut stopped);
        let r = match r {
            Err(MigrateError::Format(e)) if !self.cancel.load(Ordering::SeqCst) => {
                match self.refusal() {
                    Some(why) => Err(MigrateError::Destination(format!(
                        "refused the stream: {why}"
                    ))),
                    None => Err(MigrateError::Format(e)),
                }
            }
            r => r,
        };
        let total = self.elapsed();
        lock(&self.info).total_ms = Some(ms(total));
        *lock(&self.conn) = None;
        match r {
            Ok(()) => {
                eprintln!(
                    "vmm-min: migration completed in {} ms (downtime {} ms)",
                    ms(total),
                    lock(&self.info).downtime_ms.unwrap_or(0)
                );
                self.set_status(Status::Completed);
            }
            Err(e) => {
                // The guest carries on here: rings restarted, vCPUs resumed if we paused them.
                if let Some(was_running) = stopped {
                    let res = if was_running {
                        self.live.resume()
                    } else {
                        self.live.resume_devices()
                    };
                    if let Err(e) = res {
                        tracing::error!("resuming after a failed migration: {e}");
                    }
                }
                let cancelled = self.cancel.load(Ordering::SeqCst);
                let desc = if cancelled {
                    "migration cancelled".to_string()
                } else {
                    format!("migration to {addr} failed: {e}")
                };
                eprintln!("vmm-min: {desc}");
                lock(&self.info).error = Some(desc);
                self.set_status(if cancelled {
                    Status::Cancelled
                } else {
                    Status::Failed
                });
            }
        }
    }

    fn migrate(&self, addr: &str, stopped: &mut Option<bool>) -> Result<(), MigrateError> {
        let net = |what| {
            let addr = addr.to_string();
            move |source| MigrateError::Net { what, addr, source }
        };
        let sa = addr
            .to_socket_addrs()
            .map_err(net("resolving"))?
            .next()
            .ok_or_else(|| MigrateError::Uri(format!("tcp:{addr}")))?;
        let stream = TcpStream::connect_timeout(&sa, Duration::from_secs(10))
            .map_err(net("connecting to"))?;
        let _ = stream.set_nodelay(true);
        stream
            .set_write_timeout(Some(ACK_TIMEOUT))
            .map_err(net("socket options for"))?;
        *lock(&self.conn) = Some(stream.try_clone().map_err(net("socket clone for"))?);
        if self.cancel.load(Ordering::SeqCst) {
            return Err(MigrateError::Cancelled);
        }
        let mut ack = stream.try_clone().map_err(net("socket clone for"))?;
        ack.set_read_timeout(Some(ACK_TIMEOUT))
            .map_err(net("socket options for"))?;
        let w = StreamWriter::start(stream, &self.live.shape())?;
        let mut s = Sender {
            m: self,
            w,
            last_print: Instant::now(),
            pass: 1,
        };
        let dirty = self.live.dirty().clone();
        // Switch dirty logging on (or clear what an earlier reader left): pass 1 sends all.
        dirty.collect()?;
        lock(&self.info).setup_ms = ms(self.elapsed());
        self.set_status(Status::Active);
        let mut pages = all_pages(self.live.ram());
        // Pass 1 sends never-touched pages (memfd holes) as zero records without reading them;
        // a page written after this point is in the dirty log.
        let mut data = self.live.ram().data_extents().ok();
        loop {
            let t = Instant::now();
            let before = s.w.stats();
            let io_before = s.w.io_time();
            let (cpu_me, cpu_all) = (cpu_time(true), cpu_time(false));
            s.send(&pages, true, data.take().as_deref())?;
            let t_sent = Instant::now();
            // Wait until the destination has applied everything so far: the rate below is
            // end to end, and no backlog in the socket buffers is left for the downtime.
            s.w.sync()?;
            wait_sync(&mut ack)?;
            let t_synced = Instant::now();
            let spent = t_synced.duration_since(t).as_secs_f64().max(1e-3);
            let after = s.w.stats();
            let rate = (after.bytes - before.bytes) as f64 / spent;
            pages = pages_from_bitmaps(&dirty.collect()?);
            let t_collected = Instant::now();
            let cpu_me = cpu_time(true).saturating_sub(cpu_me);
            let cpu_others = cpu_time(false)
                .saturating_sub(cpu_all)
                .saturating_sub(cpu_me);
            let remaining = pages.len() as u64 * PAGE_SIZE;
            // Zero pages cost 8 bytes, but assume the worst (content) for the estimate.
            let bw = if rate > 1.0 {
                rate
            } else {
                self.params().max_bandwidth.max(1) as f64
            };
            let expected = Duration::from_secs_f64(remaining as f64 / bw);
            {
                let mut info = lock(&self.info);
                info.passes = s.pass;
                info.remaining = remaining;
                info.dirty_rate = (pages.len() as f64 / spent) as u64;
                info.expected_downtime_ms = ms(expected);
            }
            let us = |a: Instant, b: Instant| b.saturating_duration_since(a).as_micros();
            eprintln!(
                "vmm-min: migration pass {}: {} pages ({} zero), {:.1} MiB in {} us \
                 (socket writes {} us, sync wait {} us), {:.1} Mbit/s; dirty log {} us: {} \
                 pages dirty, expected downtime {} ms; CPU: migration thread {} ms, the \
                 process's other threads (vCPUs...) {} ms",
                s.pass,
                (after.pages + after.zero_pages) - (before.pages + before.zero_pages),
                after.zero_pages - before.zero_pages,
                (after.bytes - before.bytes) as f64 / (1u64 << 20) as f64,
                us(t, t_sent),
                (s.w.io_time() - io_before).as_micros(),
                us(t_sent, t_synced),
                rate * 8.0 / 1e6,
                us(t_synced, t_collected),
                pages.len(),
                ms(expected),
                cpu_me.as_millis(),
                cpu_others.as_millis()
            );
            let limit = Duration::from_millis(self.params().downtime_limit_ms);
            if expected <= limit || s.pass >= MAX_PASSES {
                break;
            }
            s.pass += 1;
        }
        // Stop and copy.
        self.set_status(Status::Device);
        let prio = SwitchPriority::raise();
        s.w.stopping()?;
        let t_stop = Instant::now();
        let was_running = self.live.control().run_state() == RunState::Running;
        let snap = self.live.pause_and_capture()?;
        *stopped = Some(was_running);
        let t_captured = Instant::now();
        let capture_steps = self.live.last_timings();
        let mut last = pages_from_bitmaps(&dirty.collect()?);
        last.extend_from_slice(&pages);
        last.sort_unstable();
        last.dedup();
        s.pass += 1;
        lock(&self.info).passes = s.pass;
        s.send(&last, false, None)?;
        let t_pages = Instant::now();
        let (_, stats) = s.w.finish(&snap)?;
        let t_end = Instant::now();
        {
            let mut info = lock(&self.info);
            info.transferred = stats.bytes;
            info.normal = stats.pages;
            info.duplicate = stats.zero_pages;
            info.remaining = 0;
        }
        // Wait for the destination: it answers once the stream verified and it restored.
        let mut b = [0u8; 1];
        match ack.read(&mut b) {
            Ok(1) if b[0] == ACK_OK => {}
            Ok(1) => {
                let mut why = Vec::new();
                let _ = (&mut ack).take(4096).read_to_end(&mut why);
                return Err(MigrateError::Destination(format!(
                    "refused the stream: {}",
                    String::from_utf8_lossy(&why).trim()
                )));
            }
            Ok(_) => {
                return Err(MigrateError::Destination(
                    "closed the connection without acknowledging the stream".into(),
                ));
            }
            Err(e) => {
                return Err(MigrateError::Destination(format!(
                    "no acknowledgement: {e}"
                )));
            }
        }
        if self.cancel.load(Ordering::SeqCst) {
            // The destination has everything and runs: too late to cancel.
            tracing::warn!("migrate_cancel arrived after the destination acknowledged");
        }
        self.live.control().set_postmigrate(true);
        lock(&self.info).downtime_ms = Some(ms(t_stop.elapsed()));
        let us = |a: Instant, b: Instant| b.saturating_duration_since(a).as_micros();
        eprintln!(
            "vmm-min: migration downtime: pause+capture {} us ({capture_steps}), last {} pages {} us, \
             state+END {} us, acknowledgement {} us (real-time priority: {})",
            us(t_stop, t_captured),
            last.len(),
            us(t_captured, t_pages),
            us(t_pages, t_end),
            us(t_end, Instant::now()),
            prio.raised()
        );
        Ok(())
    }

    /// `query-migrate`.
    pub fn query(&self) -> Value {
        let info = lock(&self.info).clone();
        if info.status == Status::None {
            return json!({});
        }
        let mut v = json!({"status": info.status.name()});
        let o = v.as_object_mut();
        let Some(o) = o else { return v };
        let elapsed = info.start.map(|s| ms(s.elapsed())).unwrap_or(0);
        o.insert("total-time".into(), json!(info.total_ms.unwrap_or(elapsed)));
        o.insert("setup-time".into(), json!(info.setup_ms));
        if let Some(d) = info.downtime_ms {
            o.insert("downtime".into(), json!(d));
        } else if info.status.running() {
            o.insert("expected-downtime".into(), json!(info.expected_downtime_ms));
        }
        if info.status != Status::Setup {
            o.insert(
                "ram".into(),
                json!({
                    "transferred": info.transferred,
                    "remaining": info.remaining,
                    "total": info.total,
                    "duplicate": info.duplicate,
                    "normal": info.normal,
                    "normal-bytes": info.normal * PAGE_SIZE,
                    "dirty-pages-rate": info.dirty_rate,
                    "mbps": info.mbps,
                    "dirty-sync-count": info.passes,
                    "page-size": PAGE_SIZE,
                }),
            );
        }
        if let Some(e) = info.error {
            o.insert("error-desc".into(), json!(e));
        }
        v
    }

    /// True while the migration thread holds the guest stopped for the last copy: `cont`
    /// must wait.
    pub fn switching_over(&self) -> bool {
        self.status() == Status::Device
    }

    /// True while a migration runs.
    pub fn active(&self) -> bool {
        self.status().running()
    }
}

/// While alive, the calling thread runs at real-time priority (`SCHED_FIFO` 1, not inherited
/// by threads it starts) when the process may (CAP_SYS_NICE): the switch-over is then not
/// stretched by the guest's own threads or other processes on a loaded host. Without the
/// permission nothing changes.
pub struct SwitchPriority {
    old: Option<(libc::c_int, libc::sched_param)>,
}

impl SwitchPriority {
    /// Raises the calling thread's priority (see the type).
    pub fn raise() -> Self {
        let mut old = libc::sched_param { sched_priority: 0 };
        // SAFETY: sched_getscheduler/sched_getparam on the calling thread (0), `old` is a
        // valid out pointer.
        let policy = unsafe { libc::sched_getscheduler(0) };
        // SAFETY: as above.
        if policy < 0 || unsafe { libc::sched_getparam(0, &raw mut old) } != 0 {
            return Self { old: None };
        }
        let p = libc::sched_param { sched_priority: 1 };
        // SAFETY: sets the calling thread's policy; `p` is a valid pointer.
        let rc = unsafe {
            libc::sched_setscheduler(
                0,
                libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK,
                &raw const p,
            )
        };
        if rc != 0 {
            tracing::debug!(
                "switch-over at normal priority: {}",
                std::io::Error::last_os_error()
            );
            return Self { old: None };
        }
        Self {
            old: Some((policy, old)),
        }
    }

    /// True when the priority was raised.
    pub fn raised(&self) -> bool {
        self.old.is_some()
    }
}

impl Drop for SwitchPriority {
    fn drop(&mut self) {
        if let Some((policy, p)) = self.old.take() {
            // SAFETY: restores the calling thread's policy saved by `raise` (callers create and
            // drop the guard on one thread); `p` is a valid pointer.
            unsafe { libc::sched_setscheduler(0, policy, &raw const p) };
        }
    }
}

/// Read calls on the incoming socket: how many, bytes, time inside them (per-pass line).
#[derive(Default, Clone)]
struct ReadCounts {
    calls: Cell<u64>,
    bytes: Cell<u64>,
    time: Cell<Duration>,
}

struct CountingReader<R> {
    r: R,
    counts: Rc<ReadCounts>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let t = Instant::now();
        let r = self.r.read(buf);
        let c = &self.counts;
        c.time.set(c.time.get() + t.elapsed());
        c.calls.set(c.calls.get() + 1);
        if let Ok(n) = r {
            c.bytes.set(c.bytes.get() + n as u64);
        }
        r
    }
}

/// The calling thread's user and system CPU time, minor page faults and context switches
/// (`getrusage(RUSAGE_THREAD)`; zeros if it fails).
#[derive(Clone, Copy, Default)]
struct ThreadUsage {
    user: Duration,
    sys: Duration,
    minflt: i64,
    vcsw: i64,
    ivcsw: i64,
}

impl ThreadUsage {
    fn now() -> Self {
        // SAFETY: an all-zero rusage is a valid value of this plain C struct.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage with a valid `who` and out pointer.
        if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &raw mut u) } != 0 {
            return Self::default();
        }
        let tv = |t: libc::timeval| {
            Duration::from_secs(t.tv_sec.max(0) as u64)
                + Duration::from_micros(t.tv_usec.max(0) as u64)
        };
        Self {
            user: tv(u.ru_utime),
            sys: tv(u.ru_stime),
            minflt: u.ru_minflt,
            vcsw: u.ru_nvcsw,
            ivcsw: u.ru_nivcsw,
        }
    }

    fn since(&self, before: &Self) -> Self {
        Self {
            user: self.user.saturating_sub(before.user),
            sys: self.sys.saturating_sub(before.sys),
            minflt: self.minflt - before.minflt,
            vcsw: self.vcsw - before.vcsw,
            ivcsw: self.ivcsw - before.ivcsw,
        }
    }
}

/// CPU time of the calling thread (`thread`) or of the whole process.
fn cpu_time(thread: bool) -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let clock = if thread {
        libc::CLOCK_THREAD_CPUTIME_ID
    } else {
        libc::CLOCK_PROCESS_CPUTIME_ID
    };
    // SAFETY: clock_gettime with a valid clock id and out pointer.
    if unsafe { libc::clock_gettime(clock, &raw mut t) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        t.tv_sec.max(0) as u64,
        t.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// Waits for the destination's answer to a SYNC section.
fn wait_sync(ack: &mut TcpStream) -> Result<(), MigrateError> {
    let mut b = [0u8; 1];
    match ack.read(&mut b) {
        Ok(1) if b[0] == SYNC_DONE => Ok(()),
        Ok(1) if b[0] == ACK_REFUSED => {
            let mut why = Vec::new();
            let _ = ack.take(4096).read_to_end(&mut why);
            Err(MigrateError::Destination(format!(
                "refused the stream: {}",
                String::from_utf8_lossy(&why).trim()
            )))
        }
        Ok(1) => Err(MigrateError::Destination(format!(
            "unexpected answer {:#x} to a sync request",
            b[0]
        ))),
        Ok(_) => Err(MigrateError::Destination(
            "closed the connection during the migration".into(),
        )),
        Err(e) => Err(MigrateError::Destination(format!(
            "no answer to a sync request: {e}"
        ))),
    }
}

/// Destination: listens on `uri`, receives one stream into the paused VM and restores it,
/// then calls `start` (which resumes the guest: [`LiveVm::resume`]) and only then acknowledges
/// the stream, so that a source reporting `completed` means a destination that runs. On error
/// `start` is not called and the guest must not run.
pub fn incoming(
    uri: &str,
    live: &LiveVm,
    start: Box<dyn FnOnce() + Send>,
) -> Result<(), MigrateError> {
    let addr = parse_tcp_uri(uri)?;
    let net = |what| {
        let addr = addr.clone();
        move |source| MigrateError::Net { what, addr, source }
    };
    let listener = TcpListener::bind(&addr).map_err(net("listening on"))?;
    // The backends get the memory table now, not inside the downtime.
    live.prepare_incoming();
    eprintln!("vmm-min: waiting for migration on {addr}");
    let (stream, peer) = listener.accept().map_err(net("accepting on"))?;
    drop(listener);
    tracing::info!(%peer, "incoming migration");
    stream
        .set_read_timeout(Some(STREAM_IDLE_TIMEOUT))
        .map_err(net("socket options for"))?;
    let mut answer = stream.try_clone().map_err(net("socket clone for"))?;
    let mut sync_w = stream.try_clone().map_err(net("socket clone for"))?;
    let t = Instant::now();
    let mut prio: Option<SwitchPriority> = None;
    let (mut last_sync, mut cpu_at_sync) = (Instant::now(), cpu_time(true));
    let (mut use_at_sync, counts) = (ThreadUsage::now(), Rc::new(ReadCounts::default()));
    let mut reads_at_sync = ReadCounts::default();
    let mut syncs = 0u64;
    let mut on_marker = |m: Marker| match m {
        Marker::Sync => {
            sync_w.write_all(&[SYNC_DONE])?;
            syncs += 1;
            let cpu = cpu_time(true);
            let u = ThreadUsage::now();
            let d = u.since(&use_at_sync);
            let calls = counts.calls.get() - reads_at_sync.calls.get();
            let bytes = counts.bytes.get() - reads_at_sync.bytes.get();
            let in_read = counts.time.get().saturating_sub(reads_at_sync.time.get());
            eprintln!(
                "vmm-min: incoming pass {syncs} applied: {} us, receive thread CPU {} us \
                 (user {} us, system {} us; {} minor faults, {} voluntary + {} involuntary \
                 context switches); {} socket reads of {} KiB on average, {} us in them",
                last_sync.elapsed().as_micros(),
                cpu.saturating_sub(cpu_at_sync).as_micros(),
                d.user.as_micros(),
                d.sys.as_micros(),
                d.minflt,
                d.vcsw,
                d.ivcsw,
                calls,
                bytes.checked_div(calls.max(1) * 1024).unwrap_or(0),
                in_read.as_micros()
            );
            (last_sync, cpu_at_sync, use_at_sync) = (Instant::now(), cpu, u);
            reads_at_sync = (*counts).clone();
            Ok(())
        }
        Marker::Stopped => {
            prio = Some(SwitchPriority::raise());
            Ok(())
        }
    };
    let counted = CountingReader {
        r: stream,
        counts: counts.clone(),
    };
    let result = receive_with(counted, &live.shape(), live.ram(), &mut on_marker)
        .map_err(MigrateError::from)
        .and_then(|(snap, stats, report)| {
            let r = Instant::now();
            live.restore(&snap)?;
            Ok((stats, report, r))
        });
    match result {
        Ok((stats, report, t_restore)) => {
            let t_restored = Instant::now();
            let steps = live.last_timings();
            start();
            let t_started = Instant::now();
            let _ = answer.write_all(&[ACK_OK]);
            let t_acked = Instant::now();
            let raised = prio.take().is_some_and(|p| p.raised());
            eprintln!(
                "vmm-min: incoming migration complete in {} ms ({} pages, {} zero pages; \
                 state restored in {} us)",
                ms(t.elapsed()),
                stats.pages,
                stats.zero_pages,
                t_restored.duration_since(t_restore).as_micros()
            );
            let us = |a: Option<Instant>, b: Option<Instant>| match (a, b) {
                (Some(a), Some(b)) => b.saturating_duration_since(a).as_micros().to_string(),
                _ => "-".into(),
            };
            eprintln!(
                "vmm-min: incoming switch-over: {} pages + state start {} us after the last sync, \
                 state ({} bytes) parse {} us, END {} us, restore {} us ({steps}), resume {} us, \
                 ack {} us; last sync to ack {} us, STOPPED to ack {} us (real-time priority: \
                 {raised})",
                report.pages_after_sync,
                us(report.last_sync, report.state_start),
                report.state_len,
                us(report.state_start, report.state_parsed),
                us(report.state_parsed, report.end),
                us(report.end, Some(t_restored)),
                us(Some(t_restored), Some(t_started)),
                us(Some(t_started), Some(t_acked)),
                us(report.last_sync, Some(t_acked)),
                us(report.stopped, Some(t_acked)),
            );
            Ok(())
        }
        Err(e) => {
            let mut msg = vec![ACK_REFUSED];
            msg.extend_from_slice(e.to_string().as_bytes());
            let _ = answer.write_all(&msg);
            let _ = answer.shutdown(std::net::Shutdown::Write);
            // Read what the source still sends for a moment, so that closing does not reset
            // the connection before the source has read the reason.
            let _ = answer.set_read_timeout(Some(Duration::from_millis(200)));
            let until = Instant::now() + Duration::from_secs(2);
            let mut sink = [0u8; 64 << 10];
            while Instant::now() < until {
                match answer.read(&mut sink) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(_) => break,
                }
            }
            Err(e)
        }
    }
}

fn generic(msg: impl Into<String>) -> QmpError {
    QmpError::generic(msg)
}

/// Registers `migrate`, `migrate_cancel`, `query-migrate`, `migrate-set-parameters`,
/// `query-migrate-parameters` and `snapshot-save-file` over `m`.
pub fn register(r: &mut Registry, m: &Arc<Migration>) {
    {
        let m = m.clone();
        r.add("migrate", move |a| {
            args::reject_unknown(a, &["uri", "blk", "inc", "detach", "resume"])?;
            let uri = args::required_str(a, "uri")?;
            m.start(uri).map_err(|e| generic(format!("migrate: {e}")))?;
            Ok(json!({}))
        });
    }
    {
        let m = m.clone();
        r.add("migrate_cancel", move |a| {
            args::reject_unknown(a, &[])?;
            m.cancel();
            Ok(json!({}))
        });
    }
    {
        let m = m.clone();
        r.add("query-migrate", move |a| {
            args::reject_unknown(a, &[])?;
            Ok(m.query())
        });
    }
    {
        let m = m.clone();
        r.add("migrate-set-parameters", move |a| {
            args::reject_unknown(a, &["downtime-limit", "max-bandwidth"])?;
            let mut p = m.params();
            if let Some(d) = args::optional_u64(a, "downtime-limit")? {
                if d > 2_000_000 {
                    return Err(args::invalid_value(
                        "downtime-limit",
                        "a time in ms up to 2000000",
                    ));
                }
                p.downtime_limit_ms = d;
            }
            if let Some(b) = args::optional_u64(a, "max-bandwidth")? {
                p.max_bandwidth = b;
            }
            m.set_params(p);
            Ok(json!({}))
        });
    }
    {
        let m = m.clone();
        r.add("query-migrate-parameters", move |a| {
            args::reject_unknown(a, &[])?;
            let p = m.params();
            Ok(json!({"downtime-limit": p.downtime_limit_ms, "max-bandwidth": p.max_bandwidth}))
        });
    }
    {
        let m = m.clone();
        r.add("snapshot-save-file", move |a| {
            args::reject_unknown(a, &["path", "resume"])?;
            let path = std::path::PathBuf::from(args::required_str(a, "path")?);
            let resume = args::optional_bool(a, "resume")?.unwrap_or(true);
            if m.busy
                .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
            {
                return Err(generic(
                    "snapshot-save-file: a migration or another snapshot is running",
                ));
            }
            let r = save_snapshot(&m, &path, resume);
            m.busy.store(false, Ordering::SeqCst);
            r
        });
    }
}

/// `snapshot-save-file` with the busy flag held.
fn save_snapshot(m: &Migration, path: &std::path::Path, resume: bool) -> Result<Value, QmpError> {
    match m.live.control().run_state() {
        RunState::Running | RunState::Paused => {}
        s => {
            return Err(generic(format!(
                "snapshot-save-file: the VM cannot be saved in state {s:?}"
            )));
        }
    }
    let was_running = m.live.control().run_state() == RunState::Running;
    let snap = m
        .live
        .pause_and_capture()
        .map_err(|e| generic(format!("snapshot-save-file: {e}")))?;
    let saved = crate::state::format::save_file(path, &snap, m.live.ram());
    // Resume (or, when asked not to, leave it paused with the rings stopped: `cont`
    // restarts them); after a failure the VM is left as it was.
    let res = if resume || saved.is_err() {
        if was_running {
            m.live.resume()
        } else {
            m.live.resume_devices()
        }
    } else {
        Ok(())
    };
    let n = saved.map_err(|e| generic(format!("snapshot-save-file: {e}")))?;
    res.map_err(|e| generic(format!("snapshot-save-file: saved, but resuming: {e}")))?;
    tracing::info!(path = %path.display(), bytes = n, "snapshot saved");
    Ok(json!({}))
}
