//! Arbitrary bytes into the QMP server's message path: `serve_connection` (greeting, JSON
//! splitting, request checks, dispatch, responses) on an in-memory connection, plus the
//! splitter alone in arbitrary chunks.
//!
//! Checks: no panic or hang; every output line is one JSON object that is the greeting, a
//! `return` or an `error` (no events are emitted here); one response per incoming item;
//! chunking does not change what the splitter finds.

#![no_main]

use std::io::{Cursor, Write};
use std::sync::{Arc, Mutex};

use colo_proto::qmp::wire::{Incoming, JsonSplitter};
use colo_proto::qmp::{QmpError, Registry, args, serve_connection};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn registry() -> &'static Registry {
    static R: std::sync::OnceLock<Registry> = std::sync::OnceLock::new();
    R.get_or_init(make_registry)
}

fn make_registry() -> Registry {
    let mut r = Registry::new();
    r.add("add", |a| {
        args::reject_unknown(a, &["a", "b"])?;
        let x = args::required_u64(a, "a")?;
        let y = args::optional_u64(a, "b")?.unwrap_or(0);
        Ok(json!({ "sum": x.wrapping_add(y) }))
    });
    r.add("find", |a| {
        let id = args::required_str(a, "id")?;
        let _ = args::optional_bool(a, "force")?;
        let _ = args::optional_object(a, "opts")?;
        Err(QmpError::device_not_found(format!(
            "Device '{id}' not found"
        )))
    });
    r.add("echo", |a| Ok(Value::Object(a.clone())));
    r
}

fn split(data: &[u8], chunk: usize, limit: usize) -> Vec<Incoming> {
    let mut s = JsonSplitter::with_limit(limit);
    let mut out = Vec::new();
    for c in data.chunks(chunk.max(1)) {
        s.push(c, &mut out);
    }
    s.finish(&mut out);
    out
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let chunk = 1 + data[0] as usize % 17;
    let input = &data[1..];

    // The splitter: chunking does not matter, with the default and a tiny limit.
    let whole = split(input, input.len(), colo_proto::qmp::wire::MAX_MESSAGE_LEN);
    assert_eq!(
        whole,
        split(input, chunk, colo_proto::qmp::wire::MAX_MESSAGE_LEN)
    );
    assert_eq!(split(input, input.len(), 64), split(input, chunk, 64));

    // The server path. Prefix a negotiation half the time so commands get dispatched.
    let mut stream = Vec::new();
    if data[0] & 0x80 != 0 {
        stream.extend_from_slice(b"{\"execute\": \"qmp_capabilities\"}");
    }
    stream.extend_from_slice(input);
    let out = Shared::default();
    serve_connection(registry(), Cursor::new(stream.clone()), out.clone())
        .expect("in-memory I/O cannot fail");
    let bytes = out.0.lock().unwrap().clone();
    let text = String::from_utf8(bytes).expect("responses are UTF-8");
    let mut lines = text.split_terminator("\r\n");
    let greeting: Value = serde_json::from_str(lines.next().expect("greeting")).unwrap();
    assert!(greeting["QMP"]["version"].is_object());
    let mut n = 0;
    for line in lines {
        let v: Value = serde_json::from_str(line).expect("each response is JSON");
        let obj = v.as_object().expect("each response is an object");
        assert!(
            obj.contains_key("return") ^ obj.contains_key("error"),
            "{line}"
        );
        if let Some(e) = obj.get("error") {
            assert!(e["class"].is_string() && e["desc"].is_string());
        }
        n += 1;
    }
    // One response per complete item (a value still open at EOF gets none, as in QEMU).
    let mut s = JsonSplitter::new();
    let mut items = Vec::new();
    s.push(&stream, &mut items);
    assert_eq!(n, items.len());
});
