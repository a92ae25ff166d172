//! Guest physical addresses of the structures vmm-min writes before boot.

/// GDT (4 entries of 8 bytes).
pub const GDT_ADDR: u64 = 0x500;
/// IDT (empty, limit 0).
pub const IDT_ADDR: u64 = 0x520;
/// Top of the boot stack.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Linux zero page (`boot_params`).
pub const ZERO_PAGE: u64 = 0x7000;
/// PML4 of the identity page tables.
pub const PML4_ADDR: u64 = 0x9000;
/// PDPT of the identity page tables.
pub const PDPT_ADDR: u64 = 0xa000;
/// First of four page directories (2 MiB pages, 4 GiB identity map).
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Largest command line accepted (Linux x86 COMMAND_LINE_SIZE).
pub const CMDLINE_MAX: usize = 2048;
/// Start of the EBDA / legacy area, reserved in e820 up to 1 MiB.
pub const EBDA_START: u64 = 0x9_fc00;
/// ACPI tables (RSDP first; the kernel also finds it by scanning 0xe0000..0xfffff).
pub const ACPI_START: u64 = 0xe_0000;
/// Size of the ACPI area.
pub const ACPI_SIZE: u64 = 0x2_0000;
/// Where the kernel is loaded (HIMEM start).
pub const HIMEM_START: u64 = 0x10_0000;
/// First virtio-MMIO window.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of each virtio-MMIO window (the register file is 0x200 bytes, config included).
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First IRQ (GSI) for virtio devices.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// IOAPIC.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// LAPIC.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// KVM TSS (3 pages) just below the LAPIC? No: below the IOAPIC, inside the hole.
pub const KVM_TSS_ADDR: u64 = 0xfeff_d000;
/// KVM identity map page (one page before the TSS).
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfeff_c000;
/// COM1 base port.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1 IRQ.
pub const COM1_IRQ: u32 = 4;
/// i8042 command/status port.
pub const I8042_PORT: u16 = 0x60;
/// Hardware-reduced ACPI sleep control register (I/O port, 1 byte).
pub const ACPI_SLEEP_CTL_PORT: u16 = 0x3c0;
/// Hardware-reduced ACPI sleep status register (I/O port, 1 byte).
pub const ACPI_SLEEP_STS_PORT: u16 = 0x3c1;
/// ACPI reset register (I/O port, 1 byte).
pub const ACPI_RESET_PORT: u16 = 0x3c2;
/// Value written to the reset register.
pub const ACPI_RESET_VALUE: u8 = 0x1;
