//! `StateStore::get_state_differences`: what groups' states disagree on, read
//! from cold caches as such (the shared chain's rows above the shared group,
//! or two snapshots compared by the database), must be what comparing their
//! whole states gives: forks on a shared chain, forks on snapshots of their
//! own, slots present on one side only or "removed" (a snapshot without a
//! slot its sibling holds), values set back to the base's, three groups at
//! once, and the warm path from cached states. Each test runs on SQLite and
//! PostgreSQL.

mod common;

use common::*;
use storage_core::testing::TestDb;
use storage_state::{
    NewStateGroup, StateDifferences, StateFilter, StateGroup, StateGroupAccess, StateMap,
    StateStore,
};

storage_core::engine_tests!(
    forks_on_a_shared_chain,
    forks_on_snapshots_of_their_own,
    unknown_groups_are_an_error,
);

/// The differences by comparing whole states, read by a store of its own.
fn expected(store: &StateStore, groups: &[StateGroup]) -> StateDifferences {
    let fresh = cold(store);
    let states = fresh
        .get_state_for_groups(groups, &StateFilter::all())
        .unwrap();
    let mut out = StateDifferences::new();
    for state in states.values() {
        for slot in state.keys() {
            let values: Vec<_> = groups
                .iter()
                .map(|g| states[g].get(slot).cloned())
                .collect();
            if values.iter().any(|v| *v != values[0]) {
                out.insert(slot.clone(), values);
            }
        }
    }
    out
}

/// Compares the cold read, then the warm (cached whole states) comparison,
/// with [`expected`]; returns the differences.
fn check(store: &StateStore, groups: &[StateGroup]) -> StateDifferences {
    let want = expected(store, groups);
    let fresh = cold(store);
    let got = fresh.get_state_differences(groups).unwrap();
    assert_eq!(got, want, "read cold, groups {groups:?}");
    fresh
        .get_state_for_groups(groups, &StateFilter::all())
        .unwrap();
    let warm = fresh.get_state_differences(groups).unwrap();
    assert_eq!(warm, want, "from cached states, groups {groups:?}");
    want
}

fn delta(
    store: &StateStore,
    prev: StateGroup,
    event: &str,
    pairs: &[(&str, &str, &str)],
) -> StateGroup {
    store
        .store_state_group(&NewStateGroup::delta(event, ROOM, prev, &state(pairs)))
        .unwrap()
}

/// Fifty members and the create event.
fn room_state() -> StateMap {
    let mut s = state(&[(CREATE, "", "$create"), (NAME, "", "$name0")]);
    for u in 0..50 {
        s.insert(
            storage_state::key(MEMBER, &format!("@u{u}:test")),
            format!("$join{u}").into(),
        );
    }
    s
}

fn forks_on_a_shared_chain(t: &TestDb) {
    let store = store(t);
    let root = store
        .store_state_group(&NewStateGroup::snapshot("$root", ROOM, &room_state()))
        .unwrap();
    let shared = delta(&store, root, "$s1", &[(MEMBER, "@u1:test", "$leave1")]);
    let shared = delta(&store, shared, "$s2", &[(NAME, "", "$name1")]);
    // Fork a: a new slot, a changed member, then a name set back to the
    // shared group's value; fork b: the same member change as a (agreed), a
    // slot of its own, another member changed twice.
    let a = delta(&store, shared, "$a1", &[("m.topic", "", "$topic-a")]);
    let a = delta(&store, a, "$a2", &[(MEMBER, "@u2:test", "$leave2")]);
    let a = delta(&store, a, "$a3", &[(NAME, "", "$name-a")]);
    let a = delta(&store, a, "$a4", &[(NAME, "", "$name1")]);
    let b = delta(&store, shared, "$b1", &[(MEMBER, "@u2:test", "$leave2")]);
    let b = delta(&store, b, "$b2", &[("m.pinned", "", "$pinned-b")]);
    let b = delta(&store, b, "$b3", &[(MEMBER, "@u3:test", "$ban3")]);
    let b = delta(&store, b, "$b4", &[(MEMBER, "@u3:test", "$join3-again")]);
    let got = check(&store, &[a, b]);
    let slots: Vec<(&str, &str)> = got.keys().map(|(t, k)| (&**t, &**k)).collect();
    assert_eq!(
        slots,
        [("m.pinned", ""), (MEMBER, "@u3:test"), ("m.topic", "")],
        "the slots only one fork changed"
    );
    // A third fork from lower down the shared chain, and a group and its
    // own descendant.
    let c = delta(&store, root, "$c1", &[(MEMBER, "@u1:test", "$kick1")]);
    check(&store, &[a, b, c]);
    check(&store, &[b, c, a]);
    check(&store, &[shared, a]);
    assert!(check(&store, &[a, a]).is_empty());
}

fn forks_on_snapshots_of_their_own(t: &TestDb) {
    let store = store(t);
    let base = room_state();
    // Snapshot a lacks a member b holds (as a state reset leaves it), b
    // lacks a slot a holds, and they differ on a member's event.
    let mut sa = base.clone();
    sa.remove(&storage_state::key(MEMBER, "@u7:test"));
    sa.insert(storage_state::key("m.topic", ""), "$topic".into());
    sa.insert(storage_state::key(MEMBER, "@u8:test"), "$leave8".into());
    let mut sb = base.clone();
    sb.insert(storage_state::key(MEMBER, "@u9:test"), "$leave9".into());
    let snap_a = store
        .store_state_group(&NewStateGroup::snapshot("$sa", ROOM, &sa))
        .unwrap();
    let snap_b = store
        .store_state_group(&NewStateGroup::snapshot("$sb", ROOM, &sb))
        .unwrap();
    let got = check(&store, &[snap_a, snap_b]);
    assert_eq!(got.len(), 4, "{got:?}");
    // Deltas above each: one undoes a snapshot difference (u8 leaves on b
    // too), one makes a new one, one sets on a the slot only b's snapshot
    // changed back to the base's value.
    let a = delta(&store, snap_a, "$a1", &[(MEMBER, "@u9:test", "$join9")]);
    let a = delta(&store, a, "$a2", &[(NAME, "", "$name-a")]);
    let b = delta(&store, snap_b, "$b1", &[(MEMBER, "@u8:test", "$leave8")]);
    let b = delta(&store, b, "$b2", &[(MEMBER, "@u7:test", "$ban7")]);
    let b = delta(&store, b, "$b3", &[(MEMBER, "@u9:test", "$join9")]);
    check(&store, &[a, b]);
    check(&store, &[b, a]);
    // With a group sharing a's chain.
    let c = delta(&store, a, "$c1", &[(MEMBER, "@u1:test", "$leave1")]);
    check(&store, &[a, b, c]);
    check(&store, &[c, snap_b, a]);
}

fn unknown_groups_are_an_error(t: &TestDb) {
    let store = store(t);
    let g = store
        .store_state_group(&NewStateGroup::snapshot("$root", ROOM, &room_state()))
        .unwrap();
    let err = cold(&store)
        .get_state_differences(&[g, 987_654])
        .unwrap_err();
    assert!(err.to_string().contains("987654"), "{err}");
}
