//! `hs-main port --from URL --to URL [--resume]`: copy every table of ours from
//! one database to another (typically the embedded SQLite to PostgreSQL when an
//! operator adds workers), in batches, resumable, then move the target's
//! sequences past the copied ids and check the result.

pub mod tables;

use crate::cli::{print_line, Failure};
use diesel::prelude::*;
use indicatif::{ProgressBar, ProgressStyle};
use storage_core::{
    detect_layout, with_conn, Conn, Database, DatabaseConfig, DatabaseUrl, Error, Layout, OpenMode,
    Result, ResultExt, StoreConfig,
};
use storage_events::EVENTS_STREAM_SEQUENCE;
use storage_state::{StateFilter, StateGroupStore, StateStore, STATE_GROUP_SEQUENCE};
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
    /// Continue a port that was interrupted, instead of refusing a non-empty target.
    pub resume: bool,
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
    let src = Database::open(DatabaseConfig::parse(&options.from, mode)?)
        .context("opening the source")?;
    let (_claim, dst) = crate::open::open_as_main(&options.to).context("opening the target")?;
    match target_state(&dst, tables)? {
        Target::Empty => {}
        Target::Finished { rows } => {
            print_line(format_args!(
                "{} already holds a finished port ({} tables, {rows} rows): nothing to do",
                dst.url(),
                tables.len()
            ))?;
            return Ok(());
        }
        Target::Unfinished if options.resume => {}
        Target::Unfinished => {
            return Err(Error::invalid_argument(format!(
                "{} holds an unfinished port: pass --resume to continue it",
                dst.url()
            ))
            .into())
        }
        Target::HoldsData(what) => {
            return Err(Error::invalid_argument(format!(
                "{} already holds {what} that no port put there: port into a new, empty database",
                dst.url()
            ))
            .into())
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
        copy_table(table, &src, &dst, options.batch)?;
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
    check(&src, &dst, tables, options.sample)?;
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

/// Copies the table named `table` (one of [`ALL_TABLES`]).
fn copy_table(table: &str, src: &Database, dst: &Database, batch: i64) -> Result<()> {
    match table {
        Rooms::NAME => copy::<Rooms>(src, dst, batch),
        Events::NAME => copy::<Events>(src, dst, batch),
        EventJson::NAME => copy::<EventJson>(src, dst, batch),
        EventEdges::NAME => copy::<EventEdges>(src, dst, batch),
        EventAuth::NAME => copy::<EventAuth>(src, dst, batch),
        ForwardExtremities::NAME => copy::<ForwardExtremities>(src, dst, batch),
        Rejections::NAME => copy::<Rejections>(src, dst, batch),
        StateGroups::NAME => copy::<StateGroups>(src, dst, batch),
        StateGroupEdges::NAME => copy::<StateGroupEdges>(src, dst, batch),
        StateGroupsState::NAME => copy::<StateGroupsState>(src, dst, batch),
        EventToStateGroups::NAME => copy::<EventToStateGroups>(src, dst, batch),
        CurrentStateEvents::NAME => copy::<CurrentStateEvents>(src, dst, batch),
        other => Err(Error::other(format!(
            "internal: no copier for table {other}"
        ))),
    }
}

/// The rows of the table named `table` (one of [`ALL_TABLES`]).
fn count_table(table: &str, conn: &mut Conn) -> Result<i64> {
    match table {
        Rooms::NAME => Rooms::count(conn),
        Events::NAME => Events::count(conn),
        EventJson::NAME => EventJson::count(conn),
        EventEdges::NAME => EventEdges::count(conn),
        EventAuth::NAME => EventAuth::count(conn),
        ForwardExtremities::NAME => ForwardExtremities::count(conn),
        Rejections::NAME => Rejections::count(conn),
        StateGroups::NAME => StateGroups::count(conn),
        StateGroupEdges::NAME => StateGroupEdges::count(conn),
        StateGroupsState::NAME => StateGroupsState::count(conn),
        EventToStateGroups::NAME => EventToStateGroups::count(conn),
        CurrentStateEvents::NAME => CurrentStateEvents::count(conn),
        other => Err(Error::other(format!(
            "internal: no copier for table {other}"
        ))),
    }
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

/// Copies one table, resuming after the last batch a previous run committed.
fn copy<T: PortTable>(src: &Database, dst: &Database, batch: i64) -> Result<()> {
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
    src.with_connection(|_, src_conn| {
        let total = T::count(src_conn)?;
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
    })
    .with_context(|| format!("porting table {}", T::NAME))
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

/// Row counts of every table equal on both sides, and the state after a sample
/// of events equal too.
fn check(src: &Database, dst: &Database, tables: &[&str], sample: usize) -> Result<()> {
    let counts = |db: &Database| -> Result<Vec<(&str, i64)>> {
        db.with_connection(|_, c| {
            tables
                .iter()
                .map(|t| Ok((*t, count_table(t, c)?)))
                .collect()
        })
    };
    let (a, b) = (counts(src)?, counts(dst)?);
    for ((table, n), (_, m)) in a.iter().zip(&b) {
        if n != m {
            return Err(Error::corrupt(format!(
                "check failed: {table} has {n} rows in the source, {m} in the target"
            )));
        }
    }
    print_line(format_args!(
        "checked: row counts equal in {} tables ({} rows in all)",
        a.len(),
        a.iter().map(|(_, n)| n).sum::<i64>()
    ))?;
    // Spread the sample over the whole history.
    let ids: Vec<String> = src.run_read("port_sample", |txn| {
        use storage_state::schema::event_to_state_groups as etsg;
        Ok(with_conn!(txn.conn(), |c| etsg::table
            .select(etsg::event_id)
            .order(etsg::event_id)
            .load::<String>(c))?)
    })?;
    let step = (ids.len() / sample.max(1)).max(1);
    let sampled: Vec<&String> = ids.iter().step_by(step).take(sample).collect();
    let config = StoreConfig::default();
    let (src_state, dst_state) = (
        StateStore::new(src.clone(), &config)?,
        StateStore::new(dst.clone(), &config)?,
    );
    for id in &sampled {
        let (x, y) = (
            src_state.get_state_for_event(id, &StateFilter::all())?,
            dst_state.get_state_for_event(id, &StateFilter::all())?,
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
