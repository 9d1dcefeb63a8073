//! `hs-main port --from URL --to URL [--resume]`: copy every table of ours from
//! one database to another (typically the embedded SQLite to PostgreSQL when an
//! operator adds workers), in batches, resumable, then move the target's
//! sequences past the copied ids and check the result.
//!
//! The source is read as one snapshot (one read-only transaction, REPEATABLE
//! READ on PostgreSQL, a WAL read transaction on SQLite) rather than claimed:
//! a claim would need every writer stopped for the whole copy and cannot be
//! taken on a Synapse database at all, while a snapshot costs the source
//! nothing a writer waits for. What a port records in the target includes the
//! source's [`Fingerprint`] as of its snapshot, so that a `--resume` can tell
//! a source that changed since (then only `--restart` can finish).

pub mod tables;

use crate::cli::{print_line, Failure};
use diesel::prelude::*;
use http_api::settings::Settings;
use indicatif::{ProgressBar, ProgressStyle};
use storage_core::{
    detect_layout, with_conn, Conn, Database, DatabaseUrl, Error, Layout, OpenMode, Result,
    ResultExt,
};
use storage_events::EVENTS_STREAM_SEQUENCE;
use storage_state::{StateFilter, StateGroupAccess, StateStore, STATE_GROUP_SEQUENCE};
use tables::*;

diesel::table! {
    port_progress (table_name) {
        table_name -> Text,
        last_key -> Text,
        rows_copied -> BigInt,
        done -> Bool,
    }
}

/// How to port.
#[derive(Debug, Clone)]
pub struct PortOptions {
    pub from: String,
    pub to: String,
    /// The pool size and cache factor both databases are opened with.
    pub settings: Settings,
    /// Continue a port that was interrupted, instead of refusing a non-empty target.
    pub resume: bool,
    /// Delete what an earlier port copied into the target and begin again
    /// (after its source changed).
    pub restart: bool,
    /// Distinct leading-key values per batch.
    pub batch: i64,
    /// Events whose state is compared on both sides at the end.
    pub sample: usize,
}

/// The tables a port copies, in order (a table's rows after those they cite).
const ALL_TABLES: [&str; 12] = [
    Rooms::NAME,
    Events::NAME,
    EventJson::NAME,
    EventEdges::NAME,
    EventAuth::NAME,
    ForwardExtremities::NAME,
    Rejections::NAME,
    StateGroups::NAME,
    StateGroupEdges::NAME,
    StateGroupsState::NAME,
    EventToStateGroups::NAME,
    CurrentStateEvents::NAME,
];

/// What a port copies from a Synapse database: its rooms and its state, the
/// tables whose layout is Synapse's own. Its events tables carry columns and
/// rows of Synapse's own making, which ours do not describe.
const SYNAPSE_TABLES: [&str; 6] = [
    Rooms::NAME,
    StateGroups::NAME,
    StateGroupEdges::NAME,
    StateGroupsState::NAME,
    EventToStateGroups::NAME,
    CurrentStateEvents::NAME,
];

pub fn run(options: &PortOptions) -> std::result::Result<(), Failure> {
    // The source is never written. Ours must be at this binary's schema
    // version; Synapse's is read as it is, for its state tables only.
    let from_synapse = matches!(
        detect_layout(&DatabaseUrl::parse(&options.from)?).context("reading the source")?,
        Layout::Synapse { .. }
    );
    let (mode, tables) = if from_synapse {
        (OpenMode::ReadOnly, &SYNAPSE_TABLES[..])
    } else {
        (OpenMode::Replica, &ALL_TABLES[..])
    };
    let src = Database::open(options.settings.database_config_of(&options.from, mode)?)
        .context("opening the source")?;
    let (_claim, dst) = crate::open::open_config_as_main(
        options
            .settings
            .database_config_of(&options.to, OpenMode::Writer)?,
    )
    .context("opening the target")?;
    // One read-only transaction on the source for the whole port: every table
    // is copied (and counted, and checked) as of one snapshot, whoever writes
    // the source meanwhile. Nothing waits for it: PostgreSQL readers take no
    // lock a writer waits for, and an SQLite reader in WAL mode only keeps
    // the log from being checkpointed past its snapshot until it ends.
    src.run_snapshot("port_snapshot", |snap| {
        port_snapshot(snap, &src, &dst, tables, options, from_synapse)
    })
    .map_err(Failure::from)
}

