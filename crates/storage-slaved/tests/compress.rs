//! A worker's caches of how state groups are stored (prev group and delta)
//! follow a compression run on the main process through the replication
//! stream: after catching up, every group reads as now stored. PostgreSQL only
//! (workers need it).

use std::collections::HashMap;
use storage_core::testing::TestDb;
use storage_core::{OpenMode, Result, StoreConfig, Transaction};
use storage_events::EventsStore;
use storage_slaved::SlavedStore;
use storage_state::compress::{self, CompressHooks, CompressOptions, Outcome};
use storage_state::{key, NewStateGroup, StateGroup, StateGroupAccess, StateMap};

const ROOM: &str = "!compressed:test";

/// What the main process adds to a run: each rewrite goes on the stream.
struct Tell<'a>(&'a EventsStore);

impl CompressHooks for Tell<'_> {
    fn on_rewrite(
        &mut self,
        txn: &mut Transaction<'_>,
        _: &str,
        groups: &[StateGroup],
    ) -> Result<()> {
        self.0.record_state_group_rewrite_txn(txn, groups)
    }
}

#[test]
fn a_worker_forgets_rewritten_shapes() {
    let Some(t) = TestDb::postgres() else { return };
    let main = EventsStore::new(t.open(), &StoreConfig::default()).unwrap();
    let state = main.state();
    let mut groups = Vec::new();
    let mut prev = None;
    for i in 0..400 {
        let delta = StateMap::from_iter([(
            key("m.room.member", &format!("@u{i}:test")),
            format!("$j{i}").into(),
        )]);
        let g = match prev {
            None => state.store_state_group(&NewStateGroup::snapshot("$j0", ROOM, &delta)),
            Some(p) => {
                state.store_state_group(&NewStateGroup::delta(&format!("$j{i}"), ROOM, p, &delta))
            }
        }
        .unwrap();
        prev = Some(g);
        groups.push(g);
    }
    let worker = SlavedStore::new(t.open_mode(OpenMode::Replica), &StoreConfig::default()).unwrap();
    let old: HashMap<StateGroup, _> = groups
        .iter()
        .map(|g| (*g, worker.state().get_state_group_delta(*g).unwrap()))
        .collect();
    let before = worker.position();

    let bound = compress::highest_state_group(main.database()).unwrap();
    let report = compress::compress_room(
        state,
        ROOM,
        bound,
        &CompressOptions::default(),
        &mut Tell(&main),
    )
    .unwrap();
    assert_eq!(report.outcome, Outcome::Compressed);
    // Until it catches up, the worker still answers from its cache.
    let stale = groups
        .iter()
        .filter(|g| worker.state().get_state_group_delta(**g).unwrap() != old[*g])
        .count();
    assert_eq!(stale, 0);

    assert!(
        worker.catch_up().unwrap() > before,
        "the rewrite took a stream position"
    );
    let fresh = SlavedStore::new(t.open_mode(OpenMode::Replica), &StoreConfig::default()).unwrap();
    let mut changed = 0;
    for g in &groups {
        let now = worker.state().get_state_group_delta(*g).unwrap();
        assert_eq!(
            now,
            fresh.state().get_state_group_delta(*g).unwrap(),
            "group {g}"
        );
        changed += usize::from(now != old[g]);
    }
    assert!(changed > 0, "compression changed some prev groups");
}
