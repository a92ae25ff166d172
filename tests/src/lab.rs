//! Real KVM for end-to-end tests: run the test here, or re-run it inside the KVM lab.
//!
//! This host's `/dev/kvm` may be PVM, on which a stock Linux guest never reaches user space. A
//! test that needs a real hardware-style KVM starts with
//!
//! ```no_run
//! # fn boots_guest() {
//! if colo_tests::lab::needs_real_kvm("boots_guest") {
//!     return;
//! }
//! // ... the test body, run where /dev/kvm is real ...
//! # }
//! ```
//!
//! - On a host with real KVM (`/dev/kvm` present, `kvm_intel` or `kvm_amd` loaded, no
//!   `kvm_pvm`), or already inside the lab (`KVM_LAB=1`), it returns `false`: the body runs here.
//! - Otherwise it re-runs the current test binary inside the lab,
//!   `scripts/kvm-lab.sh -w <target dir> -w <output dir> -- <this exe> --exact <test>
//!   --nocapture --test-threads=1`, prints the inner output through the test's own stdout and
//!   stderr (so libtest captures it as usual), panics if the inner run did not pass exactly one
//!   test, and returns `true` so the outer body is skipped.
//! - If the lab cannot run at all (no QEMU, no kernel package obtainable), it prints
//!   `SKIPPED: <test> needs real KVM and the lab is unavailable: <reason>` to stderr and returns
//!   `true`.
//!
//! Lab runs are serialised across threads and processes with an `flock` on
//! `<lab cache>/run.lock`: each lab L1 keeps both host cores busy.
//!
//! Prepare on the host, before the call: build the guest, call `colo_tests::cargo_bin` for the
//! binaries the test needs (inside the lab `COLO_TESTS_NO_BUILD=1` is set, so nothing is built
//! there). Inside the lab the host root is a throw-away overlay: files a test wants to keep go to
//! [`out_dir`] (shared read-write with the host; kept and printed when the test fails) or to
//! another directory the outer side shares.
//!
//! Environment: `COLO_KVM_LAB=off` skips lab tests loudly, `COLO_KVM_LAB=force` uses the lab even
//! on a host with real KVM; `COLO_KVM_LAB_TIMEOUT` (seconds) overrides the lab deadline;
//! `KVM_LAB_DIR` is the lab cache (default `<repo>/.cache/kvm-lab`).

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Deadline of one lab run (the whole L1: boot, the test, power-off) unless overridden.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// Environment variable naming the shared output directory inside the lab.
pub const OUT_DIR_ENV: &str = "COLO_LAB_OUT";

/// Where a test that needs real KVM runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kvm {
    /// `/dev/kvm` here is real (or we are inside the lab): run the test body now.
    Here,
    /// The test was run inside the lab and passed there; skip the outer body.
    RanInLab,
    /// Neither real KVM nor the lab is available; `SKIPPED: …` was printed.
    Skipped(String),
}

/// Why `/dev/kvm` here is or is not usable for stock guests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKvm {
    /// Real hardware-style KVM (VMX or SVM).
    Real,
    /// We are inside the KVM lab (`KVM_LAB=1`).
    InLab,
    /// Not usable for stock guests; the reason.
    NotReal(String),
}

/// Classifies this host's `/dev/kvm`.
pub fn host_kvm() -> HostKvm {
    if std::env::var_os("KVM_LAB").is_some_and(|v| v == "1") {
        return HostKvm::InLab;
    }
    if !Path::new("/dev/kvm").exists() {
        return HostKvm::NotReal("no /dev/kvm".into());
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return HostKvm::NotReal("/dev/kvm is PVM (module kvm_pvm)".into());
    }
    if Path::new("/sys/module/kvm_intel").exists() || Path::new("/sys/module/kvm_amd").exists() {
        return HostKvm::Real;
    }
    HostKvm::NotReal("/dev/kvm exists but neither kvm_intel nor kvm_amd is loaded".into())
}

/// Returns `true` when the caller must return at once (the test already ran in the lab, or was
/// skipped loudly); `false` when the test body should run here. Panics if the test failed in
/// the lab. `test` is the test's path as libtest names it (`fn_name`, or `module::fn_name`).
pub fn needs_real_kvm(test: &str) -> bool {
    needs_real_kvm_within(test, lab_timeout())
}

/// [`needs_real_kvm`] with an explicit deadline for the lab run.
pub fn needs_real_kvm_within(test: &str, timeout: Duration) -> bool {
    match real_kvm(test, timeout) {
        Kvm::Here => false,
        Kvm::RanInLab | Kvm::Skipped(_) => true,
    }
}

