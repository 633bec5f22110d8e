//! A cheap hasher for maps keyed by u64 block hashes and small ids.
//!
//! Keys are mostly XXH3 outputs already, but engines' hashes and test ids can be small sequential
//! integers, so a folded 128-bit multiply spreads every input bit over the whole word.
//! Not DoS-resistant: only engine- and router-computed keys go here, never client strings.

use std::hash::{BuildHasherDefault, Hasher};

#[derive(Default, Clone, Copy)]
pub struct U64Hasher(u64);

const K: u64 = 0x9E37_79B9_7F4A_7C15;

impl Hasher for U64Hasher {
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }

    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut buf = [0u8; 8];
            buf[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(buf));
        }
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        let m = u128::from(self.0 ^ n).wrapping_mul(u128::from(K));
        self.0 = (m as u64) ^ ((m >> 64) as u64);
    }

    #[inline]
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

pub type BuildU64Hasher = BuildHasherDefault<U64Hasher>;
pub type FastMap<K, V> = std::collections::HashMap<K, V, BuildU64Hasher>;
pub type FastSet<K> = std::collections::HashSet<K, BuildU64Hasher>;
