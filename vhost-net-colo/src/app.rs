//! The process: one netdev, its filter chain, the chardevs, the vhost-user device and the QMP
//! control socket, assembled from QEMU-like options.
//!
//! QMP commands (besides the built-ins):
//! - `object-add` (QEMU's flat shape: `{"qom-type":"filter-mirror","id":"m0","netdev":"hn0",
//!   "queue":"tx","outdev":"mirror0"}`), `object-del {"id"}`: filters at run time;
//! - `qom-set {"path":"m0","property":"status","value":"off"}` and `qom-get` of `status`;
//! - `query-filters`: the chain in list order with per-filter counters and state (our name);
//! - `query-net`: netdev and device counters (our name);
//! - `chardev-add {"id","spec"}` (spec in `-chardev` spelling; our shape), `chardev-remove {"id"}`;
//! - `colo-net-checkpoint`: the COLO checkpoint event: every filter's checkpoint hook runs (the
//!   rewriter's offsets become 0). Called by the checkpoint engine on the secondary after each
//!   checkpoint is loaded;
//! - `announce-self {"initial","max","rounds","step"}` (QEMU's command and defaults: 50, 550,
//!   5, 100 ms; `interfaces`/`id` accepted, see [`crate::announce`]): RARP broadcasts of the
//!   guest MAC straight out of the netdev, after the filter chain;
//! - `set_link {"name": NETDEV-ID, "up": bool}` (QEMU's command): link status in config space;
//!   the frontend gets `CONFIG_CHANGE_MSG` when it set up a backend-request channel; while down,
//!   frames are dropped both ways;
//! - `colo-net-failover`: the COLO failover event: filters without a failover behaviour are
//!   switched off (redirectors stop intercepting), the rewriter stays on and keeps translating
//!   the connections it tracks.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use colo_proto::qmp::{QmpError, Registry, args};
use serde_json::{Map, Value, json};

use crate::backend::DevCounters;
use crate::chardevs::{Chardevs, Indev, spawn_indev};
use crate::filter::{self, ObjectSpec, parse_bool};
use crate::netdev;
use crate::path::{GuestRx, NetPath};

/// Frames queued for the guest before it takes them (beyond: dropped and counted).
pub const GUEST_QUEUE_CAP: usize = 4096;

/// Errors while assembling the process.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("--netdev: {0}")]
    Netdev(#[from] netdev::NetdevError),
    #[error("--chardev {spec}: {source}")]
    Chardev {
        spec: String,
        #[source]
        source: colo_proto::chardev::ChardevError,
    },
    #[error("--object {spec}: {msg}")]
    Object { spec: String, msg: String },
    #[error("--mac {0}: expected six hex bytes like 52:54:00:12:34:56")]
    Mac(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub fn parse_mac(s: &str) -> Result<[u8; 6], AppError> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(AppError::Mac(s.into()));
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).map_err(|_| AppError::Mac(s.into()))?;
    }
    Ok(mac)
}

/// The assembled process state shared by the vhost-user device and the QMP handlers.
pub struct App {
    pub path: Arc<NetPath>,
    pub chardevs: Arc<Chardevs>,
    pub counters: Arc<DevCounters>,
    indevs: Mutex<BTreeMap<String, Indev>>,
}

impl App {
    /// Opens the netdev (`-netdev` spelling) and the chardevs; filters come with [`App::add_object`].
    pub fn new(netdev_spec: &str, chardevs: &[String]) -> Result<Arc<Self>, AppError> {
        let mut ndspec = ObjectSpec::parse_cli(netdev_spec).map_err(netdev::NetdevError::from)?;
        let pairs = netdev::take_queues(&mut ndspec)?;
        let guest = Arc::new(GuestRx::new(GUEST_QUEUE_CAP)?);
        let path = Arc::new(NetPath::new(&ndspec.id, guest));
        path.set_pairs(pairs);
        let cd = Arc::new(Chardevs::default());
        for c in chardevs {
            cd.add(c).map_err(|source| AppError::Chardev {
                spec: c.clone(),
                source,
            })?;
        }
        let nd = netdev::open_for_path(netdev_spec, path.clone())?;
        path.set_netdev(nd);
        Ok(Arc::new(Self {
            path,
            chardevs: cd,
            counters: Arc::default(),
            indevs: Mutex::new(BTreeMap::new()),
        }))
    }

