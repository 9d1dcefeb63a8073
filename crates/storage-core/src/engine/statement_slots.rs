//! Prepared statements kept by their shape rather than by their SQL text.
//!
//! diesel keeps each connection's prepared statements under a key: the
//! query's type where that has a static query id, otherwise the query's SQL
//! and bind types, which it rebuilds (a walk of the whole query), hashes and
//! compares on every execution. The statements built from
//! [`super::TableRows`] (PostgreSQL's `UnnestInsert`, SQLite's
//! `RowsStatement`) have no static query id, yet come in a handful of
//! shapes (which tables, which columns, how many rows), each always the same
//! SQL: callgrind put that key at ~68,000 instructions of a message's single
//! statement on PostgreSQL and ~60,000 of its nine on SQLite.
//!
//! So each shape the process meets gets a *slot*, one of [`SLOTS`] marker
//! types, for good, and its statement runs wrapped as [`Slotted`] in that
//! slot: a static query id (the marker's type), by which diesel finds the
//! kept statement without building the SQL. A slot always stands for the
//! one SQL its shape makes (the key holds everything the SQL depends on;
//! debug builds check every execution's SQL against the slot's), so a
//! connection of any database finds the right statement under it. Past
//! [`SLOTS`] shapes a statement is keyed by its SQL, as before.
//!
//! The slot is a type, not a value, because diesel asks the query's type
//! for its id (`QueryId::query_id` takes no `self`), through references
//! too: each statement is compiled once per slot ([`InSlot::run`]).

use diesel::backend::Backend;
use diesel::query_builder::{AstPass, Query, QueryBuilder, QueryFragment, QueryId};
use diesel::{QueryResult, RunQueryDsl};
use std::collections::HashMap;
use std::hash::Hash;
use std::marker::PhantomData;
use std::sync::{Mutex, OnceLock};

/// How many shapes of one kind of statement get a slot. A message's write
/// uses a few; an import's batches a few dozen more (table by table, rows in
/// powers of two on SQLite), whose statements are long enough that the key
/// costs little a row.
pub(crate) const SLOTS: usize = 64;

/// The marker type of slot `N` of the statements of kind `K`: only its id
/// is used.
pub(crate) struct Slot<K, const N: usize>(PhantomData<K>);

/// A statement `Q` run in slot `N` of kind `K`: the same SQL and binds, and
/// slot `N`'s type as its static query id (none for `N` = [`SLOTS`], where
/// diesel keys it by its SQL).
pub(crate) struct Slotted<K, Q, const N: usize> {
    query: Q,
    kind: PhantomData<fn() -> K>,
}

impl<K, Q, const N: usize> Slotted<K, Q, N> {
    pub(crate) fn new(query: Q) -> Self {
        Slotted {
            query,
            kind: PhantomData,
        }
    }
}

impl<K: 'static, Q, const N: usize> QueryId for Slotted<K, Q, N> {
    type QueryId = Slot<K, N>;
    const HAS_STATIC_QUERY_ID: bool = N < SLOTS;
}

impl<K, Q: Query, const N: usize> Query for Slotted<K, Q, N> {
    type SqlType = Q::SqlType;
}

impl<K, Q: QueryFragment<DB>, DB: Backend, const N: usize> QueryFragment<DB> for Slotted<K, Q, N> {
    fn walk_ast<'b>(&'b self, pass: AstPass<'_, 'b, DB>) -> QueryResult<()> {
        self.query.walk_ast(pass)
    }

    fn is_safe_to_cache_prepared(&self, backend: &DB) -> QueryResult<bool> {
        self.query.is_safe_to_cache_prepared(backend)
    }
}

impl<K, Q, C, const N: usize> RunQueryDsl<C> for Slotted<K, Q, N> {}

/// Runs one statement of kind `K` in the slot [`Slots::run`] found for it:
/// `run::<N>` wraps it as [`Slotted`] in slot `N`.
pub(crate) trait InSlot<K> {
    type Output;
    fn run<const N: usize>(self) -> Self::Output;
}

/// The process's slots of one kind `K` of statement, by shape `S`.
pub(crate) struct Slots<K, S> {
    taken: OnceLock<Mutex<Taken<S>>>,
    kind: PhantomData<fn() -> K>,
}

