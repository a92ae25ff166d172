//! QEMU-style option lists: `driver=quorum,id=colo-disk0,children.0.file.filename=IMG`.
//!
//! [`parse_opts`] turns such a list into a flat map of dotted keys; [`flatten_json`] does the
//! same for QMP's nested `blockdev-add` arguments, so one builder serves the command line,
//! `blockdev-add` and HMP's `drive_add`.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// A flat option map with dotted keys.
pub type Opts = BTreeMap<String, String>;

/// Errors of option parsing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptsError {
    /// An item without `=`.
    #[error("option {0:?} has no value (expected key=value)")]
    NoValue(String),
    /// A key given twice.
    #[error("option {0:?} given twice")]
    Duplicate(String),
    /// An empty key.
    #[error("empty option name in {0:?}")]
    EmptyKey(String),
}

/// Parses `k=v,k2=v2`; `,,` stands for a literal comma inside a value (as in QEMU).
pub fn parse_opts(s: &str) -> Result<Opts, OptsError> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                items.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    items.push(cur);
    let mut out = Opts::new();
    for it in items.into_iter().filter(|i| !i.is_empty()) {
        let Some((k, v)) = it.split_once('=') else {
            return Err(OptsError::NoValue(it));
        };
        if k.is_empty() {
            return Err(OptsError::EmptyKey(it.clone()));
        }
        if out.insert(k.to_owned(), v.to_owned()).is_some() {
            return Err(OptsError::Duplicate(k.to_owned()));
        }
    }
    Ok(out)
}

/// Flattens nested JSON arguments into dotted keys (`{"file": {"driver": "nbd"}}` →
/// `file.driver=nbd`); booleans become `on`/`off`.
pub fn flatten_json(args: &Map<String, Value>) -> Opts {
    fn walk(prefix: &str, v: &Value, out: &mut Opts) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            Value::Array(a) => {
                for (i, v) in a.iter().enumerate() {
                    walk(&format!("{prefix}.{i}"), v, out);
                }
            }
            Value::Bool(b) => {
                out.insert(
                    prefix.to_owned(),
                    if *b { "on".into() } else { "off".into() },
                );
            }
            Value::String(s) => {
                out.insert(prefix.to_owned(), s.clone());
            }
            Value::Number(n) => {
                out.insert(prefix.to_owned(), n.to_string());
            }
            Value::Null => {}
        }
    }
    let mut out = Opts::new();
    walk("", &Value::Object(args.clone()), &mut out);
    out
}

/// The sub-map under `prefix.` (keys without the prefix).
pub fn sub(opts: &Opts, prefix: &str) -> Opts {
    let p = format!("{prefix}.");
    opts.iter()
        .filter_map(|(k, v)| k.strip_prefix(&p).map(|r| (r.to_owned(), v.clone())))
        .collect()
}

/// QEMU's boolean spellings.
pub fn flag(opts: &Opts, key: &str) -> Result<bool, String> {
    match opts.get(key).map(String::as_str) {
        None => Ok(false),
        Some("on" | "true" | "yes" | "1") => Ok(true),
        Some("off" | "false" | "no" | "0") => Ok(false),
        Some(o) => Err(format!("{key}: expected on/off, got {o:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_seed_drive_and_json_alike() {
        let o = parse_opts("if=virtio,id=colo-disk0,driver=quorum,read-pattern=fifo,vote-threshold=1,children.0.file.filename=/a,,b.img,children.0.driver=raw").unwrap();
        assert_eq!(o["children.0.file.filename"], "/a,b.img");
        assert_eq!(sub(&o, "children.0")["driver"], "raw");
        assert_eq!(parse_opts("a=1,a=2"), Err(OptsError::Duplicate("a".into())));
        assert!(matches!(parse_opts("novalue"), Err(OptsError::NoValue(_))));
        let j: Value = serde_json::json!({"driver": "replication", "file": {"driver": "nbd", "port": 10809, "x": true}});
        let f = flatten_json(j.as_object().unwrap());
        assert_eq!(f["file.port"], "10809");
        assert_eq!(f["file.x"], "on");
    }

    #[test]
    fn the_seeds_secondary_drive_selects_qcow2_active_and_hidden_disks() {
        use crate::block::replication::LayerSpec;
        let o = parse_opts("if=virtio,id=active-disk0,driver=replication,mode=secondary,file.driver=qcow2,top-id=active-disk0,file.file.filename=/mnt/ramfs/active_disk.img,file.backing.driver=qcow2,file.backing.file.filename=/mnt/ramfs/hidden_disk.img,file.backing.backing=colo-disk0").unwrap();
        let (a, h) = LayerSpec::secondary_pair(&o, "active-disk0", 65536).unwrap();
        assert_eq!(
            a,
            LayerSpec::Qcow2 {
                path: "/mnt/ramfs/active_disk.img".into()
            }
        );
        assert_eq!(
            h,
            LayerSpec::Qcow2 {
                path: "/mnt/ramfs/hidden_disk.img".into()
            }
        );
        assert_eq!(o["file.backing.backing"], "colo-disk0");
        // The same as blockdev-add's nested JSON.
        let j = serde_json::json!({"driver": "replication", "mode": "secondary",
            "file": {"driver": "qcow2", "file": {"filename": "/a.img"},
                     "backing": {"driver": "qcow2", "file": {"filename": "/h.img"}, "backing": "colo-disk0"}}});
        let f = flatten_json(j.as_object().unwrap());
        let (a, h) = LayerSpec::secondary_pair(&f, "x", 65536).unwrap();
        assert_eq!(
            a,
            LayerSpec::Qcow2 {
                path: "/a.img".into()
            }
        );
        assert_eq!(
            h,
            LayerSpec::Qcow2 {
                path: "/h.img".into()
            }
        );
        // Native overlays: explicit, or by default when no file is named.
        let o = parse_opts("mode=secondary,file.driver=overlay,file.backing.driver=overlay,file.backing.backing=b,file.cluster-size=4096").unwrap();
        let (a, _) = LayerSpec::secondary_pair(&o, "x", 65536).unwrap();
        assert_eq!(a, LayerSpec::Overlay { cluster: 4096 });
        let o = parse_opts("mode=secondary,file.backing.backing=b").unwrap();
        let (a, h) = LayerSpec::secondary_pair(&o, "x", 65536).unwrap();
        assert_eq!((a.clone(), h), (a, LayerSpec::Overlay { cluster: 65536 }));
        // A driver that cannot be an overlay, and qcow2 without a file.
        let o = parse_opts("file.driver=raw,file.backing.backing=b").unwrap();
        assert!(LayerSpec::secondary_pair(&o, "x", 65536).is_err());
        let o = parse_opts("file.driver=qcow2,file.backing.backing=b").unwrap();
        let e = LayerSpec::secondary_pair(&o, "x", 65536)
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs file.filename"), "{e}");
    }
}
