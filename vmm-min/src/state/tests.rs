//! Save/restore round trips with a tiny in-process guest on this host's KVM (PVM included: the
//! guest runs a few dozen instructions), and the format's refusals.

use kvm_ioctls::VcpuExit;
use vm_memory::{Bytes, GuestAddress};
use vm_superio::Serial;
use vm_superio::serial::{NoEvents, SerialState};
use vmm_sys_util::eventfd::EventFd;

use super::format::{self, FORMAT_VERSION, MAGIC};
use super::vcpu::{self, MSR_IA32_TSC};
use super::*;
use crate::arch::cpu::StartMode;
use crate::devices::serial::{IrqTrigger, SerialSnapshot};
use crate::vm::{Vm, VmConfig};

const MEM: u64 = 64 << 20;
const CODE: u64 = 0x4000;
const COUNTER: u64 = 0x5000;

fn new_vm(cpus: u32, irqchip: bool) -> Vm {
    Vm::new(VmConfig {
        memory: MEM,
        cpus,
        irqchip,
    })
    .unwrap()
}

/// Programs PIT channel 2 (count 0x1234), writes MSR IA32_SYSENTER_CS = 0x10, then loops:
/// `inc rcx; mov [0x5000],rcx; mov al,cl; out 0x10,al; jmp loop` (no SSE:
/// PVM's instruction emulator stops at it).
fn load_counter_guest(vm: &Vm) {
    let code = [
        // PIT channel 2 (gate low: it does not count, so no time-dependent output): lo/hi, mode 2.
        0xb0, 0xb4, 0xe6, 0x43, // mov al,0xb4; out 0x43,al
        0xb0, 0x34, 0xe6, 0x42, // mov al,0x34; out 0x42,al: count low
        0xb0, 0x12, 0xe6, 0x42, // mov al,0x12; out 0x42,al: count high
        0xb9, 0x74, 0x01, 0x00, 0x00, // mov ecx, 0x174 (IA32_SYSENTER_CS)
        0xb8, 0x10, 0x00, 0x00, 0x00, // mov eax, 0x10
        0x31, 0xd2, // xor edx, edx
        0x0f, 0x30, // wrmsr
        0x31, 0xc9, // xor ecx, ecx
        // loop:
        0x48, 0xff, 0xc1, // inc rcx
        0x48, 0x89, 0x0c, 0x25, 0x00, 0x50, 0x00, 0x00, // mov [0x5000], rcx
        0x88, 0xc8, // mov al, cl
        0xe6, 0x10, // out 0x10, al
        0xeb, 0xef, // jmp loop (-17)
    ];
    vm.ram()
        .mem()
        .write_slice(&code, GuestAddress(CODE))
        .unwrap();
    // A recognisable pattern elsewhere in RAM, high up.
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    vm.ram()
        .mem()
        .write_slice(&pattern, GuestAddress(MEM - 3 * 4096))
        .unwrap();
    vm.set_boot_cpu(StartMode::Long {
        rip: CODE,
        rsi: 0,
        rsp: 0x8ff0,
    })
    .unwrap();
}

/// Runs vCPU 0 until its next `out 0x10`; returns the byte.
fn next_out(vm: &mut Vm) -> u8 {
    let v = &mut vm.vcpus_mut()[0];
    loop {
        match v.run().unwrap() {
            VcpuExit::IoOut(0x10, data) => return data[0],
            VcpuExit::IoOut(..) | VcpuExit::IoIn(..) => {}
            e => panic!("unexpected exit {e:?}"),
        }
    }
}

fn counter(vm: &Vm) -> u64 {
    vm.ram().mem().read_obj(GuestAddress(COUNTER)).unwrap()
}

/// A 16550 with non-default registers and pending input.
fn busy_serial() -> Serial<IrqTrigger, NoEvents, Vec<u8>> {
    let mut s = Serial::new(IrqTrigger(EventFd::new(0).unwrap()), Vec::new());
    s.write(3, 0x83).unwrap(); // LCR: DLAB
    s.write(0, 0x0c).unwrap(); // DLL: 9600 baud
    s.write(1, 0x00).unwrap(); // DLM
    s.write(3, 0x03).unwrap(); // LCR: 8N1
    s.write(1, 0x01).unwrap(); // IER: received data available
    s.write(7, 0x5a).unwrap(); // SCR
    s.write(4, 0x0b).unwrap(); // MCR: DTR RTS OUT2
    s.enqueue_raw_bytes(b"hello").unwrap();
    s
}

