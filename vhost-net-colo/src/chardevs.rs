//! `-chardev socket,...` objects used by filters: framed senders for `outdev`, reader threads
//! for `indev`, on [`colo_proto::chardev`] endpoints.
//!
//! An outdev with no peer drops frames (counted as filter errors), as QEMU's filters do with a
//! disconnected socket chardev; a connecting outdev retries at most every `reconnect` interval
//! (default 1 s), a listening one takes a waiting peer on the next frame.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use colo_proto::chardev::{ChardevEndpoint, ChardevError, ChardevSpec, DEFAULT_RECONNECT, Stream};
use std::io::Read;

use colo_proto::frame::{FrameError, FrameIoError, MAX_PAYLOAD_LEN, record_fields};

use crate::filter::{ChardevLookup, FlushError, Outdev, RawFrame};
use crate::handoff::Handoff;
use crate::path::NetPath;
use crate::vnet;
use std::os::fd::AsRawFd;

/// All chardevs of the process, by id.
#[derive(Default)]
pub struct Chardevs {
    map: Mutex<BTreeMap<String, Arc<ChardevEndpoint>>>,
}

impl Chardevs {
    /// Adds `-chardev socket,id=ID,...` (servers start listening now).
    pub fn add(&self, spec: &str) -> Result<String, ChardevError> {
        let spec: ChardevSpec = spec.parse()?;
        let Some(id) = spec.id.clone() else {
            return Err(ChardevError::Parse {
                spec: format!("{spec:?}"),
                msg: "id= is required".into(),
            });
        };
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.contains_key(&id) {
            return Err(ChardevError::Parse {
                spec: id.clone(),
                msg: "a chardev with this id exists".into(),
            });
        }
        let ep = ChardevEndpoint::open(spec)?;
        map.insert(id.clone(), Arc::new(ep));
        Ok(id)
    }

    pub fn remove(&self, id: &str) -> bool {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
            .is_some()
    }

    pub fn get(&self, id: &str) -> Option<Arc<ChardevEndpoint>> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    pub fn ids(&self) -> Vec<String> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }
}

impl ChardevLookup for Chardevs {
    fn outdev(&self, id: &str) -> Option<Arc<dyn Outdev>> {
        let ep = self.get(id)?;
        Some(Arc::new(ChardevOut {
            id: id.to_string(),
            ep,
            state: Mutex::new(OutState::default()),
            last_try: Mutex::new(None),
        }))
    }
}

/// Records an outdev keeps in one batch before it writes them early.
pub const BATCH_RECORDS: u64 = 64;
/// Bytes an outdev keeps in one batch before it writes them early.
pub const BATCH_BYTES: usize = 256 * 1024;
/// Records longer than this (GSO frames of tens of KiB) are never copied into the batch: they
/// are written from the frame itself, in the same `writev` as the records kept before them.
pub const COPY_MAX: usize = 16 * 1024;

/// How long one write to an outdev may wait for its peer to read before the peer counts as
/// gone (the connection is dropped, the records in that write are counted lost, the next
/// record reconnects). Filters write while the chain is locked, so without a bound a secondary
/// host that died with its connection open, or a consumer that stops reading while it waits
/// for our indev, would freeze the guest's traffic and every QMP command, failover included,
/// until TCP gave up (minutes). A live comparer or secondary reads within milliseconds.
pub const OUTDEV_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long an outdev's reconnect (client chardevs) may take, for the same reason: it runs on
/// the data path, and a peer host that is down answers nothing.
pub const OUTDEV_CONNECT_TIMEOUT: Duration = Duration::from_millis(250);

/// A filter's `outdev`. Outside a batch every record is one `writev`; inside one (see
/// [`Outdev::begin_batch`]) small records are kept, in order, and written together by
/// [`Outdev::flush`], or earlier when [`BATCH_RECORDS`] or [`BATCH_BYTES`] is reached or a
/// large record comes.
pub struct ChardevOut {
    id: String,
    ep: Arc<ChardevEndpoint>,
    state: Mutex<OutState>,
    last_try: Mutex<Option<Instant>>,
}

