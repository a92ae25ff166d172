//! The test guest of `scripts/build-guest.sh` under QEMU TCG: build it on demand and the kernel
//! command line a TCG boot needs. Protocols of the guest's services: `scripts/guest/README.md`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{GuestImage, guest_image, workspace_root};

/// The serial-console marker the guest prints once every service listens.
pub const READY_MARKER: &str = "COLO-GUEST-READY";

/// Runs `scripts/build-guest.sh` (idempotent, ~1 s when up to date; it locks against concurrent
/// builds) and returns the image. Fails with the script's output if it cannot build.
pub fn ensure_guest_image() -> Result<GuestImage> {
    let script = workspace_root().join("scripts/build-guest.sh");
    let out = Command::new(&script)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}):\n{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    guest_image().map_err(anyhow::Error::msg)
}

/// The host's TSC rate in kHz, measured over 100 ms with RDTSC.
///
/// Under TCG the guest's TSC is the host's. On `-M microvm` (no HPET, no ACPI PM timer, no port
/// 0x61) the Debian kernel calibrates the TSC against the PIT, which fails on a loaded host and
/// then hangs the boot before /init; `tsc_early_khz=` (see [`tcg_append`]) skips that.
pub fn host_tsc_khz() -> u64 {
    // SAFETY: RDTSC only reads the time-stamp counter, which every x86_64 CPU has.
    let tsc = || unsafe { std::arch::x86_64::_rdtsc() };
    let (t0, c0) = (Instant::now(), tsc());
    std::thread::sleep(Duration::from_millis(100));
    let (c1, dt) = (tsc(), t0.elapsed());
    let khz = u128::from(c1.wrapping_sub(c0)) * 1000 / dt.as_micros().max(1);
    u64::try_from(khz).unwrap_or(u64::MAX)
}

/// The kernel command line for booting the guest under QEMU TCG:
/// `console=ttyS0 quiet tsc_early_khz=<host> <extra>` (`extra` e.g. `colo.services=journal`).
pub fn tcg_append(extra: &str) -> String {
    let base = format!("console=ttyS0 quiet tsc_early_khz={}", host_tsc_khz());
    if extra.is_empty() {
        base
    } else {
        format!("{base} {extra}")
    }
}

/// QEMU arguments for a virtio-net device whose backend is the vhost-user socket `sock`, with
/// the MAC the guest's scripts expect (52:54:00:12:34:56): how the TCG tests attach
/// vhost-net-colo.
pub fn vhost_user_net_args(sock: &std::path::Path) -> Vec<String> {
    [
        "-chardev".to_string(),
        format!("socket,id=c1,path={}", sock.display()),
        "-netdev".to_string(),
        "vhost-user,id=n1,chardev=c1".to_string(),
        "-device".to_string(),
        "virtio-net-device,netdev=n1,mac=52:54:00:12:34:56".to_string(),
    ]
    .into()
}

/// The test guest under TCG with no services and a root shell on its serial console, on the
/// vhost-user net socket `sock`, booted (its ready marker seen within 300 s): the guard (logs
/// in `log_dir`) and the shell's stdin.
pub fn shell_guest_on_vhost_user_net(
    img: &GuestImage,
    sock: &std::path::Path,
    log_dir: &std::path::Path,
) -> Result<(crate::ChildGuard, std::process::ChildStdin)> {
    let mut q = qemu_tcg_guest(img, "colo.services=none colo.shell=1");
    q.args(["-serial", "stdio"]).args(vhost_user_net_args(sock));
    let mut guest = crate::ChildGuard::spawn_with_stdin("guest", &mut q, log_dir)?;
    let stdin = guest.take_stdin().context("guest without stdin")?;
    guest.wait_for_output(READY_MARKER, crate::secs(300))?;
    Ok((guest, stdin))
}

/// `qemu-system-x86_64` booting the test guest under TCG on `-M microvm` with 256 MiB of memfd
/// shared memory (what a vhost-user backend maps) and modern virtio-MMIO (vhost-user backends
/// refuse legacy virtio), kernel command line `tcg_append(extra_append)`. The caller adds the
/// serial console and the devices.
pub fn qemu_tcg_guest(img: &GuestImage, extra_append: &str) -> Command {
    let mut q = Command::new("qemu-system-x86_64");
    q.args([
        "-M",
        "microvm,memory-backend=mem",
        "-accel",
        "tcg",
        "-m",
        "256M",
    ])
    .args(["-nodefaults", "-no-user-config", "-display", "none"])
    .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
    .args(["-global", "virtio-mmio.force-legacy=false"])
    .arg("-kernel")
    .arg(&img.kernel)
    .arg("-initrd")
    .arg(&img.initrd)
    .arg("-append")
    .arg(tcg_append(extra_append));
    q
}
