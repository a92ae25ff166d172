//! Scheduling class of the data threads (tap readers, indev readers, the ring worker).
//!
//! `COLO_NET_SCHED=batch` puts them in `SCHED_BATCH`: the kernel then does not let them preempt
//! the thread running on the CPU they wake on (no wake-up preemption). With a guest vCPU that
//! is busy on the same few cores (TCG, or a small host), a frame arriving no longer takes the
//! CPU from the vCPU for a few microseconds at a time; the data thread runs when a CPU is idle
//! or at the vCPU's next tick. Unset (or `other`): the normal class.

use std::sync::OnceLock;

fn policy() -> Option<libc::c_int> {
    static P: OnceLock<Option<libc::c_int>> = OnceLock::new();
    *P.get_or_init(|| match std::env::var("COLO_NET_SCHED").ok().as_deref() {
        Some("batch") => Some(libc::SCHED_BATCH),
        Some("idle") => Some(libc::SCHED_IDLE),
        Some("other") | Some("") | None => None,
        Some(x) => {
            tracing::warn!("COLO_NET_SCHED={x}: expected batch, idle or other; ignored");
            None
        }
    })
}

/// Applies `COLO_NET_SCHED` to the calling thread (a no-op when unset).
pub fn data_thread() {
    let Some(p) = policy() else { return };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param for the call.
    let r = unsafe { libc::sched_setscheduler(0, p, &param) };
    if r != 0 {
        tracing::warn!("sched_setscheduler: {}", std::io::Error::last_os_error());
    }
}

thread_local! {
    static DONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// As [`data_thread`], once per thread (for threads this crate does not start).
pub fn data_thread_once() {
    DONE.with(|d| {
        if !d.get() {
            d.set(true);
            data_thread();
        }
    });
}
