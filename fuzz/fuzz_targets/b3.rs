//! `stepgate::fuzzing::b3`: see that module for the invariant.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| stepgate::fuzzing::b3::check(bytes));