/// The capture with the fields that move with host time zeroed (KVM clock, PIT load time, TSC):
/// everything else must be bit for bit identical after a restore.
fn normalized(snap: &VmSnapshot) -> String {
    let mut s = snap.clone();
    s.vm.clock = Default::default();
    if let Some(c) = &mut s.vm.irqchip {
        for ch in &mut c.pit.channels {
            ch.count_load_time = 0;
        }
    }
    for v in &mut s.vcpus {
        for m in &mut v.msrs {
            if m.index == MSR_IA32_TSC {
                m.data = 0;
            }
        }
    }
    serde_json::to_string_pretty(&s).unwrap()
}

fn first_difference(a: &str, b: &str) -> String {
    fn walk(p: String, a: &serde_json::Value, b: &serde_json::Value) -> Option<String> {
        use serde_json::Value::{Array, Object};
        match (a, b) {
            (Object(x), Object(y)) => x
                .iter()
                .find_map(|(k, v)| walk(format!("{p}.{k}"), v, y.get(k)?)),
            (Array(x), Array(y)) if x.len() == y.len() => x
                .iter()
                .zip(y)
                .enumerate()
                .find_map(|(i, (v, w))| walk(format!("{p}[{i}]"), v, w)),
            _ if a != b => Some(format!("{p}: {a} vs {b}")),
            _ => None,
        }
    }
    let a: serde_json::Value = serde_json::from_str(a).unwrap();
    let b: serde_json::Value = serde_json::from_str(b).unwrap();
    walk(String::new(), &a, &b).unwrap_or_else(|| "no difference found".into())
}

fn serial_id() -> String {
    "serial@0x3f8".into()
}

#[test]
fn state_round_trip_registers_memory_and_serial_survive_bit_for_bit() {
    // Source: run the counter guest 5 iterations.
    let mut a = new_vm(1, true);
    load_counter_guest(&a);
    for i in 1..=5u8 {
        assert_eq!(next_out(&mut a), i);
    }
    vcpu::complete_pending_io(&mut a.vcpus_mut()[0]).unwrap();
    let serial = busy_serial();
    let devices = vec![DeviceState::Serial {
        id: serial_id(),
        state: SerialSnapshot::from(&serial.state()),
    }];
    let t = std::time::Instant::now();
    let snap_a = capture_vm(&mut a, devices).unwrap();
    eprintln!("capture_vm (1 vCPU, irqchip): {:?}", t.elapsed());
    let v0 = &snap_a.vcpus[0];
    assert_eq!(v0.regs.rcx, 5);
    assert!(v0.lapic.is_some());
    assert!(v0.msrs.len() > 10, "only {} MSRs captured", v0.msrs.len());
    assert!(v0.msr(MSR_IA32_TSC).is_some(), "TSC among the MSRs");
    assert_eq!(v0.msr(0x174), Some(0x10), "the guest's WRMSR is captured");
    let pit = &snap_a.vm.irqchip.as_ref().unwrap().pit.channels[2];
    assert_eq!(pit.count, 0x1234, "the guest's PIT programming is captured");
    assert_eq!(pit.mode, 2);

    let mut file = Vec::new();
    let n = format::write_snapshot(&mut file, &snap_a, a.ram()).unwrap();
    assert_eq!(n, file.len() as u64);
    // Zero pages are not written: the stream is far smaller than RAM.
    assert!(file.len() < (1 << 20), "stream is {} bytes", file.len());

    // Destination: a new VM of the same shape.
    let mut b = new_vm(1, true);
    let shape = shape_of(&b, vec![serial_id()]);
    let snap_in = format::read_snapshot(&file[..], &shape, b.ram()).unwrap();
    let t = std::time::Instant::now();
    restore_vm(&mut b, &snap_in).unwrap();
    eprintln!(
        "restore_vm: {:?}; stream {} bytes ({} MSRs)",
        t.elapsed(),
        file.len(),
        snap_in.vcpus[0].msrs.len()
    );
    let DeviceState::Serial { state, .. } = &snap_in.devices[0] else {
        panic!("serial state expected");
    };
    let serial_b = Serial::from_state(
        &SerialState::from(state),
        IrqTrigger(EventFd::new(0).unwrap()),
        NoEvents,
        Vec::new(),
    )
    .unwrap();
    assert_eq!(
        SerialSnapshot::from(&serial_b.state()),
        SerialSnapshot::from(&serial.state()),
        "serial registers and pending input survive"
    );

    // Memory: every byte of RAM identical.
    let mut ma = vec![0u8; MEM as usize];
    let mut mb = vec![0u8; MEM as usize];
    a.ram().mem().read_slice(&mut ma, GuestAddress(0)).unwrap();
    b.ram().mem().read_slice(&mut mb, GuestAddress(0)).unwrap();
    assert!(ma == mb, "guest RAM differs after restore");

    // Registers and every other KVM state: a capture of the restored VM equals the original.
    let snap_b = capture_vm(
        &mut b,
        vec![DeviceState::Serial {
            id: serial_id(),
            state: SerialSnapshot::from(&serial_b.state()),
        }],
    )
    .unwrap();
    let (na, nb) = (normalized(&snap_a), normalized(&snap_b));
    assert!(na == nb, "state differs: {}", first_difference(&na, &nb));
    // Time-based fields only moved forward.
    let tsc_a = snap_a.vcpus[0].msr(MSR_IA32_TSC).unwrap();
    let tsc_b = snap_b.vcpus[0].msr(MSR_IA32_TSC).unwrap();
    assert!(tsc_b >= tsc_a, "TSC went back: {tsc_a} -> {tsc_b}");
    assert!(
        tsc_b - tsc_a < 60 * 10_000_000_000,
        "TSC jumped: {tsc_a} -> {tsc_b}"
    );
    assert!(snap_b.vm.clock.clock >= snap_a.vm.clock.clock);

    // The guest continues on the destination from where it was captured...
    for i in 6..=8u8 {
        assert_eq!(next_out(&mut b), i);
    }
    assert_eq!(counter(&b), 8);
    // ...and the source is unharmed by the capture.
    assert_eq!(next_out(&mut a), 6);
    assert_eq!(counter(&a), 6);
}

