//! The virtio-MMIO transport, version 2 (virtio 1.2, 4.2.2): magic/version/ids, feature pages
//! with select registers, queue select/size/ready/addresses, QueueNotify (an ioeventfd per queue
//! normally, a direct write as fallback), interrupt status/ack, the status state machine with
//! reset, config space and its generation counter. All transport state is in [`MmioState`]
//! (plain serde data) so it can be saved and restored.

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::status::{ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK};
use super::{QueueState, VIRTIO_F_VERSION_1, VirtioDevice};
use crate::devices::bus::BusDevice;

/// Register offsets.
pub mod reg {
    /// "virt".
    pub const MAGIC: u64 = 0x000;
    /// Version (2).
    pub const VERSION: u64 = 0x004;
    /// Device id.
    pub const DEVICE_ID: u64 = 0x008;
    /// Vendor id.
    pub const VENDOR_ID: u64 = 0x00c;
    /// Device features (page selected by DEVICE_FEATURES_SEL).
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// Device features page select.
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// Driver features.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// Driver features page select.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// Queue select.
    pub const QUEUE_SEL: u64 = 0x030;
    /// Max queue size.
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// Queue size.
    pub const QUEUE_NUM: u64 = 0x038;
    /// Queue ready.
    pub const QUEUE_READY: u64 = 0x044;
    /// Queue notify.
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// Interrupt status.
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// Interrupt acknowledge.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Device status.
    pub const STATUS: u64 = 0x070;
    /// Descriptor table low.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// Descriptor table high.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// Driver (avail) ring low.
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    /// Driver (avail) ring high.
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    /// Device (used) ring low.
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    /// Device (used) ring high.
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    /// Shared memory region select.
    pub const SHM_SEL: u64 = 0x0ac;
    /// Shared memory length low.
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    /// Shared memory length high.
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    /// Shared memory base low.
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    /// Shared memory base high.
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    /// Config generation.
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Device config space.
    pub const CONFIG: u64 = 0x100;
}

/// "virt" in little endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// Vendor id reported ("COLO" would do, QEMU uses 0x554d4551 "QEMU").
pub const VENDOR: u32 = 0x4f4c_4f43;
/// Interrupt cause: used buffer.
pub const INT_VRING: u32 = 1;
/// Interrupt cause: configuration change.
pub const INT_CONFIG: u32 = 2;

/// Transport state (serde, for snapshots and migration).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    /// Device status.
    pub status: u32,
    /// Features the driver acknowledged.
    pub driver_features: u64,
    /// Device features page select.
    pub device_features_sel: u32,
    /// Driver features page select.
    pub driver_features_sel: u32,
    /// Queue select.
    pub queue_sel: u32,
    /// Queues.
    pub queues: Vec<QueueState>,
    /// Pending interrupt causes.
    pub interrupt_status: u32,
    /// Config generation.
    pub config_generation: u32,
    /// The device was activated (DRIVER_OK handled).
    pub activated: bool,
    /// Shared memory region select.
    pub shm_sel: u32,
}

/// A virtio-MMIO device: transport registers around a [`VirtioDevice`].
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    state: MmioState,
    device_features: u64,
    kicks: Vec<EventFd>,
    call: EventFd,
    sticky_vring: bool,
    /// Eventfds registered by the caller for this window (e.g. the InterruptACK ioeventfd),
    /// kept open as long as the transport.
    kept: Vec<EventFd>,
}

impl MmioTransport {
    /// Wraps `device`; `kicks[i]` is the queue-i notifier (registered as ioeventfd by the
    /// caller), `call` the interrupt (registered as irqfd by the caller).
    pub fn new(device: Box<dyn VirtioDevice>, kicks: Vec<EventFd>, call: EventFd) -> Self {
        let queues = device
            .queue_max_sizes()
            .into_iter()
            .map(|m| QueueState {
                max_size: m,
                size: m,
                ..Default::default()
            })
            .collect();
        let device_features = device.device_features() | VIRTIO_F_VERSION_1;
        let sticky_vring = device.signals_call_directly();
        Self {
            device,
            state: MmioState {
                queues,
                ..Default::default()
            },
            device_features,
            kicks,
            call,
            sticky_vring,
            kept: Vec::new(),
        }
    }

