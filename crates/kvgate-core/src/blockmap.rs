//! A member's engine-hash -> slot table in the prefix index: open addressing with linear probing
//! and backward-shift deletion.
//!
//! Every stored block inserts a key and every evicted block removes one, so a worker's table sees
//! constant churn at a steady size. General-purpose tables leave a tombstone per removal, which
//! lengthens probes until the next rehash; backward shifting leaves none, so probes stay short at
//! a fixed load bound. Key and value share a 12-byte bucket (one cache line per probe), keys are
//! placed by a multiplicative (Fibonacci) hash so that small or sequential engine hashes spread
//! too, and the table shrinks when it empties, so memory follows the worker's cache size.
//! Not DoS-resistant: keys are engine-computed block hashes, never client input.

const EMPTY: u64 = 0;
const MIN_BUCKETS: usize = 16;
/// Grow past 5/8 full; shrink below 1/8.
const MAX_LOAD_NUM: usize = 5;
const MAX_LOAD_DEN: usize = 8;

/// One bucket: the key's low and high halves, then the value. Key and value sit side by side
/// (12 bytes, 4-byte aligned), so a probe that finds its key has its value in the same cache
/// line (a bucket straddles two lines one time in eight).
type Bucket = [u32; 3];

const EMPTY_BUCKET: Bucket = [0; 3];

#[inline]
fn key_of(b: &Bucket) -> u64 {
    u64::from(b[0]) | (u64::from(b[1]) << 32)
}

#[inline]
fn bucket_of(key: u64, val: u32) -> Bucket {
    [key as u32, (key >> 32) as u32, val]
}

#[derive(Clone, Debug, Default)]
pub(crate) struct BlockMap {
    /// A key of [`EMPTY`] marks a free bucket; the key 0 itself is kept in `zero`.
    buckets: Vec<Bucket>,
    zero: Option<u32>,
    len: usize,
    /// 64 - log2(buckets).
    shift: u32,
}

impl BlockMap {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[cfg(test)]
    fn num_buckets(&self) -> usize {
        self.buckets.len()
    }

    #[inline]
    fn home(&self, key: u64) -> usize {
        (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift) as usize
    }

    #[inline]
    fn mask(&self) -> usize {
        self.buckets.len() - 1
    }

    /// The bucket holding `key` (never [`EMPTY`]), if any.
    #[inline]
    fn bucket(&self, key: u64) -> Option<usize> {
        if self.buckets.is_empty() {
            return None;
        }
        let mask = self.mask();
        let mut i = self.home(key);
        loop {
            match key_of(&self.buckets[i]) {
                k if k == key => return Some(i),
                EMPTY => return None,
                _ => i = (i + 1) & mask,
            }
        }
    }

    #[inline]
    pub(crate) fn get(&self, key: u64) -> Option<u32> {
        if key == EMPTY {
            return self.zero;
        }
        self.bucket(key).map(|i| self.buckets[i][2])
    }

    /// Loads the home buckets of `keys` together, without using them: the loads are
    /// independent, so their cache misses overlap, and the probes that follow hit the cache. A
    /// safe stand-in for prefetching (a batch's worth of keys, not the whole table). Both ends
    /// of a bucket are read, for the one in eight that straddles two cache lines.
    #[inline]
    pub(crate) fn touch_all(&self, keys: impl Iterator<Item = u64>) {
        if self.buckets.is_empty() {
            return;
        }
        let mut acc = 0u32;
        for k in keys {
            let b = &self.buckets[self.home(k)];
            acc ^= b[0] ^ b[2];
        }
        std::hint::black_box(acc);
    }

    /// Inserts or replaces; returns the previous value.
    #[inline]
    pub(crate) fn insert(&mut self, key: u64, val: u32) -> Option<u32> {
        if key == EMPTY {
            let old = self.zero.replace(val);
            if old.is_none() {
                self.len += 1;
            }
            return old;
        }
        if (self.len + 1) * MAX_LOAD_DEN > self.buckets.len() * MAX_LOAD_NUM {
            self.resize((self.buckets.len() * 2).max(MIN_BUCKETS));
        }
        let mask = self.mask();
        let mut i = self.home(key);
        loop {
            let b = &mut self.buckets[i];
            let k = key_of(b);
            if k == key {
                return Some(std::mem::replace(&mut b[2], val));
            }
            if k == EMPTY {
                *b = bucket_of(key, val);
                self.len += 1;
                return None;
            }
            i = (i + 1) & mask;
        }
    }

