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

use crate::filter::{ChardevLookup, Outdev};
use crate::path::NetPath;
use crate::vnet;

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
            stream: Mutex::new(None),
            last_try: Mutex::new(None),
        }))
    }
}

/// A filter's `outdev`.
pub struct ChardevOut {
    id: String,
    ep: Arc<ChardevEndpoint>,
    stream: Mutex<Option<Stream>>,
    last_try: Mutex<Option<Instant>>,
}

impl ChardevOut {
    fn connect(&self) -> Option<Stream> {
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
        self.ep.connect_once().ok()
    }

    /// Runs `write` on the connected stream (connecting first if there is none); a failed
    /// write drops the stream, so the next record reconnects.
    fn with_stream(
        &self,
        write: impl FnOnce(&mut Stream) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let mut s = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        if s.is_none() {
            *s = self.connect();
        }
        let Some(stream) = s.as_mut() else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                format!("chardev {}: no peer", self.id),
            ));
        };
        if let Err(e) = write(stream) {
            *s = None;
            return Err(std::io::Error::other(format!("chardev {}: {e}", self.id)));
        }
        Ok(())
    }
}

impl Outdev for ChardevOut {
    fn send_parts(&self, hdr: &[u8], l2: &[u8], vnet_hdr_support: bool) -> std::io::Result<()> {
        let (fields, nf) = record_fields(hdr.len() + l2.len(), hdr.len(), vnet_hdr_support)
            .map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("chardev {}: {e}", self.id),
                )
            })?;
        let parts = [&fields[..nf], hdr, l2];
        self.with_stream(|stream| match stream {
            Stream::Unix(u) => write_all_parts(u, &parts),
            Stream::Tcp(t) => write_all_parts(t, &parts),
        })
    }

    fn name(&self) -> String {
        self.id.clone()
    }
}

/// Writes all of `parts`, in order, with as few `writev` calls as the socket allows.
fn write_all_parts(w: &mut impl std::io::Write, parts: &[&[u8]]) -> std::io::Result<()> {
    use std::io::IoSlice;
    let mut bufs: Vec<IoSlice<'_>> = parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| IoSlice::new(p))
        .collect();
    let mut bufs = &mut bufs[..];
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
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
    let mut hdr = vec![0u8; vnet_hdr_len as usize];
    let mut l2 = vec![0u8; (len - vnet_hdr_len) as usize];
    for (part, buf) in [("vnet header", &mut hdr), ("payload", &mut l2)] {
        let n = fill(r, buf)?;
        if n != buf.len() {
            return Err(truncated(part, n, buf.len()).into());
        }
    }
    Ok(Some((hdr, l2)))
}

/// Starts reading filter `filter_id`'s indev and injecting its frames into `path`.
pub fn spawn_indev(
    path: Arc<NetPath>,
    filter_id: &str,
    ep: Arc<ChardevEndpoint>,
    vnet_hdr_support: bool,
) -> std::io::Result<Indev> {
    let stop = Arc::new(AtomicBool::new(false));
    let current: Arc<Mutex<Option<Stream>>> = Arc::default();
    let (st, cur, id) = (stop.clone(), current.clone(), filter_id.to_string());
    std::thread::Builder::new()
        .name(format!("indev-{filter_id}"))
        .spawn(move || {
            crate::sched::data_thread();
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
                            if let Err(e) = path.inject_vnet(&id, vnet::offload_hdr(&hdr), l2) {
                                tracing::debug!("indev {id}: {e}");
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

#[cfg(test)]
mod tests {
    use super::*;
    use colo_proto::frame::{Frame, encode};

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
