//! The netfilter chain between the guest's virtqueues and the netdev, with QEMU's semantics.
//!
//! Directions are named relative to the *netdev*, as QEMU names them:
//! - [`Direction::Tx`]: frames *sent by the netdev*, i.e. going **to the guest** (guest ingress);
//! - [`Direction::Rx`]: frames *sent to the netdev*, i.e. coming **from the guest** (guest egress).
//!
//! A filter's `queue=` option selects which of them it sees ([`QueueSel`]). Tx frames walk the
//! list head → tail, Rx frames tail → head. A filter that consumes a frame stops the walk; a
//! filter that injects a frame (a redirector's `indev`) starts the walk at its own neighbour
//! in the frame's direction. Filters with `status=off` are skipped.
//!
//! The chain is pure logic: it takes a frame and returns what comes out at the end. Frames in
//! the chain are bare Ethernet frames; filters with `vnet_hdr_support=on` add or strip a
//! header at their socket edge (see [`crate::vnet`]). A frame with offloads pending (a TCP GSO
//! frame of up to 64 KiB, a partial checksum) walks the chain whole with its virtio-net header
//! when every filter it meets takes it so ([`Filter::takes_offloaded`]: the mirror and the
//! redirector with `vnet_hdr_support=on` on a netdev with vnet headers, the rewriter, a
//! redirector without outdev), as QEMU's filters pass a tap's GSO frames; otherwise the path
//! makes it plain before the chain ([`crate::offload`]).

pub mod dump;
pub mod mirror;
pub mod redirector;
pub mod rewriter;

use std::collections::BTreeMap;
use std::sync::Arc;

#[cfg(test)]
use colo_proto::frame::Frame;
use serde::Serialize;

use crate::offload::VnetHdr;

pub use dump::FilterDump;
pub use mirror::FilterMirror;
pub use redirector::FilterRedirector;
pub use rewriter::FilterRewriter;

/// Which way a frame travels, named relative to the netdev as QEMU does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Sent to the netdev: guest egress.
    Rx,
    /// Sent by the netdev: guest ingress.
    Tx,
}

/// A filter's `queue=` option.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueSel {
    #[default]
    All,
    Rx,
    Tx,
}

impl QueueSel {
    pub fn parse(s: &str) -> Result<Self, FilterError> {
        match s {
            "all" => Ok(Self::All),
            "rx" => Ok(Self::Rx),
            "tx" => Ok(Self::Tx),
            other => Err(FilterError::BadOption {
                key: "queue",
                value: other.to_string(),
                expected: "all, rx or tx",
            }),
        }
    }

    pub fn covers(self, dir: Direction) -> bool {
        matches!(
            (self, dir),
            (Self::All, _) | (Self::Rx, Direction::Rx) | (Self::Tx, Direction::Tx)
        )
    }
}

/// What a filter did with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Pass the (possibly modified) frame on to the next filter.
    Pass,
    /// The filter took the frame; the walk stops.
    Consumed,
}

/// Where a socket-side filter writes frames (a chardev). Implementations must write a whole
/// record or nothing.
pub trait Outdev: Send + Sync {
    /// Writes one record made of the virtio-net header `hdr` (its length is the record's
    /// `vnet_hdr_len`; empty for none) and the frame `l2`; a socket writes the parts as they
    /// are (one `writev`, no copy).
    fn send_parts(&self, hdr: &[u8], l2: &[u8], vnet_hdr_support: bool) -> std::io::Result<()>;
    /// As [`Outdev::send_parts`] for a frame given in place ([`RawFrame`]): the outdev copies
    /// what it keeps and writes the rest straight from the pieces before it returns. Default:
    /// one copy, then `send_parts`.
    fn send_raw(
        &self,
        hdr: &[u8],
        l2: RawFrame<'_>,
        vnet_hdr_support: bool,
    ) -> std::io::Result<()> {
        let mut f = Vec::new();
        l2.copy_to(&mut f);
        self.send_parts(hdr, &f, vnet_hdr_support)
    }
    /// Human-readable name for errors and `query-filters`.
    fn name(&self) -> String;
    /// A batch opens (the path holds the chain's lock for a whole pass): until
    /// [`Outdev::flush`], the outdev may keep records that [`Outdev::send_parts`] accepted
    /// (`Ok`) and write them together, in the same order. Default: every record is written at
    /// once.
    fn begin_batch(&self) {}
    /// Writes every record kept since [`Outdev::begin_batch`] and ends the batch. On failure,
    /// how many records that `send_parts` had accepted were lost (the filter counts them as
    /// errors instead of sent).
    fn flush(&self) -> Result<(), FlushError> {
        Ok(())
    }
}

/// A frame in memory this process must not hold references into (the guest's transmit
/// buffers, which the guest may change at any time): pieces given as raw iovecs, only ever
/// copied out or handed to the kernel (`writev`), so a frame goes from guest memory to a
/// socket without a copy of its own.
#[derive(Clone, Copy, Debug)]
pub struct RawFrame<'a> {
    iov: &'a [libc::iovec],
    len: usize,
}

impl<'a> RawFrame<'a> {
    /// # Safety
    /// Every iovec must cover memory that stays mapped and readable for `'a`.
    pub unsafe fn new(iov: &'a [libc::iovec]) -> Self {
        let len = iov.iter().map(|v| v.iov_len).sum();
        Self { iov, len }
    }

    /// Bytes in all pieces.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pieces, for `writev`.
    pub fn iovecs(&self) -> &'a [libc::iovec] {
        self.iov
    }

    /// Appends a copy of the frame to `out`.
    pub fn copy_to(&self, out: &mut Vec<u8>) {
        out.reserve(self.len);
        for v in self.iov {
            let at = out.len();
            // SAFETY: `reserve` made room for all pieces; `v` covers `v.iov_len` readable bytes
            // (the constructor's contract) that cannot overlap our own allocation.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    v.iov_base as *const u8,
                    out.as_mut_ptr().add(at),
                    v.iov_len,
                );
                out.set_len(at + v.iov_len);
            }
        }
    }
}

