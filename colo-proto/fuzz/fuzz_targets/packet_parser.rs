//! Fuzz target: `colo_proto::packet` must never panic, and its views must stay inside the
//! frame (offsets in range, key consistent with the view).
#![no_main]

use colo_proto::frame::Frame;
use colo_proto::packet::{Network, parse_ethernet, parse_frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let p = parse_ethernet(data);
    assert!(p.l3_offset <= data.len());
    if let Network::Ip(ip, _) = &p.net {
        assert!(ip.l4_offset <= ip.l4_end && ip.l4_end <= data.len());
        assert!(p.l4_bytes().is_some());
        let k = p.conn_key().expect("IP packets have a key");
        let (n, swapped) = k.normalized();
        let (n2, swapped2) = k.reversed().normalized();
        assert_eq!(n, n2);
        assert!(swapped != swapped2 || k == k.reversed());
    }
    if let Some(t) = p.tcp() {
        assert!(t.header_len >= 20);
    }
    // The same bytes behind a virtio-net header of the first byte's length (0..=20).
    let vlen = u32::from(data.first().copied().unwrap_or(0) % 21);
    let f = Frame {
        vnet_hdr_len: vlen,
        payload: data.to_vec(),
    };
    let q = parse_frame(&f);
    let _ = (q.conn_key(), q.l4_bytes());
});
