//! NBD interop with QEMU's tools in both directions: our server under qemu-io/qemu-img, and
//! our client against qemu-nbd.

#![allow(clippy::unwrap_used)]

mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use common::{ChildGuard, have_qemu_tools};
use vhost_blk_colo::{
    block::{BlockNode, file::FileNode},
    nbd::{Export, NbdClient, NbdServer},
};

/// A runtime, a test directory and `DIR/disk.raw` holding `data`.
fn setup(data: &[u8]) -> (tokio::runtime::Runtime, tempfile::TempDir, PathBuf) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    std::fs::write(&img, data).unwrap();
    (rt, dir, img)
}

fn serve_file(rt: &tokio::runtime::Runtime, path: &Path, writable: bool) -> NbdServer {
    let node: Arc<dyn BlockNode> = Arc::new(FileNode::open(path, !writable, false).unwrap());
    let table = Arc::new(RwLock::new(std::collections::BTreeMap::new()));
    table.write().unwrap().insert(
        "disk0".to_string(),
        Export {
            node,
            writable,
            description: String::new(),
        },
    );
    NbdServer::start(
        rt.handle(),
        "127.0.0.1:0".parse::<SocketAddr>().unwrap(),
        table,
    )
    .unwrap()
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn qemu_io_writes_and_reads_through_our_server() {
    if !have_qemu_tools(&["qemu-io"]) {
        return;
    }
    let (rt, _dir, img) = setup(&vec![0x5au8; 4 << 20]);
    let srv = serve_file(&rt, &img, true);
    let url = format!("nbd://127.0.0.1:{}/disk0", srv.local_addr().port());
    let (ok, out) = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        &url,
        "-c",
        "write -P 0xab 0 64k",
        "-c",
        "read -P 0xab 0 64k",
        "-c",
        "aio_write -P 0xcd 1M 128k",
        "-c",
        "aio_write -P 0xce 2M 128k",
        "-c",
        "aio_flush",
        "-c",
        "read -P 0xcd 1M 128k",
        "-c",
        "read -P 0xce 2M 128k",
        "-c",
        "write -z 3M 64k",
        "-c",
        "read -P 0 3M 64k",
        "-c",
        "discard 3M 64k",
        "-c",
        "write -P 0x11 -f 4032k 64k",
        "-c",
        "flush",
    ]));
    assert!(ok, "qemu-io failed:\n{out}");
    assert!(!out.contains("verification failed"), "{out}");
    let data = std::fs::read(&img).unwrap();
    assert!(data[..64 << 10].iter().all(|&b| b == 0xab));
    assert!(data[64 << 10..1 << 20].iter().all(|&b| b == 0x5a));
    assert!(
        data[1 << 20..(1 << 20) + (128 << 10)]
            .iter()
            .all(|&b| b == 0xcd)
    );
    assert!(
        data[2 << 20..(2 << 20) + (128 << 10)]
            .iter()
            .all(|&b| b == 0xce)
    );
    assert!(data[(4032 << 10)..].iter().all(|&b| b == 0x11));
    // A write past the end is refused with an error, not a hang or crash.
    let (ok, out) =
        run(Command::new("qemu-io").args(["-f", "raw", &url, "-c", "write -P 1 4M 4k"]));
    assert!(
        !ok || out.contains("error") || out.contains("Error") || out.contains("failed"),
        "{out}"
    );
    srv.stop();
}

#[test]
fn qemu_img_compare_convert_and_list_against_our_server() {
    if !have_qemu_tools(&["qemu-img", "qemu-nbd"]) {
        return;
    }
    let content: Vec<u8> = (0..(2u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let (rt, dir, img) = setup(&content);
    let srv = serve_file(&rt, &img, false);
    let port = srv.local_addr().port();
    let url = format!("nbd://127.0.0.1:{port}/disk0");
    let (ok, out) = run(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        &url,
        img.to_str().unwrap(),
    ]));
    assert!(ok && out.contains("identical"), "{out}");
    let copy = dir.path().join("copy.raw");
    let (ok, out) = run(Command::new("qemu-img").args([
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &url,
        copy.to_str().unwrap(),
    ]));
    assert!(ok, "{out}");
    assert_eq!(std::fs::read(&copy).unwrap(), content);
    let (ok, out) = run(Command::new("qemu-img").args(["info", &url]));
    assert!(ok && out.contains("2 MiB"), "{out}");
    let (ok, out) =
        run(Command::new("qemu-nbd").args(["--list", "-b", "127.0.0.1", "-p", &port.to_string()]));
    assert!(ok && out.contains("disk0"), "{out}");
    // Read-only export: qemu-io writes fail cleanly.
    let (_, out) = run(Command::new("qemu-io").args(["-f", "raw", &url, "-c", "write -P 1 0 4k"]));
    let lower = out.to_lowercase();
    assert!(
        lower.contains("read-only")
            || lower.contains("permission denied")
            || lower.contains("not permitted"),
        "{out}"
    );
    assert_eq!(std::fs::read(&img).unwrap(), content);
    // Unknown export name.
    let (ok, out) =
        run(Command::new("qemu-img").args(["info", &format!("nbd://127.0.0.1:{port}/nope")]));
    assert!(!ok, "{out}");
    srv.stop();
}

fn start_qemu_nbd(dir: &Path, file: &Path, read_only: bool) -> (ChildGuard, u16) {
    let port = common::free_tcp_port().unwrap();
    let mut cmd = Command::new("qemu-nbd");
    cmd.args([
        "-x",
        "exp",
        "-b",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "--persistent",
        "-f",
        "raw",
        "--cache=writeback",
    ]);
    if read_only {
        cmd.arg("-r");
    }
    let g = ChildGuard::spawn("qemu-nbd", cmd.arg(file), dir).unwrap();
    colo_tests::wait_for_tcp(("127.0.0.1", port), common::secs(10)).unwrap();
    (g, port)
}

