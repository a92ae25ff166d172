//! VM exit counters for QMP `query-exits` (ours): the exits that reach vmm-min (port I/O and
//! MMIO by address, halts, signals), counted by the vCPU threads, and KVM's own per-vCPU
//! statistics (`KVM_GET_STATS_FD`: every exit, also those KVM handles in the kernel, halts,
//! interrupt injections...), summed over the vCPUs.
//!
//! In a nested set-up every exit is expensive (tens of microseconds in the KVM lab), so these
//! counts per unit of guest work are the first thing to look at when the guest is slow.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, PoisonError};

/// What kind of exit reached vmm-min.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ExitKind {
    /// `in` from a port.
    PioIn,
    /// `out` to a port.
    PioOut,
    /// MMIO read outside RAM that KVM did not handle.
    MmioRead,
    /// MMIO write outside RAM that KVM did not handle (no ioeventfd matched).
    MmioWrite,
    /// HLT (no in-kernel irqchip).
    Hlt,
    /// `KVM_RUN` interrupted by a signal (a kick) or `KVM_EXIT_INTR`.
    Interrupted,
    /// Anything else (shutdown, system event, errors).
    Other,
}

impl ExitKind {
    /// The name in `query-exits`.
    pub fn name(self) -> &'static str {
        match self {
            ExitKind::PioIn => "pio-in",
            ExitKind::PioOut => "pio-out",
            ExitKind::MmioRead => "mmio-read",
            ExitKind::MmioWrite => "mmio-write",
            ExitKind::Hlt => "hlt",
            ExitKind::Interrupted => "interrupted",
            ExitKind::Other => "other",
        }
    }

    fn has_address(self) -> bool {
        matches!(
            self,
            ExitKind::PioIn | ExitKind::PioOut | ExitKind::MmioRead | ExitKind::MmioWrite
        )
    }
}

/// One vCPU thread's counters (locked by that thread per exit; uncontended but for queries).
#[derive(Debug, Default)]
pub struct VcpuExits {
    by: HashMap<(ExitKind, u64), u64>,
}

impl VcpuExits {
    /// Counts one exit of `kind` at `addr` (0 for kinds without an address).
    pub fn count(&mut self, kind: ExitKind, addr: u64) {
        *self.by.entry((kind, addr)).or_insert(0) += 1;
    }
}

/// A KVM binary statistics fd with its descriptors.
#[derive(Debug)]
struct KvmStats {
    file: File,
    data_offset: u64,
    /// name, offset in the data block, number of u64 items.
    stats: Vec<(String, u64, u16)>,
}

/// `_IO(KVMIO, 0xce)`.
const KVM_GET_STATS_FD: libc::c_ulong = 0xae_ce;

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

impl KvmStats {
    fn open(fd: &impl AsRawFd) -> std::io::Result<Self> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd or -1; the fd we pass
        // is a live KVM vCPU (or VM) fd.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), KVM_GET_STATS_FD as _) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: r is a fresh fd that nothing else owns.
        let file = unsafe { File::from_raw_fd(r) };
        let bad =
            |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
        let mut h = [0u8; 24];
        file.read_exact_at(&mut h, 0)?;
        let name_size = u32_at(&h, 4).ok_or_else(|| bad("stats header"))? as usize;
        let num_desc = u32_at(&h, 8).ok_or_else(|| bad("stats header"))? as usize;
        let desc_offset = u32_at(&h, 16).ok_or_else(|| bad("stats header"))?;
        let data_offset = u32_at(&h, 20).ok_or_else(|| bad("stats header"))?;
        if name_size > 4096 || num_desc > 4096 {
            return Err(bad("implausible stats header"));
        }
        let dsize = 16 + name_size;
        let mut d = vec![0u8; dsize * num_desc];
        file.read_exact_at(&mut d, u64::from(desc_offset))?;
        let mut stats = Vec::new();
        for c in d.chunks_exact(dsize) {
            let flags = u32_at(c, 0).ok_or_else(|| bad("stats descriptor"))?;
            let size = u16::from_le_bytes([c[6], c[7]]);
            let offset = u32_at(c, 8).ok_or_else(|| bad("stats descriptor"))?;
            let name = &c[16..];
            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
            let ty = flags & kvm_bindings::KVM_STATS_TYPE_MASK;
            // Counters and levels; histograms left out.
            if size == 1
                && (ty == kvm_bindings::KVM_STATS_TYPE_CUMULATIVE
                    || ty == kvm_bindings::KVM_STATS_TYPE_INSTANT
                    || ty == kvm_bindings::KVM_STATS_TYPE_PEAK)
            {
                stats.push((
                    String::from_utf8_lossy(name).into_owned(),
                    u64::from(offset),
                    size,
                ));
            }
        }
        Ok(Self {
            file,
            data_offset: u64::from(data_offset),
            stats,
        })
    }

    fn add_to(&self, sums: &mut BTreeMap<String, u64>) {
        for (name, off, _) in &self.stats {
            let mut b = [0u8; 8];
            if self
                .file
                .read_exact_at(&mut b, self.data_offset + off)
                .is_ok()
            {
                *sums.entry(name.clone()).or_insert(0) += u64::from_le_bytes(b);
            }
        }
    }
}

