//! Unit tests of the qcow2 driver against images made by the real `qemu-img`.

use std::{os::unix::fs::FileExt, path::Path, process::Command, sync::Arc};

use super::*;
use crate::block::mem::MemNode;

/// Makes an image with `qemu-img create`; `None` (after a loud SKIPPED) when qemu-img is absent.
pub(crate) fn create(dir: &Path, name: &str, size: u64, extra: &[&str]) -> Option<PathBuf> {
    let p = dir.join(name);
    let out = match Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .args(extra)
        .arg(&p)
        .arg(size.to_string())
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            eprintln!("SKIPPED: qemu-img not runnable ({e}); install qemu-utils");
            return None;
        }
    };
    assert!(out.status.success(), "qemu-img create: {out:?}");
    Some(p)
}

/// `qemu-img check`: exit 0 means no errors and no leaks.
pub(crate) fn assert_check_clean(p: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json"])
        .arg(p)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "qemu-img check {} failed ({:?}): {text} {}",
        p.display(),
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("\"leaks\"") && !text.contains("\"corruptions\""),
        "{text}"
    );
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn pattern(size: usize, seed: u8) -> Vec<u8> {
    (0..size)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

/// Random writes, zeroes and partial-cluster writes against a model.
fn random_io(node: &Qcow2Node, model: &mut [u8], rng: &mut Rng, n: usize) {
    let size = model.len() as u64;
    let cs = node.cluster_size();
    for _ in 0..n {
        let len = match rng.below(4) {
            0 => 1 + rng.below(cs.min(4096)),
            1 => 1 + rng.below(3 * cs),
            2 => 512 * (1 + rng.below(16)),
            _ => cs,
        }
        .min(size);
        let off = rng.below(size - len + 1);
        if rng.below(8) == 0 {
            node.write_zeroes(off, len, false).unwrap();
            model[off as usize..(off + len) as usize].fill(0);
        } else {
            let b = rng.next() as u8;
            let data: Vec<u8> = (0..len).map(|i| b.wrapping_add(i as u8)).collect();
            node.write_at(&data, off, false).unwrap();
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
    }
}

fn read_all(node: &dyn BlockNode) -> Vec<u8> {
    let mut v = vec![0u8; node.size() as usize];
    node.read_at(&mut v, 0).unwrap();
    v
}

#[test]
fn random_writes_match_a_model_and_qemu_img_check_is_clean_for_several_cluster_sizes() {
    let dir = tempfile::tempdir().unwrap();
    for (cs, size) in [
        (512u64, 3 << 20),
        (4096, (8 << 20) + 1536),
        (65536, 8 << 20),
        (2 << 20, 12 << 20),
    ] {
        let name = format!("o{cs}.qcow2");
        let opt = format!("cluster_size={cs}");
        let Some(p) = create(dir.path(), &name, size, &["-o", &opt]) else {
            return;
        };
        let base_data = pattern(size as usize, 7);
        let base: NodeRef = Arc::new(MemNode::from_vec(base_data.clone()));
        let node = Qcow2Node::open(&p, Some(base.clone()), false).unwrap();
        assert_eq!(node.cluster_size(), cs);
        assert_eq!(node.size(), size);
        assert_eq!(
            read_all(&node),
            base_data,
            "empty image reads the lower node"
        );
        let mut model = base_data.clone();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ cs);
        // Fewer operations for 2 MiB clusters (each allocation writes a whole cluster).
        let ops = if cs >= 1 << 20 { 60 } else { 300 };
        random_io(&node, &mut model, &mut rng, ops);
        assert!(read_all(&node) == model, "cluster size {cs}: view differs");
        assert!(node.allocated_count() > 0);
        node.flush().unwrap();
        assert_check_clean(&p);
        // Reopen: everything is in the file.
        drop(node);
        let node = Qcow2Node::open(&p, Some(base.clone()), false).unwrap();
        assert!(read_all(&node) == model, "cluster size {cs}: after reopen");
        random_io(&node, &mut model, &mut rng, 100);
        assert!(read_all(&node) == model);
        // make_empty: back to the lower node, image valid and small again.
        let before = std::fs::metadata(&p).unwrap().len();
        node.make_empty().unwrap();
        assert_eq!(node.allocated_count(), 0);
        assert!(node.allocated().is_empty());
        assert!(
            read_all(&node) == base_data,
            "cluster size {cs}: after make_empty"
        );
        let after = std::fs::metadata(&p).unwrap().len();
        assert!(
            after < before && after <= 8 * cs,
            "{cs}: {before} -> {after}"
        );
        assert_check_clean(&p);
        // And it works again afterwards.
        let mut model = base_data.clone();
        random_io(&node, &mut model, &mut rng, 50);
        assert!(read_all(&node) == model);
        node.flush().unwrap();
        assert_check_clean(&p);
        node.make_empty().unwrap();
        assert_check_clean(&p);
    }
}

#[test]
fn qemu_sees_what_we_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4u64 << 20;
    let Some(p) = create(dir.path(), "v.qcow2", size, &[]) else {
        return;
    };
    let base_path = dir.path().join("base.raw");
    let base_data = pattern(size as usize, 3);
    std::fs::write(&base_path, &base_data).unwrap();
    let base: NodeRef =
        Arc::new(crate::block::file::FileNode::open(&base_path, true, false).unwrap());
    let node = Qcow2Node::open(&p, Some(base), false).unwrap();
    let mut model = base_data.clone();
    random_io(&node, &mut model, &mut Rng(42), 200);
    node.write_at(&[0xa5; 1000], 70_000, false).unwrap();
    model[70_000..71_000].fill(0xa5);
    node.flush().unwrap();
    let want = dir.path().join("want.raw");
    std::fs::write(&want, &model).unwrap();
    // QEMU reads the image over the same base given as an explicit backing node.
    let spec = format!(
        "driver=qcow2,file.filename={},backing.driver=raw,backing.file.filename={}",
        p.display(),
        base_path.display()
    );
    let out = Command::new("qemu-img")
        .args([
            "compare",
            "--image-opts",
            &spec,
            &format!("driver=raw,file.filename={}", want.display()),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img compare: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("qemu-io")
        .args(["--image-opts", &spec, "-c", "read -P 0xa5 70000 1000"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("Pattern verification failed"),
        "{text}"
    );
    assert_check_clean(&p);
}

#[test]
fn we_read_what_qemu_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let Some(p) = create(dir.path(), "q.qcow2", 2 << 20, &["-o", "cluster_size=4096"]) else {
        return;
    };
    let out = Command::new("qemu-io")
        .arg("-c")
        .arg("write -P 0x5a 12288 10000")
        .arg("-c")
        .arg("write -z 65536 8192")
        .arg(&p)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let base: NodeRef = Arc::new(MemNode::from_vec(vec![0x11; 2 << 20]));
    let node = Qcow2Node::open(&p, Some(base), false).unwrap();
    let v = read_all(&node);
    assert!(v[12288..22288].iter().all(|&x| x == 0x5a));
    assert!(v[..12288].iter().all(|&x| x == 0x11));
    assert!(
        v[65536..73728].iter().all(|&x| x == 0),
        "zero clusters read as zero"
    );
    assert!(v[73728..].iter().all(|&x| x == 0x11));
    node.write_at(&[1; 100], 65600, false).unwrap();
    node.make_empty().unwrap();
    assert!(read_all(&node).iter().all(|&x| x == 0x11));
    assert_check_clean(&p);
}

#[test]
fn refcount_table_grows_for_small_clusters() {
    let dir = tempfile::tempdir().unwrap();
    // 512-byte clusters: one refcount table cluster covers only 8 MiB of file.
    let size = 10u64 << 20;
    let Some(p) = create(dir.path(), "g.qcow2", size, &["-o", "cluster_size=512"]) else {
        return;
    };
    let node = Qcow2Node::open(&p, None, false).unwrap();
    let data = pattern(size as usize, 9);
    for off in (0..size).step_by(1 << 20) {
        node.write_at(&data[off as usize..(off + (1 << 20)) as usize], off, false)
            .unwrap();
    }
    assert!(read_all(&node) == data);
    node.flush().unwrap();
    assert_check_clean(&p);
    drop(node);
    let node = Qcow2Node::open(&p, None, false).unwrap();
    assert!(read_all(&node) == data);
    node.make_empty().unwrap();
    assert_check_clean(&p);
    assert!(read_all(&node).iter().all(|&x| x == 0));
}

#[test]
fn take_and_insert_clusters_keep_the_image_clean() {
    let dir = tempfile::tempdir().unwrap();
    let Some(p) = create(
        dir.path(),
        "t.qcow2",
        1 << 20,
        &["-o", "cluster_size=65536"],
    ) else {
        return;
    };
    let base: NodeRef = Arc::new(MemNode::from_vec(vec![3; 1 << 20]));
    let node = Qcow2Node::open(&p, Some(base), false).unwrap();
    node.insert_if_absent(2, &[9; 65536]).unwrap();
    node.insert_if_absent(2, &[8; 65536]).unwrap();
    assert!(node.insert_if_absent(3, &[8; 10]).is_err());
    assert!(node.insert_if_absent(16, &[]).is_err(), "beyond the device");
    assert!(node.insert_if_absent(u64::MAX, &[]).is_err());
    assert!(node.take_cluster(1 << 60).is_err());
    node.write_at(&[4; 10], 5, false).unwrap();
    assert_eq!(node.allocated(), vec![0, 2]);
    let c = node.take_cluster(2).unwrap().unwrap();
    assert!(c.iter().all(|&x| x == 9));
    assert!(node.take_cluster(2).unwrap().is_none());
    let c0 = node.take_cluster(0).unwrap().unwrap();
    assert_eq!(
        &c0[..20],
        &[3, 3, 3, 3, 3, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 3, 3, 3, 3, 3]
    );
    assert_eq!(node.allocated_count(), 0);
    // Freed clusters are free, not leaked; the empty L2 table is still referenced.
    assert_check_clean(&p);
}

fn write_be64(p: &Path, off: u64, v: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(&v.to_be_bytes(), off).unwrap();
}

fn write_be32(p: &Path, off: u64, v: u32) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(&v.to_be_bytes(), off).unwrap();
}

#[test]
fn corrupt_and_unsupported_images_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let Some(good) = create(dir.path(), "good.qcow2", 64 << 20, &[]) else {
        return;
    };
    let variant = |name: &str, f: &dyn Fn(&Path)| -> Qcow2Error {
        let p = dir.path().join(name);
        std::fs::copy(&good, &p).unwrap();
        f(&p);
        Qcow2Node::open(&p, None, false).unwrap_err()
    };
    let e = variant("magic", &|p| write_be32(p, 0, 0x1234_5678));
    assert!(matches!(e, Qcow2Error::BadMagic(0x1234_5678)), "{e}");
    let e = variant("l1huge", &|p| write_be32(p, 36, 0x4000_0000));
    assert!(matches!(e, Qcow2Error::Corrupt(_)), "{e}");
    assert!(e.to_string().contains("L1 table"), "{e}");
    let e = variant("l1eof", &|p| write_be64(p, 40, 1 << 40));
    assert!(e.to_string().contains("beyond the end of the file"), "{e}");
    let e = variant("rteof", &|p| write_be64(p, 48, 1 << 40));
    assert!(e.to_string().contains("refcount table"), "{e}");
    let e = variant("rtalign", &|p| write_be64(p, 48, 0x10008));
    assert!(matches!(e, Qcow2Error::Corrupt(_)), "{e}");
    let e = variant("backing", &|p| write_be64(p, 8, 0x200));
    assert!(e.to_string().contains("backing file"), "{e}");
    let e = variant("crypt", &|p| write_be32(p, 32, 1));
    assert!(e.to_string().contains("encryption"), "{e}");
    let e = variant("snap", &|p| write_be32(p, 60, 1));
    assert!(e.to_string().contains("snapshots"), "{e}");
    let e = variant("dirty", &|p| write_be64(p, 72, 1));
    assert!(
        matches!(e, Qcow2Error::Unsupported(_)) && e.to_string().contains("dirty"),
        "{e}"
    );
    let e = variant("extl2", &|p| write_be64(p, 72, 1 << 4));
    assert!(e.to_string().contains("extended L2"), "{e}");
    let e = variant("version", &|p| write_be32(p, 4, 4));
    assert!(matches!(e, Qcow2Error::UnsupportedVersion(4)), "{e}");
    let e = variant("refbits", &|p| write_be32(p, 96, 1));
    assert!(matches!(e, Qcow2Error::Unsupported(_)), "{e}");
    let e = variant("truncated", &|p| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(p)
            .unwrap()
            .set_len(40)
            .unwrap()
    });
    assert!(matches!(e, Qcow2Error::Truncated { .. }), "{e}");
    // An L1 entry pointing past the end of the file, and one pointing at the header.
    let e = variant("l1entry", &|p| write_be64(p, 0x30000, (1 << 40) | COPIED));
    assert!(e.to_string().contains("L1 entry 0"), "{e}");
    let e = variant("l1header", &|p| write_be64(p, 0x30000, COPIED));
    assert!(matches!(e, Qcow2Error::Corrupt(_)), "{e}");
    // Refcount of the header zero (an image qemu-img check would call corrupt).
    let e = variant("refzero", &|p| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(p)
            .unwrap()
            .write_all_at(&[0, 0], 0x20000)
            .unwrap()
    });
    assert!(e.to_string().contains("refcount 0"), "{e}");
    // Not qcow2 at all.
    let raw = dir.path().join("raw.img");
    std::fs::write(&raw, vec![0u8; 4096]).unwrap();
    assert!(matches!(
        Qcow2Node::open(&raw, None, false),
        Err(Qcow2Error::BadMagic(0))
    ));
    assert!(!is_qcow2(&raw) && is_qcow2(&good));
}

