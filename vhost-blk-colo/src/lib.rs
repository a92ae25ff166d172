//! vhost-blk-colo: the disk side of COLO as a vhost-user-blk backend process.
//!
//! - [`block`]: a small block graph (`file`, `mem`, `overlay`, `qcow2`, `nbd`, `quorum`,
//!   `replication`).
//! - [`nbd`]: our own NBD server and pipelining client on tokio.
//! - [`vhost_user`]: the vhost-user-blk device (dirty logging, EVENT_IDX, multiqueue) and the
//!   serve-again loop.
//! - [`control`]: the process's graph and its QMP commands (QEMU's names, plus the
//!   `colo-blk-*` commands of the checkpoint engine); [`drive`]: QEMU-style option lists.
//! - [`testing`]: a vhost-user-blk test frontend on memfd shared memory (tests, benchmarks).
//!
//! What it does not do: qcow2 beyond plain overlays (no header backing files, compression,
//! snapshots, encryption), inflight-fd tracking, structured NBD replies, TLS.

pub mod block;
pub mod control;
pub mod drive;
pub mod nbd;
pub mod testing;
pub mod vhost_user;

/// How long threads poll before they sleep where a short wait is likely (a pool worker for
/// its next request, a primary waiting for the NBD reply, a secondary connection for the next
/// request after a lone small write): 50 µs, or `COLO_BLK_SPIN_US` from the environment (0
/// turns polling off, e.g. on a host short of CPU). Read once.
pub fn spin_budget() -> std::time::Duration {
    static SPIN: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();
    *SPIN.get_or_init(|| {
        let us = std::env::var("COLO_BLK_SPIN_US")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(50)
            .min(10_000);
        std::time::Duration::from_micros(us)
    })
}
