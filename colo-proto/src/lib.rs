//! The protocols every colo process shares.
//!
//! - [`frame`]: the packet framing of QEMU's socket chardevs (filter-mirror, filter-redirector,
//!   colo-compare), byte for byte, so our processes interoperate with QEMU's.
//! - [`packet`]: parsing of Ethernet frames (VLAN, ARP, IPv4, IPv6, TCP, UDP, ICMP, ICMPv6) into
//!   views and connection keys (with a direction-normalised key for the rewriter).
//! - [`chardev`]: socket endpoints spelled like QEMU's socket chardevs (`unix:`/`tcp:`,
//!   `server=on|off`, reconnect), with framed senders and receivers on top.
//! - [`qmp`]: the control protocol, QMP's wire format: a server with a command registry and
//!   events for every client (std threads), and a blocking client.
//!
//! This crate does no I/O policy of its own: it encodes, decodes and parses; the processes
//! decide what to do with the results.

pub mod chardev;
pub mod frame;
pub mod packet;
pub mod qmp;
