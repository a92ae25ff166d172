//! Frames/s and latency through the vhost-net-colo device, driven by the test frontend straight
//! from shared memory (no guest), with and without the primary's COLO chain (filter-mirror on
//! guest ingress, filter-redirector stealing guest egress to a "compare" socket).
//!
//! `netbench [--frames N] [--bin PATH]`; prints one table. Used by `bench/net/run.sh`.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use colo_proto::frame::{Frame, FrameReader, write_frame};
use vhost_net_colo::testing::{NetFrontend, Options};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Counts records arriving on a stream (a drain).
fn drain(s: UnixStream, count: Arc<AtomicU64>) {
    std::thread::spawn(move || {
        let mut r = FrameReader::new(s, false);
        while let Ok(Some(_)) = r.read_frame() {
            count.fetch_add(1, Ordering::Relaxed);
        }
    });
}

struct Rig {
    _proc: Proc,
    _dir: tempfile::TempDir,
    fe: NetFrontend,
    wire: UnixStream,
    wire_count: Arc<AtomicU64>,
    side_count: Arc<AtomicU64>,
}

fn rig(bin: &Path, chain: bool, echo: bool) -> Result<Rig> {
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("vu.sock");
    let wire_path = dir.path().join("wire.sock");
    let wire_l = UnixListener::bind(&wire_path)?;
    let mirror = dir.path().join("mirror.sock");
    let compare = dir.path().join("compare.sock");
    let mut cmd = Command::new(bin);
    cmd.arg("--qmp")
        .arg(format!("unix:{}", dir.path().join("qmp.sock").display()));
    cmd.arg("--socket").arg(&sock).arg("--netdev").arg(format!(
        "stream,id=hn0,server=off,addr.type=unix,addr.path={}",
        wire_path.display()
    ));
    let release = dir.path().join("release.sock");
    if chain {
        cmd.args([
            "--chardev",
            &format!("socket,id=mirror0,path={},server=on", mirror.display()),
            "--chardev",
            &format!("socket,id=compare0,path={},server=on", compare.display()),
            "--chardev",
            &format!("socket,id=compare_out,path={},server=on", release.display()),
            "--object",
            "filter-mirror,id=m0,netdev=hn0,queue=tx,outdev=mirror0",
            "--object",
            "filter-redirector,id=redire0,netdev=hn0,queue=rx,indev=compare_out",
            "--object",
            "filter-redirector,id=redire1,netdev=hn0,queue=rx,outdev=compare0",
        ]);
    }
    let proc = Proc(cmd.spawn().context("start vhost-net-colo")?);
    let (wire, _) = wire_l.accept()?;
    let side_count = Arc::new(AtomicU64::new(0));
    if chain {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(mirror.exists() && compare.exists() && release.exists()) {
            if Instant::now() > deadline {
                bail!("chardev sockets never appeared");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        drain(UnixStream::connect(&mirror)?, side_count.clone());
        let cmp = UnixStream::connect(&compare)?;
        if echo {
            // A stand-in colo-compare that releases every frame at once (to redire0's indev).
            let mut out = UnixStream::connect(&release)?;
            std::thread::spawn(move || {
                let mut r = FrameReader::new(cmp, false);
                while let Ok(Some(f)) = r.read_frame() {
                    if write_frame(&mut out, &f, false).is_err() {
                        break;
                    }
                }
            });
        } else {
            drain(cmp, side_count.clone());
        }
    }
    let fe = NetFrontend::connect(
        &sock,
        &Options {
            queue_size: 1024,
            ..Options::default()
        },
    )?;
    let wire_count = Arc::new(AtomicU64::new(0));
    Ok(Rig {
        _proc: proc,
        _dir: dir,
        fe,
        wire,
        wire_count,
        side_count,
    })
}

fn frame(len: usize) -> Vec<u8> {
    let mut f = vec![0x5au8; len];
    f[..12].copy_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x52, 0x54, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    f
}

/// Guest → outside: frames/s until the last frame arrived (at the wire, or at the compare
/// socket when the chain steals guest egress).
fn egress(bin: &Path, chain: bool, len: usize, n: u64) -> Result<f64> {
    let mut r = rig(bin, chain, false)?;
    drain(r.wire.try_clone()?, r.wire_count.clone());
    let counter = if chain { &r.side_count } else { &r.wire_count };
    let f = frame(len);
    let batch: Vec<&[u8]> = vec![&f; 64];
    let t0 = Instant::now();
    let mut sent = 0;
    while sent < n {
        let k = (n - sent).min(64) as usize;
        r.fe.send_batch(&batch[..k])?;
        sent += k as u64;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while counter.load(Ordering::Relaxed) < n {
        if Instant::now() > deadline {
            bail!(
                "egress: {} of {n} frames arrived",
                counter.load(Ordering::Relaxed)
            );
        }
        std::hint::spin_loop();
    }
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

/// Outside → guest: frames/s from the first write on the wire to the last frame in the ring.
fn ingress(bin: &Path, chain: bool, len: usize, n: u64) -> Result<f64> {
    let mut r = rig(bin, chain, false)?;
    let f = Frame::ethernet(frame(len));
    let mut buf = Vec::new();
    for _ in 0..64 {
        colo_proto::frame::encode(&f, false, &mut buf)?;
    }
    let mut w = r.wire.try_clone()?;
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut left = n;
        while left > 0 {
            let k = left.min(64);
            w.write_all(&buf[..buf.len() / 64 * k as usize])?;
            left -= k;
        }
        Ok(())
    });
    let t0 = Instant::now();
    let mut got = 0;
    let mut last = Instant::now();
    while got < n {
        if r.fe.try_recv().is_some() {
            got += 1;
            last = Instant::now();
        } else if last.elapsed() > Duration::from_secs(3) {
            eprintln!("ingress {len} B: {got} of {n} frames arrived; the rest never did");
            if let Ok(mut q) = colo_proto::qmp::QmpClient::connect_unix(
                r._dir.path().join("qmp.sock"),
                Duration::from_secs(5),
            ) && let Ok(v) = q.execute("query-net", serde_json::json!({}))
            {
                eprintln!("  {v}");
            }
            break;
        }
    }
    let rate = got as f64 / last.duration_since(t0).as_secs_f64();
    let _ = writer.join();
    Ok(rate)
}

/// Round trip guest → wire (echoed by the bench) → guest, one frame at a time: p50/p99 in µs.
/// With the chain: guest → redire1 → compare socket → (released at once by the bench) →
/// redire0 → netdev → echo → m0 (mirrored) → guest, the primary's path under COLO.
fn latency(bin: &Path, chain: bool, n: usize) -> Result<(f64, f64)> {
    let mut r = rig(bin, chain, true)?;
    let mut w = r.wire.try_clone()?;
    let rd = r.wire.try_clone()?;
    std::thread::spawn(move || {
        let mut rd = FrameReader::new(rd, false);
        while let Ok(Some(f)) = rd.read_frame() {
            if write_frame(&mut w, &f, false).is_err() {
                break;
            }
        }
    });
    let f = frame(64);
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + 100 {
        let t = Instant::now();
        r.fe.send(&f)?;
        if r.fe.recv(Duration::from_secs(5)).is_none() {
            bail!("latency: no echo for frame {i}");
        }
        if i >= 100 {
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    Ok((samples[n / 2], samples[n * 99 / 100]))
}

fn main() -> Result<()> {
    let mut frames: u64 = 200_000;
    // Examples live in target/<profile>/examples/, the binary in target/<profile>/.
    let exe = std::env::current_exe()?;
    let mut bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("vhost-net-colo"))
        .context("locate the vhost-net-colo binary (give --bin)")?;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--frames" => frames = args.next().context("--frames N")?.parse()?,
            "--bin" => bin = args.next().context("--bin PATH")?.into(),
            other => bail!("unknown argument {other}"),
        }
    }
    let _ = std::io::stdout().flush();
    println!(
        "| path (test frontend, no guest) | frame | no filters | COLO chain (mirror + redirector) |"
    );
    println!("|---|---|---|---|");
    for len in [64usize, 1514] {
        let a = egress(&bin, false, len, frames)?;
        let b = egress(&bin, true, len, frames)?;
        println!("| guest → netdev (frames/s) | {len} B | {a:.0} | {b:.0} |");
    }
    for len in [64usize, 1514] {
        let a = ingress(&bin, false, len, frames)?;
        let b = ingress(&bin, true, len, frames)?;
        println!("| netdev → guest (frames/s) | {len} B | {a:.0} | {b:.0} |");
    }
    let (p50a, p99a) = latency(&bin, false, 5000)?;
    let (p50b, p99b) = latency(&bin, true, 5000)?;
    println!(
        "| round trip guest → netdev → guest, p50 / p99 (µs) | 64 B | {p50a:.1} / {p99a:.1} | {p50b:.1} / {p99b:.1} |"
    );
    let mut s = String::new();
    let _ = std::fs::File::open("/proc/loadavg").and_then(|mut f| f.read_to_string(&mut s));
    println!("\nload average: {}", s.trim());
    Ok(())
}
