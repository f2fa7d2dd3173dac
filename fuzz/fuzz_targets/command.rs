//! A client's command: any name of `command::TABLE` (or an unknown one), any `Content-Type`,
//! any body. Decoding and validation never panic; whatever is accepted encodes again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warden::command::TABLE;

const CONTENT_TYPES: [Option<&str>; 4] = [
    None,
    Some("application/json"),
    Some("application/msgpack"),
    Some("text/plain"),
];

fuzz_target!(|data: &[u8]| {
    let [pick, ct, body @ ..] = data else { return };
    let name = TABLE
        .get(usize::from(*pick) % (TABLE.len() + 1))
        .map_or("no_such_command", |s| s.name);
    let content_type = CONTENT_TYPES[usize::from(*ct) % CONTENT_TYPES.len()];
    let _ = warden::inputs::command(name, content_type, body);
});
