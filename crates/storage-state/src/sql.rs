//! The raw SQL of the state read path, in one place.
//!
//! diesel's DSL cannot say `WITH RECURSIVE`, and a [`StateFilter`] becomes a
//! clause with a varying number of parameters, shared by the recursive walk and
//! the per-hop walk. Values are always bound, never written into the SQL. The
//! `$n` placeholders work on both engines: PostgreSQL numbers its parameters that
//! way, and SQLite numbers named parameters in order of first appearance, which is
//! ascending here.
//!
//! The state rows themselves are read by position ([`ByPosition`]), not through
//! `sql_query`, which finds every value by its column's name, and their text
//! straight into the shared strings the maps keep ([`SharedText`], the event
//! type interned: [`InternedText`]).

use crate::filter::StateFilter;
use crate::types::{Slot, StateGroup, MEMBER};
use diesel::backend::Backend;
use diesel::connection::DefaultLoadingMode;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::{BigInt, HasSqlType, Nullable, Text};
use diesel::{
    PgConnection, QueryResult, Queryable, QueryableByName, RunQueryDsl, SqliteConnection,
};
use std::marker::PhantomData;
use std::sync::{Arc, OnceLock};
use storage_core::{intern, with_conn, Conn, InternedText, Result, RowVisitor, SharedText};

/// Keys of one type up to which each gets an arm of its own (SQLite allows 500
/// arms in a compound SELECT), on an engine that may not seek each value of an
/// `IN` list ([`key_arms`]).
const KEY_ARMS: usize = 32;

/// How many keys of one type get an arm each on `engine`; more go in one arm
/// with `state_key IN (..)`. Where an `IN` list is a seek per value anyway
/// (SQLite), one arm does the same seeks and costs far less to prepare than
/// twenty: the HQ room's lazy-loading read (20 members) prepared 22 arms
/// for 2.9M of its 15.1M instructions (callgrind).
pub(crate) fn key_arms(engine: &dyn storage_core::Engine) -> usize {
    if engine.seeks_each_value_of_in_lists() {
        1
    } else {
        KEY_ARMS
    }
}

/// The condition that a row `s` lies on the chain, as the engine seeks it
/// group by group from the top ([`newest_slot_rows`]).
#[derive(Debug, Clone)]
pub(crate) struct InChain(String);

impl InChain {
    pub(crate) fn new(engine: &dyn storage_core::Engine) -> Self {
        InChain(engine.seeking_each_of("s.state_group", "SELECT state_group FROM chain"))
    }
}

/// How the engine names a state row's insertion-ordered id
/// ([`Engine::insertion_row_id`](storage_core::Engine::insertion_row_id)) in
/// the two places [`chain_rows_by_range`] needs it; `None` where rows have none.
#[derive(Debug, Clone)]
pub(crate) struct RowIds(Option<(String, String)>);

impl RowIds {
    pub(crate) fn new(engine: &dyn storage_core::Engine) -> Self {
        RowIds(
            engine
                .insertion_row_id("x")
                .zip(engine.insertion_row_id("s")),
        )
    }

    /// No ids: every read seeks through the index.
    pub(crate) fn none() -> Self {
        RowIds(None)
    }
}

/// A value to bind, in placeholder order.
#[derive(Debug, Clone)]
pub(crate) enum Bind {
    Int(i64),
    Text(String),
}

/// The SQL text and its binds, built up in placeholder order.
#[derive(Debug, Default)]
pub(crate) struct Statement {
    pub(crate) sql: String,
    pub(crate) binds: Vec<Bind>,
    /// Whether the connection keeps it prepared, by its text: only for a
    /// statement whose text never varies (most are built for their binds'
    /// number, and would fill the cache). Planning the same statement anew
    /// each time costs PostgreSQL more than running it for some
    /// ([`origin_chain`]).
    pub(crate) prepared: bool,
}

impl Statement {
    fn placeholder(&mut self, bind: Bind) -> String {
        self.binds.push(bind);
        format!("${}", self.binds.len())
    }

