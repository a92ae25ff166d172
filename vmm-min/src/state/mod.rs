//! Complete VM state capture and restore for x86 KVM: per-vCPU registers ([`vcpu`]), per-VM
//! irqchip, PIT and KVM clock ([`vm`]), and the versioned on-disk / on-wire format with its
//! memory section ([`format`]).
//!
//! Capture only while the vCPUs are stopped (not inside `KVM_RUN`); restore into a VM of the
//! same shape whose vCPUs have not run yet (or are stopped).

pub mod format;
pub mod live;
pub mod migration;
pub mod raw;
pub mod vcpu;
pub mod vm;

#[cfg(test)]
mod tests;

pub use format::{DeviceState, FormatError, VmShape, VmSnapshot};
pub use live::{DeviceSet, LiveError, LiveVm};
pub use vcpu::{VcpuState, VcpuStateError};
pub use vm::{VmState, VmStateError};

use crate::vm::Vm;

/// Errors capturing or restoring a whole VM.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A vCPU.
    #[error("vCPU {id}: {source}")]
    Vcpu {
        /// vCPU index.
        id: u32,
        /// What failed.
        source: VcpuStateError,
    },
    /// Per-VM state.
    #[error(transparent)]
    Vm(#[from] VmStateError),
    /// The snapshot does not fit this VM.
    #[error(transparent)]
    Format(#[from] FormatError),
}

/// The shape of `vm` with the given device identities.
pub fn shape_of(vm: &Vm, devices: Vec<String>) -> VmShape {
    let c = vm.config();
    VmShape {
        memory: c.memory,
        cpus: c.cpus,
        irqchip: c.irqchip,
        devices,
    }
}

/// Captures the KVM state of a VM whose vCPUs are not running, plus the device states the
/// caller collected (their ids make up the shape's device list).
pub fn capture_vm(vm: &mut Vm, devices: Vec<DeviceState>) -> Result<VmSnapshot, StateError> {
    let irqchip = vm.config().irqchip;
    let shape = shape_of(vm, devices.iter().map(|d| d.id().to_string()).collect());
    let vm_state = vm::capture(vm.fd(), irqchip)?;
    let mut vcpus = Vec::new();
    for (id, v) in vm.vcpus_mut().iter().enumerate() {
        let id = id as u32;
        vcpus
            .push(vcpu::capture(v, id, irqchip).map_err(|source| StateError::Vcpu { id, source })?);
    }
    Ok(VmSnapshot {
        shape,
        vm: vm_state,
        vcpus,
        devices,
    })
}

/// Restores the KVM state of `snap` into `vm` (same shape, vCPUs not started). Memory is
/// restored by [`format::read_snapshot`]; device states are the caller's to apply.
pub fn restore_vm(vm: &mut Vm, snap: &VmSnapshot) -> Result<(), StateError> {
    let ours = shape_of(vm, snap.shape.devices.clone());
    if ours != snap.shape {
        return Err(FormatError::Shape {
            saved: Box::new(snap.shape.clone()),
            ours: Box::new(ours),
        }
        .into());
    }
    snap.check_consistent()?;
    vm::restore(vm.fd(), &snap.vm)?;
    for (v, s) in vm.vcpus_mut().iter().zip(&snap.vcpus) {
        vcpu::restore(v, s).map_err(|source| StateError::Vcpu { id: s.id, source })?;
    }
    Ok(())
}
