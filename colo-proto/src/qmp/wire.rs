//! QMP on the byte level, free of I/O: splitting a byte stream into JSON values, turning a
//! request into a response, and writing JSON the way QEMU does.
//!
//! The splitter finds where each top-level JSON value ends by tracking brackets and strings (as
//! QEMU's JSON streamer does), then parses just that slice. So a value may span lines or share a
//! line with the next one, bad JSON costs one error response and the stream goes on, and a value
//! larger than [`MAX_MESSAGE_LEN`] is discarded (one error) without being buffered.

use serde_json::{Map, Value, json};

use super::registry::Registry;
use super::{ErrorClass, QmpError};

/// The largest message (one top-level JSON value) accepted, in bytes.
pub const MAX_MESSAGE_LEN: usize = 1 << 20;

/// One item found in the byte stream.
#[derive(Clone, Debug, PartialEq)]
pub enum Incoming {
    /// A complete JSON value.
    Value(Value),
    /// Bytes that are not JSON; the message says why.
    ParseError(String),
    /// A value longer than the limit; the rest of it is being skipped.
    TooLong { limit: usize },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Between values.
    Idle,
    /// Inside an object or array.
    Container,
    /// Inside a top-level string.
    TopString,
    /// Inside a top-level number, keyword or garbage word.
    Scalar,
}

/// Splits a byte stream into top-level JSON values.
#[derive(Debug)]
pub struct JsonSplitter {
    buf: Vec<u8>,
    state: State,
    depth: u64,
    in_string: bool,
    escape: bool,
    /// The current value passed the limit: its bytes are dropped until it ends.
    overflow: bool,
    limit: usize,
}

impl Default for JsonSplitter {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonSplitter {
    /// A splitter with the [`MAX_MESSAGE_LEN`] limit.
    pub fn new() -> Self {
        Self::with_limit(MAX_MESSAGE_LEN)
    }

    /// A splitter with another message size limit.
    pub fn with_limit(limit: usize) -> Self {
        Self {
            buf: Vec::new(),
            state: State::Idle,
            depth: 0,
            in_string: false,
            escape: false,
            overflow: false,
            limit,
        }
    }

    /// Whether a value is partly received.
    pub fn is_mid_value(&self) -> bool {
        self.state != State::Idle
    }

    /// Feeds bytes; appends every item they complete to `out`.
    pub fn push(&mut self, data: &[u8], out: &mut Vec<Incoming>) {
        for &b in data {
            self.push_byte(b, out);
        }
    }

    /// The end of the stream: completes a pending scalar, reports a pending incomplete value.
    pub fn finish(&mut self, out: &mut Vec<Incoming>) {
        match self.state {
            State::Idle => {}
            State::Scalar => self.complete(out),
            State::Container | State::TopString => {
                if !self.overflow {
                    out.push(Incoming::ParseError(
                        "stream ended inside a JSON value".to_string(),
                    ));
                }
                self.reset();
            }
        }
    }

    fn reset(&mut self) {
        self.buf.clear();
        self.state = State::Idle;
        self.depth = 0;
        self.in_string = false;
        self.escape = false;
        self.overflow = false;
    }

    fn store(&mut self, b: u8, out: &mut Vec<Incoming>) {
        if self.overflow {
            return;
        }
        if self.buf.len() >= self.limit {
            self.overflow = true;
            self.buf = Vec::new();
            out.push(Incoming::TooLong { limit: self.limit });
            return;
        }
        self.buf.push(b);
    }

    fn complete(&mut self, out: &mut Vec<Incoming>) {
        if !self.overflow {
            out.push(match serde_json::from_slice::<Value>(&self.buf) {
                Ok(v) => Incoming::Value(v),
                Err(e) => Incoming::ParseError(e.to_string()),
            });
        }
        self.reset();
    }