    fn placeholders(&mut self, binds: impl IntoIterator<Item = Bind>) -> String {
        binds
            .into_iter()
            .map(|b| self.placeholder(b))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The conditions, one per arm of a `UNION ALL`, that together select what
    /// `filter` wants from rows aliased `s`; `[""]` (one arm, no condition) for the
    /// full filter, none for the empty one. One arm per event type, rather than
    /// one condition joined by OR, because SQLite without statistics turns an OR
    /// across types into a scan of every row of the group (measured: 0.75 ms
    /// against 0.065 ms for two slots beside a 10,000-member snapshot), while each
    /// arm is an index seek on `(state_group, type, state_key)`.
    fn filter_arms(&mut self, filter: &StateFilter, key_arms: usize) -> Vec<String> {
        if filter.is_full() {
            return vec![String::new()];
        }
        let mut arms = Vec::new();
        for (event_type, keys) in filter.types() {
            match keys {
                // Every placeholder made must appear in the SQL, in order.
                Some(keys) if keys.is_empty() => {}
                None => {
                    let t = self.placeholder(Bind::Text(event_type.clone()));
                    arms.push(format!("s.type = {t}"));
                }
                // One arm per key while there are few: each is an equality
                // on the whole index, which PostgreSQL then always seeks,
                // where for `state_key IN (..)` it may seek on the first two
                // columns and filter the rest: measured on the HQ room with 20
                // lazy-loaded members, 64 ms reading all 30,661 member rows of
                // the snapshot against 8 ms. SQLite seeks either way, so there
                // (`key_arms` 1) the keys share one arm, cheaper to prepare.
                Some(keys) if keys.len() <= key_arms => {
                    for key in keys {
                        let t = self.placeholder(Bind::Text(event_type.clone()));
                        let k = self.placeholder(Bind::Text(key.clone()));
                        arms.push(format!("s.type = {t} AND s.state_key = {k}"));
                    }
                }
                Some(keys) => {
                    let t = self.placeholder(Bind::Text(event_type.clone()));
                    let ks = self.placeholders(keys.iter().cloned().map(Bind::Text));
                    arms.push(format!("s.type = {t} AND s.state_key IN ({ks})"));
                }
            }
        }
        if filter.include_others() {
            // Every type the filter does not list. Split around one listed type
            // (the member type when listed: the bulk of a room's rows) into two
            // ranges, so that each arm seeks past that type's rows through the
            // index instead of reading every row of the group as `NOT IN` alone
            // does. Correct whatever the column's collation: `< t OR > t` is `<> t`.
            let types = filter.types();
            let pivot = if types.contains_key(MEMBER) {
                MEMBER
            } else {
                types.keys().next().map_or(MEMBER, String::as_str)
            };
            let others: Vec<Bind> = types
                .keys()
                .filter(|t| t.as_str() != pivot)
                .cloned()
                .map(Bind::Text)
                .collect();
            for op in ["<", ">"] {
                let p = self.placeholder(Bind::Text(pivot.to_owned()));
                if others.is_empty() {
                    arms.push(format!("s.type {op} {p}"));
                } else {
                    let ts = self.placeholders(others.iter().cloned());
                    arms.push(format!("s.type {op} {p} AND s.type NOT IN ({ts})"));
                }
            }
        }
        arms
    }

    /// `select` once per arm of `filter`, joined by UNION ALL. `select` ends in a
    /// WHERE clause that each arm extends with AND.
    fn push_arms(&mut self, filter: &StateFilter, select: &str, key_arms: usize) -> bool {
        let arms = self.filter_arms(filter, key_arms);
        let sql: Vec<String> = arms
            .iter()
            .map(|cond| {
                if cond.is_empty() {
                    select.to_owned()
                } else {
                    format!("{select} AND {cond}")
                }
            })
            .collect();
        self.sql.push_str(&sql.join(" UNION ALL "));
        !arms.is_empty()
    }

    fn load<R>(self, conn: &mut Conn) -> Result<Vec<R>>
    where
        R: QueryableByName<diesel::sqlite::Sqlite> + QueryableByName<diesel::pg::Pg> + 'static,
    {
        let mut rows = Vec::new();
        self.for_each(conn, |r| rows.push(r))?;
        Ok(rows)
    }

    /// Runs the statement and hands each row, read by position as the SQL types
    /// `ST`, to `f` as it is decoded, without collecting them first (`load_iter`:
    /// no Vec of 88,269 rows on the HQ room).
    fn for_each_row<ST, R>(self, conn: &mut Conn, mut f: impl FnMut(R)) -> Result<()>
    where
        ST: 'static,
        ByPosition<ST>: diesel::query_dsl::LoadQuery<'static, SqliteConnection, R>
            + diesel::query_dsl::LoadQuery<'static, PgConnection, R>,
        R: 'static,
    {
        let query = ByPosition::<ST> {
            statement: self,
            row: PhantomData,
        };
        with_conn!(conn, |c| query
            .load_iter::<R, DefaultLoadingMode>(c)?
            .try_for_each(|row| row.map(&mut f)))?;
        Ok(())
    }

    /// Runs the statement and hands each row, of the SQL types `ST`, to
    /// `visitor` undecoded: it reads the fields it wants by position
    /// ([`storage_core::visit_rows`]).
    fn visit_rows<ST: 'static>(self, conn: &mut Conn, visitor: &mut impl RowVisitor) -> Result<()>
    where
        diesel::sqlite::Sqlite: diesel::expression::QueryMetadata<ST>,
        diesel::pg::Pg: diesel::expression::QueryMetadata<ST>,
    {
        let query = ByPosition::<ST> {
            statement: self,
            row: PhantomData,
        };
        storage_core::visit_rows(conn, query, visitor)
    }

    /// Runs the statement, its rows read by column name (for the few small
    /// statements whose rows are not state rows).
    fn for_each<R>(self, conn: &mut Conn, mut f: impl FnMut(R)) -> Result<()>
    where
        R: QueryableByName<diesel::sqlite::Sqlite> + QueryableByName<diesel::pg::Pg> + 'static,
    {
        let Statement { sql, binds, .. } = self;
        with_conn!(conn, |c| {
            let mut q = diesel::sql_query(sql).into_boxed();
            for b in binds {
                q = match b {
                    Bind::Int(i) => q.bind::<BigInt, _>(i),
                    Bind::Text(s) => q.bind::<Text, _>(s),
                };
            }
            q.load_iter::<R, DefaultLoadingMode>(c)?
                .try_for_each(|row| row.map(&mut f))
        })?;
        Ok(())
    }
}

/// A [`Statement`] whose rows have the SQL types `ST`, read by position.
///
/// diesel's `sql_query` reads each value by its column's name, and finding the
/// column costs more than decoding the value: on a cold read of the HQ room
/// (`cargo xtask bench state`, callgrind) `NamedRow::get` took 41% of all
/// instructions. A query type of our own, with the SQL types known, lets diesel
/// decode positionally as it does for its typed DSL.
#[derive(Debug)]
pub(crate) struct ByPosition<ST> {
    statement: Statement,
    row: PhantomData<ST>,
}

impl<ST, DB> QueryFragment<DB> for ByPosition<ST>
where
    DB: Backend + HasSqlType<BigInt> + HasSqlType<Text>,
    i64: diesel::serialize::ToSql<BigInt, DB>,
    String: diesel::serialize::ToSql<Text, DB>,
{
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, DB>) -> QueryResult<()> {
        if !self.statement.prepared {
            out.unsafe_to_cache_prepared();
        }
        // The SQL holds `$n` only as placeholders (every value is bound); each
        // becomes the backend's own placeholder for bind n.
        let mut rest = self.statement.sql.as_str();
        while let Some(at) = rest.find('$') {
            out.push_sql(&rest[..at]);
            let digits = rest[at + 1..]
                .bytes()
                .take_while(u8::is_ascii_digit)
                .count();
            let bind = rest[at + 1..at + 1 + digits]
                .parse::<usize>()
                .ok()
                .and_then(|n| self.statement.binds.get(n.wrapping_sub(1)))
                .ok_or_else(|| {
                    diesel::result::Error::QueryBuilderError(
                        format!("a placeholder without a bind in {:?}", self.statement.sql).into(),
                    )
                })?;
            match bind {
                Bind::Int(v) => out.push_bind_param::<BigInt, i64>(v)?,
                Bind::Text(v) => out.push_bind_param::<Text, String>(v)?,
            }
            rest = &rest[at + 1 + digits..];
        }
        out.push_sql(rest);
        Ok(())
    }
}

impl<ST> QueryId for ByPosition<ST> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<ST> Query for ByPosition<ST> {
    type SqlType = ST;
}

impl<ST, C> RunQueryDsl<C> for ByPosition<ST> {}

/// The columns of a state row found on the chain below a group: `(root,
/// state_group, type, state_key, event_id)`, `root` the group whose chain
/// it is, the type `NULL` for the member type where the statement says so
/// ([`member_type_or_null`]). Read field by field by the store's reader
/// (`read::NewestRows`, a [`RowVisitor`]).
type ChainRowType = (BigInt, BigInt, Nullable<Text>, Text, Text);

/// The member type, shared: what a `NULL` type column stands for.
pub(crate) fn member_type() -> Arc<str> {
    static MEMBER_TYPE: OnceLock<Arc<str>> = OnceLock::new();
    MEMBER_TYPE.get_or_init(|| intern(MEMBER)).clone()
}