    /// `-object` / `object-add` of a filter.
    pub fn add_object(&self, mut spec: ObjectSpec) -> Result<(), String> {
        // As in QEMU, a filter with vnet_hdr_support sends the netdev's header length: 12 for
        // a tap with vnet headers (the frames in the chain are plain, so the header is zeros).
        let vnet_on = spec
            .props
            .get("vnet_hdr_support")
            .is_some_and(|v| parse_bool("vnet_hdr_support", v).unwrap_or(false));
        if vnet_on
            && !spec.props.contains_key("vnet_hdr_len")
            && self.path.netdev().is_some_and(|n| n.vnet_hdr())
        {
            spec.props
                .insert("vnet_hdr_len".into(), crate::vnet::VNET_HDR_LEN.to_string());
        }
        let built = filter::build(spec, &*self.chardevs).map_err(|e| e.to_string())?;
        if built.netdev != self.path.netdev_id {
            return Err(format!(
                "filter {}: netdev {:?} not found (this process has {:?})",
                built.entry.id, built.netdev, self.path.netdev_id
            ));
        }
        let id = built.entry.id.clone();
        let indev_ep = match &built.indev {
            Some((cid, _)) => Some(
                self.chardevs
                    .get(cid)
                    .ok_or_else(|| format!("filter {id}: indev: no chardev with id {cid:?}"))?,
            ),
            None => None,
        };
        self.path
            .chain()
            .insert(built.entry, &built.position, built.insert)
            .map_err(|e| e.to_string())?;
        if let (Some(ep), Some((_, vnet))) = (indev_ep, built.indev) {
            match spawn_indev(self.path.clone(), &id, ep, vnet) {
                Ok(h) => {
                    self.indevs
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(id, h);
                }
                Err(e) => {
                    let _ = self.path.chain().remove(&id);
                    return Err(format!("filter {id}: indev thread: {e}"));
                }
            }
        }
        Ok(())
    }

    pub fn del_object(&self, id: &str) -> Result<(), String> {
        self.path.chain().remove(id).map_err(|e| e.to_string())?;
        self.indevs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        Ok(())
    }

    fn query_net(&self) -> Value {
        use std::sync::atomic::Ordering::Relaxed;
        let nd = self.path.netdev();
        json!({
            "queue_pairs": self.path.pairs(),
            "netdev": {
                "id": self.path.netdev_id,
                "type": nd.as_ref().map(|n| n.kind()),
                "state": nd.as_ref().map(|n| n.describe()),
            },
            "device": self.counters.json(),
            "queues": self.counters.json_pairs(self.path.pairs()),
            "guest_queue": {
                "queued": self.path.guest.queued.load(Relaxed),
                "dropped_full": self.path.guest.dropped.load(Relaxed),
                "queued_before_frontend": self.path.no_guest.load(Relaxed),
            },
            "netdev_send_errors": self.path.to_netdev_errors.load(Relaxed),
            "link_up": self.path.link_is_up(),
            "link_down_dropped": self.path.link_down_dropped.load(Relaxed),
            "announces_sent": self.path.announced.load(Relaxed),
            "offload": {
                "passthrough": self.path.offload_passthrough.load(Relaxed),
                "software": self.path.offload_software.load(Relaxed),
                "errors": self.path.offload_errors.load(Relaxed),
            },
            "chardevs": self.chardevs.ids(),
        })
    }

