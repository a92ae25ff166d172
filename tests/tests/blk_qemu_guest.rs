//! vhost-blk-colo as the disk of a real guest: QEMU 7.2 under TCG (`-M microvm`, memfd shared
//! memory, `-device vhost-user-blk`) boots the test guest of `scripts/build-guest.sh`, whose
//! journal service writes records to /dev/vda with O_DIRECT + fsync. The backend serves the
//! seed's primary drive (a quorum over a raw file). After QEMU stops, every acknowledged record
//! must be in the image file, byte for byte.
//!
//! Skips loudly without QEMU or the guest image; `COLO_SKIP_TCG=1` skips it on purpose.

#![allow(clippy::unwrap_used)] // test code

use std::{
    io::{BufRead, BufReader, Write},
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use colo_tests::guest::qemu_tcg_guest;
use colo_tests::{ChildGuard, TestDir, cargo_bin, free_tcp_port, guest_image, skipped};

const READY: &str = "COLO-GUEST-READY";

fn wait_file_contains(path: &Path, marker: &str, deadline: Instant, qemu: &mut ChildGuard) {
    loop {
        let log = String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned();
        if log.contains(marker) {
            return;
        }
        if let Some(st) = qemu.try_wait() {
            panic!("QEMU exited ({st}) before {marker}; serial:\n{log}");
        }
        assert!(
            Instant::now() < deadline,
            "no {marker} in time; serial:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn guest_journal_writes_land_in_the_image_through_our_backend() {
    if std::env::var_os("COLO_SKIP_TCG").is_some() {
        skipped("COLO_SKIP_TCG is set");
        return;
    }
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        skipped("qemu-system-x86_64 not installed (Debian package qemu-system-x86)");
        return;
    }
    let guest = match guest_image() {
        Ok(g) => g,
        Err(why) => {
            skipped(&why);
            return;
        }
    };
    let dir = TestDir::new().unwrap();
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 16 << 20]).unwrap();
    let sock = dir.join("blk.sock");
    let qmp = dir.join("blk.qmp");
    let bin = cargo_bin("vhost-blk-colo").unwrap();
    let _backend = ChildGuard::spawn(
        "vhost-blk-colo",
        Command::new(&bin).arg("--socket").arg(&sock).arg("--qmp").arg(format!("unix:{}", qmp.display())).arg("--drive").arg(
            format!(
                "driver=quorum,id=colo-disk0,read-pattern=fifo,vote-threshold=1,children.0.file.filename={},children.0.driver=raw",
                img.display()
            ),
        ),
        dir.path(),
    )
    .unwrap();
    colo_tests::wait_for_unix_socket(&sock, Instant::now() + Duration::from_secs(20)).unwrap();

    let journal = free_tcp_port().unwrap();
    let serial = dir.join("serial.log");
    let mut qemu = ChildGuard::spawn(
        "qemu",
        qemu_tcg_guest(&guest, "colo.services=journal")
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .args([
                "-netdev",
                &format!("user,id=n0,hostfwd=tcp:127.0.0.1:{journal}-:5000"),
            ])
            .args(["-device", "virtio-net-device,netdev=n0"])
            .arg("-chardev")
            .arg(format!("socket,id=c0,path={}", sock.display()))
            .args(["-device", "vhost-user-blk,chardev=c0,num-queues=1"])
            .stdin(Stdio::null()),
        dir.path(),
    )
    .unwrap();
    wait_file_contains(
        &serial,
        READY,
        Instant::now() + Duration::from_secs(300),
        &mut qemu,
    );

    let s = TcpStream::connect(("127.0.0.1", journal)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let records: Vec<String> = (1..=20)
        .map(|i| format!("record {i} through vhost-blk-colo"))
        .collect();
    for (i, rec) in records.iter().enumerate() {
        writeln!(w, "APPEND {rec}").unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), format!("OK {}", i + 1), "journal reply");
    }
    writeln!(w, "QUERY").unwrap();
    let mut n = 0;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        if line.starts_with("END") {
            assert_eq!(line.trim(), format!("END {}", records.len()));
            break;
        }
        n += 1;
        assert!(line.starts_with("REC "), "{line}");
    }
    assert_eq!(n, records.len());
    drop(w);
    drop(r);
    drop(qemu);

    let data = std::fs::read(&img).unwrap();
    for (i, rec) in records.iter().enumerate() {
        let seq = i + 1;
        let slot = &data[seq * 512..(seq + 1) * 512];
        let want = format!("COLOJRNL {seq:08} {:03}\n{rec}\n", rec.len());
        assert_eq!(
            &slot[..want.len()],
            want.as_bytes(),
            "record {seq} in the image"
        );
        assert!(slot[want.len()..].iter().all(|&b| b == 0));
    }
}