#[test]
fn compressed_images_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("r.raw");
    std::fs::write(&raw, pattern(1 << 20, 1)).unwrap();
    let c = dir.path().join("c.qcow2");
    let out = match Command::new("qemu-img")
        .args(["convert", "-c", "-O", "qcow2"])
        .arg(&raw)
        .arg(&c)
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            eprintln!("SKIPPED: qemu-img not runnable ({e})");
            return;
        }
    };
    assert!(out.status.success(), "{out:?}");
    let e = Qcow2Node::open(&c, None, false).unwrap_err();
    assert!(e.to_string().contains("compressed"), "{e}");
}

#[test]
fn version_2_images_work() {
    let dir = tempfile::tempdir().unwrap();
    let Some(p) = create(dir.path(), "v2.qcow2", 1 << 20, &["-o", "compat=0.10"]) else {
        return;
    };
    let node = Qcow2Node::open(&p, None, false).unwrap();
    let mut model = vec![0u8; 1 << 20];
    random_io(&node, &mut model, &mut Rng(5), 60);
    assert!(read_all(&node) == model);
    assert_check_clean(&p);
    node.make_empty().unwrap();
    assert_check_clean(&p);
}

#[test]
fn random_corruption_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let Some(good) = create(dir.path(), "f.qcow2", 1 << 20, &["-o", "cluster_size=4096"]) else {
        return;
    };
    {
        let node = Qcow2Node::open(&good, None, false).unwrap();
        random_io(&node, &mut vec![0u8; 1 << 20], &mut Rng(77), 40);
    }
    let bytes = std::fs::read(&good).unwrap();
    let mut rng = Rng(0x1234_5678);
    let p = dir.path().join("mut.qcow2");
    let mut opened = 0;
    let mut checked = 0;
    for _ in 0..300 {
        let mut b = bytes.clone();
        for _ in 0..1 + rng.below(4) {
            // Mostly metadata: header cluster and the first tables.
            let pos = rng.below(b.len().min(6 * 4096) as u64) as usize;
            b[pos] = rng.next() as u8;
        }
        std::fs::write(&p, &b).unwrap();
        if let Ok(node) = Qcow2Node::open(&p, None, false) {
            opened += 1;
            // Mutations QEMU also calls clean must stay clean through our writes.
            let clean_before = checked < 25
                && Command::new("qemu-img")
                    .args(["check", "-q"])
                    .arg(&p)
                    .output()
                    .map(|o| o.status.success())
                    .unwrap_or(false);
            let mut buf = vec![0u8; 8192];
            let _ = node.read_at(
                &mut buf,
                rng.below(node.size().max(1))
                    .min(node.size().saturating_sub(8192)),
            );
            let _ = node.write_at(&[1; 5000], 3000, false);
            if clean_before {
                checked += 1;
                node.flush().unwrap();
                assert_check_clean(&p);
            }
            let _ = node.make_empty();
            if clean_before {
                assert_check_clean(&p);
            }
        }
    }
    assert!(opened > 0, "some mutations are harmless");
    eprintln!("{opened} mutated images opened, {checked} checked clean before and after");
}