/// One state row of a group, decoded.
#[derive(Queryable, Debug)]
pub(crate) struct GroupRow {
    pub(crate) state_group: i64,
    pub(crate) event_type: InternedText,
    pub(crate) state_key: SharedText,
    pub(crate) event_id: SharedText,
}

type GroupRowType = (BigInt, Text, Text, Text);

/// The event type of row `s` as a chain row's column, `NULL` for the member
/// type (bound as `member`, a placeholder). Measured (callgrind, a cold full
/// read of the HQ room, 88,269 rows, 88,074 of them members): 619M
/// instructions a read against 656M with the type read as text.
fn member_type_or_null(member: &str) -> String {
    format!("NULLIF(s.type, {member})")
}

/// The recursive walk: for each of `groups`, every row matching `filter` on its
/// chain down to the snapshot, tagged with the group it came from. The caller keeps,
/// per slot, the row of the highest group (on the chains our writer makes, a
/// prev group always has the smaller id). The walk only follows edges
/// downwards, so corrupt data cannot make it loop ([`chain_cte`]).
pub(crate) fn chain_rows(
    conn: &mut Conn,
    groups: &[StateGroup],
    filter: &StateFilter,
    key_arms: usize,
    visitor: &mut impl RowVisitor,
) -> Result<()> {
    let mut st = Statement::default();
    let seeds = st.placeholders(groups.iter().map(|g| Bind::Int(*g)));
    st.sql = chain_cte(&seeds) + " ";
    if !st.push_arms(filter, CHAIN_SELECT, key_arms) {
        return Ok(());
    }
    st.visit_rows::<ChainRowType>(conn, visitor)
}

/// [`chain_rows`], the full state read by [`chain_rows_by_range`] where the
/// engine has insertion-ordered row ids: what the store's reads run.
pub(crate) fn chain_rows_for(
    conn: &mut Conn,
    groups: &[StateGroup],
    filter: &StateFilter,
    key_arms: usize,
    row_ids: &RowIds,
    visitor: &mut impl RowVisitor,
) -> Result<()> {
    if filter.is_full() && row_ids.0.is_some() {
        chain_rows_by_range(conn, groups, row_ids, visitor)
    } else {
        chain_rows(conn, groups, filter, key_arms, visitor)
    }
}

/// [`chain_rows`] for the full state (every row on the chains), each group's
/// rows read through the index where they were inserted in its order, and by
/// their range of insertion-ordered ids ([`RowIds`]) otherwise.
///
/// Reading a row through the index on `(state_group, type, state_key)` costs
/// a seek into the table for `event_id`. Where a group's rows were inserted in
/// the index's order (as this store writes them), those seeks go row after
/// row through the table and SQLite finds each next to the one before; where
/// they were inserted in another order (Synapse's, older databases: a
/// map's), each seek lands somewhere else in the group's pages, and scanning
/// the group's range of rowids reads the table in order instead. Which order a
/// group's rows lie in is probed from the index alone (covering): its first
/// two entries and its last two, four seeks a group, are consecutive rowids
/// when the rows were inserted in index order (a group of one row counts as
/// ordered). Only the other groups pay for their ranges: each one's range and
/// count, in one pass over their index entries, grouped in index order (no
/// sort). The range is taken when at most half its rows belong to other groups
/// (`hi - lo < 2n`), and the `state_group` condition keeps only the group's
/// own rows, so the answer is exact either way, as it is for a group the
/// probe misjudges: a group whose rows are scattered (written piecemeal) is
/// sought through the index. The unary `+` keeps SQLite from seeking that
/// condition through the index instead of the range.
///
/// Measured (callgrind, a cold full read of the HQ room of `cargo xtask bench
/// state`, instructions a read): rows in index order 656M against 777M when
/// every group went by its range (the ranges' pass over the index alone cost
/// more than the seeks it saves there); rows in hash order 774M against 772M
/// (the probes).
pub(crate) fn chain_rows_by_range(
    conn: &mut Conn,
    groups: &[StateGroup],
    row_ids: &RowIds,
    visitor: &mut impl RowVisitor,
) -> Result<()> {
    let Some((x_id, s_id)) = &row_ids.0 else {
        return chain_rows(conn, groups, &StateFilter::all(), KEY_ARMS, visitor);
    };
    let mut st = Statement::default();
    let seeds = st.placeholders(groups.iter().map(|g| Bind::Int(*g)));
    let type_ = member_type_or_null(&st.placeholder(Bind::Text(MEMBER.to_owned())));
    let columns = format!("{type_} AS type_, s.state_key AS state_key, s.event_id AS event_id");
    let probe = |order: &str, offset: u8| {
        format!(
            "(SELECT {x_id} FROM state_groups_state x WHERE x.state_group = c.state_group \
             ORDER BY x.type {order}, x.state_key {order} LIMIT 1 OFFSET {offset})"
        )
    };
    st.sql = format!(
        "{}, \
         judged AS MATERIALIZED ( \
             SELECT c.root AS root, c.state_group AS state_group, \
                 COALESCE({} = {} + 1 AND {} = {} - 1, 1) AS ordered \
             FROM chain c \
         ), \
         counted AS MATERIALIZED ( \
             SELECT x.state_group AS state_group, MIN({x_id}) AS lo, MAX({x_id}) AS hi, \
                 COUNT(*) AS n \
             FROM state_groups_state x \
             WHERE x.state_group IN (SELECT state_group FROM judged WHERE NOT ordered) \
             GROUP BY x.state_group \
         ), \
         ranges AS MATERIALIZED ( \
             SELECT j.root AS root, k.state_group AS state_group, k.lo AS lo, k.hi AS hi, \
                 k.n AS n \
             FROM judged j CROSS JOIN counted k \
             WHERE NOT j.ordered AND k.state_group = j.state_group \
         ) \
         SELECT j.root AS root, s.state_group AS state_group, {columns} \
         FROM judged j CROSS JOIN state_groups_state s \
         WHERE j.ordered AND s.state_group = j.state_group \
         UNION ALL \
         SELECT r.root AS root, s.state_group AS state_group, {columns} \
         FROM ranges r CROSS JOIN state_groups_state s \
         WHERE r.hi - r.lo < 2 * r.n AND {s_id} BETWEEN r.lo AND r.hi \
             AND +s.state_group = r.state_group \
         UNION ALL \
         SELECT r.root AS root, s.state_group AS state_group, {columns} \
         FROM ranges r CROSS JOIN state_groups_state s \
         WHERE r.hi - r.lo >= 2 * r.n AND s.state_group = r.state_group",
        chain_cte(&seeds),
        probe("ASC", 1),
        probe("ASC", 0),
        probe("DESC", 1),
        probe("DESC", 0),
    );
    st.visit_rows::<ChainRowType>(conn, visitor)
}

