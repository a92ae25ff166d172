//! QMP on the wire: our server (`colo_proto::qmp`) driven over a raw Unix socket and by `socat`,
//! and our client against a real QEMU 7.2.
//!
//! The server runs in this process; `socat` is a child process (killed by PID on drop).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use colo_proto::qmp::{self, ErrorClass, QmpClient, QmpError, Registry};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(10);

/// A registry with a command taking arguments and one that emits an event.
fn registry() -> Registry {
    let mut r = Registry::new().with_package("colo qmp-wire test");
    let events = r.events();
    r.add("x-add", |a| {
        let x = qmp::args::required_u64(a, "a")?;
        let y = qmp::args::required_u64(a, "b")?;
        Ok(json!({ "sum": x + y }))
    });
    r.add("x-find", |a| {
        let id = qmp::args::required_str(a, "id")?;
        Err(QmpError::device_not_found(format!(
            "Device '{id}' not found"
        )))
    });
    r.add("x-notify", move |a| {
        let tag = qmp::args::optional_str(a, "tag")?
            .unwrap_or("none")
            .to_string();
        events.emit("X_NOTIFIED", json!({ "tag": tag }));
        Ok(Value::Null)
    });
    r
}

/// Reads one `\r\n`-terminated message and parses it.
fn read_msg(r: &mut BufReader<UnixStream>) -> Value {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(
        line.ends_with("\r\n"),
        "QEMU ends messages with CRLF: {line:?}"
    );
    serde_json::from_str(&line).unwrap()
}

fn raw_connect(path: &Path) -> (UnixStream, BufReader<UnixStream>) {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let r = BufReader::new(s.try_clone().unwrap());
    (s, r)
}