/// The decision as a value: runs the test in the lab when needed (panicking if it failed there).
pub fn real_kvm(test: &str, timeout: Duration) -> Kvm {
    check_test_name(test);
    let mode = std::env::var("COLO_KVM_LAB").unwrap_or_default();
    match host_kvm() {
        HostKvm::InLab => return Kvm::Here,
        HostKvm::Real if mode != "force" => return Kvm::Here,
        _ => {}
    }
    if mode == "off" {
        return skip(test, "disabled by COLO_KVM_LAB=off");
    }
    let lab = Lab::locate();
    if let Err(reason) = lab.check() {
        return skip(test, &reason);
    }
    match run_in_lab(&lab, test, timeout) {
        Ok(()) => Kvm::RanInLab,
        Err(msg) => panic!("{test} inside the KVM lab: {msg}"),
    }
}

/// A directory for files a test wants to keep. Inside the lab it is shared read-write with the
/// host (the outer side keeps it when the test fails); elsewhere it is `<tmp>/colo-test-out`,
/// shared by all tests (use unique file names).
pub fn out_dir() -> PathBuf {
    if let Some(d) = std::env::var_os(OUT_DIR_ENV) {
        return PathBuf::from(d);
    }
    let d = std::env::temp_dir().join("colo-test-out");
    match std::fs::create_dir_all(&d) {
        Ok(()) => d,
        Err(_) => std::env::temp_dir(),
    }
}

fn lab_timeout() -> Duration {
    std::env::var("COLO_KVM_LAB_TIMEOUT")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_TIMEOUT)
}

fn skip(test: &str, reason: &str) -> Kvm {
    eprintln!("SKIPPED: {test} needs real KVM and the lab is unavailable: {reason}");
    Kvm::Skipped(reason.to_string())
}

/// libtest names each test thread after the test (when it runs tests on threads): catch a
/// mistyped name early, since `--exact` with a wrong name would run nothing.
fn check_test_name(test: &str) {
    let current = std::thread::current();
    if let Some(name) = current.name()
        && name != "main"
        && name != test
    {
        panic!("needs_real_kvm({test:?}) called from test {name:?}: pass the test's own path");
    }
}

/// Paths of the lab runner and its cache.
#[derive(Debug)]
struct Lab {
    script: PathBuf,
    cache: PathBuf,
}

impl Lab {
    fn locate() -> Lab {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let cache = std::env::var_os("KVM_LAB_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo.join(".cache/kvm-lab"));
        Lab {
            script: repo.join("scripts/kvm-lab.sh"),
            cache,
        }
    }

    /// Can the lab run? (QEMU present, kernel and busybox packages found or downloadable, cache
    /// built.) Err carries the reason.
    fn check(&self) -> Result<(), String> {
        if !self.script.is_file() {
            return Err(format!("{} not found", self.script.display()));
        }
        let out = Command::new(&self.script)
            .arg("--check")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.script.display()))?;
        if out.status.success() {
            return Ok(());
        }
        let err = String::from_utf8_lossy(&out.stderr);
        let reason = err
            .lines()
            .rev()
            .find(|l| l.contains("error:"))
            .or_else(|| err.lines().last())
            .unwrap_or("kvm-lab.sh --check failed")
            .trim()
            .to_string();
        Err(reason)
    }
}

/// The lab runner script, if the lab can run here (it prepares the lab cache on first use);
/// otherwise the reason. For tests of the runner itself; hold [`lock`] while it runs.
pub fn runner() -> Result<PathBuf, String> {
    let lab = Lab::locate();
    lab.check()?;
    Ok(lab.script)
}

/// Takes the lab run lock (waiting for other lab runs of any process to end). Lab runs are
/// serialised because each L1 keeps both host cores busy.
pub fn lock(test: &str) -> Result<RunLock, String> {
    RunLock::acquire(&Lab::locate().cache, test)
}

/// Holds an exclusive `flock` on the lab's run lock while alive.
pub struct RunLock {
    _file: File,
}

impl RunLock {
    fn acquire(cache: &Path, test: &str) -> Result<RunLock, String> {
        std::fs::create_dir_all(cache)
            .map_err(|e| format!("cannot create {}: {e}", cache.display()))?;
        let path = cache.join("run.lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        // SAFETY: flock on a file descriptor we own; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            eprintln!(
                "{test}: waiting for the KVM lab (another lab run holds {})",
                path.display()
            );
            let t = Instant::now();
            // SAFETY: as above; blocks until the other holder releases or exits.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc != 0 {
                return Err(format!(
                    "flock {}: {}",
                    path.display(),
                    std::io::Error::last_os_error()
                ));
            }
            eprintln!(
                "{test}: got the KVM lab after {:.1} s",
                t.elapsed().as_secs_f64()
            );
        }
        Ok(RunLock { _file: file })
    }
}

/// The cargo target directory of the running test binary (the ancestor holding
/// `CACHEDIR.TAG`), else the binary's profile directory.
fn target_dir(exe: &Path) -> Option<PathBuf> {
    let mut dir = exe.parent();
    while let Some(d) = dir {
        if d.join("CACHEDIR.TAG").is_file() {
            return Some(d.to_path_buf());
        }
        dir = d.parent();
    }
    exe.parent()?.parent().map(Path::to_path_buf)
}

