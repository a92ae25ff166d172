//! Run control shared by the vCPU threads, devices and the control plane: why the VM stops
//! (poweroff, reset, error, quit), pausing and resuming (QMP `stop`/`cont`), and kicking vCPU
//! threads out of `KVM_RUN` with a signal whose handler sets `immediate_exit`.

use std::cell::Cell;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Why the VM stopped running for good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitReason {
    /// The guest powered off (ACPI S5) or QMP `quit`.
    Poweroff,
    /// The guest asked for a reset (i8042 pulse, ACPI reset register, triple fault).
    Reset,
    /// The control plane asked to quit.
    Quit,
    /// Something went wrong (the message says what).
    Error(String),
}

impl ExitReason {
    /// Process exit code for this reason: 0 poweroff/quit, 3 reset, 1 error.
    pub fn exit_code(&self) -> u8 {
        match self {
            ExitReason::Poweroff | ExitReason::Quit => 0,
            ExitReason::Reset => 3,
            ExitReason::Error(_) => 1,
        }
    }
}

/// The run state reported by QMP `query-status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunState {
    /// vCPUs run.
    Running,
    /// vCPUs are paused.
    Paused,
    /// The VM stopped for good.
    Shutdown,
    /// Waiting for an incoming migration (`--incoming`): vCPUs not started.
    InMigrate,
    /// The guest was migrated away: vCPUs and rings stay stopped until `quit`.
    PostMigrate,
}

/// Work for one parked vCPU thread: it runs on that thread, with that thread's `VcpuFd`
/// (capture or restore of the vCPU state, see [`Control::post_vcpu_jobs`]).
pub type VcpuJob = Box<dyn FnOnce(&mut kvm_ioctls::VcpuFd) + Send>;

struct Inner {
    exit: Option<ExitReason>,
    paused: bool,
    /// vCPUs currently parked because of `paused`.
    parked: usize,
    /// vCPUs that have exited their loop.
    finished: usize,
    threads: Vec<libc::pthread_t>,
    /// Per vCPU index: a job the parked thread runs.
    jobs: Vec<Option<VcpuJob>>,
    inmigrate: bool,
    postmigrate: bool,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("exit", &self.exit)
            .field("paused", &self.paused)
            .field("parked", &self.parked)
            .field("finished", &self.finished)
            .field("jobs", &self.jobs.iter().filter(|j| j.is_some()).count())
            .field("inmigrate", &self.inmigrate)
            .field("postmigrate", &self.postmigrate)
            .finish()
    }
}

/// Shared run control.
#[derive(Debug)]
pub struct Control {
    inner: Mutex<Inner>,
    cond: Condvar,
    vcpus: usize,
    exits: std::sync::Arc<crate::exits::ExitStats>,
}

/// What a vCPU thread does after handling an exit.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Run again.
    Run,
    /// Leave the loop.
    Stop,
}

thread_local! {
    static KVM_RUN_PTR: Cell<*mut kvm_bindings::kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = KVM_RUN_PTR.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: p points to this thread's kvm_run mapping, registered by the vCPU thread
        // itself before it started running and valid while its VcpuFd lives; a single byte
        // volatile store is async-signal-safe.
        unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).immediate_exit), 1) };
    }
}

/// The signal used to kick vCPU threads.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 1
}

