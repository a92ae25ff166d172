//! A qcow2 image from arbitrary bytes: open, then a few reads, writes, a make-empty. Nothing
//! may panic or hang, and an image we opened and then changed must open again (our writes keep
//! the image valid).
#![no_main]

use std::{fs::File, io::Write, os::fd::FromRawFd, path::Path, sync::Arc};

use libfuzzer_sys::fuzz_target;
use vhost_blk_colo::block::{BlockNode, NodeRef, mem::MemNode, qcow2::Qcow2Node};

fn memfd(data: &[u8]) -> Option<File> {
    // SAFETY: memfd_create with a static NUL-terminated name; the fd is owned by the File.
    let fd = unsafe { libc::memfd_create(c"qcow2-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd is a fresh, valid file descriptor nobody else owns.
    let mut f = unsafe { File::from_raw_fd(fd) };
    f.write_all(data).ok()?;
    Some(f)
}

fuzz_target!(|data: &[u8]| {
    let Some(f) = memfd(data) else { return };
    let Ok(copy) = f.try_clone() else { return };
    let lower: NodeRef = Arc::new(MemNode::from_vec(vec![0x3c; 70_000]));
    let path = Path::new("fuzz.qcow2");
    let Ok(node) = Qcow2Node::from_file(f, path, Some(lower.clone()), false) else {
        return;
    };
    let size = node.size();
    let mut buf = vec![0u8; 8192];
    let n = size.min(8192) as usize;
    let _ = node.read_at(&mut buf[..n], 0);
    let _ = node.read_at(&mut buf[..n], size - n as u64);
    let mut wrote = Vec::new();
    for (off, len) in [
        (3000u64, 5000usize),
        (size / 2, 700),
        (size.saturating_sub(100), 100),
    ] {
        if off + len as u64 <= size && node.write_at(&vec![0xe7; len], off, false).is_ok() {
            wrote.push((off, len));
        }
    }
    for &(off, len) in &wrote {
        let mut b = vec![0u8; len];
        if node.read_at(&mut b, off).is_ok() {
            assert!(b.iter().all(|&x| x == 0xe7), "read back differs at {off}");
        }
    }
    let _ = node.write_zeroes(size / 3, 1000.min(size - size / 3), false);
    drop(node);
    let Ok(again) = copy.try_clone() else { return };
    let node = Qcow2Node::from_file(again, path, Some(lower.clone()), false)
        .expect("an image we opened and wrote must open again");
    let _ = node.make_empty();
    drop(node);
    Qcow2Node::from_file(copy, path, Some(lower), false)
        .expect("an image we emptied must open again");
});
