//! Synapse's state resolution v2 test vectors (`tests/state/test_v2.py`), run through ruma
//! with `Pdu`s built from JSON. See TEST-CASES.md section 6.
//!
//! The harness is Synapse's `do_check`: the nodes are processed in lexicographical
//! topological order; a node's state before is empty (no prevs), its single prev's state
//! after, or the resolution of its prevs' states after; its state after adds the node if it is
//! a state event; its auth events are the entries of its state before for its auth types.
//! The assertion compares the entries of the state at END that changed since START (plus the
//! expected keys) with the expected events.
//!
//! Synapse runs these in room version 2, where ids come from the JSON (`$NODE:example.com`);
//! they are also run in room version 10 (ids from reference hashes) to check that nothing
//! depends on the id format.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use common::{member, spec, Place, Spec, ALICE, BOB, CHARLIE, EVELYN, ROOM_ID, ZARA};
use event_context::{
    resolve_state,
    ruma::{EventId, OwnedEventId, RoomVersionId},
    Pdu, StateMap,
};
use event_context::{ContextBuilder, PendingEvents};
use serde_json::json;
use storage_core::testing::TestDb;
use storage_core::StoreConfig;
use storage_events::EventsStore;
use storage_state::{StateFilter, StateGroupAccess};

fn initial_events(version: &RoomVersionId) -> Vec<Spec> {
    vec![
        common::create("CREATE", ALICE, version),
        member("IMA", ALICE, ALICE, "join"),
        spec(
            "IPOWER",
            ALICE,
            "m.room.power_levels",
            Some(""),
            json!({ "users": { ALICE: 100 } }),
        ),
        spec(
            "IJR",
            ALICE,
            "m.room.join_rules",
            Some(""),
            json!({ "join_rule": "public" }),
        ),
        member("IMB", BOB, BOB, "join"),
        member("IMC", CHARLIE, CHARLIE, "join"),
        member("IMZ", ZARA, ZARA, "join"),
        spec("START", ZARA, "m.room.message", None, json!({})),
        spec("END", ZARA, "m.room.message", None, json!({})),
    ]
}

const INITIAL_EDGES: &[&str] = &[
    "START", "IMZ", "IMC", "IMB", "IJR", "IPOWER", "IMA", "CREATE",
];

fn pl(node: &str, sender: &str, users: serde_json::Value) -> Spec {
    spec(
        node,
        sender,
        "m.room.power_levels",
        Some(""),
        json!({ "users": users }),
    )
}

fn topic(node: &str, sender: &str) -> Spec {
    spec(node, sender, "m.room.topic", Some(""), json!({}))
}

/// Synapse's `lexicographical_topological_sort`: parents first, ties by node name.
fn lexicographical_topological_sort(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let mut done: Vec<String> = Vec::new();
    while done.len() < graph.len() {
        let next = graph
            .iter()
            .find(|(node, prevs)| !done.contains(node) && prevs.iter().all(|p| done.contains(p)))
            .map(|(node, _)| node.clone())
            .expect("the graph has no cycle");
        done.push(next);
    }
    done
}

#[derive(Debug)]
struct Graph {
    by_node: HashMap<String, Arc<Pdu>>,
    state_after: HashMap<String, StateMap>,
    order: Vec<String>,
}

