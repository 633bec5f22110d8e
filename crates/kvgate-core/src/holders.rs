//! Who holds a prefix position, as one `u32` per position: the prefix index's holder sets.
//!
//! Most positions are held by exactly one (worker, tier), and consecutive positions of a chain
//! are almost always held by the same set. So a set is a [`SetRef`]:
//! - [`NO_HOLDERS`] for the empty set;
//! - the holder itself (below [`INTERNED`]) for a set of one;
//! - otherwise `INTERNED | id` of a sorted holder list interned in [`HolderSets`], shared by
//!   every position with that set and reference counted.
//!
//! Equal sets have equal refs, so a query walking a chain compares one integer per block and
//! intersects lists only where the set changes; a `Stored` chain that adds one holder to a run
//! of positions with the same set reuses the last transition instead of hashing the list again.

use crate::fasthash::FastMap;

/// A holder set, encoded as described in the module docs.
pub(crate) type SetRef = u32;

/// The empty set.
pub(crate) const NO_HOLDERS: SetRef = u32::MAX;
/// Set on refs naming an interned list; holders themselves stay below it.
pub(crate) const INTERNED: u32 = 1 << 31;

#[derive(Debug)]
struct Interned {
    members: Box<[u32]>,
    refs: u32,
}

#[derive(Debug, Default)]
pub(crate) struct HolderSets {
    sets: Vec<Interned>,
    ids: FastMap<Box<[u32]>, u32>,
    free: Vec<u32>,
    /// The last (set, holder) -> set transitions, valid until a set is freed (its id may be
    /// reused).
    last_add: Option<(SetRef, u32, SetRef)>,
    last_remove: Option<(SetRef, u32, SetRef)>,
}

impl HolderSets {
    /// The members of `*set`, sorted (borrowing the ref itself for a set of one).
    #[inline]
    pub(crate) fn members<'a>(&'a self, set: &'a SetRef) -> &'a [u32] {
        match *set {
            NO_HOLDERS => &[],
            s if s & INTERNED == 0 => std::slice::from_ref(set),
            s => &self.sets[(s & !INTERNED) as usize].members,
        }
    }

    pub(crate) fn contains(&self, set: SetRef, h: u32) -> bool {
        self.members(&set).binary_search(&h).is_ok()
    }

    /// Distinct interned sets (of two or more holders) alive.
    #[cfg(test)]
    pub(crate) fn interned(&self) -> usize {
        self.ids.len()
    }

    /// `set ∪ {h}`; the caller's reference moves from `set` to the result.
    pub(crate) fn with(&mut self, set: SetRef, h: u32) -> SetRef {
        debug_assert!(h < INTERNED);
        self.transition(true, set, h)
    }

    /// `set \ {h}`; the caller's reference moves from `set` to the result.
    pub(crate) fn without(&mut self, set: SetRef, h: u32) -> SetRef {
        self.transition(false, set, h)
    }

    /// `set` with `h` added (`add`) or removed, through the memo of the last such transition.
    fn transition(&mut self, add: bool, set: SetRef, h: u32) -> SetRef {
        let memo = if add { self.last_add } else { self.last_remove };
        if let Some((from, x, to)) = memo
            && from == set
            && x == h
        {
            self.retain(to);
            self.release(set);
            return to;
        }
        let m = self.members(&set);
        let to = match (m.binary_search(&h), add) {
            // Already in (adding) or already out (removing): the same set.
            (Ok(_), true) | (Err(_), false) => {
                self.retain(set);
                set
            }
            (Err(pos), true) => {
                let mut v = Vec::with_capacity(m.len() + 1);
                v.extend_from_slice(&m[..pos]);
                v.push(h);
                v.extend_from_slice(&m[pos..]);
                self.intern(v)
            }
            (Ok(pos), false) => {
                let mut v = Vec::with_capacity(m.len() - 1);
                v.extend_from_slice(&m[..pos]);
                v.extend_from_slice(&m[pos + 1..]);
                self.intern(v)
            }
        };
        self.release(set);
        // `release` may have freed `set`; a transition from a freed set must not be reused.
        if self.is_alive(set) {
            let memo = if add {
                &mut self.last_add
            } else {
                &mut self.last_remove
            };
            *memo = Some((set, h, to));
        }
        to
    }

    fn is_alive(&self, set: SetRef) -> bool {
        set == NO_HOLDERS
            || set & INTERNED == 0
            || self
                .sets
                .get((set & !INTERNED) as usize)
                .is_some_and(|s| s.refs > 0)
    }