/// Copies `src` line by line to our stdout (or stderr) through `print!`, so that libtest's
/// output capture sees it, and keeps everything in `keep`.
fn pump(src: impl Read, to_stderr: bool, keep: Arc<Mutex<String>>) {
    let mut r = BufReader::new(src);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf);
                if to_stderr {
                    eprint!("{line}");
                } else {
                    print!("{line}");
                }
                if let Ok(mut k) = keep.lock() {
                    k.push_str(&line);
                }
            }
        }
    }
}

fn run_in_lab(lab: &Lab, test: &str, timeout: Duration) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let target =
        target_dir(&exe).ok_or_else(|| format!("no target dir above {}", exe.display()))?;
    let out = tempfile::Builder::new()
        .prefix("colo-lab-out.")
        .tempdir()
        .map_err(|e| format!("cannot create an output dir: {e}"))?;
    let _lock = RunLock::acquire(&lab.cache, test)?;

    let t = Instant::now();
    eprintln!(
        "{test}: needs real KVM; running it inside the KVM lab ({})",
        lab.script.display()
    );
    let mut cmd = Command::new(&lab.script);
    // SAFETY: runs in the forked child before exec and only calls prctl(2), which is
    // async-signal-safe. If this test process dies (even by SIGKILL), the runner gets SIGTERM
    // and cleans up (kills its QEMU by PID, removes its run dir).
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .arg("-t")
        .arg(timeout.as_secs().max(1).to_string())
        .arg("-w")
        .arg(&target)
        .arg("-w")
        .arg(out.path())
        .arg("--")
        .arg(&exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(OUT_DIR_ENV, out.path())
        // No cargo builds inside the lab (TCG speed): colo_tests::cargo_bin uses what the
        // outer run built, so call it before needs_real_kvm.
        .env("COLO_TESTS_NO_BUILD", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", lab.script.display()))?;
    let stdout_text = Arc::new(Mutex::new(String::new()));
    let stderr_text = Arc::new(Mutex::new(String::new()));
    let so = child.stdout.take().map(|s| {
        let k = Arc::clone(&stdout_text);
        std::thread::spawn(move || pump(s, false, k))
    });
    let se = child.stderr.take().map(|s| {
        let k = Arc::clone(&stderr_text);
        std::thread::spawn(move || pump(s, true, k))
    });
    // The runner enforces the deadline itself (it kills its QEMU and exits 124); the child
    // guard below only matters if this thread unwinds.
    let guard = KillOnDrop(Some(child));
    let status = guard.wait();
    for h in [so, se].into_iter().flatten() {
        let _ = h.join();
    }
    let secs = t.elapsed().as_secs_f64();
    let status = status.map_err(|e| format!("waiting for kvm-lab.sh: {e}"))?;
    let stdout_text = stdout_text.lock().map(|s| s.clone()).unwrap_or_default();
    let failed = |what: String| {
        // Keep the output dir of a failed run for inspection.
        let kept = out.keep();
        Err(format!(
            "{what} after {secs:.1} s; test outputs kept in {}",
            kept.display()
        ))
    };
    match status.code() {
        Some(0) if stdout_text.contains("test result: ok. 1 passed") => {
            eprintln!("{test}: passed inside the KVM lab in {secs:.1} s");
            Ok(())
        }
        Some(0) => failed(format!(
            "the lab ran, but not exactly one test passed (is {test:?} the exact test path?)"
        )),
        Some(124) => failed("the lab deadline was reached (kvm-lab.sh exit 124)".into()),
        Some(125) => failed("the lab itself failed (kvm-lab.sh exit 125)".into()),
        Some(c) => failed(format!("the test failed (exit status {c})")),
        None => failed(format!("kvm-lab.sh was killed ({status})")),
    }
}

/// The runner process; killed (it then kills its QEMU) and reaped if dropped while running.
struct KillOnDrop(Option<std::process::Child>);

impl KillOnDrop {
    fn wait(mut self) -> std::io::Result<std::process::ExitStatus> {
        match self.0.take() {
            Some(mut c) => c.wait(),
            None => Err(std::io::Error::other("no child")),
        }
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            // SIGTERM lets kvm-lab.sh run its cleanup (kill QEMU by PID, remove its run dir).
            if let Ok(pid) = i32::try_from(c.id()) {
                // SAFETY: kill(2) on the PID of our own, not yet reaped, child.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            let _ = c.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_dir_is_found_from_a_test_binary() {
        let exe = std::env::current_exe().unwrap();
        let t = target_dir(&exe).unwrap();
        assert!(
            exe.starts_with(&t),
            "{} not under {}",
            exe.display(),
            t.display()
        );
        assert!(t.join("CACHEDIR.TAG").is_file() || t.join("deps").is_dir());
    }

    #[test]
    fn host_kvm_in_lab_is_detected() {
        // Only the KVM_LAB=1 case is deterministic; the rest depends on the host.
        if std::env::var_os("KVM_LAB").is_some() {
            assert_eq!(host_kvm(), HostKvm::InLab);
        } else {
            assert_ne!(host_kvm(), HostKvm::InLab);
        }
    }
}
