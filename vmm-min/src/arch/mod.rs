//! x86_64 specifics: memory layout of the boot structures, GDT, identity page tables, CPUID,
//! MSRs, LAPIC and FPU set-up of each vCPU. Everything here is plain set-up code run before the
//! first `KVM_RUN`; the boot protocol (bzImage, boot_params) is in [`crate::boot`].

pub mod cpu;
pub mod gdt;
pub mod layout;
pub mod paging;
