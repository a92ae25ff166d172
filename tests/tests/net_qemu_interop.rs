//! Byte compatibility with QEMU 7.2's network filters on a live path, no guest needed: QEMU
//! runs `-M none` with a `-netdev stream` behind a hub, so its filters see real packets.
//!
//! - QEMU's `filter-mirror` feeds our `filter-redirector` (indev, queue=rx): frames written into
//!   QEMU's stream netdev come out of our `stream` netdev in order, byte for byte.
//! - Our `filter-mirror` feeds QEMU's `filter-redirector`: frames written into our `stream`
//!   netdev come out of QEMU's stream netdev.
//!
//! Both with and without `vnet_hdr_support`. The stream netdevs on both sides also prove that
//! our `-netdev stream` framing is QEMU's.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use colo_proto::frame::{Frame, FrameReader, write_frame};
use colo_tests::{ChildGuard, TestDir, cargo_bin, free_udp_port, secs};

fn qemu_available() -> bool {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Ethernet frames of assorted sizes with recognisable contents.
fn frames() -> Vec<Vec<u8>> {
    let sizes = [60usize, 64, 100, 512, 1000, 1514, 60, 9014, 1514, 61];
    sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let mut f = vec![0u8; n];
            f[..6].copy_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
            f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0xab, 0xcd, i as u8]);
            f[12..14].copy_from_slice(&[0x88, 0xb5]); // local experimental ethertype
            for (j, b) in f[14..].iter_mut().enumerate() {
                *b = (i * 31 + j) as u8;
            }
            f
        })
        .collect()
}