#[test]
fn refcount_widths_and_lazy_refcount_images_work() {
    let dir = tempfile::tempdir().unwrap();
    for (i, opts) in [
        "cluster_size=1024,refcount_bits=8",
        "cluster_size=4096,refcount_bits=32",
        "cluster_size=512,refcount_bits=64",
        "lazy_refcounts=on",
    ]
    .iter()
    .enumerate()
    {
        let Some(p) = create(dir.path(), &format!("w{i}.qcow2"), 2 << 20, &["-o", opts]) else {
            return;
        };
        let base: NodeRef = Arc::new(MemNode::from_vec(pattern(2 << 20, 5)));
        let node = Qcow2Node::open(&p, Some(base), false).unwrap();
        let mut model = pattern(2 << 20, 5);
        random_io(&node, &mut model, &mut Rng(11 + i as u64), 80);
        assert!(read_all(&node) == model, "{opts}");
        node.flush().unwrap();
        assert_check_clean(&p);
        node.make_empty().unwrap();
        assert!(read_all(&node) == pattern(2 << 20, 5), "{opts}");
        assert_check_clean(&p);
    }
}

/// `qemu-img check` exit code (0 clean, 2 corrupt, 3 leaks only).
fn check_code(p: &Path) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json"])
        .arg(p)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

