//! Wire format of commands and replies: encodings, the reply envelope and error codes.
//!
//! A request body is JSON or MessagePack. The `Content-Type` header says which; without it a
//! body whose first non-blank byte is `{` is JSON and anything else MessagePack. The reply uses
//! the request's encoding and is always an envelope: `{"ok":true,"result":...}` or
//! `{"ok":false,"error":{"code":"...","message":"..."}}`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `Content-Type` value for JSON.
pub const JSON: &str = "application/json";
/// `Content-Type` value for MessagePack.
pub const MSGPACK: &str = "application/msgpack";
/// The header names live with the subjects, the other half of how a message is addressed.
pub use crate::subjects::{CALL_ID_HEADER, CONTENT_TYPE, EPOCH_HEADER, FORWARD_HOPS, LEADER_HINT};
const NOT_AN_OBJECT: &str = "body must be an object (a map of field names to values)";

/// Version of the reply envelope, carried in every reply as `v`.
pub const ENVELOPE_VERSION: u32 = 1;

/// The encoding of a request, and so of its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Json,
    Msgpack,
}

impl Encoding {
    /// Picks the encoding from the `Content-Type` header, or sniffs the body without one.
    /// An unknown `Content-Type` is an error so that a typo is not silently misread.
    pub fn detect(content_type: Option<&str>, body: &[u8]) -> Result<Encoding, WireError> {
        match content_type.map(|c| c.split(';').next().unwrap_or(c).trim()) {
            Some(JSON) | Some("json") => Ok(Encoding::Json),
            Some(MSGPACK) | Some("application/x-msgpack") | Some("msgpack") => {
                Ok(Encoding::Msgpack)
            }
            Some(other) => Err(WireError::new(
                ErrorCode::BadRequest,
                format!("unsupported Content-Type {other:?}: use {JSON} or {MSGPACK}"),
            )),
            None => {
                let first = body.iter().find(|b| !b.is_ascii_whitespace());
                Ok(if first == Some(&b'{') {
                    Encoding::Json
                } else {
                    Encoding::Msgpack
                })
            }
        }
    }

    /// The `Content-Type` value of this encoding.
    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::Json => JSON,
            Encoding::Msgpack => MSGPACK,
        }
    }

    /// Decodes a request body into a JSON value. An empty body is an empty object, so that
    /// commands without fields can be sent with no body at all.
    pub fn decode(self, body: &[u8]) -> Result<Value, WireError> {
        if body.iter().all(|b| b.is_ascii_whitespace()) {
            return Ok(Value::Object(Default::default()));
        }
        let value: Value = match self {
            Encoding::Json => serde_json::from_slice(body).map_err(|e| {
                WireError::new(
                    ErrorCode::BadRequest,
                    format!("body is not valid JSON: {e}"),
                )
            })?,
            Encoding::Msgpack => body_from_msgpack(body).map_err(|e| {
                WireError::new(
                    ErrorCode::BadRequest,
                    format!("body is neither JSON nor valid MessagePack: {e}"),
                )
            })?,
        };
        if !value.is_object() {
            return Err(WireError::new(ErrorCode::BadRequest, NOT_AN_OBJECT));
        }
        Ok(value)
    }

    /// Decodes a request body straight into its typed shape. The body must be an object (a
    /// map); an empty body is an empty one. Decoding directly, not through a JSON value,
    /// keeps MessagePack's binary fields (ids, checkpoint bytes) intact.
    pub fn decode_as<T: serde::de::DeserializeOwned>(self, body: &[u8]) -> Result<T, WireError> {
        let first = body
            .iter()
            .copied()
            .find(|b| !b.is_ascii_whitespace() || self == Encoding::Msgpack);
        let json = |bytes: &[u8]| {
            serde_json::from_slice(bytes).map_err(|e| match e.classify() {
                serde_json::error::Category::Data => e.to_string(),
                _ => format!("body is not valid JSON: {e}"),
            })
        };
        let msgpack = |bytes: &[u8]| {
            body_from_msgpack(bytes).map_err(|e| match e {
                // serde's own messages (missing field, wrong type) come as `Syntax`.
                rmp_serde::decode::Error::Syntax(m) => m,
                other => format!("body is not valid MessagePack: {other}"),
            })
        };
        let result = match (self, first) {
            (Encoding::Json, None) => json(b"{}"),
            (Encoding::Msgpack, None) => msgpack(&[0x80]),
            (Encoding::Json, Some(b'{')) => json(body),
            (Encoding::Msgpack, Some(0x80..=0x8f | 0xde | 0xdf)) => msgpack(body),
            (Encoding::Json, Some(_)) => {
                // Say "not JSON" for garbage and "not an object" for valid JSON of another shape.
                return Err(
                    match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
                        Ok(_) => WireError::new(ErrorCode::BadRequest, NOT_AN_OBJECT),
                        Err(e) => WireError::new(
                            ErrorCode::BadRequest,
                            format!("body is not valid JSON: {e}"),
                        ),
                    },
                );
            }
            (Encoding::Msgpack, Some(_)) => {
                return Err(match body_from_msgpack::<serde::de::IgnoredAny>(body) {
                    Ok(_) => WireError::new(ErrorCode::BadRequest, NOT_AN_OBJECT),
                    Err(e) => WireError::new(
                        ErrorCode::BadRequest,
                        format!("body is neither JSON nor valid MessagePack: {e}"),
                    ),
                });
            }
        };
        result.map_err(|e| WireError::new(ErrorCode::BadRequest, e))
    }

    /// Encodes any serializable value in this encoding.
    pub fn encode<T: Serialize>(self, value: &T) -> Vec<u8> {
        match self {
            // Serializing plain data types to JSON or MessagePack cannot fail: they contain no
            // maps with non-string keys and no types that refuse to serialize.
            Encoding::Json => serde_json::to_vec(value).expect("reply types serialize to JSON"),
            Encoding::Msgpack => {
                rmp_serde::to_vec_named(value).expect("reply types serialize to MessagePack")
            }
        }
    }
}

