//! The parsers of index keys and values: status, timer, start key, log key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sagaflow::store::codec;
use sagaflow::SagaId;

fuzz_target!(|data: &[u8]| {
    let _ = codec::lsn_of(SagaId::from_bytes([1; 16]), data);
    let _ = codec::saga_of_index_key(data);
    let _ = codec::due_of_timer_key(data);
    let _ = codec::saga_of_start_key_value(data);
});
