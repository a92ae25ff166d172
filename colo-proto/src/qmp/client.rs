//! A blocking QMP client (ours or QEMU's server).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use super::wire::{Incoming, JsonSplitter, to_line};
use super::{ErrorClass, QmpError};

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum QmpClientError {
    /// Connecting failed.
    #[error("QMP connect to {target}: {source}")]
    Connect { target: String, source: io::Error },
    /// Reading or writing the socket failed.
    #[error("QMP {target}: {source}")]
    Io { target: String, source: io::Error },
    /// The peer closed the connection.
    #[error("QMP {target}: connection closed by the server")]
    Closed { target: String },
    /// Nothing arrived in time.
    #[error("QMP {target}: timed out after {timeout:?} waiting for {what}")]
    Timeout {
        target: String,
        what: String,
        timeout: Duration,
    },
    /// The server sent something that is not QMP.
    #[error("QMP {target}: protocol error: {msg}")]
    Protocol { target: String, msg: String },
    /// The command failed: the server's `{"error": {"class", "desc"}}`.
    #[error("QMP command '{command}' failed: {error}")]
    Qmp { command: String, error: QmpError },
    /// `execute` was given arguments that are not an object (or null).
    #[error("QMP command '{command}': arguments must be a JSON object or null")]
    BadArguments { command: String },
}

impl QmpClientError {
    /// The QMP error, when the server answered with one.
    pub fn qmp_error(&self) -> Option<&QmpError> {
        match self {
            QmpClientError::Qmp { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// An asynchronous event received from the server.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// The event name, e.g. `RESUME`.
    pub name: String,
    /// Its `data` (`Value::Null` when absent).
    pub data: Value,
    /// `timestamp.seconds`.
    pub seconds: u64,
    /// `timestamp.microseconds`.
    pub microseconds: u64,
}

enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    fn set_read_timeout(&self, t: Duration) -> io::Result<()> {
        let t = Some(t.max(Duration::from_millis(1)));
        match self {
            Conn::Unix(s) => s.set_read_timeout(t),
            Conn::Tcp(s) => s.set_read_timeout(t),
        }
    }

    fn set_write_timeout(&self, t: Duration) -> io::Result<()> {
        let t = Some(t.max(Duration::from_millis(1)));
        match self {
            Conn::Unix(s) => s.set_write_timeout(t),
            Conn::Tcp(s) => s.set_write_timeout(t),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.write_all(buf),
            Conn::Tcp(s) => s.write_all(buf),
        }
    }
}

/// A blocking QMP client: connects, reads the greeting, negotiates capabilities; then runs
/// commands one at a time. Events that arrive meanwhile are queued for [`QmpClient::next_event`].
pub struct QmpClient {
    conn: Conn,
    target: String,
    splitter: JsonSplitter,
    incoming: VecDeque<Incoming>,
    events: VecDeque<Event>,
    greeting: Value,
    next_id: u64,
    timeout: Duration,
}

impl std::fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpClient")
            .field("target", &self.target)
            .finish()
    }
}

impl QmpClient {
    /// Connects to a Unix socket. `timeout` bounds the connection set-up and, later, each
    /// command (see [`QmpClient::set_timeout`]).
    pub fn connect_unix(path: impl AsRef<Path>, timeout: Duration) -> Result<Self, QmpClientError> {
        let target = path.as_ref().display().to_string();
        let s = UnixStream::connect(path.as_ref()).map_err(|source| QmpClientError::Connect {
            target: target.clone(),
            source,
        })?;
        Self::handshake(Conn::Unix(s), target, timeout)
    }

