//! virtio for vmm-min: the virtio-MMIO transport (version 2 register file) and the vhost-user
//! frontend that gives each device's rings to a backend process.

pub mod mmio;
pub mod vhost_user;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    /// ACKNOWLEDGE.
    pub const ACKNOWLEDGE: u32 = 1;
    /// DRIVER.
    pub const DRIVER: u32 = 2;
    /// DRIVER_OK.
    pub const DRIVER_OK: u32 = 4;
    /// FEATURES_OK.
    pub const FEATURES_OK: u32 = 8;
    /// DEVICE_NEEDS_RESET.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// FAILED.
    pub const FAILED: u32 = 0x80;
}

/// VIRTIO_F_VERSION_1.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_F_ACCESS_PLATFORM (never offered: no IOMMU here).
pub const VIRTIO_F_ACCESS_PLATFORM: u64 = 1 << 33;
/// VIRTIO_F_RING_PACKED (not offered: split rings only).
pub const VIRTIO_F_RING_PACKED: u64 = 1 << 34;

/// One queue as the driver configured it (guest physical addresses).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueState {
    /// Largest size the device accepts.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table.
    pub desc: u64,
    /// Available (driver) ring.
    pub avail: u64,
    /// Used (device) ring.
    pub used: u64,
}

/// What the transport needs from a device implementation (here: a vhost-user backend).
pub trait VirtioDevice: Send {
    /// virtio device id (1 net, 2 block).
    fn device_type(&self) -> u32;
    /// Largest queue size of each queue (also gives the queue count).
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Features offered to the driver.
    fn device_features(&self) -> u64;
    /// Reads device config space.
    fn read_config(&mut self, offset: u64, data: &mut [u8]);
    /// Writes device config space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// DRIVER_OK: start processing with these features and queues. `kicks[i]` is signalled by
    /// the guest for queue i (ioeventfd), `call` raises the device interrupt (irqfd).
    fn activate(
        &mut self,
        features: u64,
        queues: &[QueueState],
        kicks: &[vmm_sys_util::eventfd::EventFd],
        call: &vmm_sys_util::eventfd::EventFd,
    ) -> Result<(), String>;
    /// The driver reset the device (status 0).
    fn reset(&mut self);
    /// True when the device signals `call` directly for used buffers (vhost-user): the
    /// transport then always reports the "used buffer" interrupt cause.
    fn signals_call_directly(&self) -> bool {
        true
    }
    /// Stops the rings of an activated device (vhost-user: `GET_VRING_BASE`, the backend stops
    /// processing and finishes what it took) and returns each queue's next available index
    /// (0 for a queue that is not ready). Default: nothing to stop.
    fn pause_rings(&mut self) -> Result<Vec<u16>, String> {
        Ok(Vec::new())
    }
    /// Starts the rings again with `bases` as next available indexes (vhost-user:
    /// `SET_VRING_BASE`, call, kick, enable): after [`VirtioDevice::pause_rings`], or to bring
    /// up a restored device without a guest-visible reset. Default: [`VirtioDevice::activate`].
    fn resume_rings(
        &mut self,
        features: u64,
        queues: &[QueueState],
        kicks: &[vmm_sys_util::eventfd::EventFd],
        call: &vmm_sys_util::eventfd::EventFd,
        bases: &[u16],
    ) -> Result<(), String> {
        let _ = bases;
        self.activate(features, queues, kicks, call)
    }
    /// An incoming migration will restore this device: send what does not depend on the
    /// saved state ahead (vhost-user: the memory table and dirty log), so that the switch-over
    /// only starts the rings. Default: nothing.
    fn prepare_incoming(&mut self) -> Result<(), String> {
        Ok(())
    }
    /// The guest now runs here after a migration or restore: tell the network (vhost-user
    /// net: `SEND_RARP`). Default: nothing.
    fn announce(&mut self) {}
}
