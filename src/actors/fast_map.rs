//! The hash map of the hot path.

use std::collections::HashMap;

/// foldhash instead of SipHash: the Router's maps are hit several times per
/// message, and SipHash showed as 10 % of a round trip.
pub(crate) type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