fn build_graph(version: &RoomVersionId, events: Vec<Spec>, edges: &[&[&str]]) -> Graph {
    let specs: HashMap<String, Spec> = initial_events(version)
        .into_iter()
        .chain(events)
        .map(|s| (s.node.clone(), s))
        .collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> =
        specs.keys().map(|n| (n.clone(), BTreeSet::new())).collect();
    for chain in std::iter::once(INITIAL_EDGES).chain(edges.iter().copied()) {
        for pair in chain.windows(2) {
            graph.get_mut(pair[0]).unwrap().insert(pair[1].to_owned());
        }
    }

    let mut events: HashMap<OwnedEventId, Arc<Pdu>> = HashMap::new();
    let mut out = Graph {
        by_node: HashMap::new(),
        state_after: HashMap::new(),
        order: Vec::new(),
    };
    // origin_server_ts: a counter incremented per event built, as in Synapse.
    for (ts, node) in lexicographical_topological_sort(&graph)
        .into_iter()
        .enumerate()
    {
        let spec = &specs[&node];
        let prev_nodes: Vec<&String> = graph[&node].iter().collect();
        let state_before = match prev_nodes.as_slice() {
            [] => StateMap::new(),
            [prev] => out.state_after[*prev].clone(),
            prevs => {
                let sets: Vec<StateMap> =
                    prevs.iter().map(|p| out.state_after[*p].clone()).collect();
                resolve_state(version, &sets, |id: &EventId| events.get(id).cloned())
                    .unwrap_or_else(|e| panic!("resolving the state before {node}: {e}"))
            }
        };
        let auth: Vec<OwnedEventId> = spec
            .auth_types(version)
            .iter()
            .filter_map(|key| state_before.get(key).cloned())
            .collect();
        let prev: Vec<OwnedEventId> = prev_nodes
            .iter()
            .map(|p| out.by_node[*p].event_id.clone())
            .collect();
        let depth = prev_nodes
            .iter()
            .map(|p| out.by_node[*p].depth)
            .max()
            .unwrap_or(0)
            + 1;
        let pdu = Arc::new(spec.to_pdu(&Place {
            version,
            room_id: Some(ROOM_ID),
            prev: &prev,
            auth: &auth,
            depth,
            ts: ts as i64,
        }));

        let mut state_after = state_before;
        if let Some(key) = pdu.state_map_key() {
            state_after.insert(key, pdu.event_id.clone());
        }
        events.insert(pdu.event_id.clone(), pdu.clone());
        out.state_after.insert(node.clone(), state_after);
        out.order.push(node.clone());
        out.by_node.insert(node, pdu);
    }
    out
}

/// The same DAG through the storage-backed path: `compute_event_context` for
/// each node in order (state groups stored, prev groups resolved, auth rules
/// checked), then the state group after each node read back must hold exactly
/// the state the pure harness computed. On SQLite, and PostgreSQL when available.
fn check_through_storage(graph: &Graph) {
    let dbs: Vec<TestDb> = std::iter::once(TestDb::sqlite())
        .chain(TestDb::postgres())
        .collect();
    for t in &dbs {
        let db = t.open();
        let config = StoreConfig::default();
        let events = EventsStore::new(db, &config).unwrap();
        let state = events.state().clone();
        let builder = ContextBuilder::new(events, &config);
        let mut pending = PendingEvents::default();
        let mut groups = HashMap::new();
        for node in &graph.order {
            let pdu = &graph.by_node[node];
            let context = builder
                .compute_event_context(pdu, false, &pending)
                .unwrap_or_else(|e| panic!("{}: context of {node}: {e:?}", t.engine()));
            assert_eq!(
                context.rejected,
                None,
                "{}: {node} was rejected",
                t.engine()
            );
            groups.insert(
                node.clone(),
                context.state_group_after.expect("not an outlier"),
            );
            pending.insert(pdu.clone(), context);
        }
        for node in &graph.order {
            let g = groups[node];
            let got = state
                .get_state_for_groups(&[g], &StateFilter::all())
                .unwrap()
                .remove(&g)
                .unwrap();
            let expected: storage_state::StateMap = graph.state_after[node]
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().into()))
                .collect();
            assert_eq!(got, expected, "{}: state after {node}", t.engine());
        }
    }
}

