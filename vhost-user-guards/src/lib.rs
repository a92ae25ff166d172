//! What vhost-blk-colo and vhost-net-colo both put around the rust-vmm vhost-user stack
//! (`vhost` 0.18, `vhost-user-backend` 0.24): checks on frontend input that stack accepts
//! unchecked, and the descriptors it leaks. Each was found by the backends' `vhost_user_msgs`
//! fuzz targets; each is a workaround to drop once the crates fix it upstream.
//!
//! - [`memory`]: memory regions longer than the file behind them (SIGBUS when touched).
//! - [`leaked_fd`]: the exit-event descriptor `vhost-user-backend` never closes.
//! - [`relay`]: a dirty log longer than its file (SIGBUS when marked), refused on the socket.
//! - [`testing`]: memfds, file-backed regions and a minimal frontend session for tests.

pub mod leaked_fd;
pub mod memory;
pub mod relay;
pub mod testing;
