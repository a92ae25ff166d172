//! The protocols every colo process shares.
//!
//! - [`frame`]: the packet framing of QEMU's socket chardevs (filter-mirror, filter-redirector,
//!   colo-compare), byte for byte, so our processes interoperate with QEMU's.
//!
//! This crate does no I/O policy of its own: it encodes, decodes and parses; the processes
//! decide what to do with the results.

pub mod frame;
