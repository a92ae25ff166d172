//! QMP, the QEMU Machine Protocol, as every colo process speaks it (server and client).
//!
//! The wire format is QEMU's, so `socat`, `qmp-shell` and an operator's scripts work unchanged:
//!
//! ```text
//! S: {"QMP": {"version": {"qemu": {"micro": 0, "minor": 1, "major": 0}, "package": "colo 0.1.0"}, "capabilities": []}}
//! C: {"execute": "qmp_capabilities"}
//! S: {"return": {}}
//! C: {"execute": "query-status", "arguments": {}, "id": 7}
//! S: {"return": {"status": "running"}, "id": 7}
//! S: {"event": "RESUME", "data": {}, "timestamp": {"seconds": 1700000000, "microseconds": 12}}
//! ```
//!
//! - [`Registry`]: a process declares its commands as closures; `qmp_capabilities`,
//!   `query-commands` and `query-version` are built in.
//! - [`serve_unix`] / [`serve_stdio`]: the server, one thread per client, several clients at once;
//!   [`EventSink::emit`] broadcasts an event to every client that finished negotiation.
//! - [`QmpClient`]: a blocking client for tests and for processes that command each other (it
//!   also talks to a real QEMU).
//! - [`args`]: argument helpers that produce QEMU's error messages.
//! - [`wire`]: the byte-level parsing (a JSON stream splitter that never hangs on garbage and
//!   bounds message size) and the request dispatch, free of I/O so it can be fuzzed.
//!
//! Threads, not async: every process can use it, whatever its event loop.

pub mod args;
mod client;
mod registry;
mod server;
pub mod wire;

pub use client::{Event, QmpClient, QmpClientError};
pub use registry::{Handler, Registry};
pub use server::{EventSink, QmpServer, QmpServerError, serve_connection, serve_stdio, serve_unix};

use serde::{Deserialize, Serialize};

/// The version reported in the greeting and by `query-version`: colo's own (`major.minor.micro`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// QEMU's QMP error classes (`ErrorClass` in QEMU's schema), plus any class a peer sends that we
/// do not know.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Almost every error.
    GenericError,
    /// Unknown command, or a command sent before/after capabilities negotiation.
    CommandNotFound,
    /// The named device exists but is not active.
    DeviceNotActive,
    /// The named device (or object) does not exist.
    DeviceNotFound,
    /// The accelerator lacks a capability.
    KVMMissingCap,
    /// A class name not in this list (from a peer).
    Other(String),
}

impl ErrorClass {
    /// The name on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
            ErrorClass::Other(s) => s,
        }
    }

    /// Parses a wire name; unknown names become [`ErrorClass::Other`].
    pub fn from_name(name: &str) -> Self {
        match name {
            "GenericError" => ErrorClass::GenericError,
            "CommandNotFound" => ErrorClass::CommandNotFound,
            "DeviceNotActive" => ErrorClass::DeviceNotActive,
            "DeviceNotFound" => ErrorClass::DeviceNotFound,
            "KVMMissingCap" => ErrorClass::KVMMissingCap,
            other => ErrorClass::Other(other.to_string()),
        }
    }
}

impl std::fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorClass {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorClass {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(ErrorClass::from_name(&s))
    }
}

/// A QMP error: what a command handler returns on failure, and what `{"error": …}` carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{class}: {desc}")]
pub struct QmpError {
    /// The error class (almost always [`ErrorClass::GenericError`]).
    pub class: ErrorClass,
    /// Human-readable description.
    pub desc: String,
}

impl QmpError {
    /// An error of any class.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        Self {
            class,
            desc: desc.into(),
        }
    }

    /// A `GenericError` (QEMU's `error_setg`).
    pub fn generic(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::GenericError, desc)
    }

    /// A `CommandNotFound` error.
    pub fn command_not_found(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::CommandNotFound, desc)
    }

    /// A `DeviceNotFound` error, e.g. `Device 'x' not found`.
    pub fn device_not_found(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::DeviceNotFound, desc)
    }

    /// A `DeviceNotActive` error.
    pub fn device_not_active(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::DeviceNotActive, desc)
    }

    /// The `{"class": …, "desc": …}` object of an error response.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "class": self.class.as_str(), "desc": self.desc })
    }
}
