//! vhost-blk-colo's option and command parsing: `--drive` strings (`drive::parse_opts`, then
//! `BlkControl::add_drive` building `raw`/`file`, `qcow2`, `quorum`, `replication`
//! primary/secondary and `nbd` nodes), and the QMP commands of `BlkControl::register`
//! (`blockdev-add`'s nested JSON through `flatten_json`, `human-monitor-command drive_add`,
//! `x-blockdev-change`, `nbd-server-*`, `query-block`, `colo-blk-*`) with fuzzer-chosen
//! arguments, dispatched by the real QMP server (`serve_connection`) on an in-memory stream.
//!
//! So that the fuzzer cannot touch the machine, every file name is replaced by one of two
//! scratch images in a private temporary directory (recreated per input), every NBD host by
//! 127.0.0.1 and every port by 1 (connections are refused at once), and `nbd-server-start`
//! binds 127.0.0.1 port 0.
//!
//! Checks: no panic or hang; `parse_opts` output re-encodes (`,` doubled) to options that
//! parse to the same map; every command gets exactly one `return` or `error` answer.
#![no_main]

use std::io::{Cursor, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value, json};
use vhost_blk_colo::block::null_events;
use vhost_blk_colo::control::BlkControl;
use vhost_blk_colo::drive::{Opts, parse_opts};

fn scratch() -> &'static PathBuf {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("blk-options-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("scratch dir");
        extern "C" fn remove_scratch() {
            if let Some(d) = D.get() {
                let _ = std::fs::remove_dir_all(d);
            }
        }
        // SAFETY: registers a plain function without arguments; libFuzzer ends with exit().
        unsafe { libc::atexit(remove_scratch) };
        d
    })
}

fn images() -> [String; 2] {
    let d = scratch();
    ["a.img", "b.img"].map(|n| d.join(n).to_string_lossy().into_owned())
}

/// Replaces what could reach outside: file names, hosts, ports.
fn tame_key(k: &str, v: &str, alt: bool) -> String {
    let last = k.rsplit('.').next().unwrap_or(k);
    match last {
        "filename" => images()[usize::from(alt)].clone(),
        "host" => "127.0.0.1".into(),
        "port" => "1".into(),
        _ => v.to_owned(),
    }
}

fn tame_opts(o: &Opts) -> Opts {
    o.iter()
        .map(|(k, v)| (k.clone(), tame_key(k, v, v.len() % 2 == 1)))
        .collect()
}

fn tame_json(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if matches!(k.as_str(), "filename" | "host" | "port") {
                    let alt = x.as_str().is_some_and(|s| s.len() % 2 == 1);
                    *x = Value::String(tame_key(k, "", alt));
                } else {
                    tame_json(x);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(tame_json),
        _ => {}
    }
}

/// `parse_opts`' inverse: `k=v` joined by `,`, commas doubled.
fn encode(o: &Opts) -> String {
    o.iter()
        .map(|(k, v)| format!("{}={}", k.replace(',', ",,"), v.replace(',', ",,")))
        .collect::<Vec<_>>()
        .join(",")
}

const DRIVES: &[&str] = &[
    "driver=raw,id=d0,file.filename=x",
    "if=none,id=d1,driver=raw,file.filename=y,read-only=on",
    "if=virtio,id=colo-disk0,driver=quorum,read-pattern=fifo,vote-threshold=1,children.0.file.filename=x,children.0.driver=raw",
    "driver=quorum,id=q,vote-threshold=2,children.0=d0,children.1=d1",
    "driver=replication,mode=primary,id=r0,file.driver=nbd,file.host=h,file.port=9,file.export=e",
    "if=none,id=s0,driver=replication,mode=secondary,file.driver=overlay,top-id=s0,file.backing.driver=overlay,file.backing.backing=d0,file.cluster-size=4096",
    "id=s1,driver=replication,mode=secondary,file.driver=qcow2,file.file.filename=x,file.backing.driver=qcow2,file.backing.file.filename=y,file.backing.backing=d1",
    "driver=qcow2,id=c0,file.filename=x,backing=d0",
    "driver=nbd,id=n0,host=h,port=1,export=e",
    "node-name=nn,driver=file,filename=y,cache.direct=on",
];

