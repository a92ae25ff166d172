//! The VM: KVM handle, guest RAM in memory slots, in-kernel irqchip and PIT, vCPUs, the port
//! I/O and MMIO buses, and the vCPU threads' run loop.

use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_bindings::{
    KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use crate::arch::cpu::{self, CpuError, StartMode};
use crate::arch::layout::{KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};
use crate::control::{self, Control, ExitReason, Next};
use crate::devices::bus::Bus;
use crate::exits::ExitKind;
use crate::memory::{GuestRam, MemoryError};

/// Errors creating or running the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm cannot be opened.
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// errno.
        source: kvm_ioctls::Error,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// vCPU set-up.
    #[error(transparent)]
    Cpu(#[from] CpuError),
    /// Bad vCPU count.
    #[error("--cpus {0}: must be between 1 and 254")]
    Cpus(u32),
    /// Thread creation or signal set-up.
    #[error("{what}: {source}")]
    Os {
        /// What.
        what: &'static str,
        /// OS error.
        source: std::io::Error,
    },
}

fn kerr(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// VM shape.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// RAM bytes.
    pub memory: u64,
    /// vCPU count.
    pub cpus: u32,
    /// In-kernel irqchip (IOAPIC, PIC, LAPICs) and PIT. Off only for tiny test guests that
    /// want HLT exits.
    pub irqchip: bool,
}

/// True when /dev/kvm is PVM (`kvm_pvm` loaded): non-PVM guests run emulated there.
pub fn host_is_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// Explains once, on stderr, what a PVM host means.
pub fn warn_if_pvm() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    if host_is_pvm() {
        ONCE.call_once(|| {
            eprintln!(
                "vmm-min: note: /dev/kvm on this host is PVM (kvm_pvm is loaded). Guest kernels \
                 that are not PVM-aware run emulated, about 300 ns per instruction: a stock Linux \
                 kernel prints its early boot messages and does not reach user space. Use a \
                 machine with hardware KVM (VMX/SVM) or the KVM lab for full guests."
            );
        });
    }
}

/// A VM before its vCPUs start.
pub struct Vm {
    kvm: Kvm,
    fd: Arc<VmFd>,
    ram: GuestRam,
    vcpus: Vec<VcpuFd>,
    /// Port I/O bus.
    pub pio: Bus,
    /// MMIO bus.
    pub mmio: Bus,
    control: Arc<Control>,
    config: VmConfig,
    dirty_log: bool,
}

