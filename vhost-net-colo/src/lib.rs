//! vhost-net-colo: a vhost-user-net backend whose packet path runs through QEMU-compatible COLO
//! network filters, in front of a netdev.
//!
//! - [`filter`]: the filter chain (`filter-mirror`, `filter-redirector`, `filter-rewriter`,
//!   `filter-dump`) with QEMU's direction, ordering and insertion semantics, as pure logic.
//! - [`netdev`]: `tap` (with `script=`/`downscript=`), `stream` and `dgram` sockets in QEMU's
//!   framing, `user` (smoltcp, static addressing, `hostfwd=tcp:...`).
//! - [`path`]: guest ⇄ chain ⇄ netdev, one lock so run-time filter edits never drop or reorder
//!   frames outside the removed filter.
//! - [`chardevs`]: `-chardev socket` objects as filter `outdev`/`indev`.
//! - [`backend`]: the vhost-user-net device (one queue pair, MRG_RXBUF, EVENT_IDX, MAC and link
//!   status in config space, dirty logging; no checksum/TSO offloads offered) and the serve loop
//!   that listens again after a frontend disconnects; [`shim`] relays the vhost-user socket.
//! - [`app`]: the process assembled from QEMU-like options, and its QMP commands, including the
//!   COLO hooks for the checkpoint engine: `colo-net-checkpoint` (every filter's checkpoint
//!   event: rewriter offsets to 0) and `colo-net-failover` (filters switched off except the
//!   rewriter, which keeps translating the connections it tracks).
//! - [`vnet`]: the virtio-net header at the filters' socket edges.
//! - [`testing`]: a vhost-user-net frontend on memfd memory for tests and benchmarks.
//!
//! What it does not do: compare packets (that is the `comparer` crate) or checkpoint guests.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod announce;
pub mod app;
pub mod backend;
pub mod chardevs;
pub mod filter;
pub mod netdev;
pub mod offload;
pub mod path;
pub mod shim;
pub mod testing;
pub mod vnet;
