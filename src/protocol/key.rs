//! `key`: a request's routing key (session affinity, protocol v1.1).
//!
//! A request to a service name may carry `key`, a str of at most
//! [`MAX_KEY_BYTES`] bytes: the broker sends every request with the same key
//! to the same worker while the set of ready workers is unchanged.
//!
//! A key that breaks the rule (a longer str, a str that is not UTF-8, any
//! other MessagePack type) does **not** make the frame invalid: the codec
//! decodes the envelope with [`RequestKey::Invalid`], which keeps the value's
//! raw bytes. Refusing it is the router's business (the request is answered
//! `bad_request`, with [`RequestKey::problem`] as the reason), so a bad key is
//! answered like a bad payload rather than counted as a bad frame, and a
//! relay that forwards the envelope writes the value back byte for byte.

use bytestring::ByteString;
use std::fmt;

use super::msgpack::{Reader, kind_name};
use super::payload::Payload;

/// The longest key, in bytes of its UTF-8 text.
pub const MAX_KEY_BYTES: usize = 256;

/// The `key` of a request, as decoded.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RequestKey {
    /// A str of at most [`MAX_KEY_BYTES`] bytes: what routing hashes. A
    /// slice of the frame it was decoded from.
    Str(ByteString),
    /// Any other value, kept as its raw MessagePack bytes (see
    /// [`problem`](Self::problem) for what is wrong with it).
    Invalid(Payload),
}

/// What is wrong with a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// A str longer than [`MAX_KEY_BYTES`].
    #[error("key is {0} bytes long, more than {MAX_KEY_BYTES}")]
    TooLong(usize),
    /// A str whose bytes are not UTF-8.
    #[error("key is not valid UTF-8")]
    NotUtf8,
    /// Not a str at all.
    #[error("key must be a str, found {0}")]
    NotAString(&'static str),
}

impl RequestKey {
    /// A key from text: [`Str`](Self::Str) if it fits the limit.
    pub fn new(key: impl Into<ByteString>) -> Result<Self, KeyError> {
        let key = key.into();
        if key.len() > MAX_KEY_BYTES {
            return Err(KeyError::TooLong(key.len()));
        }
        Ok(Self::Str(key))
    }

    /// The key's text, or why there is none.
    pub fn as_str(&self) -> Result<&str, KeyError> {
        match self {
            Self::Str(key) => Ok(key),
            Self::Invalid(raw) => Err(Self::classify(raw)),
        }
    }

    /// Why the key cannot be used for routing, if it cannot.
    pub fn problem(&self) -> Option<KeyError> {
        self.as_str().err()
    }

    /// The key as MessagePack bytes are written: its text, or the raw value.
    pub(crate) fn encoded_len(&self) -> usize {
        match self {
            Self::Str(key) => super::msgpack::str_len(key),
            Self::Invalid(raw) => raw.len(),
        }
    }

    /// What is wrong with a value that did not decode as a valid key.
    fn classify(raw: &Payload) -> KeyError {
        let bytes = raw.as_bytes();
        let mut reader = Reader::new(bytes);
        let Ok(marker) = reader.marker() else {
            return KeyError::NotAString("nothing");
        };
        match reader.str_body(marker) {
            Ok(Some(range)) if range.len() > MAX_KEY_BYTES => KeyError::TooLong(range.len()),
            Ok(Some(_)) => KeyError::NotUtf8,
            _ => KeyError::NotAString(kind_name(marker)),
        }
    }
}

impl fmt::Display for RequestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Str(key) => f.write_str(key),
            Self::Invalid(raw) => write!(f, "<invalid key: {}>", Self::classify(raw)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_refuses_a_key_over_the_limit() {
        let longest = "k".repeat(MAX_KEY_BYTES);
        assert_eq!(
            RequestKey::new(longest.clone()).expect("fits").as_str(),
            Ok(longest.as_str())
        );
        assert_eq!(
            RequestKey::new("k".repeat(MAX_KEY_BYTES + 1)),
            Err(KeyError::TooLong(MAX_KEY_BYTES + 1))
        );
    }

    #[test]
    fn an_invalid_key_says_what_is_wrong() {
        let raw = |bytes: Vec<u8>| RequestKey::Invalid(Payload::from_msgpack(bytes).expect("one"));
        assert_eq!(
            raw(vec![0x2a]).problem(),
            Some(KeyError::NotAString("uint"))
        );
        assert_eq!(
            raw(vec![0xa2, 0xff, 0xfe]).problem(),
            Some(KeyError::NotUtf8)
        );
        let mut long = vec![0xda, 0x01, 0x01];
        long.extend(std::iter::repeat_n(b'k', 257));
        assert_eq!(raw(long).problem(), Some(KeyError::TooLong(257)));
    }
}