    /// Keeps `fd` (registered with KVM for this window by the caller) open with the transport.
    pub fn keep_eventfd(&mut self, fd: Option<EventFd>) {
        self.kept.extend(fd);
    }

    /// Transport state.
    pub fn state(&self) -> &MmioState {
        &self.state
    }

    /// Stops the rings of an activated device (see [`VirtioDevice::pause_rings`]); returns
    /// each queue's next available index (empty when the device is not activated).
    pub fn pause_device(&mut self) -> Result<Vec<u16>, String> {
        if !self.state.activated {
            return Ok(Vec::new());
        }
        self.device.pause_rings()
    }

    /// Starts the rings of an activated device again from `bases` and kicks every queue (the
    /// driver may have posted buffers while they were stopped).
    pub fn resume_device(&mut self, bases: &[u16]) -> Result<(), String> {
        if !self.state.activated {
            return Ok(());
        }
        let queues = self.state.queues.clone();
        self.device.resume_rings(
            self.state.driver_features,
            &queues,
            &self.kicks,
            &self.call,
            bases,
        )?;
        for k in &self.kicks {
            let _ = k.write(1);
        }
        Ok(())
    }

    /// Restores saved transport state; an activated device's rings are started from `bases`
    /// with the saved features and queue layout (no reset the guest could see). The device's
    /// rings must be stopped (never activated, or [`MmioTransport::pause_device`]).
    pub fn restore(&mut self, state: &MmioState, bases: &[u16]) -> Result<(), String> {
        let sizes = |s: &MmioState| s.queues.iter().map(|q| q.max_size).collect::<Vec<_>>();
        if sizes(state) != sizes(&self.state) {
            return Err(format!(
                "saved virtio-mmio state has queues of max sizes {:?}, this device {:?}",
                sizes(state),
                sizes(&self.state)
            ));
        }
        // Queue sizes go to the backend as they are (`SET_VRING_NUM`, also for a queue the
        // driver makes ready after the restore): only sizes the guest could have set
        // (non-zero, at most the maximum, a power of 2 or the maximum itself).
        if let Some((i, q)) = state.queues.iter().enumerate().find(|(_, q)| {
            q.size != q.max_size && !ring_size_settable(u32::from(q.size), q.max_size)
        }) {
            return Err(format!(
                "saved virtio-mmio queue {i} has size {} (max {}): not a valid ring size",
                q.size, q.max_size
            ));
        }
        if state.driver_features & !self.device_features != 0 {
            return Err(format!(
                "saved driver features {:#x} are not all offered by this backend ({:#x})",
                state.driver_features, self.device_features
            ));
        }
        if self.state.activated && !state.activated {
            self.device.reset();
        }
        self.state = state.clone();
        if state.activated {
            if let Err(e) = self.resume_device(bases) {
                self.state.activated = false;
                return Err(e);
            }
            // A used-buffer interrupt signalled just before the capture may not be in the
            // saved interrupt controllers: one spare interrupt makes the driver look.
            let _ = self.call.write(1);
        }
        Ok(())
    }

    /// An incoming migration will restore this transport (see
    /// [`VirtioDevice::prepare_incoming`]); nothing for an activated device.
    pub fn prepare_incoming(&mut self) -> Result<(), String> {
        if self.state.activated {
            return Ok(());
        }
        self.device.prepare_incoming()
    }

    /// The guest now runs here after a migration or restore (see [`VirtioDevice::announce`]).
    pub fn announce(&mut self) {
        if self.state.activated {
            self.device.announce();
        }
    }

    /// Number of queues.
    pub fn queue_count(&self) -> usize {
        self.state.queues.len()
    }

    /// The wrapped device.
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// Raises a configuration-change interrupt (e.g. the backend's config changed).
    pub fn notify_config_change(&mut self) {
        self.state.config_generation = self.state.config_generation.wrapping_add(1);
        self.state.interrupt_status |= INT_CONFIG;
        let _ = self.call.write(1);
    }

    fn queue(&self) -> Option<&QueueState> {
        self.state.queues.get(self.state.queue_sel as usize)
    }

    fn queue_mut(&mut self) -> Option<&mut QueueState> {
        // Queue layout registers are only writable before DRIVER_OK and while not ready.
        if self.state.status & DRIVER_OK != 0 {
            return None;
        }
        let q = self.state.queues.get_mut(self.state.queue_sel as usize)?;
        (!q.ready).then_some(q)
    }