impl Vm {
    /// Creates the VM: RAM, memory slots, irqchip/PIT when asked, vCPUs with CPUID/MSRs/FPU/LAPIC.
    pub fn new(config: VmConfig) -> Result<Self, VmError> {
        if config.cpus == 0 || config.cpus > 254 {
            return Err(VmError::Cpus(config.cpus));
        }
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let fd = kvm.create_vm().map_err(kerr("KVM_CREATE_VM"))?;
        let ram = GuestRam::new(config.memory)?;
        let mut vm = Self {
            kvm,
            fd: Arc::new(fd),
            ram,
            vcpus: Vec::new(),
            pio: Bus::new(),
            mmio: Bus::new(),
            control: Arc::new(Control::new(config.cpus as usize)),
            config: config.clone(),
            dirty_log: false,
        };
        vm.set_slots(false)?;
        vm.fd
            .set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(kerr("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm.fd
            .set_tss_address(KVM_TSS_ADDR as usize)
            .map_err(kerr("KVM_SET_TSS_ADDR"))?;
        if config.irqchip {
            vm.fd
                .create_irq_chip()
                .map_err(kerr("KVM_CREATE_IRQCHIP"))?;
            let pit = kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            vm.fd.create_pit2(pit).map_err(kerr("KVM_CREATE_PIT2"))?;
        }
        for id in 0..config.cpus {
            let v = vm
                .fd
                .create_vcpu(u64::from(id))
                .map_err(kerr("KVM_CREATE_VCPU"))?;
            cpu::setup_common(&vm.kvm, &v, id as u8, config.cpus as u8, config.irqchip)?;
            vm.control.exits().add_kvm_vcpu(&v);
            vm.vcpus.push(v);
        }
        Ok(vm)
    }

    /// (Re)registers every RAM range as a KVM memory slot, with dirty logging on or off.
    pub fn set_slots(&mut self, dirty_log: bool) -> Result<(), VmError> {
        let hosts = self.ram.host_addrs();
        for (slot, (r, host)) in self.ram.ranges().iter().zip(hosts).enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: if dirty_log {
                    KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
                guest_phys_addr: r.guest_addr,
                memory_size: r.len,
                userspace_addr: host,
            };
            // SAFETY: the host range is our own live mmap of exactly `r.len` bytes, which
            // outlives the VM fd (both are owned by `self`, RAM dropped after the VM fd).
            unsafe { self.fd.set_user_memory_region(region) }
                .map_err(kerr("KVM_SET_USER_MEMORY_REGION"))?;
        }
        self.dirty_log = dirty_log;
        Ok(())
    }

    /// The KVM VM fd (irqfd, ioeventfd registration).
    pub fn fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Run control.
    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    /// The vCPUs (before start).
    pub fn vcpus_mut(&mut self) -> &mut [VcpuFd] {
        &mut self.vcpus
    }

    /// VM shape.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Sets vCPU 0's entry state (boot tables are written for long mode).
    pub fn set_boot_cpu(&self, mode: StartMode) -> Result<(), VmError> {
        if matches!(mode, StartMode::Long { .. }) {
            cpu::write_boot_tables(self.ram.mem())?;
        }
        let v = self.vcpus.first().ok_or(VmError::Cpus(0))?;
        cpu::setup_regs(v, 0, mode)?;
        Ok(())
    }

    /// Starts one thread per vCPU; returns the running VM.
    pub fn start(mut self) -> Result<RunningVm, VmError> {
        control::install_kick_handler().map_err(|source| VmError::Os {
            what: "installing the vCPU kick signal handler",
            source,
        })?;
        let mut threads = Vec::new();
        let vcpus = std::mem::take(&mut self.vcpus);
        for (id, v) in vcpus.into_iter().enumerate() {
            let pio = self.pio.clone();
            let mmio = self.mmio.clone();
            let ctl = self.control.clone();
            let irqchip = self.config.irqchip;
            let t = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    if id == 0 {
                        // Probe the saveable MSR list now (cached per process), not inside the
                        // downtime of the first snapshot or migration.
                        if let Err(e) = crate::state::vcpu::saveable_msrs(&v, irqchip) {
                            tracing::warn!("probing the MSR list: {e}");
                        }
                    }
                    vcpu_loop(v, id, &pio, &mmio, &ctl)
                })
                .map_err(|source| VmError::Os {
                    what: "spawning a vCPU thread",
                    source,
                })?;
            threads.push(t);
        }
        Ok(RunningVm { vm: self, threads })
    }
}

/// A VM whose vCPU threads run.
pub struct RunningVm {
    vm: Vm,
    threads: Vec<JoinHandle<()>>,
}

impl RunningVm {
    /// Run control.
    pub fn control(&self) -> &Arc<Control> {
        &self.vm.control
    }

    /// The VM (RAM, fd).
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Waits for the VM to stop and joins the vCPU threads.
    pub fn wait(self) -> ExitReason {
        let r = self.vm.control.wait_exit();
        // Kick again: a vCPU may have entered KVM_RUN right after the first kick.
        self.vm.control.request_exit(r.clone());
        for t in self.threads {
            let _ = t.join();
        }
        r
    }
}

