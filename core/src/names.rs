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
/// Checks a set of tags or capabilities (`field`): at most `limits::MAX_LABELS`, each a name.
pub fn validate_label_set(
    field: &str,
    set: &std::collections::BTreeSet<String>,
) -> Result<(), WireError> {
    if set.len() > limits::MAX_LABELS {
        return Err(WireError::new(
            ErrorCode::BadRequest,
            format!("at most {} {field}", limits::MAX_LABELS),
        ));
    }
    set.iter().try_for_each(|t| validate_name(field, t))
}

/// `deserialize_with` for an optional JSON value where a present `null` is `Some(Null)`: a
/// field that replaces a config (`update_agent`, a template's `overrides`).
pub fn present_value<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<serde_json::Value>, D::Error> {
    <serde_json::Value as serde::Deserialize>::deserialize(d).map(Some)
}

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

/// Checks an agent's `config`: at most `MAX_CONFIG_BYTES` encoded as JSON and
/// `MAX_CONFIG_DEPTH` levels deep, so that every record holding it stays small and decodes
/// wherever it is read (log entries, snapshots, Raft messages). Returns its encoded size.
pub fn validate_config(config: &serde_json::Value) -> Result<usize, WireError> {
    // Depth first, without recursion: a deep value must not exhaust the stack here.
    let mut stack = vec![(config, 1usize)];
    while let Some((v, depth)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &serde_json::Value>> = match v {
            serde_json::Value::Array(a) => Box::new(a.iter()),
            serde_json::Value::Object(o) => Box::new(o.values()),
            _ => continue,
        };
        if depth > limits::MAX_CONFIG_DEPTH {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                format!(
                    "config is nested more than {} levels deep",
                    limits::MAX_CONFIG_DEPTH
                ),
            ));
        }
        stack.extend(children.map(|c| (c, depth + 1)));
    }
    let bytes = serde_json::to_vec(config)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if bytes > limits::MAX_CONFIG_BYTES {
        return Err(WireError::new(
            ErrorCode::TooLarge,
            format!(
                "config is {bytes} bytes as JSON; the limit is {} bytes",
                limits::MAX_CONFIG_BYTES
            ),
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn nested(depth: usize) -> serde_json::Value {
        let mut v = json!(1);
        for _ in 0..depth {
            v = json!([v]);
        }
        v
    }

    /// Goal: a config is bounded in depth and in size, with the error each deserves.
    #[test]
    fn configs_are_bounded_in_depth_and_size() {
        assert!(validate_config(&json!({"durable": true})).is_ok());
        assert!(validate_config(&nested(limits::MAX_CONFIG_DEPTH)).is_ok());
        let deep = validate_config(&nested(limits::MAX_CONFIG_DEPTH + 1)).unwrap_err();
        assert_eq!(deep.code, ErrorCode::BadRequest);
        assert!(deep.message.contains("levels"), "{}", deep.message);
        let big = json!({"pad": "x".repeat(limits::MAX_CONFIG_BYTES)});
        assert_eq!(validate_config(&big).unwrap_err().code, ErrorCode::TooLarge);
    }

    #[test]
    fn cut_keeps_short_strings_and_cuts_long_ones_on_a_character() {
        assert_eq!(cut("short".into(), 10), "short");
        assert_eq!(cut("abcdef".into(), 4), "abcd");
        // "é" is two bytes: a cut inside it keeps the character out.
        assert_eq!(cut("aéb".into(), 2), "a");
        assert_eq!(cut("x".repeat(1_000), 200).len(), 200);
    }
}
