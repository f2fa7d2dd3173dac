//! A Raft log entry read back from disk, then applied to an empty registry as the state
//! machine would (a decodable entry of our version must apply without a panic).
#![no_main]

use libfuzzer_sys::fuzz_target;
use warden_core::registry::{Registry, REGISTRY_VERSION};

fuzz_target!(|data: &[u8]| {
    let Ok(entry) = warden::inputs::log_entry(data) else {
        return;
    };
    if let openraft::EntryPayload::Normal(p) = entry.payload {
        if p.v <= REGISTRY_VERSION {
            let mut reg = Registry::default();
            let mut events = Vec::new();
            for item in &p.items {
                let _ = reg.apply(p.time, item, &mut events);
            }
        }
    }
});
