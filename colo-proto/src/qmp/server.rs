//! The QMP server: a listening Unix socket (or stdio), one thread per client, events broadcast.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use super::registry::Registry;
use super::wire::{JsonSplitter, Session, to_line};

/// How long a write to one client may block before that client is dropped (a stuck client must
/// not stall the process emitting events).
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// At most this many clients at once; more are told so and closed.
const MAX_CLIENTS: usize = 64;

/// Errors of the server.
#[derive(Debug, thiserror::Error)]
pub enum QmpServerError {
    /// The socket path is taken by a live server or by a file that is not a socket.
    #[error("QMP socket {path}: already in use")]
    InUse { path: PathBuf },
    /// Binding or setting up the socket failed.
    #[error("QMP socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    /// Starting a thread failed.
    #[error("QMP server: cannot start a thread: {0}")]
    Thread(io::Error),
}

struct Client {
    id: u64,
    writer: Mutex<Box<dyn Write + Send>>,
    negotiated: AtomicBool,
    /// A handle to close the connection (unblocks the client's reader thread).
    closer: Option<UnixStream>,
}

impl Client {
    fn close(&self) {
        if let Some(s) = &self.closer {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[derive(Default)]
struct SinkInner {
    clients: Mutex<Vec<Arc<Client>>>,
    next_id: AtomicU64,
}

/// Sends events to every client of a server that finished capabilities negotiation.
///
/// Clone + Send + Sync; emitting with no client connected is a no-op (as in QEMU).
#[derive(Clone, Default)]
pub struct EventSink {
    inner: Arc<SinkInner>,
}

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSink")
            .field("clients", &self.client_count())
            .finish()
    }
}

impl EventSink {
    /// A sink with no clients (normally obtained from [`Registry::events`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// Emits `{"event": name, "data": data, "timestamp": {"seconds", "microseconds"}}`.
    /// `data` of `Value::Null` is left out (QEMU's events without data). Returns how many
    /// clients it was written to.
    pub fn emit(&self, name: &str, data: Value) -> usize {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut m = Map::new();
        m.insert("event".into(), Value::from(name));
        if !data.is_null() {
            m.insert("data".into(), data);
        }
        m.insert(
            "timestamp".into(),
            serde_json::json!({"seconds": now.as_secs(), "microseconds": now.subsec_micros()}),
        );
        let line = to_line(&Value::Object(m));
        let clients: Vec<Arc<Client>> = match self.inner.clients.lock() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let mut sent = 0;
        for c in clients {
            if !c.negotiated.load(Ordering::Acquire) {
                continue;
            }
            let ok = match c.writer.lock() {
                Ok(mut w) => w.write_all(&line).and_then(|_| w.flush()).is_ok(),
                Err(_) => false,
            };
            if ok {
                sent += 1;
            } else {
                tracing::debug!(client = c.id, event = name, "QMP: dropping client");
                c.close();
                self.remove(c.id);
            }
        }
        sent
    }

    /// Clients currently connected (negotiated or not).
    pub fn client_count(&self) -> usize {
        self.inner.clients.lock().map(|c| c.len()).unwrap_or(0)
    }

    fn add(&self, writer: Box<dyn Write + Send>, closer: Option<UnixStream>) -> Arc<Client> {
        let c = Arc::new(Client {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            writer: Mutex::new(writer),
            negotiated: AtomicBool::new(false),
            closer,
        });
        if let Ok(mut list) = self.inner.clients.lock() {
            list.push(c.clone());
        }
        c
    }

    fn remove(&self, id: u64) {
        if let Ok(mut list) = self.inner.clients.lock() {
            list.retain(|c| c.id != id);
        }
    }

    fn close_all(&self) {
        let list = match self.inner.clients.lock() {
            Ok(mut l) => std::mem::take(&mut *l),
            Err(_) => return,
        };
        for c in list {
            c.close();
        }
    }
}

/// A running server. Dropping it (or [`QmpServer::shutdown`]) stops accepting, closes the
/// clients' connections and removes the socket file.
pub struct QmpServer {
    path: Option<PathBuf>,
    listener_fd: Option<UnixListener>,
    stop: Arc<AtomicBool>,
    accept_thread: Option<JoinHandle<()>>,
    events: EventSink,
}

impl std::fmt::Debug for QmpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpServer")
            .field("path", &self.path)
            .finish()
    }
}

impl QmpServer {
    /// The sink for this server's events (the registry's).
    pub fn events(&self) -> EventSink {
        self.events.clone()
    }

    /// The socket path (`None` for stdio).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Stops the server (idempotent).
    pub fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(l) = self.listener_fd.take() {
            // Wakes the thread blocked in accept() (Linux returns EINVAL from accept on a
            // listening socket that was shut down).
            // SAFETY: shutdown(2) on a descriptor we own (the listener clone stays open until
            // `l` is dropped below); it touches no memory.
            unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
            drop(l);
        }
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        self.events.close_all();
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(&p);
        }
    }
}

