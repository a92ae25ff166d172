//! A bus maps address ranges (port I/O or MMIO) to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

/// A device on a bus. `offset` is relative to the start of its range.
pub trait BusDevice: Send {
    /// Guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors inserting into a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Overlapping ranges.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Start.
        base: u64,
        /// Length.
        len: u64,
    },
    /// Zero-length range.
    #[error("bus range at {0:#x} has zero length")]
    Empty(u64),
}

/// A shared device handle.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// An address → device map.
#[derive(Default, Clone)]
pub struct Bus {
    devices: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `dev` at `[base, base+len)`.
    pub fn insert(&mut self, base: u64, len: u64, dev: SharedDevice) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(base));
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        if let Some((b, (l, _))) = self.devices.range(..end).next_back()
            && b + l > base
        {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(base, (len, dev));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (b, (l, d)) = self.devices.range(..=addr).next_back()?;
        (addr < b + l).then_some((addr - b, d))
    }

    /// Dispatches a read; returns false if no device is there (data is then all ones).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((off, d)) => {
                d.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; returns false if no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((off, d)) => {
                d.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(u8);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data[0] = self.0 + offset as u8;
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatches_by_range_and_refuses_overlaps() {
        let mut bus = Bus::new();
        bus.insert(0x10, 4, Arc::new(Mutex::new(Reg(1)))).unwrap();
        assert!(bus.insert(0x12, 4, Arc::new(Mutex::new(Reg(1)))).is_err());
        assert!(bus.insert(0x0e, 4, Arc::new(Mutex::new(Reg(1)))).is_err());
        bus.insert(0x14, 4, Arc::new(Mutex::new(Reg(7)))).unwrap();
        let mut b = [0u8];
        assert!(bus.read(0x12, &mut b));
        assert_eq!(b[0], 3);
        assert!(bus.write(0x14, &[9]));
        assert!(bus.read(0x15, &mut b));
        assert_eq!(b[0], 10);
        assert!(!bus.read(0x18, &mut b));
        assert_eq!(b[0], 0xff);
    }
}
