//! SCSI command execution (CDB decoding, LBA/length checks, data-out handling) on an
//! in-memory LUN. Contract: `ironsan_gateway::scsi::fuzz_execute` never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ironsan_gateway::scsi::fuzz_execute(data);
});
