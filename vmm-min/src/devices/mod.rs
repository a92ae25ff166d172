//! Devices emulated in vmm-min itself: the I/O buses, the 16550 serial console, the i8042
//! reset line and the hardware-reduced ACPI sleep/reset registers. virtio devices are in
//! [`crate::virtio`].

pub mod bus;
pub mod legacy;
pub mod serial;
