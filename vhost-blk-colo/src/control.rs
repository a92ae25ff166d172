//! The process's block graph and its control commands (QMP).
//!
//! Commands with QEMU's names and arguments: `nbd-server-start`, `nbd-server-add`,
//! `nbd-server-remove`, `nbd-server-stop`, `blockdev-add`, `human-monitor-command` (only
//! `drive_add -n <id> <options>`), `x-blockdev-change`, `query-block`, `quit`.
//!
//! The checkpoint engine's commands (ours; QEMU does these inside its migration code):
//! - `colo-blk-start`: every replication node enters stage `running` (secondary: first
//!   checkpoint, copy-before-write armed).
//! - `colo-blk-checkpoint`: secondary: empty active and hidden disks (the base then equals the
//!   primary's disk); primary: no-op. Returns `{"checkpoints": n, "us": t}`.
//! - `colo-blk-failover`: secondary: fold active and hidden into the base while the guest runs
//!   (progress in `colo-blk-status`, `BLOCK_JOB_COMPLETED` at the end); primary: stop
//!   replicating and drop the replication child from its quorum (run unprotected).
//! - `colo-blk-stop`: stop without failover (secondary: one more checkpoint).
//! - `colo-blk-sync {device, node, granularity?}`: initial disk sync of a new secondary whose
//!   base differs (QEMU needs `drive-mirror` for this): copies the quorum's local disk to the
//!   secondary through replication node `node` while the guest runs; guest writes meanwhile are
//!   forwarded and their chunks copied again. Start the secondary's `colo-blk-start` after the
//!   `BLOCK_JOB_COMPLETED` event (type `mirror`).
//! - `colo-blk-status`: stages, overlay sizes, failover progress, NBD server address, counters.
//!
//! Events: `QUORUM_REPORT_BAD`, `QUORUM_FAILURE`, `COLO_BLK_SECONDARY_LOST`,
//! `BLOCK_JOB_COMPLETED`, `BLOCK_JOB_ERROR`.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, ToSocketAddrs},
    path::Path,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use colo_proto::qmp::{QmpError, Registry};
use serde_json::{Map, Value, json};

use crate::{
    block::{
        EventSink, NodeRef,
        file::FileNode,
        nbd::NbdNode,
        overlay::DEFAULT_CLUSTER,
        qcow2::Qcow2Node,
        quorum::{QuorumNode, ReadPattern},
        replication::{LayerSpec, ReplicationPrimary, ReplicationSecondary},
    },
    drive::{Opts, flag, flatten_json, parse_opts, sub},
    nbd::{Export, ExportTable, NbdServer},
};

/// Errors of control commands.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Bad option or argument.
    #[error("{0}")]
    Invalid(String),
    /// A named node does not exist.
    #[error("no block node named {0:?}")]
    NotFound(String),
    /// Block layer failure.
    #[error(transparent)]
    Block(#[from] crate::block::BlockError),
    /// NBD server failure.
    #[error(transparent)]
    Nbd(#[from] crate::nbd::NbdServerError),
    /// Runtime setup.
    #[error("starting the I/O runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

impl From<ControlError> for QmpError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::NotFound(_) => QmpError::device_not_found(e.to_string()),
            _ => QmpError::generic(e.to_string()),
        }
    }
}

fn inval(s: impl Into<String>) -> ControlError {
    ControlError::Invalid(s.into())
}

#[derive(Default)]
struct State {
    nodes: BTreeMap<String, NodeRef>,
    drivers: BTreeMap<String, String>,
    quorums: BTreeMap<String, Arc<QuorumNode>>,
    primaries: BTreeMap<String, Arc<ReplicationPrimary>>,
    secondaries: BTreeMap<String, Arc<ReplicationSecondary>>,
    guest_drive: Option<String>,
    nbd: Option<NbdServer>,
}

/// The block graph of one process plus its NBD server.
pub struct BlkControl {
    rt: tokio::runtime::Runtime,
    state: Mutex<State>,
    exports: ExportTable,
    events: EventSink,
    nbd_timeout: Duration,
}

impl std::fmt::Debug for BlkControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BlkControl")
    }
}

