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
//!   4 SYNC   no payload: the destination answers one byte (`SYNC_DONE`, on the same
//!            connection) once every record before it is in its RAM (the source waits for it
//!            before stopping the guest, so that no pre-copy backlog is left for the downtime)
//!   5 STOPPED no payload: the source is stopping the guest; what follows is the switch-over
//!            (the destination may raise its priority)
//! ```
//!
//! The destination applies pages to its (not yet running) RAM as they arrive and returns the
//! state only after a valid END: a stream cut or corrupted anywhere gives an error, and the
//! caller must then not start the VM. The source is unaffected by a failed send (it only reads
//! its RAM).

use std::io::{BufRead, Read, Write};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::format::{
    END, FORMAT_VERSION, Fnv, FormatError, KIND_PAGE, KIND_ZERO, MAX_STATE_LEN, PAGE_SIZE, Reader,
    VmShape, VmSnapshot, ZeroRun, is_zero_page, mem_err,
};
use crate::memory::GuestRam;

/// Migration stream magic.
pub const MIGRATION_MAGIC: &[u8; 8] = b"COLOVMMG";
const TAG_PAGES: u8 = 1;
const TAG_STATE: u8 = 2;
const TAG_END: u8 = 3;
const TAG_SYNC: u8 = 4;
const TAG_STOPPED: u8 = 5;
/// The destination's answer to a SYNC section.
pub const SYNC_DONE: u8 = 2;
/// Bytes the sender gathers before one write to the transport (and the receiver's buffer).
pub const IO_BUFFER: usize = 2 << 20;
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

/// The sending side. Records are gathered in one buffer of [`IO_BUFFER`] bytes (a page is
/// read from guest RAM straight into it: one copy) and written to the transport in one call.
pub struct StreamWriter<W: Write> {
    w: W,
    buf: Vec<u8>,
    fill: usize,
    sum: Fnv,
    n: u64,
    stats: StreamStats,
    io_time: Duration,
}

const RECORD: usize = 8 + PAGE_SIZE as usize;

/// Checksums `data` and writes it to the transport, adding the write's duration to `io_time`.
fn write_out<W: Write>(
    w: &mut W,
    sum: &mut Fnv,
    io_time: &mut Duration,
    data: &[u8],
) -> Result<(), FormatError> {
    sum.update(data);
    let t = Instant::now();
    let r = w.write_all(data);
    *io_time += t.elapsed();
    r.map_err(|source| FormatError::Io {
        what: "writing",
        source,
    })
}

impl<W: Write> StreamWriter<W> {
    /// Writes the stream header for a VM of `shape`.
    pub fn start(w: W, shape: &VmShape) -> Result<Self, FormatError> {
        let mut me = Self {
            w,
            buf: vec![0u8; IO_BUFFER],
            fill: 0,
            sum: Fnv::new(),
            n: 0,
            stats: StreamStats::default(),
            io_time: Duration::ZERO,
        };
        let json = serde_json::to_vec(shape)?;
        me.put(MIGRATION_MAGIC)?;
        me.put(&FORMAT_VERSION.to_le_bytes())?;
        me.put(&(json.len() as u64).to_le_bytes())?;
        me.put(&json)?;
        Ok(me)
    }

    /// Writes the buffered bytes to the transport (checksummed first).
    fn drain(&mut self) -> Result<(), FormatError> {
        if self.fill == 0 {
            return Ok(());
        }
        let b = &self.buf[..self.fill];
        let r = write_out(&mut self.w, &mut self.sum, &mut self.io_time, b);
        self.fill = 0;
        r
    }

    fn put(&mut self, data: &[u8]) -> Result<(), FormatError> {
        self.n += data.len() as u64;
        if self.fill + data.len() > self.buf.len() {
            self.drain()?;
        }
        if data.len() > self.buf.len() {
            return write_out(&mut self.w, &mut self.sum, &mut self.io_time, data);
        }
        self.buf[self.fill..self.fill + data.len()].copy_from_slice(data);
        self.fill += data.len();
        Ok(())
    }

