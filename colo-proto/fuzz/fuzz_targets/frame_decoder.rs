//! Arbitrary bytes, in arbitrary chunks, into `FrameDecoder` (both vnet modes).
//!
//! Checks: no panic; every decoded frame re-encodes to exactly the bytes it was decoded from
//! (the concatenation of re-encoded frames is the consumed prefix of the input); chunking does
//! not change the result; after an error the decoder stays stopped; `finish` is clean exactly
//! when the input ended on a record boundary.

#![no_main]

use colo_proto::frame::{Frame, FrameDecoder, FrameError, MAX_PAYLOAD_LEN, encode};
use libfuzzer_sys::fuzz_target;

/// Decodes `input` pushed in chunks whose sizes come from `seed`; returns the frames, the
/// consumed offset and whether the decoder failed.
fn decode(input: &[u8], vnet: bool, seed: u32) -> (Vec<Frame>, u64, bool) {
    let mut dec = FrameDecoder::new(vnet);
    let mut frames = Vec::new();
    let mut state = seed | 1;
    let mut pos = 0;
    let mut failed = false;
    while pos < input.len() && !failed {
        // xorshift32 chunk sizes from 1 to 256 bytes (or everything when seed is 0).
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let n = if seed == 0 {
            input.len()
        } else {
            1 + (state % 256) as usize
        };
        let end = (pos + n).min(input.len());
        dec.push(&input[pos..end]);
        pos = end;
        loop {
            match dec.next_frame() {
                Ok(Some(f)) => {
                    assert!(f.payload.len() <= MAX_PAYLOAD_LEN);
                    assert!(f.vnet_hdr_len as usize <= f.payload.len());
                    assert!(vnet || f.vnet_hdr_len == 0);
                    frames.push(f);
                }
                Ok(None) => break,
                Err(e) => {
                    assert!(
                        !matches!(e, FrameError::Stopped(_)),
                        "first error is not Stopped"
                    );
                    failed = true;
                    assert!(matches!(dec.next_frame(), Err(FrameError::Stopped(_))));
                    assert!(dec.finish().is_err());
                    break;
                }
            }
        }
    }
    if !failed {
        let at_boundary = dec.offset() == input.len() as u64;
        assert_eq!(dec.finish().is_ok(), at_boundary);
    }
    (frames, dec.offset(), failed)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 5 {
        return;
    }
    let vnet = data[0] & 1 == 1;
    let seed = u32::from_le_bytes([data[1], data[2], data[3], data[4]]);
    let input = &data[5..];

    let (frames, offset, failed) = decode(input, vnet, seed);
    let mut reencoded = Vec::new();
    for f in &frames {
        encode(f, vnet, &mut reencoded).expect("a decoded frame must re-encode");
    }
    assert_eq!(&reencoded[..], &input[..offset as usize], "round trip");

    let (whole, whole_offset, whole_failed) = decode(input, vnet, 0);
    assert_eq!(frames, whole, "chunking changed the frames");
    assert_eq!((offset, failed), (whole_offset, whole_failed));
});
