//! Benchmark: our `comparer` against QEMU 7.2's `colo-compare`, fed the same frames over the
//! same kind of sockets (Unix, QEMU's chardev framing) in the same run.
//!
//! Each implementation runs as its own process and connects, as a chardev client, to three Unix
//! sockets this program listens on (primary_in, secondary_in, outdev). The frames are one TCP
//! stream of identical primary and secondary segments (so both implementations release every
//! frame after a successful comparison, nothing is waved through).
//!
//! - Throughput: N frames per size (64, 1500, 9000 bytes of Ethernet frame), at most `WINDOW`
//!   frames in flight (sent on primary_in, not yet back on outdev; QEMU's queues hold 1024);
//!   frames/s and Gbit/s from the first send to the last release, CPU time of the process per
//!   frame from /proc.
//! - Latency: pairs sent at a fixed rate (paced by spinning); for each frame the time from just
//!   before its secondary twin is written to the moment it is read back from outdev; p50, p99,
//!   p99.9.
//!
//! Usage: bench-comparer --comparer PATH [--impl ours|qemu|both] [--quick] [--rate N[,N...]]
//!        [--rt: latency runs under SCHED_FIFO (the implementations via chrt, the driver's threads)]
//!        [--latency-secs S]

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use colo_proto::frame::{Frame, FrameDecoder, encode};
use colo_proto::packet::build::{Link, TcpSegment, tcp_frame};

/// Frames in flight at most (QEMU's per-connection queue holds 1024).
const WINDOW: u64 = 512;
/// Frames written per write call.
const BATCH: usize = 64;
/// Ethernet + IPv4 + TCP headers of the generated frames.
const HDRS: usize = 14 + 20 + 20;
const FIRST_SEQ: u32 = 1000;

struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Which {
    Ours,
    Qemu,
}

impl Which {
    fn name(self) -> &'static str {
        match self {
            Which::Ours => "ours",
            Which::Qemu => "QEMU 7.2",
        }
    }
}

/// The checkpoint controller both implementations talk to over `notify_dev`: every
/// `DO_CHECKPOINT` is counted and answered at once with `COLO_CHECKPOINT` (flush), as a COLO
/// controller would after its checkpoint.
fn controller(mut s: UnixStream, count: &AtomicU64) {
    let mut dec = FrameDecoder::new(false);
    let mut buf = [0u8; 4096];
    let mut reply = Vec::new();
    let _ = encode(
        &Frame::ethernet(b"COLO_CHECKPOINT".to_vec()),
        false,
        &mut reply,
    );
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => dec.push(&buf[..n]),
        }
        while let Ok(Some(f)) = dec.next_frame() {
            if f.payload == b"DO_CHECKPOINT" {
                count.fetch_add(1, Ordering::Relaxed);
                if s.write_all(&reply).is_err() {
                    return;
                }
            }
        }
    }
}

struct Running {
    checkpoints: Arc<AtomicU64>,
    /// Write side of notify_dev, to send a final `COLO_CHECKPOINT`.
    ntf_w: UnixStream,
    _child: ChildGuard,
    pid: u32,
    pin: UnixStream,
    sin: UnixStream,
    out: UnixStream,
    _dir: DirGuard,
}