/// Records an outdev had accepted in a batch and could not write.
#[derive(Debug)]
pub struct FlushError {
    /// Records lost (accepted by `send_parts`, never written whole).
    pub lost: u64,
    pub error: std::io::Error,
}

/// Ends `out`'s batch for the filter `kind`: records lost by the flush move from `sent` to
/// `errors` in its counters.
fn flush_outdev(kind: &str, out: &dyn Outdev, c: &mut Counters) {
    if let Err(FlushError { lost, error }) = out.flush() {
        let lost = lost.min(c.sent);
        c.sent -= lost;
        c.errors += lost;
        tracing::debug!(
            "{kind}: flush to {}: {lost} records lost: {error}",
            out.name()
        );
    }
}

/// Writes one record (header `hdr`, frame `l2`) to `out` for the filter `kind`, counting it as
/// sent or as an error; errors are only logged, the caller decides what becomes of the frame.
fn send_record(
    kind: &str,
    out: &dyn Outdev,
    hdr: &[u8],
    l2: &[u8],
    vnet_hdr_support: bool,
    c: &mut Counters,
) {
    match out.send_parts(hdr, l2, vnet_hdr_support) {
        Ok(()) => c.sent += 1,
        Err(e) => {
            c.errors += 1;
            tracing::debug!("{kind}: send to {}: {e}", out.name());
        }
    }
}

/// As [`send_record`] for a frame given in place.
fn send_record_raw(
    kind: &str,
    out: &dyn Outdev,
    hdr: &[u8],
    l2: RawFrame<'_>,
    vnet_hdr_support: bool,
    c: &mut Counters,
) {
    match out.send_raw(hdr, l2, vnet_hdr_support) {
        Ok(()) => c.sent += 1,
        Err(e) => {
            c.errors += 1;
            tracing::debug!("{kind}: send to {}: {e}", out.name());
        }
    }
}

/// Per-filter counters, shown by `query-filters`.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Counters {
    /// Frames that reached this filter (status on, direction covered).
    pub frames: u64,
    pub bytes: u64,
    /// Frames the filter consumed (took out of the normal path).
    pub consumed: u64,
    /// Frames written to the filter's outdev / file.
    pub sent: u64,
    /// Frames injected from the filter's indev.
    pub injected: u64,
    /// Frames modified (rewriter).
    pub rewritten: u64,
    /// Send or write errors.
    pub errors: u64,
}

/// The behaviour of one filter kind.
pub trait Filter: Send {
    /// QOM type name (`filter-mirror`, ...).
    fn kind(&self) -> &'static str;
    /// Looks at (and may modify or take) one frame travelling in `dir`.
    fn receive(&mut self, dir: Direction, frame: &mut Vec<u8>, counters: &mut Counters) -> Verdict;
    /// True when the filter takes frames whose offloads are still pending (a TCP GSO frame
    /// of up to 64 KiB, a partial checksum) through [`Filter::receive_offloaded`]. Filters that
    /// do not are only ever given plain frames (the path segments before them).
    fn takes_offloaded(&self) -> bool {
        false
    }
    /// As [`Filter::receive`], for a frame with its virtio-net header `hdr` (offloads pending).
    /// Only called when [`Filter::takes_offloaded`] says so.
    fn receive_offloaded(
        &mut self,
        dir: Direction,
        _hdr: &mut VnetHdr,
        frame: &mut Vec<u8>,
        counters: &mut Counters,
    ) -> Verdict {
        self.receive(dir, frame, counters)
    }
    /// True when the filter consumes every frame it sees, writing it to a socket outdev (a
    /// redirector with an outdev): such frames can be handed over in place
    /// ([`Filter::consume_raw`]). `offloaded`: the frame has offloads pending.
    fn consumes_raw(&self, _offloaded: bool) -> bool {
        false
    }
    /// Consumes a frame given in place (only called when [`Filter::consumes_raw`] says so):
    /// writes the same record [`Filter::receive`] (plain, `hdr` None) or
    /// [`Filter::receive_offloaded`] would.
    fn consume_raw(
        &mut self,
        _dir: Direction,
        _hdr: Option<&VnetHdr>,
        _l2: RawFrame<'_>,
        _c: &mut Counters,
    ) {
    }
    /// A batch opens: see [`Outdev::begin_batch`]. Default: nothing.
    fn begin_batch(&mut self) {}
    /// The batch ends: records kept since [`Filter::begin_batch`] are written now, and the
    /// filter's counters are corrected for those lost. Default: nothing.
    fn end_batch(&mut self, _counters: &mut Counters) {}
    /// COLO checkpoint event.
    fn checkpoint(&mut self) {}
    /// COLO failover event; returns whether the filter stays on (QEMU's default turns it off).
    fn failover(&mut self) -> bool {
        false
    }
    /// Extra state for `query-filters`.
    fn describe(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

/// One filter in a chain, with the options every filter has.
pub struct Entry {
    pub id: String,
    pub queue: QueueSel,
    pub status: bool,
    pub counters: Counters,
    pub filter: Box<dyn Filter>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("id", &self.id)
            .field("kind", &self.filter.kind())
            .field("queue", &self.queue)
            .field("status", &self.status)
            .finish()
    }
}

/// `position=` of a new filter.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Position {
    Head,
    #[default]
    Tail,
    Id(String),
}

impl Position {
    pub fn parse(s: &str) -> Result<Self, FilterError> {
        match s {
            "head" => Ok(Self::Head),
            "tail" => Ok(Self::Tail),
            _ => match s.strip_prefix("id=") {
                Some(id) if !id.is_empty() => Ok(Self::Id(id.to_string())),
                _ => Err(FilterError::BadOption {
                    key: "position",
                    value: s.to_string(),
                    expected: "head, tail or id=<filter-id>",
                }),
            },
        }
    }
}

