//! Rendezvous (highest random weight) hashing: a key's score with each
//! candidate is a hash of both, and the candidate with the highest score
//! wins. The same key picks the same candidate while the set is unchanged,
//! and when one leaves or joins only the keys it owned move (about 1/N).
//! The Router picks a worker of a service this way, and a node of a
//! cluster for a keyed request to a service other nodes serve. A worker's
//! part is hashed once, at registration; a request hashes its key once and
//! mixes it with each candidate's.

/// FNV-1a over `bytes`: stable across runs and hosts, so a key maps to the
/// same candidate after a restart, and on every broker alike.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// A candidate's part: its id (a worker's process id, a node's name).
pub(crate) fn id_hash(id: &str) -> u64 {
    fnv1a(id.as_bytes())
}

/// A request's part: its key.
pub(crate) fn key_hash(key: &str) -> u64 {
    fnv1a(key.as_bytes())
}

/// The score of a key with a candidate: the two hashes mixed by the
/// splitmix64 finalizer, so that every bit of both moves the result.
#[inline]
pub(crate) fn score(key: u64, candidate: u64) -> u64 {
    let mut z = key ^ candidate.rotate_left(32);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
