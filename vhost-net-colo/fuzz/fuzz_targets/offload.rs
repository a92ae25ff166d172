//! Arbitrary virtio-net header + frame bytes to `offload::to_plain` (checksum completion and
//! TCP segmentation of GSO frames), as a guest or a tap with vnet headers hands them over,
//! and as a filter socket's record to `vnet::from_record` / `vnet::offload_hdr`.
//!
//! Input: byte 0 mod 13 is the header length (0..=12: short headers must be an error), then
//! the header, then the frame. Checks: no panic; a header of 10+ bytes parses and re-encodes
//! to itself; a plain (non-GSO) frame comes out as one frame of the same length; GSO
//! segments (TSO, USO) and UFO fragments invent no payload and are no more than the
//! payload needs.
#![no_main]

use colo_proto::frame::Frame;
use libfuzzer_sys::fuzz_target;
use vhost_net_colo::offload::{GSO_ECN, GSO_NONE, GSO_UDP, OffloadError, VnetHdr, to_plain};
use vhost_net_colo::vnet::{from_record, offload_hdr};

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let hlen = usize::from(n % 13).min(rest.len());
    let (hdr, frame) = rest.split_at(hlen);
    // The same bytes as a record from a filter socket (`vnet_hdr_len` = the header length).
    let rec = Frame {
        vnet_hdr_len: hlen as u32,
        payload: rest.to_vec(),
    };
    let l2 = from_record(rec);
    assert_eq!(l2.len(), frame.len());
    let _ = offload_hdr(hdr);
    let parsed = VnetHdr::parse(hdr);
    if hdr.len() < 10 {
        assert_eq!(parsed, Err(OffloadError::ShortHeader));
        assert_eq!(
            to_plain(hdr, frame.to_vec()),
            Err(OffloadError::ShortHeader)
        );
        return;
    }
    let h = parsed.expect("10+ bytes parse");
    assert_eq!(&h.to_bytes()[..10], &hdr[..10]);
    let _ = h.is_plain();
    let _ = h.guest_features_needed();
    let Ok(out) = to_plain(hdr, frame.to_vec()) else {
        return;
    };
    assert!(!out.is_empty(), "to_plain gave no frame");
    if h.gso_type & !GSO_ECN == GSO_NONE {
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].len(), frame.len());
        return;
    }
    // Segments repeat the headers (at most 14 + 60 + 60 bytes each); payload bytes are not
    // invented.
    let total: usize = out.iter().map(Vec::len).sum();
    let max_hdrs = out.len() * (14 + 60 + 60);
    assert!(
        total <= frame.len() + max_hdrs,
        "{} segments of {total} bytes from a {}-byte frame",
        out.len(),
        frame.len()
    );
    // Segments (TSO, USO) carry up to gso_size bytes each; UFO fragments carry gso_size
    // rounded down to 8.
    let unit = match h.gso_type & !GSO_ECN {
        GSO_UDP => usize::from(h.gso_size) & !7,
        _ => usize::from(h.gso_size),
    };
    if unit > 0 && out.len() > 1 {
        assert!(out.len() <= frame.len() / unit + 1);
    }
});
