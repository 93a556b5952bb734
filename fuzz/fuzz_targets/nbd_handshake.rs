#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hvm_fuzz::nbd_handshake(data));
