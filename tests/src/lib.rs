//! Harness for the end-to-end tests in `tests/tests/`: real processes, guests and namespaces.
//!
//! - [`ChildGuard`]: a process logged to files in the test's directory, killed by PID on drop
//!   (also on panic, with its log tail printed).
//! - Waits with deadlines: [`wait_for_path`], [`wait_for_unix_socket`], [`wait_for_tcp`],
//!   [`wait_for_marker`], [`wait_until`]; [`secs`] makes a deadline.
//! - Names and ports: [`unique_name`] (≤ 15 characters, fit for interfaces), [`free_tcp_port`].
//! - [`net`]: [`NetNs`], [`Veth`], [`Bridge`], [`Tap`], removed on drop.
//! - [`host`]: what this host can run; [`skip!`] / [`require!`] / [`require_root`] print
//!   `SKIPPED: <test>: <reason>` to stderr and return.
//! - Workspace: [`workspace_root`], [`cargo_bin`] (builds the binary if needed),
//!   [`guest_image`] (kernel + initramfs from `scripts/build-guest.sh`).
//! - [`guest`]: the test guest under QEMU TCG (build on demand, kernel command line, READY
//!   marker); [`lab`]: re-run a test inside the KVM lab when this host's KVM is PVM.
//! - QMP: [`qmp`] re-exports `colo_proto::qmp`; [`qmp_connect`] waits for the socket.
//!   `src/bin/qmp-demo.rs` is a minimal QMP server process built on it.
//!
//! Test code may `unwrap`; the harness returns `anyhow::Result` with context instead.

pub mod guest;
pub mod host;
pub mod lab;
pub mod net;
pub mod process;
pub mod vmm;

pub use colo_proto::qmp;
pub use colo_proto::qmp::{Event as QmpEvent, QmpClient, QmpClientError};
pub use net::{Bridge, NetNs, Tap, UdpServer, Veth};
pub use process::{ChildGuard, MarkerScan};

use std::collections::HashSet;
use std::net::{TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A deadline `n` seconds from now.
pub fn secs(n: u64) -> Instant {
    Instant::now() + Duration::from_secs(n)
}

/// The name of the running test (libtest names each test's thread after it).
pub fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("unknown-test")
        .to_string()
}

/// Prints `SKIPPED: <test>: <reason>` to stderr. Prefer [`skip!`], which also returns.
pub fn skipped(reason: &str) {
    eprintln!("SKIPPED: {}: {reason}", test_name());
}

/// Prints `SKIPPED: <test>: <reason>` to stderr and returns from the test.
/// `skip!("no guest image: {}", why)`.
#[macro_export]
macro_rules! skip {
    ($($arg:tt)*) => {{
        $crate::skipped(&format!($($arg)*));
        return;
    }};
}

/// Skips the test (see [`skip!`]) unless the check (a `Result<_, String>`) is `Ok`; evaluates to
/// the `Ok` value. `let img = require!(colo_tests::guest_image());`
#[macro_export]
macro_rules! require {
    ($check:expr) => {
        match $check {
            Ok(v) => v,
            Err(reason) => $crate::skip!("{}", reason),
        }
    };
}