fn vcpu_loop(mut vcpu: VcpuFd, id: usize, pio: &Bus, mmio: &Bus, ctl: &Control) {
    control::register_kvm_run(vcpu.get_kvm_run());
    ctl.register_thread();
    let counts = ctl.exits().vcpu();
    let count = |kind, addr| {
        counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .count(kind, addr);
    };
    while ctl.next_vcpu(id, &mut vcpu) == Next::Run {
        match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                count(ExitKind::PioIn, u64::from(port));
                pio.read(u64::from(port), data);
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                count(ExitKind::PioOut, u64::from(port));
                if !pio.write(u64::from(port), data) {
                    tracing::trace!(port, "write to unclaimed port");
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                count(ExitKind::MmioRead, addr);
                if !mmio.read(addr, data) {
                    tracing::debug!(addr, "read of unclaimed MMIO");
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                count(ExitKind::MmioWrite, addr);
                if !mmio.write(addr, data) {
                    tracing::debug!(addr, "write to unclaimed MMIO");
                }
            }
            Ok(VcpuExit::Hlt) => {
                count(ExitKind::Hlt, 0);
                tracing::info!(cpu = id, "vCPU halted without an in-kernel irqchip");
                ctl.request_exit(ExitReason::Poweroff);
            }
            Ok(VcpuExit::Shutdown) => {
                tracing::info!(cpu = id, "triple fault / shutdown: treating as reset");
                ctl.request_exit(ExitReason::Reset);
            }
            Ok(VcpuExit::SystemEvent(ty, _)) => {
                let r = if ty == kvm_bindings::KVM_SYSTEM_EVENT_RESET {
                    ExitReason::Reset
                } else {
                    ExitReason::Poweroff
                };
                ctl.request_exit(r);
            }
            Ok(VcpuExit::Intr) => count(ExitKind::Interrupted, 0),
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                ctl.request_exit(ExitReason::Error(format!(
                    "vCPU {id}: KVM entry failed, hardware reason {reason:#x} on cpu {cpu}"
                )));
            }
            Ok(VcpuExit::InternalError) => {
                let regs = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                ctl.request_exit(ExitReason::Error(format!(
                    "vCPU {id}: KVM internal error at rip {regs:#x}"
                )));
            }
            Ok(other) => {
                count(ExitKind::Other, 0);
                tracing::debug!(cpu = id, "unhandled exit {other:?}");
            }
            Err(e) if e.errno() == libc::EINTR => {
                count(ExitKind::Interrupted, 0);
                vcpu.set_kvm_immediate_exit(0);
            }
            Err(e) if e.errno() == libc::EAGAIN => {}
            Err(e) => {
                ctl.request_exit(ExitReason::Error(format!("vCPU {id}: KVM_RUN: {e}")));
            }
        }
    }
    if let (Ok(r), Ok(sr)) = (vcpu.get_regs(), vcpu.get_sregs()) {
        tracing::debug!(
            cpu = id,
            rip = format_args!("{:#x}", r.rip),
            rsp = format_args!("{:#x}", r.rsp),
            cr0 = format_args!("{:#x}", sr.cr0),
            cr3 = format_args!("{:#x}", sr.cr3),
            "vCPU stopped"
        );
    }
    control::unregister_kvm_run();
    ctl.vcpu_finished();
}

#[cfg(test)]
mod tests {
    //! Tiny in-process guests: a few instructions in real and long mode, run on this host's
    //! KVM (PVM included: they are short), then registers and memory are inspected.
    use super::*;
    use crate::devices::bus::BusDevice;
    use crate::devices::legacy::{AcpiPm, I8042};
    use std::sync::Mutex;
    use std::time::Duration;
    use vm_memory::{Bytes, GuestAddress};

    fn vm(irqchip: bool, cpus: u32) -> Vm {
        Vm::new(VmConfig {
            memory: 64 << 20,
            cpus,
            irqchip,
        })
        .unwrap()
    }

    #[test]
    fn real_mode_guest_does_out_writes_memory_and_halts() {
        let mut vm = vm(false, 1);
        // mov al,0x42; out 0x10,al; mov word [0x3000],0x1234; inc bx; hlt
        let code = [
            0xb0, 0x42, 0xe6, 0x10, 0xc7, 0x06, 0x00, 0x30, 0x34, 0x12, 0x43, 0xf4,
        ];
        vm.ram()
            .mem()
            .write_slice(&code, GuestAddress(0x1000))
            .unwrap();
        vm.set_boot_cpu(StartMode::Real { ip: 0x1000 }).unwrap();
        let v = &mut vm.vcpus_mut()[0];
        match v.run().unwrap() {
            VcpuExit::IoOut(port, data) => {
                assert_eq!(port, 0x10);
                assert_eq!(data, &[0x42]);
            }
            e => panic!("expected IoOut, got {e:?}"),
        }
        match v.run().unwrap() {
            VcpuExit::Hlt => {}
            e => panic!("expected Hlt, got {e:?}"),
        }
        let regs = v.get_regs().unwrap();
        assert_eq!(regs.rip, 0x1000 + code.len() as u64);
        assert_eq!(regs.rax & 0xff, 0x42);
        assert_eq!(regs.rbx, 1);
        let w: u16 = vm.ram().mem().read_obj(GuestAddress(0x3000)).unwrap();
        assert_eq!(w, 0x1234);
    }

