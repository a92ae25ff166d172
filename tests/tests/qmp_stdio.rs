//! `--qmp stdio` and a QMP server in another process: the `qmp-demo` binary (built from
//! `tests/src/bin/qmp-demo.rs` on `colo_proto::qmp`) under a `ChildGuard`.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::Write;
use std::process::Command;
use std::time::Duration;

use colo_tests::{ChildGuard, TestDir, qmp_connect, secs, wait_until};
use serde_json::{Value, json};

/// The complete `\r\n`-terminated JSON lines the child has written to stdout so far.
fn lines(c: &ChildGuard) -> Vec<Value> {
    let text = c.stdout_text();
    let complete = &text[..text.rfind("\r\n").map(|i| i + 2).unwrap_or(0)];
    complete
        .split_terminator("\r\n")
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn qmp_over_stdio_answers_and_sends_events() {
    let dir = TestDir::new().unwrap();
    let mut c = ChildGuard::spawn_with_stdin(
        "qmp-demo",
        Command::new(env!("CARGO_BIN_EXE_qmp-demo")).args(["--qmp", "stdio"]),
        dir.path(),
    )
    .unwrap();
    let mut stdin = c.take_stdin().unwrap();
    let wait_lines = |c: &ChildGuard, n: usize| {
        wait_until(secs(10), &format!("{n} QMP lines on stdout"), || {
            lines(c).len() >= n
        })
        .unwrap_or_else(|e| panic!("{e}{}", c.log_tail(20)));
        lines(c)
    };
    let got = wait_lines(&c, 1);
    assert_eq!(got[0]["QMP"]["version"]["package"], "colo qmp-demo");
    stdin
        .write_all(b"{\"execute\": \"qmp_capabilities\"}\n{\"execute\": \"x-add\", \"arguments\": {\"a\": -5, \"b\": 2}, \"id\": 1}\n{\"execute\": \"x-add\", \"arguments\": {\"a\": 1}, \"id\": 2}\n")
        .unwrap();
    let got = wait_lines(&c, 4);
    let non_events: Vec<&Value> = got.iter().filter(|v| v.get("event").is_none()).collect();
    assert_eq!(non_events[1], &json!({"return": {}}));
    assert_eq!(non_events[2], &json!({"return": {"sum": -3}, "id": 1}));
    assert_eq!(
        non_events[3],
        &json!({"error": {"class": "GenericError", "desc": "Parameter 'b' is missing"}, "id": 2})
    );
    // The periodic event arrives on stdout once negotiated.
    wait_until(secs(10), "X_DEMO_READY on stdout", || {
        lines(&c).iter().any(|v| v["event"] == "X_DEMO_READY")
    })
    .unwrap();
    assert!(c.is_running());
}

#[test]
fn qmp_unix_server_in_another_process_and_quit() {
    let dir = TestDir::new().unwrap();
    let sock = dir.join("demo.qmp");
    let mut c = ChildGuard::spawn(
        "qmp-demo",
        Command::new(env!("CARGO_BIN_EXE_qmp-demo"))
            .arg("--qmp")
            .arg(format!("unix:{}", sock.display())),
        dir.path(),
    )
    .unwrap();
    let mut q = qmp_connect(&sock, secs(20)).unwrap();
    let mut q2 = qmp_connect(&sock, secs(5)).unwrap();
    assert_eq!(
        q.execute("x-add", json!({"a": 2, "b": 2})).unwrap(),
        json!({"sum": 4})
    );
    q.execute("x-emit", json!({"name": "X_HELLO"})).unwrap();
    assert_eq!(
        q2.wait_event("X_HELLO", Duration::from_secs(10))
            .unwrap()
            .data,
        json!({"by": "x-emit"})
    );
    q.wait_event("X_DEMO_READY", Duration::from_secs(10))
        .unwrap();
    assert_eq!(q.execute("quit", Value::Null).unwrap(), json!({}));
    let st = c.wait_until(secs(10)).unwrap();
    assert!(st.success(), "{st}");
}