#[test]
fn state_round_trip_of_a_vm_without_irqchip_and_two_vcpus() {
    two_vcpus(false);
}

#[test]
fn state_round_trip_of_two_vcpus_with_an_ap_waiting_for_sipi() {
    two_vcpus(true);
}

fn two_vcpus(irqchip: bool) {
    let mut a = new_vm(2, irqchip);
    load_counter_guest(&a);
    assert_eq!(next_out(&mut a), 1);
    vcpu::complete_pending_io(&mut a.vcpus_mut()[0]).unwrap();
    let snap_a = capture_vm(&mut a, Vec::new()).unwrap();
    assert_eq!(snap_a.vm.irqchip.is_some(), irqchip);
    assert_eq!(snap_a.vcpus.len(), 2);
    if irqchip {
        // The AP never got INIT/SIPI.
        assert_ne!(
            snap_a.vcpus[1].mp_state.mp_state,
            kvm_bindings::KVM_MP_STATE_RUNNABLE
        );
    }
    let mut file = Vec::new();
    format::write_snapshot(&mut file, &snap_a, a.ram()).unwrap();
    let mut b = new_vm(2, irqchip);
    let snap_in = format::read_snapshot(&file[..], &shape_of(&b, Vec::new()), b.ram()).unwrap();
    restore_vm(&mut b, &snap_in).unwrap();
    let snap_b = capture_vm(&mut b, Vec::new()).unwrap();
    let (na, nb) = (normalized(&snap_a), normalized(&snap_b));
    assert!(na == nb, "state differs: {}", first_difference(&na, &nb));
    assert_eq!(next_out(&mut b), 2);
    assert_eq!(counter(&b), 2);
}

/// A valid stream of a small idle VM, and that VM's shape.
fn idle_stream() -> (Vec<u8>, VmShape) {
    let mut a = new_vm(1, true);
    load_counter_guest(&a);
    let snap = capture_vm(&mut a, Vec::new()).unwrap();
    let mut file = Vec::new();
    format::write_snapshot(&mut file, &snap, a.ram()).unwrap();
    (file, snap.shape)
}

fn read(file: &[u8], shape: &VmShape) -> Result<VmSnapshot, FormatError> {
    let ram = crate::memory::GuestRam::new(shape.memory).unwrap();
    format::read_snapshot(file, shape, &ram)
}

