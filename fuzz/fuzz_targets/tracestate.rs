//! `stepgate::fuzzing::tracestate`: see that module for the invariant.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| stepgate::fuzzing::tracestate::check(bytes));