/// The port itself, reading the source through `snap`, a connection inside
/// its snapshot transaction.
fn port_snapshot(
    snap: &mut Conn,
    src: &Database,
    dst: &Database,
    tables: &[&str],
    options: &PortOptions,
    from_synapse: bool,
) -> Result<()> {
    let source = Fingerprint::read(snap, tables)?;
    let target = target_state(dst, tables)?;
    let recorded = || -> Result<Option<Fingerprint>> { recorded_fingerprint(dst) };
    match target {
        Target::HoldsData(what) => {
            return Err(Error::invalid_argument(format!(
                "{} already holds {what} that no port put there: port into a new, empty database",
                dst.url()
            )))
        }
        Target::Empty => record_fingerprint(dst, &source)?,
        Target::Finished { .. } | Target::Unfinished if options.restart => {
            restart(dst)?;
            record_fingerprint(dst, &source)?;
        }
        Target::Finished { rows } => {
            match recorded()? {
                Some(then) if then != source => {
                    return Err(Error::invalid_argument(format!(
                        "{} holds a finished port of an older state of {}, which changed since \
                         ({}): pass --restart to port it again from the start (the rows of the \
                         finished port are deleted first)",
                        dst.url(),
                        src.url(),
                        then.differences(&source)
                    )))
                }
                _ => {}
            }
            print_line(format_args!(
                "{} already holds a finished port ({} tables, {rows} rows): nothing to do",
                dst.url(),
                tables.len()
            ))?;
            return Ok(());
        }
        Target::Unfinished if options.resume => match recorded()? {
            Some(then) if then != source => {
                return Err(Error::invalid_argument(format!(
                    "{} holds an unfinished port of an older state of {}, which changed since \
                     the port began ({}): the rows copied so far cannot be completed from the \
                     source as it is now. Pass --restart instead of --resume to delete them and \
                     port again from the start (stop every hs-main serve, import or worker on \
                     the source first if the target must hold everything written to it; a port \
                     copies the source as of the moment it starts)",
                    dst.url(),
                    src.url(),
                    then.differences(&source)
                )));
            }
            Some(_) => {}
            // A port begun by an older binary, which recorded none: the
            // check at the end is all there is.
            None => record_fingerprint(dst, &source)?,
        },
        Target::Unfinished => {
            return Err(Error::invalid_argument(format!(
                "{} holds an unfinished port: pass --resume to continue it (or --restart to \
                 begin again)",
                dst.url()
            )))
        }
    }
    if from_synapse {
        log::info!(
            "porting the rooms and state of Synapse database {} to {} (its events stay behind)",
            src.url(),
            dst.url()
        );
    } else {
        log::info!("porting {} to {}", src.url(), dst.url());
    }
    for table in tables {
        copy_table(table, snap, dst, options.batch, source.rows(table))?;
    }
    for sequence in [&STATE_GROUP_SEQUENCE, &EVENTS_STREAM_SEQUENCE] {
        dst.sync_sequence_after_copy(sequence)?;
        let health = dst.with_connection(|e, c| e.inspect_sequence(c, sequence))?;
        print_line(format_args!(
            "sequence {}: next id {} (highest copied {})",
            sequence.name,
            health.handed_out.unwrap_or(health.max_id) + 1,
            health.max_id
        ))?;
    }
    check(snap, &source, src, dst, tables, options)
}

/// The `port_progress` row that holds the source's [`Fingerprint`] as of the
/// snapshot a port began with (in `last_key`); not a table name.
const SNAPSHOT_ROW: &str = "(source snapshot)";

/// What a source held as of a snapshot, per copied table: its rows and its
/// highest leading key. Every write to our tables changes one of them (a new
/// event moves the stream ordering, a new or purged state group changes its
/// table's rows); a resume compares the fingerprint of its own snapshot with
/// the one the port began with, since rows copied from an older state of the
/// source cannot be completed from a newer one.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint(Vec<(String, i64, Option<String>)>);

