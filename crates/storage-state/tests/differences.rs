//! `StateStore::get_state_differences`: what groups' states disagree on, read
//! from cold caches as such (the shared chain's rows above the shared group,
//! or two snapshots compared by the database), must be what comparing their
//! whole states gives: forks on a shared chain, forks on snapshots of their
//! own, slots present on one side only or "removed" (a snapshot without a
//! slot its sibling holds), values set back to the base's, three groups at
//! once, and the warm path from cached states; forks whose chains cross
//! snapshots of their own, compared through the snapshots' origins where
//! they are known, by the snapshots' rows from where they are not. Each test
//! runs on SQLite and PostgreSQL.

mod common;

use common::*;
use std::cell::RefCell;
use std::collections::HashMap;
use storage_core::testing::TestDb;
use storage_core::Transaction;
use storage_state::{
    NewStateGroup, NoOrigins, SnapshotOrigin, SnapshotOrigins, StateDifferences, StateFilter,
    StateGroup, StateGroupAccess, StateMap, StateStore, StoredOrigins,
};

storage_core::engine_tests!(
    forks_on_a_shared_chain,
    forks_on_snapshots_of_their_own,
    snapshots_with_two_rows_for_one_slot,
    forks_with_two_rows_for_one_slot_in_a_group,
    forks_through_snapshot_origins,
    stored_origins_are_what_the_events_vouch_for,
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
    check_with(store, groups, &NoOrigins)
}

/// [`check`], the cold read following `origins`.
fn check_with(
    store: &StateStore,
    groups: &[StateGroup],
    origins: &dyn SnapshotOrigins,
) -> StateDifferences {
    let want = expected(store, groups);
    let fresh = cold(store);
    let got = fresh.get_state_differences(groups, origins).unwrap();
    assert_eq!(got, want, "read cold, groups {groups:?}");
    fresh
        .get_state_for_groups(groups, &StateFilter::all())
        .unwrap();
    let warm = fresh.get_state_differences(groups, origins).unwrap();
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
    s.insert(storage_state::key(MEMBER, ODD), "$join-odd".into());
    s
}

/// A state key that JSON must escape (slots are sent to the database as one
/// JSON array when many are sought).
const ODD: &str = "@\"odd\\key\u{1}\u{e9}\u{1F600},]}:test";

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

/// Rows `(group, type, state key, event id)` of [`ROOM`] written straight into
/// `state_groups_state`, beside the store's own: second rows for slots the
/// groups hold already, as an old Synapse database may (its table has no
/// unique key).
fn insert_second_rows(store: &StateStore, rows: &[(StateGroup, &str, &str, &str)]) {
    let values: Vec<String> = rows
        .iter()
        .map(|(g, ty, k, e)| format!("({g}, '{ROOM}', '{ty}', '{k}', '{e}')"))
        .collect();
    execute(
        store,
        &format!(
            "INSERT INTO state_groups_state (state_group, room_id, type, state_key, event_id) \
             VALUES {}",
            values.join(", ")
        ),
    );
}

/// Two snapshots compared by their rows where one or both hold two rows for
/// one slot (Synapse's `state_groups_state` has no unique key): each group's
/// value there is its smaller event id, as every read of a group takes it,
/// however the rows are compared (PostgreSQL compares the two snapshots
/// itself, SQLite reads both whole).
fn snapshots_with_two_rows_for_one_slot(t: &TestDb) {
    let store = store(t);
    let base = room_state();
    let snap_a = store
        .store_state_group(&NewStateGroup::snapshot("$sa", ROOM, &base))
        .unwrap();
    let mut sb = base.clone();
    sb.insert(storage_state::key(NAME, ""), "$name-b".into());
    let snap_b = store
        .store_state_group(&NewStateGroup::snapshot("$sb", ROOM, &sb))
        .unwrap();
    // a: a second row for @u1 with a larger id (a still holds $join1, as b
    // does); a second name row with a larger id (a's name stays $name0,
    // b's is $name-b); both: a second row for @u2 with a larger id (both
    // hold $join2).
    insert_second_rows(
        &store,
        &[
            (snap_a, MEMBER, "@u1:test", "$join9"),
            (snap_a, MEMBER, "@u2:test", "$join9"),
            (snap_b, MEMBER, "@u2:test", "$join9"),
            (snap_a, NAME, "", "$name9"),
        ],
    );
    let got = check(&store, &[snap_a, snap_b]);
    let name = storage_state::key(NAME, "");
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        [&name],
        "only the name differs: {got:?}"
    );
    assert_eq!(
        got[&name],
        [Some("$name0".into()), Some("$name-b".into())],
        "each snapshot's smaller event id"
    );
    // With deltas above each.
    let a = delta(&store, snap_a, "$a1", &[(MEMBER, "@u3:test", "$leave3")]);
    let b = delta(&store, snap_b, "$b1", &[(MEMBER, "@u4:test", "$leave4")]);
    check(&store, &[a, b]);
    check(&store, &[b, a]);
}

