//! colo-compare: decides which primary output frames may leave, by comparing them with the
//! secondary's output.
//!
//! - [`engine`]: the comparison engine (pure logic, clock passed in), shared by the live mode
//!   and the offline replay.
//! - [`pcap`]: reading pcap/pcapng captures (errors name file and offset), writing pcap.
//! - [`replay`]: offline mode: two captures merged by timestamp drive the engine on a virtual
//!   clock.
//! - [`live`]: live mode over QEMU-style socket chardevs, with QMP control.
//!
//! The engine does no I/O; the live mode and the offline replay drive it.

pub mod engine;
pub mod live;
pub mod pcap;
pub mod replay;