impl Fingerprint {
    fn read(snap: &mut Conn, tables: &[&str]) -> Result<Self> {
        tables
            .iter()
            .map(|t| Ok((t.to_string(), count_table(t, snap)?, max_key(t, snap)?)))
            .collect::<Result<_>>()
            .map(Fingerprint)
            .context("reading the source's row counts")
    }

    fn rows(&self, table: &str) -> i64 {
        self.0
            .iter()
            .find(|(t, _, _)| t == table)
            .map_or(0, |(_, n, _)| *n)
    }

    /// One line of text (`table rows max-key` per table, tab-separated).
    fn encode(&self) -> String {
        self.0
            .iter()
            .map(|(t, n, k)| format!("{t} {n} {}", k.as_deref().unwrap_or("-")))
            .collect::<Vec<_>>()
            .join("\t")
    }

    fn decode(text: &str) -> Option<Self> {
        text.split('\t')
            .map(|part| {
                let mut words = part.splitn(3, ' ');
                let table = words.next()?.to_owned();
                let rows = words.next()?.parse().ok()?;
                let key = words.next()?;
                Some((table, rows, (key != "-").then(|| key.to_owned())))
            })
            .collect::<Option<_>>()
            .map(Fingerprint)
    }

    /// What changed from `self` to `now`, for an error message.
    fn differences(&self, now: &Fingerprint) -> String {
        let mut out = Vec::new();
        for (table, rows, key) in &now.0 {
            match self.0.iter().find(|(t, _, _)| t == table) {
                Some((_, r, _)) if r != rows => {
                    out.push(format!("{table}: {r} rows then, {rows} now"))
                }
                Some((_, _, k)) if k != key => out.push(format!(
                    "{table}: highest key {} then, {} now",
                    k.as_deref().unwrap_or("none"),
                    key.as_deref().unwrap_or("none")
                )),
                Some(_) => {}
                None => out.push(format!("{table}: not copied then")),
            }
        }
        if out.is_empty() {
            "other tables copied then".to_owned()
        } else {
            out.join("; ")
        }
    }
}

fn recorded_fingerprint(dst: &Database) -> Result<Option<Fingerprint>> {
    let text: Option<String> = dst.run_read("port_fingerprint", |txn| {
        Ok(with_conn!(txn.conn(), |c| port_progress::table
            .select(port_progress::last_key)
            .filter(port_progress::table_name.eq(SNAPSHOT_ROW))
            .first(c)
            .optional())?)
    })?;
    Ok(text.and_then(|t| Fingerprint::decode(&t)))
}

fn record_fingerprint(dst: &Database, source: &Fingerprint) -> Result<()> {
    dst.run_interaction("port_record_fingerprint", |txn| {
        save_progress(txn.conn(), SNAPSHOT_ROW, &source.encode(), 0, false)
    })
}

/// Deletes what a previous port copied into the target, and its progress, in
/// one transaction (`--restart`).
fn restart(dst: &Database) -> Result<()> {
    let rows = dst.run_interaction("port_restart", |txn| {
        let mut rows = 0;
        for table in ALL_TABLES.iter().rev() {
            rows += clear_table(table, txn.conn())?;
        }
        with_conn!(txn.conn(), |c| diesel::delete(port_progress::table)
            .execute(c))?;
        Ok(rows)
    })?;
    log::info!(
        "--restart: deleted the {rows} rows a previous port had copied into {}",
        dst.url()
    );
    Ok(())
}

/// What the target of a port holds already.
enum Target {
    Empty,
    /// Every table of this port copied, as a previous run recorded.
    Finished {
        rows: i64,
    },
    /// A port was started and not finished.
    Unfinished,
    /// Data that no port recorded (named).
    HoldsData(String),
}

