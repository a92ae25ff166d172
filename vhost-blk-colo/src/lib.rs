//! vhost-blk-colo: the disk side of COLO as a vhost-user-blk backend process.
//!
//! - [`block`]: a small block graph (`file`, `mem`, `overlay`, `nbd`, `quorum`, `replication`).
//! - [`nbd`]: our own NBD server and pipelining client on tokio.
//!
//! What it does not do: qcow2 images, structured NBD replies, TLS.

pub mod block;
pub mod control;
pub mod drive;
pub mod nbd;
pub mod testing;
pub mod vhost_user;