/// Removes the run's socket directory when dropped.
struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn accept(l: &UnixListener, child: &mut Child, what: &str) -> Result<UnixStream> {
    l.set_nonblocking(true)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(e).context(format!("accept {what}")),
        }
        if let Some(st) = child.try_wait()? {
            bail!("process exited ({st}) before connecting {what}");
        }
        if Instant::now() > deadline {
            bail!("no connection on {what} within 20 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn start(which: Which, comparer: &Path, run: usize, rt: bool) -> Result<Running> {
    let dir = std::env::temp_dir().join(format!("bench-comparer-{}-{run}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let p = |n: &str| dir.join(n);
    let pl = UnixListener::bind(p("pin.sock"))?;
    let sl = UnixListener::bind(p("sin.sock"))?;
    let ol = UnixListener::bind(p("out.sock"))?;
    let nl = UnixListener::bind(p("ntf.sock"))?;
    let mut cmd = match which {
        Which::Ours => {
            let mut c = Command::new(comparer);
            c.arg("--primary_in")
                .arg(format!("unix:{}", p("pin.sock").display()))
                .arg("--secondary_in")
                .arg(format!("unix:{}", p("sin.sock").display()))
                .arg("--outdev")
                .arg(format!("unix:{}", p("out.sock").display()))
                .arg("--notify_dev")
                .arg(format!("unix:{}", p("ntf.sock").display()))
                .args(["--compare_timeout", "10000"]);
            c
        }
        Which::Qemu => {
            let mut c = Command::new("qemu-system-x86_64");
            let chardev = |id: &str, n: &str| format!("socket,id={id},path={}", p(n).display());
            c.args(["-M", "none", "-nodefaults", "-display", "none"])
                .args(["-chardev", &chardev("pin", "pin.sock")])
                .args(["-chardev", &chardev("sin", "sin.sock")])
                .args(["-chardev", &chardev("out", "out.sock")])
                .args(["-chardev", &chardev("ntf", "ntf.sock")])
                .args(["-object", "iothread,id=it"])
                .args([
                    "-object",
                    "colo-compare,id=c,primary_in=pin,secondary_in=sin,outdev=out,notify_dev=ntf,iothread=it,compare_timeout=10000",
                ]);
            c
        }
    };
    if rt {
        // Real-time FIFO priority for the implementation under test (latency runs with --rt).
        let mut c = Command::new("chrt");
        c.args(["-f", "10"])
            .arg(cmd.get_program())
            .args(cmd.get_args());
        cmd = c;
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(if std::env::var_os("BENCH_VERBOSE").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .spawn()
        .with_context(|| format!("starting {}", which.name()))?;
    let mut child = ChildGuard(child);
    let pid = child.0.id();
    let pin = accept(&pl, &mut child.0, "primary_in")?;
    let sin = accept(&sl, &mut child.0, "secondary_in")?;
    let out = accept(&ol, &mut child.0, "outdev")?;
    let ntf = accept(&nl, &mut child.0, "notify_dev")?;
    let checkpoints = Arc::new(AtomicU64::new(0));
    let c = checkpoints.clone();
    let ntf_w = ntf.try_clone()?;
    std::thread::spawn(move || controller(ntf, &c));
    Ok(Running {
        _child: child,
        pid,
        pin,
        sin,
        out,
        checkpoints,
        ntf_w,
        _dir: DirGuard(dir),
    })
}

/// One TCP stream: `n` segments, each an Ethernet frame of `frame_len` bytes, encoded as
/// records back to back; returns the bytes and the record size.
fn stream(n: usize, frame_len: usize, seq0: u32, sport: u16) -> (Vec<u8>, usize) {
    let payload_len = frame_len - HDRS;
    let src = SocketAddr::from((Ipv4Addr::new(10, 0, 0, 1), sport));
    let dst = SocketAddr::from((Ipv4Addr::new(10, 0, 0, 2), 40000));
    let mut out = Vec::with_capacity(n * (frame_len + 4));
    let mut payload = vec![0u8; payload_len];
    for i in 0..n {
        for (j, b) in payload.iter_mut().enumerate() {
            *b = (i.wrapping_mul(7) ^ j) as u8;
        }
        let seq = seq0.wrapping_add((i * payload_len) as u32);
        let f = tcp_frame(
            &Link::default(),
            &TcpSegment {
                src,
                dst,
                seq,
                ack: 1,
                flags: 0x18,
                window: 65535,
                payload: &payload,
            },
        );
        debug_assert_eq!(f.len(), frame_len);
        let _ = encode(&Frame::ethernet(f), false, &mut out);
    }
    (out, frame_len + 4)
}

fn frame_seq(f: &[u8]) -> u32 {
    f.get(38..42)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(0)
}

/// CPU time (user + system) of a process, from /proc.
fn cpu_time(pid: u32) -> Duration {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    let Some(rest) = s.rsplit_once(')').map(|(_, r)| r) else {
        return Duration::ZERO;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // Fields after ')': state is index 0; utime is field 14 overall → index 11; stime → 12.
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_micros((ticks(11) + ticks(12)) * 1_000_000 / hz)
}

/// Puts the calling thread under SCHED_FIFO priority 10 (`on`) or back to SCHED_OTHER.
fn set_fifo(on: bool) {
    let param = libc::sched_param {
        sched_priority: if on { 10 } else { 0 },
    };
    let policy = if on {
        libc::SCHED_FIFO
    } else {
        libc::SCHED_OTHER
    };
    // SAFETY: `param` is a valid sched_param for the duration of the call; pid 0 is the
    // calling thread; the call has no other memory effects.
    let r = unsafe { libc::sched_setscheduler(0, policy, &param) };
    if r != 0 {
        eprintln!(
            "  (sched_setscheduler failed: {})",
            std::io::Error::last_os_error()
        );
    }
}

struct Receiver {
    out: UnixStream,
    dec: FrameDecoder,
    buf: Vec<u8>,
}

impl Receiver {
    fn new(out: UnixStream) -> Self {
        Self {
            out,
            dec: FrameDecoder::new(false),
            buf: vec![0; 1 << 20],
        }
    }

    /// Calls `f` for every frame until it returns false; errors after `idle` without data.
    fn run(&mut self, idle: Duration, mut f: impl FnMut(&Frame) -> bool) -> Result<()> {
        self.out.set_read_timeout(Some(idle))?;
        loop {
            while let Some(fr) = self.dec.next_frame()? {
                if !f(&fr) {
                    return Ok(());
                }
            }
            match self.out.read(&mut self.buf) {
                Ok(0) => bail!("outdev closed"),
                Ok(n) => self.dec.push(&self.buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    bail!("no frame released for {idle:?}")
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[derive(Default, Clone, Copy)]
struct Throughput {
    fps: f64,
    gbps: f64,
    cpu_us_per_frame: f64,
    out_of_order: u64,
    lost: u64,
    /// Not released within 5 s, but released by a final checkpoint-done.
    held: u64,
    checkpoints: u64,
}

fn throughput(r: Running, n: usize, frame_len: usize) -> Result<Throughput> {
    let (bytes, rec) = stream(n, frame_len, FIRST_SEQ, 80);
    let bytes = Arc::new(bytes);
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let Running {
        pid,
        mut pin,
        mut sin,
        out,
        checkpoints,
        mut ntf_w,
        _child,
        _dir,
    } = r;
    let ck0 = checkpoints.load(Ordering::Relaxed);
    let cpu0 = cpu_time(pid);
    let t0 = Instant::now();
    let sender = {
        let (bytes, received, stop) = (bytes.clone(), received.clone(), stop.clone());
        std::thread::spawn(move || -> Result<()> {
            let mut sent = 0usize;
            while sent < n {
                while sent as u64 >= received.load(Ordering::Relaxed) + WINDOW {
                    if stop.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    std::thread::yield_now();
                }
                let k = BATCH.min(n - sent);
                let chunk = &bytes[sent * rec..(sent + k) * rec];
                pin.write_all(chunk)?;
                sin.write_all(chunk)?;
                sent += k;
            }
            Ok(())
        })
    };
    let mut rx = Receiver::new(out);
    let payload_len = (frame_len - HDRS) as u32;
    let mut got = 0u64;
    let mut expect_idx = 0u64;
    let mut out_of_order = 0u64;
    let mut last = t0;
    let res = rx.run(Duration::from_secs(5), |f| {
        last = Instant::now();
        let idx = u64::from(frame_seq(&f.payload).wrapping_sub(FIRST_SEQ) / payload_len);
        if idx != expect_idx {
            out_of_order += 1;
        }
        expect_idx = idx + 1;
        got += 1;
        received.store(got, Ordering::Relaxed);
        got < n as u64
    });
    // Up to the last frame released (not the idle wait that ends a run with losses).
    let elapsed = last - t0;
    stop.store(true, Ordering::Relaxed);
    let cpu = cpu_time(pid).saturating_sub(cpu0);
    let _ = sender.join();
    let mut flushed = 0u64;
    if let Err(e) = &res {
        eprintln!("  ({e}: {got} of {n} frames came back; sending COLO_CHECKPOINT)");
        // Are the missing frames held, or gone? A final checkpoint-done flushes held ones.
        let mut msg = Vec::new();
        let _ = encode(
            &Frame::ethernet(b"COLO_CHECKPOINT".to_vec()),
            false,
            &mut msg,
        );
        ntf_w.write_all(&msg)?;
        let _ = rx.run(Duration::from_secs(2), |_| {
            flushed += 1;
            got + flushed < n as u64
        });
    }
    let secs = elapsed.as_secs_f64();
    Ok(Throughput {
        fps: got as f64 / secs,
        gbps: got as f64 * frame_len as f64 * 8.0 / secs / 1e9,
        cpu_us_per_frame: cpu.as_secs_f64() * 1e6 / got.max(1) as f64,
        out_of_order,
        lost: n as u64 - got - flushed,
        held: flushed,
        checkpoints: checkpoints.load(Ordering::Relaxed) - ck0,
    })
}

/// A latency table row: label, value getter, decimals.
type LatRow = (&'static str, fn(&Latency) -> f64, usize);

#[derive(Default, Clone, Copy)]
struct Latency {
    rate: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
    lost: u64,
    checkpoints: u64,
}

fn latency(r: Running, rate: f64, secs: f64, rt: bool) -> Result<Latency> {
    let frame_len = 64;
    let n = (rate * secs) as usize;
    let (bytes, rec) = stream(n, frame_len, FIRST_SEQ, 80);
    let bytes = Arc::new(bytes);
    let sent_at: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let Running {
        mut pin,
        mut sin,
        out,
        checkpoints,
        _child,
        _dir,
        ..
    } = r;
    let ck0 = checkpoints.load(Ordering::Relaxed);
    let base = Instant::now();
    let start = base + Duration::from_millis(20);
    let sender = {
        let (bytes, sent_at, stop) = (bytes.clone(), sent_at.clone(), stop.clone());
        std::thread::spawn(move || -> Result<f64> {
            if rt {
                set_fifo(true);
            }
            let interval = 1.0 / rate;
            for i in 0..n {
                let due = start + Duration::from_secs_f64(i as f64 * interval);
                loop {
                    let now = Instant::now();
                    if now >= due || stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if due - now > Duration::from_micros(200) {
                        std::thread::sleep(due - now - Duration::from_micros(100));
                    } else {
                        std::hint::spin_loop();
                    }
                }
                let rec_bytes = &bytes[i * rec..(i + 1) * rec];
                pin.write_all(rec_bytes)?;
                sent_at[i].store(base.elapsed().as_nanos() as u64, Ordering::Relaxed);
                sin.write_all(rec_bytes)?;
            }
            Ok(n as f64 / start.elapsed().as_secs_f64())
        })
    };
    if rt {
        set_fifo(true);
    }
    let mut rx = Receiver::new(out);
    let mut lat = Vec::with_capacity(n);
    let mut got = 0usize;
    let res = rx.run(Duration::from_secs(5), |f| {
        let t = base.elapsed().as_nanos() as u64;
        let idx =
            (frame_seq(&f.payload).wrapping_sub(FIRST_SEQ) / (frame_len - HDRS) as u32) as usize;
        if let Some(s) = sent_at.get(idx) {
            lat.push(t.saturating_sub(s.load(Ordering::Relaxed)));
        }
        got += 1;
        got < n
    });
    stop.store(true, Ordering::Relaxed);
    if rt {
        set_fifo(false);
    }
    let achieved = sender
        .join()
        .map_err(|_| anyhow!("sender thread panicked"))??;
    if let Err(e) = &res {
        eprintln!("  ({e}: {got} of {n} frames came back)");
    }
    if let Some(path) = std::env::var_os("BENCH_LATENCY_DUMP") {
        let text: String = lat.iter().map(|l| format!("{l}\n")).collect();
        let _ = std::fs::write(path, text);
    }
    lat.sort_unstable();
    let pct = |p: f64| {
        if lat.is_empty() {
            return f64::NAN;
        }
        let i = ((lat.len() as f64 * p) as usize).min(lat.len() - 1);
        lat[i] as f64 / 1000.0
    };
    Ok(Latency {
        rate: achieved,
        p50: pct(0.50),
        p99: pct(0.99),
        p999: pct(0.999),
        max: pct(1.0),
        lost: (n - got) as u64,
        checkpoints: checkpoints.load(Ordering::Relaxed) - ck0,
    })
}

/// Warm-up: a few frames through, so the process is fully started.
fn warm_up(r: &mut Running) -> Result<()> {
    let (bytes, _) = stream(8, 64, FIRST_SEQ, 81);
    r.pin.write_all(&bytes)?;
    r.sin.write_all(&bytes)?;
    let mut rx = Receiver::new(r.out.try_clone()?);
    let mut k = 0;
    rx.run(Duration::from_secs(10), |_| {
        k += 1;
        k < 8
    })
}

fn main() -> Result<()> {
    let mut comparer = None;
    let mut impls = vec![Which::Ours, Which::Qemu];
    let mut quick = false;
    let mut rt = false;
    let mut rates = vec![10_000.0, 100_000.0];
    let mut lat_secs = 2.0;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--comparer" => comparer = args.next().map(PathBuf::from),
            "--impl" => {
                impls = match args.next().as_deref() {
                    Some("ours") => vec![Which::Ours],
                    Some("qemu") => vec![Which::Qemu],
                    Some("both") => vec![Which::Ours, Which::Qemu],
                    other => bail!("--impl {other:?}: expected ours, qemu or both"),
                }
            }
            "--quick" => quick = true,
            "--rt" => rt = true,
            "--rate" => {
                rates = args
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(|v| v.parse::<f64>().ok().filter(|r| *r > 0.0))
                    .collect::<Option<Vec<f64>>>()
                    .ok_or_else(|| anyhow!("--rate needs positive numbers, comma-separated"))?
            }
            "--latency-secs" => {
                lat_secs = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| anyhow!("--latency-secs needs a number"))?
            }
            _ => {
                bail!("unknown argument {a:?} (see the doc comment of bench/comparer/src/main.rs)")
            }
        }
    }
    let comparer = comparer.ok_or_else(|| anyhow!("--comparer PATH is required"))?;
    let sizes: [(usize, usize); 3] = if quick {
        [(64, 50_000), (1500, 20_000), (9000, 5_000)]
    } else {
        [(64, 300_000), (1500, 150_000), (9000, 40_000)]
    };
    let load0 = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut run = 0;
    let mut tput: Vec<(usize, Vec<Throughput>)> = Vec::new();
    for (len, n) in sizes {
        let mut row = Vec::new();
        for &w in &impls {
            run += 1;
            let mut r = start(w, &comparer, run, false)?;
            warm_up(&mut r)?;
            eprintln!("throughput {len} B x {n}: {}", w.name());
            row.push(throughput(r, n, len)?);
        }
        tput.push((len, row));
    }
    let mut lat_runs: Vec<(f64, Vec<Latency>)> = Vec::new();
    for &rate in &rates {
        let mut lats = Vec::new();
        for &w in &impls {
            run += 1;
            let mut r = start(w, &comparer, run, rt)?;
            warm_up(&mut r)?;
            eprintln!(
                "latency 64 B at {rate} frames/s for {lat_secs} s: {}",
                w.name()
            );
            lats.push(latency(r, rate, lat_secs, rt)?);
        }
        lat_runs.push((rate, lats));
    }

    let names: Vec<&str> = impls.iter().map(|w| w.name()).collect();
    let load1 = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "host: {} CPUs; load average before: {}; after: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load0
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        load1
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "comparer benchmark: one TCP stream, identical primary/secondary, Unix sockets, {} frames in flight",
        WINDOW
    );
    print!("{:<34}", "");
    for n in &names {
        print!("{n:>16}");
    }
    if impls.len() == 2 {
        print!("{:>12}", "ours/QEMU");
    }
    println!();
    let row = |label: String, vals: Vec<f64>, prec: usize, ratio: bool| {
        print!("{label:<34}");
        for v in &vals {
            print!("{v:>16.prec$}");
        }
        if ratio && vals.len() == 2 && vals[1] > 0.0 {
            print!("{:>11.2}x", vals[0] / vals[1]);
        }
        println!();
    };
    for (len, r) in &tput {
        row(
            format!("{len} B frames/s"),
            r.iter().map(|t| t.fps).collect(),
            0,
            true,
        );
        row(
            format!("{len} B Gbit/s"),
            r.iter().map(|t| t.gbps).collect(),
            2,
            true,
        );
        row(
            format!("{len} B CPU µs/frame (process)"),
            r.iter().map(|t| t.cpu_us_per_frame).collect(),
            2,
            false,
        );
        if r.len() == 2 && r[0].cpu_us_per_frame > 0.0 {
            println!(
                "{:<34}{:>44.2}x",
                format!("{len} B frames per CPU-second"),
                r[1].cpu_us_per_frame / r[0].cpu_us_per_frame
            );
        }
        row(
            format!("{len} B released out of order"),
            r.iter().map(|t| t.out_of_order as f64).collect(),
            0,
            false,
        );
        row(
            format!("{len} B stuck until a flush"),
            r.iter().map(|t| t.held as f64).collect(),
            0,
            false,
        );
        row(
            format!("{len} B lost"),
            r.iter().map(|t| t.lost as f64).collect(),
            0,
            false,
        );
        row(
            format!("{len} B checkpoints requested"),
            r.iter().map(|t| t.checkpoints as f64).collect(),
            0,
            false,
        );
    }
    for (rate, lats) in &lat_runs {
        let rows: [LatRow; 7] = [
            ("achieved frames/s", |l| l.rate, 0),
            ("p50 µs", |l| l.p50, 1),
            ("p99 µs", |l| l.p99, 1),
            ("p99.9 µs", |l| l.p999, 1),
            ("max µs", |l| l.max, 1),
            ("checkpoints requested", |l| l.checkpoints as f64, 0),
            ("lost", |l| l.lost as f64, 0),
        ];
        for (label, get, prec) in rows {
            row(
                format!("latency @{}k/s {label}", rate / 1000.0),
                lats.iter().map(get).collect(),
                prec,
                false,
            );
        }
    }
    Ok(())
}
