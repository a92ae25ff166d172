//! Socket outdevs write the records of one pass (a guest transmit pass, one netdev read)
//! together: through the real device, the records still reach the outdev sockets whole, in
//! order, byte for byte, a single frame included; and a filter added and removed while frames
//! flow takes nothing from the others.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use colo_proto::frame::{Frame, FrameReader, encode};
use serde_json::json;
use vhost_net_colo::testing::Options;

fn next(rx: &Receiver<Vec<u8>>, what: &str) -> Vec<u8> {
    rx.recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

fn filters(q: &mut common::QmpClient) -> serde_json::Value {
    q.execute("query-filters", json!({})).unwrap()
}

fn counters(v: &serde_json::Value, id: &str) -> (u64, u64) {
    let rows = v.as_array().expect("query-filters rows");
    let row = rows.iter().find(|r| r["id"] == id).expect("filter row");
    let c = &row["counters"];
    (c["sent"].as_u64().unwrap(), c["errors"].as_u64().unwrap())
}

#[test]
fn records_of_a_pass_reach_the_outdev_sockets_whole_and_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (mirror, compare) = (dir.path().join("m.sock"), dir.path().join("c.sock"));
    let m_dev = format!("socket,id=mirror0,path={},server=on", mirror.display());
    let c_dev = format!("socket,id=compare0,path={},server=on", compare.display());
    let (b, wire) = common::spawn_with_wire(
        dir.path(),
        "",
        &[
            "--chardev",
            &m_dev,
            "--chardev",
            &c_dev,
            "--object",
            "filter-mirror,id=m0,netdev=s0,queue=tx,outdev=mirror0",
            "--object",
            "filter-redirector,id=r1,netdev=s0,queue=rx,outdev=compare0",
        ],
        true,
    );
    let mirrored = common::records(common::connect_chardev(&mirror));
    let compared = common::records(common::connect_chardev(&compare));
    let mut qmp = b.qmp();
    let mut fe = b.frontend(&Options::default());
    let sizes = [60, 1514, 65536, 60, 9014, 128, 65536, 61, 60, 1000];
    let frames: Vec<Vec<u8>> = (0..40)
        .map(|i| common::numbered_frame(i, sizes[i % sizes.len()]))
        .collect();

    // Guest -> netdev: one transmit pass of 40 frames, small and 64 KiB mixed, all taken by
    // the redirector.
    fe.send_batch(&frames).unwrap();
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(&next(&compared, "record at compare0"), f, "guest frame {i}");
    }
    // One frame alone still leaves at once (the pass ends with it).
    let one = common::numbered_frame(77, 70);
    fe.send(&one).unwrap();
    assert_eq!(next(&compared, "single frame at compare0"), one);

    // Netdev -> guest: the frames come in one write, so the netdev reads several at a time.
    let mut bytes = Vec::new();
    for f in &frames {
        encode(&Frame::ethernet(f.clone()), false, &mut bytes).unwrap();
    }
    (&wire).write_all(&bytes).unwrap();
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(&next(&mirrored, "record at mirror0"), f, "netdev frame {i}");
    }
    let one = common::numbered_frame(78, 80);
    encode(&Frame::ethernet(one.clone()), false, &mut bytes).unwrap();
    (&wire).write_all(&bytes[bytes.len() - 84..]).unwrap();
    assert_eq!(next(&mirrored, "single frame at mirror0"), one);

    let f = filters(&mut qmp);
    assert_eq!(counters(&f, "r1"), (41, 0), "{f}");
    assert_eq!(counters(&f, "m0"), (41, 0), "{f}");
    // The guest got what the mirror saw, in order (the 64 KiB frames do not fit its buffers
    // without merged buffers being enough; whatever arrives must be in order).
    let mut got = Vec::new();
    while let Some((g, _)) = fe.recv(Duration::from_millis(500)) {
        got.push(g);
    }
    let mut want = frames.iter().chain(std::iter::once(&one));
    for g in &got {
        assert!(want.any(|w| w == g), "guest frame out of order or altered");
    }
}

const FRAMES: u32 = 20_000;

/// Frame `i` of the stream: its number at bytes 14..18, a pattern after.
fn seq_frame(i: u32) -> Vec<u8> {
    let mut f = common::numbered_frame(i as usize, 100);
    f[14..18].copy_from_slice(&i.to_be_bytes());
    f
}

fn seq_of(f: &[u8]) -> u32 {
    let n = u32::from_be_bytes(f[14..18].try_into().unwrap());
    assert_eq!(f, seq_frame(n), "record {n} altered");
    n
}

