//! The vmm-min state format (snapshot files and migration streams), version 2 (2: KVM
//! structures as hex strings; 1 had byte-number arrays).
//!
//! ```text
//! magic      8 bytes  "COLOVMST"
//! version    u32 LE   FORMAT_VERSION
//! state_len  u64 LE   length of the JSON state that follows (at most MAX_STATE_LEN)
//! state      JSON     VmSnapshot: shape, per-VM state, per-vCPU state, device state
//! memory     records  u64 LE header = guest physical page address | kind
//!                       kind 0 (PAGE): 4096 bytes of page content follow
//!                       kind 1 (ZERO): the page is all zeros, nothing follows
//!                     the header END (u64::MAX) closes the section
//! checksum   u64 LE   word-wise FNV-1a-style 64-bit hash of every byte before it (`Fnv`)
//! ```
//!
//! [`write_snapshot`] writes every page, zero pages as 8-byte ZERO records, so a file restores
//! into RAM that is already populated (a running VM, or ACPI tables written at build time).
//! A reader refuses, with a [`FormatError`], a stream with another magic or version, a VM of a
//! different shape, pages outside RAM, a truncated stream or a bad checksum. A restore is only
//! usable when [`read_snapshot`] returned `Ok`: callers must not start the VM otherwise.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use crate::devices::serial::SerialSnapshot;
use crate::memory::GuestRam;
use crate::virtio::mmio::MmioState;

use super::vcpu::VcpuState;
use super::vm::VmState;

/// File / stream magic.
pub const MAGIC: &[u8; 8] = b"COLOVMST";
/// The format version this build writes and the only one it reads.
pub const FORMAT_VERSION: u32 = 2;
/// Largest JSON state accepted (guards allocations on corrupt input).
pub const MAX_STATE_LEN: u64 = 64 << 20;
/// Largest single read of a length-prefixed section (see `Reader::get_vec`).
pub const READ_CHUNK: usize = 1 << 20;
/// Page size of the memory section.
pub const PAGE_SIZE: u64 = 4096;
/// Memory record kind: page content follows.
pub const KIND_PAGE: u64 = 0;
/// Memory record kind: zero page.
pub const KIND_ZERO: u64 = 1;
/// Memory section end marker.
pub const END: u64 = u64::MAX;

/// Errors reading or writing the state format.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The stream does not start with `COLOVMST`.
    #[error("not a vmm-min state stream: magic is {found:02x?}, expected \"COLOVMST\"")]
    BadMagic {
        /// The first 8 bytes.
        found: [u8; 8],
    },
    /// Written by an incompatible vmm-min.
    #[error(
        "state format version {found} is not supported (this vmm-min reads version {expected})"
    )]
    Version {
        /// Version in the stream.
        found: u32,
        /// Version we read.
        expected: u32,
    },
    /// The stream ended early.
    #[error("state stream truncated while reading {what}")]
    Truncated {
        /// The part being read.
        what: &'static str,
    },
    /// An I/O error other than end of stream.
    #[error("state stream I/O while {what}: {source}")]
    Io {
        /// The step.
        what: &'static str,
        /// OS error.
        source: std::io::Error,
    },
    /// The JSON state is too large.
    #[error("state section is {0} bytes, more than the {MAX_STATE_LEN} accepted")]
    StateTooLarge(u64),
    /// The JSON state does not parse.
    #[error("state section is not valid: {0}")]
    Json(#[from] serde_json::Error),
    /// The saved VM has a different shape than the one restoring it.
    #[error("the saved VM does not match this one: saved {saved:?}, this VM {ours:?}")]
    Shape {
        /// Shape in the stream.
        saved: Box<VmShape>,
        /// Shape of the restoring VM.
        ours: Box<VmShape>,
    },
    /// The state is inconsistent with its own shape.
    #[error("state is inconsistent: {0}")]
    Inconsistent(String),
    /// A memory record is malformed or outside RAM.
    #[error("memory record {header:#x} is invalid: {why}")]
    BadPage {
        /// The record header.
        header: u64,
        /// Why.
        why: &'static str,
    },
    /// A snapshot file cannot be created, written, synced or opened.
    #[error("snapshot file {path}: {source}")]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// A migration stream section tag we do not know.
    #[error("migration stream: unknown section tag {0}")]
    BadTag(u8),
    /// A migration stream ended (END) without the VM state.
    #[error("migration stream ended without the VM state section")]
    MissingState,
    /// The checksum does not match.
    #[error("state stream is corrupt: checksum {found:#018x}, computed {computed:#018x}")]
    Checksum {
        /// Checksum in the stream.
        found: u64,
        /// Checksum of what was read.
        computed: u64,
    },
}