/// `insert=` of a new filter (relative to `position=id=...`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Insert {
    #[default]
    Behind,
    Before,
}

impl Insert {
    pub fn parse(s: &str) -> Result<Self, FilterError> {
        match s {
            "behind" => Ok(Self::Behind),
            "before" => Ok(Self::Before),
            other => Err(FilterError::BadOption {
                key: "insert",
                value: other.to_string(),
                expected: "behind or before",
            }),
        }
    }
}

/// Errors of filter creation and chain edits.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("option {key}={value}: expected {expected}")]
    BadOption {
        key: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("{kind}: missing option {key}")]
    Missing { kind: String, key: &'static str },
    #[error("{kind}: unknown option {key}")]
    Unknown { kind: String, key: String },
    #[error("unknown filter type {0:?}")]
    UnknownType(String),
    #[error("a filter with id {0:?} already exists")]
    Duplicate(String),
    #[error("no filter with id {0:?} on this netdev")]
    NotFound(String),
    #[error("{kind} {id}: {msg}")]
    Invalid {
        kind: String,
        id: String,
        msg: String,
    },
    #[error("filter-dump {path}: {source}")]
    Dump {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The result of one walk: the frame to deliver at the end, if any.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Deliver this frame to the guest (Tx) or to the netdev (Rx).
    Deliver(Vec<u8>),
    /// A filter consumed the frame.
    Consumed,
}

/// One netdev's filter list.
#[derive(Debug, Default)]
pub struct Chain {
    entries: Vec<Entry>,
}

impl Chain {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn ids(&self) -> Vec<String> {
        self.entries.iter().map(|e| e.id.clone()).collect()
    }

    pub fn get(&self, id: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.id == id)
    }

    fn index(&self, id: &str) -> Result<usize, FilterError> {
        self.entries
            .iter()
            .position(|e| e.id == id)
            .ok_or_else(|| FilterError::NotFound(id.to_string()))
    }

    /// Inserts a filter at `position`/`insert`, as QEMU's `position=`/`insert=` options do.
    pub fn insert(
        &mut self,
        entry: Entry,
        position: &Position,
        insert: Insert,
    ) -> Result<(), FilterError> {
        if self.get(&entry.id).is_some() {
            return Err(FilterError::Duplicate(entry.id));
        }
        let at = match position {
            Position::Head => 0,
            Position::Tail => self.entries.len(),
            Position::Id(id) => {
                let i = self.index(id)?;
                match insert {
                    Insert::Behind => i + 1,
                    Insert::Before => i,
                }
            }
        };
        self.entries.insert(at, entry);
        Ok(())
    }

    /// Removes a filter; frames not in it are unaffected (the caller holds the chain's lock, so
    /// no frame is between filters while this runs).
    pub fn remove(&mut self, id: &str) -> Result<Entry, FilterError> {
        let i = self.index(id)?;
        let mut e = self.entries.remove(i);
        // Nothing is kept outside a batch, and the path ends its batch before it lets go of
        // the lock; this is only a safety net so a removed filter never takes records with it.
        e.filter.end_batch(&mut e.counters);
        Ok(e)
    }

    /// Opens a batch: socket outdevs may keep records until [`Chain::end_batch`], which the
    /// caller must call before it lets go of the chain's lock (see [`crate::path`]).
    pub fn begin_batch(&mut self) {
        for e in &mut self.entries {
            e.filter.begin_batch();
        }
    }

    /// Ends a batch: every record kept is written, in order, and counters are corrected for
    /// records a failed write lost.
    pub fn end_batch(&mut self) {
        for e in &mut self.entries {
            e.filter.end_batch(&mut e.counters);
        }
    }

    pub fn set_status(&mut self, id: &str, on: bool) -> Result<(), FilterError> {
        let i = self.index(id)?;
        self.entries[i].status = on;
        Ok(())
    }

    /// A frame enters the chain from its start (the netdev for Tx, the guest for Rx).
    pub fn process(&mut self, dir: Direction, frame: Vec<u8>) -> Outcome {
        let order = self.order(dir, None);
        self.walk(dir, frame, order)
    }

    /// True when the first filter a frame entering in direction `dir` meets consumes it into a
    /// socket outdev ([`Filter::consumes_raw`]), so [`Chain::consume_raw`] takes such frames.
    pub fn first_consumes_raw(&self, dir: Direction) -> bool {
        self.first_met(dir)
            .is_some_and(|i| self.entries[i].filter.consumes_raw(false))
    }

    /// The first filter a frame entering in direction `dir` meets (status on, direction covered).
    fn first_met(&self, dir: Direction) -> Option<usize> {
        let met = |i: &usize| {
            let e = &self.entries[*i];
            e.status && e.queue.covers(dir)
        };
        match dir {
            Direction::Tx => (0..self.entries.len()).find(met),
            Direction::Rx => (0..self.entries.len()).rev().find(met),
        }
    }

    /// A frame entering at the start, given in place (the guest's buffers), with its header when
    /// offloads are pending: when the first filter it meets consumes it into a socket outdev,
    /// the record is written (or kept in the batch) exactly as [`Chain::process`] /
    /// [`Chain::process_offloaded`] would, and true is returned. False: nothing was done (the
    /// caller copies the frame and takes the usual way).
    pub fn consume_raw(&mut self, dir: Direction, hdr: Option<&VnetHdr>, l2: RawFrame<'_>) -> bool {
        let Some(i) = self.first_met(dir) else {
            return false;
        };
        // An offloaded frame crosses whole only when every filter on its way would take it so;
        // otherwise the path makes it plain first (several records).
        if hdr.is_some() && !self.takes_offloaded(dir) {
            return false;
        }
        let e = &mut self.entries[i];
        if !e.filter.consumes_raw(hdr.is_some()) {
            return false;
        }
        e.counters.frames += 1;
        e.counters.bytes += l2.len() as u64;
        e.filter.consume_raw(dir, hdr, l2, &mut e.counters);
        e.counters.consumed += 1;
        true
    }

    /// A frame injected by filter `id` (from its indev) continues from that filter's position:
    /// the next filter for Tx, the previous one for Rx.
    pub fn inject_from(
        &mut self,
        id: &str,
        dir: Direction,
        frame: Vec<u8>,
    ) -> Result<Outcome, FilterError> {
        let i = self.index(id)?;
        self.entries[i].counters.injected += 1;
        let order = self.order(dir, Some(i));
        Ok(self.walk(dir, frame, order))
    }

    /// The filters a frame entering at the start (`from` None) or injected by filter `from`
    /// meets in direction `dir`, in order.
    fn order(&self, dir: Direction, from: Option<usize>) -> Vec<usize> {
        match (dir, from) {
            (Direction::Tx, None) => (0..self.entries.len()).collect(),
            (Direction::Rx, None) => (0..self.entries.len()).rev().collect(),
            (Direction::Tx, Some(i)) => (i + 1..self.entries.len()).collect(),
            (Direction::Rx, Some(i)) => (0..i).rev().collect(),
        }
    }

    /// True when every filter an offloaded frame entering in direction `dir` would meet takes
    /// it whole ([`Filter::takes_offloaded`]); an empty chain does.
    pub fn takes_offloaded(&self, dir: Direction) -> bool {
        self.takes_offloaded_on(dir, self.order(dir, None))
    }

    /// As [`Chain::takes_offloaded`] for a frame injected by filter `id`.
    pub fn takes_offloaded_after(&self, id: &str, dir: Direction) -> Result<bool, FilterError> {
        let i = self.index(id)?;
        Ok(self.takes_offloaded_on(dir, self.order(dir, Some(i))))
    }

    fn takes_offloaded_on(&self, dir: Direction, order: Vec<usize>) -> bool {
        order.into_iter().all(|i| {
            let e = &self.entries[i];
            !e.status || !e.queue.covers(dir) || e.filter.takes_offloaded()
        })
    }

    /// As [`Chain::process`] for a frame with offloads pending and its header (which filters
    /// may change); call only when [`Chain::takes_offloaded`] holds.
    pub fn process_offloaded(
        &mut self,
        dir: Direction,
        hdr: &mut VnetHdr,
        frame: Vec<u8>,
    ) -> Outcome {
        let order = self.order(dir, None);
        self.walk_with(dir, frame, order, Some(hdr))
    }

    /// As [`Chain::inject_from`] for a frame with offloads pending; call only when
    /// [`Chain::takes_offloaded_after`] holds.
    pub fn inject_offloaded_from(
        &mut self,
        id: &str,
        dir: Direction,
        hdr: &mut VnetHdr,
        frame: Vec<u8>,
    ) -> Result<Outcome, FilterError> {
        let i = self.index(id)?;
        self.entries[i].counters.injected += 1;
        let order = self.order(dir, Some(i));
        Ok(self.walk_with(dir, frame, order, Some(hdr)))
    }

    fn walk(&mut self, dir: Direction, frame: Vec<u8>, order: Vec<usize>) -> Outcome {
        self.walk_with(dir, frame, order, None)
    }

    fn walk_with(
        &mut self,
        dir: Direction,
        mut frame: Vec<u8>,
        order: Vec<usize>,
        mut hdr: Option<&mut VnetHdr>,
    ) -> Outcome {
        for i in order {
            let e = &mut self.entries[i];
            if !e.status || !e.queue.covers(dir) {
                continue;
            }
            e.counters.frames += 1;
            e.counters.bytes += frame.len() as u64;
            let v = match hdr.as_deref_mut() {
                Some(h) => e
                    .filter
                    .receive_offloaded(dir, h, &mut frame, &mut e.counters),
                None => e.filter.receive(dir, &mut frame, &mut e.counters),
            };
            if v == Verdict::Consumed {
                e.counters.consumed += 1;
                return Outcome::Consumed;
            }
        }
        Outcome::Deliver(frame)
    }

    /// COLO checkpoint: every filter's checkpoint hook (the rewriter zeroes its offsets).
    pub fn checkpoint(&mut self) {
        for e in &mut self.entries {
            e.filter.checkpoint();
        }
    }

    /// COLO failover: filters that do not keep themselves on are switched off (QEMU's default),
    /// so redirectors stop intercepting; the rewriter stays.
    pub fn failover(&mut self) {
        for e in &mut self.entries {
            if !e.filter.failover() {
                e.status = false;
            }
        }
    }

    /// `query-filters` rows, in list order.
    pub fn query(&self) -> Vec<serde_json::Value> {
        self.entries
            .iter()
            .map(|e| {
                serde_json::json!({
                    "id": e.id,
                    "type": e.filter.kind(),
                    "queue": e.queue,
                    "status": if e.status { "on" } else { "off" },
                    "counters": e.counters,
                    "state": e.filter.describe(),
                })
            })
            .collect()
    }
}