/// `chain(root, state_group)`: the groups `seeds` (placeholders) and every
/// group down their edges, each beside the seed it came from.
///
/// Only edges down to a lower group are followed: our writer makes no other,
/// nor does Synapse (a prev group is always stored before its child). An edge
/// up (a hand-edited or corrupt table) is where the chain ends, so that a
/// cycle cannot make the walk loop, and every read (this query, the per-hop
/// walk, the per-slot seeks) ends the chain at the same place. A group with
/// two prev groups (Synapse's table allows it) brings both chains; the reader
/// keeps, per slot, the row of the highest group, as Synapse's query does.
///
/// `UNION`, not `UNION ALL`: each group once per seed, however many paths
/// lead to it. Where groups stack with two prev groups each (i on i-1 and
/// i-2), `UNION ALL` followed every path down, as Synapse's query does:
/// their number grows as the Fibonacci numbers (`hs-main state --at`,
/// SQLite: 0.10 s at 20 groups, 0.98 s at 26; sixty never finish). The
/// dedup costs SQLite ~2,800 instructions a group walked (its index of the
/// rows so far; callgrind, the HQ room's 99-hop chain: +0.27M of a full
/// read's 300.6M, +0.25M of a lazy-loading read's 6.1M). Checking each hop
/// for a second prev edge instead, so that only a fork needs the dedup,
/// costs a seek a hop, as much (sqlite3 shell, the 100-group chain alone:
/// 0.67M instructions a statement with `UNION ALL`, 0.94M with `UNION`,
/// 0.92M with that check).
fn chain_cte(seeds: &str) -> String {
    format!(
        "WITH RECURSIVE chain(root, state_group) AS ( \
             SELECT id, id FROM state_groups WHERE id IN ({seeds}) \
             UNION \
             SELECT c.root, e.prev_state_group FROM state_group_edges e \
             JOIN chain c ON e.state_group = c.state_group \
             WHERE e.prev_state_group < c.state_group \
         )"
    )
}

/// The rows of every group on the chain, as [`ChainRowType`]s; each filter arm
/// extends its WHERE clause. CROSS JOIN makes SQLite walk the chain first and
/// seek each group's rows through the index; left to itself, the bundled
/// SQLite (3.53, without statistics) scanned all of state_groups_state against
/// an automatic index on the chain. PostgreSQL plans it as the inner join it is.
const CHAIN_SELECT: &str = "SELECT c.root AS root, s.state_group AS state_group, \
    s.type AS type_, s.state_key AS state_key, s.event_id AS event_id \
    FROM chain c CROSS JOIN state_groups_state s WHERE s.state_group = c.state_group";

/// For `group` alone: per slot that `filter` names one by one, the row of the
/// highest group on the chain that holds it, and every row on the chain
/// matching the rest of `filter` (its wildcard types, the types it does not
/// list), each tagged as [`chain_rows`] tags them.
///
/// Each named slot is looked up group by group from the top of the chain,
/// stopping at the first group that holds it ([`InChain`]),
/// instead of in every group of the chain: the HQ room's lazy-loading read
/// (20 members beside a 99-hop chain) sought 2,000 times, ~45% of them
/// below the member's newest row.
///
/// The slots are rows of one bound JSON text ([`Engine::json_text_pairs`]),
/// so that the statement's text depends only on the shape of the rest of
/// `filter`: where that has few types (a lazy-loading read: every type but
/// the member type), the connection keeps it prepared, and PostgreSQL, on a
/// session for [seeking](storage_core::TxnOptions::seeks_only) reads, runs it
/// on one generic plan. Measured (callgrind of a PostgreSQL backend in
/// single-user mode, the HQ room's lazy-loading read, instructions an
/// execution): 30.0M planned for its values each time, with the chain walked
/// by a hash of `state_group_edges` per hop; 19.1M on the kept generic plan,
/// the chain walked through the index.
///
/// [`Engine::json_text_pairs`]: storage_core::Engine::json_text_pairs
pub(crate) fn newest_slot_rows(
    conn: &mut Conn,
    engine: &dyn storage_core::Engine,
    in_chain: &InChain,
    group: StateGroup,
    filter: &StateFilter,
    key_arms: usize,
    visitor: &mut impl RowVisitor,
) -> Result<()> {
    let pairs: Vec<(&str, &str)> = filter.concrete_slots().map(|Slot(t, k)| (t, k)).collect();
    if pairs.is_empty() {
        return chain_rows(conn, &[group], filter, key_arms, visitor);
    }
    let rest = filter.without_concrete_slots();
    let mut st = Statement {
        // A bounded number of texts: the rest's arms vary with its types.
        prepared: rest.types().len() <= PREPARED_REST_TYPES,
        ..Statement::default()
    };
    let g = st.placeholder(Bind::Int(group));
    let list = format!("${}", st.binds.len() + 1);
    let (slots, json) = engine.json_text_pairs(&list, "type", "state_key", &pairs);
    st.placeholder(Bind::Text(json));
    let in_chain = &in_chain.0;
    // `newest` is materialized so that each slot's subquery runs once (left to
    // itself, PostgreSQL copied it into the join condition below: twice).
    st.sql = format!(
        "{}, \
         slots(type, state_key) AS ({slots}), \
         newest AS MATERIALIZED ( \
             SELECT k.type AS type, k.state_key AS state_key, \
                 (SELECT s.state_group FROM state_groups_state s \
                  WHERE {in_chain} AND s.type = k.type AND s.state_key = k.state_key \
                  ORDER BY s.state_group DESC LIMIT 1) AS state_group \
             FROM slots k \
         ) \
         SELECT {g} AS root, s.state_group AS state_group, s.type AS type_, \
             s.state_key AS state_key, s.event_id AS event_id \
         FROM newest n CROSS JOIN state_groups_state s \
         WHERE s.state_group = n.state_group AND s.type = n.type AND s.state_key = n.state_key",
        chain_cte(&g),
    );
    if !rest.is_empty() {
        st.sql.push_str(" UNION ALL ");
        st.push_arms(&rest, CHAIN_SELECT, key_arms);
    }
    st.visit_rows::<ChainRowType>(conn, visitor)
}

/// Types the rest of a filter may list for [`newest_slot_rows`] to keep its
/// statement prepared (the arms, and so the text, vary with them).
const PREPARED_REST_TYPES: usize = 2;

