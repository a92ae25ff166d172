//! ACPI tables (`acpi_tables` crate) for a hardware-reduced platform: RSDP, XSDT, FADT (sleep
//! control/status and reset registers in port I/O), MADT (one LAPIC per vCPU, the IOAPIC), and a
//! DSDT with each virtio-MMIO device as `LNRO0005` (_HID, _UID, _CRS with its memory window and
//! interrupt) plus `_S5`, so a stock kernel loading `virtio_mmio` as a module finds the devices.

use acpi_tables::Aml;
use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use vm_memory::{Bytes, GuestAddress};

use crate::arch::layout::{
    ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_SIZE, ACPI_SLEEP_CTL_PORT, ACPI_SLEEP_STS_PORT,
    ACPI_START, COM1_IRQ, COM1_PORT, IOAPIC_ADDR, LAPIC_ADDR,
};
use crate::devices::legacy::S5_TYPE;
use crate::memory::GuestMem;

const OEM_ID: [u8; 6] = *b"COLOVM";
const OEM_TABLE: [u8; 8] = *b"VMM-MIN ";

/// Errors writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// Tables larger than the reserved area.
    #[error("ACPI tables need {0} bytes, more than the {ACPI_SIZE} reserved")]
    TooBig(u64),
    /// Guest memory write failed.
    #[error("writing ACPI tables to guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// A virtio-MMIO device as the DSDT describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDeviceInfo {
    /// Window base.
    pub base: u64,
    /// Window length described in _CRS.
    pub len: u32,
    /// GSI.
    pub irq: u32,
}

fn bytes(a: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    a.to_aml_bytes(&mut v);
    v
}

/// Builds the DSDT body (AML) for these devices.
pub fn dsdt(devices: &[MmioDeviceInfo]) -> Vec<u8> {
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, 1);
    let names: Vec<String> = (0..devices.len()).map(|i| format!("V{i:03X}")).collect();
    let mems: Vec<aml::Memory32Fixed> = devices
        .iter()
        .map(|d| aml::Memory32Fixed::new(true, d.base as u32, d.len))
        .collect();
    let irqs: Vec<aml::Interrupt> = devices
        .iter()
        .map(|d| aml::Interrupt::new(true, true, false, false, d.irq))
        .collect();
    let crs: Vec<aml::ResourceTemplate> = mems
        .iter()
        .zip(&irqs)
        .map(|(m, i)| aml::ResourceTemplate::new(vec![m, i]))
        .collect();
    let hid = aml::Name::new("_HID".into(), &"LNRO0005");
    let uids: Vec<aml::Name> = (0..devices.len())
        .map(|i| aml::Name::new("_UID".into(), &(i as u32)))
        .collect();
    let crs_names: Vec<aml::Name> = crs
        .iter()
        .map(|c| aml::Name::new("_CRS".into(), c))
        .collect();
    let devs: Vec<aml::Device> = (0..devices.len())
        .map(|i| {
            aml::Device::new(
                names[i].as_str().into(),
                vec![&hid, &uids[i], &crs_names[i]],
            )
        })
        .collect();
    // COM1, so the kernel's PNP serial driver gets IRQ 4 through ACPI (without a legacy PIC
    // in hardware-reduced mode, ISA IRQs are only set up for devices ACPI describes).
    let com_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let com_uid = aml::Name::new("_UID".into(), &0u32);
    let com_io = aml::IO::new(COM1_PORT, COM1_PORT, 1, 8);
    let com_irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    let com_res = aml::ResourceTemplate::new(vec![&com_io, &com_irq]);
    let com_crs = aml::Name::new("_CRS".into(), &com_res);
    let com1 = aml::Device::new("COM1".into(), vec![&com_hid, &com_uid, &com_crs]);
    let mut dev_refs: Vec<&dyn Aml> = vec![&com1];
    dev_refs.extend(devs.iter().map(|d| d as &dyn Aml));
    let sb = aml::Scope::new("\\_SB_".into(), dev_refs);
    sb.to_aml_bytes(&mut sdt);
    let s5_pkg = aml::Package::new(vec![&S5_TYPE, &S5_TYPE, &0u8, &0u8]);
    let s5 = aml::Name::new("_S5_".into(), &s5_pkg);
    s5.to_aml_bytes(&mut sdt);
    sdt.update_checksum();
    sdt.as_slice().to_vec()
}

fn io_gas(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// Builds the FADT pointing at `dsdt_addr`.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE, 1)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    f.reset_reg = io_gas(ACPI_RESET_PORT);
    f.reset_value = ACPI_RESET_VALUE;
    f.sleep_control_reg = io_gas(ACPI_SLEEP_CTL_PORT);
    f.sleep_status_reg = io_gas(ACPI_SLEEP_STS_PORT);
    // IA-PC boot architecture flags: no VGA (bit 2), no CMOS RTC (bit 5); no 8042 bit, so the
    // kernel does not probe a keyboard controller (reboot=k still works: it writes port 0x64).
    f.iapc_boot_arch = ((1u16 << 2) | (1 << 5)).into();
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"COLOVMM_").into();
    bytes(&f.finalize())
}

