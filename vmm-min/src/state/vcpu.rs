//! Per-vCPU state: everything KVM holds for one x86 vCPU, captured and restored in an order that
//! respects KVM's dependencies.
//!
//! # Capture order
//! 1. `KVM_GET_MP_STATE` first: it processes pending INIT/SIPI events (`kvm_apic_accept_events`)
//!    and may change registers and LAPIC state, so everything else is read after it.
//! 2. regs, sregs, FPU, XSAVE, XCRs, debug registers, LAPIC, TSC frequency.
//! 3. MSRs (one `KVM_GET_MSRS` per 256 entries) — the list is KVM's own
//!    (`KVM_GET_MSR_INDEX_LIST`), filtered once per process to the MSRs KVM lets us read.
//! 4. vCPU events last (pending exception/interrupt/NMI/SMI, interrupt shadow).
//!
//! # Restore order
//! 1. TSC frequency (`KVM_SET_TSC_KHZ`) when it differs, before the TSC MSR is written.
//! 2. MP state.
//! 3. regs, then sregs (CR0/CR4/EFER and segments; sregs also carries the pending-interrupt
//!    bitmap, which vCPU events override later).
//! 4. FPU, then XSAVE (a superset of the FPU state, so it wins), then XCRs.
//! 5. Debug registers.
//! 6. LAPIC after sregs (the APIC base MSR is part of sregs and decides whether the LAPIC is
//!    enabled / x2APIC).
//! 7. MSRs after sregs and LAPIC: EFER-dependent MSRs need long mode to be set, and
//!    `MSR_IA32_TSC_DEADLINE` is only accepted when the LAPIC timer is in TSC-deadline mode.
//! 8. vCPU events last, so the pending events are not overwritten by the steps above.
//!
//! CPUID is not part of the state: it is set by the VM's creation ([`crate::vm::Vm::new`]) from
//! the same code on both sides; the shape check (vCPU count) guards the topology.

use std::sync::OnceLock;

use kvm_bindings::{
    KVM_MAX_MSR_ENTRIES, Msrs, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

/// `MSR_IA32_TSC`: the guest's time-stamp counter.
pub const MSR_IA32_TSC: u32 = 0x10;

/// Errors capturing or restoring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    /// A KVM ioctl failed.
    #[error("vCPU state: {what} failed: {source}")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// errno.
        source: kvm_ioctls::Error,
    },
    /// KVM refused an MSR while restoring.
    #[error("vCPU state: KVM_SET_MSRS stopped at MSR {index:#x} ({done} of {total} set)")]
    MsrRefused {
        /// The MSR KVM did not accept.
        index: u32,
        /// MSRs accepted before it.
        done: usize,
        /// MSRs in the state.
        total: usize,
    },
    /// KVM read fewer MSRs than asked, on a list that was readable before.
    #[error("vCPU state: KVM_GET_MSRS stopped at MSR {index:#x}")]
    MsrUnreadable {
        /// The MSR KVM did not return.
        index: u32,
    },
    /// The host's XSAVE area is larger than `struct kvm_xsave` (dynamic features such as AMX).
    #[error("vCPU state: the host XSAVE area is {0} bytes, larger than the 4096 we support")]
    XsaveTooLarge(i32),
    /// The saved XSAVE area has the wrong length.
    #[error("vCPU state: XSAVE area has {0} words, expected 1024")]
    XsaveLength(usize),
}

fn kerr(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Kvm { what, source }
}

/// Serde copy of `struct kvm_fpu` (kvm-bindings does not derive serde for it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    /// x87 registers.
    pub fpr: [[u8; 16]; 8],
    /// Control word.
    pub fcw: u16,
    /// Status word.
    pub fsw: u16,
    /// Abridged tag word.
    pub ftwx: u8,
    /// Last opcode.
    pub last_opcode: u16,
    /// Last instruction pointer.
    pub last_ip: u64,
    /// Last data pointer.
    pub last_dp: u64,
    /// XMM registers.
    pub xmm: [[u8; 16]; 16],
    /// MXCSR.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        Self {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// One MSR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrValue {
    /// Index.
    pub index: u32,
    /// Value.
    pub data: u64,
}

