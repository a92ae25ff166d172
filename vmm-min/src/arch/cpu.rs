//! Per-vCPU set-up: CPUID (KVM's supported set with the usual fixups), MSRs, LAPIC LINT0/LINT1,
//! FPU, and the registers of the first instruction (64-bit long mode or 16-bit real mode).

use kvm_bindings::{CpuId, Msrs, kvm_fpu, kvm_msr_entry, kvm_regs};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use super::gdt::{BOOT_GDT, segment_from_gdt};
use super::layout::{GDT_ADDR, IDT_ADDR};
use super::paging::write_identity_tables;
use crate::memory::GuestMem;

/// Errors setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// A KVM ioctl failed.
    #[error("vCPU {cpu}: {what} failed: {source}")]
    Kvm {
        /// vCPU index.
        cpu: u8,
        /// The ioctl.
        what: &'static str,
        /// errno.
        source: kvm_ioctls::Error,
    },
    /// Writing boot structures to guest memory failed.
    #[error("writing {what} to guest memory: {source}")]
    Memory {
        /// What was being written.
        what: &'static str,
        /// The error.
        source: vm_memory::GuestMemoryError,
    },
    /// FAM wrapper overflow (should not happen with our sizes).
    #[error("building the {0} list for KVM failed")]
    Fam(&'static str),
}

fn kvm_err(cpu: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuError {
    move |source| CpuError::Kvm { cpu, what, source }
}

/// How a vCPU starts.
#[derive(Debug, Clone, Copy)]
pub enum StartMode {
    /// 64-bit long mode with the identity map: `rip`, `rsi` (Linux: zero page), `rsp`.
    Long {
        /// First instruction.
        rip: u64,
        /// Value of RSI (the zero page for Linux).
        rsi: u64,
        /// Stack pointer.
        rsp: u64,
    },
    /// 16-bit real mode at physical address `ip` (CS = 0).
    Real {
        /// First instruction.
        ip: u16,
    },
    /// An application processor: left in its reset state (wait-for-SIPI), only CPUID, MSRs,
    /// LAPIC and FPU are set.
    Ap,
}

const CPUID_HYPERVISOR: u32 = 1 << 31;
const CPUID_TSC_DEADLINE: u32 = 1 << 24;
const CPUID_HTT: u32 = 1 << 28;

/// Applies the per-vCPU fixups to KVM's supported CPUID for vCPU `id` of `count`.
pub fn fixup_cpuid(cpuid: &mut CpuId, id: u8, count: u8, tsc_deadline: bool) {
    let count = count.max(1);
    let shift = u32::BITS - u32::from(count - 1).leading_zeros();
    for e in cpuid.as_mut_slice() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                e.ebx = (e.ebx & !0xff00) | (8 << 8);
                e.ecx |= CPUID_HYPERVISOR;
                if tsc_deadline {
                    e.ecx |= CPUID_TSC_DEADLINE;
                }
                if count > 1 {
                    e.edx |= CPUID_HTT;
                } else {
                    e.edx &= !CPUID_HTT;
                }
            }
            0x4 => {
                // Cores per package - 1 in EAX[31:26]; one thread per core.
                e.eax = (e.eax & 0x03ff_ffff) | (u32::from(count - 1) << 26);
                e.eax &= !(0xfff << 14);
            }
            0xb | 0x1f => {
                e.edx = u32::from(id);
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = shift;
                        e.ebx = u32::from(count);
                        e.ecx = (2 << 8) | 1;
                    }
                    i => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = i;
                    }
                }
            }
            0x8000_0008 => {
                e.ecx = (e.ecx & !0xff) | u32::from(count - 1);
            }
            0x8000_001e => {
                e.eax = u32::from(id);
                e.ebx &= !0xff00;
            }
            _ => {}
        }
    }
}