    fn push_byte(&mut self, b: u8, out: &mut Vec<Incoming>) {
        match self.state {
            State::Idle => match b {
                b' ' | b'\t' | b'\r' | b'\n' => {}
                b'{' | b'[' => {
                    self.state = State::Container;
                    self.depth = 1;
                    self.store(b, out);
                }
                b'"' => {
                    self.state = State::TopString;
                    self.store(b, out);
                }
                b'}' | b']' => out.push(Incoming::ParseError(format!(
                    "unexpected '{}' outside of a JSON value",
                    b as char
                ))),
                _ => {
                    self.state = State::Scalar;
                    self.store(b, out);
                }
            },
            State::Scalar => match b {
                b' ' | b'\t' | b'\r' | b'\n' => self.complete(out),
                b'{' | b'[' | b'"' | b'}' | b']' => {
                    self.complete(out);
                    self.push_byte(b, out);
                }
                _ => self.store(b, out),
            },
            State::TopString => {
                self.store(b, out);
                if self.escape {
                    self.escape = false;
                } else if b == b'\\' {
                    self.escape = true;
                } else if b == b'"' {
                    self.complete(out);
                }
            }
            State::Container => {
                self.store(b, out);
                if self.in_string {
                    if self.escape {
                        self.escape = false;
                    } else if b == b'\\' {
                        self.escape = true;
                    } else if b == b'"' {
                        self.in_string = false;
                    }
                } else {
                    match b {
                        b'"' => self.in_string = true,
                        b'{' | b'[' => self.depth = self.depth.saturating_add(1),
                        b'}' | b']' => {
                            self.depth -= 1;
                            if self.depth == 0 {
                                self.complete(out);
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

/// Serialises like QEMU: `{"a": 1, "b": [1, 2]}` (": " and ", " separators), one line.
pub fn to_qemu_json(v: &Value) -> String {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, QemuFormatter);
    // Serialising a Value into a Vec cannot fail (no I/O errors, keys are strings).
    if serde::Serialize::serialize(v, &mut ser).is_err() {
        return v.to_string();
    }
    String::from_utf8(out).unwrap_or_else(|_| v.to_string())
}

/// A message as QEMU sends it: QEMU-style JSON followed by `\r\n`.
pub fn to_line(v: &Value) -> Vec<u8> {
    let mut s = to_qemu_json(v).into_bytes();
    s.extend_from_slice(b"\r\n");
    s
}

struct QemuFormatter;

impl serde_json::ser::Formatter for QemuFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// A request that passed QEMU's shape checks.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// The command name.
    pub command: String,
    /// The arguments (empty when absent).
    pub arguments: Map<String, Value>,
    /// The `id` to echo, any JSON value.
    pub id: Option<Value>,
}

/// Checks a request's shape as QEMU does. On error, returns the `id` (if it could be found) to
/// echo with the error.
pub fn parse_request(v: Value) -> Result<Request, (Option<Value>, QmpError)> {
    let Value::Object(mut obj) = v else {
        return Err((None, QmpError::generic("QMP input must be a JSON object")));
    };
    let id = obj.remove("id");
    let mut command = None;
    let mut arguments = Map::new();
    for (key, value) in obj {
        match key.as_str() {
            "execute" => match value {
                Value::String(s) => command = Some(s),
                _ => {
                    return Err((
                        id,
                        QmpError::generic("QMP input member 'execute' must be a string"),
                    ));
                }
            },
            "arguments" => match value {
                Value::Object(m) => arguments = m,
                _ => {
                    return Err((
                        id,
                        QmpError::generic("QMP input member 'arguments' must be an object"),
                    ));
                }
            },
            // We do not offer the "oob" capability, so QEMU's answer to exec-oob applies.
            other => {
                return Err((
                    id,
                    QmpError::generic(format!("QMP input member '{other}' is unexpected")),
                ));
            }
        }
    }
    match command {
        Some(command) => Ok(Request {
            command,
            arguments,
            id,
        }),
        None => Err((id, QmpError::generic("QMP input lacks member 'execute'"))),
    }
}

/// A `{"return": …}` response.
pub fn return_response(value: Value, id: Option<Value>) -> Value {
    let value = if value.is_null() { json!({}) } else { value };
    let mut m = Map::new();
    m.insert("return".into(), value);
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

/// An `{"error": {"class", "desc"}}` response.
pub fn error_response(err: &QmpError, id: Option<Value>) -> Value {
    let mut m = Map::new();
    m.insert("error".into(), err.to_json());
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

/// One client's protocol state: before or after capabilities negotiation.
#[derive(Debug, Default)]
pub struct Session {
    negotiated: bool,
}

impl Session {
    /// A session that has not negotiated yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `qmp_capabilities` succeeded (events are sent only then).
    pub fn negotiated(&self) -> bool {
        self.negotiated
    }

    /// The response to one incoming item (every item gets exactly one).
    pub fn handle(&mut self, registry: &Registry, item: Incoming) -> Value {
        let v = match item {
            Incoming::Value(v) => v,
            Incoming::ParseError(msg) => {
                return error_response(
                    &QmpError::generic(format!("JSON parse error, {msg}")),
                    None,
                );
            }
            Incoming::TooLong { limit } => {
                return error_response(
                    &QmpError::generic(format!(
                        "JSON parse error, message longer than {limit} bytes (rest of it discarded)"
                    )),
                    None,
                );
            }
        };
        let req = match parse_request(v) {
            Ok(r) => r,
            Err((id, e)) => return error_response(&e, id),
        };
        match self.execute(registry, &req) {
            Ok(v) => return_response(v, req.id),
            Err(e) => error_response(&e, req.id),
        }
    }

    fn execute(&mut self, registry: &Registry, req: &Request) -> Result<Value, QmpError> {
        let name = req.command.as_str();
        if !self.negotiated {
            if name != "qmp_capabilities" {
                return Err(QmpError::new(
                    ErrorClass::CommandNotFound,
                    "Expecting capabilities negotiation with 'qmp_capabilities'",
                ));
            }
            super::args::reject_unknown(&req.arguments, &["enable"])?;
            if let Some(enable) = super::args::optional_array(&req.arguments, "enable")? {
                // We offer no capabilities (QEMU's "oob" is not implemented).
                match enable.first() {
                    Some(Value::String(s)) => {
                        return Err(QmpError::generic(format!("Capability '{s}' not available")));
                    }
                    Some(_) => return Err(super::args::invalid_type("enable", "string")),
                    None => {}
                }
            }
            self.negotiated = true;
            return Ok(json!({}));
        }
        match name {
            "qmp_capabilities" => Err(QmpError::new(
                ErrorClass::CommandNotFound,
                "Capabilities negotiation is already complete, command ignored",
            )),
            "query-commands" => {
                super::args::reject_unknown(&req.arguments, &[])?;
                Ok(Value::Array(
                    registry
                        .names()
                        .into_iter()
                        .map(|n| json!({ "name": n }))
                        .collect(),
                ))
            }
            "query-version" => {
                super::args::reject_unknown(&req.arguments, &[])?;
                Ok(registry.version_json())
            }
            _ => match registry.call(name, &req.arguments) {
                Some(r) => r,
                None => Err(QmpError::command_not_found(format!(
                    "The command {name} has not been found"
                ))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(data: &[u8]) -> Vec<Incoming> {
        let mut s = JsonSplitter::new();
        let mut out = Vec::new();
        s.push(data, &mut out);
        s.finish(&mut out);
        out
    }

    #[test]
    fn splits_values_across_lines_and_on_one_line() {
        let out = split(b"{\"a\":\n 1}{\"b\": [1, {\"c\": \"}]\\\"\"}]}\n  \"s\\\"\" 12 true");
        assert_eq!(
            out,
            vec![
                Incoming::Value(json!({"a": 1})),
                Incoming::Value(json!({"b": [1, {"c": "}]\""}]})),
                Incoming::Value(json!("s\"")),
                Incoming::Value(json!(12)),
                Incoming::Value(json!(true)),
            ]
        );
    }

    #[test]
    fn byte_by_byte_equals_whole() {
        let data = b"{\"execute\": \"x\", \"id\": [1, \"]\"]}\r\n[1,2] garbage {\"a\": }";
        let whole = split(data);
        let mut s = JsonSplitter::new();
        let mut out = Vec::new();
        for b in data {
            s.push(&[*b], &mut out);
        }
        s.finish(&mut out);
        assert_eq!(whole, out);
        assert_eq!(out.len(), 4);
        assert!(matches!(out[2], Incoming::ParseError(_)));
        assert!(matches!(out[3], Incoming::ParseError(_)));
    }

    #[test]
    fn garbage_is_reported_and_stream_continues() {
        let out = split(b"}}} foo {\"ok\": 1}");
        assert_eq!(out.len(), 5);
        assert!(
            out[..4]
                .iter()
                .all(|i| matches!(i, Incoming::ParseError(_)))
        );
        assert_eq!(out[4], Incoming::Value(json!({"ok": 1})));
    }

    #[test]
    fn oversize_value_is_dropped_without_buffering() {
        let mut s = JsonSplitter::with_limit(16);
        let mut out = Vec::new();
        s.push(b"{\"a\": \"", &mut out);
        for _ in 0..1000 {
            s.push(b"xxxxxxxxxx", &mut out);
        }
        assert_eq!(out, vec![Incoming::TooLong { limit: 16 }]);
        assert!(s.buf.capacity() <= 16);
        s.push(b"\"} {\"b\": 2}", &mut out);
        assert_eq!(out[1], Incoming::Value(json!({"b": 2})));
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let mut data = vec![b'['; 10_000];
        data.extend(vec![b']'; 10_000]);
        let out = split(&data);
        assert_eq!(out.len(), 1);
        assert!(matches!(out[0], Incoming::ParseError(_)));
    }

    #[test]
    fn qemu_json_formatting() {
        assert_eq!(
            to_qemu_json(&json!({"return": {}, "id": [1, "a"]})),
            r#"{"id": [1, "a"], "return": {}}"#
        );
        assert_eq!(to_line(&json!({})), b"{}\r\n");
    }

    fn reg() -> Registry {
        let mut r = Registry::new();
        r.add("echo", |a| Ok(Value::Object(a.clone())));
        r.add("fail", |_| {
            Err(QmpError::device_not_found("Device 'x' not found"))
        });
        r.add("nothing", |_| Ok(Value::Null));
        r.add("boom", |_| panic!("handler bug"));
        r
    }

    fn run(session: &mut Session, r: &Registry, text: &str) -> Value {
        let mut out = Vec::new();
        let mut s = JsonSplitter::new();
        s.push(text.as_bytes(), &mut out);
        s.finish(&mut out);
        assert_eq!(out.len(), 1, "{text}");
        session.handle(r, out.remove(0))
    }

    #[test]
    fn negotiation_then_commands() {
        let r = reg();
        let mut s = Session::new();
        assert_eq!(
            run(&mut s, &r, r#"{"execute": "echo", "id": 1}"#),
            json!({"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": 1})
        );
        assert_eq!(
            run(&mut s, &r, r#"{"execute": "qmp_capabilities"}"#),
            json!({"return": {}})
        );
        assert!(s.negotiated());
        assert_eq!(
            run(&mut s, &r, r#"{"execute": "qmp_capabilities", "id": "x"}"#)["error"]["class"],
            "CommandNotFound"
        );
        assert_eq!(
            run(
                &mut s,
                &r,
                r#"{"execute": "echo", "arguments": {"a": 1}, "id": {"k": [1]}}"#
            ),
            json!({"return": {"a": 1}, "id": {"k": [1]}})
        );
        assert_eq!(
            run(&mut s, &r, r#"{"execute": "nothing"}"#),
            json!({"return": {}})
        );
        assert_eq!(
            run(&mut s, &r, r#"{"execute": "fail"}"#),
            json!({"error": {"class": "DeviceNotFound", "desc": "Device 'x' not found"}})
        );
        assert_eq!(
            run(&mut s, &r, r#"{"execute": "nope", "id": 2}"#),
            json!({"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}, "id": 2})
        );
        assert_eq!(
            run(&mut s, &r, r#"{"execute": "boom"}"#)["error"]["class"],
            "GenericError"
        );
        let cmds = run(&mut s, &r, r#"{"execute": "query-commands"}"#);
        assert!(
            cmds["return"]
                .as_array()
                .unwrap()
                .contains(&json!({"name": "echo"}))
        );
        let ver = run(&mut s, &r, r#"{"execute": "query-version"}"#);
        assert!(ver["return"]["qemu"]["major"].is_u64());
    }

    #[test]
    fn malformed_requests_get_qemu_errors() {
        let r = reg();
        let mut s = Session::new();
        run(&mut s, &r, r#"{"execute": "qmp_capabilities"}"#);
        let desc = |s: &mut Session, t: &str| run(s, &r, t)["error"]["desc"].clone();
        assert_eq!(desc(&mut s, "[1]"), "QMP input must be a JSON object");
        assert_eq!(
            desc(&mut s, r#"{"id": 1}"#),
            "QMP input lacks member 'execute'"
        );
        assert_eq!(
            desc(&mut s, r#"{"execute": 1}"#),
            "QMP input member 'execute' must be a string"
        );
        assert_eq!(
            desc(&mut s, r#"{"execute": "echo", "arguments": [1]}"#),
            "QMP input member 'arguments' must be an object"
        );
        assert_eq!(
            desc(&mut s, r#"{"exec-oob": "echo"}"#),
            "QMP input member 'exec-oob' is unexpected"
        );
        let e = run(&mut s, &r, "{\"execute\": tru}");
        assert_eq!(e["error"]["class"], "GenericError");
        assert!(
            e["error"]["desc"]
                .as_str()
                .unwrap()
                .starts_with("JSON parse error, ")
        );
        assert_eq!(
            run(&mut s, &r, r#"{"execute": "echo", "id": 5, "x": 1}"#)["id"],
            5
        );
    }
}