/// What must match between the saved VM and the restoring one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmShape {
    /// RAM bytes.
    pub memory: u64,
    /// vCPU count.
    pub cpus: u32,
    /// In-kernel irqchip and PIT.
    pub irqchip: bool,
    /// Device identities in bus order, e.g. `"serial@0x3f8"`, `"virtio-net@0xd0000000"`.
    pub devices: Vec<String>,
}

/// One device's state. Slots for the devices vmm-min has; the VMM fills them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    /// The 16550 console.
    Serial {
        /// Identity, as in [`VmShape::devices`].
        id: String,
        /// Registers and pending input.
        state: SerialSnapshot,
    },
    /// A virtio-MMIO transport and its vhost-user rings.
    VirtioMmio {
        /// Identity, as in [`VmShape::devices`].
        id: String,
        /// Transport registers and queue set-up.
        transport: MmioState,
        /// Per queue: next available index, from `VHOST_USER_GET_VRING_BASE` (rings stopped, in
        /// flight requests drained); given back with `SET_VRING_BASE` on restore.
        vring_bases: Vec<u16>,
    },
}

impl DeviceState {
    /// The console's state.
    pub fn serial(id: impl Into<String>, dev: &crate::devices::serial::SerialDevice) -> Self {
        DeviceState::Serial {
            id: id.into(),
            state: dev.snapshot(),
        }
    }

    /// A virtio-MMIO transport's state; `vring_bases` from `GET_VRING_BASE` per queue.
    pub fn virtio_mmio(
        id: impl Into<String>,
        t: &crate::virtio::mmio::MmioTransport,
        vring_bases: Vec<u16>,
    ) -> Self {
        DeviceState::VirtioMmio {
            id: id.into(),
            transport: t.state().clone(),
            vring_bases,
        }
    }

    /// The device identity.
    pub fn id(&self) -> &str {
        match self {
            DeviceState::Serial { id, .. } | DeviceState::VirtioMmio { id, .. } => id,
        }
    }
}

/// Everything but memory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmSnapshot {
    /// VM shape.
    pub shape: VmShape,
    /// Per-VM KVM state.
    pub vm: VmState,
    /// Per-vCPU state, index order.
    pub vcpus: Vec<VcpuState>,
    /// Devices, in [`VmShape::devices`] order.
    pub devices: Vec<DeviceState>,
}

impl VmSnapshot {
    /// Checks the snapshot against its own shape (vCPU count, device list, irqchip).
    pub fn check_consistent(&self) -> Result<(), FormatError> {
        if self.vcpus.len() != self.shape.cpus as usize {
            return Err(FormatError::Inconsistent(format!(
                "{} vCPU states for {} vCPUs",
                self.vcpus.len(),
                self.shape.cpus
            )));
        }
        let ids: Vec<&str> = self.devices.iter().map(DeviceState::id).collect();
        if ids
            != self
                .shape
                .devices
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
        {
            return Err(FormatError::Inconsistent(format!(
                "device states {ids:?} do not match the device list {:?}",
                self.shape.devices
            )));
        }
        if self.vm.irqchip.is_some() != self.shape.irqchip {
            return Err(FormatError::Inconsistent(
                "irqchip state does not match the shape".into(),
            ));
        }
        Ok(())
    }
}