fn target_state(dst: &Database, tables: &[&str]) -> Result<Target> {
    let (events, groups, progress) = dst.run_read("port_check_target", |txn| {
        let events: i64 = with_conn!(txn.conn(), |c| storage_events::schema::events::table
            .count()
            .get_result(c))?;
        let groups: i64 = with_conn!(txn.conn(), |c| storage_state::schema::state_groups::table
            .count()
            .get_result(c))?;
        let progress: Vec<(String, i64, bool)> = with_conn!(txn.conn(), |c| port_progress::table
            .select((
                port_progress::table_name,
                port_progress::rows_copied,
                port_progress::done
            ))
            .load(c))?;
        Ok((events, groups, progress))
    })?;
    if !progress.is_empty() {
        // Every table of this port done (the fingerprint row is never done).
        let finished = tables
            .iter()
            .all(|t| progress.iter().any(|(name, _, done)| name == t && *done));
        return Ok(if finished {
            Target::Finished {
                rows: progress.iter().map(|(_, rows, _)| rows).sum(),
            }
        } else {
            Target::Unfinished
        });
    }
    Ok(match (events, groups) {
        (0, 0) => Target::Empty,
        (0, g) => Target::HoldsData(format!("{g} state groups")),
        (e, _) => Target::HoldsData(format!("{e} events")),
    })
}

/// Runs `$body` with `$T` the [`PortTable`] named `$table` (one of [`ALL_TABLES`]).
macro_rules! with_table {
    ($table:expr, $T:ident => $body:expr) => {
        match $table {
            Rooms::NAME => {
                type $T = Rooms;
                $body
            }
            Events::NAME => {
                type $T = Events;
                $body
            }
            EventJson::NAME => {
                type $T = EventJson;
                $body
            }
            EventEdges::NAME => {
                type $T = EventEdges;
                $body
            }
            EventAuth::NAME => {
                type $T = EventAuth;
                $body
            }
            ForwardExtremities::NAME => {
                type $T = ForwardExtremities;
                $body
            }
            Rejections::NAME => {
                type $T = Rejections;
                $body
            }
            StateGroups::NAME => {
                type $T = StateGroups;
                $body
            }
            StateGroupEdges::NAME => {
                type $T = StateGroupEdges;
                $body
            }
            StateGroupsState::NAME => {
                type $T = StateGroupsState;
                $body
            }
            EventToStateGroups::NAME => {
                type $T = EventToStateGroups;
                $body
            }
            CurrentStateEvents::NAME => {
                type $T = CurrentStateEvents;
                $body
            }
            other => Err(Error::other(format!(
                "internal: no copier for table {other}"
            ))),
        }
    };
}

/// Copies the table named `table` (one of [`ALL_TABLES`]).
fn copy_table(table: &str, src: &mut Conn, dst: &Database, batch: i64, total: i64) -> Result<()> {
    with_table!(table, T => copy::<T>(src, dst, batch, total))
}

/// The rows of the table named `table` (one of [`ALL_TABLES`]).
fn count_table(table: &str, conn: &mut Conn) -> Result<i64> {
    with_table!(table, T => T::count(conn))
}

/// The highest leading key of the table named `table`, as text.
fn max_key(table: &str, conn: &mut Conn) -> Result<Option<String>> {
    with_table!(table, T => T::max_key(conn))
}

/// Deletes every row of the table named `table`; returns how many.
fn clear_table(table: &str, conn: &mut Conn) -> Result<usize> {
    with_table!(table, T => T::clear(conn))
}

fn progress_bar(total: i64, table: &str) -> ProgressBar {
    let bar = ProgressBar::new(total.max(0) as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg:<26} [{bar:40}] {pos}/{len} rows ({eta})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message(table.to_owned());
    bar
}

