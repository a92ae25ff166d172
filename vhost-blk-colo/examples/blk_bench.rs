//! Block benchmark: the same test frontend (memfd shared memory, split virtqueue, no guest)
//! drives, in one run and on the same file:
//! - our backend (`vhost-blk-colo`, raw file) vs `qemu-storage-daemon --export vhost-user-blk`;
//! - replication cost: our primary (quorum: local file + replication over NBD to a secondary
//!   `vhost-blk-colo` on loopback) vs the same quorum with the local file only.
//!
//! Run through `bench/blk/run.sh`, which builds in release mode and prints the table.
//! `--fill-kib N`: write the image in N KiB pieces (default: in one go); see `main`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use colo_proto::qmp::QmpClient;
use serde_json::json;
use vhost_blk_colo::{
    testing::{Data, FrontendOptions, TestFrontend},
    vhost_user::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT},
};

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Clone, Copy)]
struct Workload {
    name: &'static str,
    write: bool,
    random: bool,
    bs: usize,
    qd: usize,
}

struct Result_ {
    iops: f64,
    mbps: f64,
    p50_us: f64,
    p99_us: f64,
}

/// Runs `w` for `secs`, spreading requests round-robin over `nq` queues.
fn run(fe: &mut TestFrontend, w: Workload, size: u64, secs: f64, nq: usize) -> Result_ {
    let sectors = size / 512;
    let bsec = (w.bs / 512) as u64;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut seq = 0u64;
    let buf = vec![0xa5u8; w.bs];
    let mut next_sector = || {
        if w.random {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (sectors / bsec)) * bsec
        } else {
            let s = seq;
            seq = (seq + bsec) % (sectors - sectors % bsec);
            s
        }
    };
    let mut started: std::collections::HashMap<(usize, u16), Instant> = Default::default();
    let mut rr = 0usize;
    let mut lat: Vec<u32> = Vec::new();
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(secs);
    let mut done = 0u64;
    loop {
        while started.len() < w.qd && Instant::now() < end {
            let s = next_sector();
            let q = rr % nq;
            rr += 1;
            let slot = if w.write {
                fe.submit(q, VIRTIO_BLK_T_OUT, s, Data::Out(&buf)).unwrap()
            } else {
                fe.submit(q, VIRTIO_BLK_T_IN, s, Data::In(w.bs)).unwrap()
            };
            started.insert((q, slot), Instant::now());
        }
        if started.is_empty() {
            break;
        }
        let mut got: Vec<(usize, vhost_blk_colo::testing::Completion)> = Vec::new();
        for q in 0..nq {
            got.extend(fe.poll(q).into_iter().map(|c| (q, c)));
        }
        if got.is_empty() {
            let q = started.keys().next().map_or(0, |k| k.0);
            let wait = if nq == 1 {
                Duration::from_secs(30)
            } else {
                Duration::from_millis(1)
            };
            match fe.wait(q, wait) {
                Ok(cs) => got.extend(cs.into_iter().map(|c| (q, c))),
                Err(_) if nq > 1 => {}
                Err(e) => panic!("{e}"),
            }
        }
        for (q, c) in got {
            assert_eq!(c.status, VIRTIO_BLK_S_OK, "request failed");
            if let Some(t) = started.remove(&(q, c.slot)) {
                lat.push(t.elapsed().as_micros() as u32);
            }
            done += 1;
        }
    }
    let el = t0.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
    };
    Result_ {
        iops: done as f64 / el,
        mbps: done as f64 * w.bs as f64 / el / 1e6,
        p50_us: pct(0.5),
        p99_us: pct(0.99),
    }
}