#[derive(Default)]
struct OutState {
    stream: Option<Stream>,
    batching: bool,
    /// Whole records (length fields, header, frame) accepted and not yet written.
    pending: Vec<u8>,
    /// How many records `pending` holds.
    records: u64,
    /// Records of this batch lost by an early write, with the last error (reported by `flush`).
    lost: u64,
    lost_error: Option<std::io::Error>,
}

impl ChardevOut {
    /// A new connection to the peer, its writes bounded by [`OUTDEV_WRITE_TIMEOUT`].
    fn connect(&self) -> Option<Stream> {
        let stream = self.connect_peer()?;
        if let Err(e) = stream.set_write_timeout(Some(OUTDEV_WRITE_TIMEOUT)) {
            tracing::warn!("chardev {}: no write timeout: {e}", self.id);
            return None;
        }
        Some(stream)
    }

    fn connect_peer(&self) -> Option<Stream> {
        let spec = self.ep.spec();
        if spec.server {
            let never = AtomicBool::new(false);
            return self.ep.accept(&never, Some(Duration::ZERO)).ok().flatten();
        }
        let mut last = self.last_try.lock().unwrap_or_else(|p| p.into_inner());
        let every = spec.reconnect.unwrap_or(DEFAULT_RECONNECT);
        if last.is_some_and(|t| t.elapsed() < every) {
            return None;
        }
        *last = Some(Instant::now());
        self.ep.connect_within(OUTDEV_CONNECT_TIMEOUT).ok()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, OutState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the kept records followed by `parts` and `raw` (one record, or nothing) in as
    /// few `writev` calls as the socket allows. On failure the stream is dropped (the next
    /// record reconnects) and the kept records are counted lost; the error is returned.
    fn write_out(
        &self,
        st: &mut OutState,
        parts: &[&[u8]],
        raw: Option<RawFrame<'_>>,
    ) -> std::io::Result<()> {
        let kept = std::mem::take(&mut st.records);
        if kept == 0 && parts.iter().all(|p| p.is_empty()) && raw.is_none_or(|r| r.is_empty()) {
            return Ok(());
        }
        let r = match st.stream.as_ref() {
            None => Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "no peer",
            )),
            Some(stream) => {
                let slice = |p: &[u8]| libc::iovec {
                    iov_base: p.as_ptr() as *mut libc::c_void,
                    iov_len: p.len(),
                };
                let raw = raw.map(|r| r.iovecs()).unwrap_or_default();
                let mut iov: Vec<libc::iovec> = std::iter::once(&st.pending[..])
                    .chain(parts.iter().copied())
                    .map(slice)
                    .chain(raw.iter().copied())
                    .filter(|v| v.iov_len > 0)
                    .collect();
                let fd = match stream {
                    Stream::Unix(u) => u.as_raw_fd(),
                    Stream::Tcp(t) => t.as_raw_fd(),
                };
                // SAFETY: the iovecs cover our own buffers (`pending`, `parts`) and the raw
                // frame's pieces, readable until we return (its constructor's contract).
                unsafe { writev_all(fd, &mut iov) }
            }
        };
        st.pending.clear();
        if st.pending.capacity() > 2 * BATCH_BYTES {
            st.pending = Vec::new();
        }
        r.map_err(|e| {
            st.stream = None;
            let e = std::io::Error::new(e.kind(), format!("chardev {}: {e}", self.id));
            if kept > 0 {
                st.lost += kept;
                st.lost_error = Some(std::io::Error::new(e.kind(), e.to_string()));
            }
            e
        })
    }
}

impl Outdev for ChardevOut {
    fn send_parts(&self, hdr: &[u8], l2: &[u8], vnet_hdr_support: bool) -> std::io::Result<()> {
        self.send_record(hdr, Payload::Slice(l2), vnet_hdr_support)
    }

    fn send_raw(
        &self,
        hdr: &[u8],
        l2: RawFrame<'_>,
        vnet_hdr_support: bool,
    ) -> std::io::Result<()> {
        self.send_record(hdr, Payload::Raw(l2), vnet_hdr_support)
    }

    fn name(&self) -> String {
        self.id.clone()
    }

