//! A sorted set of small integers tuned for the prefix index: most prefixes are held by exactly
//! one (worker, tier), so one holder lives inline and the type is 16 bytes.

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Holders {
    One(u32),
    /// Sorted, at least two entries.
    Many(Box<[u32]>),
}

impl Holders {
    pub(crate) fn one(h: u32) -> Self {
        Holders::One(h)
    }

    pub(crate) fn as_slice(&self) -> &[u32] {
        match self {
            Holders::One(h) => std::slice::from_ref(h),
            Holders::Many(v) => v,
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// Inserts `h` if absent.
    pub(crate) fn insert(&mut self, h: u32) {
        let s = self.as_slice();
        if let Err(pos) = s.binary_search(&h) {
            let mut v = Vec::with_capacity(s.len() + 1);
            v.extend_from_slice(&s[..pos]);
            v.push(h);
            v.extend_from_slice(&s[pos..]);
            *self = Holders::Many(v.into_boxed_slice());
        }
    }

    /// Removes `h` if present; returns whether the set is now empty.
    pub(crate) fn remove(&mut self, h: u32) -> bool {
        match self {
            Holders::One(x) => *x == h,
            Holders::Many(v) => {
                if let Ok(pos) = v.binary_search(&h) {
                    *self = if v.len() == 2 {
                        Holders::One(v[1 - pos])
                    } else {
                        let mut nv = Vec::with_capacity(v.len() - 1);
                        nv.extend_from_slice(&v[..pos]);
                        nv.extend_from_slice(&v[pos + 1..]);
                        Holders::Many(nv.into_boxed_slice())
                    };
                }
                false
            }
        }
    }

    /// Heap bytes owned (for memory accounting).
    pub(crate) fn heap_bytes(&self) -> usize {
        match self {
            Holders::One(_) => 0,
            Holders::Many(v) => std::mem::size_of_val(&**v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn is_sixteen_bytes() {
        assert_eq!(std::mem::size_of::<Holders>(), 16);
    }

    proptest! {
        #[test]
        fn behaves_like_a_sorted_set(ops in proptest::collection::vec((any::<bool>(), 0u32..8), 1..60)) {
            let mut h = Holders::one(ops[0].1);
            let mut model = BTreeSet::from([ops[0].1]);
            for &(ins, x) in &ops[1..] {
                if ins {
                    h.insert(x);
                    model.insert(x);
                } else if model.len() > 1 || !model.contains(&x) {
                    let empty = h.remove(x);
                    model.remove(&x);
                    prop_assert_eq!(empty, model.is_empty());
                }
                let want: Vec<u32> = model.iter().copied().collect();
                prop_assert_eq!(h.as_slice(), want.as_slice());
                prop_assert_eq!(h.len(), model.len());
            }
        }
    }
}