    /// The QMP commands of this process.
    pub fn registry(self: &Arc<Self>) -> Registry {
        let mut r =
            Registry::new().with_package(format!("vhost-net-colo {}", env!("CARGO_PKG_VERSION")));
        let app = self.clone();
        r.add("object-add", move |a: &Map<String, Value>| {
            let spec = ObjectSpec::from_qmp(a).map_err(|e| QmpError::generic(e.to_string()))?;
            app.add_object(spec).map_err(QmpError::generic)?;
            Ok(json!({}))
        });
        let app = self.clone();
        r.add("object-del", move |a: &Map<String, Value>| {
            let id = args::required_str(a, "id")?;
            app.del_object(id).map_err(QmpError::device_not_found)?;
            Ok(json!({}))
        });
        let app = self.clone();
        r.add("qom-set", move |a: &Map<String, Value>| {
            let path = args::required_str(a, "path")?;
            let prop = args::required_str(a, "property")?;
            if prop != "status" {
                return Err(QmpError::generic(format!(
                    "Property '{prop}' not found (only status is settable)"
                )));
            }
            let on = match args::required(a, "value")? {
                Value::String(s) => {
                    parse_bool("status", s).map_err(|e| QmpError::generic(e.to_string()))?
                }
                Value::Bool(b) => *b,
                _ => return Err(args::invalid_type("value", "string")),
            };
            let id = path.trim_start_matches("/objects/");
            app.path
                .chain()
                .set_status(id, on)
                .map_err(|e| QmpError::device_not_found(e.to_string()))?;
            Ok(json!({}))
        });
        let app = self.clone();
        r.add("qom-get", move |a: &Map<String, Value>| {
            let path = args::required_str(a, "path")?;
            let prop = args::required_str(a, "property")?;
            let id = path.trim_start_matches("/objects/");
            let chain = app.path.chain();
            let e = chain
                .get(id)
                .ok_or_else(|| QmpError::device_not_found(format!("Device '{id}' not found")))?;
            match prop {
                "status" => Ok(json!(if e.status { "on" } else { "off" })),
                "queue" => Ok(json!(e.queue)),
                _ => Err(QmpError::generic(format!("Property '{prop}' not found"))),
            }
        });
        let app = self.clone();
        r.add("query-filters", move |_a: &Map<String, Value>| {
            Ok(Value::Array(app.path.chain().query()))
        });
        let app = self.clone();
        r.add("query-net", move |_a: &Map<String, Value>| {
            Ok(app.query_net())
        });
        let app = self.clone();
        r.add("chardev-add", move |a: &Map<String, Value>| {
            let id = args::required_str(a, "id")?;
            let spec = args::required_str(a, "spec")?;
            app.chardevs
                .add(&format!("{spec},id={id}"))
                .map_err(|e| QmpError::generic(e.to_string()))?;
            Ok(json!({}))
        });
        let app = self.clone();
        r.add("chardev-remove", move |a: &Map<String, Value>| {
            let id = args::required_str(a, "id")?;
            if app.chardevs.remove(id) {
                Ok(json!({}))
            } else {
                Err(QmpError::device_not_found(format!(
                    "Chardev '{id}' not found"
                )))
            }
        });
        let app = self.clone();
        r.add("colo-net-checkpoint", move |_a: &Map<String, Value>| {
            app.path.chain().checkpoint();
            Ok(json!({}))
        });
        let app = self.clone();
        r.add("announce-self", move |a: &Map<String, Value>| {
            args::reject_unknown(a, &["initial", "max", "rounds", "step", "interfaces", "id"])?;
            let d = crate::announce::AnnounceParams::default();
            let p = crate::announce::AnnounceParams {
                initial: args::optional_u64(a, "initial")?.unwrap_or(d.initial),
                max: args::optional_u64(a, "max")?.unwrap_or(d.max),
                rounds: args::optional_u64(a, "rounds")?.unwrap_or(d.rounds),
                step: args::optional_u64(a, "step")?.unwrap_or(d.step),
            };
            if p.rounds > crate::announce::AnnounceParams::MAX_ROUNDS {
                return Err(args::invalid_value("rounds", "at most 1000"));
            }
            if let Some(list) = args::optional_array(a, "interfaces")? {
                let ours = list.iter().any(|v| v.as_str() == Some(&app.path.netdev_id));
                if !list.is_empty() && !ours {
                    return Ok(json!({}));
                }
            }
            crate::announce::spawn_announce(app.path.clone(), app.path.mac(), p)
                .map_err(|e| QmpError::generic(format!("announce-self: {e}")))?;
            Ok(json!({}))
        });
        let app = self.clone();
        r.add("set_link", move |a: &Map<String, Value>| {
            args::reject_unknown(a, &["name", "up"])?;
            let name = args::required_str(a, "name")?;
            let up = args::required_bool(a, "up")?;
            if name != app.path.netdev_id {
                return Err(QmpError::device_not_found(format!(
                    "Device '{name}' not found"
                )));
            }
            app.path.set_link(up);
            Ok(json!({}))
        });
        let app = self.clone();
        r.add("colo-net-failover", move |_a: &Map<String, Value>| {
            app.path.chain().failover();
            Ok(json!({}))
        });
        r
    }

    /// Serves the vhost-user socket until `stop`.
    pub fn serve(
        &self,
        socket: &str,
        mac: [u8; 6],
        stop: &AtomicBool,
    ) -> Result<(), crate::backend::BackendError> {
        crate::backend::serve(socket, self.path.clone(), mac, self.counters.clone(), stop)
    }
}