#[test]
fn state_format_refuses_bad_magic_and_other_versions() {
    let (file, shape) = idle_stream();
    assert!(read(&file, &shape).is_ok());

    let mut bad = file.clone();
    bad[0..8].copy_from_slice(b"QEVM\0\0\0\x03");
    let e = read(&bad, &shape).unwrap_err();
    assert!(matches!(e, FormatError::BadMagic { .. }), "{e}");
    assert!(e.to_string().contains("COLOVMST"), "{e}");

    let mut v2 = file.clone();
    v2[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    let e = read(&v2, &shape).unwrap_err();
    assert!(
        matches!(e, FormatError::Version { found, expected } if found == FORMAT_VERSION + 1 && expected == FORMAT_VERSION),
        "{e}"
    );

    let e = read(b"", &shape).unwrap_err();
    assert!(matches!(e, FormatError::Truncated { .. }), "{e}");
    assert!(file.starts_with(MAGIC));
}

#[test]
fn state_format_refuses_a_vm_of_another_shape() {
    let (file, shape) = idle_stream();
    let bigger = VmShape {
        memory: shape.memory * 2,
        ..shape.clone()
    };
    let b = Vm::new(VmConfig {
        memory: bigger.memory,
        cpus: 1,
        irqchip: true,
    })
    .unwrap();
    let e = format::read_snapshot(&file[..], &bigger, b.ram()).unwrap_err();
    assert!(matches!(e, FormatError::Shape { .. }), "{e}");
    assert!(e.to_string().contains("does not match"), "{e}");

    let two = VmShape {
        cpus: 2,
        ..shape.clone()
    };
    let e = read(&file, &two).unwrap_err();
    assert!(matches!(e, FormatError::Shape { .. }), "{e}");

    let with_dev = VmShape {
        devices: vec!["virtio-net@0xd0000000".into()],
        ..shape.clone()
    };
    let e = read(&file, &with_dev).unwrap_err();
    assert!(matches!(e, FormatError::Shape { .. }), "{e}");

    // restore_vm refuses too, before touching KVM.
    let (file, _) = idle_stream();
    let mut b = new_vm(1, true);
    let snap = format::read_snapshot(&file[..], &shape, b.ram()).unwrap();
    let mut c = new_vm(2, true);
    let e = restore_vm(&mut c, &snap).unwrap_err();
    assert!(
        matches!(e, StateError::Format(FormatError::Shape { .. })),
        "{e}"
    );
    assert!(restore_vm(&mut b, &snap).is_ok());
}

#[test]
fn state_format_refuses_truncated_and_corrupt_streams() {
    let (file, shape) = idle_stream();
    let json_len = u64::from_le_bytes(file[12..20].try_into().unwrap()) as usize;
    let cuts = [
        4,                   // in the magic
        10,                  // in the version
        15,                  // in the state length
        20 + json_len / 2,   // in the state
        20 + json_len + 4,   // in a page header
        20 + json_len + 100, // in a page
        file.len() - 12,     // in the end marker
        file.len() - 1,      // in the checksum
    ];
    for cut in cuts {
        let e = read(&file[..cut], &shape).unwrap_err();
        assert!(
            matches!(e, FormatError::Truncated { .. }),
            "cut at {cut}: {e}"
        );
    }
    // A flipped bit in a page is caught by the checksum.
    let mut bad = file.clone();
    bad[20 + json_len + 8 + 17] ^= 0x10;
    let e = read(&bad, &shape).unwrap_err();
    assert!(matches!(e, FormatError::Checksum { .. }), "{e}");
    // A page outside RAM.
    let mut bad = file.clone();
    bad[20 + json_len..20 + json_len + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let e = read(&bad, &shape).unwrap_err();
    assert!(matches!(e, FormatError::BadPage { .. }), "{e}");
    // Garbage in the state section.
    let mut bad = file.clone();
    bad[20] = b'!';
    let e = read(&bad, &shape).unwrap_err();
    assert!(matches!(e, FormatError::Json(_)), "{e}");
    // An absurd state length.
    let mut bad = file.clone();
    bad[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
    let e = read(&bad, &shape).unwrap_err();
    assert!(matches!(e, FormatError::StateTooLarge(_)), "{e}");
}

#[test]
fn state_format_every_single_byte_corruption_is_refused_without_panic() {
    let (file, shape) = idle_stream();
    // Deterministic positions over the whole stream, plus every header byte.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut positions: Vec<usize> = (0..20).collect();
    for _ in 0..400 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        positions.push((seed % file.len() as u64) as usize);
    }
    for pos in positions {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut bad = file.clone();
            bad[pos] ^= flip;
            assert!(
                read(&bad, &shape).is_err(),
                "byte {pos} ^ {flip:#x} was accepted"
            );
        }
    }
}

#[test]
fn state_snapshot_file_round_trip_and_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.colovmst");
    let mut a = new_vm(1, true);
    load_counter_guest(&a);
    assert_eq!(next_out(&mut a), 1);
    vcpu::complete_pending_io(&mut a.vcpus_mut()[0]).unwrap();
    let snap = capture_vm(&mut a, Vec::new()).unwrap();
    let n = format::save_file(&path, &snap, a.ram()).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), n);
    assert!(!dir.path().join("vm.colovmst.tmp").exists());
    let mut b = new_vm(1, true);
    let loaded = format::load_file(&path, &snap.shape, b.ram()).unwrap();
    restore_vm(&mut b, &loaded).unwrap();
    assert_eq!(next_out(&mut b), 2);
    let e = format::load_file(&dir.path().join("absent"), &snap.shape, b.ram()).unwrap_err();
    assert!(matches!(e, FormatError::File { .. }), "{e}");
    assert!(e.to_string().contains("absent"), "{e}");
}

