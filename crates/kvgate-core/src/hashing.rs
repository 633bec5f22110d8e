//! Token blocks to block hashes, bit-for-bit as Dynamo's router computes them (CONTRACTS.md section 4).
//!
//! - local hash: `XXH3_64(LE bytes of the block's u32 tokens, seed)`; seed 1337, plus
//!   `XXH3_64(lora, 0)` with a LoRA adapter, plus `XXH3_64(salt, 1)` with a cache salt (wrapping adds;
//!   empty strings count as absent);
//! - sequence hash: `seq_0 = local_0`, `seq_i = XXH3_64(LE bytes of [seq_{i-1}, local_i] as u64, 1337)`;
//! - only complete blocks are hashed: a trailing partial block has no hash.

use crate::ids::{LocalHash, SeqHash};
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Dynamo's base seed for block hashing and for chaining.
pub const BASE_SEED: u64 = 1337;

/// The seed that identifies a cache namespace: the base seed mixed with an optional LoRA adapter
/// name and an optional cache salt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HashSeed(pub u64);

impl Default for HashSeed {
    fn default() -> Self {
        HashSeed(BASE_SEED)
    }
}

impl HashSeed {
    /// Mixes LoRA name and salt into the base seed. `Some("")` is the same as `None`.
    pub fn new(lora_name: Option<&str>, salt: Option<&str>) -> Self {
        let mut seed = BASE_SEED;
        if let Some(lora) = lora_name.filter(|s| !s.is_empty()) {
            seed = seed.wrapping_add(xxh3_64_with_seed(lora.as_bytes(), 0));
        }
        if let Some(salt) = salt.filter(|s| !s.is_empty()) {
            seed = seed.wrapping_add(xxh3_64_with_seed(salt.as_bytes(), 1));
        }
        HashSeed(seed)
    }
}

/// Hash of one block's tokens. The caller guarantees `tokens` is one whole block.
#[inline]
pub fn local_hash(tokens: &[u32], seed: HashSeed) -> LocalHash {
    LocalHash(xxh3_64_with_seed(token_bytes(tokens).as_ref(), seed.0))
}

/// The chained hash of a block given its parent's chained hash.
#[inline]
pub fn next_seq_hash(parent: SeqHash, local: LocalHash) -> SeqHash {
    let mut buf = [0u8; 16];
    buf[..8].copy_from_slice(&parent.0.to_le_bytes());
    buf[8..].copy_from_slice(&local.0.to_le_bytes());
    SeqHash(xxh3_64_with_seed(&buf, BASE_SEED))
}

/// Chained hash of a block that may be the first of its sequence (`parent == None`).
#[inline]
pub fn seq_hash_after(parent: Option<SeqHash>, local: LocalHash) -> SeqHash {
    match parent {
        None => SeqHash(local.0),
        Some(p) => next_seq_hash(p, local),
    }
}

/// Local hashes of every complete block of `tokens`.
pub fn local_hashes(tokens: &[u32], block_size: usize, seed: HashSeed) -> Vec<LocalHash> {
    if block_size == 0 {
        return Vec::new();
    }
    tokens
        .chunks_exact(block_size)
        .map(|block| local_hash(block, seed))
        .collect()
}

/// Chained hashes of a sequence of local hashes.
pub fn seq_hashes(locals: &[LocalHash]) -> Vec<SeqHash> {
    let mut out = Vec::with_capacity(locals.len());
    let mut parent = None;
    for &local in locals {
        let h = seq_hash_after(parent, local);
        out.push(h);
        parent = Some(h);
    }
    out
}

/// Both hash kinds for a token sequence, extendable as more tokens arrive (multi-turn
/// conversations and decode), so that earlier blocks are never hashed twice.
#[derive(Clone, Debug)]
pub struct BlockHashes {
    block_size: usize,
    seed: HashSeed,
    locals: Vec<LocalHash>,
    seqs: Vec<SeqHash>,
    /// Tokens after the last complete block, waiting for the block to fill.
    pending: Vec<u32>,
}

impl BlockHashes {
    /// # Panics
    /// Never; a zero `block_size` is treated as "no blocks" (configuration validation refuses it).
    pub fn new(block_size: usize, seed: HashSeed) -> Self {
        Self {
            block_size,
            seed,
            locals: Vec::new(),
            seqs: Vec::new(),
            pending: Vec::new(),
        }
    }

    pub fn from_tokens(tokens: &[u32], block_size: usize, seed: HashSeed) -> Self {
        let mut h = Self::new(block_size, seed);
        h.extend(tokens);
        h
    }

    /// Appends tokens, hashing every block they complete.
    pub fn extend(&mut self, mut tokens: &[u32]) {
        if self.block_size == 0 {
            return;
        }
        if !self.pending.is_empty() {
            let need = self.block_size - self.pending.len();
            let take = need.min(tokens.len());
            self.pending.extend_from_slice(&tokens[..take]);
            tokens = &tokens[take..];
            if self.pending.len() == self.block_size {
                let local = local_hash(&self.pending, self.seed);
                self.push(local);
                self.pending.clear();
            }
        }
        let mut blocks = tokens.chunks_exact(self.block_size);
        self.locals.reserve(blocks.len());
        self.seqs.reserve(blocks.len());
        for block in &mut blocks {
            let local = local_hash(block, self.seed);
            self.push(local);
        }
        self.pending.extend_from_slice(blocks.remainder());
    }

