//! The kernel / initramfs loader (`boot::load`: bzImage or ELF vmlinux header parsing by
//! linux-loader, the setup header fields vmm-min reads back, the initrd placement, the command
//! line) on a user-given file, into 16 MiB of guest RAM.
//!
//! Input: byte 0 bit 0: with an initrd; byte 1: command line length `n`; then `n` bytes of
//! command line; then the kernel; with an initrd, its last `min(byte 2, rest / 2) * 16` bytes
//! are the initrd instead. Files are memfds opened through `/proc/self/fd`. Checks: no panic;
//! a successful load starts at an entry point inside RAM.
#![no_main]

use std::io::Write;
use std::os::fd::FromRawFd;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vmm_min::arch::cpu::StartMode;
use vmm_min::boot::{BootSpec, load};
use vmm_min::memory::{GuestRam, MIN_MEMORY};

fn memfd(data: &[u8]) -> std::fs::File {
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: fd is a fresh descriptor owned by nobody else.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.write_all(data).expect("memfd write");
    f
}

fn path(f: &std::fs::File) -> std::path::PathBuf {
    use std::os::fd::AsRawFd;
    format!("/proc/self/fd/{}", f.as_raw_fd()).into()
}

fuzz_target!(|data: &[u8]| {
    static RAM: OnceLock<GuestRam> = OnceLock::new();
    let ram = RAM.get_or_init(|| GuestRam::new(MIN_MEMORY).expect("guest RAM"));
    let [mode, n, k, rest @ ..] = data else {
        return;
    };
    let n = usize::from(*n).min(rest.len());
    let (cmdline, rest) = rest.split_at(n);
    let (kernel, initrd) = if mode & 1 != 0 {
        let ilen = (usize::from(*k) * 16).min(rest.len() / 2);
        let (a, b) = rest.split_at(rest.len() - ilen);
        (a, Some(b))
    } else {
        (rest, None)
    };
    let kf = memfd(kernel);
    let inf = initrd.map(memfd);
    let spec = BootSpec {
        kernel: path(&kf),
        initrd: inf.as_ref().map(path),
        cmdline: String::from_utf8_lossy(cmdline).into_owned(),
    };
    match load(ram, &spec, Some(0xe_0000)) {
        Ok(StartMode::Long { rip, .. }) => assert!(ram.contains(rip, 1), "entry {rip:#x}"),
        Ok(_) => {}
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
