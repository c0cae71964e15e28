//! Data-path frame decoding (prefix, caps, CRC32C, prost header) on arbitrary bytes.
//! Contract: `ironsan_storage::frame::fuzz_decode` never panics, whatever the input, and
//! decodes the same frames however the bytes are split.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ironsan_storage::frame::fuzz_decode(data);
});