    fn push(&mut self, local: LocalHash) {
        let seq = seq_hash_after(self.seqs.last().copied(), local);
        self.locals.push(local);
        self.seqs.push(seq);
    }

    pub fn locals(&self) -> &[LocalHash] {
        &self.locals
    }

    pub fn seqs(&self) -> &[SeqHash] {
        &self.seqs
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Number of tokens seen, including the partial block.
    pub fn num_tokens(&self) -> usize {
        self.locals.len() * self.block_size + self.pending.len()
    }
}

/// The tokens as little-endian bytes, without copying on little-endian machines.
fn token_bytes(tokens: &[u32]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        std::borrow::Cow::Borrowed(bytemuck::cast_slice(tokens))
    } else {
        std::borrow::Cow::Owned(tokens.iter().flat_map(|t| t.to_le_bytes()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn partial_block_is_not_hashed() {
        assert!(local_hashes(&[1, 2, 3], 4, HashSeed::default()).is_empty());
        assert_eq!(
            local_hashes(&[1, 2, 3, 4, 5], 4, HashSeed::default()).len(),
            1
        );
        assert!(local_hashes(&[1, 2, 3], 0, HashSeed::default()).is_empty());
    }

    #[test]
    fn first_seq_hash_is_local_hash() {
        let locals = local_hashes(&[7; 32], 16, HashSeed::default());
        let seqs = seq_hashes(&locals);
        assert_eq!(seqs[0].0, locals[0].0);
        assert_ne!(seqs[1].0, locals[1].0);
        // identical blocks at different positions get different sequence hashes
        assert_eq!(locals[0], locals[1]);
        assert_ne!(seqs[0], seqs[1]);
    }

    #[test]
    fn empty_lora_and_salt_are_absent() {
        assert_eq!(HashSeed::new(Some(""), Some("")), HashSeed::default());
        assert_ne!(HashSeed::new(Some("a"), None), HashSeed::default());
        assert_ne!(HashSeed::new(None, Some("a")), HashSeed::default());
        // lora and salt are mixed with different inner seeds: same string, different namespace
        assert_ne!(
            HashSeed::new(Some("a"), None),
            HashSeed::new(None, Some("a"))
        );
    }

    #[test]
    fn local_hash_is_xxh3_of_le_bytes() {
        let tokens = [1u32, 2, 0x01020304, u32::MAX];
        let mut bytes = Vec::new();
        for t in tokens {
            bytes.extend_from_slice(&t.to_le_bytes());
        }
        assert_eq!(
            local_hash(&tokens, HashSeed::default()).0,
            xxh3_64_with_seed(&bytes, 1337)
        );
    }

    proptest! {
        #[test]
        fn hashes_of_a_prefix_are_a_prefix_of_the_hashes(
            tokens in proptest::collection::vec(any::<u32>(), 0..300),
            cut in 0usize..300,
            block_size in 1usize..40,
        ) {
            let cut = cut.min(tokens.len());
            let seed = HashSeed::new(Some("lora"), None);
            let full = BlockHashes::from_tokens(&tokens, block_size, seed);
            let prefix = BlockHashes::from_tokens(&tokens[..cut], block_size, seed);
            prop_assert_eq!(prefix.locals(), &full.locals()[..prefix.locals().len()]);
            prop_assert_eq!(prefix.seqs(), &full.seqs()[..prefix.seqs().len()]);
            prop_assert_eq!(prefix.locals().len(), cut / block_size);
        }

        #[test]
        fn incremental_extension_equals_one_shot(
            tokens in proptest::collection::vec(any::<u32>(), 0..300),
            splits in proptest::collection::vec(0usize..300, 0..6),
            block_size in 1usize..40,
        ) {
            let seed = HashSeed::default();
            let one_shot = BlockHashes::from_tokens(&tokens, block_size, seed);
            let mut inc = BlockHashes::new(block_size, seed);
            let mut points: Vec<usize> = splits.into_iter().map(|s| s.min(tokens.len())).collect();
            points.sort_unstable();
            let mut start = 0;
            for p in points {
                inc.extend(&tokens[start..p]);
                start = p;
            }
            inc.extend(&tokens[start..]);
            prop_assert_eq!(inc.locals(), one_shot.locals());
            prop_assert_eq!(inc.seqs(), one_shot.seqs());
            prop_assert_eq!(inc.num_tokens(), tokens.len());
            prop_assert_eq!(seq_hashes(one_shot.locals()), one_shot.seqs().to_vec());
        }

        #[test]
        fn a_changed_token_changes_its_block_and_all_later_seq_hashes(
            tokens in proptest::collection::vec(any::<u32>(), 64..200),
            at in 0usize..64,
        ) {
            let bs = 16;
            let mut other = tokens.clone();
            other[at] = other[at].wrapping_add(1);
            let a = BlockHashes::from_tokens(&tokens, bs, HashSeed::default());
            let b = BlockHashes::from_tokens(&other, bs, HashSeed::default());
            let changed = at / bs;
            for i in 0..a.seqs().len() {
                if i < changed {
                    prop_assert_eq!(a.seqs()[i], b.seqs()[i]);
                } else {
                    prop_assert_ne!(a.seqs()[i], b.seqs()[i]);
                }
            }
        }
    }
}