/// Narrows CPUID to a conservative feature set (roughly QEMU's `qemu64` plus what a modern
/// kernel expects): no XSAVE/AVX/PKU/PCID and no leaf-7 extensions. Used with
/// `VMM_MIN_CPUID=minimal` where the full host set misbehaves (nested KVM under TCG).
pub fn minimal_cpuid(cpuid: &mut CpuId) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            0x1 => {
                // XSAVE, OSXSAVE, AVX, F16C, RDRAND, FMA, PCID, MOVBE, x2APIC kept.
                e.ecx &= !((1 << 26) | (1 << 27) | (1 << 28) | (1 << 29) | (1 << 30));
                e.ecx &= !((1 << 12) | (1 << 17) | (1 << 22));
            }
            0x7 => {
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xd => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
    }
}

/// MSR indices set at boot.
pub mod msr {
    /// IA32_SYSENTER_CS.
    pub const SYSENTER_CS: u32 = 0x174;
    /// IA32_SYSENTER_ESP.
    pub const SYSENTER_ESP: u32 = 0x175;
    /// IA32_SYSENTER_EIP.
    pub const SYSENTER_EIP: u32 = 0x176;
    /// STAR.
    pub const STAR: u32 = 0xc000_0081;
    /// LSTAR.
    pub const LSTAR: u32 = 0xc000_0082;
    /// CSTAR.
    pub const CSTAR: u32 = 0xc000_0083;
    /// SYSCALL_MASK.
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    /// KERNEL_GS_BASE.
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    /// IA32_TSC.
    pub const TSC: u32 = 0x10;
    /// IA32_MISC_ENABLE.
    pub const MISC_ENABLE: u32 = 0x1a0;
    /// MTRR default type.
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
}

fn boot_msrs() -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(msr::SYSENTER_CS, 0),
        e(msr::SYSENTER_ESP, 0),
        e(msr::SYSENTER_EIP, 0),
        e(msr::STAR, 0),
        e(msr::CSTAR, 0),
        e(msr::KERNEL_GS_BASE, 0),
        e(msr::SYSCALL_MASK, 0),
        e(msr::LSTAR, 0),
        e(msr::TSC, 0),
        // Fast string operations enabled.
        e(msr::MISC_ENABLE, 1),
        // MTRRs on, default type write-back.
        e(msr::MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

fn lapic_reg(regs: &[std::os::raw::c_char], off: usize) -> u32 {
    let b: [u8; 4] = [
        regs[off] as u8,
        regs[off + 1] as u8,
        regs[off + 2] as u8,
        regs[off + 3] as u8,
    ];
    u32::from_le_bytes(b)
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char], off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        regs[off + i] = *b as std::os::raw::c_char;
    }
}

fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Configures LINT0 as ExtINT (the PIC) and LINT1 as NMI, like a BIOS does.
pub fn setup_lapic(vcpu: &VcpuFd, id: u8) -> Result<(), CpuError> {
    let mut l = vcpu.get_lapic().map_err(kvm_err(id, "KVM_GET_LAPIC"))?;
    let v0 = lapic_reg(&l.regs, APIC_LVT0);
    set_lapic_reg(
        &mut l.regs,
        APIC_LVT0,
        set_delivery_mode(v0, APIC_MODE_EXTINT),
    );
    let v1 = lapic_reg(&l.regs, APIC_LVT1);
    set_lapic_reg(&mut l.regs, APIC_LVT1, set_delivery_mode(v1, APIC_MODE_NMI));
    vcpu.set_lapic(&l).map_err(kvm_err(id, "KVM_SET_LAPIC"))
}

/// Sets CPUID, MSRs and FPU of vCPU `id` of `count`; LAPIC too when `irqchip`.
pub fn setup_common(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    id: u8,
    count: u8,
    irqchip: bool,
) -> Result<(), CpuError> {
    let mut cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err(id, "KVM_GET_SUPPORTED_CPUID"))?;
    let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
    fixup_cpuid(&mut cpuid, id, count, tsc_deadline);
    if std::env::var_os("VMM_MIN_CPUID").is_some_and(|v| v == "minimal") {
        minimal_cpuid(&mut cpuid);
    }
    vcpu.set_cpuid2(&cpuid)
        .map_err(kvm_err(id, "KVM_SET_CPUID2"))?;
    let msrs = Msrs::from_entries(&boot_msrs()).map_err(|_| CpuError::Fam("MSR"))?;
    let n = vcpu.set_msrs(&msrs).map_err(kvm_err(id, "KVM_SET_MSRS"))?;
    if n != msrs.as_slice().len() {
        tracing::debug!(cpu = id, set = n, "KVM accepted only part of the boot MSRs");
    }
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_err(id, "KVM_SET_FPU"))?;
    if irqchip {
        setup_lapic(vcpu, id)?;
    }
    Ok(())
}