pub use warden_core::error::{ErrorCode, WireError};

/// The reply envelope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub v: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<WireError>,
}

impl Envelope {
    /// Builds the envelope of a command's outcome.
    pub fn from_result(result: Result<Value, WireError>) -> Self {
        match result {
            Ok(v) => Envelope {
                v: ENVELOPE_VERSION,
                ok: true,
                result: Some(v),
                error: None,
            },
            Err(e) => Envelope {
                v: ENVELOPE_VERSION,
                ok: false,
                result: None,
                error: Some(e),
            },
        }
    }

    /// Turns a received envelope back into a result.
    pub fn into_result(self) -> Result<Value, WireError> {
        if self.ok {
            Ok(self.result.unwrap_or(Value::Null))
        } else {
            Err(self.error.unwrap_or_else(|| {
                WireError::new(ErrorCode::Internal, "error reply without an error")
            }))
        }
    }

    /// Decodes a reply body in either encoding.
    pub fn decode(body: &[u8]) -> Result<Envelope, WireError> {
        let enc = Encoding::detect(None, body)?;
        let value = enc.decode(body)?;
        serde_json::from_value(value)
            .map_err(|e| WireError::new(ErrorCode::Internal, format!("malformed reply: {e}")))
    }
}

/// Decodes a client's MessagePack body, nested at most `MAX_BODY_DEPTH` deep (as serde_json
/// does for JSON bodies).
fn body_from_msgpack<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
) -> Result<T, rmp_serde::decode::Error> {
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    de.set_max_depth(crate::limits::MAX_BODY_DEPTH);
    T::deserialize(&mut de)
}

/// Decodes what nodes write and send each other (forward batches, log entries, Raft
/// messages, snapshots), nested at most `MAX_DECODE_DEPTH` deep: the one bound of every
/// internal decoder, far above anything a client can get accepted (`limits`).
pub fn from_msgpack<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
) -> Result<T, rmp_serde::decode::Error> {
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    de.set_max_depth(crate::limits::MAX_DECODE_DEPTH);
    T::deserialize(&mut de)
}

/// `from_msgpack`, decoding as it reads from `input` (a snapshot file, which is never read
/// whole into memory).
pub fn from_msgpack_reader<T: serde::de::DeserializeOwned>(
    input: impl std::io::Read,
) -> Result<T, rmp_serde::decode::Error> {
    let mut de = rmp_serde::Deserializer::new(input);
    de.set_max_depth(crate::limits::MAX_DECODE_DEPTH);
    T::deserialize(&mut de)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_is_sniffed_from_the_first_byte_without_a_header() {
        assert_eq!(
            Encoding::detect(None, b"  {\"a\":1}").unwrap(),
            Encoding::Json
        );
        assert_eq!(
            Encoding::detect(None, &[0x81, 0xa1, b'a', 1]).unwrap(),
            Encoding::Msgpack
        );
        assert_eq!(
            Encoding::detect(Some("application/json"), b"\x81").unwrap(),
            Encoding::Json
        );
        let err = Encoding::detect(Some("text/plain"), b"{}").unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest);
    }

    #[test]
    fn bodies_that_are_not_objects_are_refused() {
        assert!(Encoding::Json.decode(b"[1,2]").is_err());
        assert!(Encoding::Json.decode(b"{nope").is_err());
        assert!(Encoding::Msgpack.decode(b"\xc1garbage").is_err());
        assert_eq!(Encoding::Json.decode(b"").unwrap(), serde_json::json!({}));
    }

    #[test]
    fn envelopes_round_trip_in_both_encodings() {
        for enc in [Encoding::Json, Encoding::Msgpack] {
            let e = Envelope::from_result(Err(WireError::new(ErrorCode::TooLarge, "big")));
            let back = Envelope::decode(&enc.encode(&e)).unwrap();
            assert_eq!(back.into_result().unwrap_err().code, ErrorCode::TooLarge);
            let ok = Envelope::from_result(Ok(serde_json::json!({"x": [1, "a"]})));
            let back = Envelope::decode(&enc.encode(&ok)).unwrap();
            assert_eq!(
                back.into_result().unwrap(),
                serde_json::json!({"x": [1, "a"]})
            );
        }
    }
}
