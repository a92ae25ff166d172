//! `-netdev stream`: frames over a Unix or TCP byte stream, each behind a 4-byte big-endian
//! length (QEMU's `-netdev stream` and socket-chardev framing, without vnet headers).
//! A server accepts the next peer after one leaves; a client reconnects every `reconnect`
//! seconds (default 1). Frames sent while no peer is connected are dropped, as QEMU does.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use colo_proto::chardev::{ChardevEndpoint, ChardevSpec, Stream};
use colo_proto::frame::{Frame, FrameDecoder, write_frame};
use std::io::Read;

use super::{FromNetdev, NetCounters, Netdev, NetdevError, Sinks, socket_address};
use crate::filter::{ObjectSpec, parse_bool};

pub struct StreamNetdev {
    id: String,
    addr: String,
    writer: Arc<Mutex<Option<Stream>>>,
    stop: Arc<AtomicBool>,
    counters: Arc<NetCounters>,
}

impl StreamNetdev {
    pub fn open(mut spec: ObjectSpec, sinks: Sinks) -> Result<Arc<Self>, NetdevError> {
        let id = spec.id.clone();
        let server = match spec.take("server") {
            Some(v) => parse_bool("server", &v)?,
            None => false,
        };
        let reconnect = match spec.take("reconnect") {
            Some(v) => Some(Duration::from_secs(v.parse().map_err(|_| {
                NetdevError::Config {
                    id: id.clone(),
                    msg: format!("reconnect={v}: not a number of seconds"),
                }
            })?)),
            None => None,
        };
        let addr = socket_address(&mut spec, "addr")?.ok_or_else(|| NetdevError::Config {
            id: id.clone(),
            msg: "addr.type is required".into(),
        })?;
        spec.finish()?;
        let cspec = ChardevSpec {
            id: Some(id.clone()),
            addr: addr.clone(),
            server,
            wait: false,
            reconnect,
        };
        let mut ep = ChardevEndpoint::open(cspec).map_err(|source| NetdevError::Chardev {
            id: id.clone(),
            source,
        })?;
        let me = Arc::new(StreamNetdev {
            id: id.clone(),
            addr: addr.to_string(),
            writer: Arc::default(),
            stop: Arc::new(AtomicBool::new(false)),
            counters: Arc::default(),
        });
        let (writer, stop, counters) = (me.writer.clone(), me.stop.clone(), me.counters.clone());
        std::thread::Builder::new()
            .name(format!("stream-{id}"))
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let s = match ep.next_stream(&stop, Duration::from_secs(1)) {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::debug!("netdev stream: {e}");
                            continue;
                        }
                    };
                    if let Ok(mut w) = writer.lock() {
                        *w = s.try_clone().ok();
                    }
                    read_frames(s, &counters, &sinks);
                    if let Ok(mut w) = writer.lock() {
                        *w = None;
                    }
                }
            })
            .map_err(|e| NetdevError::Io {
                id,
                what: "spawn reader".into(),
                source: e,
            })?;
        Ok(me)
    }
}

/// Reads records from `s` until it ends: the frames of one socket read go to the path
/// together (one batch).
fn read_frames(mut s: Stream, counters: &NetCounters, sinks: &Sinks) {
    let mut dec = FrameDecoder::new(false);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match s.read(&mut chunk) {
            Ok(0) => {
                if let Err(e) = dec.finish() {
                    tracing::warn!("netdev stream: {e}");
                }
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!("netdev stream: {e}");
                return;
            }
        };
        dec.push(&chunk[..n]);
        let mut frames = Vec::new();
        let bad = loop {
            match dec.next_frame() {
                Ok(Some(f)) => frames.push(FromNetdev::Plain(f.payload)),
                Ok(None) => break None,
                Err(e) => break Some(e),
            }
        };
        counters
            .rx_frames
            .fetch_add(frames.len() as u64, Ordering::Relaxed);
        sinks.deliver_many(frames);
        if let Some(e) = bad {
            tracing::warn!("netdev stream: {e}");
            return;
        }
    }
}

impl Netdev for StreamNetdev {
    fn id(&self) -> &str {
        &self.id
    }

    fn kind(&self) -> &'static str {
        "stream"
    }

    fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        let mut w = self
            .writer
            .lock()
            .map_err(|_| std::io::Error::other("stream writer lock poisoned"))?;
        let Some(s) = w.as_mut() else {
            self.counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        };
        match write_frame(s, &Frame::ethernet(frame), false) {
            Ok(()) => {
                self.counters.tx_frames.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::debug!("netdev stream {}: {e}", self.addr);
                self.counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
                if let Some(s) = w.take() {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
            }
        }
        Ok(())
    }

    fn describe(&self) -> serde_json::Value {
        let connected = self.writer.lock().map(|w| w.is_some()).unwrap_or(false);
        serde_json::json!({"addr": self.addr, "connected": connected, "counters": self.counters.json()})
    }
}

impl Drop for StreamNetdev {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Ok(mut w) = self.writer.lock()
            && let Some(s) = w.take()
        {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}