#[test]
fn state_virtio_mmio_slot_survives_the_format() {
    use crate::virtio::QueueState;
    use crate::virtio::mmio::MmioState;
    let mut a = new_vm(1, true);
    let mut snap = capture_vm(&mut a, Vec::new()).unwrap();
    let transport = MmioState {
        status: 0xf,
        driver_features: 0x1_3000_0020,
        queue_sel: 1,
        queues: vec![
            QueueState {
                max_size: 256,
                size: 128,
                ready: true,
                desc: 0x10_0000,
                avail: 0x10_1000,
                used: 0x10_2000,
            };
            2
        ],
        interrupt_status: 1,
        config_generation: 3,
        activated: true,
        ..Default::default()
    };
    let dev = DeviceState::VirtioMmio {
        id: "virtio-net@0xd0000000".into(),
        transport,
        vring_bases: vec![17, 4242],
    };
    snap.devices.push(dev.clone());
    snap.shape.devices.push(dev.id().to_string());
    let mut file = Vec::new();
    format::write_snapshot(&mut file, &snap, a.ram()).unwrap();
    let back = read(&file, &snap.shape).unwrap();
    assert_eq!(back.devices, vec![dev]);
    // A stream whose device list differs from its states is refused before writing.
    let mut bad = snap.clone();
    bad.shape.devices.clear();
    let e = format::write_snapshot(Vec::new(), &bad, a.ram()).unwrap_err();
    assert!(matches!(e, FormatError::Inconsistent(_)), "{e}");
}

#[test]
fn state_migration_over_tcp_loopback_two_passes_then_state() {
    use super::migration::{self, StreamWriter};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = std::thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        let mut b = new_vm(1, true);
        let shape = shape_of(&b, Vec::new());
        let (snap, stats) =
            migration::receive(std::io::BufReader::new(sock), &shape, b.ram()).unwrap();
        restore_vm(&mut b, &snap).unwrap();
        let outs: Vec<u8> = (0..3).map(|_| next_out(&mut b)).collect();
        (outs, counter(&b), stats)
    });

    let mut a = new_vm(1, true);
    load_counter_guest(&a);
    assert_eq!(next_out(&mut a), 1);
    let sock = std::net::TcpStream::connect(addr).unwrap();
    let shape = shape_of(&a, Vec::new());
    let mut w = StreamWriter::start(std::io::BufWriter::new(sock), &shape).unwrap();
    // Pass 1: all of RAM (the tracker's first collect reports every page and starts logging).
    let tracker = crate::vm::DirtyTracker::new(&a);
    let pass1 = migration::pages_from_bitmaps(&tracker.collect().unwrap());
    assert_eq!(pass1, migration::all_pages(a.ram()));
    w.send_pages(a.ram(), &pass1).unwrap();
    let after_pass1 = w.stats();
    assert_eq!(
        after_pass1.pages + after_pass1.zero_pages,
        MEM / format::PAGE_SIZE
    );
    assert!(
        after_pass1.bytes < 1 << 20,
        "zero pages are not sent as 4 KiB: {after_pass1:?}"
    );
    // The guest runs on and dirties its counter page; pass 2 sends what KVM logged.
    for i in 2..=4u8 {
        assert_eq!(next_out(&mut a), i);
    }
    let pass2 = migration::pages_from_bitmaps(&tracker.collect().unwrap());
    assert!(pass2.contains(&COUNTER), "dirty pages {pass2:x?}");
    assert!(pass2.len() < 16, "dirty pages {pass2:x?}");
    w.send_pages(a.ram(), &pass2).unwrap();
    // Stop: finish the pending OUT, capture, send the state.
    vcpu::complete_pending_io(&mut a.vcpus_mut()[0]).unwrap();
    let snap = capture_vm(&mut a, Vec::new()).unwrap();
    let (_sock, stats) = w.finish(&snap).unwrap();
    let (outs, count, rstats) = dest.join().unwrap();
    assert_eq!(
        outs,
        vec![5, 6, 7],
        "the guest continues on the destination"
    );
    assert_eq!(count, 7);
    assert_eq!(rstats.pages, stats.pages);
    assert_eq!(rstats.zero_pages, stats.zero_pages);
    eprintln!("migration stream: {stats:?}");
}

