//! NBD (Network Block Device) protocol: a server and a pipelining client on tokio.
//!
//! Fixed-newstyle negotiation with `NBD_OPT_GO`, `NBD_OPT_INFO`, `NBD_OPT_EXPORT_NAME`,
//! `NBD_OPT_LIST` and `NBD_OPT_ABORT`; simple replies only (structured replies, meta contexts
//! and extended headers are answered with `NBD_REP_ERR_UNSUP`, which QEMU accepts);
//! commands READ, WRITE, FLUSH, TRIM, WRITE_ZEROES and DISC with the FUA flag. Many requests
//! may be in flight on one connection; replies are matched by cookie. Sockets use
//! `TCP_NODELAY` and buffered writes that are flushed when no more replies are queued.
//!
//! Protocol reference: the NBD protocol document (`doc/proto.md` of the NBD project).

pub mod client;
pub mod proto;
pub mod server;
pub mod sock;

pub use client::{NbdClient, NbdClientError, ReplyWaiter};
pub use server::{Export, ExportTable, NbdServer, NbdServerError};
