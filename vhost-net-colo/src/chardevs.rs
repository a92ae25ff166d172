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
use colo_proto::frame::{Frame, FrameReader, write_frame};

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
}

impl Outdev for ChardevOut {
    fn send_frame(&self, frame: &Frame, vnet_hdr_support: bool) -> std::io::Result<()> {
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
        if let Err(e) = write_frame(stream, frame, vnet_hdr_support) {
            *s = None;
            return Err(std::io::Error::other(format!("chardev {}: {e}", self.id)));
        }
        Ok(())
    }

    fn name(&self) -> String {
        self.id.clone()
    }
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
                let mut r = FrameReader::new(stream, vnet_hdr_support);
                loop {
                    match r.read_frame() {
                        Ok(Some(f)) => {
                            if st.load(Ordering::Relaxed) {
                                return;
                            }
                            let (hdr, l2) = vnet::split_record(f);
                            if let Err(e) = path.inject_vnet(&id, hdr, l2) {
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
