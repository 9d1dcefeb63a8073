//! `hs-main port --from URL --to URL [--resume]`: copy every table of ours from
//! one database to another (typically the embedded SQLite to PostgreSQL when an
//! operator adds workers), in batches, resumable, then move the target's
//! sequences past the copied ids and check the result.

pub mod tables;

use crate::cli::Failure;
use diesel::prelude::*;
use indicatif::{ProgressBar, ProgressStyle};
use storage_core::{
    with_conn, Conn, Database, DatabaseConfig, Error, OpenMode, Result, ResultExt, StoreConfig,
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

pub fn run(options: &PortOptions) -> std::result::Result<(), Failure> {
    // The source must be at this binary's schema version, and is never written.
    let src = Database::open(DatabaseConfig::parse(&options.from, OpenMode::Replica)?)
        .context("opening the source")?;
    let (_claim, dst) = crate::open::open_as_main(&options.to).context("opening the target")?;
    if !options.resume {
        refuse_non_empty(&dst)?;
    }
    log::info!("porting {} to {}", src.url(), dst.url());
    copy::<Rooms>(&src, &dst, options.batch)?;
    copy::<Events>(&src, &dst, options.batch)?;
    copy::<EventJson>(&src, &dst, options.batch)?;
    copy::<EventEdges>(&src, &dst, options.batch)?;
    copy::<EventAuth>(&src, &dst, options.batch)?;
    copy::<ForwardExtremities>(&src, &dst, options.batch)?;
    copy::<Rejections>(&src, &dst, options.batch)?;
    copy::<StateGroups>(&src, &dst, options.batch)?;
    copy::<StateGroupEdges>(&src, &dst, options.batch)?;
    copy::<StateGroupsState>(&src, &dst, options.batch)?;
    copy::<EventToStateGroups>(&src, &dst, options.batch)?;
    copy::<CurrentStateEvents>(&src, &dst, options.batch)?;
    for sequence in [&STATE_GROUP_SEQUENCE, &EVENTS_STREAM_SEQUENCE] {
        dst.sync_sequence(sequence)?;
        let health = dst.with_connection(|e, c| e.inspect_sequence(c, sequence))?;
        println!(
            "sequence {}: next id {} (highest copied {})",
            sequence.name,
            health.handed_out.unwrap_or(health.max_id) + 1,
            health.max_id
        );
    }
    check(&src, &dst, options.sample)?;
    Ok(())
}

fn refuse_non_empty(dst: &Database) -> Result<()> {
    let (events, progress) = dst.run_read("port_check_target", |txn| {
        let events: i64 = with_conn!(txn.conn(), |c| storage_events::schema::events::table
            .count()
            .get_result(c))?;
        let progress: i64 = with_conn!(txn.conn(), |c| port_progress::table.count().get_result(c))?;
        Ok((events, progress))
    })?;
    if events > 0 || progress > 0 {
        return Err(Error::invalid_argument(format!(
            "the target already holds {events} events{}; pass --resume to continue an interrupted port",
            if progress > 0 { " and an unfinished port" } else { "" }
        )));
    }
    Ok(())
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
fn check(src: &Database, dst: &Database, sample: usize) -> Result<()> {
    let counts = |db: &Database| -> Result<Vec<(&'static str, i64)>> {
        db.with_connection(|_, c| {
            Ok(vec![
                (Rooms::NAME, Rooms::count(c)?),
                (Events::NAME, Events::count(c)?),
                (EventJson::NAME, EventJson::count(c)?),
                (EventEdges::NAME, EventEdges::count(c)?),
                (EventAuth::NAME, EventAuth::count(c)?),
                (ForwardExtremities::NAME, ForwardExtremities::count(c)?),
                (Rejections::NAME, Rejections::count(c)?),
                (StateGroups::NAME, StateGroups::count(c)?),
                (StateGroupEdges::NAME, StateGroupEdges::count(c)?),
                (StateGroupsState::NAME, StateGroupsState::count(c)?),
                (EventToStateGroups::NAME, EventToStateGroups::count(c)?),
                (CurrentStateEvents::NAME, CurrentStateEvents::count(c)?),
            ])
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
    println!(
        "checked: row counts equal in {} tables ({} rows in all)",
        a.len(),
        a.iter().map(|(_, n)| n).sum::<i64>()
    );
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
    println!(
        "checked: state after {} sampled events equal",
        sampled.len()
    );
    Ok(())
}
