//! What this host offers, checked cheaply in Rust (the same checks as
//! `scripts/host-check.sh`), so a test can say clearly why it does not run here.
//!
//! Each check returns `Ok(())` or `Err(reason)`; use them with [`crate::require!`]:
//!
//! ```no_run
//! # fn t() {
//! colo_tests::require!(colo_tests::host::root());
//! colo_tests::require!(colo_tests::host::tool("socat"));
//! # }
//! ```

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use serde_json::{Value, json};

/// Debian tools the tests use, checked by [`facts`] and `scripts/host-check.sh`.
pub const TOOLS: &[&str] = &[
    "qemu-system-x86_64",
    "qemu-img",
    "qemu-nbd",
    "qemu-io",
    "qemu-storage-daemon",
    "socat",
    "tcpdump",
    "busybox",
    "ip",
];

/// Running as root (euid 0).
pub fn root() -> Result<(), String> {
    // SAFETY: geteuid(2) has no arguments and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        Ok(())
    } else {
        Err("needs root (euid 0)".into())
    }
}

/// `program` is on PATH.
pub fn tool(program: &str) -> Result<(), String> {
    if find_in_path(program) {
        Ok(())
    } else {
        Err(format!("'{program}' not installed (not on PATH)"))
    }
}

fn find_in_path(program: &str) -> bool {
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|d| {
        let p = d.join(program);
        std::fs::metadata(&p)
            .map(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.is_file() && m.permissions().mode() & 0o111 != 0
            })
            .unwrap_or(false)
    })
}

/// `/dev/kvm` can be opened read-write.
pub fn kvm() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(|_| ())
        .map_err(|e| format!("/dev/kvm not usable: {e}"))
}

/// Whether KVM here is PVM (`kvm_pvm` module loaded or `nested_pvm` on the kernel command
/// line): a stock Linux guest does NOT boot under it.
pub fn is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
        || std::fs::read_to_string("/proc/cmdline")
            .map(|c| c.split_whitespace().any(|w| w.starts_with("nested_pvm")))
            .unwrap_or(false)
}

/// KVM that can run a stock Linux guest: present and not PVM.
pub fn kvm_for_linux_guests() -> Result<(), String> {
    kvm()?;
    if is_pvm() {
        return Err(
            "KVM here is PVM (kvm_pvm / nested_pvm): stock Linux guests do not boot under it; \
             use TCG or scripts/kvm-lab.sh"
                .into(),
        );
    }
    Ok(())
}

/// QEMU TCG is available (`qemu-system-x86_64` installed).
pub fn tcg() -> Result<(), String> {
    tool("qemu-system-x86_64")
}

/// Network namespaces can be created here (root, `ip`, and a real `ip netns add` works).
/// The probe runs once per test process.
pub fn netns() -> Result<(), String> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            root()?;
            tool("ip")?;
            let ns = crate::net::NetNs::new("probe").map_err(|e| format!("netns: {e:#}"))?;
            drop(ns);
            Ok(())
        })
        .clone()
}

/// `/dev/net/tun` can be opened (taps).
pub fn tun() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map(|_| ())
        .map_err(|e| format!("/dev/net/tun not usable: {e}"))
}

/// `memfd_create` works (vhost-user shared memory).
pub fn memfd() -> Result<(), String> {
    // SAFETY: memfd_create(2) with a NUL-terminated name and no flags; the returned fd is
    // closed right away.
    let fd = unsafe { libc::memfd_create(c"colo-probe".as_ptr(), 0) };
    if fd < 0 {
        return Err(format!(
            "memfd_create failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: closing the fd we just got.
    unsafe { libc::close(fd) };
    Ok(())
}

/// CPU vendor (`AuthenticAMD`, `GenuineIntel`, …) and virtualisation flag (`svm`/`vmx`, or
/// `none`) from `/proc/cpuinfo`.
pub fn cpu_vendor() -> (String, String) {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        info.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_string())
    };
    let vendor = field("vendor_id").unwrap_or_else(|| "unknown".into());
    let flags = field("flags").unwrap_or_default();
    let virt = flags
        .split_whitespace()
        .find(|f| *f == "svm" || *f == "vmx")
        .unwrap_or("none")
        .to_string();
    (vendor, virt)
}

/// All facts as JSON (same keys as `scripts/host-check.sh --json`).
pub fn facts() -> Value {
    let ok = |r: Result<(), String>| match r {
        Ok(()) => json!({"ok": true}),
        Err(e) => json!({"ok": false, "reason": e}),
    };
    let (vendor, virt) = cpu_vendor();
    let tools: serde_json::Map<String, Value> = TOOLS
        .iter()
        .map(|t| (t.to_string(), Value::Bool(find_in_path(t))))
        .collect();
    json!({
        "root": ok(root()),
        "kvm": ok(kvm()),
        "pvm": is_pvm(),
        "kvm_for_linux_guests": ok(kvm_for_linux_guests()),
        "cpu_vendor": vendor,
        "cpu_virt": virt,
        "tcg": ok(tcg()),
        "netns": ok(netns()),
        "tun": ok(tun()),
        "memfd": ok(memfd()),
        "tools": tools,
    })
}

/// Whether a program runs (`program --version` exits 0).
pub fn runs(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `scripts/host-check.sh --json` and [`facts`] agree on every check and tool.
    #[test]
    fn host_check_script_agrees_with_rust_checks() {
        let script = crate::workspace_root().join("scripts/host-check.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg("--json")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let from_script: Value = serde_json::from_slice(&out.stdout).unwrap();
        let ours = facts();
        for key in [
            "root",
            "kvm",
            "kvm_for_linux_guests",
            "tcg",
            "netns",
            "tun",
            "memfd",
        ] {
            assert_eq!(
                from_script[key]["ok"], ours[key]["ok"],
                "{key}: script {} vs rust {}",
                from_script[key], ours[key]
            );
        }
        for key in ["pvm", "cpu_vendor", "cpu_virt", "tools"] {
            assert_eq!(from_script[key], ours[key], "{key}");
        }
        eprintln!("host facts: {ours}");
    }
}