/// Every vCPU's counters and KVM statistics fds.
#[derive(Debug, Default)]
pub struct ExitStats {
    vcpus: Mutex<Vec<Arc<Mutex<VcpuExits>>>>,
    kvm: Mutex<Vec<KvmStats>>,
}

/// One row of [`ExitStats::snapshot`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AddressCount {
    /// Exit kind name.
    pub kind: &'static str,
    /// Port or guest physical address, hex.
    pub address: String,
    /// Exits.
    pub count: u64,
}

/// What `query-exits` returns.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ExitSnapshot {
    /// Exits that reached vmm-min, all kinds.
    pub userspace: u64,
    /// By kind.
    pub kinds: BTreeMap<&'static str, u64>,
    /// By kind and address, most frequent first.
    pub addresses: Vec<AddressCount>,
    /// KVM's per-vCPU statistics summed over the vCPUs (`exits`, `io_exits`, `mmio_exits`,
    /// `halt_exits`, `irq_injections`...; empty when the kernel has no binary stats).
    pub kvm: BTreeMap<String, u64>,
}

impl ExitStats {
    /// The counters of a new vCPU thread.
    pub fn vcpu(&self) -> Arc<Mutex<VcpuExits>> {
        let c = Arc::new(Mutex::new(VcpuExits::default()));
        self.vcpus
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(c.clone());
        c
    }

    /// Adds KVM's statistics of this vCPU fd (silently nothing on kernels without them).
    pub fn add_kvm_vcpu(&self, vcpu: &impl AsRawFd) {
        match KvmStats::open(vcpu) {
            Ok(s) => self
                .kvm
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(s),
            Err(e) => tracing::debug!("no KVM binary statistics for a vCPU: {e}"),
        }
    }

    /// The counts so far.
    pub fn snapshot(&self) -> ExitSnapshot {
        let mut merged: HashMap<(ExitKind, u64), u64> = HashMap::new();
        for v in self
            .vcpus
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            for (k, n) in &v.lock().unwrap_or_else(PoisonError::into_inner).by {
                *merged.entry(*k).or_insert(0) += n;
            }
        }
        let mut s = ExitSnapshot::default();
        for ((kind, addr), n) in &merged {
            s.userspace += n;
            *s.kinds.entry(kind.name()).or_insert(0) += n;
            if kind.has_address() {
                s.addresses.push(AddressCount {
                    kind: kind.name(),
                    address: format!("{addr:#x}"),
                    count: *n,
                });
            }
        }
        s.addresses.sort_by(|a, b| {
            b.count
                .cmp(&a.count)
                .then_with(|| a.kind.cmp(b.kind))
                .then_with(|| a.address.cmp(&b.address))
        });
        for k in self
            .kvm
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            k.add_to(&mut s.kvm);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_merge_over_vcpus_by_kind_and_address() {
        let st = ExitStats::default();
        let a = st.vcpu();
        let b = st.vcpu();
        a.lock().unwrap().count(ExitKind::MmioRead, 0xd000_0060);
        b.lock().unwrap().count(ExitKind::MmioRead, 0xd000_0060);
        b.lock().unwrap().count(ExitKind::MmioWrite, 0xd000_0064);
        a.lock().unwrap().count(ExitKind::Interrupted, 0);
        let s = st.snapshot();
        assert_eq!(s.userspace, 4);
        assert_eq!(s.kinds["mmio-read"], 2);
        assert_eq!(s.kinds["interrupted"], 1);
        assert_eq!(
            s.addresses[0],
            AddressCount {
                kind: "mmio-read",
                address: "0xd0000060".into(),
                count: 2
            }
        );
        assert_eq!(
            s.addresses.len(),
            2,
            "kinds without an address are not listed"
        );
    }

    #[test]
    fn kvm_statistics_of_a_vcpu_are_read() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("SKIPPED: kvm_statistics_of_a_vcpu_are_read: no /dev/kvm");
            return;
        };
        let vm = kvm.create_vm().unwrap();
        let v = vm.create_vcpu(0).unwrap();
        let st = ExitStats::default();
        st.add_kvm_vcpu(&v);
        let s = st.snapshot();
        if s.kvm.is_empty() {
            eprintln!(
                "SKIPPED: kvm_statistics_of_a_vcpu_are_read: kernel without KVM_GET_STATS_FD"
            );
            return;
        }
        assert!(s.kvm.contains_key("exits"), "{:?}", s.kvm.keys());
    }
}
