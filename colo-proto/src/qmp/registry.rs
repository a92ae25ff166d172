//! The command table of one QMP server.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Map, Value, json};

use super::server::EventSink;
use super::{QmpError, VERSION};

/// A command handler: gets the `arguments` object (empty when absent), returns the `return`
/// value (`Value::Null` is sent as `{}`, like QEMU's commands without a result) or an error.
pub type Handler = dyn Fn(&Map<String, Value>) -> Result<Value, QmpError> + Send + Sync + 'static;

/// Names of the commands every server has; [`Registry::add`] refuses to replace them.
pub(crate) const BUILTIN: [&str; 3] = ["qmp_capabilities", "query-commands", "query-version"];

/// The commands a process offers, and the [`EventSink`] its events go through.
///
/// Cheap to clone (handlers are shared); the server keeps its own clone.
#[derive(Clone)]
pub struct Registry {
    commands: BTreeMap<String, Arc<Handler>>,
    package: String,
    events: EventSink,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("commands", &self.commands.keys().collect::<Vec<_>>())
            .field("package", &self.package)
            .finish()
    }
}

impl Registry {
    /// A registry with only the built-in commands; the version's `package` is `colo <version>`.
    pub fn new() -> Self {
        Self {
            commands: BTreeMap::new(),
            package: format!("colo {VERSION}"),
            events: EventSink::new(),
        }
    }

    /// Sets the `package` string of the greeting and `query-version` (e.g. `"colo comparer"`).
    pub fn with_package(mut self, package: impl Into<String>) -> Self {
        self.package = package.into();
        self
    }

    /// Declares (or replaces) a command. Built-in names are ignored with a warning.
    pub fn add<F>(&mut self, name: &str, handler: F) -> &mut Self
    where
        F: Fn(&Map<String, Value>) -> Result<Value, QmpError> + Send + Sync + 'static,
    {
        if BUILTIN.contains(&name) {
            tracing::warn!(command = name, "QMP: built-in command cannot be replaced");
            return self;
        }
        self.commands.insert(name.to_string(), Arc::new(handler));
        self
    }

    /// The sink through which events reach this registry's clients. Handlers may capture a
    /// clone to emit events; the server uses the same sink ([`super::QmpServer::events`]).
    pub fn events(&self) -> EventSink {
        self.events.clone()
    }

    /// Whether a command is known (built-ins included).
    pub fn contains(&self, name: &str) -> bool {
        BUILTIN.contains(&name) || self.commands.contains_key(name)
    }

    /// All command names, built-ins included, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = BUILTIN.iter().map(|s| s.to_string()).collect();
        v.extend(self.commands.keys().cloned());
        v.sort();
        v
    }

    /// The `version` object of the greeting and of `query-version`.
    pub fn version_json(&self) -> Value {
        let mut parts = VERSION.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
        let major = parts.next().unwrap_or(0);
        let minor = parts.next().unwrap_or(0);
        let micro = parts.next().unwrap_or(0);
        json!({
            "qemu": {"major": major, "minor": minor, "micro": micro},
            "package": self.package,
        })
    }

    /// The greeting object sent when a client connects.
    pub fn greeting(&self) -> Value {
        json!({"QMP": {"version": self.version_json(), "capabilities": []}})
    }

    /// Runs a non-built-in command (`None` when unknown). A panicking handler becomes a
    /// `GenericError` instead of killing the client's thread.
    pub(crate) fn call(
        &self,
        name: &str,
        args: &Map<String, Value>,
    ) -> Option<Result<Value, QmpError>> {
        let handler = self.commands.get(name)?;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler(args)));
        Some(match result {
            Ok(r) => r,
            Err(_) => {
                tracing::error!(command = name, "QMP: command handler panicked");
                Err(QmpError::generic(format!(
                    "Internal error while executing '{name}'"
                )))
            }
        })
    }
}
