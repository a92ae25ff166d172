//! vhost-user-backend 0.24 registers the consumer of each worker thread's exit event with
//! `into_raw_fd()` and never closes it (`VringEpollHandler::new`, event_loop.rs): one
//! descriptor per queue thread per frontend connection, so a backend whose frontend reconnects
//! runs out of descriptors (the `vhost_user_msgs` fuzz targets hit EMFILE after ~10 000
//! connections). Once the daemon is gone the backend closes that number, but only while it
//! still refers to the backend's own eventfd, so a library that closes it itself, and a number
//! reused since, are left alone.

use std::os::fd::{AsRawFd, RawFd};

/// Closes `leaked` if it is another descriptor of the same open file as `ours`
/// (`kcmp(KCMP_FILE)`), and not `ours` itself. Call it only once nothing uses `leaked` (the
/// daemon that held it is dropped).
pub fn close_leaked_fd(leaked: RawFd, ours: &impl AsRawFd) {
    if leaked != ours.as_raw_fd() && same_file(leaked, ours.as_raw_fd()) {
        // SAFETY: `leaked` is the library's forgotten copy of our file (checked above), and the
        // caller guarantees nothing uses that number any more.
        unsafe { libc::close(leaked) };
    }
}

/// Whether two descriptor numbers of this process refer to the same open file.
fn same_file(a: RawFd, b: RawFd) -> bool {
    const KCMP_FILE: libc::c_int = 0;
    // SAFETY: kcmp only compares two descriptor numbers of this process.
    unsafe {
        let pid = libc::getpid();
        libc::syscall(libc::SYS_kcmp, pid, pid, KCMP_FILE, a, b) == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::fd::{AsRawFd, IntoRawFd};

    use super::*;

    fn is_open(fd: RawFd) -> bool {
        // SAFETY: F_GETFD only asks whether the number is open.
        unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
    }

    #[test]
    fn closes_a_forgotten_duplicate_only() {
        let ours = crate::testing::memfd(4096);
        let leaked = ours.try_clone().unwrap().into_raw_fd();
        let other = crate::testing::memfd(4096);
        // Another file under the number: left alone.
        close_leaked_fd(other.as_raw_fd(), &ours);
        assert!(is_open(other.as_raw_fd()));
        // Our own descriptor: left alone.
        close_leaked_fd(ours.as_raw_fd(), &ours);
        assert!(is_open(ours.as_raw_fd()));
        // The duplicate: closed.
        close_leaked_fd(leaked, &ours);
        assert!(!is_open(leaked));
        assert!(is_open(ours.as_raw_fd()));
    }
}