    /// Writes what is buffered and flushes the transport.
    fn flush(&mut self, what: &'static str) -> Result<(), FormatError> {
        self.drain()?;
        let t = Instant::now();
        let r = self.w.flush();
        self.io_time += t.elapsed();
        r.map_err(|source| FormatError::Io { what, source })
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
        for chunk in gpas.chunks(MAX_PAGES_PER_SECTION as usize) {
            self.put(&[TAG_PAGES])?;
            self.put(&(chunk.len() as u32).to_le_bytes())?;
            for &gpa in chunk {
                let gpa = gpa & !(PAGE_SIZE - 1);
                if let Some(ext) = data
                    && !in_extents(ext, gpa)
                {
                    self.put(&(gpa | KIND_ZERO).to_le_bytes())?;
                    self.stats.zero_pages += 1;
                    continue;
                }
                if self.fill + RECORD > self.buf.len() {
                    self.drain()?;
                }
                let at = self.fill;
                let page = &mut self.buf[at + 8..at + RECORD];
                page_from_ram(ram, gpa, page)?;
                let kind = if is_zero_page(page) {
                    self.stats.zero_pages += 1;
                    self.fill += 8;
                    self.n += 8;
                    KIND_ZERO
                } else {
                    self.stats.pages += 1;
                    self.fill += RECORD;
                    self.n += RECORD as u64;
                    KIND_PAGE
                };
                self.buf[at..at + 8].copy_from_slice(&(gpa | kind).to_le_bytes());
            }
        }
        self.flush("flushing pages")
    }

    /// Sends a SYNC section: the destination answers [`SYNC_DONE`] once everything before it
    /// is in its RAM.
    pub fn sync(&mut self) -> Result<(), FormatError> {
        self.put(&[TAG_SYNC])?;
        self.flush("flushing a sync request")
    }

    /// Sends a STOPPED section: the switch-over begins.
    pub fn stopping(&mut self) -> Result<(), FormatError> {
        self.put(&[TAG_STOPPED])?;
        self.flush("flushing the switch-over marker")
    }

    #[cfg(test)]
    pub(super) fn w_into_inner_for_test(mut self) -> W {
        let _ = self.drain();
        self.w
    }

    /// Bytes, pages and zero pages sent so far.
    pub fn stats(&self) -> StreamStats {
        StreamStats {
            bytes: self.n,
            ..self.stats
        }
    }

    /// Time spent in the transport's `write` and `flush` so far.
    pub fn io_time(&self) -> Duration {
        self.io_time
    }

    /// Sends the VM state (source stopped) and END; returns the transport and the counters.
    pub fn finish(mut self, snap: &VmSnapshot) -> Result<(W, StreamStats), FormatError> {
        snap.check_consistent()?;
        let json = serde_json::to_vec(snap)?;
        self.put(&[TAG_STATE])?;
        self.put(&(json.len() as u64).to_le_bytes())?;
        self.put(&json)?;
        self.put(&[TAG_END])?;
        self.drain()?;
        let sum = self.sum.value();
        self.put(&sum.to_le_bytes())?;
        self.flush("flushing the end of the stream")?;
        let stats = self.stats();
        Ok((self.w, stats))
    }
}

/// When the destination saw the parts of the stream (for the downtime breakdown).
#[derive(Debug, Clone, Copy, Default)]
pub struct ReceiveReport {
    /// When the last SYNC was answered (the source stops the guest after it).
    pub last_sync: Option<Instant>,
    /// Pages (content and zero) received after the last SYNC.
    pub pages_after_sync: u64,
    /// When STOPPED arrived.
    pub stopped: Option<Instant>,
    /// When the STATE section began and when its JSON was parsed and checked.
    pub state_start: Option<Instant>,
    /// See `state_start`.
    pub state_parsed: Option<Instant>,
    /// Length of the state's JSON.
    pub state_len: usize,
    /// When END was verified.
    pub end: Option<Instant>,
}

/// Markers in the stream the receiver's caller acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    /// SYNC: everything before it is in RAM; answer [`SYNC_DONE`].
    Sync,
    /// STOPPED: the source is stopping the guest.
    Stopped,
}

/// Receives a whole migration stream into `ram` for a VM of shape `ours`. Returns the VM state
/// only after a valid END. SYNC sections are not answered (see [`receive_with`]).
pub fn receive<R: Read>(
    r: R,
    ours: &VmShape,
    ram: &GuestRam,
) -> Result<(VmSnapshot, StreamStats), FormatError> {
    receive_with(r, ours, ram, &mut |_| Ok(())).map(|(s, st, _)| (s, st))
}

