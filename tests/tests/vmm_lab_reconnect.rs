//! vmm-min reconnects to a restarted disk backend while the stock guest writes its journal (in
//! the KVM lab, tests/src/lab.rs). The disk is `vhost-blk-colo` on a raw image, the network
//! `vhost-net-colo` with a `user` netdev forwarding a host port to the guest's journal service
//! (port 5000, scripts/guest/README.md). A client appends records; the backend is SIGKILLed and
//! a new one is started on the same socket; the guest must carry on, and every record it
//! acknowledged (`OK <seq>`) must be in the image at its slot.

#![allow(clippy::unwrap_used)] // test helpers

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use colo_tests::process::ChildGuard;
use colo_tests::{TestDir, cargo_bin, guest_image, lab, secs};

const TEST: &str = "vmm_lab_disk_backend_sigkill_and_restart_loses_no_acknowledged_record";

/// One acknowledged record: its text, the seq the guest gave it, and when (since the client
/// started) it was sent and acknowledged.
#[derive(Debug, Clone)]
struct Acked {
    text: String,
    seq: u64,
    sent: Duration,
    acked: Duration,
}

fn start_blk(bin: &Path, img: &Path, sock: &Path, name: &str, logs: &Path) -> ChildGuard {
    let mut cmd = Command::new(bin);
    cmd.arg("--socket").arg(sock).arg("--drive").arg(format!(
        "id=d0,driver=raw,file.filename={},file.driver=file",
        img.display()
    ));
    let g = ChildGuard::spawn(name, &mut cmd, logs).unwrap();
    colo_tests::wait_for_unix_socket(sock, secs(60)).unwrap();
    g
}

/// Appends `rec-<n>` records over and over until `stop`, reconnecting after any error. A record
/// counts only when the guest answered `OK <seq>`.
fn client(
    port: u16,
    acked: Arc<Mutex<Vec<Acked>>>,
    errors: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
) {
    let t0 = Instant::now();
    let mut n = 0u64;
    let mut conn: Option<(TcpStream, BufReader<TcpStream>)> = None;
    while !stop.load(Ordering::SeqCst) {
        if conn.is_none() {
            match TcpStream::connect(("127.0.0.1", port)).and_then(|s| {
                s.set_read_timeout(Some(Duration::from_secs(90)))?;
                let r = BufReader::new(s.try_clone()?);
                Ok((s, r))
            }) {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    errors.lock().unwrap().push(format!("connect: {e}"));
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
            }
        }
        let Some((s, r)) = conn.as_mut() else {
            continue;
        };
        n += 1;
        let text = format!("rec-{n}");
        let sent = t0.elapsed();
        let mut line = String::new();
        let res = s
            .write_all(format!("APPEND {text}\n").as_bytes())
            .and_then(|()| r.read_line(&mut line));
        match res {
            Ok(k) if k > 0 => {
                let l = line.trim_end();
                match l.strip_prefix("OK ").and_then(|v| v.parse::<u64>().ok()) {
                    Some(seq) => acked.lock().unwrap().push(Acked {
                        text,
                        seq,
                        sent,
                        acked: t0.elapsed(),
                    }),
                    None => errors.lock().unwrap().push(format!("{text}: reply {l:?}")),
                }
            }
            Ok(_) => {
                errors
                    .lock()
                    .unwrap()
                    .push(format!("{text}: connection closed"));
                conn = None;
            }
            Err(e) => {
                errors.lock().unwrap().push(format!("{text}: {e}"));
                conn = None;
            }
        }
    }
}

