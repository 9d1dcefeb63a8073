//! The room persister with real storage, on both engines: what the writer
//! keeps in memory between batches (forward extremities, current state, the
//! room's newest events) stays what the database holds, and a batch holding an
//! event that is stored already is worked out again from the stored edges.

use persistence::{ExtremityResolver, RoomPersister};
use std::sync::Arc;
use storage_core::testing::TestDb;
use storage_core::{Result, StoreConfig};
use storage_events::testing::{assert_invariants, event, state_event};
use storage_events::{EventReads, EventToPersist, EventsStore};
use storage_state::{key, NewStateGroup, StateFilter, StateGroup, StateGroupAccess, StateMap};

storage_core::engine_tests!(
    what_the_writer_remembers_is_what_is_stored,
    a_batch_with_a_stored_event_keeps_the_extremities_right,
    a_batch_along_one_line_changes_the_current_state_by_its_deltas,
);

const ROOM: &str = "!persister:test";

/// The rooms here never fork.
struct NoFork;

impl ExtremityResolver for NoFork {
    fn resolve_groups(
        &self,
        room_id: &str,
        _groups: &[StateGroup],
        _batch: &[EventToPersist],
    ) -> Result<StateMap> {
        panic!("{room_id} has a single forward extremity: nothing to resolve")
    }
}

/// A room of a create event, a message and a join (each with its state group
/// written), persisted a batch each by `persister`.
fn linear_room(store: &EventsStore, persister: &RoomPersister) {
    let state = store.state();
    let created = StateMap::from_iter([(key("m.room.create", ""), "$create".into())]);
    let g1 = state
        .store_state_group(&NewStateGroup::snapshot("$create", ROOM, &created))
        .unwrap();
    let joined = StateMap::from_iter([(key("m.room.member", "@alice:test"), "$join".into())]);
    let g2 = state
        .store_state_group(&NewStateGroup::delta("$join", ROOM, g1, &joined))
        .unwrap();
    let batches = [
        state_event(ROOM, "$create", &[], ("m.room.create", ""), Some(g1)),
        event(ROOM, "$m1", &["$create"], Some(g1)),
        state_event(
            ROOM,
            "$join",
            &["$m1"],
            ("m.room.member", "@alice:test"),
            Some(g2),
        ),
    ];
    for e in batches {
        persister.persist(ROOM, &[e]).unwrap();
    }
}

fn writer(t: &TestDb) -> (EventsStore, RoomPersister) {
    let store = EventsStore::new(t.open(), &StoreConfig::default()).unwrap();
    let persister = RoomPersister::new(store.clone(), Arc::new(NoFork));
    (store, persister)
}

/// A store that remembers nothing yet: what it reads is what is stored.
fn fresh(t: &TestDb) -> EventsStore {
    EventsStore::new(t.open(), &StoreConfig::default()).unwrap()
}

fn what_the_writer_remembers_is_what_is_stored(t: &TestDb) {
    let (store, persister) = writer(t);
    linear_room(&store, &persister);
    let stored = fresh(t);
    assert_eq!(
        store.forward_extremities_for_write(ROOM).unwrap(),
        stored.get_forward_extremities(ROOM).unwrap()
    );
    assert_eq!(
        stored.get_forward_extremities(ROOM).unwrap(),
        vec!["$join".to_owned()]
    );
    // The join changed the current state after the create event had: the
    // writer's cached state was updated, not dropped, and matches the rows.
    let remembered = store.state().get_current_state_ids(ROOM).unwrap();
    assert_eq!(remembered.len(), 2, "{remembered:?}");
    assert_eq!(
        *remembered,
        *stored.state().get_current_state_ids(ROOM).unwrap()
    );
    // The newest event, which the next one names as its prev event, is
    // remembered as stored (stream position and all).
    let tip = store.get_events(&["$join"]).unwrap();
    assert_eq!(tip, stored.get_events(&["$join"]).unwrap());
    assert_eq!(tip.len(), 1);
    assert_invariants(store.database());
}