/// Writes the boot GDT, an empty IDT and the identity page tables into guest memory.
pub fn write_boot_tables(mem: &GuestMem) -> Result<u64, CpuError> {
    for (i, e) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + i as u64 * 8))
            .map_err(|source| CpuError::Memory {
                what: "GDT",
                source,
            })?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
        .map_err(|source| CpuError::Memory {
            what: "IDT",
            source,
        })?;
    write_identity_tables(mem).map_err(|source| CpuError::Memory {
        what: "page tables",
        source,
    })
}

/// Sets registers and special registers for the start mode (boot tables must be written
/// already for [`StartMode::Long`]).
pub fn setup_regs(vcpu: &VcpuFd, id: u8, mode: StartMode) -> Result<(), CpuError> {
    let mut sregs = vcpu.get_sregs().map_err(kvm_err(id, "KVM_GET_SREGS"))?;
    match mode {
        StartMode::Long { rip, rsi, rsp } => {
            let code = segment_from_gdt(BOOT_GDT[1], 1);
            let data = segment_from_gdt(BOOT_GDT[2], 2);
            let tss = segment_from_gdt(BOOT_GDT[3], 3);
            sregs.gdt.base = GDT_ADDR;
            sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
            sregs.idt.base = IDT_ADDR;
            sregs.idt.limit = 0;
            sregs.cs = code;
            sregs.ds = data;
            sregs.es = data;
            sregs.fs = data;
            sregs.gs = data;
            sregs.ss = data;
            sregs.tr = tss;
            const CR0_PE: u64 = 1;
            const CR0_ET: u64 = 1 << 4;
            const CR0_PG: u64 = 1 << 31;
            const CR4_PAE: u64 = 1 << 5;
            const EFER_LME: u64 = 1 << 8;
            const EFER_LMA: u64 = 1 << 10;
            sregs.cr3 = super::layout::PML4_ADDR;
            sregs.cr4 |= CR4_PAE;
            sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
            vcpu.set_sregs(&sregs)
                .map_err(kvm_err(id, "KVM_SET_SREGS"))?;
            let regs = kvm_regs {
                rflags: 0x2,
                rip,
                rsi,
                rsp,
                rbp: rsp,
                ..Default::default()
            };
            vcpu.set_regs(&regs).map_err(kvm_err(id, "KVM_SET_REGS"))
        }
        StartMode::Real { ip } => {
            sregs.cs.base = 0;
            sregs.cs.selector = 0;
            vcpu.set_sregs(&sregs)
                .map_err(kvm_err(id, "KVM_SET_SREGS"))?;
            let regs = kvm_regs {
                rflags: 0x2,
                rip: u64::from(ip),
                ..Default::default()
            };
            vcpu.set_regs(&regs).map_err(kvm_err(id, "KVM_SET_REGS"))
        }
        StartMode::Ap => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn cpuid_fixups_set_apic_id_and_hypervisor_bit() {
        let mut c = CpuId::from_entries(&[leaf(1, 0), leaf(0xb, 0), leaf(0xb, 1)]).unwrap();
        fixup_cpuid(&mut c, 3, 4, false);
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 3);
        assert_eq!((s[0].ebx >> 16) & 0xff, 4);
        assert_ne!(s[0].ecx & CPUID_HYPERVISOR, 0);
        assert_ne!(s[0].edx & CPUID_HTT, 0);
        assert_eq!(s[1].edx, 3);
        assert_eq!(s[2].ebx, 4);
        assert_eq!(s[2].eax, 2);
    }

    #[test]
    fn lapic_delivery_mode_is_replaced() {
        assert_eq!(set_delivery_mode(0x10700, APIC_MODE_NMI), 0x10400);
        assert_eq!(set_delivery_mode(0, APIC_MODE_EXTINT), 0x700);
    }
}