fn do_check(events: Vec<Spec>, edges: &[&[&str]], expected: &[&str]) {
    for version in [RoomVersionId::V2, RoomVersionId::V10] {
        let graph = build_graph(&version, events.clone(), edges);
        check_through_storage(&graph);
        let expected_state: StateMap = expected
            .iter()
            .map(|node| {
                let pdu = &graph.by_node[*node];
                (pdu.state_map_key().unwrap(), pdu.event_id.clone())
            })
            .collect();
        let start = &graph.state_after["START"];
        let end_state: StateMap = graph.state_after["END"]
            .iter()
            .filter(|(k, v)| expected_state.contains_key(*k) || start.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let names: HashMap<&OwnedEventId, &String> = graph
            .by_node
            .iter()
            .map(|(n, p)| (&p.event_id, n))
            .collect();
        let readable = |state: &StateMap| -> BTreeMap<String, String> {
            state
                .iter()
                .map(|(k, v)| (format!("{k:?}"), names[v].clone()))
                .collect()
        };
        assert_eq!(
            readable(&end_state),
            readable(&expected_state),
            "room version {version}: changed state at END (left) vs expected (right)"
        );
    }
}

#[test]
fn lexicographical_sort_matches_synapse() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("l", vec!["o"]),
        ("m", vec!["n", "o"]),
        ("n", vec!["o"]),
        ("o", vec![]),
        ("p", vec!["o"]),
    ]
    .into_iter()
    .map(|(n, prevs)| (n.to_owned(), prevs.into_iter().map(str::to_owned).collect()))
    .collect();
    assert_eq!(
        lexicographical_topological_sort(&graph),
        ["o", "l", "n", "m", "p"]
    );
}

#[test]
fn test_ban_vs_pl() {
    let events = vec![
        pl("PA", ALICE, json!({ ALICE: 100, BOB: 50 })),
        member("MA", ALICE, ALICE, "join"),
        member("MB", ALICE, BOB, "ban"),
        pl("PB", BOB, json!({ ALICE: 100, BOB: 50 })),
    ];
    do_check(
        events,
        &[&["END", "MB", "MA", "PA", "START"], &["END", "PB", "PA"]],
        &["PA", "MA", "MB"],
    );
}

#[test]
fn test_join_rule_evasion() {
    let events = vec![
        // Sic: the key is "join_rules", as in Synapse's test.
        spec(
            "JR",
            ALICE,
            "m.room.join_rules",
            Some(""),
            json!({ "join_rules": "private" }),
        ),
        member("ME", EVELYN, EVELYN, "join"),
    ];
    do_check(
        events,
        &[&["END", "JR", "START"], &["END", "ME", "START"]],
        &["JR"],
    );
}

#[test]
fn test_offtopic_pl() {
    let events = vec![
        pl("PA", ALICE, json!({ ALICE: 100, BOB: 50 })),
        pl("PB", BOB, json!({ ALICE: 100, BOB: 50, CHARLIE: 50 })),
        pl("PC", CHARLIE, json!({ ALICE: 100, BOB: 50, CHARLIE: 0 })),
    ];
    do_check(
        events,
        &[&["END", "PC", "PB", "PA", "START"], &["END", "PA"]],
        &["PC"],
    );
}

#[test]
fn test_topic_basic() {
    let events = vec![
        topic("T1", ALICE),
        pl("PA1", ALICE, json!({ ALICE: 100, BOB: 50 })),
        topic("T2", ALICE),
        pl("PA2", ALICE, json!({ ALICE: 100, BOB: 0 })),
        pl("PB", BOB, json!({ ALICE: 100, BOB: 50 })),
        topic("T3", BOB),
    ];
    let edges: &[&[&str]] = &[
        &["END", "PA2", "T2", "PA1", "T1", "START"],
        &["END", "T3", "PB", "PA1"],
    ];
    do_check(events, edges, &["PA2", "T2"]);
}

#[test]
fn test_topic_reset() {
    let events = vec![
        topic("T1", ALICE),
        pl("PA", ALICE, json!({ ALICE: 100, BOB: 50 })),
        topic("T2", BOB),
        member("MB", ALICE, BOB, "ban"),
    ];
    let edges: &[&[&str]] = &[&["END", "MB", "T2", "PA", "T1", "START"], &["END", "T1"]];
    do_check(events, edges, &["T1", "MB", "PA"]);
}

