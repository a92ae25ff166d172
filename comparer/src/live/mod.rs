//! Live mode: the comparison engine driven over sockets, like QEMU's `colo-compare` object.
//!
//! ```text
//!  primary_in ──reader thread──┐                          ┌── outdev (released primary frames)
//!                              ├─ channel ─▶ engine loop ─┤
//!  secondary_in ─reader thread─┘      ▲     (owns Engine,  ├── QMP event COLO_COMPARE_CHECKPOINT_REQUEST
//!  notify_dev ───reader thread────────┘      deadlines)    └── notify_dev "DO_CHECKPOINT"
//!  QMP (query-colo-compare, colo-checkpoint-done, quit) ───▶ channel
//! ```
//!
//! - One reader thread per input endpoint decodes records (QEMU framing, [`colo_proto::frame`])
//!   and hands them to the engine loop in batches. When a peer goes away the reader accepts the
//!   next one (listening endpoint) or reconnects (connecting endpoint).
//! - The engine loop owns the [`crate::engine::Engine`], calls `on_tick` at its deadlines, and
//!   writes released frames to `outdev` itself (one thread hand-off less on the latency path).
//!   While `outdev` has no peer, released frames wait in order (bounded by back-pressure on the
//!   inputs); a frame whose write failed is sent again to the next peer, never dropped.
//! - Checkpoint requests: the QMP event `COLO_COMPARE_CHECKPOINT_REQUEST`
//!   (`{"id", "reason", "detail", "data"}`: `reason` is `timeout`, `payload_differs`,
//!   `tcp_control_differs` or `queue_full`; `detail` a sentence; `data` the structured reason) and, with `notify_dev`, QEMU's Xen-style string
//!   `DO_CHECKPOINT`. The engine coalesces requests (one per pending checkpoint, repeated while
//!   it stays pending for another `compare_timeout`); each is counted by reason in
//!   `query-colo-compare`.
//! - Checkpoint done (flush: release held primary frames, drop secondary ones): the QMP command
//!   `colo-checkpoint-done` or the notify_dev string `COLO_CHECKPOINT`. The notify_dev handshake
//!   `COLO_USERSPACE_PROXY_INIT` is answered with `COLO_COMPARE_GET_XEN_INIT`, as QEMU does.
//!
//! QMP commands (besides the built-ins): `query-colo-compare` (counters, see
//! [`runtime::LiveStats`] plus the engine's stats), `colo-checkpoint-done`, `quit`.

mod adapter;
pub mod config;
pub mod notify;
pub mod runtime;

pub use config::{LiveArgs, LiveConfig, QmpAddr};
pub use runtime::{LiveHandle, start};

/// Name of the QMP event sent when the comparer needs a checkpoint.
pub const CHECKPOINT_EVENT: &str = "COLO_COMPARE_CHECKPOINT_REQUEST";

/// Errors of the live comparer.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// `--help` was asked for: the text to print (exit status 0).
    #[error("{0}")]
    Help(String),
    /// The command line could not be parsed (clap's message, with usage).
    #[error("{0}")]
    Usage(String),
    /// The options are inconsistent or a value is invalid.
    #[error("comparer options: {0}")]
    Config(String),
    /// A socket spec is invalid or an endpoint could not be opened.
    #[error(transparent)]
    Chardev(#[from] colo_proto::chardev::ChardevError),
    /// The QMP socket could not be served.
    #[error("QMP socket: {0}")]
    Qmp(String),
    /// A thread could not be started.
    #[error("starting thread {name}: {source}")]
    Thread {
        name: &'static str,
        source: std::io::Error,
    },
}

/// Runs the live comparer from a command line (without the program name) until `quit` or
/// until the process is killed.
pub fn run_cli<I: IntoIterator<Item = String>>(args: I) -> Result<(), LiveError> {
    let config = LiveConfig::from_cli(args)?;
    let handle = start(config)?;
    handle.wait();
    Ok(())
}