/// [`receive`], calling `on_marker` at each SYNC section (once everything before it is in
/// `ram`; the caller answers [`SYNC_DONE`]) and at STOPPED; also reports when the parts
/// arrived.
pub fn receive_with<R: Read>(
    r: R,
    ours: &VmShape,
    ram: &GuestRam,
    on_marker: &mut dyn FnMut(Marker) -> std::io::Result<()>,
) -> Result<(VmSnapshot, StreamStats, ReceiveReport), FormatError> {
    let mut r = Reader {
        r: std::io::BufReader::with_capacity(IO_BUFFER, r),
        sum: Fnv::new(),
    };
    let mut stats = StreamStats::default();
    let mut report = ReceiveReport::default();
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
    let mut known = KnownZero::new(ram);
    let mut pages_at_sync = 0;
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
                            stats.pages += 1;
                            zeros.flush()?;
                            known.written(gpa);
                            page_into_ram(&mut r, &mut page, ram, gpa)?;
                        }
                        KIND_ZERO => {
                            // A page still a hole of the memfd reads as zeros already: no
                            // punch-hole syscall (most zero records of the first pass).
                            if !known.is_zero(gpa) {
                                zeros.add(gpa)?;
                            }
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
            TAG_SYNC => {
                zeros.flush()?;
                on_marker(Marker::Sync).map_err(|source| FormatError::Io {
                    what: "answering a sync request",
                    source,
                })?;
                report.last_sync = Some(Instant::now());
                pages_at_sync = stats.pages + stats.zero_pages;
            }
            TAG_STOPPED => {
                report.stopped = Some(Instant::now());
                on_marker(Marker::Stopped).map_err(|source| FormatError::Io {
                    what: "the switch-over marker",
                    source,
                })?;
            }
            TAG_STATE => {
                report.state_start = Some(Instant::now());
                let blob = read_blob(&mut r, "the state")?;
                report.state_len = blob.len();
                let snap: VmSnapshot = serde_json::from_slice(&blob)?;
                if snap.shape != *ours {
                    return Err(FormatError::Shape {
                        saved: Box::new(snap.shape),
                        ours: Box::new(ours.clone()),
                    });
                }
                snap.check_consistent()?;
                report.state_parsed = Some(Instant::now());
                state = Some(snap);
            }
            TAG_END => {
                let computed = r.sum.value();
                let found = r.u64("the checksum")?;
                if found != computed {
                    return Err(FormatError::Checksum { found, computed });
                }
                let snap = state.ok_or(FormatError::MissingState)?;
                report.end = Some(Instant::now());
                report.pages_after_sync = stats.pages + stats.zero_pages - pages_at_sync;
                return Ok((snap, stats, report));
            }
            t => return Err(FormatError::BadTag(t)),
        }
    }
}

/// The destination's pages that certainly read as zeros: holes of the memfd when the receive
/// began (the VM is paused and its backends' rings are stopped, so nothing else writes RAM)
/// and not written by a PAGE record since. A ZERO record for such a page needs no work; the
/// other ZERO records punch a hole as before. Unknown extents (`SEEK_DATA` failed, or an
/// address space too large for the bitmap) make every page "may hold data".
struct KnownZero {
    initial: Option<Vec<(u64, u64)>>,
    written: Vec<u64>,
}

impl KnownZero {
    /// Largest bitmap kept, in 64-bit words (2 MiB: 64 GiB of guest address space).
    const MAX_WORDS: u64 = 1 << 18;

    fn new(ram: &GuestRam) -> Self {
        let end = ram
            .ranges()
            .iter()
            .map(|r| r.guest_addr.saturating_add(r.len))
            .max()
            .unwrap_or(0);
        let words = (end / PAGE_SIZE).div_ceil(64);
        if words > Self::MAX_WORDS {
            return Self {
                initial: None,
                written: Vec::new(),
            };
        }
        Self {
            initial: ram.data_extents().ok(),
            written: vec![0; words as usize],
        }
    }

    fn bit(gpa: u64) -> (usize, u64) {
        let i = gpa / PAGE_SIZE;
        ((i / 64) as usize, 1u64 << (i % 64))
    }

    fn written(&mut self, gpa: u64) {
        let (w, b) = Self::bit(gpa);
        match self.written.get_mut(w) {
            Some(x) => *x |= b,
            None => self.initial = None,
        }
    }

