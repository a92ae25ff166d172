//! vhost-net-colo: a vhost-user-net backend whose packet path runs through QEMU-compatible COLO
//! network filters, in front of a netdev.
//!
//! - [`filter`]: the filter chain (`filter-mirror`, `filter-redirector`, `filter-rewriter`,
//!   `filter-dump`) with QEMU's direction, ordering and insertion semantics, as pure logic.
//! - [`vnet`]: the virtio-net header at the filters' socket edges.
//!
//! What it does not do: compare packets (that is the `comparer` crate) or checkpoint guests.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod app;
pub mod backend;
pub mod chardevs;
pub mod filter;
pub mod netdev;
pub mod path;
pub mod shim;
pub mod testing;
pub mod vnet;