const COMMANDS: &[&str] = &[
    "blockdev-add",
    "human-monitor-command",
    "x-blockdev-change",
    "nbd-server-start",
    "nbd-server-add",
    "nbd-server-remove",
    "nbd-server-stop",
    "query-block",
    "colo-blk-start",
    "colo-blk-checkpoint",
    "colo-blk-failover",
    "colo-blk-stop",
    "colo-blk-sync",
    "colo-blk-status",
];

const NAMES: &[&str] = &[
    "d0",
    "d1",
    "q",
    "r0",
    "s0",
    "s1",
    "c0",
    "n0",
    "nn",
    "colo-disk0",
    "x",
];

fn opts_string(u: &mut Unstructured<'_>) -> Result<String> {
    if u.ratio(1, 3)? {
        return u.arbitrary();
    }
    let mut s = (*u.choose(DRIVES)?).to_owned();
    for _ in 0..u.int_in_range(0..=3u8)? {
        match u.int_in_range(0..=3u8)? {
            0 => {
                let extra: String = u.arbitrary()?;
                s.push(',');
                s.push_str(&extra);
            }
            1 => {
                let k = *u.choose(&[
                    "vote-threshold",
                    "read-pattern",
                    "read-only",
                    "mode",
                    "file.cluster-size",
                    "children.1",
                    "children.2.driver",
                    "file.backing.backing",
                    "backing",
                    "if",
                    "cache.direct",
                    "driver",
                    "id",
                    "top-id",
                    "file",
                    "port",
                ])?;
                let v: String = if u.arbitrary()? {
                    (*u.choose(&[
                        "0",
                        "1",
                        "2",
                        "on",
                        "off",
                        "x",
                        "",
                        "65536",
                        "-1",
                        "fifo",
                        "quorum",
                        "d0",
                        "q",
                        "primary",
                        "secondary",
                        "overlay",
                        "qcow2",
                        "raw",
                        "nbd",
                    ])?)
                    .to_owned()
                } else {
                    u.arbitrary()?
                };
                s = format!("{s},{k}={}", v.replace(',', ",,"));
            }
            2 => {
                // Cut it somewhere (on a character boundary).
                let at = u.int_in_range(0..=s.len())?;
                let at = (0..=at).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
                s.truncate(at);
            }
            _ => s = s.replacen("id=", &format!("id={}", u.choose(NAMES)?), 1),
        }
    }
    Ok(s)
}