fn wait_sock(p: &Path) {
    let d = Instant::now() + Duration::from_secs(30);
    while !p.exists() {
        assert!(Instant::now() < d, "{} did not appear", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn connect(sock: &Path, nq: usize) -> TestFrontend {
    wait_sock(sock);
    TestFrontend::connect(
        sock,
        &FrontendOptions {
            num_queues: nq,
            queue_size: 128,
            slot_bytes: 1 << 20,
            ..FrontendOptions::default()
        },
    )
    .unwrap()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let get = |k: &str, d: &str| -> String {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .unwrap_or_else(|| d.to_owned())
    };
    let ours = PathBuf::from(get("--ours", "target/release/vhost-blk-colo"));
    let secs: f64 = get("--seconds", "3").parse().unwrap();
    let size_mib: u64 = get("--size-mib", "256").parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bench.img");
    let f = std::fs::File::create(&file).unwrap();
    f.set_len(size_mib << 20).unwrap();
    drop(f);
    // Touch the whole file once so both backends read allocated, cached data. In one write by
    // default; `--fill-kib N` writes it in N KiB pieces instead. The piece size decides the
    // page cache's folio sizes, and with them what a 4 KiB write costs (on this host's ext4,
    // writes into a file written in one go spend most of their time in
    // `ext4_block_write_begin` over large folios): the local-only latency that #6's ratio
    // divides by.
    let fill = vec![0x11u8; (size_mib << 20) as usize];
    match get("--fill-kib", "").parse::<usize>() {
        Ok(kib) if kib > 0 => {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
            for piece in fill.chunks(kib << 10) {
                f.write_all(piece).unwrap();
            }
        }
        _ => std::fs::write(&file, &fill).unwrap(),
    }
    drop(fill);
    let size = size_mib << 20;
    // Before each backend: write back what the previous one dirtied, so no backend pays for
    // another's page-cache writeback.
    let settle = || {
        std::fs::File::open(&file).unwrap().sync_all().unwrap();
    };
    let loadavg = || {
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    };
    eprintln!("load average at start: {}", loadavg());
    let direct = args.iter().any(|a| a == "--direct");
    eprintln!(
        "images opened with O_DIRECT: {}",
        if direct {
            "yes (--direct)"
        } else {
            "no (page cache)"
        }
    );
    eprintln!(
        "COLO_BLK_SPIN_US={} (our backends' polling before sleeping; default 50)",
        std::env::var("COLO_BLK_SPIN_US").unwrap_or_else(|_| "unset".into())
    );

    let workloads = [
        Workload {
            name: "4k randread qd1",
            write: false,
            random: true,
            bs: 4096,
            qd: 1,
        },
        Workload {
            name: "4k randwrite qd1",
            write: true,
            random: true,
            bs: 4096,
            qd: 1,
        },
        Workload {
            name: "4k randread qd16",
            write: false,
            random: true,
            bs: 4096,
            qd: 16,
        },
        Workload {
            name: "4k randwrite qd16",
            write: true,
            random: true,
            bs: 4096,
            qd: 16,
        },
        Workload {
            name: "1m seqread qd4",
            write: false,
            random: false,
            bs: 1 << 20,
            qd: 4,
        },
        Workload {
            name: "1m seqwrite qd4",
            write: true,
            random: false,
            bs: 1 << 20,
            qd: 4,
        },
    ];

    let only = get("--only", "");
    let workloads: Vec<Workload> = workloads
        .into_iter()
        .filter(|w| only.is_empty() || w.name == only)
        .collect();
    let skip_qsd = args.iter().any(|a| a == "--no-qsd");
    let skip_repl = args.iter().any(|a| a == "--no-replication");
    let repeat: usize = get("--repeat", "1").parse().unwrap();
    let workers = get("--workers", "16");
    let nq: usize = get("--num-queues", "1").parse().unwrap();
    let nqs = nq.to_string();
    // --direct: every backend opens its image with O_DIRECT (QEMU's cache=none, what
    // production set-ups use), the page cache out of the picture.
    let onoff = if direct { "on" } else { "off" };
    let file_drive = format!(
        "driver=raw,id=d0,file.filename={},file.cache.direct={onoff}",
        file.display()
    );
    let quorum_drive = format!(
        "driver=quorum,id=colo-disk0,read-pattern=fifo,vote-threshold=1,children.0.file.filename={},children.0.driver=raw,children.0.file.cache.direct={onoff}",
        file.display()
    );
    // Every backend is started and connected first; then each workload runs on each backend in
    // turn (the order alternates between repetitions), so all compared cells see the same
    // machine conditions.
    let mut procs: Vec<Proc> = Vec::new();
    // (label, frontend, writes only)
    let mut targets: Vec<(&'static str, TestFrontend, bool)> = Vec::new();
    {
        let sock = dir.path().join("ours.sock");
        procs.push(Proc(
            Command::new(&ours)
                .args([
                    "--socket",
                    &sock.display().to_string(),
                    "--workers",
                    &workers,
                    "--num-queues",
                    &nqs,
                ])
                .args(["--drive", &file_drive])
                .stderr(Stdio::null())
                .spawn()
                .expect("start vhost-blk-colo"),
        ));
        targets.push(("vhost-blk-colo", connect(&sock, nq), false));
    }
    if !skip_qsd {
        let sock = dir.path().join("qsd.sock");
        let p = Command::new("qemu-storage-daemon")
            .args(["--blockdev", &format!("driver=file,node-name=file0,filename={},cache.direct={onoff}", file.display())])
            .args(["--blockdev", "driver=raw,node-name=disk0,file=file0"])
            .args([
                "--export",
                &format!("type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on,num-queues={nq}", sock.display()),
            ])
            .stderr(Stdio::null())
            .spawn();
        match p {
            Ok(c) => {
                procs.push(Proc(c));
                targets.push(("qemu-storage-daemon", connect(&sock, nq), false));
            }
            Err(e) => eprintln!("SKIPPED qemu-storage-daemon: {e}"),
        }
    }
    // Replication cost: quorum local-only vs quorum + replication (NBD to a secondary).
    let mut pq_keep = None;
    if !skip_repl {
        let sock = dir.path().join("local.sock");
        procs.push(Proc(
            Command::new(&ours)
                .args([
                    "--socket",
                    &sock.display().to_string(),
                    "--workers",
                    &workers,
                    "--num-queues",
                    &nqs,
                ])
                .args(["--drive", &quorum_drive])
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        ));
        targets.push(("primary, local only", connect(&sock, nq), true));

        let sec_img = dir.path().join("sec.img");
        std::fs::copy(&file, &sec_img).unwrap();
        let sq_path = dir.path().join("sec.qmp");
        procs.push(Proc(
            Command::new(&ours)
                .arg("--qmp")
                .arg(format!("unix:{}", sq_path.display()))
                .arg("--drive")
                .arg(format!(
                    "if=none,id=colo-disk0,driver=raw,file.filename={},file.cache.direct={onoff}",
                    sec_img.display()
                ))
                .arg("--drive")
                .arg("id=active-disk0,driver=replication,mode=secondary,file.driver=overlay,file.backing.driver=overlay,file.backing.backing=colo-disk0")
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        ));
        let mut sq = QmpClient::connect_unix_retry(
            &sq_path,
            Instant::now() + Duration::from_secs(30),
            Duration::from_secs(30),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        sq.execute("nbd-server-start", json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": port.to_string()}}})).unwrap();
        sq.execute(
            "nbd-server-add",
            json!({"device": "colo-disk0", "writable": true}),
        )
        .unwrap();
        sq.execute("colo-blk-start", json!({})).unwrap();
        let sock = dir.path().join("pri.sock");
        let pq_path = dir.path().join("pri.qmp");
        procs.push(Proc(
            Command::new(&ours)
                .args([
                    "--socket",
                    &sock.display().to_string(),
                    "--workers",
                    &workers,
                    "--num-queues",
                    &nqs,
                ])
                .arg("--qmp")
                .arg(format!("unix:{}", pq_path.display()))
                .args(["--drive", &quorum_drive])
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        ));
        let mut pq = QmpClient::connect_unix_retry(
            &pq_path,
            Instant::now() + Duration::from_secs(30),
            Duration::from_secs(30),
        )
        .unwrap();
        pq.execute(
            "blockdev-add",
            json!({"driver": "replication", "mode": "primary", "node-name": "node0",
                   "file": {"driver": "nbd", "host": "127.0.0.1", "port": port, "export": "colo-disk0"}}),
        )
        .unwrap();
        pq.execute(
            "x-blockdev-change",
            json!({"parent": "colo-disk0", "node": "node0"}),
        )
        .unwrap();
        pq.execute("colo-blk-start", json!({})).unwrap();
        targets.push(("primary + NBD secondary", connect(&sock, nq), true));
        pq_keep = Some((pq, sq));
    }

    // --targets A,B: run only the backends whose label contains one of these (profiling).
    let only_targets: Vec<String> = get("--targets", "")
        .split(',')
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect();
    for (i, p) in procs.iter().enumerate() {
        eprintln!("backend process {i}: pid {}", p.0.id());
    }
    let mut results: Vec<(&'static str, &'static str, Vec<Result_>)> = Vec::new();
    for rep in 0..repeat {
        for &w in &workloads {
            let n = targets.len();
            for k in 0..n {
                // Alternate the order between repetitions.
                let t = if rep % 2 == 0 { k } else { n - 1 - k };
                let (label, fe, writes_only) = &mut targets[t];
                if *writes_only && !w.write {
                    continue;
                }
                if !only_targets.is_empty()
                    && !only_targets.iter().any(|o| label.contains(o.as_str()))
                {
                    continue;
                }
                settle();
                let r = run(fe, w, size, secs, nq);
                match results.iter_mut().find(|x| x.0 == *label && x.1 == w.name) {
                    Some(x) => x.2.push(r),
                    None => results.push((label, w.name, vec![r])),
                }
            }
        }
    }
    if let Some((mut pq, _sq)) = pq_keep {
        let st = pq.execute("colo-blk-status", json!({})).unwrap();
        assert_eq!(
            st["replication"][0]["secondary-connected"], true,
            "secondary dropped during the bench: {st}"
        );
    }
    drop(targets);
    drop(procs);

    eprintln!("load average at end: {}", loadavg());
    println!(
        "| backend | workload | IOPS | MB/s | p50 µs | p99 µs |{}",
        if repeat > 1 { " runs (IOPS) |" } else { "" }
    );
    println!(
        "|---|---|---:|---:|---:|---:|{}",
        if repeat > 1 { "---|" } else { "" }
    );
    // Replication cost per repetition: the two cells of one repetition ran back to back, so
    // their p50 ratio is the figure to compare with the 1.5x target (the local-only cell alone
    // swings by 2x between repetitions on a small host).
    let mut ratio_lines = Vec::new();
    for &w in &workloads {
        let cell = |label: &str| {
            results
                .iter()
                .find(|x| x.0 == label && x.1 == w.name)
                .map(|x| x.2.iter().map(|r| r.p50_us).collect::<Vec<_>>())
        };
        if let (Some(local), Some(repl)) =
            (cell("primary, local only"), cell("primary + NBD secondary"))
        {
            let mut ratios: Vec<f64> = local
                .iter()
                .zip(&repl)
                .filter(|(l, _)| **l > 0.0)
                .map(|(l, r)| r / l)
                .collect();
            let all = ratios
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(", ");
            ratios.sort_by(f64::total_cmp);
            if let Some(m) = ratios.get(ratios.len() / 2) {
                ratio_lines.push(format!(
                    "replication p50 / local-only p50, {}: per repetition {all}; median {m:.2}",
                    w.name
                ));
            }
            // What replication adds, apart from the local-only latency (which the ratio
            // divides by, and which moves with the host's speed and with anything that speeds
            // up the path both cells share).
            let mut added: Vec<f64> = local.iter().zip(&repl).map(|(l, r)| r - l).collect();
            let all = added
                .iter()
                .map(|d| format!("{d:.0}"))
                .collect::<Vec<_>>()
                .join(", ");
            added.sort_by(f64::total_cmp);
            let mut lsorted = local.clone();
            lsorted.sort_by(f64::total_cmp);
            if let (Some(d), Some(l)) = (added.get(added.len() / 2), lsorted.get(lsorted.len() / 2))
            {
                ratio_lines.push(format!(
                    "replication p50 - local-only p50 (µs), {}: per repetition {all}; median {d:.0} (local-only p50 median {l:.0})",
                    w.name
                ));
            }
        }
    }
    // Per backend, the run with the median IOPS; with --repeat, every run's IOPS too.
    for (b, w, mut rs) in results {
        rs.sort_by(|a, b| a.iops.total_cmp(&b.iops));
        let all = rs
            .iter()
            .map(|r| format!("{:.0}", r.iops))
            .collect::<Vec<_>>()
            .join(", ");
        let r = &rs[rs.len() / 2];
        println!(
            "| {b} | {w} | {:.0} | {:.1} | {:.0} | {:.0} |{}",
            r.iops,
            r.mbps,
            r.p50_us,
            r.p99_us,
            if repeat > 1 {
                format!(" {all} |")
            } else {
                String::new()
            }
        );
    }
    for l in ratio_lines {
        println!("\n{l}");
    }
}
