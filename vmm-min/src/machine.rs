//! Assembles a machine from its configuration: VM, platform devices (COM1, i8042, ACPI PM),
//! virtio-MMIO devices backed by vhost-user, ACPI tables, kernel; then runs it until the guest
//! powers off, resets, fails, or the control plane quits.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use kvm_ioctls::IoEventAddress;

use crate::acpi::{self, MmioDeviceInfo};
use crate::arch::layout::{
    ACPI_SLEEP_CTL_PORT, COM1_IRQ, COM1_PORT, I8042_PORT, VIRTIO_IRQ_BASE, VIRTIO_MMIO_BASE,
    VIRTIO_MMIO_SIZE,
};
use crate::boot::{self, BootError, BootSpec};
use crate::control::ExitReason;
use crate::devices::legacy::{AcpiPm, I8042};
use crate::devices::serial::{self, SerialDevice, SerialError, SerialSpec};
use crate::dirty_log::SharedLog;
use crate::qmp::QmpSpec;
use crate::state::{DeviceSet, LiveVm};
use crate::virtio::VirtioDevice;
use crate::virtio::mmio::MmioTransport;
use crate::virtio::vhost_user::{RamInfo, VhostUserDevice, VhostUserSpec};
use crate::vm::DirtyTracker;
use crate::vm::{Vm, VmConfig, VmError};

/// Errors building or running the machine.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// VM creation.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Kernel loading.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Console.
    #[error(transparent)]
    Serial(#[from] SerialError),
    /// A device could not be wired.
    #[error("{0}")]
    Device(String),
}

/// How the guest starts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StartFrom {
    /// Boot the kernel of [`MachineConfig::boot`].
    #[default]
    Boot,
    /// `--restore FILE`: load a snapshot file and resume the guest from it.
    Restore(std::path::PathBuf),
    /// `--incoming tcp:HOST:PORT`: receive a migration and resume the guest from it.
    Incoming(String),
}

/// Everything needed to run a machine.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    /// RAM bytes.
    pub memory: u64,
    /// vCPUs.
    pub cpus: u32,
    /// Kernel, initrd, command line.
    pub boot: BootSpec,
    /// Console.
    pub serial: SerialSpec,
    /// vhost-user devices (`--net`, `--disk`), in order.
    pub devices: Vec<VhostUserSpec>,
    /// Also describe the virtio devices with `virtio_mmio.device=` on the command line
    /// (for kernels built with VIRTIO_MMIO_CMDLINE_DEVICES).
    pub virtio_cmdline: bool,
    /// How long to wait for each backend socket to accept.
    pub connect_wait: std::time::Duration,
    /// QMP endpoint.
    pub qmp: Option<QmpSpec>,
    /// Boot, restore or incoming migration (the kernel is only loaded for [`StartFrom::Boot`]).
    pub start: StartFrom,
}

/// The built VM and the vhost-user dirty log its backends write (if any).
pub struct Built {
    /// The VM, ready to start.
    pub vm: Vm,
    /// The shared vhost-user dirty log, when backends log.
    pub log: Option<Arc<SharedLog>>,
    /// The devices with state (console, virtio-MMIO transports), for snapshots/migration.
    pub devices: DeviceSet,
    /// Starts console input (restore and incoming: after the state is restored).
    pub console_input: Option<Box<dyn FnOnce() + Send>>,
}

/// Builds the VM with its platform devices and loaded kernel, ready to start.
pub fn build(cfg: &MachineConfig) -> Result<Vm, MachineError> {
    build_with_log(cfg).map(|b| b.vm)
}