#[test]
fn our_client_pipelines_against_qemu_nbd() {
    if !have_qemu_tools(&["qemu-nbd"]) {
        return;
    }
    let (rt, dir, img) = setup(&vec![0u8; 8 << 20]);
    let (_g, port) = start_qemu_nbd(dir.path(), &img, false);
    let addr = format!("127.0.0.1:{port}");
    rt.block_on(async {
        let names = NbdClient::list(&addr).await.unwrap();
        assert_eq!(names, vec!["exp".to_string()]);
        let c = NbdClient::connect(&addr, "exp").await.unwrap();
        assert_eq!(c.size(), 8 << 20);
        assert!(!c.read_only());
        // 128 writes in flight at once, each 64 KiB with its own pattern.
        let mut set = tokio::task::JoinSet::new();
        for i in 0..128u64 {
            let c = c.clone();
            set.spawn(async move {
                c.write(i * 65536, &vec![i as u8 + 1; 65536], i % 7 == 0)
                    .await
            });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap().unwrap();
        }
        c.flush().await.unwrap();
        let mut reads = tokio::task::JoinSet::new();
        for i in 0..128u64 {
            let c = c.clone();
            reads.spawn(async move { (i, c.read(i * 65536, 65536).await) });
        }
        while let Some(r) = reads.join_next().await {
            let (i, d) = r.unwrap();
            assert!(d.unwrap().iter().all(|&b| b == i as u8 + 1), "block {i}");
        }
        c.write_zeroes(0, 65536, false).await.unwrap();
        c.trim(65536, 65536).await.unwrap();
        assert!(c.read(0, 65536).await.unwrap().iter().all(|&b| b == 0));
        // Out of range: an error reply, the connection stays usable.
        assert!(c.read(8 << 20, 512).await.is_err());
        assert!(c.read(4096, 512).await.is_ok());
        c.disconnect();
        assert!(NbdClient::connect(&addr, "missing").await.is_err());
    });
    let data = std::fs::read(&img).unwrap();
    assert!(data[..65536].iter().all(|&b| b == 0));
    for i in 2..128usize {
        assert!(
            data[i * 65536..(i + 1) * 65536]
                .iter()
                .all(|&b| b == i as u8 + 1)
        );
    }
}

#[test]
fn our_client_against_our_server_fails_pending_requests_when_server_stops() {
    let (rt, _dir, img) = setup(&vec![0u8; 1 << 20]);
    let srv = serve_file(&rt, &img, true);
    let addr = srv.local_addr().to_string();
    let c = rt.block_on(NbdClient::connect(&addr, "disk0")).unwrap();
    rt.block_on(c.write(0, &[7; 4096], true)).unwrap();
    srv.stop();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = rt.block_on(c.read(0, 4096));
        if r.is_err() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "client never noticed the server stopped"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(c.closed().is_some());
}

/// A direct client (the `nbd` node's: replies read by the waiting threads themselves) with
/// many threads and requests in flight: every reply reaches its own waiter, READ data
/// included; requests of one thread may be outstanding together.
#[test]
fn direct_client_threads_share_the_reader_role() {
    use vhost_blk_colo::nbd::proto::{CMD_READ, CMD_WRITE};
    let (rt, _dir, img) = setup(&vec![0u8; 32 << 20]);
    let srv = serve_file(&rt, &img, true);
    let addr = srv.local_addr().to_string();
    let c = rt
        .block_on(NbdClient::connect_direct(&addr, "disk0"))
        .unwrap();
    let threads: Vec<_> = (0..6u8)
        .map(|t| {
            let c = c.clone();
            std::thread::spawn(move || {
                for i in 0..40u64 {
                    let off = (u64::from(t) * 64 + i % 64) * 65536;
                    let len = 4096 * (1 + (i % 16) as usize);
                    let data = vec![t.wrapping_mul(41).wrapping_add(i as u8); len];
                    // Two writes and a read of the first in flight together.
                    let w1 = c
                        .submit_sync(CMD_WRITE, 0, off, len as u32, Some(&data))
                        .unwrap();
                    let w2 = c
                        .submit_sync(CMD_WRITE, 0, off + 32768, 4096, Some(&data[..4096]))
                        .unwrap();
                    w2.wait(Duration::from_secs(20)).unwrap();
                    w1.wait(Duration::from_secs(20)).unwrap();
                    let r = c
                        .submit_sync(CMD_READ, 0, off, len as u32, None)
                        .unwrap()
                        .wait(Duration::from_secs(20))
                        .unwrap();
                    let mut want = data.clone();
                    if len > 32768 {
                        want[32768..32768 + 4096].copy_from_slice(&data[..4096]);
                    }
                    assert_eq!(r, want, "thread {t} request {i}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // The async API works on a direct client too.
    assert_eq!(rt.block_on(c.read(0, 4096)).unwrap().len(), 4096);
    // Once the server stops, requests fail instead of hanging.
    srv.stop();
    let deadline = Instant::now() + Duration::from_secs(5);
    while c
        .submit_sync(CMD_READ, 0, 0, 4096, None)
        .and_then(|w| w.wait(Duration::from_secs(20)))
        .is_ok()
    {
        assert!(Instant::now() < deadline, "requests still served");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(c.closed().is_some());
}
