//! State hooks of a VM whose vCPU threads run: pause, capture, restore, resume.
//!
//! [`LiveVm`] is the API the snapshot command (`snapshot-save-file`), live migration
//! ([`crate::migrate`]) and the COLO checkpoint engine (next phase) call: exactly
//! [`LiveVm::pause_and_capture`], [`LiveVm::resume`], [`LiveVm::restore`], [`LiveVm::ram`] and
//! [`LiveVm::dirty`]. Keep their meaning stable.
//!
//! vCPU state lives in the vCPU threads (each owns its `VcpuFd`): while the VM is paused, each
//! parked thread runs a job posted through [`Control::post_vcpu_jobs`] (capture after
//! completing a pending I/O exit, or restore) and hands its result back over a channel.
//! vhost-user rings are stopped with `GET_VRING_BASE` when the VM is captured and started
//! again with `SET_VRING_BASE` (and a kick) when it resumes or is restored.

use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_EXIT_IO, KVM_EXIT_MMIO};
use kvm_ioctls::{VcpuFd, VmFd};

use super::format::{DeviceState, FormatError, VmShape, VmSnapshot};
use super::vcpu::{self, VcpuState, VcpuStateError};
use super::{StateError, vm as vm_state};
use crate::control::{Control, RunState, VcpuJob};
use crate::devices::serial::SerialDevice;
use crate::memory::GuestRam;
use crate::virtio::mmio::MmioTransport;
use crate::vm::{DirtyTracker, Vm, VmConfig};

/// How long a pause or a vCPU state request may take.
pub const STATE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the live state hooks.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// The vCPUs did not park in time.
    #[error("the vCPUs did not pause within {0:?}")]
    PauseTimeout(Duration),
    /// The VM has stopped for good.
    #[error("the VM has stopped")]
    Stopped,
    /// A state request needs paused vCPUs.
    #[error("the vCPUs are not paused")]
    NotPaused,
    /// A vCPU thread did not run its state request.
    #[error("vCPU {0} did not answer the state request within {STATE_TIMEOUT:?}")]
    VcpuTimeout(usize),
    /// A device could not be stopped, started or restored.
    #[error("device {id}: {msg}")]
    Device {
        /// Device identity.
        id: String,
        /// What failed.
        msg: String,
    },
    /// KVM state.
    #[error(transparent)]
    State(#[from] StateError),
}

/// The VM's devices that have state: the console and each virtio-MMIO transport, with the
/// identities used in [`VmShape::devices`].
#[derive(Default, Clone)]
pub struct DeviceSet {
    /// COM1.
    pub serial: Option<(String, Arc<Mutex<SerialDevice>>)>,
    /// virtio-MMIO transports in bus order.
    pub virtio: Vec<(String, Arc<Mutex<MmioTransport>>)>,
}