fn a_batch_with_a_stored_event_keeps_the_extremities_right(t: &TestDb) {
    let (store, persister) = writer(t);
    linear_room(&store, &persister);
    // "$m1" again (a client retrying): stored, and "$join" names it as its
    // prev event, so it must not become an extremity again.
    let group = store.state().get_state_group_for_events(&["$m1"]).unwrap()["$m1"];
    let again = persister
        .persist(ROOM, &[event(ROOM, "$m1", &["$create"], Some(group))])
        .unwrap();
    assert_eq!(again.skipped, vec!["$m1".to_owned()]);
    assert!(again.positions.is_empty());
    let expected = vec!["$join".to_owned()];
    assert_eq!(fresh(t).get_forward_extremities(ROOM).unwrap(), expected);
    assert_eq!(store.forward_extremities_for_write(ROOM).unwrap(), expected);
    // A new event after it is written as usual.
    let joined = store
        .state()
        .get_state_group_for_events(&["$join"])
        .unwrap()["$join"];
    persister
        .persist(ROOM, &[event(ROOM, "$m2", &["$join"], Some(joined))])
        .unwrap();
    // The tip again: the batch is first written as if "$m2" were new (it
    // leaves one extremity); the transaction finds it stored and the batch
    // is worked out again, skipping it.
    let tip = persister
        .persist(ROOM, &[event(ROOM, "$m2", &["$join"], Some(joined))])
        .unwrap();
    assert_eq!(tip.skipped, vec!["$m2".to_owned()]);
    assert!(tip.positions.is_empty());
    let expected = vec!["$m2".to_owned()];
    assert_eq!(fresh(t).get_forward_extremities(ROOM).unwrap(), expected);
    assert_eq!(store.forward_extremities_for_write(ROOM).unwrap(), expected);
    assert_invariants(store.database());
}

/// A batch of a join, a message and a topic, whose groups are prepared for
/// it (as the main process's contexts do): the current state after it is the
/// last group's state, worked out from the batch's deltas, memberships too.
fn a_batch_along_one_line_changes_the_current_state_by_its_deltas(t: &TestDb) {
    let (store, persister) = writer(t);
    linear_room(&store, &persister);
    let state = store.state();
    let joined = state.get_state_group_for_events(&["$join"]).unwrap()["$join"];
    let prepare = |event_id: &str, prev: StateGroup, slot: (&str, &str)| {
        let delta = StateMap::from_iter([(key(slot.0, slot.1), Arc::<str>::from(event_id))]);
        state
            .prepare_state_group(&NewStateGroup {
                event_id,
                room_id: ROOM,
                prev_group: Some(prev),
                delta_ids: Some(&delta),
                current_state_ids: None,
            })
            .unwrap()
    };
    let bob = prepare("$bob", joined, ("m.room.member", "@bob:test"));
    let topic = prepare("$topic", bob.group, ("m.room.topic", ""));
    let last = topic.group;
    let batch = vec![
        EventToPersist {
            new_state_groups: vec![bob.clone()],
            ..state_event(
                ROOM,
                "$bob",
                &["$join"],
                ("m.room.member", "@bob:test"),
                Some(bob.group),
            )
        },
        event(ROOM, "$m3", &["$bob"], Some(bob.group)),
        EventToPersist {
            new_state_groups: vec![topic],
            ..state_event(ROOM, "$topic", &["$m3"], ("m.room.topic", ""), Some(last))
        },
    ];
    persister.persist(ROOM, &batch).unwrap();
    let stored = fresh(t);
    let current = stored.state().get_current_state_ids(ROOM).unwrap();
    let expected = stored
        .state()
        .get_state_for_groups(&[last], &StateFilter::all())
        .unwrap()
        .remove(&last)
        .unwrap();
    assert_eq!(*current, expected);
    assert_eq!(current.len(), 4, "{current:?}");
    assert_eq!(
        *store.state().get_current_state_ids(ROOM).unwrap(),
        expected
    );
    assert_invariants(store.database());
}