    fn begin_batch(&self) {
        self.state().batching = true;
    }

    fn flush(&self) -> Result<(), FlushError> {
        let mut guard = self.state();
        let st = &mut *guard;
        st.batching = false;
        let r = self.write_out(st, &[], None);
        let lost = std::mem::take(&mut st.lost);
        let last = st.lost_error.take();
        if lost == 0 {
            return Ok(());
        }
        let error = match (r, last) {
            (Err(e), _) | (Ok(()), Some(e)) => e,
            (Ok(()), None) => std::io::Error::other(format!("chardev {}: write failed", self.id)),
        };
        Err(FlushError { lost, error })
    }
}

/// A record's frame: our own bytes, or the guest's in place.
#[derive(Clone, Copy)]
enum Payload<'a> {
    Slice(&'a [u8]),
    Raw(RawFrame<'a>),
}

impl Payload<'_> {
    fn len(&self) -> usize {
        match self {
            Payload::Slice(s) => s.len(),
            Payload::Raw(r) => r.len(),
        }
    }
}

impl ChardevOut {
    /// One record (see [`Outdev::send_parts`]): kept in the batch when small, else written at
    /// once after what is kept, from the frame itself.
    fn send_record(
        &self,
        hdr: &[u8],
        l2: Payload<'_>,
        vnet_hdr_support: bool,
    ) -> std::io::Result<()> {
        let (fields, nf) = record_fields(hdr.len() + l2.len(), hdr.len(), vnet_hdr_support)
            .map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("chardev {}: {e}", self.id),
                )
            })?;
        let mut guard = self.state();
        let st = &mut *guard;
        if st.stream.is_none() {
            st.stream = self.connect();
        }
        if st.stream.is_none() {
            // Nothing can be kept without a stream (a failed write drops what was kept).
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                format!("chardev {}: no peer", self.id),
            ));
        }
        if st.batching && hdr.len() + l2.len() <= COPY_MAX {
            st.pending.extend_from_slice(&fields[..nf]);
            st.pending.extend_from_slice(hdr);
            match l2 {
                Payload::Slice(s) => st.pending.extend_from_slice(s),
                Payload::Raw(r) => r.copy_to(&mut st.pending),
            }
            st.records += 1;
            if st.records >= BATCH_RECORDS || st.pending.len() >= BATCH_BYTES {
                // Counted by `flush` (this record included).
                let _ = self.write_out(st, &[], None);
            }
            return Ok(());
        }
        // Outside a batch, or a large record: what is kept first, then this one, zero-copy.
        match l2 {
            Payload::Slice(s) => self.write_out(st, &[&fields[..nf], hdr, s], None),
            Payload::Raw(r) => self.write_out(st, &[&fields[..nf], hdr], Some(r)),
        }
    }
}

impl Drop for ChardevOut {
    fn drop(&mut self) {
        // A filter removed outside a batch keeps nothing; this is a safety net.
        let mut guard = self.state();
        let _ = self.write_out(&mut guard, &[], None);
    }
}