    #[test]
    fn long_mode_guest_runs_with_paging_and_irqchip() {
        let mut vm = vm(true, 1);
        let mut code = vec![0x48, 0xb8];
        code.extend_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes()); // mov rax, imm64
        code.extend_from_slice(&[0x48, 0x89, 0x04, 0x25, 0x00, 0x50, 0x00, 0x00]); // mov [0x5000], rax
        code.extend_from_slice(&[0x48, 0x8b, 0x1c, 0x25, 0x08, 0x50, 0x00, 0x00]); // mov rbx, [0x5008]
        code.extend_from_slice(&[0xb0, 0x07, 0xe6, 0x10]); // mov al,7; out 0x10,al
        vm.ram()
            .mem()
            .write_slice(&code, GuestAddress(0x4000))
            .unwrap();
        vm.ram()
            .mem()
            .write_obj(0xabcdu64, GuestAddress(0x5008))
            .unwrap();
        vm.set_boot_cpu(StartMode::Long {
            rip: 0x4000,
            rsi: 0x7000,
            rsp: 0x8ff0,
        })
        .unwrap();
        let v = &mut vm.vcpus_mut()[0];
        match v.run().unwrap() {
            VcpuExit::IoOut(0x10, data) => assert_eq!(data, &[7]),
            e => panic!("expected IoOut 0x10, got {e:?}"),
        }
        let regs = v.get_regs().unwrap();
        assert_eq!(regs.rbx, 0xabcd);
        assert_eq!(regs.rsi, 0x7000);
        assert_eq!(regs.rip, 0x4000 + code.len() as u64);
        let sregs = v.get_sregs().unwrap();
        assert_ne!(sregs.efer & (1 << 10), 0, "long mode active");
        assert_eq!(sregs.cs.l, 1);
        let cpuid = v.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES).unwrap();
        let leaf1 = cpuid.as_slice().iter().find(|e| e.function == 1).unwrap();
        assert_ne!(leaf1.ecx & (1 << 31), 0, "hypervisor bit");
        let m: u64 = vm.ram().mem().read_obj(GuestAddress(0x5000)).unwrap();
        assert_eq!(m, 0x1122_3344_5566_7788);
    }

    struct Recorder(Arc<Mutex<Vec<u8>>>);
    impl BusDevice for Recorder {
        fn read(&mut self, _o: u64, d: &mut [u8]) {
            d.fill(0x5a);
        }
        fn write(&mut self, _o: u64, d: &[u8]) {
            self.0.lock().unwrap().extend_from_slice(d);
        }
    }

    /// Puts `code` at 0x4000 and starts the boot vCPU there in long mode (stack below 0x9000).
    fn load_long_mode(vm: &Vm, code: &[u8]) {
        vm.ram()
            .mem()
            .write_slice(code, GuestAddress(0x4000))
            .unwrap();
        vm.set_boot_cpu(StartMode::Long {
            rip: 0x4000,
            rsi: 0,
            rsp: 0x8ff0,
        })
        .unwrap();
    }

    fn with_platform(vm: &mut Vm) -> Arc<Mutex<Vec<u8>>> {
        let rec = Arc::new(Mutex::new(Vec::new()));
        vm.pio
            .insert(0x10, 1, Arc::new(Mutex::new(Recorder(rec.clone()))))
            .unwrap();
        let c = vm.control().clone();
        vm.pio
            .insert(0x3c0, 3, Arc::new(Mutex::new(AcpiPm::new(c.clone()))))
            .unwrap();
        vm.pio
            .insert(0x60, 5, Arc::new(Mutex::new(I8042::new(c))))
            .unwrap();
        rec
    }

    #[test]
    fn threaded_guest_powers_off_through_the_acpi_sleep_register() {
        let mut vm = vm(true, 2);
        let rec = with_platform(&mut vm);
        // in al,0x10 (device answers 0x5a); out 0x10,al; mov al,0x34 (S5|SLP_EN); out 0x3c0? (dx)
        let code = [
            0xe4, 0x10, 0xe6, 0x10, 0xb0, 0x34, 0x66, 0xba, 0xc0, 0x03, 0xee, 0xeb, 0xfe,
        ];
        load_long_mode(&vm, &code);
        let r = vm.start().unwrap().wait();
        assert_eq!(r, ExitReason::Poweroff);
        assert_eq!(*rec.lock().unwrap(), vec![0x5a]);
    }

    #[test]
    fn exits_are_counted_by_kind_and_address() {
        let mut vm = vm(true, 1);
        with_platform(&mut vm);
        // in al,0x10; out 0x10,al; out 0x10,al; mov al,0x34; mov dx,0x3c0; out dx,al (S5)
        let code = [
            0xe4, 0x10, 0xe6, 0x10, 0xe6, 0x10, 0xb0, 0x34, 0x66, 0xba, 0xc0, 0x03, 0xee, 0xeb,
            0xfe,
        ];
        load_long_mode(&vm, &code);
        let exits = vm.control().exits().clone();
        assert_eq!(vm.start().unwrap().wait(), ExitReason::Poweroff);
        let s = exits.snapshot();
        assert_eq!(s.kinds.get("pio-in"), Some(&1), "{s:?}");
        assert_eq!(s.kinds.get("pio-out"), Some(&3), "{s:?}");
        let out10 = s
            .addresses
            .iter()
            .find(|a| a.kind == "pio-out" && a.address == "0x10");
        assert_eq!(out10.map(|a| a.count), Some(2), "{s:?}");
        // KVM's own statistics (where the kernel has binary stats) count at least these exits.
        if let Some(&n) = s.kvm.get("exits") {
            assert!(n >= 4, "{s:?}");
        }
    }

    #[test]
    fn threaded_guest_resets_through_the_i8042() {
        let mut vm = vm(true, 1);
        with_platform(&mut vm);
        // mov al,0xfe; out 0x64,al; jmp $
        let code = [0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe];
        load_long_mode(&vm, &code);
        assert_eq!(vm.start().unwrap().wait(), ExitReason::Reset);
    }

    #[test]
    fn spinning_guest_can_be_paused_resumed_and_stopped() {
        let vm = vm(true, 2);
        // jmp $
        load_long_mode(&vm, &[0xeb, 0xfe]);
        let running = vm.start().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(running.control().pause(Duration::from_secs(10)));
        assert_eq!(
            running.control().run_state(),
            crate::control::RunState::Paused
        );
        running.control().resume();
        std::thread::sleep(Duration::from_millis(20));
        running.control().request_exit(ExitReason::Quit);
        assert_eq!(running.wait(), ExitReason::Quit);
    }

    #[test]
    fn bad_cpu_count_is_refused() {
        let e = Vm::new(VmConfig {
            memory: 64 << 20,
            cpus: 0,
            irqchip: true,
        });
        assert!(matches!(e, Err(VmError::Cpus(0))));
    }
}