type Op = dyn Fn(&Qcow2Node) -> BlockResult<()>;

/// Runs `op` on copies of `template`, cut off after each possible number of file writes, and
/// checks that every cut leaves an image QEMU calls clean or leaky (never corrupt), and that
/// we open again, freeing the leaks.
fn crash_at_every_write(dir: &Path, name: &str, template: &Path, lower: &NodeRef, op: &Op) {
    let probe = dir.join(format!("{name}-probe.qcow2"));
    std::fs::copy(template, &probe).unwrap();
    let node = Qcow2Node::open(&probe, Some(lower.clone()), false).unwrap();
    node.crash_after(i64::MAX);
    op(&node).unwrap();
    let writes = i64::MAX - node.file.budget.load(std::sync::atomic::Ordering::SeqCst);
    drop(node);
    assert_check_clean(&probe);
    assert!(writes > 0, "{name}: the operation writes");
    let copy = dir.join(format!("{name}-cut.qcow2"));
    let mut leaky = 0;
    // Long operations: the first and last 12 cut points and an even sample between.
    let points: Vec<i64> = if writes <= 24 {
        (0..=writes).collect()
    } else {
        (0..8)
            .chain((8..writes - 8).step_by((writes / 12) as usize))
            .chain(writes - 8..=writes)
            .collect()
    };
    for &n in &points {
        std::fs::copy(template, &copy).unwrap();
        let node = Qcow2Node::open(&copy, Some(lower.clone()), false).unwrap();
        node.crash_after(n);
        let r = op(&node);
        assert_eq!(
            r.is_ok(),
            n == writes,
            "{name}: cut after {n} of {writes} writes"
        );
        drop(node);
        let (code, text) = check_code(&copy);
        assert!(
            code == 0 || code == 3,
            "{name}: a crash after {n} of {writes} writes corrupts the image (qemu-img check exit {code}): {text}"
        );
        leaky += usize::from(code == 3);
        // Opening for writing frees the leaks.
        Qcow2Node::open(&copy, Some(lower.clone()), false)
            .unwrap_or_else(|e| panic!("{name}: cut after {n}: we cannot reopen: {e}"));
        if code == 3 {
            assert_check_clean(&copy);
        }
    }
    eprintln!(
        "{name}: {writes} writes, {} cut points tried, {leaky} leave leaks, none corrupt",
        points.len()
    );
}