/// The stream checksum: FNV-1a 64 style over little-endian 64-bit words (a rotate after each
/// multiply), independent of how the data is split into `update` calls; a partial last word
/// is zero-padded and tagged with its length. Word-wise so that checking runs near memory
/// speed (the final pages of a migration are inside the downtime). Any single changed byte
/// changes the result (each step is a bijection of the running value).
pub(super) struct Fnv {
    h: u64,
    tail: [u8; 8],
    n: usize,
}

const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv_mix(h: u64, w: u64) -> u64 {
    (h ^ w).wrapping_mul(FNV_PRIME).rotate_left(29)
}

impl Fnv {
    pub(super) fn new() -> Self {
        Self {
            h: 0xcbf2_9ce4_8422_2325,
            tail: [0; 8],
            n: 0,
        }
    }

    pub(super) fn update(&mut self, data: &[u8]) {
        let mut d = data;
        if self.n > 0 {
            let take = (8 - self.n).min(d.len());
            self.tail[self.n..self.n + take].copy_from_slice(&d[..take]);
            self.n += take;
            d = &d[take..];
            if self.n < 8 {
                return;
            }
            self.h = fnv_mix(self.h, u64::from_le_bytes(self.tail));
            self.n = 0;
        }
        // Fast path (page buffers are 8-byte aligned): whole words straight from memory.
        // SAFETY: every bit pattern is a valid u64; align_to only reinterprets the aligned
        // middle of the byte slice, which stays borrowed for the loop.
        let (pre, mid, _) = unsafe { d.align_to::<u64>() };
        if pre.is_empty() && !mid.is_empty() {
            let mut h = self.h;
            if cfg!(target_endian = "little") {
                for &w in mid {
                    h = (h ^ w).wrapping_mul(FNV_PRIME).rotate_left(29);
                }
            } else {
                for &w in mid {
                    h = fnv_mix(h, u64::from_le(w));
                }
            }
            self.h = h;
            d = &d[mid.len() * 8..];
        }
        let mut words = d.chunks_exact(8);
        for w in &mut words {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            self.h = fnv_mix(self.h, u64::from_le_bytes(b));
        }
        let rest = words.remainder();
        self.tail[..rest.len()].copy_from_slice(rest);
        self.n = rest.len();
    }

    /// The checksum of everything so far.
    pub(super) fn value(&self) -> u64 {
        if self.n == 0 {
            return self.h;
        }
        let mut b = [0u8; 8];
        b[..self.n].copy_from_slice(&self.tail[..self.n]);
        fnv_mix(self.h, u64::from_le_bytes(b) ^ ((self.n as u64) << 59))
    }
}

static ZERO_PAGE: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];

/// True when `page` is all zeros (a `memcmp` against a zero page: fast in any build profile).
pub(super) fn is_zero_page(page: &[u8]) -> bool {
    match ZERO_PAGE.get(..page.len()) {
        Some(z) => page == z,
        None => page.iter().all(|&b| b == 0),
    }
}

pub(super) struct Writer<W> {
    pub(super) w: W,
    pub(super) sum: Fnv,
    pub(super) n: u64,
}

impl<W: Write> Writer<W> {
    pub(super) fn put(&mut self, data: &[u8]) -> Result<(), FormatError> {
        self.sum.update(data);
        self.n += data.len() as u64;
        self.w.write_all(data).map_err(|source| FormatError::Io {
            what: "writing",
            source,
        })
    }
}

pub(super) struct Reader<R> {
    pub(super) r: R,
    pub(super) sum: Fnv,
}

impl<R: Read> Reader<R> {
    /// Reads and checks the magic and the format version every stream of ours starts with.
    pub(super) fn header(&mut self, expected: &[u8; 8]) -> Result<(), FormatError> {
        let mut magic = [0u8; 8];
        self.get(&mut magic, "the magic")?;
        if &magic != expected {
            return Err(FormatError::BadMagic { found: magic });
        }
        let mut v = [0u8; 4];
        self.get(&mut v, "the version")?;
        let version = u32::from_le_bytes(v);
        if version != FORMAT_VERSION {
            return Err(FormatError::Version {
                found: version,
                expected: FORMAT_VERSION,
            });
        }
        Ok(())
    }

