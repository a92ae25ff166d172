//! [`ChildGuard`]: a process a test started, logged to files, killed by PID when dropped.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Lines of each log printed when a test fails with the process still guarded.
const TAIL_LINES: usize = 40;

/// A child process owned by a test.
///
/// - stdout and stderr go to `<log_dir>/<name>.stdout.log` and `<name>.stderr.log`;
/// - stdin is `/dev/null` ([`ChildGuard::spawn_with_stdin`] gives a pipe);
/// - the child runs in its own process group; on drop the group and the child are killed with
///   SIGKILL (by PID) and reaped, also when the test panics; on panic the tail of both logs is
///   printed to stderr first;
/// - the child also gets SIGKILL if the **thread that spawned it** exits (PR_SET_PDEATHSIG), so
///   nothing outlives a test binary that is killed by a timeout. Spawn from the thread that
///   owns the guard.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    name: String,
    stdout: PathBuf,
    stderr: PathBuf,
    status: Option<ExitStatus>,
}

impl ChildGuard {
    /// Starts `cmd` with stdin from `/dev/null`.
    pub fn spawn(name: &str, cmd: &mut Command, log_dir: &Path) -> Result<ChildGuard> {
        cmd.stdin(Stdio::null());
        Self::start(name, cmd, log_dir)
    }

    /// Starts `cmd` with a pipe on stdin (take it with [`ChildGuard::take_stdin`]).
    pub fn spawn_with_stdin(name: &str, cmd: &mut Command, log_dir: &Path) -> Result<ChildGuard> {
        cmd.stdin(Stdio::piped());
        Self::start(name, cmd, log_dir)
    }

    fn start(name: &str, cmd: &mut Command, log_dir: &Path) -> Result<ChildGuard> {
        let stdout = log_dir.join(format!("{name}.stdout.log"));
        let stderr = log_dir.join(format!("{name}.stderr.log"));
        let out = File::create(&stdout).with_context(|| format!("create {}", stdout.display()))?;
        let err = File::create(&stderr).with_context(|| format!("create {}", stderr.display()))?;
        cmd.stdout(out).stderr(err).process_group(0);
        // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
        // which is async-signal-safe; it touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("start {name}: {cmd:?}"))?;
        Ok(ChildGuard {
            child,
            name: name.to_string(),
            stdout,
            stderr,
            status: None,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Path of the stdout log.
    pub fn stdout_path(&self) -> &Path {
        &self.stdout
    }

    /// Path of the stderr log.
    pub fn stderr_path(&self) -> &Path {
        &self.stderr
    }

    /// The stdin pipe (only after [`ChildGuard::spawn_with_stdin`]; once).
    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.child.stdin.take()
    }

    /// The underlying child (e.g. to send it a signal by PID).
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The exit status if the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    /// Fails (with the log tail) if the process has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        match self.try_wait() {
            None => Ok(()),
            Some(st) => bail!("{} exited ({st}){}", self.name, self.log_tail(TAIL_LINES)),
        }
    }

    /// Waits for the process to exit by itself until `deadline`.
    pub fn wait_until(&mut self, deadline: Instant) -> Result<ExitStatus> {
        loop {
            if let Some(st) = self.try_wait() {
                return Ok(st);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} still running at the deadline{}",
                    self.name,
                    self.log_tail(TAIL_LINES)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends a signal to the process (by PID). No effect once it has been reaped.
    pub fn signal(&mut self, sig: libc::c_int) {
        if self.try_wait().is_none() {
            // SAFETY: kill(2) on the PID of our own, not yet reaped child (the PID cannot have
            // been reused while the zombie exists); no memory is touched.
            unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; returns the exit status.
    pub fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(st) = self.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill()
    }

    /// SIGKILL to the process group and the process (by PID), then reaps it.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            let pid = self.child.id() as libc::pid_t;
            // SAFETY: kill(2) on the process group our child leads (process_group(0) made its
            // PGID equal to its PID) and on the child itself; the child is not reaped yet, so
            // neither id can have been reused. No memory is touched.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
                libc::kill(pid, libc::SIGKILL);
            }
            self.status = self.child.wait().ok();
        }
        self.status
    }

    /// Everything the process wrote to stdout so far (lossy UTF-8).
    pub fn stdout_text(&self) -> String {
        read_lossy(&self.stdout)
    }

    /// Everything the process wrote to stderr so far (lossy UTF-8).
    pub fn stderr_text(&self) -> String {
        read_lossy(&self.stderr)
    }

    /// The last `lines` lines of stdout and stderr, formatted for an error message.
    pub fn log_tail(&self, lines: usize) -> String {
        format!(
            "\n--- {name} stdout (last {lines} lines, {}) ---\n{}\n--- {name} stderr (last {lines} lines, {}) ---\n{}",
            self.stdout.display(),
            tail(&self.stdout_text(), lines),
            self.stderr.display(),
            tail(&self.stderr_text(), lines),
            name = self.name,
        )
    }

    /// Waits until `marker` appears in stdout or stderr; fails early (with the log tail) if
    /// the process exits first.
    pub fn wait_for_output(&mut self, marker: &str, deadline: Instant) -> Result<()> {
        let mut out = MarkerScan::new(&self.stdout, marker);
        let mut err = MarkerScan::new(&self.stderr, marker);
        loop {
            if out.found()? || err.found()? {
                return Ok(());
            }
            if let Some(st) = self.try_wait() {
                if out.found()? || err.found()? {
                    return Ok(());
                }
                bail!(
                    "{} exited ({st}) before printing {marker:?}{}",
                    self.name,
                    self.log_tail(TAIL_LINES)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not print {marker:?} before the deadline{}",
                    self.name,
                    self.log_tail(TAIL_LINES)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "[colo-tests] test failed with {} (pid {}) alive or guarded:{}",
                self.name,
                self.child.id(),
                self.log_tail(TAIL_LINES)
            );
        }
        self.kill();
    }
}

fn read_lossy(p: &Path) -> String {
    std::fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn tail(text: &str, lines: usize) -> String {
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// Incremental search for a marker in a growing file (reads only the new bytes each time; a
/// marker split across two reads is still found).
#[derive(Debug)]
pub struct MarkerScan {
    path: PathBuf,
    marker: Vec<u8>,
    offset: u64,
    carry: Vec<u8>,
    hit: bool,
}

impl MarkerScan {
    /// Scans `path` (which may not exist yet) for `marker`.
    pub fn new(path: &Path, marker: &str) -> Self {
        Self {
            path: path.to_path_buf(),
            marker: marker.as_bytes().to_vec(),
            offset: 0,
            carry: Vec::new(),
            hit: false,
        }
    }

    /// Reads what was appended since the last call; true once the marker has been seen.
    pub fn found(&mut self) -> Result<bool> {
        if self.hit {
            return Ok(true);
        }
        let mut f = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e).with_context(|| format!("open {}", self.path.display())),
        };
        f.seek(SeekFrom::Start(self.offset))?;
        let mut new = Vec::new();
        f.read_to_end(&mut new)
            .with_context(|| format!("read {}", self.path.display()))?;
        self.offset += new.len() as u64;
        let mut hay = std::mem::take(&mut self.carry);
        hay.extend_from_slice(&new);
        if self.marker.is_empty() || hay.windows(self.marker.len()).any(|w| w == self.marker) {
            self.hit = true;
            return Ok(true);
        }
        let keep = self.marker.len().saturating_sub(1).min(hay.len());
        self.carry = hay[hay.len() - keep..].to_vec();
        Ok(false)
    }
}