/// The complete state of one x86 vCPU.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index.
    pub id: u32,
    /// MP state (running, halted, waiting for SIPI…).
    #[serde(with = "super::raw")]
    pub mp_state: kvm_mp_state,
    /// General registers.
    #[serde(with = "super::raw")]
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    #[serde(with = "super::raw")]
    pub sregs: kvm_sregs,
    /// x87/SSE state (legacy view; XSAVE is authoritative on restore).
    pub fpu: FpuState,
    /// XSAVE area (`kvm_xsave.region`, 1024 words = 4 KiB).
    #[serde(with = "super::raw::words")]
    pub xsave: Vec<u32>,
    /// Extended control registers (XCR0).
    #[serde(with = "super::raw")]
    pub xcrs: kvm_xcrs,
    /// DR0-3, DR6, DR7.
    #[serde(with = "super::raw")]
    pub debug_regs: kvm_debugregs,
    /// Local APIC registers (present with the in-kernel irqchip).
    #[serde(with = "super::raw::opt")]
    pub lapic: Option<kvm_lapic_state>,
    /// Guest TSC frequency in kHz (0 when KVM cannot tell).
    pub tsc_khz: u32,
    /// Every MSR KVM lets us read, in KVM's index-list order.
    pub msrs: Vec<MsrValue>,
    /// Pending exceptions, interrupts, NMI, SMI, interrupt shadow.
    #[serde(with = "super::raw")]
    pub events: kvm_vcpu_events,
}

impl VcpuState {
    /// The value of MSR `index`, if captured.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|m| m.index == index).map(|m| m.data)
    }
}

/// The MSRs KVM reports (`KVM_GET_MSR_INDEX_LIST`) that `vcpu` can actually read, computed once
/// per process and irqchip mode (the list depends on the host and on whether the LAPIC is in
/// the kernel, not on the guest).
pub fn saveable_msrs(vcpu: &VcpuFd, irqchip: bool) -> Result<&'static [u32], VcpuStateError> {
    static LISTS: [OnceLock<Vec<u32>>; 2] = [OnceLock::new(), OnceLock::new()];
    let list = &LISTS[usize::from(irqchip)];
    if let Some(l) = list.get() {
        return Ok(l);
    }
    let kvm = Kvm::new().map_err(kerr("open /dev/kvm"))?;
    let all = kvm
        .get_msr_index_list()
        .map_err(kerr("KVM_GET_MSR_INDEX_LIST"))?;
    let mut ok = Vec::new();
    for &index in all.as_slice() {
        if read_one_msr(vcpu, index).is_some() {
            ok.push(index);
        }
    }
    Ok(list.get_or_init(|| ok))
}

fn read_msrs(vcpu: &VcpuFd, list: &[u32]) -> Result<Vec<MsrValue>, VcpuStateError> {
    let mut out = Vec::with_capacity(list.len());
    for chunk in list.chunks(KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let first = chunk.first().copied().unwrap_or(0);
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|_| VcpuStateError::MsrUnreadable { index: first })?;
        let n = vcpu.get_msrs(&mut msrs).map_err(kerr("KVM_GET_MSRS"))?;
        if n < chunk.len() {
            return Err(VcpuStateError::MsrUnreadable { index: chunk[n] });
        }
        out.extend(msrs.as_slice().iter().map(|e| MsrValue {
            index: e.index,
            data: e.data,
        }));
    }
    Ok(out)
}

fn read_one_msr(vcpu: &VcpuFd, index: u32) -> Option<u64> {
    let mut one = Msrs::from_entries(&[kvm_msr_entry {
        index,
        ..Default::default()
    }])
    .ok()?;
    match vcpu.get_msrs(&mut one) {
        Ok(1) => one.as_slice().first().map(|e| e.data),
        _ => None,
    }
}

/// Writes `msrs` with `KVM_SET_MSRS`, up to 256 per call. KVM stops at the first MSR it refuses;
/// a refused MSR that already holds the saved value (for example `MSR_KVM_ASYNC_PF_INT` = 0 on a
/// VM without in-kernel LAPIC, where KVM refuses any write) is skipped, any other is an error.
fn write_msrs(vcpu: &VcpuFd, msrs: &[MsrValue]) -> Result<(), VcpuStateError> {
    let mut rest = msrs;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        let done = msrs.len() - rest.len();
        let refused = |n: usize| VcpuStateError::MsrRefused {
            index: chunk[n.min(chunk.len() - 1)].index,
            done: done + n,
            total: msrs.len(),
        };
        let k = Msrs::from_entries(&entries).map_err(|_| refused(0))?;
        let n = vcpu.set_msrs(&k).map_err(kerr("KVM_SET_MSRS"))?;
        if n < chunk.len() {
            let m = chunk[n];
            if read_one_msr(vcpu, m.index) != Some(m.data) {
                return Err(refused(n));
            }
            tracing::debug!(
                "MSR {:#x} refused by KVM but already {:#x}",
                m.index,
                m.data
            );
            rest = &rest[n + 1..];
        } else {
            rest = &rest[n..];
        }
    }
    Ok(())
}

fn check_xsave_size() -> Result<(), VcpuStateError> {
    let kvm = Kvm::new().map_err(kerr("open /dev/kvm"))?;
    let size = kvm.check_extension_int(Cap::Xsave2);
    if size > 4096 {
        return Err(VcpuStateError::XsaveTooLarge(size));
    }
    Ok(())
}