/// A QOM-like object description: `-object TYPE,id=ID,key=value,...` or QMP `object-add`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectSpec {
    pub qom_type: String,
    pub id: String,
    pub props: BTreeMap<String, String>,
}

impl ObjectSpec {
    /// Parses the command-line form `filter-mirror,id=m0,netdev=hn0,queue=tx,outdev=mirror0`.
    pub fn parse_cli(s: &str) -> Result<Self, FilterError> {
        let mut parts = s.split(',');
        let qom_type = parts.next().unwrap_or_default().trim().to_string();
        if qom_type.is_empty() || qom_type.contains('=') {
            return Err(FilterError::BadOption {
                key: "object",
                value: s.to_string(),
                expected: "TYPE,id=ID,key=value,...",
            });
        }
        let mut props = BTreeMap::new();
        for p in parts {
            let Some((k, v)) = p.split_once('=') else {
                return Err(FilterError::BadOption {
                    key: "object",
                    value: p.to_string(),
                    expected: "key=value",
                });
            };
            let mut v = v.to_string();
            // `position=id=<id>` keeps its inner '='.
            if k == "position" && v == "id" {
                v.push('=');
            }
            // A repeated key (several `hostfwd=`) is kept as `key#N`.
            let mut key = k.to_string();
            let mut n = 1;
            while props.contains_key(&key) {
                key = format!("{k}#{n}");
                n += 1;
            }
            props.insert(key, v);
        }
        let id = props.remove("id").ok_or(FilterError::Missing {
            kind: qom_type.clone(),
            key: "id",
        })?;
        Ok(Self {
            qom_type,
            id,
            props,
        })
    }