    pub(super) fn get(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), FormatError> {
        self.r.read_exact(buf).map_err(|source| {
            if source.kind() == std::io::ErrorKind::UnexpectedEof {
                FormatError::Truncated { what }
            } else {
                FormatError::Io { what, source }
            }
        })?;
        self.sum.update(buf);
        Ok(())
    }

    /// Reads a section of `len` bytes (`len` at most [`MAX_STATE_LEN`], checked by the caller)
    /// in pieces of at most [`READ_CHUNK`]: memory grows with the bytes that arrive, not with
    /// what a corrupt or hostile length field claims.
    pub(super) fn get_vec(&mut self, len: u64, what: &'static str) -> Result<Vec<u8>, FormatError> {
        let len = usize::try_from(len).map_err(|_| FormatError::StateTooLarge(len))?;
        let mut v = Vec::with_capacity(len.min(READ_CHUNK));
        while v.len() < len {
            let at = v.len();
            v.resize(at + (len - at).min(READ_CHUNK), 0);
            self.get(&mut v[at..], what)?;
        }
        Ok(v)
    }

    pub(super) fn u64(&mut self, what: &'static str) -> Result<u64, FormatError> {
        let mut b = [0u8; 8];
        self.get(&mut b, what)?;
        Ok(u64::from_le_bytes(b))
    }
}

/// Coalesces consecutive ZERO records into one [`GuestRam::zero_range`] call.
pub(super) struct ZeroRun<'a> {
    ram: &'a GuestRam,
    start: u64,
    len: u64,
}

impl<'a> ZeroRun<'a> {
    pub(super) fn new(ram: &'a GuestRam) -> Self {
        Self {
            ram,
            start: 0,
            len: 0,
        }
    }

    /// Adds the zero page at `gpa`.
    pub(super) fn add(&mut self, gpa: u64) -> Result<(), FormatError> {
        if self.len > 0 && self.start + self.len == gpa {
            self.len += PAGE_SIZE;
            return Ok(());
        }
        self.flush()?;
        self.start = gpa;
        self.len = PAGE_SIZE;
        Ok(())
    }

    /// Zeroes the pending run (before any page content is written, and at the end).
    pub(super) fn flush(&mut self) -> Result<(), FormatError> {
        if self.len > 0 {
            self.ram
                .zero_range(self.start, self.len)
                .map_err(|source| FormatError::Io {
                    what: "zeroing guest RAM",
                    source,
                })?;
            self.len = 0;
        }
        Ok(())
    }
}

pub(super) fn mem_err(
    what: &'static str,
) -> impl FnOnce(vm_memory::GuestMemoryError) -> FormatError {
    move |e| FormatError::Io {
        what,
        source: std::io::Error::other(e.to_string()),
    }
}

/// Writes `snap` and every page of `ram` (zero pages as ZERO records) to `w`; returns the bytes
/// written.
pub fn write_snapshot<W: Write>(
    w: W,
    snap: &VmSnapshot,
    ram: &GuestRam,
) -> Result<u64, FormatError> {
    snap.check_consistent()?;
    let mut w = Writer {
        w,
        sum: Fnv::new(),
        n: 0,
    };
    let json = serde_json::to_vec(snap)?;
    w.put(MAGIC)?;
    w.put(&FORMAT_VERSION.to_le_bytes())?;
    w.put(&(json.len() as u64).to_le_bytes())?;
    w.put(&json)?;
    let mut page = vec![0u8; PAGE_SIZE as usize];
    // Untouched pages (memfd holes) are zero records without being read (reading allocates).
    let data = ram.data_extents().ok();
    for r in ram.ranges() {
        let mut gpa = r.guest_addr;
        while gpa < r.guest_addr + r.len {
            if let Some(ext) = &data
                && !super::migration::in_extents(ext, gpa)
            {
                w.put(&(gpa | KIND_ZERO).to_le_bytes())?;
                gpa += PAGE_SIZE;
                continue;
            }
            ram.mem()
                .read_slice(&mut page, GuestAddress(gpa))
                .map_err(mem_err("reading guest RAM"))?;
            if !is_zero_page(&page) {
                w.put(&(gpa | KIND_PAGE).to_le_bytes())?;
                w.put(&page)?;
            } else {
                w.put(&(gpa | KIND_ZERO).to_le_bytes())?;
            }
            gpa += PAGE_SIZE;
        }
    }
    w.put(&END.to_le_bytes())?;
    let sum = w.sum.value();
    w.put(&sum.to_le_bytes())?;
    w.w.flush().map_err(|source| FormatError::Io {
        what: "flushing",
        source,
    })?;
    Ok(w.n)
}