#[test]
fn state_migration_stream_cut_or_for_another_vm_is_refused() {
    use super::migration::{self, StreamWriter};
    let mut a = new_vm(1, true);
    load_counter_guest(&a);
    let shape = shape_of(&a, Vec::new());
    let mut w = StreamWriter::start(Vec::new(), &shape).unwrap();
    w.send_pages(a.ram(), &[CODE, COUNTER, MEM - 3 * 4096])
        .unwrap();
    let snap = capture_vm(&mut a, Vec::new()).unwrap();
    let (stream, _) = w.finish(&snap).unwrap();
    let recv = |s: &[u8], shape: &VmShape| {
        let ram = crate::memory::GuestRam::new(shape.memory).unwrap();
        migration::receive(s, shape, &ram)
    };
    assert!(recv(&stream, &shape).is_ok());
    // Cut anywhere: never a state.
    for cut in (0..stream.len()).step_by(97).chain([stream.len() - 1]) {
        let e = recv(&stream[..cut], &shape).unwrap_err();
        assert!(matches!(e, FormatError::Truncated { .. }), "cut {cut}: {e}");
    }
    // Another VM: refused from the header, before any page.
    let other = VmShape {
        cpus: 4,
        ..shape.clone()
    };
    let e = recv(&stream, &other).unwrap_err();
    assert!(matches!(e, FormatError::Shape { .. }), "{e}");
    // A snapshot file is not a migration stream.
    let mut file = Vec::new();
    format::write_snapshot(&mut file, &snap, a.ram()).unwrap();
    let e = recv(&file, &shape).unwrap_err();
    assert!(matches!(e, FormatError::BadMagic { .. }), "{e}");
    // Pages but no state, then END: refused.
    let mut w = StreamWriter::start(Vec::new(), &shape).unwrap();
    w.send_pages(a.ram(), &[CODE]).unwrap();
    let mut s = w.w_into_inner_for_test();
    let sum = {
        let mut f = format::Fnv::new();
        f.update(&s);
        f.update(&[3]);
        f.value()
    };
    s.push(3);
    s.extend_from_slice(&sum.to_le_bytes());
    let e = recv(&s, &shape).unwrap_err();
    assert!(matches!(e, FormatError::MissingState), "{e}");
    // A corrupt byte anywhere.
    let mut bad = stream.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x04;
    assert!(recv(&bad, &shape).is_err());
}

/// The counter in guest RAM as the running guest sees it.
fn live_counter(live: &LiveVm) -> u64 {
    live.ram().mem().read_obj(GuestAddress(COUNTER)).unwrap()
}

fn wait_counter(live: &LiveVm, above: u64) -> u64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let c = live_counter(live);
        if c > above {
            return c;
        }
        assert!(std::time::Instant::now() < deadline, "guest stuck at {c}");
        std::thread::yield_now();
    }
}

fn ram_copy(live: &LiveVm) -> Vec<u8> {
    let mut m = vec![0u8; MEM as usize];
    live.ram()
        .mem()
        .read_slice(&mut m, GuestAddress(0))
        .unwrap();
    m
}