    #[inline]
    pub(crate) fn remove(&mut self, key: u64) -> Option<u32> {
        if key == EMPTY {
            let old = self.zero.take();
            if old.is_some() {
                self.len -= 1;
            }
            return old;
        }
        let i = self.bucket(key)?;
        let mask = self.mask();
        let val = self.buckets[i][2];
        // Shift back every following key of the cluster that may move into the hole.
        let mut hole = i;
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let b = self.buckets[j];
            let k = key_of(&b);
            if k == EMPTY {
                break;
            }
            let home = self.home(k);
            // `k` may fill the hole if its home is not cyclically within (hole, j].
            let stays = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if !stays {
                self.buckets[hole] = b;
                hole = j;
            }
        }
        self.buckets[hole] = EMPTY_BUCKET;
        self.len -= 1;
        if self.buckets.len() > MIN_BUCKETS && self.len * 8 < self.buckets.len() {
            self.resize(self.buckets.len() / 2);
        }
        Some(val)
    }

    fn resize(&mut self, buckets: usize) {
        let old = std::mem::replace(&mut self.buckets, vec![EMPTY_BUCKET; buckets]);
        self.shift = 64 - buckets.trailing_zeros();
        let mask = buckets - 1;
        for b in old {
            let k = key_of(&b);
            if k == EMPTY {
                continue;
            }
            let mut i = self.home(k);
            while key_of(&self.buckets[i]) != EMPTY {
                i = (i + 1) & mask;
            }
            self.buckets[i] = b;
        }
    }

    /// Makes room for `more` keys at once (a `Stored` chain), so the table grows once.
    pub(crate) fn reserve(&mut self, more: usize) {
        let need = self.len + more;
        if need * MAX_LOAD_DEN > self.buckets.len() * MAX_LOAD_NUM {
            let mut buckets = self.buckets.len().max(MIN_BUCKETS);
            while need * MAX_LOAD_DEN > buckets * MAX_LOAD_NUM {
                buckets *= 2;
            }
            self.resize(buckets);
        }
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.zero.map(|v| (EMPTY, v)).into_iter().chain(
            self.buckets
                .iter()
                .map(|b| (key_of(b), b[2]))
                .filter(|(k, _)| *k != EMPTY),
        )
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = u32> + '_ {
        self.iter().map(|(_, v)| v)
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        self.buckets.capacity() * std::mem::size_of::<Bucket>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// Inserts and removes over a small key space (so that clusters, wrap-around and
        /// backward shifts happen) agree with `HashMap`; the table grows and shrinks.
        #[test]
        fn agrees_with_a_hash_map(ops in proptest::collection::vec((any::<bool>(), 0u64..48, any::<u32>()), 1..400), spread in any::<bool>()) {
            let mut m = BlockMap::default();
            let mut model: HashMap<u64, u32> = HashMap::new();
            // Keys small and sequential, or spread over the whole range.
            let key = |k: u64| if spread { k.wrapping_mul(0xD6E8_FEB8_6659_FD93) } else { k };
            for &(ins, k, v) in &ops {
                let k = key(k);
                if ins {
                    prop_assert_eq!(m.insert(k, v), model.insert(k, v));
                } else {
                    prop_assert_eq!(m.remove(k), model.remove(&k));
                }
                prop_assert_eq!(m.len(), model.len());
                let in_buckets = m.len - usize::from(m.zero.is_some());
                prop_assert!(in_buckets * MAX_LOAD_DEN <= m.num_buckets() * MAX_LOAD_NUM);
            }
            for k in 0..48 {
                let k = key(k);
                prop_assert_eq!(m.get(k), model.get(&k).copied());
            }
            let mut got: Vec<(u64, u32)> = m.iter().collect();
            let mut want: Vec<(u64, u32)> = model.into_iter().collect();
            got.sort_unstable();
            want.sort_unstable();
            prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn shrinks_when_emptied_and_reserves_once() {
        let mut m = BlockMap::default();
        m.reserve(10_000);
        let buckets = m.num_buckets();
        assert!(buckets * MAX_LOAD_NUM >= 10_000 * MAX_LOAD_DEN);
        for k in 1..=10_000u64 {
            m.insert(k, k as u32);
        }
        assert_eq!(m.num_buckets(), buckets, "no growth after reserve");
        for k in 1..=10_000u64 {
            assert_eq!(m.remove(k), Some(k as u32));
        }
        assert!(m.num_buckets() <= MIN_BUCKETS * 2, "{}", m.num_buckets());
        assert!(m.is_empty());
    }
}