/// [`build`], also returning the shared dirty log.
pub fn build_with_log(cfg: &MachineConfig) -> Result<Built, MachineError> {
    crate::vm::warn_if_pvm();
    let mut vm = Vm::new(VmConfig {
        memory: cfg.memory,
        cpus: cfg.cpus,
        irqchip: true,
    })?;
    let control = vm.control().clone();

    let (out, input) = serial::open(&cfg.serial)?;
    let irq = EventFd::new(libc::EFD_NONBLOCK)
        .map_err(|e| MachineError::Device(format!("serial irq eventfd: {e}")))?;
    vm.fd()
        .register_irqfd(&irq, COM1_IRQ)
        .map_err(|e| MachineError::Device(format!("serial irqfd for IRQ {COM1_IRQ}: {e}")))?;
    let com1 = Arc::new(Mutex::new(SerialDevice::new(irq, out.clone())));
    let dev_err = |e: crate::devices::bus::BusError| MachineError::Device(e.to_string());
    vm.pio
        .insert(u64::from(COM1_PORT), 8, com1.clone())
        .map_err(dev_err)?;
    vm.pio
        .insert(
            u64::from(I8042_PORT),
            5,
            Arc::new(Mutex::new(I8042::new(control.clone()))),
        )
        .map_err(dev_err)?;
    vm.pio
        .insert(
            u64::from(ACPI_SLEEP_CTL_PORT),
            3,
            Arc::new(Mutex::new(AcpiPm::new(control.clone()))),
        )
        .map_err(dev_err)?;
    // A restored guest gets console input only once its state is in place (input arriving
    // earlier waits in the socket or pipe instead of landing in the not yet restored FIFO).
    let mut console_input = None;
    if cfg.start == StartFrom::Boot {
        serial::start_input(input, out, com1.clone());
    } else {
        let dev = com1.clone();
        console_input = Some(
            Box::new(move || serial::start_input(input, out, dev)) as Box<dyn FnOnce() + Send>
        );
    }
    let mut devset = DeviceSet {
        serial: Some((format!("serial@{COM1_PORT:#x}"), com1)),
        virtio: Vec::new(),
    };

    let mut infos = Vec::new();
    let ram_info = RamInfo::new(vm.ram());
    // With a control plane, backends log their writes to guest memory into one shared log.
    // On by default (VMM_MIN_VHOST_LOG=0 switches it off): each backend that offers LOG_SHMFD
    // is probed with SET_LOG_BASE at connect time; one that fails the probe (libvhost-user,
    // i.e. qemu-storage-daemon 7.2, answers with a reply vhost 0.18 does not expect) is
    // reconnected without the log and a warning says its writes are not tracked.
    let vhost_log = std::env::var_os("VMM_MIN_VHOST_LOG").is_none_or(|v| v != "0");
    let shared_log = if vhost_log && cfg.qmp.is_some() && !cfg.devices.is_empty() {
        Some(Arc::new(
            SharedLog::new(vm.ram().last_addr())
                .map_err(|e| MachineError::Device(e.to_string()))?,
        ))
    } else {
        None
    };
    let logged = Mutex::new(false);
    for (i, spec) in cfg.devices.iter().enumerate() {
        let base = VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE;
        let irq = VIRTIO_IRQ_BASE + i as u32;
        let mut dev = VhostUserDevice::connect(spec.clone(), ram_info.clone(), cfg.connect_wait)
            .map_err(|e| MachineError::Device(e.to_string()))?;
        if let Some(log) = &shared_log {
            if dev
                .set_dirty_log(log.clone())
                .map_err(|e| MachineError::Device(e.to_string()))?
            {
                *logged
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = true;
            } else {
                tracing::warn!(
                    socket = %spec.socket.display(),
                    "backend does not log dirty pages (no LOG_SHMFD or LOG_ALL, or SET_LOG_BASE failed): its writes are not tracked"
                );
            }
        }
        let qn = dev.queue_max_sizes().len();
        let mut kicks = Vec::new();
        for q in 0..qn {
            kicks.push(mmio_ioevent(
                &vm,
                base + crate::virtio::mmio::reg::QUEUE_NOTIFY,
                q as u32,
                &format!("queue {q}"),
            )?);
        }
        let call = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| MachineError::Device(format!("call eventfd: {e}")))?;
        vm.fd()
            .register_irqfd(&call, irq)
            .map_err(|e| MachineError::Device(format!("irqfd for IRQ {irq}: {e}")))?;
        let kind = match spec.kind {
            crate::virtio::vhost_user::Kind::Net => "virtio-net",
            crate::virtio::vhost_user::Kind::Block => "virtio-blk",
        };
        // The driver's interrupt handler acknowledges with the value it read from
        // InterruptStatus. With a backend that signals the irqfd itself, the used-ring bit
        // is always set there (see `MmioTransport`), so an acknowledgement of exactly that
        // bit changes nothing: KVM swallows it in the kernel (an ioeventfd nobody reads)
        // instead of a return to vmm-min per interrupt. Acknowledgements with the
        // configuration bit still reach the transport.
        let ack = if dev.signals_call_directly() {
            Some(mmio_ioevent(
                &vm,
                base + crate::virtio::mmio::reg::INTERRUPT_ACK,
                crate::virtio::mmio::INT_VRING,
                "InterruptACK",
            )?)
        } else {
            None
        };
        let mut transport = MmioTransport::new(Box::new(dev), kicks, call);
        transport.keep_eventfd(ack);
        let t = Arc::new(Mutex::new(transport));
        vm.mmio
            .insert(base, VIRTIO_MMIO_SIZE, t.clone())
            .map_err(dev_err)?;
        devset.virtio.push((format!("{kind}@{base:#x}"), t));
        infos.push(MmioDeviceInfo {
            base,
            len: 0x200,
            irq,
        });
    }
    // A restored or migrated guest gets RAM (tables, kernel) and registers from the source.
    if cfg.start == StartFrom::Boot {
        let rsdp = acpi::write_tables(vm.ram().mem(), cfg.cpus as u8, &infos)
            .map_err(|e| MachineError::Device(e.to_string()))?;
        let mut boot = cfg.boot.clone();
        if cfg.virtio_cmdline {
            for d in &infos {
                boot.cmdline
                    .push_str(&format!(" virtio_mmio.device=4K@{:#x}:{}", d.base, d.irq));
            }
        }
        let start = boot::load(vm.ram(), &boot, Some(rsdp))?;
        vm.set_boot_cpu(start)?;
    }
    let log = if *logged
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
    {
        shared_log
    } else {
        None
    };
    Ok(Built {
        vm,
        log,
        devices: devset,
        console_input,
    })
}