/// Forks on a shared chain where a group holds two rows for one slot: a
/// delta above the shared group (the smaller id written second), and the
/// snapshot below it, read for the slots only one fork changed (more than a
/// filtered read takes, so sought slot by slot in the snapshot; the larger
/// id written second). Each group's value is its smaller event id, whatever
/// order its rows come in.
fn forks_with_two_rows_for_one_slot_in_a_group(t: &TestDb) {
    let store = store(t);
    let root = store
        .store_state_group(&NewStateGroup::snapshot("$root", ROOM, &room_state()))
        .unwrap();
    let shared = delta(&store, root, "$s1", &[(NAME, "", "$name1")]);
    // Fork a: seventy new members and @u5 leaves; fork b: @u7 leaves.
    let joins: Vec<(String, String)> = (0..70)
        .map(|v| (format!("@v{v}:test"), format!("$joinv{v}")))
        .collect();
    let mut changes: Vec<(&str, &str, &str)> = joins
        .iter()
        .map(|(k, e)| (MEMBER, k.as_str(), e.as_str()))
        .collect();
    changes.push((MEMBER, "@u5:test", "$leave5"));
    let a = delta(&store, shared, "$a1", &changes);
    let b = delta(&store, shared, "$b1", &[(MEMBER, "@u7:test", "$leave7-z")]);
    insert_second_rows(
        &store,
        &[
            (b, MEMBER, "@u7:test", "$leave7-a"),
            (root, MEMBER, "@u5:test", "$join5-z"),
        ],
    );
    let got = check(&store, &[a, b]);
    let u5 = storage_state::key(MEMBER, "@u5:test");
    let u7 = storage_state::key(MEMBER, "@u7:test");
    assert_eq!(
        got[&u5],
        [Some("$leave5".into()), Some("$join5".into())],
        "b holds the snapshot's smaller id"
    );
    assert_eq!(
        got[&u7],
        [Some("$join7".into()), Some("$leave7-a".into())],
        "b's delta's smaller id"
    );
    check(&store, &[b, a]);
}

/// Snapshot origins given by the test, each asked for counted.
#[derive(Default)]
struct Origins {
    known: HashMap<StateGroup, SnapshotOrigin>,
    asked: RefCell<Vec<StateGroup>>,
}

impl Origins {
    fn add(&mut self, snapshot: StateGroup, prev: StateGroup, slot: (&str, &str), event: &str) {
        self.known.insert(
            snapshot,
            SnapshotOrigin {
                prev,
                slot: storage_state::key(slot.0, slot.1),
                event_id: event.into(),
            },
        );
    }
}

impl SnapshotOrigins for Origins {
    fn snapshot_origin(
        &self,
        _: &mut storage_core::Conn,
        group: StateGroup,
    ) -> storage_core::Result<Option<SnapshotOrigin>> {
        self.asked.borrow_mut().push(group);
        Ok(self.known.get(&group).cloned())
    }
}

/// A snapshot of `prev`'s state with `slot` set to `event`, as a writer
/// stores it when `prev`'s chain is too long, and its origin.
fn snapshot_over(
    store: &StateStore,
    origins: &mut Origins,
    prev: StateGroup,
    slot: (&str, &str),
    event: &str,
) -> StateGroup {
    let mut full = cold(store)
        .get_state_for_groups(&[prev], &StateFilter::all())
        .unwrap()
        .remove(&prev)
        .unwrap();
    full.insert(storage_state::key(slot.0, slot.1), event.into());
    let g = store
        .store_state_group(&NewStateGroup::snapshot(event, ROOM, &full))
        .unwrap();
    origins.add(g, prev, slot, event);
    g
}

