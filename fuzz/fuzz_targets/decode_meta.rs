//! A stored saga summary.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sagaflow::store::codec;
use sagaflow::SagaId;

fuzz_target!(|data: &[u8]| {
    let _ = codec::decode_meta(SagaId::from_bytes([1; 16]), data);
});