impl BlkControl {
    /// A control with no nodes; `events` receives block events.
    pub fn new(events: EventSink, nbd_timeout: Duration) -> Result<Self, ControlError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("blk-io")
            .enable_all()
            .build()
            .map_err(ControlError::Runtime)?;
        Ok(BlkControl {
            rt,
            state: Mutex::new(State::default()),
            exports: Arc::new(RwLock::new(BTreeMap::new())),
            events,
            nbd_timeout,
        })
    }

    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a drive from a `-drive`-style option string; returns its id.
    pub fn add_drive_str(&self, s: &str) -> Result<String, ControlError> {
        let o = parse_opts(s).map_err(|e| inval(format!("--drive {s:?}: {e}")))?;
        self.add_drive(&o)
    }

    /// Adds a drive from parsed options; returns its id.
    pub fn add_drive(&self, o: &Opts) -> Result<String, ControlError> {
        let id = o
            .get("id")
            .or_else(|| o.get("node-name"))
            .cloned()
            .ok_or_else(|| inval("a drive needs id= or node-name="))?;
        let mut st = self.st();
        if st.nodes.contains_key(&id) {
            return Err(inval(format!("a node named {id:?} already exists")));
        }
        let node = self.build(&mut st, o, &id)?;
        st.drivers.insert(id.clone(), node.driver().to_owned());
        st.nodes.insert(id.clone(), node);
        if o.get("if").map(String::as_str) != Some("none") && !o.contains_key("node-name") {
            st.guest_drive = Some(id.clone());
        }
        tracing::info!(%id, "drive added");
        Ok(id)
    }

    /// The drive the guest device serves.
    pub fn guest_node(&self) -> Option<NodeRef> {
        let st = self.st();
        st.guest_drive
            .as_ref()
            .and_then(|d| st.nodes.get(d).cloned())
    }

    /// Looks up a node by name.
    pub fn node(&self, name: &str) -> Option<NodeRef> {
        self.st().nodes.get(name).cloned()
    }

    fn build(&self, st: &mut State, o: &Opts, name: &str) -> Result<NodeRef, ControlError> {
        let driver = o.get("driver").map(String::as_str).unwrap_or("raw");
        let read_only = flag(o, "read-only").map_err(inval)?;
        match driver {
            "raw" | "file" | "host_device" => {
                if let Some(r) = o.get("file") {
                    return st
                        .nodes
                        .get(r)
                        .cloned()
                        .ok_or_else(|| ControlError::NotFound(r.clone()));
                }
                let fo = sub(o, "file");
                let filename = fo
                    .get("filename")
                    .or_else(|| o.get("filename"))
                    .ok_or_else(|| {
                        inval(format!("{name}: driver {driver} needs file.filename="))
                    })?;
                let direct = flag(o, "cache.direct").map_err(inval)?
                    || flag(&fo, "cache.direct").map_err(inval)?;
                Ok(Arc::new(FileNode::open(
                    Path::new(filename),
                    read_only,
                    direct,
                )?))
            }
            "nbd" => {
                let host = o
                    .get("host")
                    .or_else(|| o.get("server.host"))
                    .ok_or_else(|| inval(format!("{name}: nbd needs host=")))?;
                let port: u16 = o
                    .get("port")
                    .or_else(|| o.get("server.port"))
                    .map(|p| p.parse())
                    .transpose()
                    .map_err(|_| inval(format!("{name}: bad nbd port")))?
                    .unwrap_or(10809);
                let export = o.get("export").map(String::as_str).unwrap_or("");
                Ok(Arc::new(NbdNode::connect(
                    self.rt.handle(),
                    host,
                    port,
                    export,
                    self.nbd_timeout,
                )?))
            }
            "quorum" => {
                let mut children = Vec::new();
                for i in 0.. {
                    let key = format!("children.{i}");
                    let co = sub(o, &key);
                    let node = if let Some(r) = o.get(&key) {
                        (
                            r.clone(),
                            st.nodes
                                .get(r)
                                .cloned()
                                .ok_or_else(|| ControlError::NotFound(r.clone()))?,
                        )
                    } else if co.is_empty() {
                        break;
                    } else {
                        let cname = co
                            .get("node-name")
                            .cloned()
                            .unwrap_or_else(|| format!("{name}.{key}"));
                        let n = self.build(st, &co, &cname)?;
                        st.nodes.insert(cname.clone(), n.clone());
                        (cname, n)
                    };
                    children.push(node);
                }
                let threshold: usize = o
                    .get("vote-threshold")
                    .map(|v| v.parse())
                    .transpose()
                    .map_err(|_| inval(format!("{name}: bad vote-threshold")))?
                    .ok_or_else(|| inval(format!("{name}: quorum needs vote-threshold=")))?;
                let pattern: ReadPattern = o
                    .get("read-pattern")
                    .map(String::as_str)
                    .unwrap_or("quorum")
                    .parse()?;
                let q = Arc::new(QuorumNode::new(
                    name,
                    children,
                    threshold,
                    pattern,
                    self.events.clone(),
                )?);
                st.quorums.insert(name.to_owned(), q.clone());
                Ok(q)
            }
            "replication" => match o.get("mode").map(String::as_str) {
                Some("primary") => {
                    let fo = sub(o, "file");
                    let child = self.build(st, &fo, &format!("{name}.file"))?;
                    let node_name = o
                        .get("node-name")
                        .cloned()
                        .unwrap_or_else(|| name.to_owned());
                    let p = Arc::new(ReplicationPrimary::new(
                        &node_name,
                        child,
                        self.events.clone(),
                    ));
                    st.primaries.insert(node_name, p.clone());
                    Ok(p)
                }
                Some("secondary") => {
                    let cluster: u64 = o
                        .get("file.cluster-size")
                        .map(|v| v.parse())
                        .transpose()
                        .map_err(|_| inval(format!("{name}: bad file.cluster-size")))?
                        .unwrap_or(DEFAULT_CLUSTER);
                    let (active, hidden) = LayerSpec::secondary_pair(o, name, cluster)?;
                    let base_id = o.get("file.backing.backing").ok_or_else(|| {
                        inval(format!(
                            "{name}: secondary needs file.backing.backing=<base drive id>"
                        ))
                    })?;
                    let base = st
                        .nodes
                        .get(base_id)
                        .cloned()
                        .ok_or_else(|| ControlError::NotFound(base_id.clone()))?;
                    let r = Arc::new(ReplicationSecondary::with_layers(
                        name,
                        base,
                        &active,
                        &hidden,
                        self.events.clone(),
                    )?);
                    // The base drive, as the NBD server will export it, now copies before writes.
                    st.nodes.insert(base_id.clone(), r.export_node());
                    st.secondaries.insert(name.to_owned(), r.clone());
                    Ok(r)
                }
                other => Err(inval(format!(
                    "{name}: replication needs mode=primary|secondary, got {other:?}"
                ))),
            },
            "qcow2" => {
                // A qcow2 image over an optional named backing node (`backing=<id>`); the
                // header's own backing file is not used.
                let fo = sub(o, "file");
                let filename = fo
                    .get("filename")
                    .or_else(|| o.get("filename"))
                    .ok_or_else(|| inval(format!("{name}: driver qcow2 needs file.filename=")))?;
                let lower = match o.get("backing") {
                    Some(b) => Some(
                        st.nodes
                            .get(b)
                            .cloned()
                            .ok_or_else(|| ControlError::NotFound(b.clone()))?,
                    ),
                    None => None,
                };
                Ok(Arc::new(
                    Qcow2Node::open(Path::new(filename), lower, read_only)
                        .map_err(|e| inval(format!("{name}: {filename}: {e}")))?,
                ))
            }
            other => Err(inval(format!("{name}: unknown driver {other:?}"))),
        }
    }

    /// `nbd-server-start`.
    pub fn nbd_server_start(&self, addr: SocketAddr) -> Result<SocketAddr, ControlError> {
        let mut st = self.st();
        if st.nbd.is_some() {
            return Err(inval("NBD server already running"));
        }
        let srv = NbdServer::start(self.rt.handle(), addr, self.exports.clone())?;
        let a = srv.local_addr();
        st.nbd = Some(srv);
        Ok(a)
    }

    /// `nbd-server-add`.
    pub fn nbd_server_add(
        &self,
        device: &str,
        name: Option<&str>,
        writable: bool,
    ) -> Result<(), ControlError> {
        let st = self.st();
        if st.nbd.is_none() {
            return Err(inval("NBD server not running"));
        }
        let node = st
            .nodes
            .get(device)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(device.to_owned()))?;
        let name = name.unwrap_or(device).to_owned();
        let mut t = self
            .exports
            .write()
            .map_err(|_| inval("export table poisoned"))?;
        if t.contains_key(&name) {
            return Err(inval(format!("NBD export {name:?} already exists")));
        }
        t.insert(
            name,
            Export {
                node,
                writable,
                description: device.to_owned(),
            },
        );
        Ok(())
    }

    /// `nbd-server-remove`.
    pub fn nbd_server_remove(&self, name: &str) -> Result<(), ControlError> {
        let mut t = self
            .exports
            .write()
            .map_err(|_| inval("export table poisoned"))?;
        t.remove(name)
            .map(drop)
            .ok_or_else(|| inval(format!("export {name:?} not found")))
    }

    /// `nbd-server-stop`.
    pub fn nbd_server_stop(&self) -> Result<(), ControlError> {
        let srv = self
            .st()
            .nbd
            .take()
            .ok_or_else(|| inval("NBD server not running"))?;
        srv.stop();
        if let Ok(mut t) = self.exports.write() {
            t.clear();
        }
        Ok(())
    }

    /// `x-blockdev-change`: add `node` to quorum `parent`, or remove `child` from it.
    pub fn blockdev_change(
        &self,
        parent: &str,
        child: Option<&str>,
        node: Option<&str>,
    ) -> Result<Value, ControlError> {
        let st = self.st();
        let q = st
            .quorums
            .get(parent)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(parent.to_owned()))?;
        match (child, node) {
            (None, Some(n)) => {
                let nr = st
                    .nodes
                    .get(n)
                    .cloned()
                    .ok_or_else(|| ControlError::NotFound(n.to_owned()))?;
                q.add_child(n, nr)?;
                Ok(json!({}))
            }
            (Some(c), None) => {
                q.remove_child(c)?;
                Ok(json!({}))
            }
            _ => Err(inval(
                "x-blockdev-change needs exactly one of child= and node=",
            )),
        }
    }

    /// `query-block`.
    pub fn query_block(&self) -> Value {
        let st = self.st();
        let mut out = Vec::new();
        for (name, node) in &st.nodes {
            let mut inserted = json!({
                "node-name": name,
                "drv": node.driver(),
                "ro": node.read_only(),
                "image": {"virtual-size": node.size()},
            });
            if let Some(q) = st.quorums.get(name) {
                inserted["children"] = q
                    .children()
                    .iter()
                    .map(|c| json!({"child": c.name, "node-name": c.node_name, "drv": c.node.driver()}))
                    .collect();
                inserted["vote-threshold"] = json!(q.threshold());
            }
            out.push(json!({"device": name, "guest": st.guest_drive.as_deref() == Some(name), "inserted": inserted}));
        }
        Value::Array(out)
    }

    /// `colo-blk-start`.
    pub fn colo_start(&self) -> Result<Value, ControlError> {
        let st = self.st();
        if st.primaries.is_empty() && st.secondaries.is_empty() {
            return Err(inval("no replication node configured"));
        }
        for p in st.primaries.values() {
            p.start()?;
        }
        for s in st.secondaries.values() {
            s.start()?;
        }
        Ok(json!({}))
    }

    /// `colo-blk-checkpoint`.
    pub fn colo_checkpoint(&self) -> Result<Value, ControlError> {
        let st = self.st();
        let t0 = std::time::Instant::now();
        for s in st.secondaries.values() {
            s.checkpoint()?;
        }
        Ok(json!({"us": t0.elapsed().as_micros() as u64, "secondaries": st.secondaries.len()}))
    }

    /// `colo-blk-failover`.
    pub fn colo_failover(&self) -> Result<Value, ControlError> {
        let st = self.st();
        for s in st.secondaries.values() {
            s.failover()?;
        }
        for (name, p) in &st.primaries {
            p.stop();
            for q in st.quorums.values() {
                if let Some(c) = q.children().iter().find(|c| &c.node_name == name) {
                    let _ = q.remove_child(&c.name);
                }
            }
        }
        Ok(json!({}))
    }

    /// `colo-blk-stop`.
    pub fn colo_stop(&self) -> Result<Value, ControlError> {
        let st = self.st();
        for s in st.secondaries.values() {
            s.stop()?;
        }
        for p in st.primaries.values() {
            p.stop();
        }
        Ok(json!({}))
    }

    /// `colo-blk-sync`: initial disk sync from the quorum's first child (the local disk) to the
    /// secondary through replication node `node`, on a thread; `BLOCK_JOB_COMPLETED` (type
    /// `mirror`) or `BLOCK_JOB_ERROR` at the end, progress in `colo-blk-status`.
    pub fn colo_sync(&self, device: &str, node: &str, chunk: u64) -> Result<Value, ControlError> {
        let st = self.st();
        let q = st
            .quorums
            .get(device)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(device.to_owned()))?;
        let p = st
            .primaries
            .get(node)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(node.to_owned()))?;
        let source = q
            .children()
            .into_iter()
            .find(|c| c.node_name != node)
            .map(|c| c.node)
            .ok_or_else(|| inval(format!("{device} has no local child to copy from")))?;
        let events = self.events.clone();
        let (dev, nd) = (device.to_owned(), node.to_owned());
        std::thread::Builder::new()
            .name("colo-blk-sync".into())
            .spawn(move || match p.sync_from(&source, chunk) {
                Ok(()) => events(
                    "BLOCK_JOB_COMPLETED",
                    json!({"type": "mirror", "device": dev, "target": nd,
                                 "len": source.size(), "offset": source.size(), "speed": 0}),
                ),
                Err(e) => events(
                    "BLOCK_JOB_ERROR",
                    json!({"device": dev, "operation": "write", "action": "stop",
                                 "error": e.to_string()}),
                ),
            })
            .map_err(|e| inval(format!("spawning the sync thread: {e}")))?;
        Ok(json!({}))
    }

    /// `colo-blk-status`.
    pub fn colo_status(&self) -> Value {
        let st = self.st();
        let mut nodes: Vec<Value> = st.primaries.values().map(|p| p.status()).collect();
        nodes.extend(st.secondaries.values().map(|s| s.status()));
        let exports: Vec<String> = self
            .exports
            .read()
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default();
        json!({
            "replication": nodes,
            "nbd-server": st.nbd.as_ref().map(|s| json!({"addr": s.local_addr().to_string(), "exports": exports})),
        })
    }

    /// Registers every command on a QMP registry.
    pub fn register(self: &Arc<Self>, reg: &mut Registry) {
        let c = self.clone();
        reg.add("nbd-server-start", move |a| {
            let addr = a
                .get("addr")
                .and_then(Value::as_object)
                .ok_or_else(|| QmpError::generic("Parameter 'addr' is missing"))?;
            let data = addr.get("data").and_then(Value::as_object).unwrap_or(addr);
            if let Some(t) = addr.get("type").and_then(Value::as_str)
                && t != "inet"
            {
                return Err(QmpError::generic(format!(
                    "addr type {t:?} is not supported (inet only)"
                )));
            }
            let host = data
                .get("host")
                .and_then(Value::as_str)
                .unwrap_or("0.0.0.0");
            let port = match data.get("port") {
                Some(Value::String(s)) => s
                    .parse::<u16>()
                    .map_err(|_| QmpError::generic(format!("bad port {s:?}")))?,
                Some(Value::Number(n)) => n
                    .as_u64()
                    .and_then(|p| u16::try_from(p).ok())
                    .ok_or_else(|| QmpError::generic("bad port"))?,
                _ => return Err(QmpError::generic("Parameter 'port' is missing")),
            };
            let sa = (host, port)
                .to_socket_addrs()
                .map_err(|e| QmpError::generic(format!("address {host}:{port}: {e}")))?
                .next()
                .ok_or_else(|| {
                    QmpError::generic(format!("address {host}:{port} did not resolve"))
                })?;
            let bound = c.nbd_server_start(sa)?;
            tracing::info!(%bound, "nbd-server-start");
            Ok(json!({}))
        });
        let c = self.clone();
        reg.add("nbd-server-add", move |a| {
            let device = a
                .get("device")
                .and_then(Value::as_str)
                .ok_or_else(|| QmpError::generic("Parameter 'device' is missing"))?;
            let name = a.get("name").and_then(Value::as_str);
            let writable = a.get("writable").and_then(Value::as_bool).unwrap_or(false);
            c.nbd_server_add(device, name, writable)?;
            Ok(json!({}))
        });
        let c = self.clone();
        reg.add("nbd-server-remove", move |a| {
            let name = a
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| QmpError::generic("Parameter 'name' is missing"))?;
            c.nbd_server_remove(name)?;
            Ok(json!({}))
        });
        let c = self.clone();
        reg.add("nbd-server-stop", move |_| {
            c.nbd_server_stop()?;
            Ok(json!({}))
        });
        let c = self.clone();
        reg.add("blockdev-add", move |a: &Map<String, Value>| {
            let o = flatten_json(a);
            c.add_drive(&o)?;
            Ok(json!({}))
        });
        let c = self.clone();
        reg.add("human-monitor-command", move |a| {
            let line = a
                .get("command-line")
                .and_then(Value::as_str)
                .ok_or_else(|| QmpError::generic("Parameter 'command-line' is missing"))?;
            let mut words = line.split_whitespace();
            match words.next() {
                Some("drive_add") => {
                    let rest: Vec<&str> = words.collect();
                    // drive_add [-n] <bus/id> <options>
                    let opts = rest
                        .last()
                        .ok_or_else(|| QmpError::generic("drive_add: options missing"))?;
                    let mut o = parse_opts(opts)
                        .map_err(|e| QmpError::generic(format!("drive_add: {e}")))?;
                    if !o.contains_key("node-name") && !o.contains_key("id") {
                        return Err(QmpError::generic("drive_add: node-name= or id= required"));
                    }
                    o.entry("if".into()).or_insert_with(|| "none".into());
                    c.add_drive(&o)?;
                    Ok(json!("OK\r\n"))
                }
                Some(cmd) => Ok(json!(format!("unknown command: '{cmd}'\r\n"))),
                None => Ok(json!("")),
            }
        });
        let c = self.clone();
        reg.add("x-blockdev-change", move |a| {
            let parent = a
                .get("parent")
                .and_then(Value::as_str)
                .ok_or_else(|| QmpError::generic("Parameter 'parent' is missing"))?;
            Ok(c.blockdev_change(
                parent,
                a.get("child").and_then(Value::as_str),
                a.get("node").and_then(Value::as_str),
            )?)
        });
        let c = self.clone();
        reg.add("query-block", move |_| Ok(c.query_block()));
        let c = self.clone();
        reg.add("colo-blk-start", move |_| Ok(c.colo_start()?));
        let c = self.clone();
        reg.add("colo-blk-checkpoint", move |_| Ok(c.colo_checkpoint()?));
        let c = self.clone();
        reg.add("colo-blk-failover", move |_| Ok(c.colo_failover()?));
        let c = self.clone();
        reg.add("colo-blk-stop", move |_| Ok(c.colo_stop()?));
        let c = self.clone();
        reg.add("colo-blk-sync", move |a| {
            let device = a
                .get("device")
                .and_then(Value::as_str)
                .ok_or_else(|| QmpError::generic("Parameter 'device' is missing"))?;
            let node = a
                .get("node")
                .and_then(Value::as_str)
                .ok_or_else(|| QmpError::generic("Parameter 'node' is missing"))?;
            let chunk = a
                .get("granularity")
                .and_then(Value::as_u64)
                .unwrap_or(1 << 20);
            if chunk == 0 || chunk > 32 << 20 {
                return Err(QmpError::generic(
                    "granularity must be between 1 and 32 MiB",
                ));
            }
            Ok(c.colo_sync(device, node, chunk)?)
        });
        let c = self.clone();
        reg.add("colo-blk-status", move |_| Ok(c.colo_status()));
    }
}