    /// Connects to a TCP address (QEMU's `-qmp tcp:HOST:PORT,server=on`).
    pub fn connect_tcp(
        addr: impl ToSocketAddrs,
        timeout: Duration,
    ) -> Result<Self, QmpClientError> {
        let addrs: Vec<_> = addr
            .to_socket_addrs()
            .map_err(|source| QmpClientError::Connect {
                target: "tcp address".into(),
                source,
            })?
            .collect();
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
        for a in addrs {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(s) => return Self::handshake(Conn::Tcp(s), a.to_string(), timeout),
                Err(e) => last = e,
            }
        }
        Err(QmpClientError::Connect {
            target: "tcp address".into(),
            source: last,
        })
    }

    /// Like [`QmpClient::connect_unix`], retrying until the socket accepts or `deadline` passes
    /// (for a server that is still starting).
    pub fn connect_unix_retry(
        path: impl AsRef<Path>,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Self, QmpClientError> {
        loop {
            match Self::connect_unix(path.as_ref(), timeout) {
                Ok(c) => return Ok(c),
                Err(e @ QmpClientError::Connect { .. }) => {
                    if Instant::now() >= deadline {
                        return Err(e);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn handshake(conn: Conn, target: String, timeout: Duration) -> Result<Self, QmpClientError> {
        conn.set_write_timeout(timeout)
            .map_err(|source| QmpClientError::Io {
                target: target.clone(),
                source,
            })?;
        let mut c = QmpClient {
            conn,
            target,
            splitter: JsonSplitter::new(),
            incoming: VecDeque::new(),
            events: VecDeque::new(),
            greeting: Value::Null,
            next_id: 1,
            timeout,
        };
        let deadline = Instant::now() + timeout;
        let greeting = c.read_value(deadline, "the QMP greeting")?;
        if greeting.get("QMP").is_none() {
            return Err(c.protocol(format!("expected the QMP greeting, got {greeting}")));
        }
        c.greeting = greeting;
        c.execute("qmp_capabilities", Value::Null)?;
        Ok(c)
    }

    /// The greeting the server sent (`{"QMP": {"version": …, "capabilities": …}}`).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// The time each [`QmpClient::execute`] may take.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
        let _ = self.conn.set_write_timeout(timeout);
    }

    /// Runs a command; `args` is an object or `Value::Null` (no arguments). A QMP error comes
    /// back as [`QmpClientError::Qmp`].
    pub fn execute(&mut self, command: &str, args: Value) -> Result<Value, QmpClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = Map::new();
        req.insert("execute".into(), Value::from(command));
        match args {
            Value::Null => {}
            Value::Object(m) => {
                req.insert("arguments".into(), Value::Object(m));
            }
            _ => {
                return Err(QmpClientError::BadArguments {
                    command: command.into(),
                });
            }
        }
        req.insert("id".into(), json!(id));
        self.send_raw(&to_line(&Value::Object(req)))?;
        let deadline = Instant::now() + self.timeout;
        let what = format!("the answer to '{command}'");
        loop {
            let v = self.read_value(deadline, &what)?;
            if self.queue_if_event(&v) {
                continue;
            }
            let matches = match v.get("id") {
                Some(got) => got == &json!(id),
                // A response without id can only be the server failing to parse our request.
                None => v.get("error").is_some(),
            };
            if !matches {
                tracing::debug!(response = %v, "QMP client: ignoring a response to another id");
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                let class = e
                    .get("class")
                    .and_then(Value::as_str)
                    .map(ErrorClass::from_name)
                    .unwrap_or(ErrorClass::GenericError);
                let desc = e
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                return Err(QmpClientError::Qmp {
                    command: command.into(),
                    error: QmpError { class, desc },
                });
            }
            return Err(self.protocol(format!("response has neither return nor error: {v}")));
        }
    }

    /// Writes raw bytes to the server (for tests of malformed input).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), QmpClientError> {
        self.conn
            .write_all(bytes)
            .map_err(|source| QmpClientError::Io {
                target: self.target.clone(),
                source,
            })
    }

    /// Reads the next message of any kind (events are NOT queued), for tests of raw exchanges.
    pub fn read_raw(&mut self, timeout: Duration) -> Result<Value, QmpClientError> {
        self.read_value(Instant::now() + timeout, "a message")
    }

    /// The next event (queued or arriving within `timeout`); `None` on timeout or when the
    /// connection is gone.
    pub fn next_event(&mut self, timeout: Duration) -> Option<Event> {
        self.try_next_event(timeout).ok().flatten()
    }

    /// Like [`QmpClient::next_event`], but connection errors are reported.
    pub fn try_next_event(&mut self, timeout: Duration) -> Result<Option<Event>, QmpClientError> {
        if let Some(e) = self.events.pop_front() {
            return Ok(Some(e));
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.read_value(deadline, "an event") {
                Ok(v) => {
                    if self.queue_if_event(&v) {
                        return Ok(self.events.pop_front());
                    }
                    tracing::debug!(message = %v, "QMP client: unexpected message while idle");
                }
                Err(QmpClientError::Timeout { .. }) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits for the event `name`; events of other names stay queued, in order.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Event, QmpClientError> {
        if let Some(pos) = self.events.iter().position(|e| e.name == name)
            && let Some(e) = self.events.remove(pos)
        {
            return Ok(e);
        }
        let deadline = Instant::now() + timeout;
        let what = format!("event {name}");
        loop {
            let v = self.read_value(deadline, &what)?;
            if let Some(ev) = parse_event(&v) {
                if ev.name == name {
                    return Ok(ev);
                }
                self.events.push_back(ev);
            } else {
                tracing::debug!(message = %v, "QMP client: unexpected message while waiting");
            }
        }
    }

    /// Events received and not consumed yet.
    pub fn queued_events(&self) -> impl Iterator<Item = &Event> {
        self.events.iter()
    }

    fn queue_if_event(&mut self, v: &Value) -> bool {
        match parse_event(v) {
            Some(e) => {
                self.events.push_back(e);
                true
            }
            None => false,
        }
    }

    fn protocol(&self, msg: String) -> QmpClientError {
        QmpClientError::Protocol {
            target: self.target.clone(),
            msg,
        }
    }

    fn read_value(&mut self, deadline: Instant, what: &str) -> Result<Value, QmpClientError> {
        let mut buf = [0u8; 16 * 1024];
        loop {
            if let Some(item) = self.incoming.pop_front() {
                return match item {
                    Incoming::Value(v) => Ok(v),
                    Incoming::ParseError(m) => Err(self.protocol(format!("bad JSON: {m}"))),
                    Incoming::TooLong { limit } => {
                        Err(self.protocol(format!("message longer than {limit} bytes")))
                    }
                };
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(QmpClientError::Timeout {
                    target: self.target.clone(),
                    what: what.into(),
                    timeout: self.timeout,
                });
            }
            let io_err = |source| QmpClientError::Io {
                target: self.target.clone(),
                source,
            };
            self.conn.set_read_timeout(deadline - now).map_err(io_err)?;
            match self.conn.read(&mut buf) {
                Ok(0) => {
                    return Err(QmpClientError::Closed {
                        target: self.target.clone(),
                    });
                }
                Ok(n) => {
                    let mut out = Vec::new();
                    self.splitter.push(&buf[..n], &mut out);
                    self.incoming.extend(out);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    return Err(QmpClientError::Io {
                        target: self.target.clone(),
                        source: e,
                    });
                }
            }
        }
    }
}

fn parse_event(v: &Value) -> Option<Event> {
    let name = v.get("event")?.as_str()?.to_string();
    let ts = v.get("timestamp");
    let field = |k: &str| {
        ts.and_then(|t| t.get(k))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    Some(Event {
        name,
        data: v.get("data").cloned().unwrap_or(Value::Null),
        seconds: field("seconds"),
        microseconds: field("microseconds"),
    })
}

#[cfg(test)]
mod tests {
    use super::super::{Registry, serve_unix};
    use super::*;

    fn server(dir: &Path) -> (super::super::QmpServer, std::path::PathBuf) {
        let mut r = Registry::new().with_package("colo test");
        let ev = r.events();
        r.add("ping", move |a| {
            let n = super::super::args::optional_u64(a, "n")?.unwrap_or(0);
            ev.emit("PINGED", json!({ "n": n }));
            Ok(json!({ "pong": n }))
        });
        let path = dir.join("qmp.sock");
        (serve_unix(&path, r).unwrap(), path)
    }

    #[test]
    fn client_and_server_talk() {
        let dir = tempfile::tempdir().unwrap();
        let (srv, path) = server(dir.path());
        let t = Duration::from_secs(5);
        let mut c = QmpClient::connect_unix(&path, t).unwrap();
        let mut c2 = QmpClient::connect_unix(&path, t).unwrap();
        assert_eq!(c.greeting()["QMP"]["version"]["package"], "colo test");
        assert_eq!(
            c.execute("ping", json!({"n": 3})).unwrap(),
            json!({"pong": 3})
        );
        // The event reached both clients; the first one queued it while waiting for its answer.
        let e = c.next_event(t).unwrap();
        assert_eq!((e.name.as_str(), &e.data), ("PINGED", &json!({"n": 3})));
        assert!(e.seconds > 0);
        assert_eq!(c2.wait_event("PINGED", t).unwrap().data, json!({"n": 3}));
        srv.events().emit("A", Value::Null);
        srv.events().emit("B", json!({}));
        assert_eq!(c2.wait_event("B", t).unwrap().name, "B");
        assert_eq!(c2.next_event(t).unwrap().name, "A");
        assert!(c2.next_event(Duration::from_millis(50)).is_none());

        let err = c.execute("ping", json!({"n": "x"})).unwrap_err();
        let q = err.qmp_error().unwrap();
        assert_eq!(q.class, ErrorClass::GenericError);
        assert_eq!(q.desc, "Invalid parameter type for 'n', expected: integer");
        let err = c.execute("nope", Value::Null).unwrap_err();
        assert_eq!(err.qmp_error().unwrap().class, ErrorClass::CommandNotFound);
        assert!(matches!(
            c.execute("ping", json!([1])),
            Err(QmpClientError::BadArguments { .. })
        ));
        // Still usable after errors.
        assert_eq!(c.execute("ping", Value::Null).unwrap(), json!({"pong": 0}));
    }

    #[test]
    fn shutdown_removes_socket_and_closes_clients() {
        let dir = tempfile::tempdir().unwrap();
        let (mut srv, path) = server(dir.path());
        let mut c = QmpClient::connect_unix(&path, Duration::from_secs(5)).unwrap();
        srv.shutdown();
        assert!(!path.exists());
        assert!(c.execute("ping", Value::Null).is_err());
        // A stale socket file is replaced; a regular file is refused.
        let (srv2, _) = server(dir.path());
        drop(srv2);
        std::fs::write(&path, b"x").unwrap();
        assert!(matches!(
            serve_unix(&path, Registry::new()),
            Err(super::super::QmpServerError::InUse { .. })
        ));
    }

    #[test]
    fn live_socket_is_not_stolen() {
        let dir = tempfile::tempdir().unwrap();
        let (_srv, path) = server(dir.path());
        assert!(matches!(
            serve_unix(&path, Registry::new()),
            Err(super::super::QmpServerError::InUse { .. })
        ));
    }

    #[test]
    fn timeout_when_server_is_silent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("silent.sock");
        let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let t0 = Instant::now();
        let err = QmpClient::connect_unix(&path, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, QmpClientError::Timeout { .. }), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(3));
    }
}
