//! The live-migration stream: memory first (in as many passes as the source needs), then the
//! VM state once the source has stopped, then a checksum. The transport is any byte stream
//! (a `TcpStream` for `tcp:HOST:PORT`).
//!
//! ```text
//! magic    8 bytes "COLOVMMG"
//! version  u32 LE  FORMAT_VERSION (shared with snapshot files)
//! shape    u64 LE length + JSON VmShape   (the destination refuses a different VM at once)
//! sections, each a tag byte:
//!   1 PAGES  u32 LE count, then count memory records as in snapshot files (PAGE or ZERO)
//!   2 STATE  u64 LE length + JSON VmSnapshot (exactly once, after the last PAGES)
//!   3 END    u64 LE checksum of every byte before it (as in snapshot files)
//! ```
//!
//! The destination applies pages to its (not yet running) RAM as they arrive and returns the
//! state only after a valid END: a stream cut or corrupted anywhere gives an error, and the
//! caller must then not start the VM. The source is unaffected by a failed send (it only reads
//! its RAM).

use std::io::{Read, Write};

use vm_memory::{Bytes, GuestAddress};

use super::format::{
    END, FORMAT_VERSION, Fnv, FormatError, KIND_PAGE, KIND_ZERO, MAX_STATE_LEN, PAGE_SIZE, Reader,
    VmShape, VmSnapshot, Writer, ZeroRun, is_zero_page, mem_err,
};
use crate::memory::GuestRam;

/// Migration stream magic.
pub const MIGRATION_MAGIC: &[u8; 8] = b"COLOVMMG";
const TAG_PAGES: u8 = 1;
const TAG_STATE: u8 = 2;
const TAG_END: u8 = 3;
/// Largest page count in one PAGES section.
pub const MAX_PAGES_PER_SECTION: u32 = 1 << 20;

/// Counters of a send or a receive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Bytes on the wire (counted by the sender; 0 from [`receive`]).
    pub bytes: u64,
    /// Pages sent with content.
    pub pages: u64,
    /// Pages sent as zero records.
    pub zero_pages: u64,
}

/// Every page address of `ram` (the first pass of a pre-copy).
pub fn all_pages(ram: &GuestRam) -> Vec<u64> {
    ram.ranges()
        .iter()
        .flat_map(|r| (0..r.len / PAGE_SIZE).map(move |i| r.guest_addr + i * PAGE_SIZE))
        .collect()
}

/// The page addresses set in per-slot dirty bitmaps (`(slot guest address, bitmap)`, one bit
/// per 4 KiB page, as [`crate::vm::DirtyTracker::collect`] returns them).
pub fn pages_from_bitmaps(bitmaps: &[(u64, Vec<u64>)]) -> Vec<u64> {
    let mut out = Vec::new();
    for (base, words) in bitmaps {
        for (i, &w) in words.iter().enumerate() {
            let mut w = w;
            while w != 0 {
                let bit = u64::from(w.trailing_zeros());
                out.push(base + (i as u64 * 64 + bit) * PAGE_SIZE);
                w &= w - 1;
            }
        }
    }
    out
}

/// True when `gpa` lies in one of the sorted `[start, end)` extents.
pub fn in_extents(ext: &[(u64, u64)], gpa: u64) -> bool {
    let i = ext.partition_point(|e| e.1 <= gpa);
    ext.get(i).is_some_and(|e| e.0 <= gpa)
}

/// The sending side.
pub struct StreamWriter<W: Write> {
    w: Writer<W>,
    stats: StreamStats,
}

impl<W: Write> StreamWriter<W> {
    /// Writes the stream header for a VM of `shape`.
    pub fn start(w: W, shape: &VmShape) -> Result<Self, FormatError> {
        let mut w = Writer {
            w,
            sum: Fnv::new(),
            n: 0,
        };
        let json = serde_json::to_vec(shape)?;
        w.put(MIGRATION_MAGIC)?;
        w.put(&FORMAT_VERSION.to_le_bytes())?;
        w.put(&(json.len() as u64).to_le_bytes())?;
        w.put(&json)?;
        Ok(Self {
            w,
            stats: StreamStats::default(),
        })
    }

    /// Sends the current content of the pages at `gpas` (page-aligned guest addresses); zero
    /// pages go as 8-byte records.
    pub fn send_pages(&mut self, ram: &GuestRam, gpas: &[u64]) -> Result<(), FormatError> {
        self.send_pages_in(ram, gpas, None)
    }

    /// [`StreamWriter::send_pages`]; pages outside `data` (from [`GuestRam::data_extents`],
    /// taken after dirty logging was switched on) are sent as zero records without being read.
    pub fn send_pages_in(
        &mut self,
        ram: &GuestRam,
        gpas: &[u64],
        data: Option<&[(u64, u64)]>,
    ) -> Result<(), FormatError> {
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for chunk in gpas.chunks(MAX_PAGES_PER_SECTION as usize) {
            self.w.put(&[TAG_PAGES])?;
            self.w.put(&(chunk.len() as u32).to_le_bytes())?;
            for &gpa in chunk {
                let gpa = gpa & !(PAGE_SIZE - 1);
                if let Some(ext) = data
                    && !in_extents(ext, gpa)
                {
                    self.w.put(&(gpa | KIND_ZERO).to_le_bytes())?;
                    self.stats.zero_pages += 1;
                    continue;
                }
                ram.mem()
                    .read_slice(&mut page, GuestAddress(gpa))
                    .map_err(mem_err("reading guest RAM"))?;
                if is_zero_page(&page) {
                    self.w.put(&(gpa | KIND_ZERO).to_le_bytes())?;
                    self.stats.zero_pages += 1;
                } else {
                    self.w.put(&(gpa | KIND_PAGE).to_le_bytes())?;
                    self.w.put(&page)?;
                    self.stats.pages += 1;
                }
            }
        }
        self.w.w.flush().map_err(|source| FormatError::Io {
            what: "flushing pages",
            source,
        })
    }