    fn reset(&mut self) {
        if self.state.activated || self.state.status != 0 {
            self.device.reset();
        }
        let queues = self
            .state
            .queues
            .iter()
            .map(|q| QueueState {
                max_size: q.max_size,
                size: q.max_size,
                ..Default::default()
            })
            .collect();
        let generation = self.state.config_generation;
        self.state = MmioState {
            queues,
            config_generation: generation,
            ..Default::default()
        };
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.state.status;
        // The driver may only add bits (FAILED excepted).
        if v & old != old && v & FAILED == 0 {
            tracing::debug!(
                old,
                new = v,
                "virtio status: bits cleared without reset, ignored"
            );
            return;
        }
        let mut v = v;
        if v & FEATURES_OK != 0 && old & FEATURES_OK == 0 {
            let unknown = self.state.driver_features & !self.device_features;
            if unknown != 0 || self.state.driver_features & VIRTIO_F_VERSION_1 == 0 {
                tracing::warn!(
                    features = format_args!("{:#x}", self.state.driver_features),
                    "driver features refused (unknown bits or no VERSION_1)"
                );
                v &= !FEATURES_OK;
            }
        }
        self.state.status = v;
        if v & DRIVER_OK != 0
            && v & FEATURES_OK != 0
            && v & (ACKNOWLEDGE | DRIVER) == (ACKNOWLEDGE | DRIVER)
            && !self.state.activated
        {
            let queues: Vec<QueueState> = self.state.queues.clone();
            match self
                .device
                .activate(self.state.driver_features, &queues, &self.kicks, &self.call)
            {
                Ok(()) => self.state.activated = true,
                Err(e) => {
                    tracing::error!("virtio device activation failed: {e}");
                    self.state.status |= DEVICE_NEEDS_RESET;
                    self.notify_config_change();
                }
            }
        }
    }