/// Reads a stream written by [`write_snapshot`] for a VM of shape `ours`, writing its pages into
/// `ram`. Returns the non-memory state, to be given to [`super::restore_vm`].
pub fn read_snapshot<R: Read>(
    r: R,
    ours: &VmShape,
    ram: &GuestRam,
) -> Result<VmSnapshot, FormatError> {
    let mut r = Reader { r, sum: Fnv::new() };
    r.header(MAGIC)?;
    let len = r.u64("the state length")?;
    if len > MAX_STATE_LEN {
        return Err(FormatError::StateTooLarge(len));
    }
    let json = r.get_vec(len, "the state section")?;
    let snap: VmSnapshot = serde_json::from_slice(&json)?;
    if snap.shape != *ours {
        return Err(FormatError::Shape {
            saved: Box::new(snap.shape.clone()),
            ours: Box::new(ours.clone()),
        });
    }
    snap.check_consistent()?;
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let mut zeros = ZeroRun::new(ram);
    loop {
        let header = r.u64("a memory record")?;
        if header == END {
            break;
        }
        let kind = header & (PAGE_SIZE - 1);
        let gpa = header & !(PAGE_SIZE - 1);
        if !ram.contains(gpa, PAGE_SIZE) {
            return Err(FormatError::BadPage {
                header,
                why: "page outside guest RAM",
            });
        }
        match kind {
            KIND_PAGE => {
                r.get(&mut page, "a memory page")?;
                zeros.flush()?;
                ram.mem()
                    .write_slice(&page, GuestAddress(gpa))
                    .map_err(mem_err("writing guest RAM"))?;
            }
            KIND_ZERO => zeros.add(gpa)?,
            _ => {
                return Err(FormatError::BadPage {
                    header,
                    why: "unknown record kind",
                });
            }
        }
    }
    zeros.flush()?;
    let computed = r.sum.value();
    let found = r.u64("the checksum")?;
    if found != computed {
        return Err(FormatError::Checksum { found, computed });
    }
    Ok(snap)
}

/// Writes a snapshot file atomically: to `PATH.tmp`, synced, then renamed over `path`, so a
/// crash never leaves a partial file under the final name. Returns the bytes written.
pub fn save_file(
    path: &std::path::Path,
    snap: &VmSnapshot,
    ram: &GuestRam,
) -> Result<u64, FormatError> {
    let file_err = |p: &std::path::Path| {
        let p = p.to_path_buf();
        move |source| FormatError::File { path: p, source }
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp_name);
    let f = std::fs::File::create(&tmp).map_err(file_err(&tmp))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    let n = match write_snapshot(&mut w, snap, ram) {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let f = w.into_inner().map_err(|e| FormatError::File {
        path: tmp.clone(),
        source: e.into_error(),
    })?;
    f.sync_all().map_err(file_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(file_err(path))?;
    Ok(n)
}

/// Reads a snapshot file written by [`save_file`] (see [`read_snapshot`]).
pub fn load_file(
    path: &std::path::Path,
    ours: &VmShape,
    ram: &GuestRam,
) -> Result<VmSnapshot, FormatError> {
    let f = std::fs::File::open(path).map_err(|source| FormatError::File {
        path: path.to_path_buf(),
        source,
    })?;
    read_snapshot(std::io::BufReader::with_capacity(1 << 20, f), ours, ram)
}