fn wait_acked(
    acked: &Mutex<Vec<Acked>>,
    n: usize,
    deadline: Instant,
    what: &str,
    logs: &[&ChildGuard],
) {
    loop {
        let have = acked.lock().unwrap().len();
        if have >= n {
            return;
        }
        if Instant::now() >= deadline {
            let tails: String = logs.iter().map(|g| g.log_tail(30)).collect();
            panic!("{what}: only {have} of {n} records acknowledged before the deadline{tails}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn vmm_lab_disk_backend_sigkill_and_restart_loses_no_acknowledged_record() {
    let img_files = match guest_image() {
        Ok(i) => i,
        Err(e) => {
            colo_tests::skipped(&e);
            return;
        }
    };
    // Built on the host side: nothing is built inside the lab.
    let vmm_bin = cargo_bin("vmm-min").unwrap();
    let blk_bin = cargo_bin("vhost-blk-colo").unwrap();
    let net_bin = cargo_bin("vhost-net-colo").unwrap();
    if lab::needs_real_kvm_within(TEST, Duration::from_secs(600)) {
        return;
    }
    let dir = TestDir::new().unwrap();
    // Logs go to the lab-shared output dir (kept by the outer side when the test fails).
    let logs: PathBuf = lab::out_dir().join(format!("vmm-lab-reconnect-{}", std::process::id()));
    std::fs::create_dir_all(&logs).unwrap();
    eprintln!("{TEST}: logs in {}", logs.display());

    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let blk_sock = dir.join("blk.sock");
    let mut blk1 = start_blk(&blk_bin, &img, &blk_sock, "vhost-blk-colo-1", &logs);

    let net_sock = dir.join("net.sock");
    let port = colo_tests::free_tcp_port().unwrap();
    let mut ncmd = Command::new(&net_bin);
    ncmd.arg("--socket").arg(&net_sock).args([
        "--netdev",
        &format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:5000"),
        "--mac",
        "52:54:00:12:34:56",
    ]);
    let net = ChildGuard::spawn("vhost-net-colo", &mut ncmd, &logs).unwrap();
    colo_tests::wait_for_unix_socket(&net_sock, secs(60)).unwrap();

    let mut cmd = Command::new(&vmm_bin);
    cmd.arg("--kernel")
        .arg(&img_files.kernel)
        .arg("--initrd")
        .arg(&img_files.initrd)
        .args([
            "--cmdline",
            "console=ttyS0 quiet pci=noearly colo.services=journal",
            "--memory",
            "512M",
            "--serial",
            "stdio",
            "--disk",
            &format!("vhost-user,socket={}", blk_sock.display()),
            "--net",
            &format!(
                "vhost-user,socket={},mac=52:54:00:12:34:56",
                net_sock.display()
            ),
        ]);
    let t_boot = Instant::now();
    let mut vmm = ChildGuard::spawn("vmm-min", &mut cmd, &logs).unwrap();
    vmm.wait_for_output("COLO-GUEST-READY", secs(240)).unwrap();
    eprintln!(
        "{TEST}: READY after {:.1} s",
        t_boot.elapsed().as_secs_f64()
    );

    let acked = Arc::new(Mutex::new(Vec::<Acked>::new()));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let cl = {
        let (a, e, s) = (Arc::clone(&acked), Arc::clone(&errors), Arc::clone(&stop));
        std::thread::spawn(move || client(port, a, e, s))
    };

    wait_acked(
        &acked,
        10,
        secs(120),
        "before the kill",
        &[&vmm, &blk1, &net],
    );
    let before = acked.lock().unwrap().len();
    let t_kill = t0.elapsed();
    blk1.signal(libc::SIGKILL);
    let st = blk1.kill();
    eprintln!("{TEST}: vhost-blk-colo SIGKILLed after {before} acknowledged records ({st:?})");
    std::thread::sleep(Duration::from_secs(1));
    let _ = std::fs::remove_file(&blk_sock);
    let t_restart = t0.elapsed();
    let blk2 = start_blk(&blk_bin, &img, &blk_sock, "vhost-blk-colo-2", &logs);
    eprintln!(
        "{TEST}: new vhost-blk-colo on the same socket {:.2} s after the kill",
        (t_restart - t_kill).as_secs_f64()
    );
    wait_acked(
        &acked,
        before + 10,
        secs(180),
        "after the restart",
        &[&vmm, &blk2, &net],
    );
    stop.store(true, Ordering::SeqCst);
    cl.join().unwrap();
    let recs = acked.lock().unwrap().clone();
    let errs = errors.lock().unwrap().clone();

    // The guest carried on: the VM is still running, and records sent after the restart were
    // acknowledged.
    assert!(vmm.is_running(), "vmm-min died{}", vmm.log_tail(40));
    assert!(
        recs.iter().filter(|r| r.sent > t_restart).count() >= 5,
        "records sent after the restart were acknowledged: {recs:?}"
    );
    let first_after_kill = recs.iter().find(|r| r.acked > t_kill);
    let max_latency = recs
        .iter()
        .map(|r| r.acked - r.sent)
        .max()
        .unwrap_or_default();
    eprintln!(
        "{TEST}: {} records acknowledged ({before} before the kill); first ack after the kill {:.2} s after it; longest append {:.2} s; client errors: {errs:?}",
        recs.len(),
        first_after_kill.map_or(f64::NAN, |r| (r.acked - t_kill).as_secs_f64()),
        max_latency.as_secs_f64()
    );
    let vmm_log = vmm.log_tail(20);
    vmm.terminate(Duration::from_secs(10));
    drop(blk2);
    drop(net);

    // Every acknowledged record is in the image at its slot; seqs are distinct.
    let data = std::fs::read(&img).unwrap();
    let mut seqs: Vec<u64> = recs.iter().map(|r| r.seq).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), recs.len(), "distinct seqs: {recs:?}");
    for r in &recs {
        let off = usize::try_from(r.seq * 512).unwrap();
        assert!(off + 512 <= data.len(), "slot {} beyond the image", r.seq);
        let slot = &data[off..off + 512];
        let want = format!("COLOJRNL {:08} {:03}\n{}\n", r.seq, r.text.len(), r.text);
        assert_eq!(
            &slot[..want.len()],
            want.as_bytes(),
            "record {:?} (seq {}) in the image: {:?}{vmm_log}",
            r.text,
            r.seq,
            String::from_utf8_lossy(&slot[..want.len() + 8])
        );
    }
    eprintln!(
        "{TEST}: all {} acknowledged records found in the image at their slots",
        recs.len()
    );
}