#[test]
fn test_topic() {
    let events = vec![
        topic("T1", ALICE),
        pl("PA1", ALICE, json!({ ALICE: 100, BOB: 50 })),
        topic("T2", ALICE),
        pl("PA2", ALICE, json!({ ALICE: 100, BOB: 0 })),
        pl("PB", BOB, json!({ ALICE: 100, BOB: 50 })),
        topic("T3", BOB),
        spec("MZ1", ZARA, "m.room.message", None, json!({})),
        topic("T4", ALICE),
    ];
    let edges: &[&[&str]] = &[
        &["END", "T4", "MZ1", "PA2", "T2", "PA1", "T1", "START"],
        &["END", "MZ1", "T3", "PB", "PA1"],
    ];
    do_check(events, edges, &["T4", "PA2"]);
}

#[test]
fn test_mainline_sort() {
    let events = vec![
        topic("T1", ALICE),
        pl("PA1", ALICE, json!({ ALICE: 100, BOB: 50 })),
        topic("T2", ALICE),
        spec(
            "PA2",
            ALICE,
            "m.room.power_levels",
            Some(""),
            json!({ "users": { ALICE: 100, BOB: 50 }, "events": { "m.room.power_levels": 100 } }),
        ),
        pl("PB", BOB, json!({ ALICE: 100, BOB: 50 })),
        topic("T3", BOB),
        topic("T4", ALICE),
    ];
    let edges: &[&[&str]] = &[
        &["END", "T3", "PA2", "T2", "PA1", "T1", "START"],
        &["END", "T4", "PB", "PA1"],
    ];
    // T3 wins: T4 is later but its mainline power levels are older.
    do_check(events, edges, &["T3", "PA2"]);
}

#[test]
fn test_event_map_none() {
    // CREATE -> IMA -> IJR -> {IMB, IMC}: bob and charlie join concurrently.
    let version = RoomVersionId::V2;
    let mut events: HashMap<OwnedEventId, Arc<Pdu>> = HashMap::new();
    let mut add = |spec: Spec, auth: &[&Arc<Pdu>], prev: &[&Arc<Pdu>]| -> Arc<Pdu> {
        let auth: Vec<OwnedEventId> = auth.iter().map(|p| p.event_id.clone()).collect();
        let prev: Vec<OwnedEventId> = prev.iter().map(|p| p.event_id.clone()).collect();
        let depth = events.len() as i64 + 1;
        let place = Place {
            version: &version,
            room_id: Some(ROOM_ID),
            prev: &prev,
            auth: &auth,
            depth,
            ts: depth,
        };
        let pdu = Arc::new(spec.to_pdu(&place));
        events.insert(pdu.event_id.clone(), pdu.clone());
        pdu
    };
    let create = add(common::create("CREATE", ALICE, &version), &[], &[]);
    let ima = add(member("IMA", ALICE, ALICE, "join"), &[&create], &[&create]);
    let ijr = add(
        spec(
            "IJR",
            ALICE,
            "m.room.join_rules",
            Some(""),
            json!({ "join_rule": "public" }),
        ),
        &[&create, &ima],
        &[&ima],
    );
    let imb = add(member("IMB", BOB, BOB, "join"), &[&create, &ijr], &[&ijr]);
    let imc = add(
        member("IMC", CHARLIE, CHARLIE, "join"),
        &[&create, &ijr],
        &[&ijr],
    );

    let state = |pdus: &[&Arc<Pdu>]| -> StateMap {
        pdus.iter()
            .map(|p| (p.state_map_key().unwrap(), p.event_id.clone()))
            .collect()
    };
    let at_bob = state(&[&create, &ima, &ijr, &imb]);
    let at_charlie = state(&[&create, &ima, &ijr, &imc]);
    let resolved = resolve_state(&version, &[at_bob, at_charlie], |id: &EventId| {
        events.get(id).cloned()
    })
    .unwrap();
    assert_eq!(resolved, state(&[&create, &ima, &ijr, &imb, &imc]));
}
