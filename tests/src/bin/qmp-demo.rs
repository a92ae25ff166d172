//! A tiny QMP server for tests and as an example of `colo_proto::qmp`:
//! `qmp-demo --qmp stdio` or `qmp-demo --qmp unix:PATH`.
//!
//! Commands: `x-add {a, b}` (integers), `x-emit {name}` (emits the event NAME with
//! `{"by": "x-emit"}`), `quit` (exits 0, like QEMU's). It emits `X_DEMO_READY` once a second
//! to every negotiated client, so event delivery can be watched with socat.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use colo_proto::qmp::{self, Registry};
use serde_json::{Value, json};

fn main() -> Result<()> {
    let argv: Vec<String> = std::env::args().collect();
    let spec = match argv.as_slice() {
        [_, flag, spec] if flag == "--qmp" || flag == "-qmp" => spec.clone(),
        _ => bail!("usage: qmp-demo --qmp stdio|unix:PATH"),
    };
    let mut r = Registry::new().with_package("colo qmp-demo");
    let events = r.events();
    r.add("x-add", |a| {
        Ok(json!({ "sum": qmp::args::required_i64(a, "a")?.wrapping_add(qmp::args::required_i64(a, "b")?) }))
    });
    r.add("x-emit", move |a| {
        let name = qmp::args::required_str(a, "name")?;
        events.emit(name, json!({ "by": "x-emit" }));
        Ok(Value::Null)
    });
    r.add("quit", |_| {
        // Answer first, then exit (as QEMU does).
        std::thread::spawn(|| {
            std::thread::sleep(Duration::from_millis(100));
            std::process::exit(0)
        });
        Ok(Value::Null)
    });
    let server = if spec == "stdio" {
        qmp::serve_stdio(r)?
    } else if let Some(path) = spec.strip_prefix("unix:") {
        qmp::serve_unix(path, r).with_context(|| format!("--qmp {spec}"))?
    } else {
        bail!("--qmp {spec}: expected stdio or unix:PATH");
    };
    let sink = server.events();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        sink.emit("X_DEMO_READY", Value::Null);
    }
}