fn member_leaves(
    store: &StateStore,
    mut group: StateGroup,
    users: std::ops::Range<usize>,
) -> StateGroup {
    for u in users {
        let user = format!("@u{u}:test");
        let leave = format!("$leave{u}");
        group = delta(store, group, &leave, &[(MEMBER, &user, &leave)]);
    }
    group
}

fn forks_through_snapshot_origins(t: &TestDb) {
    let store = store(t);
    let root = store
        .store_state_group(&NewStateGroup::snapshot("$root", ROOM, &room_state()))
        .unwrap();
    // The shared chain changes a member the forks then leave alone, and one
    // a fork changes again.
    let shared = delta(&store, root, "$s1", &[(MEMBER, "@u1:test", "$ban1")]);
    let shared = delta(&store, shared, "$s2", &[(MEMBER, "@u2:test", "$ban2")]);
    let mut origins = Origins::default();
    // Fork a crosses one snapshot, fork b two; each snapshot's own slot,
    // and rows above them.
    let a1 = delta(&store, shared, "$a1", &[("m.topic", "", "$topic-a")]);
    let snap_a = snapshot_over(&store, &mut origins, a1, (MEMBER, "@u3:test"), "$leave3a");
    let a = delta(&store, snap_a, "$a2", &[(MEMBER, "@u2:test", "$join2")]);
    let b = delta(&store, shared, "$b1", &[(NAME, "", "$name-b")]);
    let snap_b1 = snapshot_over(&store, &mut origins, b, (MEMBER, "@u4:test"), "$leave4b");
    let b = delta(&store, snap_b1, "$b2", &[(MEMBER, "@u3:test", "$leave3b")]);
    let snap_b2 = snapshot_over(&store, &mut origins, b, ("m.topic", ""), "$topic-b");
    let b = delta(&store, snap_b2, "$b3", &[(MEMBER, "@u5:test", "$leave5")]);
    let got = check_with(&store, &[a, b], &origins);
    let slots: Vec<(&str, &str)> = got.keys().map(|(t, k)| (&**t, &**k)).collect();
    assert_eq!(
        slots,
        [
            (MEMBER, "@u2:test"),
            (MEMBER, "@u3:test"),
            (MEMBER, "@u4:test"),
            (MEMBER, "@u5:test"),
            (NAME, ""),
            ("m.topic", "")
        ]
    );
    // The snapshots' origins are followed, on both engines.
    let asked = origins.asked.borrow().clone();
    assert!(
        [snap_a, snap_b1, snap_b2].iter().all(|g| asked.contains(g)),
        "the snapshots' origins followed: asked {asked:?}"
    );
    // The origins stand for the snapshots' rows, which are not read: an
    // origin that disagrees with its snapshot's rows shows in the answer.
    let mut lying = Origins {
        known: origins.known.clone(),
        ..Default::default()
    };
    lying.add(snap_a, a1, (MEMBER, "@u3:test"), "$not-the-row");
    let fresh = cold(&store);
    let told = fresh.get_state_differences(&[a, b], &lying).unwrap();
    assert_eq!(
        told[&storage_state::key(MEMBER, "@u3:test")][0].as_deref(),
        Some("$not-the-row"),
        "{told:?}"
    );
    check_with(&store, &[b, a], &origins);

    // One origin missing (fork b's lower snapshot): compared from the
    // snapshots where the ways down stop.
    let mut partial = Origins {
        known: origins.known.clone(),
        ..Default::default()
    };
    partial.known.remove(&snap_b1);
    check_with(&store, &[a, b], &partial);
    check_with(&store, &[b, a], &partial);

    // Forks that each leave many members (more than a filtered read of the
    // base takes): the base's values read from its deltas' rows and its
    // snapshot's, sought slot by slot.
    // Fork d's leaves past the room's 50 members are slots the base lacks;
    // both forks make 10 members leave alike.
    let c = member_leaves(&store, shared, 5..45);
    let c = snapshot_over(&store, &mut origins, c, (MEMBER, "@u1:test"), "$join1");
    let c = delta(&store, c, "$c2", &[(MEMBER, "@u2:test", "$kick2")]);
    let d = member_leaves(&store, shared, 45..90);
    let d = snapshot_over(&store, &mut origins, d, (NAME, ""), "$name-d");
    let d = member_leaves(&store, d, 10..20);
    let d = delta(&store, d, "$leave-odd", &[(MEMBER, ODD, "$leave-odd")]);
    let got = check_with(&store, &[c, d], &origins);
    assert_eq!(got.len(), 30 + 45 + 3 + 1, "{got:?}");
    assert_eq!(
        got[&storage_state::key(MEMBER, ODD)],
        [Some("$join-odd".into()), Some("$leave-odd".into())]
    );
    check_with(&store, &[d, c, a], &origins);
}