/// Installs the kick signal handler (idempotent).
pub fn install_kick_handler() -> std::io::Result<()> {
    static ONCE: std::sync::Once = std::sync::Once::new();
    let mut res = Ok(());
    ONCE.call_once(|| {
        res = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    res
}

/// Registers the calling thread's kvm_run so the kick handler can set `immediate_exit`.
pub fn register_kvm_run(p: *mut kvm_bindings::kvm_run) {
    KVM_RUN_PTR.with(|c| c.set(p));
}

/// Forgets the calling thread's kvm_run (before its VcpuFd is dropped).
pub fn unregister_kvm_run() {
    KVM_RUN_PTR.with(|c| c.set(std::ptr::null_mut()));
}

impl Control {
    /// New control for `vcpus` vCPU threads.
    pub fn new(vcpus: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                exit: None,
                paused: false,
                parked: 0,
                finished: 0,
                threads: Vec::new(),
                jobs: (0..vcpus).map(|_| None).collect(),
                inmigrate: false,
                postmigrate: false,
            }),
            cond: Condvar::new(),
            vcpus,
            exits: Default::default(),
        }
    }

    /// The VM exit counters (QMP `query-exits`).
    pub fn exits(&self) -> &std::sync::Arc<crate::exits::ExitStats> {
        &self.exits
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A vCPU thread announces itself (so it can be kicked).
    pub fn register_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        let t = unsafe { libc::pthread_self() };
        self.lock().threads.push(t);
    }

    fn kick_all(&self, inner: &Inner) {
        for t in &inner.threads {
            // SAFETY: the thread ids come from live vCPU threads registered above; a thread
            // that exited is removed from the list before it ends (see `vcpu_finished`).
            unsafe { libc::pthread_kill(*t, kick_signal()) };
        }
    }

    /// Requests the VM to stop for good; the first reason wins.
    pub fn request_exit(&self, reason: ExitReason) {
        let mut g = self.lock();
        if g.exit.is_none() {
            tracing::info!(?reason, "VM stopping");
            g.exit = Some(reason);
        }
        // Jobs that will never run: dropping them tells their posters (closed channels).
        g.jobs.iter_mut().for_each(|j| *j = None);
        self.kick_all(&g);
        self.cond.notify_all();
    }

    /// The exit reason, once there is one.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.lock().exit.clone()
    }

    /// Current run state.
    pub fn run_state(&self) -> RunState {
        let g = self.lock();
        if g.exit.is_some() {
            RunState::Shutdown
        } else if g.inmigrate {
            RunState::InMigrate
        } else if g.paused && g.postmigrate {
            RunState::PostMigrate
        } else if g.paused {
            RunState::Paused
        } else {
            RunState::Running
        }
    }

    /// Pauses all vCPUs and waits (bounded) until each is parked. Returns false on timeout.
    pub fn pause(&self, timeout: Duration) -> bool {
        let mut g = self.lock();
        g.paused = true;
        self.kick_all(&g);
        let deadline = std::time::Instant::now() + timeout;
        while g.parked + g.finished < g.threads.len().max(self.vcpus) && g.exit.is_none() {
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            g = self
                .cond
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    /// Resumes paused vCPUs.
    pub fn resume(&self) {
        let mut g = self.lock();
        g.paused = false;
        g.postmigrate = false;
        g.inmigrate = false;
        self.cond.notify_all();
    }

    /// Marks the vCPUs paused before they start ([`crate::vm::Vm::start`] then parks each
    /// thread at once): used to restore state into the vCPU threads before the guest runs.
    pub fn start_paused(&self) {
        self.lock().paused = true;
    }

    /// Incoming migration in progress (`query-status` says `inmigrate`).
    pub fn set_inmigrate(&self, on: bool) {
        self.lock().inmigrate = on;
    }

    /// The guest was migrated away (`query-status` says `postmigrate` while paused).
    pub fn set_postmigrate(&self, on: bool) {
        self.lock().postmigrate = on;
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus
    }

    /// Hands `jobs[i]` to vCPU thread `i`, which runs it while parked. Only while paused
    /// (after [`Control::pause`] returned true, or [`Control::start_paused`]); returns false
    /// otherwise (nothing posted). Results travel back through whatever the jobs capture (a
    /// channel); a job that cannot run any more (the VM stopped) is dropped.
    pub fn post_vcpu_jobs(&self, jobs: Vec<VcpuJob>) -> bool {
        let mut g = self.lock();
        if !g.paused || g.exit.is_some() || jobs.len() > self.vcpus {
            return false;
        }
        for (slot, j) in g.jobs.iter_mut().zip(jobs) {
            *slot = Some(j);
        }
        self.cond.notify_all();
        true
    }

    /// Called by a vCPU thread between runs: parks while paused, says whether to go on.
    pub fn next(&self) -> Next {
        self.next_inner(usize::MAX, &mut |_| {})
    }

    /// [`Control::next`] for vCPU `id`, running the jobs posted for it while parked.
    pub fn next_vcpu(&self, id: usize, vcpu: &mut kvm_ioctls::VcpuFd) -> Next {
        self.next_inner(id, &mut |job| job(vcpu))
    }

    fn next_inner(&self, id: usize, run: &mut dyn FnMut(VcpuJob)) -> Next {
        let mut g = self.lock();
        if g.exit.is_some() {
            return Next::Stop;
        }
        if g.paused {
            g.parked += 1;
            self.cond.notify_all();
            while g.paused && g.exit.is_none() {
                if let Some(job) = g.jobs.get_mut(id).and_then(Option::take) {
                    drop(g);
                    run(job);
                    g = self.lock();
                    continue;
                }
                g = self.cond.wait(g).unwrap_or_else(PoisonError::into_inner);
            }
            g.parked -= 1;
            if g.exit.is_some() {
                return Next::Stop;
            }
        }
        Next::Run
    }

    /// A vCPU thread leaves its loop.
    pub fn vcpu_finished(&self) {
        let mut g = self.lock();
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        // SAFETY: pthread_equal compares two thread ids.
        g.threads
            .retain(|t| unsafe { libc::pthread_equal(*t, me) } == 0);
        g.finished += 1;
        self.cond.notify_all();
    }

    /// Blocks until an exit reason is set.
    pub fn wait_exit(&self) -> ExitReason {
        let mut g = self.lock();
        loop {
            if let Some(r) = &g.exit {
                return r.clone();
            }
            g = self.cond.wait(g).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn first_exit_reason_wins_and_maps_to_exit_codes() {
        let c = Control::new(0);
        assert_eq!(c.run_state(), RunState::Running);
        c.request_exit(ExitReason::Reset);
        c.request_exit(ExitReason::Poweroff);
        assert_eq!(c.exit_reason(), Some(ExitReason::Reset));
        assert_eq!(c.run_state(), RunState::Shutdown);
        assert_eq!(ExitReason::Reset.exit_code(), 3);
        assert_eq!(ExitReason::Poweroff.exit_code(), 0);
        assert_eq!(ExitReason::Error("x".into()).exit_code(), 1);
    }

    #[test]
    fn pause_parks_threads_and_resume_releases_them() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let c = Arc::new(Control::new(1));
        let loops = Arc::new(AtomicU64::new(0));
        let (c2, l2) = (c.clone(), loops.clone());
        let t = std::thread::spawn(move || {
            while c2.next() == Next::Run {
                l2.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(1));
            }
            c2.vcpu_finished();
        });
        assert!(c.pause(Duration::from_secs(5)));
        assert_eq!(c.run_state(), RunState::Paused);
        let at_pause = loops.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(
            loops.load(Ordering::SeqCst),
            at_pause,
            "parked thread must not run"
        );
        c.resume();
        std::thread::sleep(Duration::from_millis(30));
        assert!(loops.load(Ordering::SeqCst) > at_pause);
        c.request_exit(ExitReason::Quit);
        t.join().unwrap();
    }
}
