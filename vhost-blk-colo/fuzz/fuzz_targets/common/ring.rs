//! Guest memory and split virtqueues written from fuzzer choices, for the targets that run a
//! backend's real queue handling in-process (`VhostUserBackend::handle_event` on a
//! `VringRwLock` over `GuestMemoryMmap`, as the vhost-user daemon calls it, minus the socket).
//!
//! The same file is in `vhost-blk-colo/fuzz` and `vhost-net-colo/fuzz` (separate crates).
//!
//! Memory: three regions, the first two adjacent (a buffer may straddle them and must come out
//! as two slices), then a hole, then a small third one:
//! `[0, 0x10000) [0x10000, 0x14000) hole [0x20000, 0x21000)`. Each queue's rings take
//! 0x1000 bytes from 0 up (descriptor table, avail ring, used ring; queue size at most 64);
//! buffers come from `DATA_START` up, or from a list of awkward addresses (holes, region
//! edges, the rings themselves, the top of the address space).
//!
//! Chains are written as the driver would (a NEXT-linked run in the table, or one INDIRECT
//! descriptor pointing at a table in the data area), then optionally damaged by raw
//! descriptor writes (loops, bad `next`, nested INDIRECT, odd table lengths). The avail index
//! may be set past the queue size.
//!
//! The reference side: [`reference`] pops the same chains through a second `virtio_queue::Queue`
//! over the same memory before the device runs, so the checks know which chains the device
//! saw and which descriptors they had (the device takes every chain off the ring before it
//! writes anything).
#![allow(dead_code)]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap};

pub type Mem = GuestMemoryMmap<BitmapMmapRegion>;
pub type Gm = GuestMemoryAtomic<Mem>;

pub const REGIONS: [(u64, usize); 3] = [(0, 0x10000), (0x10000, 0x4000), (0x20000, 0x1000)];
pub const DATA_START: u64 = 0x2000;
pub const DATA_END: u64 = 0x14000;
pub const MAX_QUEUE: u16 = 64;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// Zeroed rings, every other byte `fill` (so a status byte the device never wrote is seen).
pub fn memory(fill: u8) -> Mem {
    let mem = Mem::from_ranges(&REGIONS.map(|(a, l)| (GuestAddress(a), l))).expect("regions");
    for (a, l) in REGIONS {
        mem.write_slice(&vec![fill; l], GuestAddress(a))
            .expect("in range");
    }
    mem.write_slice(&[0u8; DATA_START as usize], GuestAddress(0))
        .expect("in range");
    mem
}

/// Whether `[addr, addr + len)` is all guest memory (adjacent regions count as one).
pub fn mapped(mem: &Mem, addr: u64, len: u64) -> bool {
    if len == 0 {
        return true;
    }
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    let mut at = addr;
    while at < end {
        match REGIONS.iter().find(|(a, l)| at >= *a && at < a + *l as u64) {
            Some((a, l)) => at = a + *l as u64,
            None => return false,
        }
    }
    let _ = mem;
    true
}

pub fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.1 > 0 && b.1 > 0 && a.0 < b.0.saturating_add(b.1) && b.0 < a.0.saturating_add(a.1)
}

/// Where one queue's rings are.
#[derive(Clone, Copy, Debug)]
pub struct Ring {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl Ring {
    /// The rings of a queue of `size` (at most 64) at `base`.
    pub fn at(base: u64, size: u16) -> Self {
        Ring {
            size,
            desc: base,
            avail: base + 0x400,
            used: base + 0x600,
        }
    }

    /// Byte ranges of the descriptor table, the avail ring (with `used_event`) and the used
    /// ring (with `avail_event`).
    pub fn areas(&self) -> [(u64, u64); 3] {
        let s = u64::from(self.size);
        [
            (self.desc, 16 * s),
            (self.avail, 6 + 2 * s),
            (self.used, 6 + 8 * s),
        ]
    }

    pub fn used_idx(&self, mem: &Mem) -> u16 {
        mem.read_obj::<u16>(GuestAddress(self.used + 2))
            .map(u16::from_le)
            .unwrap_or(0)
    }

    /// Used ring entry `i` (id, len).
    pub fn used_entry(&self, mem: &Mem, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        let id = mem.read_obj::<u32>(GuestAddress(at)).unwrap_or(u32::MAX);
        let len = mem
            .read_obj::<u32>(GuestAddress(at + 4))
            .unwrap_or(u32::MAX);
        (u32::from_le(id), u32::from_le(len))
    }

