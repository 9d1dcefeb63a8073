//! Which part of the state a caller wants.
//!
//! A filter maps event types to either all state keys (`None`) or a set of state
//! keys (an empty set means none of that type), and says whether types it does not
//! mention are wanted too (`include_others`). The semantics follow Synapse's
//! `StateFilter`, including its canonical form: with `include_others`, a wildcard
//! entry says nothing the flag does not already say, so it is dropped.

use crate::types::{key, Slot, StateKey, StateMap, MEMBER};
use std::collections::{BTreeMap, BTreeSet};

/// The members a filter asks for ([`StateFilter::member_half`]).
pub(crate) enum MemberHalf<'a> {
    All,
    Keys(&'a BTreeSet<String>),
    Nothing,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateFilter {
    types: BTreeMap<String, Option<BTreeSet<String>>>,
    include_others: bool,
}

impl StateFilter {
    /// A filter in canonical form.
    pub fn new(types: BTreeMap<String, Option<BTreeSet<String>>>, include_others: bool) -> Self {
        let types = if include_others {
            types
                .into_iter()
                .filter(|(_, keys)| keys.is_some())
                .collect()
        } else {
            types
        };
        StateFilter {
            types,
            include_others,
        }
    }

    /// Everything.
    pub fn all() -> Self {
        Self::new(BTreeMap::new(), true)
    }

    /// Nothing.
    pub fn none() -> Self {
        Self::new(BTreeMap::new(), false)
    }

    /// Exactly the listed slots; a `None` state key means every key of that type.
    /// Once a type is a wildcard, later specific keys for it add nothing.
    pub fn from_types<'a>(pairs: impl IntoIterator<Item = (&'a str, Option<&'a str>)>) -> Self {
        let mut types: BTreeMap<String, Option<BTreeSet<String>>> = BTreeMap::new();
        for (event_type, state_key) in pairs {
            match state_key {
                None => {
                    types.insert(event_type.to_owned(), None);
                }
                Some(k) => {
                    if let Some(keys) = types
                        .entry(event_type.to_owned())
                        .or_insert_with(|| Some(BTreeSet::new()))
                    {
                        keys.insert(k.to_owned());
                    }
                }
            }
        }
        Self::new(types, false)
    }

    /// All non-member state plus the memberships of `users` (lazy-loading members).
    pub fn from_lazy_load_member_list<'a>(users: impl IntoIterator<Item = &'a str>) -> Self {
        let keys = users.into_iter().map(str::to_owned).collect();
        Self::new(BTreeMap::from([(MEMBER.to_owned(), Some(keys))]), true)
    }

    pub fn types(&self) -> &BTreeMap<String, Option<BTreeSet<String>>> {
        &self.types
    }

    pub fn include_others(&self) -> bool {
        self.include_others
    }

    /// Wants everything.
    pub fn is_full(&self) -> bool {
        self.include_others && self.types.is_empty()
    }

    /// Wants nothing.
    pub fn is_empty(&self) -> bool {
        !self.include_others
            && self
                .types
                .values()
                .all(|k| matches!(k, Some(s) if s.is_empty()))
    }

    /// Asks for slots it cannot list (a wildcard type, or other types).
    pub fn has_wildcards(&self) -> bool {
        self.include_others || self.types.values().any(Option::is_none)
    }

    /// The slots named one by one.
    pub fn concrete_types(&self) -> Vec<StateKey> {
        self.concrete_slots().map(|Slot(t, k)| key(t, k)).collect()
    }

    /// [`concrete_types`](Self::concrete_types) borrowed from the filter: for
    /// looking them up without building keys.
    pub fn concrete_slots(&self) -> impl Iterator<Item = Slot<'_>> {
        self.types
            .iter()
            .filter_map(|(t, keys)| keys.as_ref().map(|keys| (t, keys)))
            .flat_map(|(t, keys)| keys.iter().map(move |k| Slot(t, k)))
    }

    /// Whether the filter names any slot one by one.
    pub fn has_concrete_slots(&self) -> bool {
        self.concrete_slots().next().is_some()
    }

    /// This filter less the slots it names one by one: its wildcard types and,
    /// with `include_others`, every type it does not list (a type whose keys
    /// are named stays listed, with none of its keys wanted).
    pub fn without_concrete_slots(&self) -> StateFilter {
        let types = self
            .types
            .iter()
            .map(|(t, keys)| (t.clone(), keys.as_ref().map(|_| BTreeSet::new())))
            .collect();
        Self::new(types, self.include_others)
    }

    /// The types given with a wildcard state key.
    pub fn wildcard_types(&self) -> Vec<&str> {
        self.types
            .iter()
            .filter(|(_, keys)| keys.is_none())
            .map(|(t, _)| t.as_str())
            .collect()
    }

    /// How many entries the filter can return at most; `None` if unbounded.
    pub fn max_entries_returned(&self) -> Option<usize> {
        if self.has_wildcards() {
            None
        } else {
            Some(self.concrete_types().len())
        }
    }

    /// Whether the slot `(event_type, state_key)` is wanted.
    pub fn includes(&self, event_type: &str, state_key: &str) -> bool {
        match self.types.get(event_type) {
            Some(None) => true,
            Some(Some(keys)) => keys.contains(state_key),
            None => self.include_others,
        }
    }

    /// The part of `state` this filter wants.
    pub fn filter_state<V: Clone>(&self, state: &StateMap<V>) -> StateMap<V> {
        if self.is_full() {
            return state.clone();
        }
        state
            .iter()
            .filter(|((t, k), _)| self.includes(t, k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Like [`filter_state`](Self::filter_state), consuming the map.
    pub fn filter_state_owned<V: Clone>(&self, state: StateMap<V>) -> StateMap<V> {
        if self.is_full() {
            return state;
        }
        state
            .into_iter()
            .filter(|((t, k), _)| self.includes(t, k))
            .collect()
    }

    /// Splits into the part served by the member cache and the part served by
    /// the non-member cache.
    pub fn get_member_split(&self) -> (StateFilter, StateFilter) {
        let member = match self.member_half() {
            MemberHalf::All => StateFilter::all(),
            MemberHalf::Keys(keys) => Self::new(
                BTreeMap::from([(MEMBER.to_owned(), Some(keys.clone()))]),
                false,
            ),
            MemberHalf::Nothing => StateFilter::none(),
        };
        let non_member_types = self
            .types
            .iter()
            .filter(|(t, _)| t.as_str() != MEMBER)
            .map(|(t, k)| (t.clone(), k.clone()))
            .collect();
        (member, Self::new(non_member_types, self.include_others))
    }

    /// What the member half of [`Self::get_member_split`] asks of the members,
    /// borrowed: for a reader of the members' cache that builds no filter.
    pub(crate) fn member_half(&self) -> MemberHalf<'_> {
        match self.types.get(MEMBER) {
            Some(None) => MemberHalf::All,
            Some(Some(keys)) => MemberHalf::Keys(keys),
            None if self.include_others => MemberHalf::All,
            None => MemberHalf::Nothing,
        }
    }

    /// The filter to fetch from the database so that the caches fill well: a
    /// wildcard on any non-member type fetches all non-member state (it is small),
    /// keeping exactly the members asked for.
    pub fn return_expanded(&self) -> StateFilter {
        if self.is_full() {
            return self.clone();
        }
        let non_member_wildcard = self
            .types
            .iter()
            .any(|(t, keys)| t != MEMBER && keys.is_none());
        if !non_member_wildcard {
            // Either only concrete slots, or include_others already fetches every
            // non-member type.
            return self.clone();
        }
        let members = match self.types.get(MEMBER) {
            Some(None) => return StateFilter::all(),
            Some(Some(keys)) => keys.clone(),
            None => BTreeSet::new(),
        };
        Self::new(BTreeMap::from([(MEMBER.to_owned(), Some(members))]), true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(keys: &[&str]) -> Option<BTreeSet<String>> {
        Some(keys.iter().map(|k| k.to_string()).collect())
    }

    fn filter(types: &[(&str, Option<BTreeSet<String>>)], others: bool) -> StateFilter {
        StateFilter::new(
            types
                .iter()
                .map(|(t, k)| (t.to_string(), k.clone()))
                .collect(),
            others,
        )
    }

    #[test]
    fn canonical_form_drops_implied_wildcards() {
        assert_eq!(filter(&[(MEMBER, None)], true), StateFilter::all());
        assert!(StateFilter::all().is_full());
        assert!(!StateFilter::none().is_full());
        assert!(StateFilter::none().is_empty());
    }

    #[test]
    fn from_types_accumulates_and_wildcards_win() {
        let f = StateFilter::from_types([
            ("m.room.name", Some("")),
            (MEMBER, Some("@a:x")),
            (MEMBER, None),
            (MEMBER, Some("@b:x")),
        ]);
        assert_eq!(
            f,
            filter(&[("m.room.name", set(&[""])), (MEMBER, None)], false)
        );
        assert!(f.has_wildcards());
        assert_eq!(f.concrete_types(), vec![("m.room.name".into(), "".into())]);
        assert_eq!(f.max_entries_returned(), None);
        let f = StateFilter::from_types([("m.room.create", Some(""))]);
        assert_eq!(f.max_entries_returned(), Some(1));
    }

    #[test]
    fn filter_state_keeps_what_is_asked() {
        let state: StateMap = [
            (("m.room.create".into(), "".into()), "e1".into()),
            (("m.room.name".into(), "".into()), "e2".into()),
            ((MEMBER.into(), "@alice".into()), "e3".into()),
            ((MEMBER.into(), "@bob".into()), "e5".into()),
        ]
        .into_iter()
        .collect();
        let ids = |f: &StateFilter| {
            let mut v: Vec<String> = f
                .filter_state(&state)
                .values()
                .map(|e| e.to_string())
                .collect();
            v.sort();
            v
        };
        assert_eq!(ids(&StateFilter::all()), vec!["e1", "e2", "e3", "e5"]);
        assert_eq!(
            ids(&StateFilter::from_types([("m.room.name", Some(""))])),
            vec!["e2"]
        );
        assert_eq!(
            ids(&StateFilter::from_types([("m.room.name", None)])),
            vec!["e2"]
        );
        assert_eq!(
            ids(&StateFilter::from_types([(MEMBER, None)])),
            vec!["e3", "e5"]
        );
        assert_eq!(
            ids(&filter(&[(MEMBER, set(&["@alice"]))], true)),
            vec!["e1", "e2", "e3"]
        );
        assert_eq!(ids(&filter(&[(MEMBER, set(&[]))], true)), vec!["e1", "e2"]);
        assert_eq!(ids(&StateFilter::none()), Vec::<String>::new());
    }

    #[test]
    fn without_concrete_slots_keeps_the_rest() {
        let lazy = filter(&[(MEMBER, set(&["@a", "@b"]))], true);
        assert!(lazy.has_concrete_slots());
        let rest = lazy.without_concrete_slots();
        assert!(!rest.has_concrete_slots());
        assert!(!rest.includes(MEMBER, "@a") && !rest.includes(MEMBER, "@c"));
        assert!(rest.includes("m.room.name", ""));
        let mixed = StateFilter::from_types([("m.room.name", Some("")), (MEMBER, None)]);
        let rest = mixed.without_concrete_slots();
        assert!(!rest.includes("m.room.name", ""));
        assert!(rest.includes(MEMBER, "@a"));
        assert!(!rest.includes("m.room.topic", ""));
        assert!(!StateFilter::all().has_concrete_slots());
        assert_eq!(
            StateFilter::all().without_concrete_slots(),
            StateFilter::all()
        );
    }

    #[test]
    fn member_split() {
        let (m, nm) = filter(&[(MEMBER, set(&["@a"]))], true).get_member_split();
        assert_eq!(m, filter(&[(MEMBER, set(&["@a"]))], false));
        assert_eq!(nm, StateFilter::all());
        let (m, nm) = StateFilter::from_types([(MEMBER, None)]).get_member_split();
        assert_eq!(m, StateFilter::all());
        assert_eq!(nm, StateFilter::none());
        let (m, nm) = StateFilter::from_types([("m.room.name", Some(""))]).get_member_split();
        assert_eq!(m, StateFilter::none());
        assert_eq!(nm, StateFilter::from_types([("m.room.name", Some(""))]));
        let (m, nm) = StateFilter::all().get_member_split();
        assert!(m.is_full() && nm.is_full());
    }

    /// Synapse's `StateFilterTestCase.test_return_expanded`, including the case
    /// v1.12 crashed on (a non-member wildcard without a member entry).
    #[test]
    fn return_expanded() {
        assert_eq!(StateFilter::all().return_expanded(), StateFilter::all());
        assert_eq!(StateFilter::none().return_expanded(), StateFilter::none());
        for unchanged in [
            filter(
                &[
                    (MEMBER, set(&["@wombat", "@alicia"])),
                    ("some.other.state.type", set(&[""])),
                ],
                false,
            ),
            filter(&[("some.other.state.type", set(&[""]))], false),
            filter(&[(MEMBER, set(&["@wombat", "@alicia"]))], false),
            filter(&[(MEMBER, None)], false),
        ] {
            assert_eq!(unchanged.return_expanded(), unchanged);
        }
        assert_eq!(
            filter(
                &[
                    (MEMBER, set(&["@wombat", "@alicia"])),
                    ("some.other.state.type", None)
                ],
                false
            )
            .return_expanded(),
            filter(&[(MEMBER, set(&["@wombat", "@alicia"]))], true)
        );
        assert_eq!(
            filter(&[("some.other.state.type", None)], false).return_expanded(),
            filter(&[(MEMBER, set(&[]))], true)
        );
        assert_eq!(
            filter(
                &[
                    ("some.other.state.type", None),
                    ("yet.another.state.type", set(&["wombat"]))
                ],
                false
            )
            .return_expanded(),
            filter(&[(MEMBER, set(&[]))], true)
        );
    }
}