#[test]
fn a_crash_at_any_write_leaves_at_worst_leaked_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // 64 KiB clusters: first partial write (L2 table + copy from lower + data), a write over
    // two clusters, make-empty of an image with two L2 tables, taking a cluster.
    let Some(t) = create(d, "t64.qcow2", 1 << 30, &[]) else {
        return;
    };
    let lower: NodeRef = Arc::new(MemNode::from_vec(pattern(1 << 20, 1)));
    crash_at_every_write(d, "first-write", &t, &lower, &|n| {
        n.write_at(&[9; 100], 70_000, false)
    });
    {
        let n = Qcow2Node::open(&t, Some(lower.clone()), false).unwrap();
        n.write_at(&[1; 5000], 0, false).unwrap();
        n.write_at(&[2; 5000], 600 << 20, false).unwrap();
    }
    crash_at_every_write(d, "span", &t, &lower, &|n| {
        n.write_at(&[3; 70_000], 100_000, false)
    });
    crash_at_every_write(d, "make-empty-64k", &t, &lower, &|n| n.make_empty());
    crash_at_every_write(d, "take-cluster", &t, &lower, &|n| {
        n.take_cluster(0).map(|_| ())
    });

    // 512-byte clusters: a new refcount block, the refcount table growing, and a make-empty
    // that drops refcount blocks and truncates.
    let Some(s) = create(d, "t512.qcow2", 10 << 20, &["-o", "cluster_size=512"]) else {
        return;
    };
    let zero: NodeRef = Arc::new(MemNode::new(1));
    let fill_to = |target: u64| {
        let n = Qcow2Node::open(&s, Some(zero.clone()), false).unwrap();
        let mut off = n.allocated().last().map(|&c| (c + 1) * 512).unwrap_or(0);
        while n.meta.read().unwrap().refs.end < target {
            n.write_at(&[0x77; 512], off, false).unwrap();
            off += 512;
        }
    };
    fill_to(250);
    crash_at_every_write(d, "new-refcount-block", &s, &zero, &|n| {
        n.write_at(&[5; 4096], 5 << 20, false)?;
        assert_ne!(n.meta.read().unwrap().refs.table[1], 0, "a second block");
        Ok(())
    });
    // One refcount table cluster covers 64 blocks of 256 clusters.
    fill_to(64 * 256 - 2);
    crash_at_every_write(d, "refcount-table-growth", &s, &zero, &|n| {
        n.write_at(&[6; 4096], 9 << 20, false)?;
        assert!(
            n.meta.read().unwrap().refs.table_clusters > 1,
            "table grown"
        );
        Ok(())
    });
    crash_at_every_write(d, "make-empty-512", &s, &zero, &|n| n.make_empty());
}