/// Copies one table (`total` rows in the source's snapshot) from `src_conn`,
/// resuming after the last batch a previous run committed.
fn copy<T: PortTable>(src_conn: &mut Conn, dst: &Database, batch: i64, total: i64) -> Result<()> {
    let saved: Option<(String, i64, bool)> = dst.run_read("port_progress", |txn| {
        Ok(with_conn!(txn.conn(), |c| port_progress::table
            .select((
                port_progress::last_key,
                port_progress::rows_copied,
                port_progress::done
            ))
            .filter(port_progress::table_name.eq(T::NAME))
            .first(c)
            .optional())?)
    })?;
    if let Some((_, rows, true)) = &saved {
        log::info!("{}: already copied ({rows} rows)", T::NAME);
        return Ok(());
    }
    let mut after: Option<T::Key> = match &saved {
        Some((key, _, _)) => Some(key.parse().map_err(|_| {
            Error::corrupt(format!("port_progress: bad key {key:?} for {}", T::NAME))
        })?),
        None => None,
    };
    let mut copied = saved.map_or(0, |s| s.1);
    let mut copy = || -> Result<()> {
        log::info!(
            "copying {} ({total} rows{})",
            T::NAME,
            if copied > 0 { ", resuming" } else { "" }
        );
        let bar = progress_bar(total, T::NAME);
        bar.set_position(copied.max(0) as u64);
        loop {
            let keys = T::next_keys(src_conn, after.as_ref(), batch)?;
            let Some(upto) = keys.last().cloned() else {
                break;
            };
            let n = dst.run_interaction("port_batch", |txn| {
                let n = T::copy(src_conn, txn.conn(), after.as_ref(), &upto)?;
                save_progress(
                    txn.conn(),
                    T::NAME,
                    &upto.to_string(),
                    copied + n as i64,
                    false,
                )?;
                Ok(n)
            })?;
            copied += n as i64;
            bar.set_position(copied as u64);
            after = Some(upto);
        }
        dst.run_interaction("port_done", |txn| {
            save_progress(
                txn.conn(),
                T::NAME,
                &after.as_ref().map_or(String::new(), |k| k.to_string()),
                copied,
                true,
            )
        })?;
        bar.finish_and_clear();
        log::info!("copied {} ({copied} rows)", T::NAME);
        Ok(())
    };
    copy().with_context(|| format!("porting table {}", T::NAME))
}

fn save_progress(conn: &mut Conn, table: &str, key: &str, rows: i64, done: bool) -> Result<()> {
    use port_progress as p;
    with_conn!(conn, |c| diesel::insert_into(p::table)
        .values((
            p::table_name.eq(table),
            p::last_key.eq(key),
            p::rows_copied.eq(rows),
            p::done.eq(done)
        ))
        .on_conflict(p::table_name)
        .do_update()
        .set((
            p::last_key.eq(key),
            p::rows_copied.eq(rows),
            p::done.eq(done)
        ))
        .execute(c))?;
    Ok(())
}

/// Row counts of every table equal on both sides (the source's as of the
/// snapshot), and the state after a sample of events equal too.
fn check(
    snap: &mut Conn,
    source: &Fingerprint,
    src: &Database,
    dst: &Database,
    tables: &[&str],
    options: &PortOptions,
) -> Result<()> {
    let copied: Vec<(&str, i64)> = dst.with_connection(|_, c| {
        tables
            .iter()
            .map(|t| Ok((*t, count_table(t, c)?)))
            .collect::<Result<_>>()
    })?;
    for (table, m) in &copied {
        let n = source.rows(table);
        if n != *m {
            return Err(Error::corrupt(format!(
                "check failed: {table} has {n} rows in the source, {m} in the target"
            )));
        }
    }
    print_line(format_args!(
        "checked: row counts equal in {} tables ({} rows in all)",
        copied.len(),
        copied.iter().map(|(_, n)| n).sum::<i64>()
    ))?;
    // Spread the sample over the whole history.
    let ids: Vec<String> = {
        use storage_state::schema::event_to_state_groups as etsg;
        with_conn!(snap, |c| etsg::table
            .select(etsg::event_id)
            .order(etsg::event_id)
            .load::<String>(c))?
    };
    let sample = options.sample;
    let step = (ids.len() / sample.max(1)).max(1);
    let sampled: Vec<&String> = ids.iter().step_by(step).take(sample).collect();
    // Read outside the snapshot: the state after an event never changes.
    let config = options.settings.store_config("main");
    let (src_state, dst_state) = (
        StateStore::new(src.clone(), &config)?,
        StateStore::new(dst.clone(), &config)?,
    );
    for id in &sampled {
        let (x, y) = (
            src_state
                .get_state_for_event(id, &StateFilter::all())
                .map_err(|e| e.context("checking the state after sampled events in the source"))?,
            dst_state
                .get_state_for_event(id, &StateFilter::all())
                .map_err(|e| e.context("checking the state after sampled events in the target"))?,
        );
        if x != y {
            return Err(Error::corrupt(format!(
                "check failed: the state after {id} differs between source and target"
            )));
        }
    }
    print_line(format_args!(
        "checked: state after {} sampled events equal",
        sampled.len()
    ))?;
    Ok(())
}