#[test]
fn live_vm_running_guest_is_captured_and_restored_in_its_vcpu_threads() {
    use crate::devices::bus::BusDevice;
    use crate::devices::serial::{SerialDevice, SerialSpec};
    use std::sync::{Arc, Mutex};

    let vm = new_vm(2, true);
    load_counter_guest(&vm);
    let (out, _input) = crate::devices::serial::open(&SerialSpec::Null).unwrap();
    let serial = Arc::new(Mutex::new(SerialDevice::new(
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        out,
    )));
    {
        let mut s = serial.lock().unwrap();
        s.write(3, &[0x03]); // LCR 8N1
        s.write(1, &[0x01]); // IER
        s.write(7, &[0x5a]); // SCR
        s.enqueue(b"abc");
    }
    let devices = DeviceSet {
        serial: Some((serial_id(), serial.clone())),
        virtio: Vec::new(),
    };
    let dirty = std::sync::Arc::new(crate::vm::DirtyTracker::new(&vm));
    let live = LiveVm::new(&vm, devices, dirty);
    let running = vm.start().unwrap();

    // Captured while running: the vCPU threads capture themselves, the guest stays paused.
    wait_counter(&live, 50);
    let snap1 = live.pause_and_capture().unwrap();
    assert_eq!(live.control().run_state(), crate::control::RunState::Paused);
    let c1 = live_counter(&live);
    let rcx = snap1.vcpus[0].regs.rcx;
    assert!(rcx == c1 || rcx == c1 + 1, "rcx {rcx}, counter {c1}");
    assert_eq!(snap1.vcpus.len(), 2);
    assert_eq!(snap1.vcpus[0].msr(0x174), Some(0x10));
    assert_eq!(snap1.devices.len(), 1);
    let ram1 = ram_copy(&live);
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(live_counter(&live), c1, "paused guest does not run");

    // Let it run on, change the console, then stop it and put the first state back.
    live.resume().unwrap();
    let later = wait_counter(&live, c1 + 5000);
    serial.lock().unwrap().write(7, &[0xa5]);
    live.pause_and_capture().unwrap();
    live.ram()
        .mem()
        .write_slice(&ram1, GuestAddress(0))
        .unwrap();
    live.restore(&snap1).unwrap();

    // Bit for bit: registers and all KVM state, RAM, the console.
    let snap2 = live.pause_and_capture().unwrap();
    let (n1, n2) = (normalized(&snap1), normalized(&snap2));
    assert!(n1 == n2, "state differs: {}", first_difference(&n1, &n2));
    assert!(ram_copy(&live) == ram1, "RAM differs after restore");
    assert_eq!(snap2.devices, snap1.devices, "console state restored");
    let mut scr = [0u8];
    serial.lock().unwrap().read(7, &mut scr);
    assert_eq!(scr[0], 0x5a);

    // The guest goes on from the restored counter, not from where it was stopped.
    live.resume().unwrap();
    let first = wait_counter(&live, c1);
    assert!(
        first < later,
        "restored guest resumed at {first}, before the restore it was at {later}"
    );
    wait_counter(&live, first + 100);
    running
        .control()
        .request_exit(crate::control::ExitReason::Quit);
    assert_eq!(running.wait(), crate::control::ExitReason::Quit);
}

#[test]
fn state_checksum_does_not_depend_on_how_the_data_is_split() {
    let data: Vec<u8> = (0..1000u32).map(|i| (i * 31 + 7) as u8).collect();
    let mut whole = format::Fnv::new();
    whole.update(&data);
    for split in [1usize, 3, 7, 8, 9, 13, 64, 999] {
        let mut f = format::Fnv::new();
        for c in data.chunks(split) {
            f.update(c);
        }
        assert_eq!(f.value(), whole.value(), "split {split}");
    }
    // Aligned and unaligned starts (fast and slow paths) agree.
    let words: Vec<u64> = vec![0x0123_4567_89ab_cdef; 130];
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let mut aligned = format::Fnv::new();
    // SAFETY: u64 to bytes, the slice stays within `words`.
    aligned.update(unsafe { words.align_to::<u8>().1 });
    let mut unaligned = format::Fnv::new();
    let mut buf = vec![0u8; bytes.len() + 1];
    buf[1..].copy_from_slice(&bytes);
    unaligned.update(&buf[1..]);
    assert_eq!(aligned.value(), unaligned.value());
    let mut bad = data.clone();
    bad[500] ^= 0x80;
    let mut f = format::Fnv::new();
    f.update(&bad);
    assert_ne!(f.value(), whole.value());
    let mut short = format::Fnv::new();
    short.update(&data[..999]);
    assert_ne!(short.value(), whole.value());
    assert!(format::is_zero_page(&[0u8; 4096]));
    let mut p = [0u8; 4096];
    p[4095] = 1;
    assert!(!format::is_zero_page(&p));
}