/// Writes all of `iov`, in order, to the blocking socket `fd` with as few `writev` calls as
/// it allows (at most `IOV_MAX` pieces each); `iov` is used up.
///
/// # Safety
/// Every iovec must cover readable memory for the duration of the call.
unsafe fn writev_all(fd: std::os::fd::RawFd, iov: &mut [libc::iovec]) -> std::io::Result<()> {
    const IOV_MAX: usize = 1024;
    let mut at = 0;
    while at < iov.len() {
        let n = (iov.len() - at).min(IOV_MAX);
        let rest = &mut iov[at..];
        // SAFETY: `rest` holds at least `n` iovecs over readable memory (the caller's contract).
        let r = unsafe { libc::writev(fd, rest.as_ptr(), n as libc::c_int) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let mut done = r as usize;
        for v in rest.iter_mut() {
            if done < v.iov_len {
                v.iov_base = v.iov_base.cast::<u8>().wrapping_add(done).cast();
                v.iov_len -= done;
                break;
            }
            done -= v.iov_len;
            v.iov_len = 0;
            at += 1;
        }
    }
    Ok(())
}

/// A running indev reader; dropping it stops the thread and closes its connection.
pub struct Indev {
    stop: Arc<AtomicBool>,
    current: Arc<Mutex<Option<Stream>>>,
}

impl Drop for Indev {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(s) = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Reads until `buf` is full or the stream ends; the number of bytes read.
fn fill(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut at = 0;
    while at < buf.len() {
        match r.read(&mut buf[at..]) {
            Ok(0) => break,
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(at)
}

/// A received record: its virtio-net header (possibly empty) and its frame.
type Record = (Vec<u8>, Vec<u8>);

/// One record of QEMU's framing (length, `vnet_hdr_len` with `vnet_hdr_support`, payload), read
/// straight into its header and frame buffers: `(header, frame)`, `None` at a clean end of the
/// stream between records. A frame of 64 KiB is read in place, not through the small buffer.
fn read_record(r: &mut impl Read, vnet_hdr_support: bool) -> Result<Option<Record>, FrameIoError> {
    let truncated = |part, have, need| FrameError::Truncated {
        offset: 0,
        part,
        have,
        need,
    };
    let mut f = [0u8; 4];
    match fill(r, &mut f)? {
        0 => return Ok(None),
        4 => {}
        n => return Err(truncated("length", n, 4).into()),
    }
    let len = u32::from_be_bytes(f);
    if len as usize > MAX_PAYLOAD_LEN {
        return Err(FrameError::Oversize {
            offset: 0,
            len: u64::from(len),
            max: MAX_PAYLOAD_LEN,
        }
        .into());
    }
    let vnet_hdr_len = if vnet_hdr_support {
        let n = fill(r, &mut f)?;
        if n != 4 {
            return Err(truncated("vnet header length", n, 4).into());
        }
        u32::from_be_bytes(f)
    } else {
        0
    };
    if vnet_hdr_len > len {
        return Err(FrameError::BadVnetHdrLen {
            offset: 0,
            vnet_hdr_len,
            len,
        }
        .into());
    }
    let mut hdr = Vec::new();
    let mut l2 = Vec::new();
    let parts = [
        ("vnet header", &mut hdr, vnet_hdr_len as usize),
        ("payload", &mut l2, (len - vnet_hdr_len) as usize),
    ];
    for (part, buf, want) in parts {
        // Into capacity the read fills (no zeroing first); a frame of 64 KiB goes straight
        // from the socket into it, not through the reader's buffer.
        buf.reserve_exact(want);
        let n = r.by_ref().take(want as u64).read_to_end(buf)?;
        if n != want {
            return Err(truncated(part, n, want).into());
        }
    }
    Ok(Some((hdr, l2)))
}

/// Bytes of records an indev reader reads ahead of their injection: a guest transmit pass's
/// worth (a ring of 1024 frames of up to 64 KiB). The pass writes its frames to outdevs in
/// batches, and between two batches the injector may not win the chain's lock (it is not
/// fair), so a whole pass can go out while the injector waits; a consumer between our outdev
/// and our indev then finds room here (see [`spawn_indev`]). Memory is only taken while the
/// chain is that busy.
pub const INDEV_READ_AHEAD: usize = 64 << 20;

/// Records the injector hands to the path at most at a time (one hold of the chain's lock).
const INJECT_BATCH: usize = 64;

/// Starts reading filter `filter_id`'s indev and injecting its frames into `path`.
///
/// Two threads: one reads records into a [`Handoff`], the other injects what has come, in
/// order, up to [`INJECT_BATCH`] records under one hold of the chain's lock. A consumer that
/// moves frames from our outdev to our indev on one blocking thread (colo-compare between
/// `compare0` and `compare_out`, QEMU's and ours, or `socat`) stops reading the outdev while
/// its write into the indev waits; a filter writing that outdev waits with the chain locked,
/// and injection needs the chain. Reading on while the injector waits breaks that circle
/// (test `indev_coupled`).
pub fn spawn_indev(
    path: Arc<NetPath>,
    filter_id: &str,
    ep: Arc<ChardevEndpoint>,
    vnet_hdr_support: bool,
) -> std::io::Result<Indev> {
    let stop = Arc::new(AtomicBool::new(false));
    let current: Arc<Mutex<Option<Stream>>> = Arc::default();
    let handoff = Arc::new(Handoff::new(INDEV_READ_AHEAD));
    let (st, q, id) = (stop.clone(), handoff.clone(), filter_id.to_string());
    std::thread::Builder::new()
        .name(format!("inject-{filter_id}"))
        .spawn(move || {
            crate::sched::data_thread();
            while let Some(recs) = q.pop_batch(INJECT_BATCH) {
                if st.load(Ordering::Relaxed) {
                    return;
                }
                if let Err(e) = path.inject_batch(&id, recs) {
                    tracing::debug!("indev {id}: {e}");
                    // The filter is gone: the reader stops at its next record.
                    q.close();
                    return;
                }
            }
        })?;
    let (st, cur, id) = (stop.clone(), current.clone(), filter_id.to_string());
    std::thread::Builder::new()
        .name(format!("indev-{filter_id}"))
        .spawn(move || {
            crate::sched::data_thread();
            // However this thread ends, the injector ends after what was read.
            let _close = CloseOnDrop(&handoff);
            while !st.load(Ordering::Relaxed) {
                let stream = if ep.spec().server {
                    match ep.accept(&st, None) {
                        Ok(Some(s)) => s,
                        Ok(None) => continue,
                        Err(_) => break,
                    }
                } else {
                    match ep.connect_once() {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::debug!("indev {id}: {e}");
                            let every = ep.spec().reconnect.unwrap_or(DEFAULT_RECONNECT);
                            let until = Instant::now() + every;
                            while Instant::now() < until && !st.load(Ordering::Relaxed) {
                                std::thread::sleep(Duration::from_millis(5));
                            }
                            continue;
                        }
                    }
                };
                *cur.lock().unwrap_or_else(|p| p.into_inner()) = stream.try_clone().ok();
                if st.load(Ordering::Relaxed) {
                    break;
                }
                let mut r = std::io::BufReader::with_capacity(16 * 1024, stream);
                loop {
                    match read_record(&mut r, vnet_hdr_support) {
                        Ok(Some((hdr, l2))) => {
                            if st.load(Ordering::Relaxed) {
                                return;
                            }
                            let bytes = hdr.len() + l2.len();
                            if !handoff.push((vnet::offload_hdr(&hdr), l2), bytes) {
                                return;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!("indev {id}: {e}");
                            break;
                        }
                    }
                }
                *cur.lock().unwrap_or_else(|p| p.into_inner()) = None;
            }
        })?;
    Ok(Indev { stop, current })
}

/// Closes a handoff when dropped.
struct CloseOnDrop<'a, T>(&'a Handoff<T>);

impl<T> Drop for CloseOnDrop<'_, T> {
    fn drop(&mut self) {
        self.0.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::{Chain, Counters, Direction, Entry, FilterMirror, Insert, Position};
    use colo_proto::frame::{Frame, FrameReader, encode};
    use std::os::unix::net::UnixStream;

    /// A listening outdev chardev in `dir`, its peer (the test's end, read timeout 10 s), and
    /// a chain with one mirror (`queue=all`) writing to it.
    fn mirror_chain(dir: &std::path::Path) -> (Chain, UnixStream) {
        let devs = Chardevs::default();
        let path = dir.join("out.sock");
        devs.add(&format!("socket,id=out0,path={},server=on", path.display()))
            .unwrap();
        let peer = UnixStream::connect(&path).unwrap();
        let out = devs.outdev("out0").unwrap();
        let mut c = Chain::new();
        c.insert(
            Entry {
                id: "m0".into(),
                queue: crate::filter::QueueSel::All,
                status: true,
                counters: Counters::default(),
                filter: Box::new(FilterMirror::new(out, false)),
            },
            &Position::Tail,
            Insert::Behind,
        )
        .unwrap();
        (c, peer)
    }

    fn frame(i: usize, len: usize) -> Vec<u8> {
        (0..len).map(|j| (i * 7 + j * 3) as u8).collect()
    }

    /// Reads `peer`'s records on a thread of its own (so the writer never blocks on a full
    /// socket): their payloads, in order.
    fn records(peer: UnixStream) -> std::sync::mpsc::Receiver<Vec<u8>> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = FrameReader::new(peer, false);
            while let Ok(Some(f)) = r.read_frame() {
                if tx.send(f.payload).is_err() {
                    break;
                }
            }
        });
        rx
    }

    fn next(rx: &std::sync::mpsc::Receiver<Vec<u8>>) -> Vec<u8> {
        rx.recv_timeout(Duration::from_secs(10))
            .expect("a record at the outdev's peer")
    }

    /// True when no record arrives within 200 ms.
    fn nothing_arrives(rx: &std::sync::mpsc::Receiver<Vec<u8>>) -> bool {
        rx.recv_timeout(Duration::from_millis(200)).is_err()
    }

    #[test]
    fn a_batch_writes_its_records_at_its_end_in_order_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let (mut c, peer) = mirror_chain(dir.path());
        let rx = records(peer);
        // Outside a batch a record is written at once, as before.
        c.process(Direction::Tx, frame(0, 60));
        assert_eq!(next(&rx), frame(0, 60));
        // Small and 64 KiB frames mixed in one pass: small ones are kept until the batch ends
        // (or a large one comes), and everything leaves in the order it came.
        let sizes = [60, 1514, 60, 65536, 9014, 60, 65536, 65536, 128, 60];
        c.begin_batch();
        c.process(Direction::Tx, frame(1, 60));
        c.process(Direction::Rx, frame(2, 1514));
        assert!(nothing_arrives(&rx), "small records are kept in the batch");
        for (i, &len) in sizes.iter().enumerate().skip(2) {
            c.process(Direction::Tx, frame(i + 1, len));
        }
        c.end_batch();
        for (i, &len) in sizes.iter().enumerate() {
            assert_eq!(next(&rx), frame(i + 1, len), "record {i}");
        }
        assert!(nothing_arrives(&rx));
        let m = &c.get("m0").unwrap().counters;
        assert_eq!((m.sent, m.errors), (11, 0));
        // A batch of one frame still leaves at the batch's end.
        c.begin_batch();
        c.process(Direction::Tx, frame(99, 61));
        c.end_batch();
        assert_eq!(next(&rx), frame(99, 61));
    }

    #[test]
    fn a_long_batch_is_written_early_every_batch_records() {
        let dir = tempfile::tempdir().unwrap();
        let (mut c, peer) = mirror_chain(dir.path());
        let rx = records(peer);
        c.begin_batch();
        for i in 0..BATCH_RECORDS as usize {
            c.process(Direction::Tx, frame(i, 100));
        }
        // The cap was reached: the first BATCH_RECORDS are out before the batch ends.
        for i in 0..BATCH_RECORDS as usize {
            assert_eq!(next(&rx), frame(i, 100));
        }
        c.process(Direction::Tx, frame(1000, 100));
        assert!(nothing_arrives(&rx));
        c.end_batch();
        assert_eq!(next(&rx), frame(1000, 100));
        assert_eq!(c.get("m0").unwrap().counters.sent, BATCH_RECORDS + 1);
    }

    #[test]
    fn a_peer_that_leaves_mid_batch_gives_error_counts_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let (mut c, peer) = mirror_chain(dir.path());
        c.begin_batch();
        for i in 0..5 {
            c.process(Direction::Tx, frame(i, 200));
        }
        peer.shutdown(std::net::Shutdown::Both).unwrap();
        drop(peer);
        for i in 5..8 {
            c.process(Direction::Tx, frame(i, 200));
        }
        c.end_batch();
        let m = c.get("m0").unwrap().counters.clone();
        assert_eq!(
            (m.sent, m.errors),
            (0, 8),
            "every record of the failed write"
        );
        // The stream was dropped; with no new peer, the next record is an error at once.
        c.begin_batch();
        c.process(Direction::Tx, frame(9, 200));
        c.end_batch();
        let m = c.get("m0").unwrap().counters.clone();
        assert_eq!((m.sent, m.errors), (0, 9));
        // A new peer is taken on the next record.
        let peer = UnixStream::connect(dir.path().join("out.sock")).unwrap();
        let rx = records(peer);
        c.begin_batch();
        c.process(Direction::Tx, frame(10, 200));
        c.process(Direction::Tx, frame(11, 65_536));
        c.end_batch();
        assert_eq!(next(&rx), frame(10, 200));
        assert_eq!(next(&rx), frame(11, 65_536));
        let m = c.get("m0").unwrap().counters.clone();
        assert_eq!((m.sent, m.errors), (2, 9));
    }

    #[test]
    fn a_peer_that_stops_reading_costs_a_write_timeout_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let (mut c, peer) = mirror_chain(dir.path());
        // The peer stays connected and never reads: a secondary host that died with its
        // connection open, or a relay blocked on our indev. Each write may wait for it up to
        // OUTDEV_WRITE_TIMEOUT; then the connection is dropped and the record counted lost.
        // Without the bound this loop never ends (the socket buffer fills and the write
        // blocks with the chain in hand).
        let mut sent = 0u64;
        while c.get("m0").unwrap().counters.errors == 0 {
            c.process(Direction::Tx, frame(sent as usize, 65_536));
            sent += 1;
            assert!(
                sent < 10_000,
                "a peer that reads nothing took {sent} records"
            );
        }
        let m = c.get("m0").unwrap().counters.clone();
        assert_eq!((m.sent, m.errors), (sent - 1, 1));
        // The connection was dropped: the peer sees its end after what it was sent.
        let rx = records(peer);
        for i in 0..(sent - 1) as usize {
            assert_eq!(next(&rx), frame(i, 65_536), "record {i}");
        }
        // A peer that reconnects gets the next record.
        let peer = UnixStream::connect(dir.path().join("out.sock")).unwrap();
        let rx = records(peer);
        c.process(Direction::Tx, frame(7, 1514));
        assert_eq!(next(&rx), frame(7, 1514));
    }

    #[test]
    fn a_filter_removed_during_a_batch_takes_no_record_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut c, peer) = mirror_chain(dir.path());
        let rx = records(peer);
        c.begin_batch();
        c.process(Direction::Tx, frame(1, 60));
        let e = c.remove("m0").unwrap();
        assert_eq!(e.counters.sent, 1);
        assert_eq!(next(&rx), frame(1, 60));
    }

    #[test]
    fn records_are_read_in_place_and_bad_streams_are_errors() {
        for support in [false, true] {
            let mut bytes = Vec::new();
            let big = Frame {
                vnet_hdr_len: if support { 12 } else { 0 },
                payload: (0..66_000u32).map(|i| i as u8).collect(),
            };
            let small = Frame::ethernet(vec![7u8; 60]);
            encode(&big, support, &mut bytes).unwrap();
            encode(&small, support, &mut bytes).unwrap();
            let mut r = std::io::BufReader::with_capacity(16 * 1024, &bytes[..]);
            let (h, l2) = read_record(&mut r, support).unwrap().unwrap();
            assert_eq!(h, big.vnet_hdr());
            assert_eq!(l2, big.l2());
            let (h, l2) = read_record(&mut r, support).unwrap().unwrap();
            assert!(h.is_empty());
            assert_eq!(l2, vec![7u8; 60]);
            assert!(read_record(&mut r, support).unwrap().is_none(), "clean end");
            // Cut anywhere inside a record: an error, not a hang or a panic.
            for cut in [1, 3, 5, 9, 100, bytes.len() - 1] {
                let mut r = &bytes[..cut];
                let first = read_record(&mut r, support);
                let second = first.and_then(|_| read_record(&mut r, support));
                assert!(second.is_err() || cut < 4, "cut at {cut}");
            }
        }
        let mut huge = &[0xffu8, 0xff, 0xff, 0xff, 0, 0, 0, 0][..];
        assert!(read_record(&mut huge, true).is_err());
        let mut bad_hdr = &[0u8, 0, 0, 4, 0, 0, 0, 9, 1, 2, 3, 4][..];
        assert!(read_record(&mut bad_hdr, true).is_err());
    }
}
