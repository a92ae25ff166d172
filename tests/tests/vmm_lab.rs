//! vmm-min boots the stock Debian guest (scripts/build-guest.sh) with real KVM: here if this
//! host's /dev/kvm is real, else inside the KVM lab (tests/src/lab.rs). The disk is a
//! vhost-user-blk export of qemu-storage-daemon; the guest's journal records are then found in
//! the image file. The console is vmm-min's stdio: the test types into the guest shell.

#![allow(clippy::unwrap_used)] // test helpers

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use colo_tests::process::ChildGuard;
use colo_tests::{TestDir, cargo_bin, guest_image, lab, secs};

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn qsd(dir: &TestDir, img: &Path, sock: &Path) -> ChildGuard {
    let mut cmd = Command::new("qemu-storage-daemon");
    cmd.args([
        "--blockdev",
        &format!("driver=file,node-name=f,filename={}", img.display()),
        "--export",
        &format!(
            "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on",
            sock.display()
        ),
    ]);
    let g = ChildGuard::spawn("qsd", &mut cmd, dir.path()).unwrap();
    colo_tests::wait_for_unix_socket(sock, secs(60)).unwrap();
    g
}

/// Boots the guest with `cpus` vCPUs and a journal disk, checks the CPU count the guest sees,
/// appends a journal record from inside the guest, powers it off, and finds the record in the
/// image.
fn boot_and_check(cpus: u32) {
    let img_files = match guest_image() {
        Ok(i) => i,
        Err(e) => {
            colo_tests::skipped(&e);
            return;
        }
    };
    if !have("qemu-storage-daemon") {
        colo_tests::skipped("qemu-storage-daemon not installed");
        return;
    }
    let dir = TestDir::new().unwrap();
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let sock = dir.join("blk.sock");
    let _qsd = qsd(&dir, &img, &sock);
    let bin = cargo_bin("vmm-min").unwrap();
    let mut cmd = Command::new(bin);
    cmd.arg("--kernel")
        .arg(&img_files.kernel)
        .arg("--initrd")
        .arg(&img_files.initrd)
        .args([
            "--cmdline",
            "console=ttyS0 quiet pci=noearly colo.shell=1 colo.services=journal",
            "--memory",
            "512M",
            "--cpus",
            &cpus.to_string(),
            "--serial",
            "stdio",
            "--disk",
            &format!("vhost-user,socket={}", sock.display()),
        ]);
    let mut vmm = ChildGuard::spawn_with_stdin("vmm-min", &mut cmd, dir.path()).unwrap();
    let mut stdin = vmm.take_stdin().unwrap();
    vmm.wait_for_output("COLO-GUEST-READY", secs(240)).unwrap();
    // The marker is split in the typed command so its echo does not match.
    writeln!(stdin, "echo CPU\"\"S=$(grep -c ^processor /proc/cpuinfo)").unwrap();
    vmm.wait_for_output(&format!("CPUS={cpus}"), secs(60))
        .unwrap();
    writeln!(
        stdin,
        "echo 'APPEND lab-record-{cpus}' | timeout 10 nc 127.0.0.1 5000; echo JOUR\"\"NAL-DONE"
    )
    .unwrap();
    vmm.wait_for_output("JOURNAL-DONE", secs(60)).unwrap();
    writeln!(stdin, "poweroff -f").unwrap();
    let st = vmm.wait_until(secs(60)).unwrap();
    assert_eq!(st.code(), Some(0), "poweroff exits 0{}", vmm.log_tail(30));
    let data = std::fs::read(&img).unwrap();
    let slot1 = String::from_utf8_lossy(&data[512..1024]).to_string();
    assert!(
        slot1.starts_with("COLOJRNL 00000001") && slot1.contains(&format!("lab-record-{cpus}")),
        "journal slot 1: {slot1:?}"
    );
}

