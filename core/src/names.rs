//! Checks of the names, labels and request ids that commands carry.

use std::collections::BTreeMap;

use crate::error::{ErrorCode, WireError};
use crate::limits;

/// Checks a name against `[A-Za-z0-9_-]{1,128}`.
pub fn validate_name(field: &str, name: &str) -> Result<(), WireError> {
    let ok = !name.is_empty()
        && name.len() <= limits::MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(WireError::new(
            ErrorCode::BadRequest,
            format!("{field} {name:?} is invalid: use 1 to 128 of A-Z a-z 0-9 _ -"),
        ))
    }
}

/// Checks a `request_id`.
pub fn validate_request_id(rid: &Option<String>) -> Result<(), WireError> {
    match rid {
        Some(r) if r.is_empty() || r.len() > limits::MAX_REQUEST_ID_LEN => Err(WireError::new(
            ErrorCode::BadRequest,
            format!(
                "request_id must be 1 to {} bytes",
                limits::MAX_REQUEST_ID_LEN
            ),
        )),
        _ => Ok(()),
    }
}

/// Checks a label map: bounded count and lengths, keys shaped like names.
pub fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), WireError> {
    if labels.len() > limits::MAX_LABELS {
        return Err(WireError::new(
            ErrorCode::BadRequest,
            format!("at most {} labels", limits::MAX_LABELS),
        ));
    }
    for (k, v) in labels {
        validate_name("label key", k)?;
        if v.len() > limits::MAX_LABEL_LEN {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                format!(
                    "label {k:?}: values are at most {} bytes",
                    limits::MAX_LABEL_LEN
                ),
            ));
        }
    }
    Ok(())
}

/// `s` cut to at most `max` bytes, on a character boundary.
pub fn cut(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_keeps_short_strings_and_cuts_long_ones_on_a_character() {
        assert_eq!(cut("short".into(), 10), "short");
        assert_eq!(cut("abcdef".into(), 4), "abcd");
        // "é" is two bytes: a cut inside it keeps the character out.
        assert_eq!(cut("aéb".into(), 2), "a");
        assert_eq!(cut("x".repeat(1_000), 200).len(), 200);
    }
}