#[test]
fn raw_socket_session_follows_qemu_wire_format() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let server = qmp::serve_unix(&path, registry()).unwrap();
    let (mut w, mut r) = raw_connect(&path);

    // Greeting, exactly QEMU's shape and spacing.
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with(r#"{"QMP": {"#), "{line}");
    let g: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(g["QMP"]["capabilities"], json!([]));
    assert_eq!(g["QMP"]["version"]["package"], "colo qmp-wire test");
    assert!(g["QMP"]["version"]["qemu"]["major"].is_u64());

    // Commands before negotiation are refused; events are not sent yet.
    w.write_all(br#"{"execute": "x-add", "arguments": {"a": 1, "b": 2}, "id": "early"}"#)
        .unwrap();
    assert_eq!(
        read_msg(&mut r),
        json!({"error": {"class": "CommandNotFound",
            "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": "early"})
    );
    assert_eq!(server.events().emit("X_EARLY", json!({})), 0);

    // Negotiation, split across lines and writes.
    w.write_all(b"{\"execute\":\n").unwrap();
    w.flush().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    w.write_all(b"  \"qmp_capabilities\"}\n").unwrap();
    assert_eq!(read_msg(&mut r), json!({"return": {}}));

    // A command with arguments; the id (any JSON value) is echoed.
    w.write_all(br#"{"execute": "x-add", "arguments": {"a": 40, "b": 2}, "id": {"n": [1]}}"#)
        .unwrap();
    assert_eq!(
        read_msg(&mut r),
        json!({"return": {"sum": 42}, "id": {"n": [1]}})
    );

    // Errors: wrong argument type, missing argument, device error, unknown command, bad JSON,
    // non-object arguments, non-object input; the connection stays up through all of them.
    let cases: &[(&[u8], Value)] = &[
        (
            br#"{"execute": "x-add", "arguments": {"a": "1", "b": 2}, "id": 1}"#,
            json!({"error": {"class": "GenericError",
                "desc": "Invalid parameter type for 'a', expected: integer"}, "id": 1}),
        ),
        (
            br#"{"execute": "x-add", "arguments": {"a": 1}, "id": 2}"#,
            json!({"error": {"class": "GenericError", "desc": "Parameter 'b' is missing"}, "id": 2}),
        ),
        (
            br#"{"execute": "x-find", "arguments": {"id": "net9"}, "id": 3}"#,
            json!({"error": {"class": "DeviceNotFound", "desc": "Device 'net9' not found"}, "id": 3}),
        ),
        (
            br#"{"execute": "no-such-command", "id": 4}"#,
            json!({"error": {"class": "CommandNotFound",
                "desc": "The command no-such-command has not been found"}, "id": 4}),
        ),
        (
            br#"{"execute": "x-add", "arguments": [1, 2], "id": 5}"#,
            json!({"error": {"class": "GenericError",
                "desc": "QMP input member 'arguments' must be an object"}, "id": 5}),
        ),
        (
            br#"[1, 2]"#,
            json!({"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}),
        ),
        (
            br#"{"exec-oob": "x-add", "id": 6}"#,
            json!({"error": {"class": "GenericError",
                "desc": "QMP input member 'exec-oob' is unexpected"}, "id": 6}),
        ),
    ];
    for (req, want) in cases {
        w.write_all(req).unwrap();
        assert_eq!(&read_msg(&mut r), want, "{}", String::from_utf8_lossy(req));
    }
    w.write_all(b"{\"execute\": nonsense}").unwrap();
    let e = read_msg(&mut r);
    assert_eq!(e["error"]["class"], "GenericError");
    assert!(
        e["error"]["desc"]
            .as_str()
            .unwrap()
            .starts_with("JSON parse error, "),
        "{e}"
    );

    // An oversize message: one error, then the stream goes on.
    let mut big = br#"{"execute": "x-add", "arguments": {"pad": ""#.to_vec();
    big.extend(std::iter::repeat_n(b'a', 2 << 20));
    big.extend_from_slice(b"\"}}");
    w.write_all(&big).unwrap();
    let e = read_msg(&mut r);
    assert!(
        e["error"]["desc"].as_str().unwrap().contains("longer than"),
        "{e}"
    );

    // An event, emitted by a command and directly.
    w.write_all(br#"{"execute": "x-notify", "arguments": {"tag": "t1"}, "id": 7}"#)
        .unwrap();
    let ev = read_msg(&mut r);
    assert_eq!(ev["event"], "X_NOTIFIED");
    assert_eq!(ev["data"], json!({"tag": "t1"}));
    assert!(ev["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000);
    assert!(ev["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
    assert_eq!(read_msg(&mut r), json!({"return": {}, "id": 7}));
    assert_eq!(server.events().emit("X_DIRECT", json!({"k": 1})), 1);
    let ev = read_msg(&mut r);
    assert_eq!(
        (ev["event"].clone(), ev["data"].clone()),
        (json!("X_DIRECT"), json!({"k": 1}))
    );

    // Built-ins.
    w.write_all(br#"{"execute": "query-commands"}"#).unwrap();
    let cmds = read_msg(&mut r);
    for name in [
        "qmp_capabilities",
        "query-commands",
        "query-version",
        "x-add",
    ] {
        assert!(
            cmds["return"]
                .as_array()
                .unwrap()
                .contains(&json!({ "name": name })),
            "{name} missing from {cmds}"
        );
    }
    w.write_all(br#"{"execute": "qmp_capabilities"}"#).unwrap();
    assert_eq!(read_msg(&mut r)["error"]["class"], "CommandNotFound");
}

#[test]
fn events_reach_every_negotiated_client_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let server = qmp::serve_unix(&path, registry()).unwrap();
    let mut clients: Vec<QmpClient> = (0..4)
        .map(|_| QmpClient::connect_unix(&path, T).unwrap())
        .collect();
    // A fifth client that never negotiates gets nothing.
    let (_w, mut r) = raw_connect(&path);
    read_msg(&mut r);
    assert_eq!(server.events().emit("X_ALL", json!({"n": 1})), 4);
    for c in &mut clients {
        let e = c.wait_event("X_ALL", T).unwrap();
        assert_eq!(e.data, json!({"n": 1}));
    }
    r.get_ref()
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 1];
    assert!(r.read(&mut buf).is_err(), "un-negotiated client got data");
    // Clients run commands concurrently.
    let handles: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            std::thread::spawn(move || {
                for k in 0..50u64 {
                    let v = c.execute("x-add", json!({"a": i, "b": k})).unwrap();
                    assert_eq!(v["sum"], json!(i as u64 + k));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn socat_session_greeting_command_error_event() {
    if Command::new("socat").arg("-V").output().is_err() {
        eprintln!("SKIPPED: socat_session_greeting_command_error_event: socat not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let server = qmp::serve_unix(&path, registry()).unwrap();
    let mut child = Command::new("socat")
        .arg("-t5")
        .arg("-")
        .arg(format!("UNIX-CONNECT:{}", path.display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let _guard = Kill(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = || -> Value {
        let line = rx.recv_timeout(T).expect("socat printed nothing in time");
        serde_json::from_str(line.trim_end()).unwrap()
    };
    assert!(next()["QMP"]["version"].is_object());
    stdin
        .write_all(b"{ \"execute\": \"qmp_capabilities\" }\n")
        .unwrap();
    assert_eq!(next(), json!({"return": {}}));
    stdin
        .write_all(b"{\"execute\": \"x-add\", \"arguments\": {\"a\": 2, \"b\": 3}}\n")
        .unwrap();
    assert_eq!(next(), json!({"return": {"sum": 5}}));
    stdin.write_all(b"{\"execute\": \"x-missing\"}\n").unwrap();
    assert_eq!(
        next()["error"],
        json!({"class": "CommandNotFound", "desc": "The command x-missing has not been found"})
    );
    assert_eq!(server.events().emit("X_SOCAT", json!({"ok": true})), 1);
    let ev = next();
    assert_eq!(ev["event"], "X_SOCAT");
    assert_eq!(ev["data"], json!({"ok": true}));
    drop(stdin);
}

#[test]
fn client_talks_to_real_qemu() {
    let qemu = "qemu-system-x86_64";
    if Command::new(qemu).arg("--version").output().is_err() {
        eprintln!("SKIPPED: client_talks_to_real_qemu: {qemu} not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qemu-qmp.sock");
    let child = Command::new(qemu)
        .args([
            "-M",
            "none",
            "-display",
            "none",
            "-nodefaults",
            "-S",
            "-qmp",
        ])
        .arg(format!("unix:{},server=on,wait=off", path.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _guard = Kill(child);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut c = QmpClient::connect_unix_retry(&path, deadline, T).unwrap();
    assert!(
        c.greeting()["QMP"]["version"]["qemu"]["major"]
            .as_u64()
            .unwrap()
            >= 7
    );
    let status = c.execute("query-status", Value::Null).unwrap();
    assert_eq!(status["status"], "prelaunch");
    let err = c.execute("no-such-command", Value::Null).unwrap_err();
    assert_eq!(err.qmp_error().unwrap().class, ErrorClass::CommandNotFound);
    assert_eq!(
        err.qmp_error().unwrap().desc,
        "The command no-such-command has not been found"
    );
    // Our argument errors read like QEMU's own.
    let err = c.execute("device_del", json!({"id": 1})).unwrap_err();
    assert_eq!(
        err.qmp_error().unwrap().desc,
        "Invalid parameter type for 'id', expected: string"
    );
    let err = c.execute("device_del", json!({})).unwrap_err();
    assert_eq!(err.qmp_error().unwrap().desc, "Parameter 'id' is missing");
    // An event: "stop" on a prelaunch VM emits STOP.
    c.execute("cont", Value::Null).unwrap();
    c.execute("stop", Value::Null).unwrap();
    let ev = c.wait_event("STOP", T).unwrap();
    assert!(ev.seconds > 0);
    c.execute("quit", Value::Null).ok();
}
