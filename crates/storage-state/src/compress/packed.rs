//! Room state as the compressor holds it: slots and event ids interned to
//! numbers, each group's state a persistent ordered map that shares its nodes
//! with the states it was derived from.
//!
//! Sharing is what keeps planning cheap: the state of a room with 5,000
//! members is built once, every later group costs only the nodes its changes
//! touch, and comparing two related states ([`delta`]) skips the nodes they
//! share instead of walking 5,000 entries.

use crate::types::{StateKey, StateMap};
use imbl::ordmap::DiffItem;
use std::collections::HashMap;

/// An interned `(type, state_key)`.
pub(crate) type Slot = u32;
/// An interned event id.
pub(crate) type EventRef = u32;
/// A group's full state, interned.
pub(crate) type Packed = imbl::OrdMap<Slot, EventRef>;
/// A delta or a snapshot's rows, interned, in slot order.
pub(crate) type Rows = Vec<(Slot, EventRef)>;

/// The names behind the numbers, for one room.
#[derive(Debug, Default)]
pub(crate) struct Interner {
    slots: HashMap<StateKey, Slot>,
    slot_names: Vec<StateKey>,
    events: HashMap<String, EventRef>,
    event_names: Vec<String>,
}

impl Interner {
    pub(crate) fn slot(&mut self, event_type: &str, state_key: &str) -> Slot {
        let key = crate::types::key(event_type, state_key);
        if let Some(&s) = self.slots.get(&key) {
            return s;
        }
        let s = self.slot_names.len() as Slot;
        self.slot_names.push(key.clone());
        self.slots.insert(key, s);
        s
    }

    pub(crate) fn event(&mut self, event_id: String) -> EventRef {
        if let Some(&e) = self.events.get(&event_id) {
            return e;
        }
        let e = self.event_names.len() as EventRef;
        self.event_names.push(event_id.clone());
        self.events.insert(event_id, e);
        e
    }

    pub(crate) fn slot_name(&self, slot: Slot) -> &StateKey {
        &self.slot_names[slot as usize]
    }

    pub(crate) fn event_name(&self, event: EventRef) -> &str {
        &self.event_names[event as usize]
    }

    /// Interns a state read as strings.
    pub(crate) fn pack(&mut self, state: &StateMap) -> Packed {
        state
            .iter()
            .map(|((t, k), e)| (self.slot(t, k), self.event(e.to_string())))
            .collect()
    }
}

/// The rows a group whose state is `to` needs as a delta on a group whose
/// state is `base`: every slot that is new or different. `None` when `base`
/// has a slot `to` lacks: a delta can add and replace, never remove.
pub(crate) fn delta(base: &Packed, to: &Packed) -> Option<Rows> {
    let mut rows = Vec::new();
    for item in base.diff(to) {
        match item {
            DiffItem::Add(s, e) => rows.push((*s, *e)),
            DiffItem::Update { new: (s, e), .. } => rows.push((*s, *e)),
            DiffItem::Remove(..) => return None,
        }
    }
    Some(rows)
}

/// How many rows [`delta`] would give, or `None`; stops counting past `limit`
/// (returning `Some(limit + 1)`), so a hopeless candidate costs little.
pub(crate) fn delta_len(base: &Packed, to: &Packed, limit: usize) -> Option<usize> {
    let mut n = 0;
    for item in base.diff(to) {
        match item {
            DiffItem::Add(..) | DiffItem::Update { .. } => {
                n += 1;
                if n > limit {
                    return Some(n);
                }
            }
            DiffItem::Remove(..) => return None,
        }
    }
    Some(n)
}

/// `fresh` rebuilt on top of `near` so that it shares `near`'s nodes: for a
/// state read whole (a snapshot, a state fetched from the database), which
/// would otherwise share nothing with the states around it.
pub(crate) fn rebase(near: &Packed, fresh: Packed) -> Packed {
    let mut out = near.clone();
    for item in near.diff(&fresh) {
        match item {
            DiffItem::Add(s, e) | DiffItem::Update { new: (s, e), .. } => {
                out.insert(*s, *e);
            }
            DiffItem::Remove(s, _) => {
                out.remove(s);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packed(pairs: &[(Slot, EventRef)]) -> Packed {
        pairs.iter().copied().collect()
    }

    #[test]
    fn deltas_add_and_replace_but_never_remove() {
        let base = packed(&[(1, 10), (2, 20)]);
        let to = packed(&[(1, 10), (2, 21), (3, 30)]);
        assert_eq!(delta(&base, &to), Some(vec![(2, 21), (3, 30)]));
        assert_eq!(delta_len(&base, &to, 10), Some(2));
        assert_eq!(delta_len(&base, &to, 0), Some(1));
        assert_eq!(
            delta(&to, &base),
            None,
            "base has slot 3, the target lacks it"
        );
        assert_eq!(delta(&base, &base), Some(vec![]));
    }

    #[test]
    fn rebase_keeps_the_value_and_shares() {
        let near: Packed = (0u32..1000).map(|i| (i, i)).collect();
        let fresh: Packed = (1u32..1001)
            .map(|i| (i, if i == 500 { 7 } else { i }))
            .collect();
        let rebased = rebase(&near, fresh.clone());
        assert_eq!(rebased, fresh);
        assert_eq!(delta(&near, &rebased), None);
        assert_eq!(delta_len(&rebased, &near, 10), None);
    }
}
