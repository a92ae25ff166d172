//! vhost-net-colo: a vhost-user-net backend whose packet path runs through QEMU-compatible COLO
//! network filters, in front of a netdev.
//!
//! - [`filter`]: the filter chain (`filter-mirror`, `filter-redirector`, `filter-rewriter`,
//!   `filter-dump`) with QEMU's direction, ordering and insertion semantics, as pure logic.
//! - [`netdev`]: `tap` (with `script=`/`downscript=`, vnet headers, `queues=N` multi-queue),
//!   `stream` and `dgram` sockets in QEMU's framing, `user` (smoltcp, static addressing or DHCP,
//!   `hostfwd=tcp:...`).
//! - [`path`]: guest ⇄ chain ⇄ netdev, one lock so run-time filter edits never drop or reorder
//!   frames outside the removed filter; link state (`set_link`).
//! - [`chardevs`]: `-chardev socket` objects as filter `outdev`/`indev`.
//! - [`backend`]: the vhost-user-net device (`queues=N` pairs, MRG_RXBUF, EVENT_IDX, checksum and
//!   TSO offloads, MAC, link status and queue pairs in config space, dirty logging) and the
//!   serve loop that listens again after a frontend disconnects; [`shim`] relays the vhost-user
//!   socket and handles what the `vhost` crate does not (early enables, `SEND_RARP`, unknown
//!   requests, the backend-request channel).
//! - [`offload`]: checksum completion and TCP segmentation in software, wherever a frame must be
//!   plain (the filter chain, netdevs without vnet headers, guests without the offload).
//! - [`announce`]: the RARP announce after a migration (`SEND_RARP`, QMP `announce-self`).
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
pub mod handoff;
pub mod netdev;
pub mod offload;
pub mod path;
pub mod sched;
pub mod shim;
pub mod testing;
pub mod vnet;
