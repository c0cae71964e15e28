//! iSCSI PDU parsing (BHS, AHS, data segment, text key=value pairs) on arbitrary bytes.
//! Contract: `ironsan_gateway::iscsi::pdu::fuzz_parse` never panics, whatever the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ironsan_gateway::iscsi::pdu::fuzz_parse(data);
});
