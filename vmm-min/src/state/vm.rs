//! Per-VM state: the in-kernel irqchip (PIC master, PIC slave, IOAPIC), the PIT and the KVM
//! clock.
//!
//! Restore order: irqchip, then PIT, then the clock. The clock is set with no flags, so the
//! guest's kvmclock continues from the captured value (time the VM spent saved does not
//! appear to the guest as elapsed).

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, kvm_clock_data, kvm_irqchip,
    kvm_pit_state2,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

/// Errors capturing or restoring per-VM state.
#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    /// A KVM ioctl failed.
    #[error("VM state: {what} failed: {source}")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// errno.
        source: kvm_ioctls::Error,
    },
}

fn kerr(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmStateError {
    move |source| VmStateError::Kvm { what, source }
}

/// The in-kernel interrupt controllers and PIT (present together, see [`crate::vm::VmConfig`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IrqchipState {
    /// 8259 master.
    #[serde(with = "super::raw")]
    pub pic_master: kvm_irqchip,
    /// 8259 slave.
    #[serde(with = "super::raw")]
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    #[serde(with = "super::raw")]
    pub ioapic: kvm_irqchip,
    /// 8254 PIT.
    #[serde(with = "super::raw")]
    pub pit: kvm_pit_state2,
}

/// Per-VM KVM state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// Interrupt controllers and PIT (None without the in-kernel irqchip).
    pub irqchip: Option<IrqchipState>,
    /// KVM clock.
    #[serde(with = "super::raw")]
    pub clock: kvm_clock_data,
}

fn get_chip(fd: &VmFd, id: u32) -> Result<kvm_irqchip, VmStateError> {
    let mut c = kvm_irqchip {
        chip_id: id,
        ..Default::default()
    };
    fd.get_irqchip(&mut c).map_err(kerr("KVM_GET_IRQCHIP"))?;
    Ok(c)
}

/// Captures the VM-wide state; `irqchip` says whether the VM has the in-kernel irqchip and PIT.
pub fn capture(fd: &VmFd, irqchip: bool) -> Result<VmState, VmStateError> {
    let irqchip = if irqchip {
        Some(IrqchipState {
            pic_master: get_chip(fd, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: get_chip(fd, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: get_chip(fd, KVM_IRQCHIP_IOAPIC)?,
            pit: fd.get_pit2().map_err(kerr("KVM_GET_PIT2"))?,
        })
    } else {
        None
    };
    let clock = fd.get_clock().map_err(kerr("KVM_GET_CLOCK"))?;
    Ok(VmState { irqchip, clock })
}

/// Restores `state` into a VM of the same shape.
pub fn restore(fd: &VmFd, state: &VmState) -> Result<(), VmStateError> {
    if let Some(c) = &state.irqchip {
        for chip in [&c.pic_master, &c.pic_slave, &c.ioapic] {
            fd.set_irqchip(chip).map_err(kerr("KVM_SET_IRQCHIP"))?;
        }
        fd.set_pit2(&c.pit).map_err(kerr("KVM_SET_PIT2"))?;
    }
    let clock = kvm_clock_data {
        clock: state.clock.clock,
        ..Default::default()
    };
    fd.set_clock(&clock).map_err(kerr("KVM_SET_CLOCK"))?;
    Ok(())
}
