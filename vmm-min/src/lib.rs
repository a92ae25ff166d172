//! vmm-min: a minimal KVM VMM for x86_64 whose network and disks are vhost-user backends.
//!
//! It boots a bzImage + initramfs on N vCPUs with an in-kernel irqchip, a 16550 console,
//! ACPI tables describing virtio-MMIO devices, and hands each device's rings to a vhost-user
//! backend process. It does not emulate PCI, BIOS, or any data-plane device itself.
//!
//! Layout: [`memory`] (memfd-backed RAM), [`arch`] (x86 CPU set-up), [`boot`] (Linux boot
//! protocol), [`vm`] (KVM VM, vCPU threads), [`control`] (run state), [`devices`] (serial,
//! i8042, ACPI PM), [`acpi`], [`virtio`] (MMIO transport, vhost-user frontend).

pub mod acpi;
pub mod arch;
pub mod boot;
pub mod control;
pub mod devices;
pub mod dirty_log;
pub mod exits;
pub mod machine;
pub mod memory;
pub mod migrate;
pub mod qmp;
pub mod state;
pub mod virtio;
pub mod vm;