#[test]
fn state_migration_zero_records_clear_written_and_data_pages_but_skip_holes() {
    use super::migration::{self, StreamWriter};
    let page = format::PAGE_SIZE;
    let (p, q, r, s, h) = (
        MEM - 8 * page,
        MEM - 6 * page,
        MEM - 4 * page,
        MEM - 3 * page,
        MEM - 2 * page,
    );
    let mut a = new_vm(1, true);
    let shape = shape_of(&a, Vec::new());
    for gpa in [p, q] {
        a.ram()
            .mem()
            .write_slice(&[0xaa; 4096], GuestAddress(gpa))
            .unwrap();
    }
    let mut w = StreamWriter::start(Vec::new(), &shape).unwrap();
    // Pass 1: P and Q with content, R and H as zero records.
    w.send_pages(a.ram(), &[p, q, r, h]).unwrap();
    // The guest clears P and Q: pass 2 sends them (and H again) as zero records.
    for gpa in [p, q] {
        a.ram()
            .mem()
            .write_slice(&[0u8; 4096], GuestAddress(gpa))
            .unwrap();
    }
    w.send_pages(a.ram(), &[p, h, q]).unwrap();
    let snap = capture_vm(&mut a, Vec::new()).unwrap();
    let (bytes, stats) = w.finish(&snap).unwrap();
    assert_eq!((stats.pages, stats.zero_pages), (2, 5));

    // The destination's RAM already holds data in R and S (not a fresh memfd).
    let b = new_vm(1, true);
    for gpa in [r, s] {
        b.ram()
            .mem()
            .write_slice(&[0x55; 4096], GuestAddress(gpa))
            .unwrap();
    }
    let (_snap, rstats) = migration::receive(&bytes[..], &shape, b.ram()).unwrap();
    assert_eq!((rstats.pages, rstats.zero_pages), (2, 5));
    let read = |gpa: u64| {
        let mut buf = vec![0u8; 4096];
        b.ram()
            .mem()
            .read_slice(&mut buf, GuestAddress(gpa))
            .unwrap();
        buf
    };
    for gpa in [p, q, r, h] {
        assert!(read(gpa).iter().all(|&x| x == 0), "page {gpa:#x} not zero");
    }
    assert!(
        read(s).iter().all(|&x| x == 0x55),
        "page S was not in the stream"
    );
}

/// A reader that remembers the largest buffer it was asked to fill.
struct LargestRead<'a> {
    data: &'a [u8],
    largest: usize,
}

impl std::io::Read for LargestRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.largest = self.largest.max(buf.len());
        self.data.read(buf)
    }
}

/// A length field claiming the largest state (64 MiB) in front of a few bytes: refused as
/// truncated, and the readers never ask for (so never allocate) more than a read chunk (the
/// migration reader: its 2 MiB buffer) at once. Found while writing the vmm-min fuzz targets:
/// the whole claimed length was allocated before the first byte of it was read.
#[test]
fn state_length_fields_do_not_allocate_what_they_claim() {
    let shape = VmShape {
        memory: crate::memory::MIN_MEMORY,
        cpus: 1,
        irqchip: true,
        devices: Vec::new(),
    };
    let ram = crate::memory::GuestRam::new(shape.memory).unwrap();
    let mut file = Vec::new();
    file.extend_from_slice(MAGIC);
    file.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    file.extend_from_slice(&format::MAX_STATE_LEN.to_le_bytes());
    file.extend_from_slice(b"{\"shape\":");
    let mut r = LargestRead {
        data: &file,
        largest: 0,
    };
    let e = format::read_snapshot(&mut r, &shape, &ram).unwrap_err();
    assert!(matches!(e, FormatError::Truncated { .. }), "{e}");
    assert!(r.largest <= format::READ_CHUNK, "{}", r.largest);

    let json = serde_json::to_vec(&shape).unwrap();
    let mut stream = Vec::new();
    stream.extend_from_slice(super::migration::MIGRATION_MAGIC);
    stream.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    stream.extend_from_slice(&(json.len() as u64).to_le_bytes());
    stream.extend_from_slice(&json);
    stream.push(2); // STATE
    stream.extend_from_slice(&format::MAX_STATE_LEN.to_le_bytes());
    stream.extend_from_slice(b"{\"shape\":");
    let mut r = LargestRead {
        data: &stream,
        largest: 0,
    };
    let e = super::migration::receive(&mut r, &shape, &ram).unwrap_err();
    assert!(matches!(e, FormatError::Truncated { .. }), "{e}");
    assert!(
        r.largest <= super::migration::IO_BUFFER,
        "{} bytes asked at once",
        r.largest
    );
}