/// `(root, state_group)` for every group on the chains below `groups` (each
/// seed included, beside itself): group ids only, no state row read.
pub(crate) fn chain_groups(conn: &mut Conn, groups: &[StateGroup]) -> Result<Vec<(i64, i64)>> {
    let mut st = Statement::default();
    let seeds = st.placeholders(groups.iter().map(|g| Bind::Int(*g)));
    st.sql = chain_cte(&seeds) + " SELECT root, state_group FROM chain";
    let mut out = Vec::new();
    st.for_each_row::<(BigInt, BigInt), (i64, i64)>(conn, |r| out.push(r))?;
    Ok(out)
}

/// A row of [`origin_chain`]: the origin (its slot and event, `state_group`
/// its prev group), then a row per group of the prev group's chain below it,
/// only `state_group` set.
#[derive(Queryable, Debug)]
pub(crate) struct OriginRow {
    pub(crate) event_type: Option<InternedText>,
    pub(crate) state_key: Option<SharedText>,
    pub(crate) event_id: Option<SharedText>,
    pub(crate) state_group: i64,
}

type OriginRowType = (Nullable<Text>, Nullable<Text>, Nullable<Text>, BigInt);

/// One hop of the way down through snapshot origins (see
/// [`crate::StoredOrigins`]), in one statement: the origin of `group`, found
/// from the event it was written for (`state_groups.event_id`, still mapped
/// to `group` in `event_to_state_groups`, an accepted state event of the
/// events table with exactly one prev event in `event_edges`), and every
/// group on the chain of that prev event's group (ids below `group`), as
/// [`OriginRow`]s, the origin's first. No rows: no origin.
///
/// The only statement of the state store that reads the events tables: the
/// state tables cannot say what a snapshot was made from (it has no edge).
/// One statement per hop because on PostgreSQL each is a round trip: a hop as
/// the events store's reads and a chain walk, four transactions, made the walk
/// through the HQ forks' 18 snapshots cost more than comparing two snapshots
/// of the whole room. The origin's text comes once, not on every chain row
/// (repeated, its decoding doubled the statement's cost on SQLite, callgrind).
/// Kept prepared: PostgreSQL took ~3 ms to plan it each time (its log, the
/// HQ forks, a loaded machine), more than the rest of the hop.
pub(crate) fn origin_chain(
    conn: &mut Conn,
    group: StateGroup,
    each: impl FnMut(OriginRow),
) -> Result<()> {
    let mut st = Statement {
        prepared: true,
        ..Statement::default()
    };
    let g = st.placeholder(Bind::Int(group));
    st.sql = format!(
        "WITH RECURSIVE origin(prev, type_, state_key, event_id) AS MATERIALIZED ( \
             SELECT p.state_group, ev.type, ev.state_key, ev.event_id \
             FROM state_groups g \
             CROSS JOIN event_to_state_groups x \
             CROSS JOIN events ev \
             CROSS JOIN event_edges e \
             CROSS JOIN event_to_state_groups p \
             WHERE g.id = {g} AND x.event_id = g.event_id AND x.state_group = g.id \
                 AND ev.event_id = g.event_id AND ev.state_key IS NOT NULL \
                 AND ev.rejection_reason IS NULL \
                 AND e.event_id = g.event_id AND p.event_id = e.prev_event_id \
                 AND p.state_group < g.id \
                 AND NOT EXISTS (SELECT 1 FROM event_edges o \
                     WHERE o.event_id = g.event_id AND o.prev_event_id <> e.prev_event_id) \
         ), \
         chain(state_group) AS ( \
             SELECT e.prev_state_group FROM origin o \
             CROSS JOIN state_group_edges e WHERE e.state_group = o.prev \
                 AND e.prev_state_group < o.prev \
             UNION \
             SELECT e.prev_state_group FROM state_group_edges e \
             JOIN chain c ON e.state_group = c.state_group \
             WHERE e.prev_state_group < c.state_group \
         ) \
         SELECT o.type_ AS type_, o.state_key AS state_key, o.event_id AS event_id, \
             o.prev AS state_group \
         FROM origin o \
         UNION ALL \
         SELECT NULL, NULL, NULL, c.state_group FROM chain c"
    );
    st.for_each_row::<OriginRowType, OriginRow>(conn, each)
}

/// The rows of `groups` themselves (no chain walked). The groups are one bound JSON array, as the slots of
/// [`rows_of_slots`] are: one statement for any number, kept prepared.
///
/// Where the engine joins such a list ([`Engine::joins_value_lists`]:
/// SQLite), the list is of runs of consecutive ids instead, each run one
/// range of the index on `state_group`: a run holds only ids asked for, so
/// its range holds the rows of those groups and no other. A fork's groups
/// come in long runs (the HQ forks' 1,696 groups above where they meet, in
/// runs of up to 99 between the snapshots they cross), and each group sought
/// through `IN` cost SQLite a seek in the list's own B-tree and one in the
/// index (those 1,696 groups, the statement alone in sqlite3 3.40: 11.0M
/// instructions against 4.4M by runs; three HQ merges: 1,033.7M against
/// 1,002.8M, callgrind). PostgreSQL reads the index once for an `= ANY` list.
///
/// [`Engine::joins_value_lists`]: storage_core::Engine::joins_value_lists
pub(crate) fn rows_of_groups(
    conn: &mut Conn,
    engine: &dyn storage_core::Engine,
    groups: &[StateGroup],
    each: impl FnMut(GroupRow),
) -> Result<()> {
    if groups.is_empty() {
        return Ok(());
    }
    let mut st = Statement {
        prepared: true,
        ..Statement::default()
    };
    let select = "SELECT s.state_group AS state_group, s.type AS type_, \
         s.state_key AS state_key, s.event_id AS event_id";
    if engine.joins_value_lists() {
        let runs: Vec<(String, String)> = id_runs(groups)
            .into_iter()
            .map(|(lo, hi)| (lo.to_string(), hi.to_string()))
            .collect();
        let pairs: Vec<(&str, &str)> = runs.iter().map(|(a, b)| (&**a, &**b)).collect();
        let list = format!("${}", st.binds.len() + 1);
        let (runs, json) = engine.json_text_pairs(&list, "lo", "hi", &pairs);
        st.placeholder(Bind::Text(json));
        st.sql = format!(
            "WITH runs(lo, hi) AS ({runs}) \
             {select} FROM runs r CROSS JOIN state_groups_state s \
             WHERE s.state_group BETWEEN CAST(r.lo AS BIGINT) AND CAST(r.hi AS BIGINT)"
        );
        return st.for_each_row::<GroupRowType, GroupRow>(conn, each);
    }
    let ids: Vec<String> = groups.iter().map(i64::to_string).collect();
    let list = st.placeholder(Bind::Text(storage_core::json_texts(
        ids.iter().map(String::as_str),
    )));
    let groups = format!(
        "SELECT CAST(g.state_group AS BIGINT) FROM ({}) g",
        engine.json_texts(&list, "state_group")
    );
    st.sql = format!(
        "{select} FROM state_groups_state s WHERE {}",
        engine.seeking_each_of("s.state_group", &groups)
    );
    st.for_each_row::<GroupRowType, GroupRow>(conn, each)
}