/// A new eventfd that KVM signals when the guest writes `datamatch` to MMIO address `addr`
/// (an ioeventfd: no exit to vmm-min); `what` names it in errors.
fn mmio_ioevent(vm: &Vm, addr: u64, datamatch: u32, what: &str) -> Result<EventFd, MachineError> {
    let fd = EventFd::new(libc::EFD_NONBLOCK)
        .map_err(|e| MachineError::Device(format!("eventfd for {what}: {e}")))?;
    vm.fd()
        .register_ioevent(&fd, &IoEventAddress::Mmio(addr), datamatch)
        .map_err(|e| MachineError::Device(format!("ioeventfd for {what}: {e}")))?;
    Ok(fd)
}

static TERM: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// An eventfd the signal handler writes to, so the watching thread sleeps until a signal
/// comes (-1 until created).
static TERM_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn on_term(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    TERM.store(true, std::sync::atomic::Ordering::SeqCst);
    let fd = TERM_FD.load(std::sync::atomic::Ordering::SeqCst);
    if fd >= 0 {
        let one = 1u64;
        // SAFETY: write(2) is async-signal-safe; fd is an eventfd that stays open for the
        // life of the process (never closed once published), and `one` is 8 valid bytes.
        unsafe { libc::write(fd, std::ptr::addr_of!(one).cast(), 8) };
    }
}

/// Makes SIGTERM and SIGINT stop the VM with [`ExitReason::Quit`].
///
/// The watching thread sleeps in poll(2) on an eventfd the handler writes, waking once a
/// second to notice the VM's end: in a nested set-up (the KVM lab) a thread that woke every
/// 50 ms cost about 4% of the CPU a network-bound guest had.
fn quit_on_signals(control: std::sync::Arc<crate::control::Control>) {
    static FD: std::sync::OnceLock<Option<EventFd>> = std::sync::OnceLock::new();
    let efd = FD.get_or_init(|| {
        let e = EventFd::new(libc::EFD_NONBLOCK).ok()?;
        TERM_FD.store(e.as_raw_fd(), std::sync::atomic::Ordering::SeqCst);
        Some(e)
    });
    let raw = efd.as_ref().map(|e| e.as_raw_fd());
    for s in [libc::SIGTERM, libc::SIGINT] {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(s, on_term) {
            tracing::warn!("cannot handle signal {s}: {e}");
        }
    }
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            loop {
                if TERM.load(std::sync::atomic::Ordering::SeqCst) {
                    control.request_exit(ExitReason::Quit);
                    return;
                }
                if control.exit_reason().is_some() {
                    return;
                }
                match raw {
                    Some(fd) => {
                        let mut p = libc::pollfd {
                            fd,
                            events: libc::POLLIN,
                            revents: 0,
                        };
                        // SAFETY: one valid pollfd; the eventfd lives in a static.
                        unsafe { libc::poll(&mut p, 1, 1000) };
                    }
                    None => std::thread::sleep(std::time::Duration::from_millis(50)),
                }
            }
        });
}