/// Builds the MADT for `cpus` LAPICs and the IOAPIC.
pub fn madt(cpus: u8) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE,
        1,
        LocalInterruptController::Address(LAPIC_ADDR as u32),
    );
    for i in 0..cpus {
        m.add_structure(ProcessorLocalApic::new(i, i, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(cpus, IOAPIC_ADDR as u32, 0));
    bytes(&m)
}

fn align(x: u64) -> u64 {
    (x + 15) & !15
}

/// Writes RSDP, XSDT, FADT, MADT and DSDT at [`ACPI_START`]; returns the RSDP address.
pub fn write_tables(
    mem: &GuestMem,
    cpus: u8,
    devices: &[MmioDeviceInfo],
) -> Result<u64, AcpiError> {
    let rsdp_addr = ACPI_START;
    let xsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
    // XSDT with 2 entries: 36 + 16 bytes.
    let fadt_addr = align(xsdt_addr + 36 + 16);
    let dsdt_addr_guess = align(fadt_addr + FADTBuilder::default_len() as u64);
    let madt_bytes = madt(cpus);
    let madt_addr = dsdt_addr_guess;
    let dsdt_addr = align(madt_addr + madt_bytes.len() as u64);
    let dsdt_bytes = dsdt(devices);
    let end = dsdt_addr + dsdt_bytes.len() as u64;
    if end - ACPI_START > ACPI_SIZE {
        return Err(AcpiError::TooBig(end - ACPI_START));
    }
    let fadt_bytes = fadt(dsdt_addr);
    let mut x = XSDT::new(OEM_ID, OEM_TABLE, 1);
    x.add_entry(fadt_addr);
    x.add_entry(madt_addr);
    let xsdt_bytes = bytes(&x);
    let rsdp_bytes = bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    mem.write_slice(&rsdp_bytes, GuestAddress(rsdp_addr))?;
    mem.write_slice(&xsdt_bytes, GuestAddress(xsdt_addr))?;
    mem.write_slice(&fadt_bytes, GuestAddress(fadt_addr))?;
    mem.write_slice(&madt_bytes, GuestAddress(madt_addr))?;
    mem.write_slice(&dsdt_bytes, GuestAddress(dsdt_addr))?;
    Ok(rsdp_addr)
}

trait FadtLen {
    fn default_len() -> usize;
}
impl FadtLen for FADTBuilder {
    fn default_len() -> usize {
        acpi_tables::fadt::FADT::len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;

    fn checksum_ok(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    fn find(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn dsdt_names_each_virtio_device_with_its_window_and_irq() {
        let d = dsdt(&[
            MmioDeviceInfo {
                base: 0xd000_0000,
                len: 0x200,
                irq: 5,
            },
            MmioDeviceInfo {
                base: 0xd000_1000,
                len: 0x200,
                irq: 6,
            },
        ]);
        assert_eq!(&d[0..4], b"DSDT");
        assert_eq!(
            u32::from_le_bytes(d[4..8].try_into().unwrap()) as usize,
            d.len()
        );
        assert!(checksum_ok(&d));
        assert!(find(&d, b"LNRO0005"));
        assert!(find(&d, b"V000") && find(&d, b"V001"));
        // Memory32Fixed descriptor: 0x86, len 9, rw, base, length.
        let mut m = vec![0x86, 0x09, 0x00, 0x01];
        m.extend_from_slice(&0xd000_1000u32.to_le_bytes());
        m.extend_from_slice(&0x200u32.to_le_bytes());
        assert!(find(&d, &m));
        // Extended interrupt descriptor with IRQ 6.
        let mut i = vec![0x89, 0x06, 0x00, 0x03, 0x01];
        i.extend_from_slice(&6u32.to_le_bytes());
        assert!(find(&d, &i));
        assert!(find(&d, b"_S5_"));
        assert!(find(&d, b"COM1"));
        // IO descriptor for 0x3f8..0x3ff.
        assert!(find(&d, &[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08]));
    }

    #[test]
    fn tables_are_written_with_valid_checksums_and_links() {
        let ram = GuestRam::new(32 << 20).unwrap();
        let rsdp = write_tables(ram.mem(), 2, &[]).unwrap();
        let mut r = [0u8; 36];
        ram.mem().read_slice(&mut r, GuestAddress(rsdp)).unwrap();
        assert_eq!(&r[0..8], b"RSD PTR ");
        assert!(checksum_ok(&r[0..20]) && checksum_ok(&r));
        let xsdt = u64::from_le_bytes(r[24..32].try_into().unwrap());
        let mut x = [0u8; 52];
        ram.mem().read_slice(&mut x, GuestAddress(xsdt)).unwrap();
        assert_eq!(&x[0..4], b"XSDT");
        assert!(checksum_ok(&x));
        let fadt_addr = u64::from_le_bytes(x[36..44].try_into().unwrap());
        let madt_addr = u64::from_le_bytes(x[44..52].try_into().unwrap());
        let mut sig = [0u8; 4];
        ram.mem()
            .read_slice(&mut sig, GuestAddress(fadt_addr))
            .unwrap();
        assert_eq!(&sig, b"FACP");
        ram.mem()
            .read_slice(&mut sig, GuestAddress(madt_addr))
            .unwrap();
        assert_eq!(&sig, b"APIC");
        let m = madt(2);
        assert!(checksum_ok(&m));
        // header 44 + 2 LAPICs (8) + IOAPIC (12)
        assert_eq!(m.len(), 44 + 16 + 12);
        let f = fadt(0x1234);
        assert!(checksum_ok(&f));
        // flags at offset 112: HW_REDUCED_ACPI bit 20.
        let flags = u32::from_le_bytes(f[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0);
    }
}