/// KVM dirty-page logging over every RAM slot. Logging is switched on by the first
/// [`DirtyTracker::collect`]: that call reports every page (nothing was tracked before), later
/// calls report the pages written since the previous call (KVM_GET_DIRTY_LOG clears the log).
pub struct DirtyTracker {
    fd: Arc<VmFd>,
    slots: Vec<kvm_userspace_memory_region>,
    enabled: std::sync::Mutex<bool>,
    logs: Vec<Arc<crate::dirty_log::SharedLog>>,
}

impl DirtyTracker {
    /// A tracker over the slots of `vm`.
    pub fn new(vm: &Vm) -> Self {
        let hosts = vm.ram.host_addrs();
        let slots = vm
            .ram
            .ranges()
            .iter()
            .zip(hosts)
            .enumerate()
            .map(|(slot, (r, host))| kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: r.guest_addr,
                memory_size: r.len,
                userspace_addr: host,
            })
            .collect();
        Self {
            fd: vm.fd.clone(),
            slots,
            enabled: std::sync::Mutex::new(false),
            logs: Vec::new(),
        }
    }

    /// Also merges these vhost-user shared logs (pages written by backends).
    pub fn with_logs(mut self, logs: Vec<Arc<crate::dirty_log::SharedLog>>) -> Self {
        self.logs = logs;
        self
    }

    /// Number of 4 KiB pages of RAM.
    pub fn total_pages(&self) -> u64 {
        self.slots.iter().map(|s| s.memory_size / 4096).sum()
    }

    /// Returns, per slot, the guest address and the dirty bitmap (one bit per 4 KiB page).
    pub fn collect(&self) -> Result<Vec<(u64, Vec<u64>)>, VmError> {
        let mut enabled = self
            .enabled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !*enabled {
            for s in &self.slots {
                let mut r = *s;
                r.flags = KVM_MEM_LOG_DIRTY_PAGES;
                // SAFETY: same host mapping as registered at VM creation, still alive (the
                // RAM outlives the VM's vCPUs and this tracker holds the VM fd only).
                unsafe { self.fd.set_user_memory_region(r) }
                    .map_err(kerr("KVM_SET_USER_MEMORY_REGION (dirty log on)"))?;
            }
            *enabled = true;
            return Ok(self
                .slots
                .iter()
                .map(|s| {
                    let pages = s.memory_size / 4096;
                    let mut v = vec![u64::MAX; pages.div_ceil(64) as usize];
                    if pages % 64 != 0
                        && let Some(last) = v.last_mut()
                    {
                        *last = (1u64 << (pages % 64)) - 1;
                    }
                    (s.guest_phys_addr, v)
                })
                .collect());
        }
        self.slots
            .iter()
            .map(|s| {
                let mut b = self
                    .fd
                    .get_dirty_log(s.slot, s.memory_size as usize)
                    .map_err(kerr("KVM_GET_DIRTY_LOG"))?;
                for log in &self.logs {
                    let l = log.take(s.guest_phys_addr / 4096, s.memory_size / 4096);
                    for (w, x) in b.iter_mut().zip(l) {
                        *w |= x;
                    }
                }
                Ok((s.guest_phys_addr, b))
            })
            .collect()
    }
}