fn accept_within(l: &UnixListener, deadline: Instant) -> UnixStream {
    l.set_nonblocking(true).unwrap();
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                return s;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "no connection on the listener");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Sends `frames` into `input` until all of them came out of `output` in order (QEMU's
/// filters only see frames once every link is up, so early frames may be lost: the test
/// resends the whole batch, each batch tagged, until one batch arrives whole).
fn pump(input: &mut UnixStream, output: UnixStream) {
    output
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut reader = FrameReader::new(output, false);
    let want = frames();
    let deadline = secs(60);
    for attempt in 0u8.. {
        assert!(Instant::now() < deadline, "frames never came through");
        let batch: Vec<Vec<u8>> = want
            .iter()
            .map(|f| {
                let mut f = f.clone();
                f[13] = attempt; // tag the batch in the ethertype's low byte
                f
            })
            .collect();
        for f in &batch {
            write_frame(input, &Frame::ethernet(f.clone()), false).unwrap();
        }
        let mut got = Vec::new();
        while got.len() < batch.len() {
            match reader.read_frame() {
                Ok(Some(f)) => {
                    if f.payload.get(13) == Some(&attempt) {
                        got.push(f.payload);
                    }
                }
                Ok(None) => panic!("output closed"),
                Err(_) => break, // timeout: resend
            }
        }
        if got.len() == batch.len() {
            for (i, (g, w)) in got.iter().zip(&batch).enumerate() {
                assert_eq!(g, w, "frame {i} of batch {attempt}");
            }
            return;
        }
        // Drain whatever is still in flight before the next batch.
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn qemu(dir: &TestDir, name: &str, args: &[String]) -> ChildGuard {
    let sink = free_udp_port().unwrap();
    let void = free_udp_port().unwrap();
    ChildGuard::spawn(
        name,
        Command::new("qemu-system-x86_64")
            .args([
                "-M",
                "none",
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
            ])
            .args(["-netdev", "hubport,id=hp0,hubid=0,netdev=q0"])
            .arg("-netdev")
            .arg(format!(
                "dgram,id=sink,local.type=inet,local.host=127.0.0.1,local.port={sink},\
                 remote.type=inet,remote.host=127.0.0.1,remote.port={void}"
            ))
            .args(["-netdev", "hubport,id=hp1,hubid=0,netdev=sink"])
            .args(args),
        dir.path(),
    )
    .unwrap()
}

fn ours(dir: &TestDir, name: &str, args: &[String]) -> ChildGuard {
    let sock = dir.join(format!("{name}.vu.sock"));
    let g = ChildGuard::spawn(
        name,
        Command::new(cargo_bin("vhost-net-colo").unwrap())
            .arg("--socket")
            .arg(&sock)
            .args(args)
            .env("RUST_LOG", "vhost_net_colo=debug"),
        dir.path(),
    )
    .unwrap();
    colo_tests::wait_for_unix_socket(&sock, secs(30)).unwrap();
    g
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

fn qemu_mirror_feeds_our_redirector(vnet: bool) {
    if !qemu_available() {
        colo_tests::skipped("qemu-system-x86_64 not installed");
        return;
    }
    let dir = TestDir::new().unwrap();
    let (qin, mirror, out) = (
        dir.join("qin.sock"),
        dir.join("mirror.sock"),
        dir.join("out.sock"),
    );
    let vh = if vnet { "on" } else { "off" };
    let qin_l = UnixListener::bind(&qin).unwrap();
    let out_l = UnixListener::bind(&out).unwrap();
    let _ours = ours(
        &dir,
        "ours",
        &[
            "--netdev".into(),
            format!(
                "stream,id=o0,server=off,addr.type=unix,addr.path={}",
                p(&out)
            ),
            "--chardev".into(),
            format!("socket,id=red0,path={},server=on,wait=off", p(&mirror)),
            "--object".into(),
            format!("filter-redirector,id=f1,netdev=o0,queue=rx,indev=red0,vnet_hdr_support={vh}"),
        ],
    );
    let output = accept_within(&out_l, secs(30));
    let _q = qemu(
        &dir,
        "qemu",
        &[
            "-netdev".into(),
            format!(
                "stream,id=q0,server=off,addr.type=unix,addr.path={}",
                p(&qin)
            ),
            "-chardev".into(),
            format!("socket,id=mirror0,path={}", p(&mirror)),
            "-object".into(),
            format!("filter-mirror,id=m0,netdev=q0,queue=tx,outdev=mirror0,vnet_hdr_support={vh}"),
        ],
    );
    let mut input = accept_within(&qin_l, secs(30));
    pump(&mut input, output);
}

fn our_mirror_feeds_qemu_redirector(vnet: bool) {
    if !qemu_available() {
        colo_tests::skipped("qemu-system-x86_64 not installed");
        return;
    }
    let dir = TestDir::new().unwrap();
    let (oin, red, qout) = (
        dir.join("oin.sock"),
        dir.join("red.sock"),
        dir.join("qout.sock"),
    );
    let vh = if vnet { "on" } else { "off" };
    let oin_l = UnixListener::bind(&oin).unwrap();
    let qout_l = UnixListener::bind(&qout).unwrap();
    let _q = qemu(
        &dir,
        "qemu",
        &[
            "-netdev".into(),
            format!(
                "stream,id=q0,server=off,addr.type=unix,addr.path={}",
                p(&qout)
            ),
            "-chardev".into(),
            format!("socket,id=red0,path={},server=on,wait=off", p(&red)),
            "-object".into(),
            format!("filter-redirector,id=f1,netdev=q0,queue=rx,indev=red0,vnet_hdr_support={vh}"),
        ],
    );
    let output = accept_within(&qout_l, secs(30));
    colo_tests::wait_for_path(&red, secs(30)).unwrap();
    let _ours = ours(
        &dir,
        "ours",
        &[
            "--netdev".into(),
            format!(
                "stream,id=s0,server=off,addr.type=unix,addr.path={}",
                p(&oin)
            ),
            "--chardev".into(),
            format!("socket,id=mirror0,path={},reconnect=1", p(&red)),
            "--object".into(),
            format!("filter-mirror,id=m0,netdev=s0,queue=tx,outdev=mirror0,vnet_hdr_support={vh}"),
        ],
    );
    let mut input = accept_within(&oin_l, secs(30));
    pump(&mut input, output);
}

#[test]
fn qemu_filter_mirror_feeds_our_filter_redirector() {
    qemu_mirror_feeds_our_redirector(false);
}

#[test]
fn qemu_filter_mirror_feeds_our_filter_redirector_with_vnet_hdr() {
    qemu_mirror_feeds_our_redirector(true);
}

#[test]
fn our_filter_mirror_feeds_qemu_filter_redirector() {
    our_mirror_feeds_qemu_redirector(false);
}

#[test]
fn our_filter_mirror_feeds_qemu_filter_redirector_with_vnet_hdr() {
    our_mirror_feeds_qemu_redirector(true);
}