#[test]
fn a_filter_added_and_removed_during_traffic_takes_nothing_from_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let (mirror, extra) = (dir.path().join("m.sock"), dir.path().join("x.sock"));
    let m_dev = format!("socket,id=mirror0,path={},server=on", mirror.display());
    let x_dev = format!("socket,id=extra0,path={},server=on", extra.display());
    let (b, wire) = common::spawn_with_wire(
        dir.path(),
        "",
        &[
            "--chardev",
            &m_dev,
            "--chardev",
            &x_dev,
            "--object",
            "filter-mirror,id=m0,netdev=s0,queue=tx,outdev=mirror0",
        ],
        true,
    );
    let mirrored = common::records(common::connect_chardev(&mirror));
    let mut fe = b.frontend(&Options {
        queue_size: 1024,
        ..Options::default()
    });
    let done = Arc::new(AtomicBool::new(false));

    // The removable filter's peer: one connection per instance of it (each instance takes the
    // next waiting peer); within one, records are whole and consecutive.
    let seen_extra = Arc::new(Mutex::new(0u64));
    let (d, seen) = (done.clone(), seen_extra.clone());
    let extra_reader = std::thread::spawn(move || {
        while !d.load(Ordering::Relaxed) {
            let Ok(s) = UnixStream::connect(&extra) else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let mut r = FrameReader::new(s, false);
            let mut last: Option<u32> = None;
            while let Ok(Some(f)) = r.read_frame() {
                let n = seq_of(&f.payload);
                if let Some(l) = last {
                    assert_eq!(n, l + 1, "extra0: records of one instance consecutive");
                }
                last = Some(n);
                *seen.lock().unwrap() += 1;
            }
        }
    });

    // Add and remove the extra mirror (at the head, so it sees frames first) while the frames
    // flow.
    let (d, mut qmp) = (done.clone(), b.qmp());
    let swapper = std::thread::spawn(move || {
        let mut swaps = 0u32;
        while !d.load(Ordering::Relaxed) {
            qmp.execute(
                "object-add",
                json!({"qom-type":"filter-mirror","id":"m1","netdev":"s0","queue":"tx",
                       "outdev":"extra0","position":"head"}),
            )
            .unwrap();
            std::thread::sleep(Duration::from_millis(3));
            qmp.execute("object-del", json!({"id":"m1"})).unwrap();
            swaps += 1;
            std::thread::sleep(Duration::from_millis(2));
        }
        swaps
    });

    let mut w = wire.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut buf = Vec::new();
        for i in 0..FRAMES {
            encode(&Frame::ethernet(seq_frame(i)), false, &mut buf).unwrap();
            if buf.len() > 8 * 1024 || i + 1 == FRAMES {
                w.write_all(&buf).unwrap();
                buf.clear();
            }
        }
    });

    // The guest gets every frame, in order; so does the mirror that stays.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut want = 0u32;
    while want < FRAMES {
        assert!(Instant::now() < deadline, "guest got {want} of {FRAMES}");
        if let Some((g, _)) = fe.try_recv() {
            assert_eq!(seq_of(&g), want, "guest frame");
            want += 1;
        }
    }
    for i in 0..FRAMES {
        assert_eq!(seq_of(&next(&mirrored, "mirror0")), i, "mirror0 record");
    }
    done.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let swaps = swapper.join().unwrap();
    extra_reader.join().unwrap();
    assert!(
        swaps > 2,
        "the filter was swapped during the traffic ({swaps})"
    );
    eprintln!(
        "{swaps} swaps, {} records at the removable mirror",
        *seen_extra.lock().unwrap()
    );
    let f = filters(&mut b.qmp());
    assert_eq!(counters(&f, "m0"), (u64::from(FRAMES), 0), "{f}");
}

/// A `dgram` netdev hands the datagrams it finds waiting over as one batch: the mirror's
/// records and the guest's frames are still every datagram, in order, byte for byte.
#[test]
fn datagrams_read_together_are_mirrored_in_order() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let (local, remote) = (dir.path().join("nd.sock"), dir.path().join("peer.sock"));
    let mirror = dir.path().join("m.sock");
    let peer = UnixDatagram::bind(&remote).unwrap();
    let netdev = format!(
        "dgram,id=d0,local.type=unix,local.path={},remote.type=unix,remote.path={}",
        local.display(),
        remote.display()
    );
    let m_dev = format!("socket,id=mirror0,path={},server=on", mirror.display());
    let b = common::spawn_backend(
        dir.path(),
        &netdev,
        &[
            "--chardev",
            &m_dev,
            "--object",
            "filter-mirror,id=m0,netdev=d0,queue=tx,outdev=mirror0",
        ],
        true,
        None,
    );
    let mirrored = common::records(common::connect_chardev(&mirror));
    let mut fe = b.frontend(&Options {
        queue_size: 1024,
        ..Options::default()
    });
    common::wait_for(Duration::from_secs(10), "dgram netdev socket", || {
        local.exists()
    });
    let sizes = [60, 1514, 300, 9014, 61];
    let frames: Vec<Vec<u8>> = (0..300)
        .map(|i| common::numbered_frame(i, sizes[i % sizes.len()]))
        .collect();
    for f in &frames {
        peer.send_to(f, &local).unwrap();
    }
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(&next(&mirrored, "record at mirror0"), f, "datagram {i}");
        let (g, _) = fe
            .recv(Duration::from_secs(10))
            .expect("frame to the guest");
        assert_eq!(&g, f, "guest frame {i}");
    }
    let f = filters(&mut b.qmp());
    assert_eq!(counters(&f, "m0"), (300, 0), "{f}");
}