#[test]
fn vmm_lab_stock_guest_ready_with_1_vcpu_and_journal_on_disk() {
    if lab::needs_real_kvm_within(
        "vmm_lab_stock_guest_ready_with_1_vcpu_and_journal_on_disk",
        Duration::from_secs(600),
    ) {
        return;
    }
    boot_and_check(1);
}

#[test]
fn vmm_lab_stock_guest_ready_with_2_vcpus() {
    if lab::needs_real_kvm_within(
        "vmm_lab_stock_guest_ready_with_2_vcpus",
        Duration::from_secs(600),
    ) {
        return;
    }
    boot_and_check(2);
}

/// HTTP and echo answer through a vhost-user net backend (`vhost-net-colo` with its userspace
/// `user` netdev forwarding host ports), with the disk on qemu-storage-daemon as well.
#[test]
fn vmm_lab_stock_guest_serves_http_and_echo_through_vhost_user_net() {
    if lab::needs_real_kvm_within(
        "vmm_lab_stock_guest_serves_http_and_echo_through_vhost_user_net",
        Duration::from_secs(600),
    ) {
        return;
    }
    let img_files = match guest_image() {
        Ok(i) => i,
        Err(e) => {
            colo_tests::skipped(&e);
            return;
        }
    };
    let dir = TestDir::new().unwrap();
    let net_sock = dir.join("net.sock");
    let http_port = colo_tests::free_tcp_port().unwrap();
    let echo_port = colo_tests::free_tcp_port().unwrap();
    let mut ncmd = Command::new(cargo_bin("vhost-net-colo").unwrap());
    ncmd.arg("--socket").arg(&net_sock).args([
        "--netdev",
        &format!(
            "user,id=n0,hostfwd=tcp:127.0.0.1:{http_port}-:80,hostfwd=tcp:127.0.0.1:{echo_port}-:7"
        ),
        "--mac",
        "52:54:00:12:34:56",
    ]);
    let _net = ChildGuard::spawn("vhost-net-colo", &mut ncmd, dir.path()).unwrap();
    colo_tests::wait_for_unix_socket(&net_sock, secs(60)).unwrap();
    let mut cmd = Command::new(cargo_bin("vmm-min").unwrap());
    cmd.arg("--kernel")
        .arg(&img_files.kernel)
        .arg("--initrd")
        .arg(&img_files.initrd)
        .args([
            "--cmdline",
            "console=ttyS0 quiet pci=noearly colo.services=http,echo",
            "--memory",
            "512M",
            "--serial",
            "stdio",
            "--net",
            &format!(
                "vhost-user,socket={},mac=52:54:00:12:34:56",
                net_sock.display()
            ),
        ]);
    let mut vmm = ChildGuard::spawn("vmm-min", &mut cmd, dir.path()).unwrap();
    vmm.wait_for_output("COLO-GUEST-READY", secs(240)).unwrap();
    let page = http_get(http_port);
    assert!(page.contains("<h1>colo guest</h1>"), "{page}");
    let mut s = std::net::TcpStream::connect(("127.0.0.1", echo_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"ping through vhost-user\n").unwrap();
    let mut buf = [0u8; 24];
    std::io::Read::read_exact(&mut s, &mut buf).unwrap();
    assert_eq!(&buf, b"ping through vhost-user\n");
}

fn http_get(port: u16) -> String {
    let end = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let r = (|| -> std::io::Result<String> {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(Duration::from_secs(20)))?;
            s.write_all(b"GET / HTTP/1.0\r\nHost: guest\r\n\r\n")?;
            let mut out = String::new();
            std::io::Read::read_to_string(&mut s, &mut out)?;
            Ok(out)
        })();
        match r {
            Ok(p) if p.contains("200") => return p,
            _ if std::time::Instant::now() < end => std::thread::sleep(Duration::from_millis(500)),
            other => panic!("HTTP through vhost-user net: {other:?}"),
        }
    }
}