    /// Parses QMP `object-add` arguments: `{"qom-type":"filter-mirror","id":"m0",...}` (flat, as
    /// QEMU 6+ takes them; a nested `props` object is accepted as well).
    pub fn from_qmp(
        args: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self, FilterError> {
        let get_str = |k: &'static str| -> Result<String, FilterError> {
            match args.get(k) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                _ => Err(FilterError::Missing {
                    kind: "object-add".into(),
                    key: k,
                }),
            }
        };
        let qom_type = get_str("qom-type")?;
        let id = get_str("id")?;
        let mut props = BTreeMap::new();
        let mut add = |k: &str, v: &serde_json::Value| -> Result<(), FilterError> {
            let s = match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Bool(b) => if *b { "on" } else { "off" }.to_string(),
                serde_json::Value::Number(n) => n.to_string(),
                other => {
                    return Err(FilterError::BadOption {
                        key: "object-add",
                        value: format!("{k}={other}"),
                        expected: "string, boolean or number",
                    });
                }
            };
            props.insert(k.to_string(), s);
            Ok(())
        };
        for (k, v) in args {
            match k.as_str() {
                "qom-type" | "id" => {}
                "props" => {
                    if let serde_json::Value::Object(m) = v {
                        for (k, v) in m {
                            add(k, v)?;
                        }
                    }
                }
                _ => add(k, v)?,
            }
        }
        Ok(Self {
            qom_type,
            id,
            props,
        })
    }

    pub fn take(&mut self, key: &str) -> Option<String> {
        self.props.remove(key)
    }

    pub fn take_bool(&mut self, key: &'static str, default: bool) -> Result<bool, FilterError> {
        match self.props.remove(key) {
            None => Ok(default),
            Some(v) => parse_bool(key, &v),
        }
    }

    /// Fails if options are left that nobody took.
    pub fn finish(&self) -> Result<(), FilterError> {
        match self.props.keys().next() {
            Some(k) => Err(FilterError::Unknown {
                kind: self.qom_type.clone(),
                key: k.clone(),
            }),
            None => Ok(()),
        }
    }
}

pub fn parse_bool(key: &'static str, v: &str) -> Result<bool, FilterError> {
    match v {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        other => Err(FilterError::BadOption {
            key,
            value: other.to_string(),
            expected: "on or off",
        }),
    }
}

/// Looks up chardevs by id when a filter is built.
pub trait ChardevLookup {
    fn outdev(&self, id: &str) -> Option<Arc<dyn Outdev>>;
}

/// A filter built from a spec, with where to put it and which indev (if any) feeds it.
pub struct Built {
    pub entry: Entry,
    pub netdev: String,
    pub position: Position,
    pub insert: Insert,
    /// Redirector `indev` chardev id, with its vnet_hdr_support; the I/O layer reads it and calls
    /// [`Chain::inject_from`].
    pub indev: Option<(String, bool)>,
}

