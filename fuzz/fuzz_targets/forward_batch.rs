//! A peer's forward batch, then each of its items as the command it carries.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(batch) = warden::inputs::forward_batch(data) {
        for item in batch.items {
            let _ =
                warden::inputs::command(&item.command, item.content_type.as_deref(), &item.payload);
        }
    }
});
