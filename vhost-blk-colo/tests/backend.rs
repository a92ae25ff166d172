//! The vhost-user-blk backend through a real vhost-user socket, driven by the test frontend
//! with memfd shared memory and split virtqueues.

#![allow(clippy::unwrap_used)]

use std::{
    path::{Path, PathBuf},
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use vhost_blk_colo::{
    block::{BlockNode, file::FileNode},
    testing::{Data, FrontendOptions, TestFrontend},
    vhost_user::{
        self, BlkConfig, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VhostUserBlk,
    },
};

fn start_backend(img: &Path, sock: &Path, cfg: BlkConfig) -> Arc<VhostUserBlk> {
    let node: Arc<dyn BlockNode> = Arc::new(FileNode::open(img, cfg.read_only, false).unwrap());
    let dev = Arc::new(VhostUserBlk::new(node, cfg));
    let d = dev.clone();
    let s: PathBuf = sock.to_owned();
    std::thread::spawn(move || {
        let stop = AtomicBool::new(false);
        let _ = vhost_user::serve(&s, d, &stop);
    });
    dev
}

fn opts(queues: usize, event_idx: bool) -> FrontendOptions {
    FrontendOptions {
        num_queues: queues,
        event_idx,
        ..FrontendOptions::default()
    }
}

#[test]
fn reads_writes_flush_id_discard_zeroes_over_two_queues_and_serves_again_after_disconnect() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    std::fs::write(&img, vec![0x33u8; 16 << 20]).unwrap();
    let sock = dir.path().join("blk.sock");
    let cfg = BlkConfig {
        num_queues: 2,
        serial: "colo-disk0".into(),
        ..BlkConfig::default()
    };
    let dev = start_backend(&img, &sock, cfg);

    let mut fe = TestFrontend::connect(&sock, &opts(2, true)).unwrap();
    assert_ne!(fe.features() & (1 << 29), 0, "EVENT_IDX negotiated");
    let config = fe.config(60).unwrap();
    assert_eq!(
        u64::from_le_bytes(config[0..8].try_into().unwrap()),
        (16 << 20) / 512
    );
    assert_eq!(
        u32::from_le_bytes(config[12..16].try_into().unwrap()),
        vhost_user::SEG_MAX
    );
    assert_eq!(u32::from_le_bytes(config[20..24].try_into().unwrap()), 512);
    assert_eq!(u16::from_le_bytes(config[34..36].try_into().unwrap()), 2);
    assert!(
        u32::from_le_bytes(config[36..40].try_into().unwrap()) > 0,
        "max_discard_sectors"
    );

    // Write on queue 0, read back on queue 1.
    let pattern: Vec<u8> = (0..65536u32).map(|i| (i * 7 + 3) as u8).collect();
    assert_eq!(fe.write(0, 8, &pattern).unwrap(), VIRTIO_BLK_S_OK);
    let (st, back) = fe.read(1, 8, 65536).unwrap();
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(back, pattern);
    assert_eq!(fe.flush(0).unwrap(), VIRTIO_BLK_S_OK);
    let file = std::fs::read(&img).unwrap();
    assert_eq!(&file[4096..4096 + 65536], &pattern[..]);

    let (st, id) = fe.get_id(0).unwrap();
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(&id[..10], b"colo-disk0");

    // Pipelined: 16 writes in flight on one queue.
    for i in 0..16u64 {
        fe.submit(
            0,
            vhost_user::VIRTIO_BLK_T_OUT,
            1024 + i * 8,
            Data::Out(&[i as u8 + 1; 4096]),
        )
        .unwrap();
    }
    let mut done = 0;
    while done < 16 {
        for c in fe.wait(0, Duration::from_secs(10)).unwrap() {
            assert_eq!(c.status, VIRTIO_BLK_S_OK);
            done += 1;
        }
    }
    for i in 0..16u64 {
        let (st, d) = fe.read(1, 1024 + i * 8, 4096).unwrap();
        assert_eq!(st, VIRTIO_BLK_S_OK);
        assert!(d.iter().all(|&b| b == i as u8 + 1));
    }

    // Write-zeroes and discard.
    assert_eq!(
        fe.range_op(0, vhost_user::VIRTIO_BLK_T_WRITE_ZEROES, 8, 16, 0)
            .unwrap(),
        VIRTIO_BLK_S_OK
    );
    let (_, z) = fe.read(0, 8, 8192).unwrap();
    assert!(z.iter().all(|&b| b == 0));
    assert_eq!(
        fe.range_op(0, vhost_user::VIRTIO_BLK_T_DISCARD, 2048, 8, 0)
            .unwrap(),
        VIRTIO_BLK_S_OK
    );
    // Bad requests: out of range, unknown type, discard with flags.
    assert_eq!(
        fe.write(0, (16 << 20) / 512, &[1; 512]).unwrap(),
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        fe.read(0, (16 << 20) / 512 - 1, 1024).unwrap().0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        fe.request(0, 99, 0, Data::None).unwrap().0,
        VIRTIO_BLK_S_UNSUPP
    );
    assert_eq!(
        fe.range_op(0, vhost_user::VIRTIO_BLK_T_DISCARD, 0, 8, 1)
            .unwrap(),
        VIRTIO_BLK_S_UNSUPP
    );

    // Dirty logging: the data area a read fills is marked in the shared log.
    fe.start_dirty_log().unwrap();
    let _ = fe.take_dirty_pages();
    let slot = fe
        .submit(1, vhost_user::VIRTIO_BLK_T_IN, 8 + 128, Data::In(8192))
        .unwrap();
    let c = fe.wait(1, Duration::from_secs(10)).unwrap();
    assert_eq!(c[0].status, VIRTIO_BLK_S_OK);
    let dirty = fe.take_dirty_pages();
    let page = fe.slot_data_gpa(1, slot) / 4096;
    assert!(
        dirty.contains(&page),
        "page {page} not in dirty log {dirty:?}"
    );
    assert!(dev.stats().reads.load(std::sync::atomic::Ordering::Relaxed) > 16);

    // Disconnect and serve again: the data is still there.
    drop(fe);
    let mut fe = TestFrontend::connect(&sock, &opts(1, false)).unwrap();
    let (st, back) = fe.read(0, 1024 + 15 * 8, 4096).unwrap();
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert!(back.iter().all(|&b| b == 16));
}

#[test]
fn read_only_export_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    std::fs::write(&img, vec![0x44u8; 1 << 20]).unwrap();
    let sock = dir.path().join("ro.sock");
    start_backend(
        &img,
        &sock,
        BlkConfig {
            read_only: true,
            ..BlkConfig::default()
        },
    );
    let mut fe = TestFrontend::connect(&sock, &opts(1, false)).unwrap();
    assert_ne!(fe.features() & (1 << 5), 0, "VIRTIO_BLK_F_RO offered");
    assert_eq!(fe.write(0, 0, &[1; 512]).unwrap(), VIRTIO_BLK_S_IOERR);
    let (st, d) = fe.read(0, 0, 512).unwrap();
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert!(d.iter().all(|&b| b == 0x44));
    assert!(std::fs::read(&img).unwrap().iter().all(|&b| b == 0x44));
}