    /// The ref of the sorted list `v`, with one more reference.
    fn intern(&mut self, v: Vec<u32>) -> SetRef {
        match v.len() {
            0 => NO_HOLDERS,
            1 => v[0],
            _ => {
                if let Some(&id) = self.ids.get(v.as_slice()) {
                    self.sets[id as usize].refs += 1;
                    return id | INTERNED;
                }
                let members = v.into_boxed_slice();
                let entry = Interned {
                    members: members.clone(),
                    refs: 1,
                };
                let id = match self.free.pop() {
                    Some(id) => {
                        self.sets[id as usize] = entry;
                        id
                    }
                    None => {
                        self.sets.push(entry);
                        (self.sets.len() - 1) as u32
                    }
                };
                self.ids.insert(members, id);
                id | INTERNED
            }
        }
    }

    fn retain(&mut self, set: SetRef) {
        if set != NO_HOLDERS && set & INTERNED != 0 {
            self.sets[(set & !INTERNED) as usize].refs += 1;
        }
    }

    /// Drops one reference to `set`.
    pub(crate) fn release(&mut self, set: SetRef) {
        if set == NO_HOLDERS || set & INTERNED == 0 {
            return;
        }
        let id = set & !INTERNED;
        let s = &mut self.sets[id as usize];
        s.refs -= 1;
        if s.refs == 0 {
            let members = std::mem::take(&mut s.members);
            self.ids.remove(&members);
            self.free.push(id);
            self.last_add = None;
            self.last_remove = None;
        }
    }

    /// Heap bytes owned (for memory accounting).
    pub(crate) fn heap_bytes(&self) -> usize {
        let lists: usize = self.sets.iter().map(|s| 2 * s.members.len() * 4).sum();
        let ids = if self.ids.capacity() == 0 {
            0
        } else {
            (self.ids.capacity() * 8 / 7).next_power_of_two()
                * (std::mem::size_of::<(Box<[u32]>, u32)>() + 1)
        };
        lists
            + ids
            + self.sets.capacity() * std::mem::size_of::<Interned>()
            + self.free.capacity() * 4
    }

    /// Checks reference counts against the refs in use (for tests).
    pub(crate) fn check(&self, refs_in_use: impl Iterator<Item = SetRef>) -> Result<(), String> {
        let mut counted = vec![0u32; self.sets.len()];
        for r in refs_in_use {
            if r != NO_HOLDERS && r & INTERNED != 0 {
                match counted.get_mut((r & !INTERNED) as usize) {
                    Some(c) => *c += 1,
                    None => return Err(format!("set ref {r:#x} names no set")),
                }
            }
        }
        for (id, (s, &c)) in self.sets.iter().zip(&counted).enumerate() {
            if s.refs != c {
                return Err(format!("set {id}: {} refs counted, {c} in use", s.refs));
            }
            if c > 0 && self.ids.get(&s.members) != Some(&(id as u32)) {
                return Err(format!("set {id} is not interned under its members"));
            }
        }
        if self.ids.len() + self.free.len() != self.sets.len() {
            return Err("interned ids and free ids do not add up".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    proptest! {
        /// Several positions' sets driven by random adds and removes behave like sorted sets,
        /// equal sets share one ref, and reference counts stay exact.
        #[test]
        fn behave_like_sorted_sets(ops in proptest::collection::vec((0usize..4, any::<bool>(), 0u32..6), 1..120)) {
            let mut sets = HolderSets::default();
            let mut refs = [NO_HOLDERS; 4];
            let mut model: [BTreeSet<u32>; 4] = Default::default();
            for &(p, add, h) in &ops {
                if add {
                    refs[p] = sets.with(refs[p], h);
                    model[p].insert(h);
                } else {
                    refs[p] = sets.without(refs[p], h);
                    model[p].remove(&h);
                }
                for q in 0..4 {
                    let want: Vec<u32> = model[q].iter().copied().collect();
                    prop_assert_eq!(sets.members(&refs[q]), want.as_slice());
                    prop_assert_eq!(sets.contains(refs[q], h), model[q].contains(&h));
                    for r in 0..4 {
                        prop_assert_eq!(refs[q] == refs[r], model[q] == model[r]);
                    }
                }
                prop_assert_eq!(sets.check(refs.iter().copied()), Ok(()));
            }
            for r in refs {
                sets.release(r);
            }
            prop_assert_eq!(sets.interned(), 0);
        }
    }

    #[test]
    fn small_sets_are_inline() {
        let mut sets = HolderSets::default();
        let one = sets.with(NO_HOLDERS, 7);
        assert_eq!(one, 7);
        let two = sets.with(one, 3);
        assert_ne!(two & INTERNED, 0);
        assert_eq!(sets.members(&two), &[3, 7]);
        assert_eq!(sets.without(two, 3), 7);
        assert_eq!(sets.interned(), 0);
    }
}
