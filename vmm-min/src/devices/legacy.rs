//! The i8042 reset line (`reboot=k`) and the hardware-reduced ACPI sleep control/status and
//! reset registers the FADT points at (poweroff = S5 written to the sleep control register).

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use super::bus::BusDevice;
use crate::control::{Control, ExitReason};

/// Trigger that asks the VM to reset.
pub struct ResetTrigger(pub Arc<Control>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request_exit(ExitReason::Reset);
        Ok(())
    }
}

/// The i8042 on ports 0x60..0x64 (only the CPU reset command does something).
pub struct I8042(I8042Device<ResetTrigger>);

impl I8042 {
    /// A new i8042 whose reset pulse stops the VM with [`ExitReason::Reset`].
    pub fn new(control: Arc<Control>) -> Self {
        Self(I8042Device::new(ResetTrigger(control)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = self.0.read(offset as u8);
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(b) = data.first() {
            let _ = self.0.write(offset as u8, *b);
        }
    }
}

/// SLP_EN bit of the sleep control register.
pub const SLP_EN: u8 = 1 << 5;
/// Sleep type used for S5 (the DSDT's `_S5` package says 5).
pub const S5_TYPE: u8 = 5;

/// Sleep control (offset 0), sleep status (offset 1) and reset (offset 2) registers.
pub struct AcpiPm {
    control: Arc<Control>,
}

impl AcpiPm {
    /// New registers acting on `control`.
    pub fn new(control: Arc<Control>) -> Self {
        Self { control }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            0 if v & SLP_EN != 0 && (v >> 2) & 7 == S5_TYPE => {
                self.control.request_exit(ExitReason::Poweroff)
            }
            2 if v == crate::arch::layout::ACPI_RESET_VALUE => {
                self.control.request_exit(ExitReason::Reset)
            }
            _ => tracing::debug!(offset, v, "ACPI PM write ignored"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off_and_other_sleep_states_do_not() {
        let c = Arc::new(Control::new(0));
        let mut pm = AcpiPm::new(c.clone());
        pm.write(0, &[(3 << 2) | SLP_EN]);
        assert_eq!(c.exit_reason(), None);
        pm.write(0, &[(S5_TYPE << 2) | SLP_EN]);
        assert_eq!(c.exit_reason(), Some(ExitReason::Poweroff));
    }

    #[test]
    fn i8042_reset_command_resets() {
        let c = Arc::new(Control::new(0));
        let mut k = I8042::new(c.clone());
        k.write(4, &[0xaa]);
        assert_eq!(c.exit_reason(), None);
        k.write(4, &[0xfe]);
        assert_eq!(c.exit_reason(), Some(ExitReason::Reset));
    }
}
