//! A stored log value: one record (format 1) or a group (format 2). Whatever decodes must
//! fold or be refused, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sagaflow::machine::SagaState;
use sagaflow::store::codec;
use sagaflow::{Lsn, SagaId};

fuzz_target!(|data: &[u8]| {
    let saga = SagaId::from_bytes([1; 16]);
    let (lsn, bytes) = match data.split_first_chunk::<8>() {
        Some((l, rest)) => (Lsn(u64::from_be_bytes(*l)), rest),
        None => (Lsn(0), data),
    };
    if let Ok(records) = codec::decode_value(saga, lsn, bytes) {
        let _ = SagaState::fold(saga, &records);
    }
    let _ = codec::decode_log(saga, &[(lsn, bytes.to_vec())]);
});
