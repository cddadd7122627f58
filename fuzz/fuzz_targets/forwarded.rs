//! `stepgate::fuzzing::forwarded`: see that module for the invariant.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| stepgate::fuzzing::forwarded::check(bytes));
