//! The qcow2 header: parsing and validation against the file's length, and the module's error
//! type.
//!
//! Field layout and feature bits are those of the published qcow2 format description
//! (big-endian; version 2 header is 72 bytes, version 3 at least 104). Every field is checked
//! before it is used: sizes with checked arithmetic, table offsets cluster-aligned and inside the
//! file, table lengths under fixed caps, so a corrupt or hostile image gives an error.

use std::io;

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Offset bits of an L1 or L2 entry (bits 9..=55).
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Offset bits of a refcount table entry (bits 9..=63).
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Entry flag: the cluster's refcount is exactly one (written on every entry we make).
pub const COPIED: u64 = 1 << 63;
/// L2 entry flag: compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// L2 entry flag (version 3): the cluster reads as zeroes.
pub const ZERO: u64 = 1;
/// Reserved bits of an L1 entry (must be zero).
pub const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard L2 entry (must be zero).
pub const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// Largest L1 table we accept, in bytes (QEMU's own limit).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table we accept or grow to, in bytes (QEMU's own limit).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Largest virtual size we accept (2^61 bytes, far beyond any real disk).
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 61;

const V2_HEADER_LEN: usize = 72;
const V3_HEADER_LEN: usize = 104;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const EXT_BITMAPS: u32 = 0x2385_2875;
const EXT_ENCRYPTION: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Errors of the qcow2 driver.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    /// A host I/O error.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The file is shorter than a structure it must hold.
    #[error("file too short: {what} needs {need} bytes, the file has {have}")]
    Truncated {
        /// Which structure.
        what: &'static str,
        /// Bytes needed.
        need: u64,
        /// File length.
        have: u64,
    },
    /// Not a qcow2 file.
    #[error("not a qcow2 image (magic {0:#010x}, expected 0x514649fb)")]
    BadMagic(u32),
    /// A version other than 2 or 3.
    #[error("qcow2 version {0} is not supported (only 2 and 3)")]
    UnsupportedVersion(u32),
    /// A feature this driver does not implement.
    #[error("unsupported qcow2 feature: {0}")]
    Unsupported(String),
    /// A header field or table entry that cannot be valid.
    #[error("corrupt qcow2 image: {0}")]
    Corrupt(String),
}

impl Qcow2Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Qcow2Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// The header fields this driver uses, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Number of L1 entries.
    pub l1_size: u32,
    /// Host offset of the L1 table.
    pub l1_offset: u64,
    /// Host offset of the refcount table.
    pub rt_offset: u64,
    /// Refcount table length in clusters.
    pub rt_clusters: u32,
    /// log2 of the refcount width in bits (3..=6 accepted).
    pub refcount_order: u32,
}

/// Byte offset of the refcount table offset field (the refcount table offset and cluster count
/// are rewritten together when the table grows).
pub const RT_OFFSET_FIELD: u64 = 48;