#[cfg(test)]
mod dirty_tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn pages_written_by_the_guest_show_up_in_the_dirty_log() {
        let vm = Vm::new(VmConfig {
            memory: 64 << 20,
            cpus: 1,
            irqchip: false,
        })
        .unwrap();
        let tracker = DirtyTracker::new(&vm);
        let first = tracker.collect().unwrap();
        let all: u64 = first
            .iter()
            .flat_map(|(_, b)| b)
            .map(|w| u64::from(w.count_ones()))
            .sum();
        assert_eq!(
            all,
            tracker.total_pages(),
            "first call: everything is dirty"
        );
        // mov byte [0x300000], 1; mov byte [0x305000], 1; hlt  (long mode)
        let code = [
            0xc6, 0x04, 0x25, 0x00, 0x00, 0x30, 0x00, 0x01, 0xc6, 0x04, 0x25, 0x00, 0x50, 0x30,
            0x00, 0x01, 0xf4,
        ];
        vm.ram()
            .mem()
            .write_slice(&code, GuestAddress(0x1000))
            .unwrap();
        vm.set_boot_cpu(StartMode::Long {
            rip: 0x1000,
            rsi: 0,
            rsp: 0x8ff0,
        })
        .unwrap();
        let mut vm = vm;
        let v = &mut vm.vcpus_mut()[0];
        match v.run().unwrap() {
            VcpuExit::Hlt => {}
            e => panic!("unexpected exit {e:?}"),
        }
        let d = tracker.collect().unwrap();
        let pages: Vec<u64> = d
            .iter()
            .flat_map(|(base, bm)| {
                bm.iter().enumerate().flat_map(move |(i, w)| {
                    (0..64)
                        .filter(move |b| w & (1 << b) != 0)
                        .map(move |b| base / 4096 + i as u64 * 64 + b)
                })
            })
            .collect();
        assert!(pages.contains(&0x300), "{pages:x?}");
        assert!(pages.contains(&0x305), "{pages:x?}");
        assert!(!pages.contains(&0x304), "{pages:x?}");
        // Nothing written since: the next call is empty (the code page is only read).
        let again = tracker.collect().unwrap();
        let n: u32 = again
            .iter()
            .flat_map(|(_, b)| b)
            .map(|w| w.count_ones())
            .sum();
        assert_eq!(n, 0);
    }
}
