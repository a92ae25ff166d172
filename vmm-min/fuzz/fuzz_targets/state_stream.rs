//! The state format readers: snapshot files (`state::format::read_snapshot`, what
//! `--restore FILE` runs) and migration streams (`state::migration::receive`, what
//! `--incoming tcp:` runs), into a 16 MiB guest RAM of a fixed shape (1 vCPU, irqchip, a
//! serial console).
//!
//! Input: byte 0 selects the mode. Bit 0: snapshot file (0) or migration stream (1). Bit 1:
//! raw (the rest is the whole stream) or template: a valid stream of that kind is built once
//! (a snapshot with a few pages of content; a migration stream with PAGES, SYNC, STOPPED,
//! STATE and END) and the rest of the input is a list of edits, 3 bytes each (offset u16 LE,
//! scaled to the stream's length, and the new byte); with bit 2 the stream is also cut at the
//! last edit's offset. Checks: no panic, no hang, no allocation beyond libFuzzer's RSS limit;
//! an unedited template reads back `Ok`; whatever is `Ok` has the reader's shape and is
//! consistent.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm_min::memory::{GuestRam, MIN_MEMORY};
use vmm_min::state::format::{DeviceState, VmShape, VmSnapshot, read_snapshot, write_snapshot};
use vmm_min::state::migration::{StreamWriter, receive};
use vmm_min::state::vcpu::{FpuState, VcpuState};
use vmm_min::state::vm::{IrqchipState, VmState};

/// Writes a recognisable pattern into the page at `gpa`.
fn write_pattern(ram: &GuestRam, gpa: u64) {
    let page: Vec<u8> = (0..4096u32).map(|i| (i * 7 + gpa as u32) as u8).collect();
    ram.mem()
        .write_slice(&page, GuestAddress(gpa))
        .expect("page inside RAM");
}

const SERIAL: &str = "serial@0x3f8";

fn shape() -> VmShape {
    VmShape {
        memory: MIN_MEMORY,
        cpus: 1,
        irqchip: true,
        devices: vec![SERIAL.into()],
    }
}

fn snapshot() -> VmSnapshot {
    let (out, _input) = vmm_min::devices::serial::open(&vmm_min::devices::serial::SerialSpec::Null)
        .expect("null serial");
    let irq = vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd");
    let mut serial = vmm_min::devices::serial::SerialDevice::new(irq, out);
    serial.enqueue(b"abc");
    VmSnapshot {
        shape: shape(),
        vm: VmState {
            irqchip: Some(IrqchipState {
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
                pit: Default::default(),
            }),
            clock: Default::default(),
        },
        vcpus: vec![VcpuState {
            id: 0,
            mp_state: Default::default(),
            regs: kvm_bindings::kvm_regs {
                rip: 0xfff0,
                rflags: 2,
                ..Default::default()
            },
            sregs: Default::default(),
            fpu: FpuState::from(&kvm_bindings::kvm_fpu::default()),
            xsave: vec![0; 1024],
            xcrs: Default::default(),
            debug_regs: Default::default(),
            lapic: Some(Default::default()),
            tsc_khz: 1_000_000,
            msrs: vec![vmm_min::state::vcpu::MsrValue {
                index: 0x10,
                data: 1234,
            }],
            events: Default::default(),
        }],
        devices: vec![DeviceState::serial(SERIAL, &serial)],
    }
}

struct Fixture {
    ram: GuestRam,
    snapshot: Vec<u8>,
    migration: Vec<u8>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let ram = GuestRam::new(MIN_MEMORY).expect("guest RAM");
        let content = [0x1000u64, 0x2000, 0x8000, MIN_MEMORY - 4096];
        for &gpa in &content {
            write_pattern(&ram, gpa);
        }
        let snap = snapshot();
        let mut snapshot = Vec::new();
        write_snapshot(&mut snapshot, &snap, &ram).expect("template snapshot");
        let mut w = StreamWriter::start(Vec::new(), &shape()).expect("migration start");
        w.send_pages(&ram, &[0x1000, 0x2000, 0x3000, 0x4000])
            .expect("pages");
        w.sync().expect("sync");
        w.send_pages(&ram, &[0x8000, MIN_MEMORY - 4096, 0x5000])
            .expect("pages");
        w.stopping().expect("stopped");
        let (migration, _) = w.finish(&snap).expect("migration finish");
        Fixture {
            ram,
            snapshot,
            migration,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let fx = fixture();
    let migration = mode & 1 != 0;
    let stream: Vec<u8> = if mode & 2 == 0 {
        rest.to_vec()
    } else {
        let mut s = if migration {
            fx.migration.clone()
        } else {
            fx.snapshot.clone()
        };
        let mut last = s.len();
        for e in rest.chunks_exact(3) {
            let off = usize::from(u16::from_le_bytes([e[0], e[1]])) * s.len() / 65536;
            s[off] = e[2];
            last = off;
        }
        if mode & 4 != 0 {
            s.truncate(last);
        }
        s
    };
    let unedited = mode & 2 != 0 && rest.len() < 3;
    let ours = shape();
    let r = if migration {
        receive(&stream[..], &ours, &fx.ram).map(|(s, _)| s)
    } else {
        read_snapshot(&stream[..], &ours, &fx.ram)
    };
    match r {
        Ok(snap) => {
            assert_eq!(snap.shape, ours);
            snap.check_consistent().expect("Ok means consistent");
        }
        Err(e) => {
            assert!(!unedited, "the unedited template is refused: {e}");
            let _ = e.to_string();
        }
    }
});
