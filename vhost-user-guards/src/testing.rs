//! Helpers for the backends' tests and fuzz targets: memfds, guest regions over them, and a
//! minimal frontend session. They panic on failure, as test set-up does.
#![allow(clippy::unwrap_used)]

use std::{
    fs::File,
    io::{Read, Write},
    os::{
        fd::{FromRawFd, OwnedFd},
        unix::net::UnixStream,
    },
    path::Path,
    time::{Duration, Instant},
};

use vm_memory::{
    FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryMmap, GuestRegionMmap, MmapRegion, bitmap::NewBitmap,
};

/// A `VHOST_USER_SET_LOG_BASE` message (header with the version flag, then `mmap_size` and
/// `mmap_offset`); its descriptor goes with it separately.
pub fn set_log_base_msg(size: u64, offset: u64) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&crate::relay::SET_LOG_BASE.to_le_bytes());
    m.extend_from_slice(&1u32.to_le_bytes());
    m.extend_from_slice(&16u32.to_le_bytes());
    m.extend_from_slice(&size.to_le_bytes());
    m.extend_from_slice(&offset.to_le_bytes());
    m
}

/// A memfd of `len` bytes.
pub fn memfd(len: u64) -> File {
    // SAFETY: memfd_create with a valid C string; checked below.
    let raw = unsafe { libc::memfd_create(c"vhost-user-guards".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(
        raw >= 0,
        "memfd_create: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh descriptor we own.
    let f = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
    f.set_len(len).unwrap();
    f
}

/// A guest region of `len` bytes at `gpa`, mapped over a fresh memfd of `file_len` bytes
/// (shorter than the region for the SIGBUS case).
pub fn file_region<B: NewBitmap>(gpa: u64, len: usize, file_len: u64) -> GuestRegionMmap<B> {
    let m = MmapRegion::<B>::from_file(FileOffset::new(memfd(file_len), 0), len).unwrap();
    GuestRegionMmap::new(m, GuestAddress(gpa)).unwrap()
}

/// How many of this process's descriptors are eventfds.
pub fn eventfds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter(|p| p.to_string_lossy().contains("eventfd"))
        .count()
}

/// Connects to a backend's vhost-user socket, retrying for up to 30 s while it starts.
pub fn connect(sock: &Path) -> UnixStream {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        match UnixStream::connect(sock) {
            Ok(s) => return s,
            Err(e) => {
                assert!(
                    Instant::now() < end,
                    "connecting to {}: {e}",
                    sock.display()
                );
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

/// One short frontend session: GET_FEATURES and its answer, then the frontend leaves.
pub fn get_features_session(sock: &Path) {
    const GET_FEATURES: u32 = 1;
    const VERSION_1: u32 = 1;
    let mut s = connect(sock);
    let mut hdr = Vec::new();
    hdr.extend_from_slice(&GET_FEATURES.to_le_bytes());
    hdr.extend_from_slice(&VERSION_1.to_le_bytes());
    hdr.extend_from_slice(&0u32.to_le_bytes()); // no body
    s.write_all(&hdr).unwrap();
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(reply[0], 1, "reply to GET_FEATURES");
}

/// Checks a backend's `update_memory` (or anything that installs a table the same way) against
/// a table with a region longer than its memfd: refused naming the region, the region taken
/// out; and a table whose regions all fit: taken as is.
pub fn check_short_regions_refused<B>(
    update_memory: impl Fn(GuestMemoryAtomic<GuestMemoryMmap<B>>) -> std::io::Result<()>,
) where
    B: NewBitmap + Clone + 'static,
{
    let good = file_region::<B>(0, 0x10000, 0x10000);
    let short = file_region::<B>(0x10_0000, 0x20000, 0x10000);
    let gm = GuestMemoryAtomic::new(GuestMemoryMmap::from_regions(vec![good, short]).unwrap());
    let err = update_memory(gm.clone()).unwrap_err();
    assert!(err.to_string().contains("0x100000"), "{err}");
    let now = gm.memory();
    assert_eq!(now.num_regions(), 1, "the short region is still mapped");
    assert!(now.find_region(GuestAddress(0)).is_some());

    let ok = GuestMemoryAtomic::new(
        GuestMemoryMmap::from_regions(vec![
            file_region::<B>(0, 0x10000, 0x10000),
            file_region::<B>(0x10_0000, 0x10000, 0x20000),
        ])
        .unwrap(),
    );
    update_memory(ok.clone()).unwrap();
    assert_eq!(ok.memory().num_regions(), 2);
}

/// Checks that frontends connecting and leaving again and again cost a backend serving `sock`
/// (in this process) no eventfds: one session to settle what is made once, then `sessions`
/// more; `stop_server` ends the serving loop and waits for it, so the last session's teardown
/// is counted. Without the leak fix a backend leaks one or more per session.
pub fn check_sessions_leak_no_eventfds(sock: &Path, sessions: usize, stop_server: impl FnOnce()) {
    get_features_session(sock);
    let before = eventfds();
    for _ in 0..sessions {
        get_features_session(sock);
    }
    stop_server();
    let after = eventfds();
    assert!(
        after < before + sessions,
        "{} eventfds left open by {sessions} sessions ({before} before, {after} after)",
        after.saturating_sub(before)
    );
}