#[test]
fn concurrent_writers_sharing_clusters_keep_data_and_metadata_right() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4u64 << 20;
    let Some(p) = create(dir.path(), "c.qcow2", size, &["-o", "cluster_size=4096"]) else {
        return;
    };
    let base = pattern(size as usize, 2);
    let lower: NodeRef = Arc::new(MemNode::from_vec(base.clone()));
    let node = Arc::new(Qcow2Node::open(&p, Some(lower), false).unwrap());
    // Four writers over interleaved, unaligned 1000-byte stripes: neighbours share clusters.
    const STRIPE: u64 = 1000;
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let node = node.clone();
            std::thread::spawn(move || {
                let mut rng = Rng(0xabc + t);
                let mut mine = Vec::new();
                for _ in 0..400 {
                    let stripe = rng.below(size / STRIPE / 4) * 4 + t;
                    let off = stripe * STRIPE;
                    let b = (rng.next() as u8) | 1;
                    node.write_at(&[b; STRIPE as usize], off, false).unwrap();
                    mine.push((off, b));
                }
                mine
            })
        })
        .collect();
    let mut model = base;
    for t in threads {
        for (off, b) in t.join().unwrap() {
            model[off as usize..(off + STRIPE) as usize].fill(b);
        }
    }
    assert!(
        read_all(&*node) == model,
        "concurrent writes lost or mixed data"
    );
    node.flush().unwrap();
    assert_check_clean(&p);
    node.make_empty().unwrap();
    assert_check_clean(&p);
}
