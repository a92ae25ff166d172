//! Fuzz target: the capture reader never panics; what it returns lies inside the input.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match comparer::pcap::parse_capture(data, Path::new("fuzz.pcap")) {
        Ok(packets) => {
            for p in &packets {
                assert!((p.offset as usize) < data.len());
                assert!(p.data.len() <= data.len());
            }
        }
        Err(e) => {
            // Every error names the file.
            assert!(e.to_string().starts_with("fuzz.pcap: "), "{e}");
        }
    }
});
