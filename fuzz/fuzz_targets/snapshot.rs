//! A snapshot's registry, from disk or from the leader: decoding and rebuilding its indexes
//! never panic, and neither does reading the tree it holds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warden_core::registry::ROOT;

fuzz_target!(|data: &[u8]| {
    if let Ok(reg) = warden::inputs::snapshot(data) {
        let _ = reg.tree(ROOT);
    }
});
