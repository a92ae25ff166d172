//! Scheduling class of the data threads (tap readers, indev readers, the ring worker).
//!
//! By default they run in `SCHED_BATCH`: the kernel does not let them preempt the thread
//! running on the CPU they wake on (no wake-up preemption; they still get their fair share,
//! and an idle CPU takes them at once). A guest vCPU that is busy on the same few cores (TCG,
//! or a small host) then no longer loses its CPU for a few microseconds at every frame; with
//! the COLO chain that was most of the swing of the guest's throughput (bench/net/guest.sh on
//! 2 cores, chain on: 67-112 MiB/s in the normal class, 82-92 MiB/s in `SCHED_BATCH`).
//! `COLO_NET_SCHED=other` keeps the normal class, `idle` uses `SCHED_IDLE`.

use std::sync::OnceLock;

fn policy() -> Option<libc::c_int> {
    static P: OnceLock<Option<libc::c_int>> = OnceLock::new();
    *P.get_or_init(|| match std::env::var("COLO_NET_SCHED").ok().as_deref() {
        Some("batch") | Some("") | None => Some(libc::SCHED_BATCH),
        Some("idle") => Some(libc::SCHED_IDLE),
        Some("other") => None,
        Some(x) => {
            tracing::warn!("COLO_NET_SCHED={x}: expected batch, idle or other; normal class");
            None
        }
    })
}

/// Applies `COLO_NET_SCHED` (default `batch`) to the calling thread.
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