    #[cfg(test)]
    pub(super) fn w_into_inner_for_test(self) -> W {
        self.w.w
    }

    /// Bytes, pages and zero pages sent so far.
    pub fn stats(&self) -> StreamStats {
        StreamStats {
            bytes: self.w.n,
            ..self.stats
        }
    }

    /// Sends the VM state (source stopped) and END; returns the transport and the counters.
    pub fn finish(mut self, snap: &VmSnapshot) -> Result<(W, StreamStats), FormatError> {
        snap.check_consistent()?;
        let json = serde_json::to_vec(snap)?;
        self.w.put(&[TAG_STATE])?;
        self.w.put(&(json.len() as u64).to_le_bytes())?;
        self.w.put(&json)?;
        self.w.put(&[TAG_END])?;
        let sum = self.w.sum.value();
        self.w.put(&sum.to_le_bytes())?;
        self.w.w.flush().map_err(|source| FormatError::Io {
            what: "flushing the end of the stream",
            source,
        })?;
        let stats = self.stats();
        Ok((self.w.w, stats))
    }
}

/// Receives a whole migration stream into `ram` for a VM of shape `ours`. Returns the VM state
/// only after a valid END.
pub fn receive<R: Read>(
    r: R,
    ours: &VmShape,
    ram: &GuestRam,
) -> Result<(VmSnapshot, StreamStats), FormatError> {
    let mut r = Reader { r, sum: Fnv::new() };
    let mut stats = StreamStats::default();
    r.header(MIGRATION_MAGIC)?;
    let shape: VmShape = serde_json::from_slice(&read_blob(&mut r, "the VM shape")?)?;
    if shape != *ours {
        return Err(FormatError::Shape {
            saved: Box::new(shape),
            ours: Box::new(ours.clone()),
        });
    }
    let mut state: Option<VmSnapshot> = None;
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let mut zeros = ZeroRun::new(ram);
    loop {
        let mut tag = [0u8; 1];
        r.get(&mut tag, "a section tag")?;
        match tag[0] {
            TAG_PAGES => {
                let mut c = [0u8; 4];
                r.get(&mut c, "a page count")?;
                let count = u32::from_le_bytes(c);
                if count > MAX_PAGES_PER_SECTION {
                    return Err(FormatError::BadPage {
                        header: u64::from(count),
                        why: "too many pages in one section",
                    });
                }
                for _ in 0..count {
                    let header = r.u64("a memory record")?;
                    let kind = header & (PAGE_SIZE - 1);
                    let gpa = header & !(PAGE_SIZE - 1);
                    if header == END || !ram.contains(gpa, PAGE_SIZE) {
                        return Err(FormatError::BadPage {
                            header,
                            why: "page outside guest RAM",
                        });
                    }
                    match kind {
                        KIND_PAGE => {
                            r.get(&mut page, "a memory page")?;
                            stats.pages += 1;
                            zeros.flush()?;
                            ram.mem()
                                .write_slice(&page, GuestAddress(gpa))
                                .map_err(mem_err("writing guest RAM"))?;
                        }
                        KIND_ZERO => {
                            zeros.add(gpa)?;
                            stats.zero_pages += 1;
                        }
                        _ => {
                            return Err(FormatError::BadPage {
                                header,
                                why: "unknown record kind",
                            });
                        }
                    }
                }
                zeros.flush()?;
            }
            TAG_STATE => {
                let snap: VmSnapshot = serde_json::from_slice(&read_blob(&mut r, "the state")?)?;
                if snap.shape != *ours {
                    return Err(FormatError::Shape {
                        saved: Box::new(snap.shape),
                        ours: Box::new(ours.clone()),
                    });
                }
                snap.check_consistent()?;
                state = Some(snap);
            }
            TAG_END => {
                let computed = r.sum.value();
                let found = r.u64("the checksum")?;
                if found != computed {
                    return Err(FormatError::Checksum { found, computed });
                }
                let snap = state.ok_or(FormatError::MissingState)?;
                return Ok((snap, stats));
            }
            t => return Err(FormatError::BadTag(t)),
        }
    }
}

fn read_blob<R: Read>(r: &mut Reader<R>, what: &'static str) -> Result<Vec<u8>, FormatError> {
    let len = r.u64(what)?;
    if len > MAX_STATE_LEN {
        return Err(FormatError::StateTooLarge(len));
    }
    let mut b = vec![0u8; len as usize];
    r.get(&mut b, what)?;
    Ok(b)
}
