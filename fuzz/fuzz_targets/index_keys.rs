//! The parsers of index keys and values: status, timer, start key, log key, and the
//! inbox's keys and values (a delivery, a taken mark).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sagaflow::store::codec;
use sagaflow::SagaId;

fuzz_target!(|data: &[u8]| {
    let _ = codec::lsn_of(SagaId::from_bytes([1; 16]), data);
    let _ = codec::saga_of_index_key(data);
    let _ = codec::due_of_timer_key(data);
    let _ = codec::saga_of_start_key_value(data);
    let _ = codec::inbox_ids_of(data);
    // Split in two: a key and a value (and the value again as a taken mark).
    let (key, value) = data.split_at(data.len() / 2);
    let _ = codec::decode_delivery(key, value, Some(value));
});