/// Writes the events rows [`StoredOrigins`] reads for `event`: its row in
/// `events` (a state event on `slot`, else a message) and an `event_edges`
/// row per prev event, as the events store writes them (the state store
/// writes neither table, so the test does).
fn event_rows(store: &StateStore, event: &str, slot: Option<(&str, &str)>, prevs: &[&str]) {
    use diesel::sql_types::{Nullable, Text};
    use diesel::RunQueryDsl;
    let (event_type, state_key) = match slot {
        Some((t, k)) => (t, Some(k)),
        None => ("m.room.message", None),
    };
    store
        .database()
        .run_interaction("test_event_rows", |txn: &mut Transaction<'_>| {
            storage_core::with_conn!(txn.conn(), |c| diesel::sql_query(
                "INSERT INTO events (stream_ordering, topological_ordering, event_id, type, \
                 room_id, outlier, state_key) VALUES \
                 ((SELECT COALESCE(MAX(stream_ordering), 0) + 1 FROM events), 0, $1, $2, $3, \
                 FALSE, $4)",
            )
            .bind::<Text, _>(event)
            .bind::<Text, _>(event_type)
            .bind::<Text, _>(ROOM)
            .bind::<Nullable<Text>, _>(state_key)
            .execute(c))?;
            for prev in prevs {
                storage_core::with_conn!(txn.conn(), |c| diesel::sql_query(
                    "INSERT INTO event_edges (event_id, prev_event_id, room_id) VALUES ($1, $2, $3)",
                )
                .bind::<Text, _>(event)
                .bind::<Text, _>(*prev)
                .bind::<Text, _>(ROOM)
                .execute(c))?;
            }
            Ok(())
        })
        .unwrap();
}

/// Runs `sql` (no binds) on the test database.
fn execute(store: &StateStore, sql: &str) {
    use diesel::RunQueryDsl;
    store
        .database()
        .run_interaction("test_execute", |txn: &mut Transaction<'_>| {
            storage_core::with_conn!(txn.conn(), |c| diesel::sql_query(sql).execute(c))?;
            Ok(())
        })
        .unwrap();
}