/// Captures vCPU `id`'s state. The vCPU must not be inside `KVM_RUN`. `irqchip`: the VM has the
/// in-kernel irqchip (and so a LAPIC per vCPU).
pub fn capture(vcpu: &VcpuFd, id: u32, irqchip: bool) -> Result<VcpuState, VcpuStateError> {
    check_xsave_size()?;
    let mp_state = vcpu.get_mp_state().map_err(kerr("KVM_GET_MP_STATE"))?;
    let regs = vcpu.get_regs().map_err(kerr("KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(kerr("KVM_GET_SREGS"))?;
    let fpu = FpuState::from(&vcpu.get_fpu().map_err(kerr("KVM_GET_FPU"))?);
    let xsave = vcpu
        .get_xsave()
        .map_err(kerr("KVM_GET_XSAVE"))?
        .region
        .to_vec();
    let xcrs = vcpu.get_xcrs().map_err(kerr("KVM_GET_XCRS"))?;
    let debug_regs = vcpu.get_debug_regs().map_err(kerr("KVM_GET_DEBUGREGS"))?;
    let lapic = if irqchip {
        Some(vcpu.get_lapic().map_err(kerr("KVM_GET_LAPIC"))?)
    } else {
        None
    };
    let tsc_khz = vcpu.get_tsc_khz().unwrap_or(0);
    let msrs = read_msrs(vcpu, saveable_msrs(vcpu, irqchip)?)?;
    let events = vcpu
        .get_vcpu_events()
        .map_err(kerr("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        id,
        mp_state,
        regs,
        sregs,
        fpu,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        tsc_khz,
        msrs,
        events,
    })
}

/// Restores `state` into `vcpu` (created with the same CPUID, not running).
pub fn restore(vcpu: &VcpuFd, state: &VcpuState) -> Result<(), VcpuStateError> {
    if state.tsc_khz != 0 && vcpu.get_tsc_khz().ok() != Some(state.tsc_khz) {
        vcpu.set_tsc_khz(state.tsc_khz)
            .map_err(kerr("KVM_SET_TSC_KHZ"))?;
    }
    vcpu.set_mp_state(state.mp_state)
        .map_err(kerr("KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&state.regs).map_err(kerr("KVM_SET_REGS"))?;
    vcpu.set_sregs(&state.sregs)
        .map_err(kerr("KVM_SET_SREGS"))?;
    vcpu.set_fpu(&kvm_fpu::from(&state.fpu))
        .map_err(kerr("KVM_SET_FPU"))?;
    check_xsave_size()?;
    let mut xsave = kvm_xsave::default();
    if state.xsave.len() != xsave.region.len() {
        return Err(VcpuStateError::XsaveLength(state.xsave.len()));
    }
    xsave.region.copy_from_slice(&state.xsave);
    // SAFETY: KVM reads at most the guest's XSAVE size from the pointer; check_xsave_size just
    // established that this host's size (KVM_CAP_XSAVE2) is at most 4096 bytes, the size of
    // `kvm_xsave`, and we never enable dynamic XSAVE features (AMX) for this process.
    unsafe { vcpu.set_xsave(&xsave) }.map_err(kerr("KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&state.xcrs).map_err(kerr("KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&state.debug_regs)
        .map_err(kerr("KVM_SET_DEBUGREGS"))?;
    if let Some(lapic) = &state.lapic {
        vcpu.set_lapic(lapic).map_err(kerr("KVM_SET_LAPIC"))?;
    }
    write_msrs(vcpu, &state.msrs)?;
    vcpu.set_vcpu_events(&state.events)
        .map_err(kerr("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// Completes an I/O or MMIO exit still pending in KVM (the last `KVM_RUN` returned
/// `KVM_EXIT_IO`/`KVM_EXIT_MMIO` and was not re-entered): enters `KVM_RUN` with `immediate_exit`
/// set, which finishes the instruction and returns `EINTR` without running the guest. Call it
/// before [`capture`] on a vCPU stopped at such an exit, or the captured RIP/registers are
/// those of a half-done instruction.
pub fn complete_pending_io(vcpu: &mut VcpuFd) -> Result<(), VcpuStateError> {
    vcpu.set_kvm_immediate_exit(1);
    let r = vcpu.run().map(|_| ()).map_err(|e| e.errno());
    vcpu.set_kvm_immediate_exit(0);
    match r {
        Ok(()) | Err(libc::EINTR) => Ok(()),
        Err(errno) => Err(VcpuStateError::Kvm {
            what: "KVM_RUN (immediate exit)",
            source: kvm_ioctls::Error::new(errno),
        }),
    }
}
