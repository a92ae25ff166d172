//! The NBD server's pure parsers: request headers, INFO/GO option data, and request checks.
//! Parsed values must re-encode to the same bytes; nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_blk_colo::nbd::{proto, server::precheck};

fuzz_target!(|data: &[u8]| {
    if let Some(req) = proto::parse_info_request(data) {
        assert_eq!(proto::encode_info_request(&req.name, &req.items), data);
    }
    if data.len() >= proto::REQUEST_LEN {
        let mut h = [0u8; proto::REQUEST_LEN];
        h.copy_from_slice(&data[..proto::REQUEST_LEN]);
        if let Ok(r) = proto::Request::parse(&h) {
            assert_eq!(r.encode(), h);
            let size = u64::from_le_bytes(data[data.len() - 8..].try_into().unwrap_or([0; 8]));
            let _ = precheck(&r, size, data[0] & 1 == 0);
        }
    }
});