    /// A started vring over `gm`, as the daemon sets one up after SET_VRING_*.
    pub fn vring(&self, gm: &Gm, event_idx: bool) -> VringRwLock<Gm> {
        let v = VringRwLock::new(gm.clone(), MAX_QUEUE).expect("vring");
        v.set_queue_size(self.size);
        v.set_queue_info(self.desc, self.avail, self.used)
            .expect("aligned ring addresses");
        v.set_queue_event_idx(event_idx);
        v.set_queue_ready(true);
        v.set_enabled(true);
        v
    }
}

/// One descriptor as written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

pub fn write_desc(mem: &Mem, table: u64, i: u16, d: Desc) {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&d.addr.to_le_bytes());
    b[8..12].copy_from_slice(&d.len.to_le_bytes());
    b[12..14].copy_from_slice(&d.flags.to_le_bytes());
    b[14..16].copy_from_slice(&d.next.to_le_bytes());
    let _ = mem.write_slice(&b, GuestAddress(table.wrapping_add(16 * u64::from(i))));
}

/// One buffer of a chain as the generator wants it.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

/// Writes chains into a ring.
pub struct Builder<'m> {
    pub mem: &'m Mem,
    pub ring: Ring,
    next_desc: u16,
    bump: u64,
    pub heads: Vec<u16>,
    /// Byte ranges of the indirect tables written (the device reads them: no buffer may
    /// overlap them for the content checks).
    pub tables: Vec<(u64, u64)>,
}

impl<'m> Builder<'m> {
    pub fn new(mem: &'m Mem, ring: Ring) -> Self {
        Builder {
            mem,
            ring,
            next_desc: 0,
            bump: DATA_START,
            heads: Vec::new(),
            tables: Vec::new(),
        }
    }

    /// Buffers from `addr` up (another queue's builder starts elsewhere).
    pub fn start_at(&mut self, addr: u64) {
        self.bump = addr;
    }

    /// Free descriptor slots left in the table.
    pub fn free_descs(&self) -> u16 {
        self.ring.size - self.next_desc
    }

    /// An address for `len` bytes: mostly fresh space in the data area, sometimes an awkward
    /// one (a hole, across a region edge or the hole, the rings, the top of the address space).
    pub fn alloc(&mut self, u: &mut Unstructured<'_>, len: u32) -> Result<u64> {
        if u.ratio(1, 12)? {
            let a = *u.choose(&[
                0x14000 - 8,
                0x14000,
                0x1_fff8,
                0x20000,
                0x21000 - 4,
                0x21000,
                0x10000 - 5,
                0,
                0x600,
                u64::MAX - 7,
                1 << 40,
            ])?;
            return Ok(if u.ratio(1, 4)? { u.arbitrary()? } else { a });
        }
        let step = u64::from(len.min(0x4000)).next_multiple_of(8);
        if self.bump + step > DATA_END {
            self.bump = DATA_START;
        }
        let a = self.bump + u64::from(u.ratio(1, 8)?) * u64::from(u.int_in_range(1..=7u8)?);
        self.bump += step + 8;
        Ok(a)
    }

    /// Writes one chain (directly in the table, or as an indirect table) and records its head
    /// for the avail ring. Returns false when the table is full.
    pub fn add_chain(&mut self, u: &mut Unstructured<'_>, bufs: &[Buf]) -> Result<bool> {
        let n = bufs.len() as u16;
        let indirect = n > 0 && u.ratio(1, 4)?;
        let need = if indirect { 1 } else { n.max(1) };
        if self.free_descs() < need {
            return Ok(false);
        }
        let flags = |b: &Buf, last: bool| {
            (if b.write { F_WRITE } else { 0 }) | if last { 0 } else { F_NEXT }
        };
        if indirect {
            let tlen = 16 * u32::from(n);
            let table = self.alloc(u, tlen)?;
            for (i, b) in bufs.iter().enumerate() {
                let i = i as u16;
                let d = Desc {
                    addr: b.addr,
                    len: b.len,
                    flags: flags(b, i + 1 == n),
                    next: i + 1,
                };
                write_desc(self.mem, table, i, d);
            }
            self.tables.push((table, u64::from(tlen)));
            let head = self.next_desc;
            let len = if u.ratio(1, 16)? {
                u.arbitrary()?
            } else {
                tlen
            };
            let d = Desc {
                addr: table,
                len,
                flags: F_INDIRECT | if u.ratio(1, 16)? { F_WRITE } else { 0 },
                next: 0,
            };
            write_desc(self.mem, self.ring.desc, head, d);
            self.next_desc += 1;
            self.heads.push(head);
            return Ok(true);
        }
        // Direct: consecutive slots, or the same slots in reverse (next pointing backwards).
        let base = self.next_desc;
        let rev = u.ratio(1, 4)?;
        let slot = |i: u16| {
            if rev {
                base + n.max(1) - 1 - i
            } else {
                base + i
            }
        };
        if n == 0 {
            // A chain with one zero-length descriptor.
            write_desc(
                self.mem,
                self.ring.desc,
                base,
                Desc {
                    addr: 0,
                    len: 0,
                    flags: 0,
                    next: 0,
                },
            );
        }
        for (i, b) in bufs.iter().enumerate() {
            let i = i as u16;
            let d = Desc {
                addr: b.addr,
                len: b.len,
                flags: flags(b, i + 1 == n),
                next: if i + 1 < n { slot(i + 1) } else { 0 },
            };
            write_desc(self.mem, self.ring.desc, slot(i), d);
        }
        self.next_desc += n.max(1);
        self.heads.push(slot(0));
        Ok(true)
    }