struct Taken<S> {
    by_shape: HashMap<S, usize, foldhash::fast::RandomState>,
    /// Each slot's SQL, checked against every execution's in debug builds.
    sql: Vec<String>,
}

impl<K: 'static, S: Hash + Eq> Slots<K, S> {
    pub(crate) const fn new() -> Self {
        Slots {
            taken: OnceLock::new(),
            kind: PhantomData,
        }
    }

    /// Runs `statement` in the slot of `shape`, taken for it now if it has
    /// none and one is left. `sql` builds the statement's SQL: called when
    /// the slot is taken, and in debug builds on every run, to check that a
    /// shape always makes the same SQL.
    pub(crate) fn run<R: InSlot<K>>(
        &'static self,
        shape: S,
        sql: impl FnOnce() -> String,
        statement: R,
    ) -> R::Output {
        macro_rules! in_slot {
            ($($n:literal)*) => {
                match self.slot(shape, sql) {
                    $(Some($n) => statement.run::<$n>(),)*
                    _ => statement.run::<SLOTS>(),
                }
            };
        }
        in_slot!(
            0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30
            31 32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47 48 49 50 51 52 53 54 55 56 57 58
            59 60 61 62 63
        )
    }

    /// The slot of `shape`, if it has or now takes one.
    fn slot(&'static self, shape: S, sql: impl FnOnce() -> String) -> Option<usize> {
        let taken = self.taken.get_or_init(|| {
            Mutex::new(Taken {
                by_shape: HashMap::default(),
                sql: Vec::new(),
            })
        });
        let mut taken = taken.lock().unwrap_or_else(|p| p.into_inner());
        match taken.by_shape.get(&shape) {
            Some(&n) => {
                if cfg!(debug_assertions) {
                    let sql = sql();
                    assert_eq!(
                        taken.sql[n], sql,
                        "a statement's shape must make one SQL: its key misses something"
                    );
                }
                Some(n)
            }
            None if taken.sql.len() < SLOTS => {
                let n = taken.sql.len();
                taken.sql.push(sql());
                taken.by_shape.insert(shape, n);
                Some(n)
            }
            None => None,
        }
    }
}

/// The SQL diesel prepares for `query` (what [`Slots::run`]'s `sql` gives).
pub(crate) fn sql_of<DB, Q>(query: &Q, backend: &DB) -> String
where
    DB: Backend,
    DB::QueryBuilder: Default,
    Q: QueryFragment<DB>,
{
    let mut builder = DB::QueryBuilder::default();
    match query.to_sql(&mut builder, backend) {
        Ok(()) => builder.finish(),
        // Fails the same way when diesel builds it.
        Err(e) => format!("(no SQL: {e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::any::TypeId;

    struct Kind;

    /// What a statement's query id would be in the slot it runs in.
    struct QueryIdOf;

    impl InSlot<Kind> for QueryIdOf {
        type Output = Option<TypeId>;
        fn run<const N: usize>(self) -> Option<TypeId> {
            // Asked through a reference, as diesel asks.
            <&Slotted<Kind, (), N> as QueryId>::query_id()
        }
    }

    /// Each shape its own slot, the same one every time; none past
    /// [`SLOTS`].
    #[test]
    fn shapes_keep_their_slots() {
        static SLOTS_OF_TEST: Slots<Kind, usize> = Slots::new();
        let id = |shape: usize| SLOTS_OF_TEST.run(shape, || format!("sql {shape}"), QueryIdOf);
        let first: Vec<_> = (0..SLOTS).map(id).collect();
        assert!(first.iter().all(Option::is_some));
        let distinct: std::collections::HashSet<_> = first.iter().collect();
        assert_eq!(distinct.len(), SLOTS);
        assert_eq!((0..SLOTS).map(id).collect::<Vec<_>>(), first);
        assert_eq!(id(SLOTS), None);
    }

    /// A shape whose SQL changed is a key that misses something: debug
    /// builds stop there.
    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "its key misses something")]
    fn a_shape_with_two_sqls_is_caught() {
        static SLOTS_OF_TEST: Slots<Kind, &str> = Slots::new();
        SLOTS_OF_TEST.run("shape", || "SELECT 1".into(), QueryIdOf);
        SLOTS_OF_TEST.run("shape", || "SELECT 2".into(), QueryIdOf);
    }
}