impl Drop for QmpServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Listens on a Unix socket at `path` and serves QMP to every client, each on its own thread.
///
/// A stale socket file (nobody listening) is replaced; a live one or another kind of file is an
/// error.
pub fn serve_unix(path: impl AsRef<Path>, registry: Registry) -> Result<QmpServer, QmpServerError> {
    let path = path.as_ref().to_path_buf();
    if let Ok(meta) = std::fs::symlink_metadata(&path) {
        if meta.file_type().is_socket() && UnixStream::connect(&path).is_err() {
            let _ = std::fs::remove_file(&path);
        } else {
            return Err(QmpServerError::InUse { path });
        }
    }
    let listener = UnixListener::bind(&path).map_err(|source| QmpServerError::Bind {
        path: path.clone(),
        source,
    })?;
    let listener_clone = listener
        .try_clone()
        .map_err(|source| QmpServerError::Bind {
            path: path.clone(),
            source,
        })?;
    let stop = Arc::new(AtomicBool::new(false));
    let events = registry.events();
    let stop2 = stop.clone();
    let shown = path.display().to_string();
    let accept_thread = std::thread::Builder::new()
        .name("qmp-accept".into())
        .spawn(move || accept_loop(listener, registry, stop2, shown))
        .map_err(QmpServerError::Thread)?;
    Ok(QmpServer {
        path: Some(path),
        listener_fd: Some(listener_clone),
        stop,
        accept_thread: Some(accept_thread),
        events,
    })
}

fn accept_loop(listener: UnixListener, registry: Registry, stop: Arc<AtomicBool>, path: String) {
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                if stop.load(Ordering::Acquire) {
                    return;
                }
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::warn!(socket = %path, error = %e, "QMP: accept failed");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if stop.load(Ordering::Acquire) {
            return;
        }
        if registry.events().client_count() >= MAX_CLIENTS {
            let mut s = stream;
            let _ = s.write_all(&to_line(&super::wire::error_response(
                &super::QmpError::generic(format!("Too many QMP clients (at most {MAX_CLIENTS})")),
                None,
            )));
            continue;
        }
        let registry = registry.clone();
        let spawned = std::thread::Builder::new()
            .name("qmp-client".into())
            .spawn(move || {
                if let Err(e) = serve_unix_client(stream, &registry) {
                    tracing::debug!(error = %e, "QMP: client connection ended with an error");
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(socket = %path, error = %e, "QMP: cannot start a client thread");
        }
    }
}

fn serve_unix_client(stream: UnixStream, registry: &Registry) -> io::Result<()> {
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let writer = stream.try_clone()?;
    let closer = stream.try_clone()?;
    serve_inner(registry, stream, Box::new(writer), Some(closer))
}

/// Serves one QMP connection on any reader/writer pair until the reader ends (blocking).
/// Events of the registry's sink reach this connection once it has negotiated.
pub fn serve_connection<R: Read, W: Write + Send + 'static>(
    registry: &Registry,
    reader: R,
    writer: W,
) -> io::Result<()> {
    serve_inner(registry, reader, Box::new(writer), None)
}

fn serve_inner<R: Read>(
    registry: &Registry,
    mut reader: R,
    writer: Box<dyn Write + Send>,
    closer: Option<UnixStream>,
) -> io::Result<()> {
    let sink = registry.events();
    let client = sink.add(writer, closer);
    let result = client_loop(registry, &mut reader, &client);
    sink.remove(client.id);
    client.close();
    result
}

fn client_loop<R: Read>(registry: &Registry, reader: &mut R, client: &Client) -> io::Result<()> {
    let write = |bytes: &[u8], set_negotiated: bool| -> io::Result<()> {
        let mut w = client
            .writer
            .lock()
            .map_err(|_| io::Error::other("QMP client writer poisoned"))?;
        // Marked before the response is written, under the writer lock: an event emitted
        // meanwhile waits for the lock, so it follows the response, and a client that has
        // read the response cannot miss an event emitted after that.
        if set_negotiated {
            client.negotiated.store(true, Ordering::Release);
        }
        w.write_all(bytes)?;
        w.flush()?;
        Ok(())
    };
    write(&to_line(&registry.greeting()), false)?;
    let mut splitter = JsonSplitter::new();
    let mut session = Session::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut items = Vec::new();
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        splitter.push(&buf[..n], &mut items);
        for item in items.drain(..) {
            let was = session.negotiated();
            let response = session.handle(registry, item);
            write(&to_line(&response), !was && session.negotiated())?;
        }
    }
}

/// Serves QMP on stdin/stdout (`--qmp stdio`) on a background thread. The returned server's
/// [`QmpServer::events`] reaches stdout once negotiated; end of stdin ends the session (the
/// process keeps running).
pub fn serve_stdio(registry: Registry) -> Result<QmpServer, QmpServerError> {
    let events = registry.events();
    std::thread::Builder::new()
        .name("qmp-stdio".into())
        .spawn(move || {
            if let Err(e) = serve_connection(&registry, io::stdin(), io::stdout()) {
                tracing::debug!(error = %e, "QMP: stdio session ended with an error");
            }
        })
        .map_err(QmpServerError::Thread)?;
    Ok(QmpServer {
        path: None,
        listener_fd: None,
        stop: Arc::new(AtomicBool::new(false)),
        accept_thread: None,
        events,
    })
}
