//! The virtio-net header at the socket edges of filters with `vnet_hdr_support=on`.
//!
//! Inside the chain frames are bare Ethernet frames; an offloaded frame (GSO, partial checksum)
//! travels with its header beside it when every filter on its way takes it whole, and is made
//! plain before the chain otherwise (see [`crate::offload`]). A filter with
//! `vnet_hdr_support=on` sends the
//! `vnet_hdr_len` field as QEMU does: the length of the netdev's virtio-net header — 12 for a
//! tap with vnet headers (`vnet_hdr=on`, the default), 0 for stream, dgram, user and
//! `vnet_hdr=off` taps — with the frame's header in front of it: zeroed for a plain frame, the
//! GSO/checksum request for an offloaded one ([`record_hdr`]).
//! The option `vnet_hdr_len=0|10|12|20` (our extension) overrides it, e.g. to match a QEMU
//! peer whose netdev differs from ours.
//! Received records are split into frame and header ([`offload_hdr`]); a header asking for
//! offloads goes on with the frame (a tap with vnet headers completes it in the kernel).

use colo_proto::frame::Frame;

use crate::offload::VnetHdr;

/// Length of the virtio 1.0 header (with `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;
/// `flags` bit: the checksum from `csum_start` on still has to be computed.
pub use crate::offload::F_NEEDS_CSUM;

/// A frame as a filter with the given `vnet_hdr_support` and header length sends it.
pub fn to_record(l2: &[u8], vnet_hdr_support: bool, hdr_len: usize) -> Frame {
    if vnet_hdr_support && hdr_len > 0 {
        let mut payload = Vec::with_capacity(hdr_len + l2.len());
        payload.resize(hdr_len, 0);
        payload.extend_from_slice(l2);
        Frame {
            vnet_hdr_len: hdr_len as u32,
            payload,
        }
    } else {
        Frame::ethernet(l2)
    }
}

/// The longest virtio-net header a record carries (`vnet_hdr_len=20`, with hash fields).
pub const MAX_RECORD_HDR: usize = 20;

/// The header bytes a filter with the given `vnet_hdr_support` and header length puts in front
/// of a frame (see [`to_record`]): the frame's own header when
/// offloads are pending, zeros for a plain frame; none (length 0) without vnet_hdr_support.
pub fn record_hdr(
    hdr: Option<&VnetHdr>,
    vnet_hdr_support: bool,
    hdr_len: usize,
) -> ([u8; MAX_RECORD_HDR], usize) {
    let mut b = [0u8; MAX_RECORD_HDR];
    if !vnet_hdr_support {
        return (b, 0);
    }
    let n = hdr_len.min(MAX_RECORD_HDR);
    if let Some(h) = hdr {
        let hb = h.to_bytes();
        let k = n.min(hb.len());
        b[..k].copy_from_slice(&hb[..k]);
    }
    (b, n)
}

/// The header of a received record when it asks for offloads (a GSO frame, a partial
/// checksum); `None` for no header or a plain one.
pub fn offload_hdr(hdr: &[u8]) -> Option<VnetHdr> {
    VnetHdr::parse(hdr).ok().filter(|h| !h.is_plain())
}

/// The bare Ethernet frame of a received record, with a requested partial checksum completed.
pub fn from_record(frame: Frame) -> Vec<u8> {
    let hdr_len = frame.vnet_hdr_len as usize;
    if hdr_len == 0 {
        return frame.payload;
    }
    let hdr = frame.vnet_hdr().to_vec();
    let mut l2 = frame.payload;
    l2.drain(..hdr_len.min(l2.len()));
    complete_checksum(&hdr, &mut l2);
    l2
}

/// Applies a virtio-net header's NEEDS_CSUM request to `l2` in software.
pub fn complete_checksum(hdr: &[u8], l2: &mut [u8]) {
    if hdr.len() < 10 || hdr[0] & F_NEEDS_CSUM == 0 {
        return;
    }
    let start = u16::from_le_bytes([hdr[6], hdr[7]]) as usize;
    let off = u16::from_le_bytes([hdr[8], hdr[9]]) as usize;
    let at = start + off;
    if start >= l2.len() || at + 2 > l2.len() {
        return;
    }
    // The field holds the pseudo-header sum already; fold the rest in.
    let sum = !ones_complement_sum(&l2[start..]);
    l2[at..at + 2].copy_from_slice(&sum.to_be_bytes());
}

/// The 16-bit one's complement sum of `data` (Internet checksum before inversion).
pub fn ones_complement_sum(data: &[u8]) -> u16 {
    let mut acc: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_with_and_without_header_round_trip() {
        let l2 = vec![0xaau8; 60];
        let r = to_record(&l2, true, VNET_HDR_LEN);
        assert_eq!(r.vnet_hdr_len, 12);
        assert_eq!(r.l2(), &l2[..]);
        assert_eq!(from_record(r), l2);
        let r = to_record(&l2, false, VNET_HDR_LEN);
        assert_eq!(r.vnet_hdr_len, 0);
        let r = to_record(&l2, true, 0);
        assert_eq!(r.vnet_hdr_len, 0);
        assert_eq!(from_record(r), l2);
    }

    #[test]
    fn partial_checksum_is_completed() {
        // 4 bytes of "pseudo sum" field at offset 2 over data from 0.
        let mut l2 = vec![0x12, 0x34, 0, 0, 0xab, 0xcd];
        let mut hdr = [0u8; 12];
        hdr[0] = F_NEEDS_CSUM;
        hdr[8] = 2;
        complete_checksum(&hdr, &mut l2);
        assert_eq!(ones_complement_sum(&l2), 0xffff);
        // A header pointing outside the frame is ignored, not a panic.
        hdr[6] = 200;
        complete_checksum(&hdr, &mut l2);
    }
}