/// `ids` as runs of consecutive ids, each `(first, last)`, in order; each id
/// once.
fn id_runs(ids: &[StateGroup]) -> Vec<(StateGroup, StateGroup)> {
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut runs: Vec<(StateGroup, StateGroup)> = Vec::new();
    for id in sorted {
        match runs.last_mut() {
            Some((_, last)) if last.checked_add(1) == Some(id) => *last = id,
            _ => runs.push((id, id)),
        }
    }
    runs
}

/// The own rows of `group` (no chain walked) on `slots`, each sought
/// through the index: the slots are rows of one bound JSON text
/// ([`Engine::json_text_pairs`]) joined to the rows, the list first (CROSS JOIN,
/// for SQLite), so that each slot is one seek on `(state_group, type,
/// state_key)` where `state_key IN (..)` let PostgreSQL read every member
/// row of the group and filter them (see [`Statement::filter_arms`]). One
/// statement text for any number of slots, kept prepared: a `VALUES` list
/// of two binds per slot was a new statement per call, parsed and planned
/// each time.
///
/// [`Engine::json_text_pairs`]: storage_core::Engine::json_text_pairs
pub(crate) fn rows_of_slots(
    conn: &mut Conn,
    engine: &dyn storage_core::Engine,
    group: StateGroup,
    slots: &[&crate::types::StateKey],
    each: impl FnMut(GroupRow),
) -> Result<()> {
    if slots.is_empty() {
        return Ok(());
    }
    let mut st = Statement {
        prepared: true,
        ..Statement::default()
    };
    let g = st.placeholder(Bind::Int(group));
    let pairs: Vec<(&str, &str)> = slots.iter().map(|(t, k)| (&**t, &**k)).collect();
    // The list's placeholder comes second, after the group's.
    let list = format!("${}", st.binds.len() + 1);
    let (slots, json) = engine.json_text_pairs(&list, "type", "state_key", &pairs);
    st.placeholder(Bind::Text(json));
    st.sql = format!(
        "WITH slots(type, state_key) AS ({slots}) \
         SELECT s.state_group AS state_group, s.type AS type_, \
             s.state_key AS state_key, s.event_id AS event_id \
         FROM slots k CROSS JOIN state_groups_state s \
         WHERE s.state_group = {g} AND s.type = k.type AND s.state_key = k.state_key"
    );
    st.for_each_row::<GroupRowType, GroupRow>(conn, each)
}

/// A slot on which the own rows of two groups disagree: each group's event
/// (`None`: the group has no row for the slot).
#[derive(Queryable, Debug)]
pub(crate) struct DifferingRow {
    pub(crate) event_type: InternedText,
    pub(crate) state_key: SharedText,
    pub(crate) first: Option<SharedText>,
    pub(crate) second: Option<SharedText>,
}

type DifferingRowType = (Text, Text, Nullable<Text>, Nullable<Text>);

/// The slots on which the own rows of groups `a` and `b` (two snapshots, as
/// state resolution compares them) disagree, compared by the database: only
/// those rows come back, not the tens of thousands the two hold alike. One
/// full join on the slot (PostgreSQL hashes one group's rows and probes with
/// the other's, one pass each): a `LEFT JOIN` beside a `NOT EXISTS` for the
/// slots only `b` holds read both groups twice (92 ms against 53 ms for two
/// 30,856-row snapshots, EXPLAIN ANALYZE).
///
/// Each side is a group's value per slot: of two rows for one slot in one
/// group (Synapse's table has no unique key), the smaller event id, in byte
/// order (`COLLATE "C"`), as every reader keeps it (`read::keep_row`). Joined row
/// by row, such a slot came back as differing where both groups hold the
/// same value, and with either row's event where they differ.
///
/// Only PostgreSQL runs it (SQLite reads both snapshots whole instead).
pub(crate) fn differing_rows(
    conn: &mut Conn,
    a: StateGroup,
    b: StateGroup,
    each: impl FnMut(DifferingRow),
) -> Result<()> {
    let mut st = Statement::default();
    let (pa, pb) = (st.placeholder(Bind::Int(a)), st.placeholder(Bind::Int(b)));
    st.sql = format!(
        "SELECT COALESCE(x.type, y.type) AS type_, \
             COALESCE(x.state_key, y.state_key) AS state_key, \
             x.event_id AS first, y.event_id AS second \
         FROM (SELECT s.type, s.state_key, MIN(s.event_id COLLATE \"C\") AS event_id \
               FROM state_groups_state s WHERE s.state_group = {pa} \
               GROUP BY s.type, s.state_key) x \
         FULL JOIN (SELECT s.type, s.state_key, MIN(s.event_id COLLATE \"C\") AS event_id \
               FROM state_groups_state s WHERE s.state_group = {pb} \
               GROUP BY s.type, s.state_key) y \
             ON y.type = x.type AND y.state_key = x.state_key \
         WHERE x.event_id IS DISTINCT FROM y.event_id"
    );
    st.for_each_row::<DifferingRowType, DifferingRow>(conn, each)
}

#[derive(Queryable, Debug)]
pub(crate) struct SlotRow {
    pub(crate) event_type: InternedText,
    pub(crate) state_key: SharedText,
    pub(crate) event_id: SharedText,
}