fn command(u: &mut Unstructured<'_>) -> Result<Value> {
    let name = *u.choose(COMMANDS)?;
    let mut args = Map::new();
    match name {
        "blockdev-add" => {
            let o = tame_opts(&parse_opts(&opts_string(u)?).unwrap_or_default());
            // Nested as QMP sends it: dotted keys become objects where they can.
            let mut root = Map::new();
            for (k, v) in o {
                let parts: Vec<&str> = k.split('.').collect();
                let val = match v.as_str() {
                    "on" if u.arbitrary()? => json!(true),
                    n if n.parse::<u64>().is_ok() && u.arbitrary()? => {
                        json!(n.parse::<u64>().unwrap_or(0))
                    }
                    _ => json!(v),
                };
                insert_path(&mut root, &parts, val);
            }
            args = root;
        }
        "human-monitor-command" => {
            let o = tame_opts(&parse_opts(&opts_string(u)?).unwrap_or_default());
            let pre = *u.choose(&[
                "drive_add -n x ",
                "drive_add 0 ",
                "drive_add ",
                "info block ",
                "",
            ])?;
            args.insert("command-line".into(), json!(format!("{pre}{}", encode(&o))));
        }
        "nbd-server-start" => {
            let port = u
                .choose(&[json!(0), json!("0"), json!("x"), json!(70000), json!(-1)])?
                .clone();
            let addr = if u.arbitrary()? {
                json!({"type": *u.choose(&["inet", "unix"])?, "data": {"host": "127.0.0.1", "port": port}})
            } else {
                json!({"host": "127.0.0.1", "port": port})
            };
            if !u.ratio(1, 8)? {
                args.insert("addr".into(), addr);
            }
        }
        _ => {
            for k in [
                "device",
                "name",
                "node",
                "parent",
                "child",
                "writable",
                "granularity",
            ] {
                if u.arbitrary()? {
                    let v = match u.int_in_range(0..=3u8)? {
                        0 => json!(*u.choose(NAMES)?),
                        1 => json!(u.arbitrary::<bool>()?),
                        2 => json!(*u.choose(&[
                            0u64,
                            1,
                            512,
                            1 << 20,
                            32 << 20,
                            (32 << 20) + 1,
                            u64::MAX
                        ])?),
                        _ => json!(u.arbitrary::<String>()?),
                    };
                    args.insert(k.into(), v);
                }
            }
        }
    }
    let mut a = Value::Object(args);
    tame_json(&mut a);
    Ok(json!({"execute": name, "arguments": a}))
}

/// Puts `val` at the dotted path `parts` (skipped where a value already sits on the way).
fn insert_path(m: &mut Map<String, Value>, parts: &[&str], val: Value) {
    match parts {
        [] => {}
        [last] => {
            m.insert((*last).to_owned(), val);
        }
        [first, rest @ ..] => {
            if let Some(sub) = m
                .entry((*first).to_owned())
                .or_insert_with(|| json!({}))
                .as_object_mut()
            {
                insert_path(sub, rest, val);
            }
        }
    }
}

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    for f in images() {
        std::fs::write(&f, vec![0u8; 65536]).expect("scratch image");
    }
    let ctl =
        Arc::new(BlkControl::new(null_events(), Duration::from_millis(200)).expect("control"));
    let mut reg = colo_proto::qmp::Registry::new();
    ctl.register(&mut reg);
    let mut stream = b"{\"execute\": \"qmp_capabilities\"}\n".to_vec();
    let mut n = 1;
    for _ in 0..u.int_in_range(1..=6u8)? {
        if u.arbitrary()? {
            let s = opts_string(u)?;
            match parse_opts(&s) {
                Ok(o) => {
                    assert_eq!(parse_opts(&encode(&o)).as_ref(), Ok(&o), "{s:?}");
                    let _ = ctl.add_drive(&tame_opts(&o));
                }
                Err(_) => continue,
            }
        } else {
            let c = command(u)?;
            stream.extend_from_slice(c.to_string().as_bytes());
            stream.push(b'\n');
            n += 1;
            // Run the commands queued so far, so drives and commands interleave.
            let out = Shared::default();
            colo_proto::qmp::serve_connection(&reg, Cursor::new(stream.clone()), out.clone())
                .expect("in-memory I/O");
            let text = String::from_utf8(out.0.lock().unwrap_or_else(|p| p.into_inner()).clone())
                .expect("UTF-8");
            let answers = text
                .split_terminator("\r\n")
                .skip(1)
                .map(|l| serde_json::from_str::<Value>(l).expect("JSON answer"))
                .filter(|v| v.get("return").is_some() || v.get("error").is_some())
                .count();
            assert_eq!(answers, n, "one answer per command");
            // Next round: only the new commands (state lives in `ctl`).
            stream = b"{\"execute\": \"qmp_capabilities\"}\n".to_vec();
            n = 1;
        }
    }
    let _ = ctl.query_block();
    let _ = ctl.colo_status();
    let _ = ctl.nbd_server_stop();
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
