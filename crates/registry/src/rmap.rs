//! Reverse maps: each descriptor names the set of mappings covering its page by an index
//! into interned sets. Pages covered by the same mappings (almost always whole windows)
//! share one set, so the reverse map costs 4 bytes per page however many aliases exist.

use std::collections::HashMap;

use crate::MappingId;

/// The set no mapping is in; permanent, never counted.
pub const EMPTY_SET: u32 = 0;

#[derive(Debug)]
struct Set {
    members: Vec<MappingId>,
    /// Descriptors referring to this set.
    pages: u64,
}

#[derive(Debug)]
pub struct RmapSets {
    sets: Vec<Option<Set>>,
    index: HashMap<Vec<MappingId>, u32>,
    free: Vec<u32>,
}

impl RmapSets {
    pub fn new() -> Self {
        RmapSets {
            sets: vec![Some(Set {
                members: Vec::new(),
                pages: 0,
            })],
            index: HashMap::from([(Vec::new(), EMPTY_SET)]),
            free: Vec::new(),
        }
    }

    pub fn members(&self, set: u32) -> &[MappingId] {
        self.sets
            .get(set as usize)
            .and_then(Option::as_ref)
            .map(|s| s.members.as_slice())
            .unwrap_or(&[])
    }

    fn intern(&mut self, members: Vec<MappingId>) -> u32 {
        if let Some(&id) = self.index.get(&members) {
            return id;
        }
        let set = Set {
            members: members.clone(),
            pages: 0,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.sets[id as usize] = Some(set);
                id
            }
            None => {
                self.sets.push(Some(set));
                (self.sets.len() - 1) as u32
            }
        };
        self.index.insert(members, id);
        id
    }

    fn adjust(&mut self, set: u32, delta: i64) {
        if set == EMPTY_SET {
            return;
        }
        let Some(Some(entry)) = self.sets.get_mut(set as usize) else {
            return;
        };
        entry.pages = entry.pages.saturating_add_signed(delta);
        if entry.pages == 0 {
            if let Some(entry) = self.sets[set as usize].take() {
                self.index.remove(&entry.members);
            }
            self.free.push(set);
        }
    }

    #[cfg(test)]
    pub fn live_sets(&self) -> usize {
        self.sets.iter().filter(|s| s.is_some()).count()
    }
}

/// Set changes of one map or unmap, batched: runs of pages move between the same two
/// sets, so each distinct move is computed once and counted in bulk.
#[derive(Debug, Default)]
pub struct Moves {
    moves: Vec<(u32, u32, u64)>,
    /// Index of the move used last: consecutive pages almost always share their set.
    last: usize,
}

impl Moves {
    fn find(&mut self, old: u32) -> Option<usize> {
        if self.moves.get(self.last).is_some_and(|(o, _, _)| *o == old) {
            return Some(self.last);
        }
        let at = self.moves.iter().position(|(o, _, _)| *o == old)?;
        self.last = at;
        Some(at)
    }

    /// Counts one more page moving from `old` to the set `compute` interns, computing it
    /// only the first time `old` is seen.
    fn record(&mut self, old: u32, compute: impl FnOnce() -> u32) -> u32 {
        if let Some(at) = self.find(old) {
            self.moves[at].2 += 1;
            return self.moves[at].1;
        }
        let new = compute();
        self.moves.push((old, new, 1));
        self.last = self.moves.len() - 1;
        new
    }

    /// The set for a page now also covered by `id`.
    pub fn add(&mut self, sets: &mut RmapSets, old: u32, id: MappingId) -> u32 {
        self.record(old, || {
            let mut members = sets.members(old).to_vec();
            if let Err(at) = members.binary_search(&id) {
                members.insert(at, id);
            }
            sets.intern(members)
        })
    }

    /// The set for a page no longer covered by `id`.
    pub fn remove(&mut self, sets: &mut RmapSets, old: u32, id: MappingId) -> u32 {
        self.record(old, || {
            let mut members = sets.members(old).to_vec();
            members.retain(|m| *m != id);
            sets.intern(members)
        })
    }

    /// Applies the page counts; sets nothing refers to any more are freed.
    pub fn apply(self, sets: &mut RmapSets) {
        for &(_, new, n) in &self.moves {
            sets.adjust(new, n as i64);
        }
        for &(old, _, n) in &self.moves {
            sets.adjust(old, -(n as i64));
        }
    }
}