/// Builds a filter object from its spec (`-object` or `object-add`).
pub fn build(mut spec: ObjectSpec, chardevs: &dyn ChardevLookup) -> Result<Built, FilterError> {
    let kind = spec.qom_type.clone();
    let id = spec.id.clone();
    let netdev = spec.take("netdev").ok_or(FilterError::Missing {
        kind: kind.clone(),
        key: "netdev",
    })?;
    let queue = match spec.take("queue") {
        Some(q) => QueueSel::parse(&q)?,
        None => QueueSel::All,
    };
    let status = match spec.take("status") {
        Some(s) => parse_bool("status", &s)?,
        None => true,
    };
    let position = match spec.take("position") {
        Some(p) => Position::parse(&p)?,
        None => Position::Tail,
    };
    let insert = match spec.take("insert") {
        Some(i) => Insert::parse(&i)?,
        None => Insert::Behind,
    };
    let vnet = spec.take_bool("vnet_hdr_support", false)?;
    let vnet_len = match spec.take("vnet_hdr_len") {
        Some(v) => match v.as_str() {
            "0" | "10" | "12" | "20" => v.parse::<usize>().unwrap_or(0),
            _ => {
                return Err(FilterError::BadOption {
                    key: "vnet_hdr_len",
                    value: v,
                    expected: "0, 10, 12 or 20",
                });
            }
        },
        None => 0,
    };
    let lookup = |key: &'static str, name: &str| -> Result<Arc<dyn Outdev>, FilterError> {
        chardevs.outdev(name).ok_or_else(|| FilterError::Invalid {
            kind: kind.clone(),
            id: id.clone(),
            msg: format!("{key}: no chardev with id {name:?}"),
        })
    };
    let mut indev = None;
    let filter: Box<dyn Filter> = match kind.as_str() {
        "filter-mirror" => {
            let out = spec.take("outdev").ok_or(FilterError::Missing {
                kind: kind.clone(),
                key: "outdev",
            })?;
            Box::new(FilterMirror::new(lookup("outdev", &out)?, vnet).with_vnet_hdr_len(vnet_len))
        }
        "filter-redirector" => {
            let out = spec.take("outdev");
            let ind = spec.take("indev");
            if out.is_none() && ind.is_none() {
                return Err(FilterError::Invalid {
                    kind,
                    id,
                    msg: "indev or outdev must be set".into(),
                });
            }
            if out.is_some() && out == ind {
                return Err(FilterError::Invalid {
                    kind,
                    id,
                    msg: "indev and outdev must differ".into(),
                });
            }
            let outdev = match out {
                Some(o) => Some(lookup("outdev", &o)?),
                None => None,
            };
            indev = ind.map(|i| (i, vnet));
            Box::new(FilterRedirector::new(outdev, vnet).with_vnet_hdr_len(vnet_len))
        }
        "filter-rewriter" => Box::new(FilterRewriter::new()),
        "filter-dump" => {
            let file = spec.take("file").ok_or(FilterError::Missing {
                kind: kind.clone(),
                key: "file",
            })?;
            let maxlen = match spec.take("maxlen") {
                Some(m) => m.parse::<u32>().map_err(|_| FilterError::BadOption {
                    key: "maxlen",
                    value: m,
                    expected: "a number of bytes",
                })?,
                None => 65536,
            };
            Box::new(FilterDump::create(&file, maxlen)?)
        }
        other => return Err(FilterError::UnknownType(other.to_string())),
    };
    spec.finish()?;
    Ok(Built {
        entry: Entry {
            id,
            queue,
            status,
            counters: Counters::default(),
            filter,
        },
        netdev,
        position,
        insert,
        indev,
    })
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;
    use std::sync::Mutex;

    /// An outdev that records the records it is given.
    #[derive(Default)]
    pub struct RecOut {
        pub frames: Mutex<Vec<(Frame, bool)>>,
        pub fail: bool,
    }

    impl Outdev for RecOut {
        fn send_parts(&self, hdr: &[u8], l2: &[u8], vnet: bool) -> std::io::Result<()> {
            if self.fail {
                return Err(std::io::Error::other("broken link"));
            }
            let frame = Frame {
                vnet_hdr_len: hdr.len() as u32,
                payload: [hdr, l2].concat(),
            };
            self.frames.lock().unwrap().push((frame, vnet));
            Ok(())
        }
        fn name(&self) -> String {
            "rec".into()
        }
    }

    /// A filter that tags frames by appending a byte, or consumes them.
    pub struct Tag(pub u8, pub bool);

    impl Filter for Tag {
        fn kind(&self) -> &'static str {
            "test-tag"
        }
        fn receive(&mut self, _d: Direction, f: &mut Vec<u8>, _c: &mut Counters) -> Verdict {
            f.push(self.0);
            if self.1 {
                Verdict::Consumed
            } else {
                Verdict::Pass
            }
        }
    }

    pub fn entry(id: &str, queue: QueueSel, f: Box<dyn Filter>) -> Entry {
        Entry {
            id: id.into(),
            queue,
            status: true,
            counters: Counters::default(),
            filter: f,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;

    fn chain3() -> Chain {
        let mut c = Chain::new();
        for (id, t) in [("a", 1u8), ("b", 2), ("c", 3)] {
            c.insert(
                entry(id, QueueSel::All, Box::new(Tag(t, false))),
                &Position::Tail,
                Insert::Behind,
            )
            .unwrap();
        }
        c
    }

    #[test]
    fn tx_walks_head_to_tail_and_rx_tail_to_head() {
        let mut c = chain3();
        assert_eq!(
            c.process(Direction::Tx, vec![]),
            Outcome::Deliver(vec![1, 2, 3])
        );
        assert_eq!(
            c.process(Direction::Rx, vec![]),
            Outcome::Deliver(vec![3, 2, 1])
        );
    }

    #[test]
    fn consume_stops_the_walk() {
        let mut c = chain3();
        c.insert(
            entry("x", QueueSel::All, Box::new(Tag(9, true))),
            &Position::Id("a".into()),
            Insert::Behind,
        )
        .unwrap();
        assert_eq!(c.ids(), ["a", "x", "b", "c"]);
        assert_eq!(c.process(Direction::Tx, vec![]), Outcome::Consumed);
        assert_eq!(c.get("b").unwrap().counters.frames, 0);
        assert_eq!(c.get("a").unwrap().counters.frames, 1);
        assert_eq!(c.get("x").unwrap().counters.consumed, 1);
        // Rx: c, b, then x consumes; a never sees it.
        assert_eq!(c.process(Direction::Rx, vec![]), Outcome::Consumed);
        assert_eq!(c.get("a").unwrap().counters.frames, 1);
        assert_eq!(c.get("c").unwrap().counters.frames, 1);
    }

    #[test]
    fn queue_selection_and_status_skip_filters() {
        let mut c = Chain::new();
        c.insert(
            entry("rx", QueueSel::Rx, Box::new(Tag(1, false))),
            &Position::Tail,
            Insert::Behind,
        )
        .unwrap();
        c.insert(
            entry("tx", QueueSel::Tx, Box::new(Tag(2, false))),
            &Position::Tail,
            Insert::Behind,
        )
        .unwrap();
        assert_eq!(c.process(Direction::Tx, vec![]), Outcome::Deliver(vec![2]));
        assert_eq!(c.process(Direction::Rx, vec![]), Outcome::Deliver(vec![1]));
        c.set_status("tx", false).unwrap();
        assert_eq!(c.process(Direction::Tx, vec![]), Outcome::Deliver(vec![]));
        assert!(matches!(
            c.set_status("nope", true),
            Err(FilterError::NotFound(_))
        ));
    }

    #[test]
    fn injection_continues_from_the_filters_own_position() {
        let mut c = chain3();
        assert_eq!(
            c.inject_from("b", Direction::Tx, vec![]).unwrap(),
            Outcome::Deliver(vec![3])
        );
        assert_eq!(
            c.inject_from("b", Direction::Rx, vec![]).unwrap(),
            Outcome::Deliver(vec![1])
        );
        assert_eq!(
            c.inject_from("a", Direction::Rx, vec![]).unwrap(),
            Outcome::Deliver(vec![])
        );
        assert_eq!(c.get("b").unwrap().counters.injected, 2);
    }

    #[test]
    fn position_and_insert_place_filters_like_qemu() {
        let mut c = chain3();
        let t = || Box::new(Tag(0, false));
        c.insert(
            entry("h", QueueSel::All, t()),
            &Position::Head,
            Insert::Behind,
        )
        .unwrap();
        c.insert(
            entry("bb", QueueSel::All, t()),
            &Position::Id("b".into()),
            Insert::Before,
        )
        .unwrap();
        c.insert(
            entry("ca", QueueSel::All, t()),
            &Position::Id("c".into()),
            Insert::Behind,
        )
        .unwrap();
        assert_eq!(c.ids(), ["h", "a", "bb", "b", "c", "ca"]);
        assert!(matches!(
            c.insert(
                entry("a", QueueSel::All, t()),
                &Position::Tail,
                Insert::Behind
            ),
            Err(FilterError::Duplicate(_))
        ));
        assert!(matches!(
            c.insert(
                entry("z", QueueSel::All, t()),
                &Position::Id("zz".into()),
                Insert::Behind
            ),
            Err(FilterError::NotFound(_))
        ));
        c.remove("bb").unwrap();
        assert_eq!(c.ids(), ["h", "a", "b", "c", "ca"]);
    }

    /// Which chains an offloaded frame crosses whole: only filters it meets count (status on,
    /// its direction), and each must take it (vnet_hdr_support with a header length, the
    /// rewriter, a redirector without outdev); otherwise the path makes it plain first.
    #[test]
    fn offloaded_frames_cross_only_chains_whose_filters_take_them() {
        let out = Arc::new(RecOut::default());
        let add = |c: &mut Chain, id: &str, q, f: Box<dyn Filter>| {
            c.insert(entry(id, q, f), &Position::Tail, Insert::Behind)
                .unwrap()
        };
        let mut c = Chain::new();
        assert!(c.takes_offloaded(Direction::Rx) && c.takes_offloaded(Direction::Tx));
        add(
            &mut c,
            "m0",
            QueueSel::Tx,
            Box::new(FilterMirror::new(out.clone(), true).with_vnet_hdr_len(12)),
        );
        add(
            &mut c,
            "redire0",
            QueueSel::Rx,
            Box::new(FilterRedirector::new(None, false)),
        );
        add(
            &mut c,
            "redire1",
            QueueSel::Rx,
            Box::new(FilterRedirector::new(Some(out.clone()), true).with_vnet_hdr_len(12)),
        );
        add(
            &mut c,
            "rew0",
            QueueSel::All,
            Box::new(FilterRewriter::new()),
        );
        assert!(c.takes_offloaded(Direction::Rx) && c.takes_offloaded(Direction::Tx));
        // A mirror on tx without vnet_hdr_support: tx frames must be plain, rx ones need not.
        add(
            &mut c,
            "m1",
            QueueSel::Tx,
            Box::new(FilterMirror::new(out.clone(), false)),
        );
        assert!(!c.takes_offloaded(Direction::Tx));
        assert!(c.takes_offloaded(Direction::Rx));
        // Injected by redire0 on rx, a frame meets only m0 (tx, skipped): whole.
        assert!(c.takes_offloaded_after("redire0", Direction::Rx).unwrap());
        assert!(!c.takes_offloaded_after("m0", Direction::Tx).unwrap());
        c.set_status("m1", false).unwrap();
        assert!(c.takes_offloaded(Direction::Tx));
        // vnet_hdr_support on a netdev without vnet headers (length 0): no header to carry.
        add(
            &mut c,
            "redire2",
            QueueSel::Rx,
            Box::new(FilterRedirector::new(Some(out.clone()), true)),
        );
        assert!(!c.takes_offloaded(Direction::Rx));
        assert!(c.takes_offloaded_after("nope", Direction::Rx).is_err());
        // The frame that crosses keeps its header, and the outdev record carries it.
        c.remove("redire2").unwrap();
        let mut h = VnetHdr {
            flags: 1,
            gso_type: 1,
            hdr_len: 66,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        assert_eq!(
            c.process_offloaded(Direction::Rx, &mut h, vec![5; 3000]),
            Outcome::Consumed
        );
        let recs = out.frames.lock().unwrap();
        let rec = &recs.last().unwrap().0;
        assert_eq!(rec.vnet_hdr_len, 12);
        assert_eq!(VnetHdr::parse(rec.vnet_hdr()).unwrap(), h);
        assert_eq!(rec.l2(), &[5u8; 3000][..]);
    }

    /// Frames given in place go only to a first filter that consumes them into an outdev,
    /// with the record and counters `process` gives; anything else is left to the copying way.
    #[test]
    fn only_a_consuming_outdev_filter_met_first_takes_frames_in_place() {
        let out = Arc::new(RecOut::default());
        let l2 = vec![9u8; 100];
        let iov = [libc::iovec {
            iov_base: l2.as_ptr() as *mut libc::c_void,
            iov_len: l2.len(),
        }];
        // SAFETY: `l2` outlives every use of `raw`.
        let raw = unsafe { RawFrame::new(&iov) };
        let add = |c: &mut Chain, id: &str, q, f: Box<dyn Filter>| {
            c.insert(entry(id, q, f), &Position::Tail, Insert::Behind)
                .unwrap()
        };
        let mut c = Chain::new();
        assert!(!c.first_consumes_raw(Direction::Rx));
        assert!(!c.consume_raw(Direction::Rx, None, raw));
        add(
            &mut c,
            "r1",
            QueueSel::Rx,
            Box::new(FilterRedirector::new(Some(out.clone()), true).with_vnet_hdr_len(12)),
        );
        // A mirror met first (tail, rx): no.
        add(
            &mut c,
            "m1",
            QueueSel::Rx,
            Box::new(FilterMirror::new(out.clone(), true).with_vnet_hdr_len(12)),
        );
        assert!(!c.first_consumes_raw(Direction::Rx));
        assert!(!c.consume_raw(Direction::Rx, None, raw));
        // Switched off, or for the other direction, it is not met.
        c.set_status("m1", false).unwrap();
        assert!(c.first_consumes_raw(Direction::Rx));
        assert!(!c.first_consumes_raw(Direction::Tx));
        assert!(c.consume_raw(Direction::Rx, None, raw));
        let plain = out.frames.lock().unwrap().pop().unwrap().0;
        assert_eq!(plain.vnet_hdr_len, 12);
        assert_eq!(plain.payload, [&[0u8; 12][..], &l2].concat());
        let r1 = c.get("r1").unwrap().counters.clone();
        assert_eq!((r1.frames, r1.bytes, r1.consumed, r1.sent), (1, 100, 1, 1));
        // An offloaded frame: whole only while every filter on its way takes it so.
        let h = VnetHdr {
            flags: 1,
            gso_type: 1,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        assert!(c.consume_raw(Direction::Rx, Some(&h), raw));
        let rec = out.frames.lock().unwrap().pop().unwrap().0;
        assert_eq!(VnetHdr::parse(rec.vnet_hdr()).unwrap(), h);
        add(
            &mut c,
            "m2",
            QueueSel::Rx,
            Box::new(FilterMirror::new(out.clone(), false)),
        );
        c.set_status("m2", false).unwrap();
        add(
            &mut c,
            "r0",
            QueueSel::Rx,
            Box::new(FilterRedirector::new(Some(out.clone()), false)),
        );
        // r0 (no vnet_hdr_support) takes plain frames only.
        assert!(!c.consume_raw(Direction::Rx, Some(&h), raw));
        assert!(c.consume_raw(Direction::Rx, None, raw));
        assert_eq!(out.frames.lock().unwrap().pop().unwrap().0.payload, l2);
        c.remove("r0").unwrap();
        // m2 is behind r1 for rx and does not take offloaded frames: the path would make
        // them plain first, so not in place (plain ones still are).
        c.set_status("m2", true).unwrap();
        c.remove("m1").unwrap();
        c.insert(
            entry(
                "m1",
                QueueSel::Rx,
                Box::new(FilterMirror::new(out.clone(), false)),
            ),
            &Position::Head,
            Insert::Behind,
        )
        .unwrap();
        c.remove("m2").unwrap();
        assert_eq!(c.ids(), ["m1", "r1"]);
        assert!(!c.consume_raw(Direction::Rx, Some(&h), raw));
        assert!(c.consume_raw(Direction::Rx, None, raw));
        assert_eq!(
            c.get("m1").unwrap().counters.frames,
            0,
            "consumed before m1"
        );
    }

    #[test]
    fn failover_turns_filters_off_except_those_that_stay() {
        let mut c = Chain::new();
        c.insert(
            entry(
                "f1",
                QueueSel::Tx,
                Box::new(FilterRedirector::new(None, false)),
            ),
            &Position::Tail,
            Insert::Behind,
        )
        .unwrap();
        c.insert(
            entry("rew0", QueueSel::All, Box::new(FilterRewriter::new())),
            &Position::Tail,
            Insert::Behind,
        )
        .unwrap();
        c.failover();
        assert!(!c.get("f1").unwrap().status);
        assert!(c.get("rew0").unwrap().status);
    }

    struct Devs(Arc<RecOut>);
    impl ChardevLookup for Devs {
        fn outdev(&self, id: &str) -> Option<Arc<dyn Outdev>> {
            (id == "mirror0").then(|| self.0.clone() as Arc<dyn Outdev>)
        }
    }

    #[test]
    fn specs_parse_from_cli_and_qmp_and_bad_ones_are_refused() {
        let devs = Devs(Arc::new(RecOut::default()));
        let s = ObjectSpec::parse_cli(
            "filter-mirror,id=m0,netdev=hn0,queue=tx,outdev=mirror0,position=id=x,insert=before",
        )
        .unwrap();
        assert_eq!(s.props["position"], "id=x");
        let b = build(s, &devs).unwrap();
        assert_eq!(b.netdev, "hn0");
        assert_eq!(b.entry.queue, QueueSel::Tx);
        assert_eq!(b.position, Position::Id("x".into()));
        assert_eq!(b.insert, Insert::Before);

        let args = serde_json::json!({"qom-type":"filter-redirector","id":"r","netdev":"hn0",
            "queue":"rx","indev":"in0","vnet_hdr_support":true});
        let b = build(
            ObjectSpec::from_qmp(args.as_object().unwrap()).unwrap(),
            &devs,
        )
        .unwrap();
        assert_eq!(b.indev, Some(("in0".to_string(), true)));

        for bad in [
            "filter-mirror,id=m0,netdev=hn0,outdev=nope",
            "filter-mirror,id=m0,netdev=hn0",
            "filter-mirror,netdev=hn0,outdev=mirror0",
            "filter-mirror,id=m0,netdev=hn0,outdev=mirror0,queue=sideways",
            "filter-mirror,id=m0,netdev=hn0,outdev=mirror0,colour=red",
            "filter-redirector,id=r,netdev=hn0",
            "filter-redirector,id=r,netdev=hn0,indev=a,outdev=a",
            "filter-bogus,id=r,netdev=hn0",
            "filter-rewriter,id=r,netdev=hn0,status=maybe",
            "filter-rewriter,id=r,netdev=hn0,position=id=",
            "",
            "filter-rewriter,id",
        ] {
            let r = ObjectSpec::parse_cli(bad).and_then(|s| build(s, &devs));
            assert!(r.is_err(), "{bad} accepted");
        }
    }
}