/// The origins the stored events vouch for ([`StoredOrigins`], one
/// statement per snapshot crossed): two forks crossing snapshots of their
/// own are compared from where they meet, and give what comparing whole
/// states gives; a snapshot's event that is rejected, has two prev events,
/// or no longer maps to the snapshot vouches for nothing, and the answer
/// stays right (the snapshots' rows compared instead).
fn stored_origins_are_what_the_events_vouch_for(t: &TestDb) {
    let store = store(t);
    let root = store
        .store_state_group(&NewStateGroup::snapshot("$root", ROOM, &room_state()))
        .unwrap();
    let shared = delta(&store, root, "$s1", &[(MEMBER, "@u1:test", "$ban1")]);
    // Each group's event: a state event on the slot its group sets, one
    // prev event (the event of the group below), mapped to its group.
    let mut mappings = vec![("$root", root), ("$s1", shared)];
    event_rows(&store, "$root", Some((CREATE, "")), &[]);
    event_rows(&store, "$s1", Some((MEMBER, "@u1:test")), &["$root"]);
    let mut unused = Origins::default();
    let a1 = delta(&store, shared, "$a1", &[("m.topic", "", "$a1")]);
    event_rows(&store, "$a1", Some(("m.topic", "")), &["$s1"]);
    let snap_a = snapshot_over(&store, &mut unused, a1, (MEMBER, "@u3:test"), "$a2");
    event_rows(&store, "$a2", Some((MEMBER, "@u3:test")), &["$a1"]);
    let a = delta(&store, snap_a, "$a3", &[(MEMBER, "@u2:test", "$a3")]);
    event_rows(&store, "$a3", Some((MEMBER, "@u2:test")), &["$a2"]);
    let b1 = delta(&store, shared, "$b1", &[(NAME, "", "$b1")]);
    event_rows(&store, "$b1", Some((NAME, "")), &["$s1"]);
    let snap_b = snapshot_over(&store, &mut unused, b1, (MEMBER, "@u4:test"), "$b2");
    event_rows(&store, "$b2", Some((MEMBER, "@u4:test")), &["$b1"]);
    let b = delta(&store, snap_b, "$b3", &[(MEMBER, "@u3:test", "$b3")]);
    event_rows(&store, "$b3", Some((MEMBER, "@u3:test")), &["$b2"]);
    mappings.extend([
        ("$a1", a1),
        ("$a2", snap_a),
        ("$a3", a),
        ("$b1", b1),
        ("$b2", snap_b),
        ("$b3", b),
    ]);
    map_events(&store, &mappings);

    let followed = |groups: &[StateGroup]| {
        let stored = StoredOrigins::default();
        check_with(&store, groups, &stored);
        stored.followed()
    };
    assert_eq!(followed(&[a, b]), 2, "both snapshots gone through");
    assert_eq!(followed(&[b, a]), 2);
    // The origin comes from the events, not the snapshot's rows: an event
    // on another slot than the snapshot set shows in the answer.
    execute(
        &store,
        "UPDATE events SET state_key = '@u5:test' WHERE event_id = '$a2'",
    );
    let got = cold(&store)
        .get_state_differences(&[a, b], &StoredOrigins::default())
        .unwrap();
    assert_eq!(
        got[&storage_state::key(MEMBER, "@u5:test")][0].as_deref(),
        Some("$a2"),
        "{got:?}"
    );
    execute(
        &store,
        "UPDATE events SET state_key = '@u3:test' WHERE event_id = '$a2'",
    );
    // Rejected: no origin.
    execute(
        &store,
        "UPDATE events SET rejection_reason = 'auth' WHERE event_id = '$a2'",
    );
    assert_eq!(
        followed(&[a, b]),
        1,
        "fork a's snapshot compared by its rows"
    );
    execute(
        &store,
        "UPDATE events SET rejection_reason = NULL WHERE event_id = '$a2'",
    );
    // Two prev events: no origin.
    execute(
        &store,
        "INSERT INTO event_edges (event_id, prev_event_id, room_id) \
         VALUES ('$b2', '$a1', '!abc123:test')",
    );
    // Fork b's snapshot is the higher, so the walk stops there: the two
    // snapshots compared by their rows.
    assert_eq!(
        followed(&[a, b]),
        0,
        "fork b's snapshot vouches for nothing"
    );
    execute(
        &store,
        "DELETE FROM event_edges WHERE event_id = '$b2' AND prev_event_id = '$a1'",
    );
    assert_eq!(followed(&[a, b]), 2);
    // The event mapped to another group: no origin; a message: none.
    execute(
        &store,
        "UPDATE event_to_state_groups SET state_group = 0 WHERE event_id = '$a2'",
    );
    assert_eq!(followed(&[a, b]), 1, "fork a's event maps elsewhere");
    execute(
        &store,
        "UPDATE events SET state_key = NULL WHERE event_id = '$b2'",
    );
    assert_eq!(followed(&[a, b]), 0, "neither snapshot vouched for");
}

fn unknown_groups_are_an_error(t: &TestDb) {
    let store = store(t);
    let g = store
        .store_state_group(&NewStateGroup::snapshot("$root", ROOM, &room_state()))
        .unwrap();
    let err = cold(&store)
        .get_state_differences(&[g, 987_654], &NoOrigins)
        .unwrap_err();
    assert!(err.to_string().contains("987654"), "{err}");
}
