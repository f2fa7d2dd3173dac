//! Times in the registry's most numerous records (an agent's `created_at` and `updated_at`, a
//! checkpoint's `time`): RFC 3339 text in JSON and every human-readable format, so answers
//! and events read as before; nanoseconds since 1970 in MessagePack (snapshots and the log),
//! 9 bytes instead of 31 and no text to parse: a million agents' snapshot holds two million
//! of them. Either form is read, so snapshots and logs written before still load. A time
//! beyond what nanoseconds in an `i64` hold (after 2262) is written as text.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{de, Deserializer, Serializer};

pub(super) fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    match t.timestamp_nanos_opt() {
        Some(nanos) if !s.is_human_readable() => s.serialize_i64(nanos),
        _ => serde::Serialize::serialize(t, s),
    }
}

pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
    struct Time;

    impl de::Visitor<'_> for Time {
        type Value = DateTime<Utc>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a time: RFC 3339 text, or nanoseconds since 1970")
        }

        fn visit_i64<E: de::Error>(self, nanos: i64) -> Result<Self::Value, E> {
            Ok(DateTime::from_timestamp_nanos(nanos))
        }

        fn visit_u64<E: de::Error>(self, nanos: u64) -> Result<Self::Value, E> {
            i64::try_from(nanos)
                .map(DateTime::from_timestamp_nanos)
                .map_err(|_| E::custom("a time in nanoseconds past 2262"))
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
            text.parse().map_err(E::custom)
        }
    }

    // Not `deserialize_str` for human-readable formats: inside an internally tagged enum (a
    // log entry's command) serde buffers the value and calls itself human-readable whatever
    // the format was, and a time written as nanoseconds must still read.
    d.deserialize_any(Time)
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Stamp(#[serde(with = "super")] DateTime<Utc>);

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Plain(DateTime<Utc>);

    /// Goal: a time is text in JSON, exactly as chrono writes it; nanoseconds in MessagePack,
    /// whole to the nanosecond; and MessagePack written with chrono's text still reads.
    #[test]
    fn times_are_text_for_people_and_numbers_for_the_log_and_read_both_ways() {
        let t = DateTime::from_timestamp(1_700_000_000, 123_456_789).unwrap();
        let json = serde_json::to_string(&Stamp(t)).unwrap();
        assert_eq!(json, serde_json::to_string(&Plain(t)).unwrap());
        assert_eq!(serde_json::from_str::<Stamp>(&json).unwrap(), Stamp(t));
        let packed = rmp_serde::to_vec(&Stamp(t)).unwrap();
        let text = rmp_serde::to_vec(&Plain(t)).unwrap();
        assert!(
            packed.len() + 20 <= text.len(),
            "{} against {}",
            packed.len(),
            text.len()
        );
        for bytes in [packed, text] {
            assert_eq!(rmp_serde::from_slice::<Stamp>(&bytes).unwrap(), Stamp(t));
        }
        let far = DateTime::from_timestamp(10_000_000_000, 0).unwrap();
        let bytes = rmp_serde::to_vec(&Stamp(far)).unwrap();
        assert_eq!(rmp_serde::from_slice::<Stamp>(&bytes).unwrap(), Stamp(far));
        assert!(rmp_serde::from_slice::<Stamp>(&rmp_serde::to_vec(&u64::MAX).unwrap()).is_err());
    }
}
