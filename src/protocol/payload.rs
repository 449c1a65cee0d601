//! `payload`: one MessagePack value, kept as the bytes it arrived in.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::fmt;

/// Scratch capacity a thread keeps between payload encodings.
const SCRATCH_KEEP: usize = 64 * 1024;

use super::msgpack::{self, SingleValueError};

/// Exactly one MessagePack value, carried verbatim.
///
/// The broker never decodes a payload: a decoded envelope's payload is a slice
/// of the frame (no copy), and encoding writes those bytes back unchanged, so a
/// payload survives any number of hops byte for byte, including values serde
/// has no type for (ext, non-string map keys, f32 vs f64).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Payload(Bytes);

/// A payload could not be built or read as the requested type.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// The value could not be serialized to MessagePack.
    #[error("cannot encode payload: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    /// The payload's value does not fit the requested type.
    #[error("payload does not fit: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    /// The bytes are not exactly one MessagePack value.
    #[error("payload is not one MessagePack value: {0}")]
    NotMsgpack(#[from] SingleValueError),
}

impl Payload {
    /// MessagePack `nil`: what an absent payload reads as.
    pub const NIL_BYTES: &'static [u8] = &[0xc0];

    /// MessagePack `nil` as a payload (allocates nothing).
    pub fn nil() -> Self {
        Self(Bytes::from_static(Self::NIL_BYTES))
    }

    /// Serializes `value` with named fields (a struct becomes a map with string
    /// keys, readable as a dict by any msgpack library).
    ///
    /// Serializes into a per-thread scratch buffer and copies the result out
    /// at its exact size: one allocation, where growing a fresh vector costs
    /// three or four for a small payload.
    pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Self, PayloadError> {
        thread_local! {
            static SCRATCH: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(SCRATCH_KEEP));
        }
        SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
            Ok(mut buf) => {
                buf.clear();
                let encoded = rmp_serde::encode::write_named(&mut *buf, value);
                let out = encoded.map(|()| Self(Bytes::copy_from_slice(&buf)));
                if buf.capacity() > SCRATCH_KEEP {
                    // A huge payload does not pin its buffer for the thread's life.
                    *buf = Vec::with_capacity(SCRATCH_KEEP);
                }
                Ok(out?)
            }
            // Re-entered from inside a `Serialize` impl: use a fresh buffer.
            Err(_) => Ok(Self(Bytes::from(rmp_serde::to_vec_named(value)?))),
        })
    }

    /// Wraps bytes that already hold one MessagePack value, after checking that
    /// they hold exactly one (no more, no less).
    pub fn from_msgpack(bytes: impl Into<Bytes>) -> Result<Self, PayloadError> {
        let bytes = bytes.into();
        msgpack::check_single_value(&bytes)?;
        Ok(Self(bytes))
    }

    /// A slice the envelope reader has already walked as one value.
    pub(crate) fn from_checked(bytes: Bytes) -> Self {
        Self(bytes)
    }

    /// Deserializes the value into `T`.
    pub fn decode<'de, T: Deserialize<'de>>(&'de self) -> Result<T, PayloadError> {
        Ok(rmp_serde::from_slice(&self.0)?)
    }

    /// The raw MessagePack bytes.
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    /// The raw MessagePack bytes, owned.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    /// Encoded size in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never true for a valid payload (one value is at least one byte); here
    /// for the `len`/`is_empty` convention.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 32;
        write!(f, "Payload({} B:", self.0.len())?;
        for b in self.0.iter().take(SHOWN) {
            write!(f, " {b:02x}")?;
        }
        if self.0.len() > SHOWN {
            f.write_str(" …")?;
        }
        f.write_str(")")
    }
}