fn be32(b: &[u8], o: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[o..o + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}

fn incompatible_names(bits: u64) -> String {
    const NAMES: [&str; 5] = [
        "dirty (needs `qemu-img check -r all`)",
        "corrupt (needs `qemu-img check -r all`)",
        "external data file",
        "compression type other than zlib",
        "extended L2 entries",
    ];
    (0..64)
        .filter(|i| bits & (1 << i) != 0)
        .map(|i| {
            NAMES
                .get(i as usize)
                .map(|n| (*n).to_owned())
                .unwrap_or_else(|| format!("unknown incompatible bit {i}"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks that `[offset, offset+len)` is cluster-aligned at its start and inside the file.
pub fn check_table(
    what: &str,
    offset: u64,
    len: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<(), Qcow2Error> {
    if offset == 0 || !offset.is_multiple_of(cluster_size) {
        return Err(Qcow2Error::Corrupt(format!(
            "{what} offset {offset:#x} is not a non-zero multiple of the cluster size {cluster_size}"
        )));
    }
    match offset.checked_add(len) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(Qcow2Error::Corrupt(format!(
            "{what} ({len} bytes at {offset:#x}) lies beyond the end of the file ({file_len} bytes)"
        ))),
    }
}

/// Parses and validates the header. `head` is the start of the file: at least its first
/// cluster, or the whole file when shorter; `file_len` is the file's length.
pub fn parse(head: &[u8], file_len: u64) -> Result<Header, Qcow2Error> {
    if head.len() < V2_HEADER_LEN {
        return Err(Qcow2Error::Truncated {
            what: "the header",
            need: V2_HEADER_LEN as u64,
            have: file_len,
        });
    }
    let magic = be32(head, 0);
    if magic != MAGIC {
        return Err(Qcow2Error::BadMagic(magic));
    }
    let version = be32(head, 4);
    if version != 2 && version != 3 {
        return Err(Qcow2Error::UnsupportedVersion(version));
    }
    let backing_offset = be64(head, 8);
    let cluster_bits = be32(head, 20);
    let size = be64(head, 24);
    let crypt = be32(head, 32);
    let l1_size = be32(head, 36);
    let l1_offset = be64(head, 40);
    let rt_offset = be64(head, 48);
    let rt_clusters = be32(head, 56);
    let nb_snapshots = be32(head, 60);

    if !(9..=21).contains(&cluster_bits) {
        return Err(Qcow2Error::Corrupt(format!(
            "cluster_bits {cluster_bits} outside 9..=21"
        )));
    }
    let cs = 1u64 << cluster_bits;
    if backing_offset != 0 {
        return Err(Qcow2Error::Unsupported(
            "a backing file named in the header (give the backing node in the drive options)"
                .into(),
        ));
    }
    if crypt != 0 {
        return Err(Qcow2Error::Unsupported(format!(
            "encryption (method {crypt})"
        )));
    }
    if nb_snapshots != 0 {
        return Err(Qcow2Error::Unsupported(format!(
            "internal snapshots ({nb_snapshots} present)"
        )));
    }

    let mut refcount_order = 4;
    let mut ext_start = V2_HEADER_LEN;
    if version == 3 {
        if head.len() < V3_HEADER_LEN {
            return Err(Qcow2Error::Truncated {
                what: "the version 3 header",
                need: V3_HEADER_LEN as u64,
                have: file_len,
            });
        }
        let incompatible = be64(head, 72);
        let autoclear = be64(head, 88);
        refcount_order = be32(head, 96);
        let header_length = be32(head, 100) as usize;
        if incompatible != 0 {
            return Err(Qcow2Error::Unsupported(format!(
                "incompatible feature bits {incompatible:#x}: {}",
                incompatible_names(incompatible)
            )));
        }
        if autoclear != 0 {
            return Err(Qcow2Error::Unsupported(format!(
                "autoclear feature bits {autoclear:#x} (persistent bitmaps or raw external data)"
            )));
        }
        if header_length < V3_HEADER_LEN || header_length as u64 > cs {
            return Err(Qcow2Error::Corrupt(format!(
                "header_length {header_length} outside {V3_HEADER_LEN}..={cs}"
            )));
        }
        if !(3..=6).contains(&refcount_order) {
            return Err(Qcow2Error::Unsupported(format!(
                "refcount width of {} bits (only 8, 16, 32 and 64)",
                1u64.checked_shl(refcount_order).unwrap_or(0)
            )));
        }
        ext_start = header_length;
    }
    parse_extensions(head, ext_start, cs)?;

    if size > MAX_VIRTUAL_SIZE {
        return Err(Qcow2Error::Unsupported(format!(
            "virtual size {size} bytes (more than 2^61)"
        )));
    }
    // One L2 table maps cs/8 clusters of cs bytes.
    let l2_span = cs * (cs / 8);
    let l1_needed = size.div_ceil(l2_span);
    if u64::from(l1_size) < l1_needed {
        return Err(Qcow2Error::Corrupt(format!(
            "L1 table has {l1_size} entries, the virtual size {size} needs {l1_needed}"
        )));
    }
    let l1_bytes = u64::from(l1_size) * 8;
    if l1_bytes > MAX_L1_BYTES {
        return Err(Qcow2Error::Corrupt(format!(
            "L1 table of {l1_size} entries is larger than {MAX_L1_BYTES} bytes"
        )));
    }
    if l1_size > 0 {
        check_table("L1 table", l1_offset, l1_bytes, cs, file_len)?;
    }
    let rt_bytes = u64::from(rt_clusters) * cs;
    if rt_clusters == 0 || rt_bytes > MAX_REFTABLE_BYTES {
        return Err(Qcow2Error::Corrupt(format!(
            "refcount table of {rt_clusters} clusters (must be 1..={} bytes)",
            MAX_REFTABLE_BYTES
        )));
    }
    // The table may be short in the file (qemu-img writes only what it uses); entries past the
    // end of the file read as zero, and the allocator never places anything inside the table.
    check_table("refcount table", rt_offset, 8, cs, file_len)?;
    Ok(Header {
        version,
        cluster_bits,
        size,
        l1_size,
        l1_offset,
        rt_offset,
        rt_clusters,
        refcount_order,
    })
}

/// Walks the header extensions that follow the header inside the first cluster: refuses
/// encryption and external data files, skips the rest.
fn parse_extensions(head: &[u8], start: usize, cs: u64) -> Result<(), Qcow2Error> {
    let limit = head.len().min(cs as usize);
    let mut off = start;
    while off + 8 <= limit {
        let ty = be32(head, off);
        let len = be32(head, off + 4) as usize;
        match ty {
            EXT_END => return Ok(()),
            EXT_ENCRYPTION => {
                return Err(Qcow2Error::Unsupported(
                    "encryption header extension".into(),
                ));
            }
            EXT_DATA_FILE => {
                return Err(Qcow2Error::Unsupported("external data file".into()));
            }
            EXT_BACKING_FORMAT | EXT_FEATURE_TABLE | EXT_BITMAPS => {}
            _ => {} // Unknown extensions may be ignored (format rule).
        }
        let padded = len.div_ceil(8).saturating_mul(8);
        let next = off
            .checked_add(8)
            .and_then(|o| o.checked_add(padded))
            .filter(|&n| n <= limit)
            .ok_or_else(|| {
                Qcow2Error::Corrupt(format!(
                    "header extension {ty:#x} at {off} of {len} bytes runs past the first cluster"
                ))
            })?;
        off = next;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v3(cluster_bits: u32, size: u64) -> Vec<u8> {
        let cs = 1usize << cluster_bits;
        let mut h = vec![0u8; cs * 4];
        h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&cluster_bits.to_be_bytes());
        h[24..32].copy_from_slice(&size.to_be_bytes());
        h[36..40].copy_from_slice(&1u32.to_be_bytes());
        h[40..48].copy_from_slice(&(3 * cs as u64).to_be_bytes());
        h[48..56].copy_from_slice(&(cs as u64).to_be_bytes());
        h[56..60].copy_from_slice(&1u32.to_be_bytes());
        h[96..100].copy_from_slice(&4u32.to_be_bytes());
        h[100..104].copy_from_slice(&112u32.to_be_bytes());
        h
    }

    #[test]
    fn header_fields_are_validated() {
        let h = v3(16, 1 << 29);
        let len = h.len() as u64;
        let p = parse(&h, len).unwrap();
        assert_eq!(p.cluster_bits, 16);
        assert_eq!(p.l1_offset, 3 << 16);

        let mut b = h.clone();
        b[0] = 0;
        assert!(matches!(parse(&b, len), Err(Qcow2Error::BadMagic(_))));
        let mut b = h.clone();
        b[36..40].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(parse(&b, len), Err(Qcow2Error::Corrupt(_))));
        let mut b = h.clone();
        b[40..48].copy_from_slice(&(1u64 << 40).to_be_bytes());
        assert!(matches!(parse(&b, len), Err(Qcow2Error::Corrupt(_))));
        let mut b = h.clone();
        b[72..80].copy_from_slice(&(1u64 << 4).to_be_bytes());
        let e = parse(&b, len).unwrap_err().to_string();
        assert!(e.contains("extended L2"), "{e}");
        let mut b = h.clone();
        b[20..24].copy_from_slice(&40u32.to_be_bytes());
        assert!(matches!(parse(&b, len), Err(Qcow2Error::Corrupt(_))));
        let mut b = h.clone();
        b[112..116].copy_from_slice(&EXT_DATA_FILE.to_be_bytes());
        assert!(matches!(parse(&b, len), Err(Qcow2Error::Unsupported(_))));
        let mut b = h.clone();
        b[112..116].copy_from_slice(&0x1234u32.to_be_bytes());
        b[116..120].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(parse(&b, len), Err(Qcow2Error::Corrupt(_))));
        assert!(matches!(
            parse(&h[..50], 50),
            Err(Qcow2Error::Truncated { .. })
        ));
    }
}
