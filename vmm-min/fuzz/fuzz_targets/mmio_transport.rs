//! The virtio-MMIO transport (`virtio::mmio::MmioTransport`) driven by a guest (register reads
//! and writes of any offset, size and value: the guest is untrusted) and by restores of saved
//! transport state (`MmioTransport::restore`, with the `VirtioMmio` state a snapshot file or a
//! migration stream carries), interleaved with pause/resume, config-change notices and
//! announce. The device behind it is a stand-in for the vhost-user backend (two queues of
//! max size 256 and 64).
//!
//! Checks: no panic; the device is only activated or resumed with queues that the virtio
//! rules allow (every ready queue of a non-zero size no larger than its maximum, a power of
//! two or the maximum itself) and with driver features it offered; the transport's state
//! keeps one queue per device queue with the device's maximum sizes.
#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use vmm_min::devices::bus::BusDevice;
use vmm_min::virtio::mmio::{MmioState, MmioTransport, reg};
use vmm_min::virtio::{QueueState, VirtioDevice};
use vmm_sys_util::eventfd::EventFd;

const MAX: [u16; 2] = [256, 64];
const FEATURES: u64 = 1 << 5 | 1 << 16 | 1 << 32 | 1 << 33;

fn check_queues(features: u64, queues: &[QueueState]) {
    assert_eq!(
        features & !(FEATURES | 1 << 32),
        0,
        "activated with features {features:#x} never offered"
    );
    for (i, q) in queues.iter().enumerate() {
        assert_eq!(q.max_size, MAX[i], "queue {i} max size");
        if q.ready {
            assert!(
                q.size != 0
                    && q.size <= q.max_size
                    && (q.size.is_power_of_two() || q.size == q.max_size),
                "queue {i} activated with size {} (max {})",
                q.size,
                q.max_size
            );
        }
    }
}

struct Dev {
    active: bool,
}

impl VirtioDevice for Dev {
    fn device_type(&self) -> u32 {
        1
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        MAX.to_vec()
    }
    fn device_features(&self) -> u64 {
        FEATURES
    }
    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = (offset as u8).wrapping_add(i as u8);
        }
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(
        &mut self,
        features: u64,
        queues: &[QueueState],
        kicks: &[EventFd],
        _call: &EventFd,
    ) -> std::result::Result<(), String> {
        check_queues(features, queues);
        assert_eq!(kicks.len(), MAX.len());
        self.active = true;
        Ok(())
    }
    fn reset(&mut self) {
        self.active = false;
    }
    fn pause_rings(&mut self) -> std::result::Result<Vec<u16>, String> {
        Ok(vec![7; MAX.len()])
    }
    fn resume_rings(
        &mut self,
        features: u64,
        queues: &[QueueState],
        _kicks: &[EventFd],
        _call: &EventFd,
        _bases: &[u16],
    ) -> std::result::Result<(), String> {
        check_queues(features, queues);
        self.active = true;
        Ok(())
    }
}

const REGS: [u64; 29] = [
    reg::MAGIC,
    reg::VERSION,
    reg::DEVICE_ID,
    reg::VENDOR_ID,
    reg::DEVICE_FEATURES,
    reg::DEVICE_FEATURES_SEL,
    reg::DRIVER_FEATURES,
    reg::DRIVER_FEATURES_SEL,
    reg::QUEUE_SEL,
    reg::QUEUE_NUM_MAX,
    reg::QUEUE_NUM,
    reg::QUEUE_READY,
    reg::QUEUE_NOTIFY,
    reg::INTERRUPT_STATUS,
    reg::INTERRUPT_ACK,
    reg::STATUS,
    reg::QUEUE_DESC_LOW,
    reg::QUEUE_DESC_HIGH,
    reg::QUEUE_AVAIL_LOW,
    reg::QUEUE_AVAIL_HIGH,
    reg::QUEUE_USED_LOW,
    reg::QUEUE_USED_HIGH,
    reg::SHM_SEL,
    reg::SHM_LEN_LOW,
    reg::SHM_LEN_HIGH,
    reg::SHM_BASE_LOW,
    reg::SHM_BASE_HIGH,
    reg::CONFIG_GENERATION,
    reg::CONFIG,
];

fn small_u32(u: &mut Unstructured<'_>) -> Result<u32> {
    Ok(match u.int_in_range(0..=3u8)? {
        0 => u32::from(u.arbitrary::<u8>()?),
        1 => 1 << u.int_in_range(0..=31u32)?,
        2 => *u.choose(&[0u32, 1, 2, 3, 7, 15, 0x8f, 64, 128, 256, 512])?,
        _ => u.arbitrary()?,
    })
}

fn state(u: &mut Unstructured<'_>) -> Result<MmioState> {
    let n = if u.ratio(1, 8)? {
        u.int_in_range(0..=3usize)?
    } else {
        MAX.len()
    };
    let mut queues = Vec::new();
    for i in 0..n {
        queues.push(QueueState {
            max_size: if u.ratio(1, 8)? {
                u.arbitrary()?
            } else {
                MAX.get(i).copied().unwrap_or(16)
            },
            size: small_u32(u)? as u16,
            ready: u.arbitrary()?,
            desc: u.arbitrary()?,
            avail: u.arbitrary()?,
            used: u.arbitrary()?,
        });
    }
    Ok(MmioState {
        status: small_u32(u)?,
        driver_features: if u.arbitrary()? {
            FEATURES | 1 << 32
        } else {
            u.arbitrary()?
        },
        device_features_sel: small_u32(u)?,
        driver_features_sel: small_u32(u)?,
        queue_sel: small_u32(u)?,
        queues,
        interrupt_status: small_u32(u)?,
        config_generation: u.arbitrary()?,
        activated: u.arbitrary()?,
        shm_sel: small_u32(u)?,
    })
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let kicks = MAX
        .iter()
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
        .collect();
    let call = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let mut t = MmioTransport::new(Box::new(Dev { active: false }), kicks, call);
    while !u.is_empty() {
        match u.int_in_range(0..=9u8)? {
            0..=4 => {
                let off = if u.ratio(1, 16)? {
                    u64::from(u.arbitrary::<u16>()?)
                } else {
                    *u.choose(&REGS)? + if u.ratio(1, 16)? { 1 } else { 0 }
                };
                let len = if u.ratio(1, 16)? {
                    u.int_in_range(1..=8usize)?
                } else {
                    4
                };
                let v = small_u32(u)?.to_le_bytes();
                let data: Vec<u8> = v.iter().copied().cycle().take(len).collect();
                t.write(off, &data);
            }
            5 => {
                let off = *u.choose(&REGS)?;
                let mut b = vec![0u8; if u.ratio(1, 16)? { 2 } else { 4 }];
                t.read(off, &mut b);
                if off == reg::MAGIC && b.len() == 4 {
                    assert_eq!(b, 0x7472_6976u32.to_le_bytes());
                }
            }
            6 => {
                let s = state(u)?;
                let bases: Vec<u16> = u.arbitrary()?;
                let _ = t.restore(&s, &bases);
            }
            7 => {
                if let Ok(bases) = t.pause_device() {
                    let _ = t.resume_device(&bases);
                }
            }
            8 => {
                t.notify_config_change();
                let _ = t.prepare_incoming();
            }
            _ => t.announce(),
        }
        let st = t.state();
        assert_eq!(
            st.queues.iter().map(|q| q.max_size).collect::<Vec<_>>(),
            MAX.to_vec()
        );
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
