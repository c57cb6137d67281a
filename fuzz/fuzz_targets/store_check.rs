//! A whole store of arbitrary keys and values: the consistency check and reading every
//! saga's log as far as it goes must answer, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sagaflow::admin;
use sagaflow::store::{MemLog, SagaLog};
use sagaflow::SagaId;

fuzz_target!(|data: &[u8]| {
    let store = MemLog::new();
    // Pairs: a length byte, a key of that length, a length byte, a value.
    let mut rest = data;
    while let Some((&kl, r)) = rest.split_first() {
        let Some((key, r)) = r.split_at_checked(usize::from(kl) % 40) else { break };
        let Some((&vl, r)) = r.split_first() else { break };
        let Some((value, r)) = r.split_at_checked(usize::from(vl)) else { break };
        store.put_raw(key, value);
        rest = r;
    }
    let _ = store.check();
    for (k, _) in store.dump() {
        if k.len() >= 17 {
            let mut id = [0u8; 16];
            id.copy_from_slice(&k[1..17]);
            let _ = admin::readable_log(&store, SagaId::from_bytes(id));
        }
    }
});
