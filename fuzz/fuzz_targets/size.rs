//! Human size parsing (`--volume NAME:SIZE`, config files): never panics, and whatever parses
//! prints back to the same number of bytes.
#![no_main]

use ironsan_common::size::{parse_size, ByteSize};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(n) = parse_size(s) {
            let printed = ByteSize(n).to_string();
            assert_eq!(parse_size(&printed), Ok(n), "{s:?} -> {n} -> {printed:?}");
        }
    }
});