    /// One raw descriptor write: a loop, a bad `next`, flags or length, a nested INDIRECT.
    pub fn poke(&mut self, u: &mut Unstructured<'_>) -> Result<()> {
        let i = u.int_in_range(0..=self.ring.size - 1)?;
        let at = self.ring.desc + 16 * u64::from(i);
        match u.int_in_range(0..=4u8)? {
            0 => {
                // next -> an earlier (or the same) slot, with NEXT set: a loop.
                let next = u.int_in_range(0..=i)?;
                let _ = self.mem.write_obj(next.to_le(), GuestAddress(at + 14));
                let f = self.mem.read_obj::<u16>(GuestAddress(at + 12)).unwrap_or(0);
                let _ = self
                    .mem
                    .write_obj((f | F_NEXT).to_le(), GuestAddress(at + 12));
            }
            1 => {
                let next: u16 = u.arbitrary()?;
                let _ = self.mem.write_obj(next.to_le(), GuestAddress(at + 14));
            }
            2 => {
                let f: u16 = u.arbitrary()?;
                let _ = self.mem.write_obj((f & 7).to_le(), GuestAddress(at + 12));
            }
            3 => {
                let len: u32 = *u.choose(&[0, 1, 15, 16, 17, 0xffff_ffff, 0x8000_0000])?;
                let _ = self.mem.write_obj(len.to_le(), GuestAddress(at + 8));
            }
            _ => {
                // Inside an indirect table: make an entry INDIRECT itself, or loop it.
                if let Some(&(t, l)) = self.tables.first() {
                    let k = u.int_in_range(0..=(l / 16).saturating_sub(1))?;
                    let a = t.wrapping_add(16 * k);
                    if u.arbitrary()? {
                        let _ = self
                            .mem
                            .write_obj(F_INDIRECT.to_le(), GuestAddress(a.wrapping_add(12)));
                    } else {
                        let _ = self
                            .mem
                            .write_obj(F_NEXT.to_le(), GuestAddress(a.wrapping_add(12)));
                        let _ = self
                            .mem
                            .write_obj(0u16.to_le(), GuestAddress(a.wrapping_add(14)));
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes the avail ring: the heads in order, sometimes one replaced by a raw index, and
    /// the avail index (sometimes one the ring cannot hold). Returns the index written.
    pub fn publish(&mut self, u: &mut Unstructured<'_>, allow_bad_idx: bool) -> Result<u16> {
        for (k, &h) in self.heads.iter().enumerate() {
            let h = if u.ratio(1, 32)? { u.arbitrary()? } else { h };
            let at = self.ring.avail + 4 + 2 * (k as u64 % u64::from(self.ring.size));
            let _ = self.mem.write_obj(h.to_le(), GuestAddress(at));
        }
        let mut idx = self.heads.len() as u16;
        if u.ratio(1, 16)? {
            idx = if allow_bad_idx {
                *u.choose(&[0, self.ring.size + 1, u16::MAX, idx.wrapping_sub(1)])?
            } else {
                idx.saturating_sub(1)
            };
        }
        let _ = self
            .mem
            .write_obj(idx.to_le(), GuestAddress(self.ring.avail + 2));
        // The used ring starts zeroed (buffer contents written at awkward addresses may
        // have landed there).
        let (ua, ul) = self.ring.areas()[2];
        let _ = self
            .mem
            .write_slice(&vec![0u8; ul as usize], GuestAddress(ua));
        // used_event: interrupt after the first entry (irrelevant without a call fd).
        let _ = self.mem.write_obj(
            0u16.to_le(),
            GuestAddress(self.ring.avail + 4 + 2 * u64::from(self.ring.size)),
        );
        Ok(idx)
    }

    /// Main-table slots that carry INDIRECT after the raw writes, as byte ranges of the tables
    /// they point at (the device reads those).
    pub fn indirect_ranges(&self) -> Vec<(u64, u64)> {
        let mut v = self.tables.clone();
        for i in 0..self.ring.size {
            let at = self.ring.desc + 16 * u64::from(i);
            let f = self.mem.read_obj::<u16>(GuestAddress(at + 12)).unwrap_or(0);
            if f & F_INDIRECT != 0 {
                let a = self.mem.read_obj::<u64>(GuestAddress(at)).unwrap_or(0);
                let l = self.mem.read_obj::<u32>(GuestAddress(at + 8)).unwrap_or(0);
                v.push((a, u64::from(l)));
            }
        }
        v
    }
}

/// One chain as the device sees it: head and descriptors (addr, len, device-writable).
#[derive(Clone, Debug)]
pub struct Seen {
    pub head: u16,
    pub descs: Vec<(u64, u32, bool)>,
}

impl Seen {
    pub fn writable(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.descs
            .iter()
            .filter(|d| d.2)
            .map(|d| (d.0, u64::from(d.1)))
    }
    pub fn readable(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.descs
            .iter()
            .filter(|d| !d.2)
            .map(|d| (d.0, u64::from(d.1)))
    }
    pub fn writable_len(&self) -> u64 {
        self.writable().map(|d| d.1).sum()
    }
    pub fn all_mapped(&self, mem: &Mem) -> bool {
        self.descs.iter().all(|d| mapped(mem, d.0, u64::from(d.1)))
    }
}

/// Whether a device write into one of `refs`' chains lands on `ring`'s descriptor table or
/// avail ring, or on one of the indirect `tables`: such a write can move the avail index more
/// than the ring's size ahead, which with EVENT_IDX the backend leaves until the next kick (its
/// avail-overrun guard), so the targets run such rings only under FUZZ_BAD_AVAIL_IDX.
pub fn writes_over_ring(refs: &Option<Vec<Seen>>, ring: Ring, tables: &[(u64, u64)]) -> bool {
    let mut parts = vec![ring.areas()[0], ring.areas()[1]];
    parts.extend(tables.iter().copied());
    refs.iter()
        .flatten()
        .flat_map(|s| s.writable())
        .any(|w| parts.iter().any(|r| overlaps(w, *r)))
}

/// The chains a device popping `ring` now would get, in order (or `None` when the avail
/// index is one the ring cannot hold: the queue refuses to pop anything).
pub fn reference(mem: &Mem, ring: Ring, event_idx: bool) -> Option<Vec<Seen>> {
    let mut q = Queue::new(MAX_QUEUE).expect("queue");
    q.set_size(ring.size);
    q.try_set_desc_table_address(GuestAddress(ring.desc)).ok()?;
    q.try_set_avail_ring_address(GuestAddress(ring.avail))
        .ok()?;
    q.try_set_used_ring_address(GuestAddress(ring.used)).ok()?;
    q.set_event_idx(event_idx);
    q.set_ready(true);
    let it = q.iter(mem).ok()?;
    Some(
        it.map(|c| Seen {
            head: c.head_index(),
            descs: c
                .clone()
                .map(|d| (d.addr().0, d.len(), d.is_write_only()))
                .collect(),
        })
        .collect(),
    )
}

/// Reads `len` bytes gathered from `segs` (in order).
pub fn gather(mem: &Mem, segs: &[(u64, u64)], mut len: u64) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for &(a, l) in segs {
        if len == 0 {
            break;
        }
        let n = l.min(len);
        let mut b = vec![0u8; n as usize];
        mem.read_slice(&mut b, GuestAddress(a)).ok()?;
        out.extend_from_slice(&b);
        len -= n;
    }
    (len == 0).then_some(out)
}

/// Keeps the `GuestMemoryBackend` import used whatever the target needs.
pub fn region_count(mem: &Mem) -> usize {
    mem.num_regions()
}