/// Builds and runs the machine to its end.
pub fn run(cfg: &MachineConfig) -> Result<ExitReason, MachineError> {
    let Built {
        vm,
        log,
        devices,
        mut console_input,
    } = build_with_log(cfg)?;
    quit_on_signals(vm.control().clone());
    let dirty = Arc::new(DirtyTracker::new(&vm).with_logs(log.into_iter().collect()));
    let live = Arc::new(LiveVm::new(&vm, devices, dirty));
    let (registry, _migration) = crate::qmp::registry(live.clone());
    let events = registry.events();
    let _server = match &cfg.qmp {
        Some(QmpSpec::Unix(p)) => Some(
            colo_proto::qmp::serve_unix(p, registry)
                .map_err(|e| MachineError::Device(format!("--qmp unix:{}: {e}", p.display())))?,
        ),
        Some(QmpSpec::Stdio) => Some(
            colo_proto::qmp::serve_stdio(registry)
                .map_err(|e| MachineError::Device(format!("--qmp stdio: {e}")))?,
        ),
        None => None,
    };
    let ram_file = vm.ram().file().clone();
    let running = match &cfg.start {
        StartFrom::Boot => vm.start()?,
        from => {
            // The vCPU threads start parked, get the saved state, then run.
            let control = vm.control().clone();
            control.start_paused();
            if matches!(from, StartFrom::Incoming(_)) {
                control.set_inmigrate(true);
            }
            let running = vm.start()?;
            let loaded = match from {
                StartFrom::Restore(path) => {
                    crate::state::format::load_file(path, &live.shape(), live.ram())
                        .map_err(|e| e.to_string())
                        .and_then(|snap| live.restore(&snap).map_err(|e| e.to_string()))
                        .map_err(|e| format!("--restore {}: {e}", path.display()))
                }
                StartFrom::Incoming(uri) => {
                    // In a thread, so that QMP `quit` or SIGTERM end the wait. The guest is
                    // started before the source is acknowledged.
                    let (tx, rx) = std::sync::mpsc::channel();
                    let (l, u) = (live.clone(), uri.clone());
                    let (l2, ev) = (live.clone(), events.clone());
                    let input = console_input.take();
                    let start: Box<dyn FnOnce() + Send> = Box::new(move || {
                        if let Some(start_input) = input {
                            start_input();
                        }
                        if let Err(e) = l2.resume() {
                            tracing::error!("resuming the migrated guest: {e}");
                        }
                        l2.announce();
                        ev.emit("RESUME", serde_json::json!({}));
                    });
                    std::thread::Builder::new()
                        .name("incoming".into())
                        .spawn(move || {
                            let _ = tx.send(crate::migrate::incoming(&u, &l, start));
                        })
                        .map_err(|e| MachineError::Device(format!("incoming thread: {e}")))?;
                    loop {
                        match rx.recv_timeout(std::time::Duration::from_millis(100)) {
                            Ok(r) => {
                                break r.map_err(|e| format!("incoming migration on {uri}: {e}"));
                            }
                            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                                if control.exit_reason().is_some() {
                                    let reason = running.wait();
                                    crate::qmp::emit_end(&events, &reason);
                                    std::thread::sleep(std::time::Duration::from_millis(100));
                                    return Ok(reason);
                                }
                            }
                            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                                break Err(format!(
                                    "incoming migration on {uri}: the receiving thread died"
                                ));
                            }
                        }
                    }
                }
                StartFrom::Boot => Ok(()),
            };
            if let Err(e) = loaded {
                control.request_exit(ExitReason::Error(e.clone()));
                let _ = running.wait();
                return Err(MachineError::Device(e));
            }
            if let StartFrom::Restore(_) = from {
                if let Some(start_input) = console_input.take() {
                    start_input();
                }
                if let Err(e) = live.resume() {
                    tracing::error!("resuming the restored guest: {e}");
                }
                live.announce();
                events.emit("RESUME", serde_json::json!({}));
            }
            running
        }
    };
    let reason = running.wait();
    // Debug aid: VMM_MIN_DUMP_RAM=PATH writes guest RAM (the memfd) to PATH at exit.
    if let Some(p) = std::env::var_os("VMM_MIN_DUMP_RAM") {
        let res = std::fs::File::create(&p).and_then(|mut out| {
            let mut f: &std::fs::File = &ram_file;
            std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0))?;
            std::io::copy(&mut f, &mut out)
        });
        if let Err(e) = res {
            tracing::warn!("VMM_MIN_DUMP_RAM: {e}");
        }
    }
    crate::qmp::emit_end(&events, &reason);
    // Give clients a moment to read the final events before the sockets close.
    std::thread::sleep(std::time::Duration::from_millis(100));
    Ok(reason)
}