/// True when running as root; otherwise prints the SKIPPED line and returns false:
/// `if !colo_tests::require_root() { return; }`.
pub fn require_root() -> bool {
    match host::root() {
        Ok(()) => true,
        Err(r) => {
            skipped(&r);
            false
        }
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut v = Vec::new();
    loop {
        v.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    v.reverse();
    String::from_utf8_lossy(&v).into_owned()
}

/// A name unique on this machine among running tests: `<prefix><pid>x<counter>` (pid and
/// counter in base 36), at most 15 characters (Linux interface names); the prefix is shortened
/// when needed, never the unique part.
pub fn unique_name(prefix: &str) -> String {
    unique_name_max(prefix, 15)
}

/// Like [`unique_name`] with another maximum length (≥ 8).
pub fn unique_name_max(prefix: &str, max: usize) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let unique = format!("{}x{}", base36(std::process::id() as u64), base36(n as u64));
    let room = max.saturating_sub(unique.len());
    let prefix: String = prefix
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(room)
        .collect();
    format!("{prefix}{unique}")
}

/// A TCP port on 127.0.0.1 that was free a moment ago. Prefer letting the process under test
/// bind `:0` when it can. Picked at random below the kernel's ephemeral range and checked by
/// binding it: a port from `bind(:0)` lies inside that range, where any outgoing connection
/// (other tests, a fuzzer, the host) may take it before the process under test binds it.
pub fn free_tcp_port() -> Result<u16> {
    free_port_below_ephemeral(|p| TcpListener::bind(("127.0.0.1", p)).is_ok())
}

/// A UDP port on 127.0.0.1 that was free a moment ago (picked as [`free_tcp_port`] does).
pub fn free_udp_port() -> Result<u16> {
    free_port_below_ephemeral(|p| UdpSocket::bind(("127.0.0.1", p)).is_ok())
}

/// The first of up to 200 random ports in [20000, start of the ephemeral range) that `free`
/// accepts.
fn free_port_below_ephemeral(free: impl Fn(u16) -> bool) -> Result<u16> {
    use std::hash::{BuildHasher, RandomState};
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .filter(|&low| low > 21_000)
        .unwrap_or(32768);
    // RandomState is seeded per process; the counter differs per call.
    let seed = RandomState::new();
    for _ in 0..200 {
        let n = seed.hash_one(COUNTER.fetch_add(1, Ordering::Relaxed));
        let port = 20_000 + (n % u64::from(low - 20_000)) as u16;
        if free(port) {
            return Ok(port);
        }
    }
    bail!("no free port below {low} after 200 tries")
}

/// Polls `cond` every 10 ms until it is true or `deadline` passes (then fails naming `what`).
pub fn wait_until(deadline: Instant, what: &str, mut cond: impl FnMut() -> bool) -> Result<()> {
    loop {
        if cond() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until `path` exists.
pub fn wait_for_path(path: impl AsRef<Path>, deadline: Instant) -> Result<()> {
    let p = path.as_ref();
    wait_until(deadline, &format!("{} to exist", p.display()), || {
        p.exists()
    })
}

/// Waits until a Unix socket at `path` accepts a connection (the probe connection is closed).
pub fn wait_for_unix_socket(path: impl AsRef<Path>, deadline: Instant) -> Result<()> {
    let p = path.as_ref();
    wait_until(
        deadline,
        &format!("{} to accept connections", p.display()),
        || UnixStream::connect(p).is_ok(),
    )
}

/// Waits until a TCP address accepts a connection.
pub fn wait_for_tcp(addr: impl ToSocketAddrs, deadline: Instant) -> Result<()> {
    let addrs: Vec<_> = addr.to_socket_addrs().context("resolve address")?.collect();
    wait_until(deadline, &format!("TCP {addrs:?} to accept"), || {
        addrs
            .iter()
            .any(|a| TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok())
    })
}

/// Waits until `marker` (e.g. `"COLO-GUEST-READY"`) appears in the file (e.g. a serial log);
/// reads only what was appended since the last poll.
pub fn wait_for_marker(file: impl AsRef<Path>, marker: &str, deadline: Instant) -> Result<()> {
    let file = file.as_ref();
    let mut scan = MarkerScan::new(file, marker);
    loop {
        if scan.found()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out waiting for {marker:?} in {}", file.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Connects a QMP client to a Unix socket, waiting for it to appear until `deadline`.
pub fn qmp_connect(path: impl AsRef<Path>, deadline: Instant) -> Result<QmpClient> {
    let path = path.as_ref();
    QmpClient::connect_unix_retry(path, deadline, Duration::from_secs(10))
        .with_context(|| format!("QMP connect to {}", path.display()))
}

/// The workspace root (the parent of the `tests` crate).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The directory of the running test binary's profile (`target/debug` or `target/release`).
fn profile_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    let mut dir = exe
        .parent()
        .context("test binary has no parent directory")?
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    Ok(dir)
}

static BUILT: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// The path of a workspace binary (e.g. `"comparer"`, `"vmm-min"`) in the shared target
/// directory, next to the test binary.
///
/// Tests of another package cannot use `CARGO_BIN_EXE_*`, and `cargo test -p X` does not build
/// other packages' binaries, so the first call per binary and test process runs
/// `cargo build --bin NAME` (same profile; a no-op when fresh, so a stale binary is never
/// used). Set `COLO_TESTS_NO_BUILD=1` to skip that when the binaries were built beforehand
/// (e.g. `cargo build --workspace --bins`).
pub fn cargo_bin(name: &str) -> Result<PathBuf> {
    let dir = profile_dir()?;
    let path = dir.join(name);
    if std::env::var_os("COLO_TESTS_NO_BUILD").is_none() {
        let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
        let set = built.get_or_insert_with(HashSet::new);
        if !set.contains(name) {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.current_dir(workspace_root())
                .args(["build", "--quiet", "--bin", name]);
            if dir.file_name().is_some_and(|n| n == "release") {
                cmd.arg("--release");
            }
            let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
            if !out.status.success() {
                bail!(
                    "building binary '{name}' failed ({}):\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            set.insert(name.to_string());
        }
    }
    if !path.is_file() {
        bail!(
            "binary {} not found (build it with cargo build --bin {name})",
            path.display()
        );
    }
    Ok(path)
}

/// The test guest built by `scripts/build-guest.sh`.
#[derive(Clone, Debug)]
pub struct GuestImage {
    /// The cache directory (`$COLO_CACHE/guest`, default `<repo>/.cache/guest`).
    pub dir: PathBuf,
    /// The kernel (`vmlinuz`).
    pub kernel: PathBuf,
    /// The initramfs (`initramfs.cpio.gz`).
    pub initrd: PathBuf,
}

/// The guest image directory, whether built or not.
pub fn guest_dir() -> PathBuf {
    let root = std::env::var_os("COLO_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".cache"));
    root.join("guest")
}

/// The guest kernel and initramfs, or why they are missing (usable with [`require!`]).
/// Build them with `scripts/build-guest.sh` (the CI does that before the tests).
pub fn guest_image() -> std::result::Result<GuestImage, String> {
    let dir = guest_dir();
    let img = GuestImage {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initramfs.cpio.gz"),
        dir,
    };
    if img.kernel.is_file() && img.initrd.is_file() {
        Ok(img)
    } else {
        Err(format!(
            "no guest image in {} (run scripts/build-guest.sh)",
            img.dir.display()
        ))
    }
}

/// A temporary directory for one test (`colo-<test name>-XXXX`), removed on drop unless the
/// test panicked or `COLO_KEEP_TEST_DIRS=1` is set (then its path is printed).
#[derive(Debug)]
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
}

impl TestDir {
    /// Creates the directory.
    pub fn new() -> Result<TestDir> {
        let name: String = test_name()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let name = &name[name.len().saturating_sub(40)..];
        let dir = tempfile::Builder::new()
            .prefix(&format!("colo-{name}-"))
            .tempdir()
            .context("create test directory")?;
        Ok(TestDir { dir: Some(dir) })
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        match &self.dir {
            Some(d) => d.path(),
            None => Path::new("/nonexistent"),
        }
    }

    /// `path().join(name)`.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path().join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if (std::thread::panicking() || std::env::var_os("COLO_KEEP_TEST_DIRS").is_some())
            && let Some(d) = self.dir.take()
        {
            eprintln!("[colo-tests] test directory kept: {}", d.keep().display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_fit_interfaces_and_differ() {
        let a = unique_name("averyverylongprefix");
        let b = unique_name("averyverylongprefix");
        assert!(a.len() <= 15 && b.len() <= 15, "{a} {b}");
        assert_ne!(a, b);
        assert!(unique_name_max("br", 10).len() <= 10);
    }

    #[test]
    fn marker_split_across_writes_is_found() {
        let d = TestDir::new().unwrap();
        let f = d.join("serial.log");
        let mut scan = MarkerScan::new(&f, "COLO-GUEST-READY");
        assert!(!scan.found().unwrap());
        std::fs::write(&f, "boot...\nCOLO-GUE").unwrap();
        assert!(!scan.found().unwrap());
        use std::io::Write;
        let mut h = std::fs::OpenOptions::new().append(true).open(&f).unwrap();
        h.write_all(b"ST-READY 5.1\n").unwrap();
        assert!(scan.found().unwrap());
        wait_for_marker(&f, "READY", secs(1)).unwrap();
        assert!(wait_for_marker(&f, "NOPE", Instant::now()).is_err());
    }

    #[test]
    fn child_guard_logs_and_kills() {
        let d = TestDir::new().unwrap();
        let mut c = ChildGuard::spawn(
            "sh",
            Command::new("sh").args(["-c", "echo hello; echo oops >&2; sleep 1000 & wait"]),
            d.path(),
        )
        .unwrap();
        c.wait_for_output("hello", secs(10)).unwrap();
        assert!(c.is_running());
        let pid = c.pid();
        assert!(
            c.stderr_text().contains("oops") || {
                std::thread::sleep(Duration::from_millis(200));
                c.stderr_text().contains("oops")
            }
        );
        drop(c);
        // The PID is reaped: no such process any more (or reused by someone else, unlikely).
        assert!(!Path::new(&format!("/proc/{pid}/status")).exists());
    }

    #[test]
    fn child_guard_reports_early_exit() {
        let d = TestDir::new().unwrap();
        let mut c = ChildGuard::spawn(
            "false",
            Command::new("sh").args(["-c", "echo bye; exit 3"]),
            d.path(),
        )
        .unwrap();
        let err = c.wait_for_output("never", secs(10)).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("exited") && msg.contains("bye"), "{msg}");
    }

    #[test]
    fn waits_time_out_and_succeed() {
        let d = TestDir::new().unwrap();
        assert!(wait_for_path(d.join("x"), Instant::now()).is_err());
        let port = free_tcp_port().unwrap();
        assert!(wait_for_tcp(("127.0.0.1", port), secs(0)).is_err());
        let _l = TcpListener::bind(("127.0.0.1", port)).unwrap();
        wait_for_tcp(("127.0.0.1", port), secs(5)).unwrap();
    }

    #[test]
    fn cargo_bin_finds_profile_dir() {
        let dir = profile_dir().unwrap();
        assert!(
            dir.ends_with("debug") || dir.ends_with("release"),
            "{dir:?}"
        );
        assert!(workspace_root().join("Cargo.toml").is_file());
    }

    #[test]
    fn namespaces_veths_bridges_taps_are_made_and_removed() {
        require!(host::netns());
        let ns = NetNs::new("t").unwrap();
        let mut v = Veth::new("t").unwrap();
        v.move_b(&ns).unwrap();
        v.up_a(Some("10.231.0.1/24")).unwrap();
        v.up_b(Some("10.231.0.2/24")).unwrap();
        let out = ns.run("ip", &["-o", "addr", "show", "dev", v.b()]).unwrap();
        assert!(out.contains("10.231.0.2"), "{out}");
        let br = Bridge::new("tbr", Some(&ns)).unwrap();
        let tap = Tap::new("ttap", Some(&ns), true).unwrap();
        br.attach(tap.name()).unwrap();
        let links = ns.ip(&["-o", "link"]).unwrap();
        assert!(
            links.contains(br.name()) && links.contains(tap.name()),
            "{links}"
        );
        let (a, nsname) = (v.a().to_string(), ns.name().to_string());
        drop(tap);
        drop(br);
        drop(v);
        drop(ns);
        assert!(net::ip(&["link", "show", &a]).is_err());
        assert!(!net::ip(&["netns", "list"]).unwrap().contains(&nsname));
    }
}