impl DeviceSet {
    /// Identities in snapshot order.
    pub fn ids(&self) -> Vec<String> {
        self.serial
            .iter()
            .map(|(id, _)| id.clone())
            .chain(self.virtio.iter().map(|(id, _)| id.clone()))
            .collect()
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A VM whose vCPU threads run (or are parked), seen by the state hooks.
pub struct LiveVm {
    control: Arc<Control>,
    fd: Arc<VmFd>,
    ram: GuestRam,
    config: VmConfig,
    devices: DeviceSet,
    dirty: Arc<DirtyTracker>,
    /// Ring bases of the transports stopped by the last capture (None: rings run).
    stopped: Mutex<Option<Vec<Vec<u16>>>>,
    /// Steps of the last capture or restore and their durations (for downtime breakdowns).
    timings: Mutex<Vec<(String, Duration)>>,
}

/// Completes an I/O or MMIO exit the vCPU thread handled but KVM has not finished.
fn settle(v: &mut VcpuFd) -> Result<(), VcpuStateError> {
    let reason = v.get_kvm_run().exit_reason;
    if reason == KVM_EXIT_IO || reason == KVM_EXIT_MMIO {
        vcpu::complete_pending_io(v)?;
    }
    Ok(())
}

impl LiveVm {
    /// The hooks for `vm` (call before [`Vm::start`]) with its stateful `devices` and its
    /// dirty-page tracker.
    pub fn new(vm: &Vm, devices: DeviceSet, dirty: Arc<DirtyTracker>) -> Self {
        Self {
            control: vm.control().clone(),
            fd: vm.fd().clone(),
            ram: vm.ram().clone(),
            config: vm.config().clone(),
            devices,
            dirty,
            stopped: Mutex::new(None),
            timings: Mutex::new(Vec::new()),
        }
    }

    /// Run control.
    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    /// Guest RAM (shared with the running guest).
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The dirty-page tracker (KVM dirty log merged with the vhost-user shared log).
    pub fn dirty(&self) -> &Arc<DirtyTracker> {
        &self.dirty
    }

    /// The VM's shape (memory, vCPUs, irqchip, device identities).
    pub fn shape(&self) -> VmShape {
        VmShape {
            memory: self.config.memory,
            cpus: self.config.cpus,
            irqchip: self.config.irqchip,
            devices: self.devices.ids(),
        }
    }

    /// The steps of the last [`LiveVm::pause_and_capture`] or [`LiveVm::restore`] with their
    /// durations, as `step us, step us, ...`.
    pub fn last_timings(&self) -> String {
        lock(&self.timings)
            .iter()
            .map(|(s, d)| format!("{s} {} us", d.as_micros()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// True while a capture left the device rings stopped (until [`LiveVm::resume`]).
    pub fn devices_stopped(&self) -> bool {
        lock(&self.stopped).is_some()
    }

    /// Runs `f` on every vCPU thread (the VM must be paused) and collects the results.
    fn on_vcpus<T, F>(&self, f: F) -> Result<Vec<T>, LiveError>
    where
        T: Send + 'static,
        F: Fn(&mut VcpuFd, u32) -> Result<T, VcpuStateError> + Send + Sync + 'static,
    {
        let n = self.control.vcpu_count();
        let f = Arc::new(f);
        let (tx, rx) = mpsc::channel();
        let jobs: Vec<VcpuJob> = (0..n)
            .map(|id| {
                let (tx, f) = (tx.clone(), f.clone());
                Box::new(move |v: &mut VcpuFd| {
                    let _ = tx.send((id, f(v, id as u32)));
                }) as VcpuJob
            })
            .collect();
        drop(tx);
        if !self.control.post_vcpu_jobs(jobs) {
            return Err(if self.control.run_state() == RunState::Shutdown {
                LiveError::Stopped
            } else {
                LiveError::NotPaused
            });
        }
        let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
        let deadline = Instant::now() + STATE_TIMEOUT;
        for _ in 0..n {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((id, r)) => {
                    let v = r.map_err(|source| StateError::Vcpu {
                        id: id as u32,
                        source,
                    })?;
                    if let Some(slot) = out.get_mut(id) {
                        *slot = Some(v);
                    }
                }
                Err(_) => {
                    let missing = out.iter().position(Option::is_none).unwrap_or(0);
                    return Err(if self.control.run_state() == RunState::Shutdown {
                        LiveError::Stopped
                    } else {
                        LiveError::VcpuTimeout(missing)
                    });
                }
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Pauses the vCPUs (if they run), stops every activated device's rings (vhost-user
    /// `GET_VRING_BASE`: in-flight requests drain), and captures vCPUs (after completing a
    /// pending I/O exit), irqchip/PIT/clock and devices (console, transports, ring bases).
    /// The VM stays paused with its rings stopped until [`LiveVm::resume`]; memory is the
    /// caller's to copy meanwhile ([`LiveVm::ram`]). On error the VM is left as it was.
    pub fn pause_and_capture(&self) -> Result<VmSnapshot, LiveError> {
        let was_running = match self.control.run_state() {
            RunState::Shutdown => return Err(LiveError::Stopped),
            RunState::Running => true,
            _ => false,
        };
        let t = Instant::now();
        if !self.control.pause(STATE_TIMEOUT) {
            if was_running {
                self.control.resume();
            }
            return Err(LiveError::PauseTimeout(STATE_TIMEOUT));
        }
        let paused = t.elapsed();
        *lock(&self.timings) = vec![("pause vCPUs".into(), paused)];
        tracing::info!(us = paused.as_micros(), "vCPUs paused");
        let r = self.capture_paused();
        if r.is_err() {
            let _ = self.resume_devices();
            if was_running {
                self.control.resume();
            }
        }
        r
    }

    fn stop_devices(&self) -> Result<Vec<Vec<u16>>, LiveError> {
        let mut stopped = lock(&self.stopped);
        if let Some(b) = &*stopped {
            return Ok(b.clone());
        }
        let mut bases = Vec::new();
        for (id, t) in &self.devices.virtio {
            match lock(t).pause_device() {
                Ok(b) => bases.push(b),
                Err(msg) => {
                    // Restart the ones already stopped.
                    for ((_, t), b) in self.devices.virtio.iter().zip(&bases) {
                        if let Err(e) = lock(t).resume_device(b) {
                            tracing::error!("restarting rings after a failed capture: {e}");
                        }
                    }
                    return Err(LiveError::Device {
                        id: id.clone(),
                        msg,
                    });
                }
            }
        }
        *stopped = Some(bases.clone());
        Ok(bases)
    }

    fn capture_paused(&self) -> Result<VmSnapshot, LiveError> {
        let t = Instant::now();
        let bases = self.stop_devices()?;
        let t_rings = t.elapsed();
        let irqchip = self.config.irqchip;
        let vcpus: Vec<VcpuState> = self.on_vcpus(move |v, id| {
            settle(v)?;
            vcpu::capture(v, id, irqchip)
        })?;
        let t_vcpus = t.elapsed();
        let vm = vm_state::capture(&self.fd, irqchip).map_err(StateError::from)?;
        let t_vm = t.elapsed();
        tracing::info!(
            rings_us = t_rings.as_micros(),
            vcpus_us = (t_vcpus - t_rings).as_micros(),
            vm_us = (t_vm - t_vcpus).as_micros(),
            "state captured"
        );
        lock(&self.timings).extend([
            ("stop rings".to_string(), t_rings),
            ("vCPU state".to_string(), t_vcpus - t_rings),
            ("irqchip/clock".to_string(), t_vm - t_vcpus),
        ]);
        let mut devices = Vec::new();
        if let Some((id, s)) = &self.devices.serial {
            devices.push(DeviceState::serial(id.clone(), &lock(s)));
        }
        for ((id, t), b) in self.devices.virtio.iter().zip(bases) {
            devices.push(DeviceState::virtio_mmio(id.clone(), &lock(t), b));
        }
        let snap = VmSnapshot {
            shape: self.shape(),
            vm,
            vcpus,
            devices,
        };
        snap.check_consistent().map_err(StateError::from)?;
        Ok(snap)
    }

    /// Starts the rings stopped by [`LiveVm::pause_and_capture`] again (`SET_VRING_BASE`,
    /// kick); the vCPUs stay as they are. Every device is tried; the first error is returned.
    pub fn resume_devices(&self) -> Result<(), LiveError> {
        let Some(bases) = lock(&self.stopped).take() else {
            return Ok(());
        };
        let mut first = None;
        for ((id, t), b) in self.devices.virtio.iter().zip(bases) {
            if let Err(msg) = lock(t).resume_device(&b) {
                tracing::error!(device = %id, "restarting rings: {msg}");
                first.get_or_insert(LiveError::Device {
                    id: id.clone(),
                    msg,
                });
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Restarts the rings and resumes the vCPUs (after a capture, a restore, or a failed
    /// migration). The vCPUs resume even when a device failed (its error is returned).
    pub fn resume(&self) -> Result<(), LiveError> {
        let r = self.resume_devices();
        if self.control.run_state() != RunState::Shutdown {
            self.control.resume();
        }
        r
    }

    /// Restores `snap` into the paused VM: irqchip/PIT/clock, each vCPU (in its thread), the
    /// console and each transport (an activated device's rings start from the saved bases with
    /// the saved features and queues: no guest-visible reset). Memory must already hold the
    /// snapshot's pages. The vCPUs stay paused: [`LiveVm::resume`] runs the guest.
    pub fn restore(&self, snap: &VmSnapshot) -> Result<(), LiveError> {
        let ours = self.shape();
        if snap.shape != ours {
            return Err(StateError::Format(FormatError::Shape {
                saved: Box::new(snap.shape.clone()),
                ours: Box::new(ours),
            })
            .into());
        }
        snap.check_consistent().map_err(StateError::from)?;
        let mut times: Vec<(String, Duration)> = Vec::new();
        let mut t = Instant::now();
        let mut step = |name: &str, times: &mut Vec<(String, Duration)>| {
            let now = Instant::now();
            times.push((name.to_string(), now - t));
            t = now;
        };
        // Rings must not run while their transport is replaced: stop the ones still running
        // (those stopped by a capture stay so); below they restart from the snapshot's bases.
        self.stop_devices()?;
        step("stop rings", &mut times);
        vm_state::restore(&self.fd, &snap.vm).map_err(StateError::from)?;
        step("irqchip/clock", &mut times);
        let states = Arc::new(snap.vcpus.clone());
        self.on_vcpus(move |v, id| {
            settle(v)?;
            match states.get(id as usize) {
                Some(s) => vcpu::restore(v, s),
                None => Ok(()),
            }
        })?;
        step("vCPUs", &mut times);
        lock(&self.stopped).take();
        let mut transports = self.devices.virtio.iter();
        for d in &snap.devices {
            match d {
                DeviceState::Serial { id, state } => {
                    if let Some((_, s)) = &self.devices.serial {
                        lock(s).restore(state).map_err(|msg| LiveError::Device {
                            id: id.clone(),
                            msg,
                        })?;
                        step(id, &mut times);
                    }
                }
                DeviceState::VirtioMmio {
                    id,
                    transport,
                    vring_bases,
                } => {
                    if let Some((_, t)) = transports.next() {
                        lock(t).restore(transport, vring_bases).map_err(|msg| {
                            LiveError::Device {
                                id: id.clone(),
                                msg,
                            }
                        })?;
                        step(id, &mut times);
                    }
                }
            }
        }
        *lock(&self.timings) = times;
        Ok(())
    }

    /// Before an incoming migration's state arrives: each device sends ahead what does not
    /// depend on the saved state (vhost-user: memory table, dirty log). A failure only costs
    /// time (the restore then sends it); it is logged.
    pub fn prepare_incoming(&self) {
        for (id, t) in &self.devices.virtio {
            if let Err(e) = lock(t).prepare_incoming() {
                tracing::warn!(device = %id, "preparing for the incoming state: {e}");
            }
        }
    }

    /// After an incoming migration or a restore: each net device announces the guest's new
    /// port (vhost-user `SEND_RARP` where the backend supports it).
    pub fn announce(&self) {
        for (_, t) in &self.devices.virtio {
            lock(t).announce();
        }
    }
}
