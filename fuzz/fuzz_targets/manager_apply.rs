//! The manager's state machine on arbitrary commands: a forwarded or replayed `Command` is
//! decoded by prost and applied. Contract: `State::apply` never panics, whatever the command,
//! and the state it leaves survives a snapshot round trip unchanged (per-node allocation kept
//! incrementally must equal a recount from the chunk map).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ironsan_manager::state::fuzz_apply(data);
});