    fn is_zero(&self, gpa: u64) -> bool {
        let Some(ext) = &self.initial else {
            return false;
        };
        let (w, b) = Self::bit(gpa);
        !in_extents(ext, gpa) && self.written.get(w).is_some_and(|x| x & b == 0)
    }
}

/// Reads one page's content into guest RAM at `gpa`: straight from the read buffer when the
/// whole page is there (one copy), else through `page`.
fn page_into_ram<R: Read>(
    r: &mut Reader<std::io::BufReader<R>>,
    page: &mut [u8],
    ram: &GuestRam,
    gpa: u64,
) -> Result<(), FormatError> {
    let n = page.len();
    let buffered = r.r.buffer();
    if buffered.len() >= n {
        let b = &buffered[..n];
        r.sum.update(b);
        page_into_guest(ram, gpa, b)?;
        r.r.consume(n);
        return Ok(());
    }
    r.get(page, "a memory page")?;
    page_into_guest(ram, gpa, page)
}

// Pages are copied with 8-byte moves, not `memcpy`: glibc copies 4 KiB with `rep movsb` on
// CPUs that advertise ERMS, and under TCG (the nested KVM lab) that instruction is emulated
// one byte per step, several times slower than a loop of word moves. Natively both run at
// memory speed. Guest RAM is accessed with volatile word accesses (the guest or a backend may
// write it concurrently on the source).

/// Copies the guest page at `gpa` into `dst` (`PAGE_SIZE` bytes).
fn page_from_ram(ram: &GuestRam, gpa: u64, dst: &mut [u8]) -> Result<(), FormatError> {
    let words = PAGE_SIZE as usize / 8;
    if dst.len() != PAGE_SIZE as usize {
        return Err(FormatError::BadPage {
            header: gpa,
            why: "page buffer of the wrong size",
        });
    }
    let slice = ram
        .mem()
        .get_slice(GuestAddress(gpa), PAGE_SIZE as usize)
        .map_err(mem_err("reading guest RAM"))?;
    let guard = slice.ptr_guard();
    let src = guard.as_ptr().cast::<u64>();
    if !src.is_aligned() {
        return ram
            .mem()
            .read_slice(dst, GuestAddress(gpa))
            .map_err(mem_err("reading guest RAM"));
    }
    let out = dst.as_mut_ptr().cast::<u64>();
    for i in 0..words {
        // SAFETY: `src` points at PAGE_SIZE bytes of mapped guest RAM (get_slice checked the
        // range; the guard keeps the mapping) and is 8-byte aligned (checked), `out` at
        // PAGE_SIZE bytes of `dst` (checked); i < PAGE_SIZE / 8. Unaligned writes to `dst`.
        unsafe { out.add(i).write_unaligned(src.add(i).read_volatile()) };
    }
    Ok(())
}

/// Copies `src` (`PAGE_SIZE` bytes) into the guest page at `gpa`.
fn page_into_guest(ram: &GuestRam, gpa: u64, src: &[u8]) -> Result<(), FormatError> {
    let words = PAGE_SIZE as usize / 8;
    let slice = ram
        .mem()
        .get_slice(GuestAddress(gpa), PAGE_SIZE as usize)
        .map_err(mem_err("writing guest RAM"))?;
    let guard = slice.ptr_guard_mut();
    let dst = guard.as_ptr().cast::<u64>();
    if src.len() != PAGE_SIZE as usize || !dst.is_aligned() {
        return ram
            .mem()
            .write_slice(src, GuestAddress(gpa))
            .map_err(mem_err("writing guest RAM"));
    }
    let from = src.as_ptr().cast::<u64>();
    for i in 0..words {
        // SAFETY: `dst` points at PAGE_SIZE bytes of mapped guest RAM (get_slice checked the
        // range; the guard keeps the mapping), 8-byte aligned (checked); `from` at PAGE_SIZE
        // bytes of `src` (checked), read unaligned; i < PAGE_SIZE / 8.
        unsafe { dst.add(i).write_volatile(from.add(i).read_unaligned()) };
    }
    Ok(())
}

fn read_blob<R: Read>(r: &mut Reader<R>, what: &'static str) -> Result<Vec<u8>, FormatError> {
    let len = r.u64(what)?;
    if len > MAX_STATE_LEN {
        return Err(FormatError::StateTooLarge(len));
    }
    r.get_vec(len, what)
}
