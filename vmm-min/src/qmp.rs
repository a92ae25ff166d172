//! vmm-min's QMP commands (`colo_proto::qmp` server): `query-status`, `stop`, `cont`,
//! `system_powerdown`, `system_reset`, `quit`, `query-dirty-pages` and `query-exits` (ours: VM
//! exits that reached vmm-min by kind and address, and KVM's per-vCPU statistics summed over the
//! vCPUs, see [`crate::exits`]); events `STOP`,
//! `RESUME`, `SHUTDOWN`, `RESET`. Migration and snapshot commands: [`crate::migrate`].
//!
//! vmm-min does not reboot a guest in place: a reset (the guest's or `system_reset`) stops the
//! VM with exit status 3 after the `RESET` and `SHUTDOWN` events, like QEMU with `-no-reboot`.

use std::sync::Arc;
use std::time::Duration;

use colo_proto::qmp::{ErrorClass, EventSink, QmpError, Registry, args};
use serde_json::{Value, json};

use crate::control::{Control, ExitReason, RunState};
use crate::migrate::Migration;
use crate::state::LiveVm;
use crate::vm::DirtyTracker;

/// `--qmp` values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QmpSpec {
    /// Listen on a Unix socket.
    Unix(std::path::PathBuf),
    /// Standard input/output.
    Stdio,
}

impl std::str::FromStr for QmpSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let main = s.split(',').next().unwrap_or("");
        if main == "stdio" {
            return Ok(Self::Stdio);
        }
        match main.strip_prefix("unix:") {
            Some(p) if !p.is_empty() => Ok(Self::Unix(p.into())),
            _ => Err(format!("--qmp {s:?}: expected unix:PATH or stdio")),
        }
    }
}

fn status_name(s: RunState) -> &'static str {
    match s {
        RunState::Running => "running",
        RunState::Paused => "paused",
        RunState::Shutdown => "shutdown",
        RunState::InMigrate => "inmigrate",
        RunState::PostMigrate => "postmigrate",
    }
}

fn generic(msg: impl Into<String>) -> QmpError {
    QmpError::new(ErrorClass::GenericError, msg)
}

/// Builds the registry over the VM's state hooks (control, dirty tracker, capture/restore),
/// with the migration and snapshot commands of [`crate::migrate`].
pub fn registry(live: Arc<LiveVm>) -> (Registry, Arc<Migration>) {
    let mut r = Registry::new().with_package("vmm-min");
    let events = r.events();
    let control: Arc<Control> = live.control().clone();
    let dirty: Arc<DirtyTracker> = live.dirty().clone();
    let mig = Migration::new(live.clone(), events.clone());
    crate::migrate::register(&mut r, &mig);
    {
        let c = control.clone();
        r.add("query-exits", move |a| {
            args::reject_unknown(a, &[])?;
            serde_json::to_value(c.exits().snapshot())
                .map_err(|e| generic(format!("query-exits: {e}")))
        });
    }
    {
        let c = control.clone();
        r.add("query-status", move |a| {
            args::reject_unknown(a, &[])?;
            let s = c.run_state();
            Ok(json!({"status": status_name(s), "running": s == RunState::Running, "singlestep": false}))
        });
    }
    {
        let (c, ev) = (control.clone(), events.clone());
        r.add("stop", move |a| {
            args::reject_unknown(a, &[])?;
            match c.run_state() {
                RunState::Running => {
                    if !c.pause(Duration::from_secs(10)) {
                        return Err(generic("stop: vCPUs did not pause within 10 s"));
                    }
                    ev.emit("STOP", json!({}));
                    Ok(json!({}))
                }
                RunState::Paused | RunState::PostMigrate => Ok(json!({})),
                RunState::Shutdown => Err(generic("the VM has shut down")),
                RunState::InMigrate => Err(generic("stop: an incoming migration is in progress")),
            }
        });
    }
    {
        let (c, ev, l, m) = (control.clone(), events.clone(), live.clone(), mig.clone());
        r.add("cont", move |a| {
            args::reject_unknown(a, &[])?;
            if m.switching_over() {
                return Err(generic(
                    "cont: a migration holds the guest stopped for its last copy",
                ));
            }
            match c.run_state() {
                RunState::Paused => {
                    // Restarts the rings too when a snapshot (resume=false) stopped them.
                    let r = l.resume();
                    ev.emit("RESUME", json!({}));
                    r.map_err(|e| generic(format!("cont: {e}")))?;
                    Ok(json!({}))
                }
                RunState::Running => Ok(json!({})),
                RunState::Shutdown => Err(generic("the VM has shut down; it cannot continue")),
                RunState::InMigrate => Err(generic(
                    "cont: an incoming migration is in progress; the guest starts when it completes",
                )),
                RunState::PostMigrate => Err(generic(
                    "cont: the guest was migrated away and runs on the destination; quit this VMM",
                )),
            }
        });
    }
    {
        r.add("system_powerdown", move |a| {
            args::reject_unknown(a, &[])?;
            Err(generic(
                "system_powerdown: vmm-min has no ACPI power button yet; use quit, or poweroff in the guest",
            ))
        });
    }
    {
        let (c, ev) = (control.clone(), events.clone());
        r.add("system_reset", move |a| {
            args::reject_unknown(a, &[])?;
            ev.emit(
                "RESET",
                json!({"guest": false, "reason": "host-qmp-system-reset"}),
            );
            c.request_exit(ExitReason::Reset);
            Ok(json!({}))
        });
    }
    {
        let c = control.clone();
        r.add("quit", move |a| {
            args::reject_unknown(a, &[])?;
            c.request_exit(ExitReason::Quit);
            Ok(json!({}))
        });
    }
    {
        let (d, m) = (dirty.clone(), mig.clone());
        r.add("query-dirty-pages", move |a| {
            args::reject_unknown(a, &["bitmap"])?;
            if m.active() {
                return Err(generic(
                    "query-dirty-pages: a migration is reading the dirty log",
                ));
            }
            let want_bitmap = args::optional_bool(a, "bitmap")?.unwrap_or(false);
            let slots = d
                .collect()
                .map_err(|e| generic(format!("query-dirty-pages: {e}")))?;
            let mut count = 0u64;
            let mut out = Vec::new();
            for (base, bm) in &slots {
                count += bm.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
                if want_bitmap {
                    out.push(json!({"base": base, "page-size": 4096, "bitmap": bm}));
                }
            }
            let mut v = json!({"count": count, "page-size": 4096, "total": d.total_pages()});
            if want_bitmap && let Some(o) = v.as_object_mut() {
                o.insert("slots".into(), Value::Array(out));
            }
            Ok(v)
        });
    }
    (r, mig)
}

/// Emits the events for how the VM ended (SHUTDOWN, with RESET before it for a guest reset).
pub fn emit_end(events: &EventSink, reason: &ExitReason) {
    match reason {
        ExitReason::Poweroff => {
            events.emit(
                "SHUTDOWN",
                json!({"guest": true, "reason": "guest-shutdown"}),
            );
        }
        ExitReason::Reset => {
            events.emit("RESET", json!({"guest": true, "reason": "guest-reset"}));
            events.emit("SHUTDOWN", json!({"guest": true, "reason": "guest-reset"}));
        }
        ExitReason::Quit => {
            events.emit(
                "SHUTDOWN",
                json!({"guest": false, "reason": "host-qmp-quit"}),
            );
        }
        ExitReason::Error(_) => {
            events.emit("SHUTDOWN", json!({"guest": false, "reason": "host-error"}));
        }
    }
}