    fn read_u32(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC => MAGIC_VALUE,
            reg::VERSION => 2,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR,
            reg::DEVICE_FEATURES => match self.state.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.queue().map_or(0, |q| u32::from(q.max_size)),
            reg::QUEUE_READY => self.queue().map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => {
                let sticky = if self.sticky_vring && self.state.activated {
                    INT_VRING
                } else {
                    0
                };
                self.state.interrupt_status | sticky
            }
            reg::STATUS => self.state.status,
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.state.config_generation,
            _ => {
                tracing::debug!(offset, "virtio-mmio read of unknown/write-only register");
                0
            }
        }
    }

    fn write_u32(&mut self, offset: u64, v: u32) {
        let lo = |x: &mut u64, v: u32| *x = (*x & !0xffff_ffff) | u64::from(v);
        let hi = |x: &mut u64, v: u32| *x = (*x & 0xffff_ffff) | (u64::from(v) << 32);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.state.device_features_sel = v,
            reg::DRIVER_FEATURES => {
                // Frozen once the device runs: a driver that cleared FEATURES_OK with FAILED
                // must not change what the rings are restarted with (pause/resume).
                if self.state.activated
                    || self.state.status & FEATURES_OK != 0
                    || self.state.status & DRIVER == 0
                {
                    tracing::debug!("driver features written outside the DRIVER phase: ignored");
                    return;
                }
                match self.state.driver_features_sel {
                    0 => lo(&mut self.state.driver_features, v),
                    1 => hi(&mut self.state.driver_features, v),
                    _ => {}
                }
            }
            reg::DRIVER_FEATURES_SEL => self.state.driver_features_sel = v,
            reg::QUEUE_SEL => self.state.queue_sel = v,
            reg::QUEUE_NUM => {
                if let Some(q) = self.queue_mut() {
                    if !ring_size_settable(v, q.max_size) {
                        tracing::warn!(size = v, max = q.max_size, "bad queue size ignored");
                    } else {
                        q.size = v as u16;
                    }
                }
            }
            reg::QUEUE_READY => {
                if self.state.status & DRIVER_OK != 0 {
                    return;
                }
                if let Some(q) = self.state.queues.get_mut(self.state.queue_sel as usize) {
                    q.ready = v == 1;
                }
            }
            reg::QUEUE_NOTIFY => {
                // Only reached when the ioeventfd is not registered: forward the kick.
                if let Some(k) = self.kicks.get(v as usize) {
                    let _ = k.write(1);
                }
            }
            reg::INTERRUPT_ACK => self.state.interrupt_status &= !v,
            reg::STATUS => self.set_status(v),
            reg::QUEUE_DESC_LOW => self
                .queue_mut()
                .into_iter()
                .for_each(|q| lo(&mut q.desc, v)),
            reg::QUEUE_DESC_HIGH => self
                .queue_mut()
                .into_iter()
                .for_each(|q| hi(&mut q.desc, v)),
            reg::QUEUE_AVAIL_LOW => self
                .queue_mut()
                .into_iter()
                .for_each(|q| lo(&mut q.avail, v)),
            reg::QUEUE_AVAIL_HIGH => self
                .queue_mut()
                .into_iter()
                .for_each(|q| hi(&mut q.avail, v)),
            reg::QUEUE_USED_LOW => self
                .queue_mut()
                .into_iter()
                .for_each(|q| lo(&mut q.used, v)),
            reg::QUEUE_USED_HIGH => self
                .queue_mut()
                .into_iter()
                .for_each(|q| hi(&mut q.used, v)),
            reg::SHM_SEL => self.state.shm_sel = v,
            _ => tracing::debug!(offset, v, "virtio-mmio write to unknown/read-only register"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            tracing::debug!(
                offset,
                len = data.len(),
                "unaligned virtio-mmio register read"
            );
            data.fill(0);
            return;
        }
        let v = self.read_u32(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            if self.state.status & FAILED == 0 {
                self.device.write_config(offset - reg::CONFIG, data);
            }
            return;
        }
        let Ok(b) = <[u8; 4]>::try_from(data) else {
            tracing::debug!(
                offset,
                len = data.len(),
                "non-32-bit virtio-mmio register write"
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        self.write_u32(offset, u32::from_le_bytes(b));
    }
}

/// Whether the guest may set a ring of `size` entries (`QueueNum`): a power of 2, not zero,
/// at most the device's maximum.
fn ring_size_settable(size: u32, max: u16) -> bool {
    size != 0 && size <= u32::from(max) && size.is_power_of_two()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Seen {
        activated: Option<(u64, Vec<QueueState>)>,
        resets: u32,
        config_writes: Vec<(u64, Vec<u8>)>,
    }

    struct Fake {
        seen: Arc<Mutex<Seen>>,
        fail: bool,
    }

    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![256, 128]
        }
        fn device_features(&self) -> u64 {
            (1 << 1) | (1 << 9)
        }
        fn read_config(&mut self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as u8).wrapping_add(i as u8);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.seen
                .lock()
                .unwrap()
                .config_writes
                .push((offset, data.to_vec()));
        }
        fn activate(
            &mut self,
            features: u64,
            queues: &[QueueState],
            kicks: &[EventFd],
            _call: &EventFd,
        ) -> Result<(), String> {
            assert_eq!(kicks.len(), 2);
            if self.fail {
                return Err("backend gone".into());
            }
            self.seen.lock().unwrap().activated = Some((features, queues.to_vec()));
            Ok(())
        }
        fn reset(&mut self) {
            self.seen.lock().unwrap().resets += 1;
        }
    }

    fn transport(fail: bool) -> (MmioTransport, Arc<Mutex<Seen>>, Vec<EventFd>, EventFd) {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let kicks: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(
            Box::new(Fake {
                seen: seen.clone(),
                fail,
            }),
            kicks.iter().map(|k| k.try_clone().unwrap()).collect(),
            call.try_clone().unwrap(),
        );
        (t, seen, kicks, call)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport, features: u64) {
        w(t, reg::STATUS, ACKNOWLEDGE);
        w(t, reg::STATUS, ACKNOWLEDGE | DRIVER);
        w(t, reg::DRIVER_FEATURES_SEL, 0);
        w(t, reg::DRIVER_FEATURES, features as u32);
        w(t, reg::DRIVER_FEATURES_SEL, 1);
        w(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
        w(t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    }

    fn setup_queue(t: &mut MmioTransport, i: u32, base: u64) {
        w(t, reg::QUEUE_SEL, i);
        w(t, reg::QUEUE_NUM, 64);
        w(t, reg::QUEUE_DESC_LOW, base as u32);
        w(t, reg::QUEUE_DESC_HIGH, (base >> 32) as u32);
        w(t, reg::QUEUE_AVAIL_LOW, (base + 0x400) as u32);
        w(t, reg::QUEUE_AVAIL_HIGH, 0);
        w(t, reg::QUEUE_USED_LOW, (base + 0x800) as u32);
        w(t, reg::QUEUE_USED_HIGH, 1);
        w(t, reg::QUEUE_READY, 1);
    }

    #[test]
    fn identity_registers_and_feature_pages() {
        let (mut t, ..) = transport(false);
        assert_eq!(r(&mut t, reg::MAGIC), MAGIC_VALUE);
        assert_eq!(r(&mut t, reg::VERSION), 2);
        assert_eq!(r(&mut t, reg::DEVICE_ID), 2);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), (1 << 1) | (1 << 9));
        w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1, "VERSION_1 offered");
        w(&mut t, reg::DEVICE_FEATURES_SEL, 2);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 0);
        w(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 128);
        w(&mut t, reg::QUEUE_SEL, 7);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 0, "absent queue");
    }

    #[test]
    fn full_handshake_activates_with_the_driver_queues() {
        let (mut t, seen, _, _) = transport(false);
        negotiate(&mut t, VIRTIO_F_VERSION_1 | (1 << 9));
        assert_ne!(r(&mut t, reg::STATUS) & FEATURES_OK, 0);
        setup_queue(&mut t, 0, 0x10_0000);
        setup_queue(&mut t, 1, 0x20_0000);
        w(
            &mut t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        let s = seen.lock().unwrap();
        let (f, q) = s.activated.clone().unwrap();
        assert_eq!(f, VIRTIO_F_VERSION_1 | (1 << 9));
        assert_eq!(q[0].size, 64);
        assert_eq!(q[0].desc, 0x10_0000);
        assert_eq!(q[0].avail, 0x10_0400);
        assert_eq!(q[0].used, 0x1_0010_0800);
        assert!(q[1].ready);
        drop(s);
        // After DRIVER_OK the queue layout is frozen.
        w(&mut t, reg::QUEUE_SEL, 0);
        w(&mut t, reg::QUEUE_DESC_LOW, 0x999);
        assert_eq!(t.state().queues[0].desc, 0x10_0000);
        // vhost-user devices signal the irqfd themselves: the used-buffer cause is reported.
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS) & INT_VRING, INT_VRING);
    }

    /// A saved state (snapshot file, migration stream) whose ready queue has a size the guest
    /// could never have set is refused before the backend sees it (found by the vmm-min
    /// `mmio_transport` fuzz target: a ready queue of size 0 reached `activate`).
    #[test]
    fn restore_refuses_ring_sizes_a_guest_cannot_set() {
        let (mut t, _, _, _) = transport(false);
        negotiate(&mut t, VIRTIO_F_VERSION_1 | (1 << 9));
        setup_queue(&mut t, 0, 0x10_0000);
        setup_queue(&mut t, 1, 0x20_0000);
        w(
            &mut t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        let saved = t.state().clone();
        for bad in [0u16, 100, 512] {
            let (mut t2, seen, _, _) = transport(false);
            let mut s = saved.clone();
            s.queues[0].size = bad;
            let e = t2.restore(&s, &[0, 0]).unwrap_err();
            assert!(e.contains("queue 0 has size"), "{e}");
            assert!(seen.lock().unwrap().activated.is_none());
            assert!(!t2.state().activated);
        }
        // Nor for a queue that is not ready: the driver could make it ready and start the
        // device after the restore (found by the fuzz target too).
        let (mut t2, seen, _, _) = transport(false);
        let mut s = saved.clone();
        s.activated = false;
        s.status = ACKNOWLEDGE | DRIVER | FEATURES_OK;
        s.queues[1].ready = false;
        s.queues[1].size = 0;
        assert!(t2.restore(&s, &[0, 0]).is_err());
        assert!(seen.lock().unwrap().activated.is_none());
        // The state as saved restores and starts the rings.
        let (mut t2, seen, _, _) = transport(false);
        t2.restore(&saved, &[0, 0]).unwrap();
        assert_eq!(
            seen.lock().unwrap().activated.clone().unwrap().1[0].size,
            64
        );
    }

    /// A driver that sets FAILED may clear FEATURES_OK while the device runs; the driver
    /// features it writes then must not reach the backend when the rings are restarted
    /// (found by the vmm-min `mmio_transport` fuzz target: features never offered were passed
    /// to `resume_rings`).
    #[test]
    fn driver_features_are_frozen_while_the_device_runs() {
        let (mut t, seen, _, _) = transport(false);
        let features = VIRTIO_F_VERSION_1 | (1 << 9);
        negotiate(&mut t, features);
        setup_queue(&mut t, 0, 0x10_0000);
        w(
            &mut t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert!(t.state().activated);
        w(&mut t, reg::STATUS, FAILED | ACKNOWLEDGE | DRIVER);
        w(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        w(&mut t, reg::DRIVER_FEATURES, 1 << 29);
        assert_eq!(t.state().driver_features, features);
        let bases = t.pause_device().unwrap();
        t.resume_device(&bases).unwrap();
        assert_eq!(seen.lock().unwrap().activated.clone().unwrap().0, features);
    }

    #[test]
    fn unknown_features_or_missing_version_1_refuse_features_ok() {
        let (mut t, ..) = transport(false);
        negotiate(&mut t, VIRTIO_F_VERSION_1 | (1 << 5));
        assert_eq!(r(&mut t, reg::STATUS) & FEATURES_OK, 0);
        w(&mut t, reg::STATUS, 0);
        negotiate(&mut t, 1 << 9);
        assert_eq!(r(&mut t, reg::STATUS) & FEATURES_OK, 0);
    }

    #[test]
    fn reset_clears_state_and_resets_the_device() {
        let (mut t, seen, _, _) = transport(false);
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 0x10_0000);
        w(
            &mut t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        w(&mut t, reg::STATUS, 0);
        assert_eq!(r(&mut t, reg::STATUS), 0);
        assert_eq!(seen.lock().unwrap().resets, 1);
        assert_eq!(
            t.state().queues[0],
            QueueState {
                max_size: 256,
                size: 256,
                ..Default::default()
            }
        );
        assert!(!t.state().activated);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
    }

    #[test]
    fn bad_queue_sizes_are_ignored_and_notify_falls_back_to_the_kick_eventfd() {
        let (mut t, _, kicks, _) = transport(false);
        w(&mut t, reg::QUEUE_SEL, 1);
        w(&mut t, reg::QUEUE_NUM, 100);
        w(&mut t, reg::QUEUE_NUM, 512);
        assert_eq!(t.state().queues[1].size, 128);
        w(&mut t, reg::QUEUE_NUM, 32);
        assert_eq!(t.state().queues[1].size, 32);
        w(&mut t, reg::QUEUE_NOTIFY, 1);
        assert_eq!(kicks[1].read().unwrap(), 1);
        w(&mut t, reg::QUEUE_NOTIFY, 9); // out of range: ignored, no panic
    }

    #[test]
    fn config_space_goes_to_the_device_and_generation_counts_changes() {
        let (mut t, seen, _, call) = transport(false);
        let mut b = [0u8; 2];
        t.read(reg::CONFIG + 4, &mut b);
        assert_eq!(b, [4, 5]);
        t.write(reg::CONFIG + 8, &[1, 2, 3]);
        assert_eq!(seen.lock().unwrap().config_writes, vec![(8, vec![1, 2, 3])]);
        let g = r(&mut t, reg::CONFIG_GENERATION);
        t.notify_config_change();
        assert_eq!(r(&mut t, reg::CONFIG_GENERATION), g + 1);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS) & INT_CONFIG, INT_CONFIG);
        assert_eq!(call.read().unwrap(), 1);
        w(&mut t, reg::INTERRUPT_ACK, INT_CONFIG);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
    }

    #[test]
    fn failed_activation_sets_needs_reset() {
        let (mut t, ..) = transport(true);
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 0x10_0000);
        w(
            &mut t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert_ne!(r(&mut t, reg::STATUS) & DEVICE_NEEDS_RESET, 0);
        assert!(!t.state().activated);
    }

    #[test]
    fn odd_sized_accesses_do_not_panic() {
        let (mut t, ..) = transport(false);
        let mut b = [0u8; 2];
        t.read(reg::MAGIC, &mut b);
        t.write(reg::STATUS, &[1]);
        t.write(reg::STATUS + 1, &[1, 2, 3, 4]);
        assert_eq!(r(&mut t, reg::STATUS), 0);
    }
}