/// One hop of the per-hop walk: the rows of `group` itself matching `filter`.
pub(crate) fn group_rows(
    conn: &mut Conn,
    group: StateGroup,
    filter: &StateFilter,
    key_arms: usize,
) -> Result<Vec<SlotRow>> {
    let mut st = Statement::default();
    let g = st.placeholder(Bind::Int(group));
    let select = format!(
        "SELECT s.type AS type_, s.state_key AS state_key, s.event_id AS event_id \
         FROM state_groups_state s WHERE s.state_group = {g}"
    );
    if !st.push_arms(filter, &select, key_arms) {
        return Ok(Vec::new());
    }
    let mut rows = Vec::new();
    st.for_each_row::<(Text, Text, Text), SlotRow>(conn, |r| rows.push(r))?;
    Ok(rows)
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// How many groups the chain starting at `group` holds, the group itself
/// included, counting no further than `limit`. 0 when the group does not exist.
pub(crate) fn chain_length(conn: &mut Conn, group: StateGroup, limit: usize) -> Result<usize> {
    let mut st = Statement::default();
    let g = st.placeholder(Bind::Int(group));
    let l = st.placeholder(Bind::Int(limit as i64));
    st.sql = format!(
        "WITH RECURSIVE chain(state_group) AS ( \
             SELECT id FROM state_groups WHERE id = {g} \
             UNION \
             SELECT e.prev_state_group FROM state_group_edges e \
             JOIN chain c ON e.state_group = c.state_group \
             WHERE e.prev_state_group < c.state_group \
         ) \
         SELECT COUNT(*) AS n FROM (SELECT state_group FROM chain LIMIT {l}) AS limited"
    );
    let rows: Vec<Count> = st.load(conn)?;
    Ok(rows.first().map_or(0, |r| r.n as usize))
}

#[derive(QueryableByName, Debug)]
pub(crate) struct ChainStats {
    #[diesel(sql_type = BigInt)]
    pub(crate) longest: i64,
    #[diesel(sql_type = diesel::sql_types::Double)]
    pub(crate) average: f64,
}

/// The longest chain and the average chain length over all groups, where a
/// group's chain length counts the groups from it down to its snapshot.
///
/// The walk goes up from the snapshots, and into a group only from the
/// highest of its prev groups (Synapse's table allows several): so each
/// group is met once, and its length counts that way down. Followed from
/// every prev group, a walk met a group once per path up to it (a number
/// that grows as the Fibonacci numbers where groups stack on the two below
/// them).
pub(crate) fn chain_stats(conn: &mut Conn) -> Result<ChainStats> {
    let st = Statement {
        sql: "WITH RECURSIVE depth(state_group, n) AS ( \
                  SELECT g.id, 1 FROM state_groups g WHERE NOT EXISTS \
                      (SELECT 1 FROM state_group_edges e WHERE e.state_group = g.id) \
                  UNION ALL \
                  SELECT e.state_group, d.n + 1 FROM state_group_edges e \
                  JOIN depth d ON e.prev_state_group = d.state_group \
                  WHERE e.state_group > d.state_group \
                      AND NOT EXISTS (SELECT 1 FROM state_group_edges h \
                          WHERE h.state_group = e.state_group \
                              AND h.prev_state_group > e.prev_state_group \
                              AND h.prev_state_group < e.state_group) \
              ) \
              SELECT CAST(COALESCE(MAX(n), 0) AS BIGINT) AS longest, \
                     CAST(COALESCE(AVG(n), 0) AS DOUBLE PRECISION) AS average FROM depth"
            .to_owned(),
        binds: Vec::new(),
        prepared: false,
    };
    let mut rows: Vec<ChainStats> = st.load(conn)?;
    Ok(rows.pop().unwrap_or(ChainStats {
        longest: 0,
        average: 0.0,
    }))
}

#[derive(QueryableByName, Debug)]
struct Unreferenced {
    #[diesel(sql_type = BigInt)]
    unreferenced: i64,
    #[diesel(sql_type = BigInt)]
    unneeded: i64,
}

/// The groups some event's state needs: the groups events reference and every
/// group their delta chains pass through (walked down). `UNION` rather than
/// `UNION ALL` visits each needed group once.
const NEEDED_GROUPS: &str = "WITH RECURSIVE needed(id) AS ( \
        SELECT state_group FROM event_to_state_groups \
        UNION \
        SELECT e.prev_state_group FROM state_group_edges e \
        JOIN needed n ON e.state_group = n.id \
        WHERE e.prev_state_group < e.state_group \
    ) ";

#[derive(QueryableByName)]
struct GroupId {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

/// The groups up to `up_to` that no event's state needs (see
/// [`NEEDED_GROUPS`]), highest first: children before their prev groups.
/// `NOT EXISTS`, not `NOT IN`: see [`unreferenced_groups`].
pub(crate) fn unneeded_groups(conn: &mut Conn, up_to: StateGroup) -> Result<Vec<StateGroup>> {
    let mut st = Statement::default();
    let bound = st.placeholder(Bind::Int(up_to));
    st.sql = format!(
        "{NEEDED_GROUPS}SELECT g.id AS id FROM state_groups g \
         WHERE g.id <= {bound} AND NOT EXISTS (SELECT 1 FROM needed n WHERE n.id = g.id) \
         ORDER BY g.id DESC"
    );
    let rows: Vec<GroupId> = st.load(conn)?;
    Ok(rows.into_iter().map(|r| r.id).collect())
}

/// The groups no event references, and of those the groups that no referenced
/// group's chain needs (the chains of referenced groups, walked down, keep the
/// rest). `NOT EXISTS` rather than `NOT IN` lets PostgreSQL anti-join: past
/// `work_mem` it ran `NOT IN` as a subplan per group, over 11 minutes on
/// 298,000 groups (3.6 s with NOT EXISTS).
pub(crate) fn unreferenced_groups(conn: &mut Conn) -> Result<(i64, i64)> {
    let st = Statement {
        sql: NEEDED_GROUPS.to_owned()
            + "SELECT \
                  (SELECT COUNT(*) FROM state_groups g WHERE NOT EXISTS \
                      (SELECT 1 FROM event_to_state_groups x WHERE x.state_group = g.id)) \
                      AS unreferenced, \
                  (SELECT COUNT(*) FROM state_groups g WHERE NOT EXISTS \
                      (SELECT 1 FROM needed n WHERE n.id = g.id)) \
                      AS unneeded",
        binds: Vec::new(),
        prepared: false,
    };
    let rows: Vec<Unreferenced> = st.load(conn)?;
    Ok(rows
        .first()
        .map_or((0, 0), |r| (r.unreferenced, r.unneeded)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::MEMBER;

    #[test]
    fn id_runs_hold_each_id_once_and_nothing_else() {
        assert_eq!(id_runs(&[]), vec![]);
        assert_eq!(id_runs(&[7]), vec![(7, 7)]);
        assert_eq!(
            id_runs(&[9, 3, 4, 5, 9, 11, 12, 1]),
            vec![(1, 1), (3, 5), (9, 9), (11, 12)]
        );
        assert_eq!(
            id_runs(&[i64::MAX, i64::MAX - 1, i64::MIN]),
            vec![(i64::MIN, i64::MIN), (i64::MAX - 1, i64::MAX)]
        );
    }

    fn arms(filter: &StateFilter) -> (Vec<String>, usize) {
        let mut st = Statement::default();
        let arms = st.filter_arms(filter, KEY_ARMS);
        (arms, st.binds.len())
    }

    #[test]
    fn filter_arms() {
        assert_eq!(arms(&StateFilter::all()), (vec![String::new()], 0));
        assert_eq!(arms(&StateFilter::none()), (vec![], 0));
        assert_eq!(
            arms(&StateFilter::from_types([("m.room.create", Some(""))])),
            (vec!["s.type = $1 AND s.state_key = $2".to_owned()], 2)
        );
        assert_eq!(
            arms(&StateFilter::from_types([("m.room.name", None)])),
            (vec!["s.type = $1".to_owned()], 1)
        );
        assert_eq!(
            arms(&StateFilter::from_lazy_load_member_list(["@a", "@b"])),
            (
                vec![
                    "s.type = $1 AND s.state_key = $2".to_owned(),
                    "s.type = $3 AND s.state_key = $4".to_owned(),
                    "s.type < $5".to_owned(),
                    "s.type > $6".to_owned()
                ],
                6
            )
        );
        let everything_but_members = StateFilter::new(
            [(MEMBER.to_owned(), Some(Default::default()))]
                .into_iter()
                .collect(),
            true,
        );
        assert_eq!(
            arms(&everything_but_members),
            (vec!["s.type < $1".to_owned(), "s.type > $2".to_owned()], 2)
        );
        let two_listed = StateFilter::new(
            [
                (MEMBER.to_owned(), Some(Default::default())),
                ("m.room.name".to_owned(), Some(Default::default())),
            ]
            .into_iter()
            .collect(),
            true,
        );
        assert_eq!(
            arms(&two_listed),
            (
                vec![
                    "s.type < $1 AND s.type NOT IN ($2)".to_owned(),
                    "s.type > $3 AND s.type NOT IN ($4)".to_owned()
                ],
                4
            )
        );
    }

    #[test]
    fn keys_share_an_arm_where_in_lists_seek_each_value() {
        let mut st = Statement::default();
        let lazy = StateFilter::from_lazy_load_member_list(["@a", "@b"]);
        assert_eq!(
            st.filter_arms(&lazy, 1),
            vec![
                "s.type = $1 AND s.state_key IN ($2, $3)".to_owned(),
                "s.type < $4".to_owned(),
                "s.type > $5".to_owned()
            ]
        );
        let mut st = Statement::default();
        let one = StateFilter::from_types([("m.room.create", Some(""))]);
        assert_eq!(
            st.filter_arms(&one, 1),
            vec!["s.type = $1 AND s.state_key = $2".to_owned()]
        );
    }

    #[test]
    fn arms_join_with_union_all() {
        let mut st = Statement::default();
        let filter = StateFilter::from_types([("a", Some("")), ("b", None)]);
        assert!(st.push_arms(&filter, "SELECT x FROM s WHERE 1 = 1", KEY_ARMS));
        assert_eq!(
            st.sql,
            "SELECT x FROM s WHERE 1 = 1 AND s.type = $1 AND s.state_key = $2 UNION ALL \
             SELECT x FROM s WHERE 1 = 1 AND s.type = $3"
        );
    }
}

/// The recursive walks on a group whose edges form a diamond at every
/// level (Synapse's table allows several prev groups): each group is
/// walked once, where a `UNION ALL` recursion walked each path down (the
/// Fibonacci numbers: 28,656 paths below group 24).
#[cfg(test)]
mod diamonds {
    use super::*;
    use diesel::connection::SimpleConnection;
    use storage_core::testing::TestDb;

    storage_core::engine_tests!(each_walk_meets_each_group_once);

    const TOP: i64 = 24;

    /// Groups 1..=TOP, each from the third with edges to the two below it;
    /// group 100 a snapshot written for the state event `$s`, whose one prev
    /// event `$p` has group TOP.
    fn stacked(t: &TestDb) -> Conn {
        let _migrated = t.open();
        let mut conn = t.raw_connection();
        let groups: Vec<String> = (1..=TOP)
            .chain([100])
            .map(|g| format!("({g}, '!r:test', '$g{g}')"))
            .collect();
        let mut edges = vec!["(2, 1)".to_owned()];
        for g in 3..=TOP {
            edges.push(format!("({g}, {})", g - 1));
            edges.push(format!("({g}, {})", g - 2));
        }
        let sql = format!(
            "INSERT INTO state_groups (id, room_id, event_id) VALUES {}; \
             UPDATE state_groups SET event_id = '$s' WHERE id = 100; \
             INSERT INTO state_group_edges (state_group, prev_state_group) VALUES {}; \
             INSERT INTO events (stream_ordering, topological_ordering, event_id, type, \
                 room_id, outlier, state_key) \
             VALUES (1, 1, '$p', 'm.room.message', '!r:test', FALSE, NULL), \
                 (2, 2, '$s', 'm.room.name', '!r:test', FALSE, ''); \
             INSERT INTO event_edges (event_id, prev_event_id, room_id) \
             VALUES ('$s', '$p', '!r:test'); \
             INSERT INTO event_to_state_groups (event_id, state_group) \
             VALUES ('$p', {TOP}), ('$s', 100)",
            groups.join(", "),
            edges.join(", "),
        );
        with_conn!(&mut conn, |c| c.batch_execute(&sql)).expect("the stacked groups");
        conn
    }

    fn each_walk_meets_each_group_once(t: &TestDb) {
        let mut conn = stacked(t);
        let mut walked = chain_groups(&mut conn, &[TOP, TOP - 1]).unwrap();
        let mut below = Vec::new();
        origin_chain(&mut conn, 100, |row| below.push(row.state_group)).unwrap();
        let stats = chain_stats(&mut conn).unwrap();
        // Groups 1..=TOP with chain lengths 1..=TOP, and the snapshot 100.
        let average = ((1..=TOP).sum::<i64>() + 1) as f64 / (TOP + 1) as f64;
        let top = TOP as usize;
        assert_eq!(
            [
                ("chain_groups rows", walked.len()),
                ("chain_length", chain_length(&mut conn, TOP, 1000).unwrap()),
                ("origin_chain rows", below.len()),
                ("chain_stats longest", stats.longest as usize),
            ],
            [
                ("chain_groups rows", 2 * top - 1),
                ("chain_length", top),
                // The origin's row (its prev group, TOP), then each group below.
                ("origin_chain rows", top),
                ("chain_stats longest", top),
            ]
        );
        assert_eq!(stats.average, average, "chain_stats average");
        walked.sort_unstable();
        let expected: Vec<(i64, i64)> = [TOP, TOP - 1]
            .iter()
            .flat_map(|&root| (1..=root).map(move |g| (root, g)))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(walked, expected, "chain_groups");
        below.sort_unstable();
        assert_eq!(below, (1..=TOP).collect::<Vec<_>>(), "origin_chain");
    }
}
