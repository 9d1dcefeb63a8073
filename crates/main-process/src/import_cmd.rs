//! `hs-main import FILE...`: JSON lines of PDUs, as Synapse stores them in
//! `event_json.json`, through the same path as any persisted event: event
//! context (state before, resolution where prev events disagree, auth rules),
//! state groups, the persistence queue.
//!
//! Lines must come in an order where every prev and auth event precedes the
//! events citing it. Events already stored are skipped, so an interrupted import
//! can be run again. A malformed line stops the import with its file and line
//! number, after every event before it has been committed.
//!
//! A room is imported whole and in order, or up to a point: when a batch of a
//! room fails to persist, that room's later batches are not written (the queue
//! chains them) and its later lines are skipped, so the room never has a hole;
//! the other rooms go on, and the import ends reporting the room, the line
//! where its failed batch began, and why.

use crate::cli::Failure;
use crate::lines::Lines;
use event_context::{ContextBuilder, Pdu, PduReader, PendingEvents};
use http_api::settings::Settings;
use indicatif::{ProgressBar, ProgressStyle};
use persistence::{Chain, Handle, Pipeline};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use storage_core::{Error, Result, ResultExt};
use storage_events::{EventToPersist, Existing, RefreshSchedule};

/// Lines read, parsed and checked against storage at a time.
const CHUNK: usize = 256;
/// Events of a room written in one transaction. Larger than the queue's batch
/// for requests: an import's events arrive faster than they are written.
pub const BATCH: usize = 1_000;
/// [`BATCH`] where a statement costs no round trip (SQLite): there most of a
/// commit's cost is the index pages it rewrites (event ids are random keys),
/// pages that a larger batch shares among more events. The persist bench's
/// room, A/B of 1,000 and 2,500: system time 3.1 -> 2.0 s, user 6.8 -> 5.9 s,
/// anonymous peak 64 -> 85 MiB. PostgreSQL gained nothing and its peak grew
/// by 30 MiB, so it keeps [`BATCH`].
pub const BATCH_CHEAP_STATEMENTS: usize = 2_500;

/// The events of a room an import writes in one transaction on `engine`.
pub fn batch_size(engine: &dyn storage_core::Engine) -> usize {
    if engine.round_trips_are_cheap() {
        BATCH_CHEAP_STATEMENTS
    } else {
        BATCH
    }
}
/// Batches in flight before the reader waits for the oldest.
const IN_FLIGHT: usize = 2;

/// Where a line came from, for messages.
#[derive(Debug, Clone)]
struct Location {
    file: Arc<str>,
    line: usize,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// How many rejected events are named in the report.
const REJECTED_SHOWN: usize = 5;

#[derive(Debug, Default)]
struct Counts {
    /// Events written by committed batches.
    committed: u64,
    /// Events found already stored (before or while writing).
    skipped: u64,
    /// Committed events that the auth rules rejected, the first few named.
    rejected: u64,
    rejected_shown: Vec<(String, String)>,
    rooms: HashSet<String>,
}

/// Why a room stopped being imported.
#[derive(Debug)]
struct RoomFailure {
    /// The first line of the batch that failed.
    at: Location,
    error: String,
}

/// One room's state in the import.
#[derive(Debug)]
struct RoomImport {
    chain: Chain,
    buffer: Vec<EventToPersist>,
    /// Where the first buffered event came from.
    buffer_start: Option<Location>,
    /// Set once a batch of the room failed: nothing more of it is written.
    stopped: bool,
    failed: Option<RoomFailure>,
    /// Events of the room read and not imported because it stopped (the failed
    /// batch's included).
    not_imported: u64,
}

/// A batch handed to the queue and not yet waited for.
#[derive(Debug)]
struct InFlight {
    room: String,
    handle: Handle,
    ids: Vec<String>,
    start: Location,
    rejected: Vec<(String, String)>,
}

struct Importer {
    /// Events of a room a batch holds ([`batch_size`]).
    batch: usize,
    pipeline: Pipeline,
    pending: PendingEvents,
    /// Reads lines as PDUs of their room's version (the same reading as the HTTP API's).
    reader: PduReader,
    rooms: HashMap<String, RoomImport>,
    in_flight: VecDeque<InFlight>,
    counts: Counts,
    /// When to refresh the planner's statistics of the tables being filled.
    statistics: RefreshSchedule,
}

/// Imports `files` into `database` with the default settings (what tests and
/// benchmarks call).
pub fn run(database: &str, files: &[PathBuf]) -> std::result::Result<(), Failure> {
    let settings =
        Settings::for_database(database).map_err(|e| Failure::Error(Error::invalid_argument(e)))?;
    import(&settings, files)
}

/// `hs-main import FILE...`: into the settings' database, with their pool
/// size and cache factor.
pub fn import(settings: &Settings, files: &[PathBuf]) -> std::result::Result<(), Failure> {
    let started = Instant::now();
    let (_claim, db) = crate::open::open_as_main(settings)?;
    let batch = batch_size(db.engine());
    let pipeline = Pipeline::open(db, &settings.store_config("main"))?;
    let reader = PduReader::new(pipeline.builder.events().clone());
    let mut importer = Importer {
        batch,
        reader,
        pipeline,
        pending: PendingEvents::default(),
        rooms: HashMap::new(),
        in_flight: VecDeque::new(),
        counts: Counts::default(),
        statistics: RefreshSchedule::default(),
    };
    let total: u64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} ({eta})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let mut stopped: Option<Error> = None;
    'files: for file in files {
        bar.set_message(file.display().to_string());
        let counted = bar.clone();
        let mut lines = match Lines::open(file, move |r| Box::new(counted.wrap_read(r))) {
            Ok(l) => l,
            Err(e) => {
                stopped = Some(e);
                break;
            }
        };
        let name: Arc<str> = lines.name().into();
        let mut chunk: Vec<(Location, String)> = Vec::with_capacity(CHUNK);
        loop {
            // A line that cannot be read ends the import, after the lines read
            // before it are handled.
            let next = lines.next_line();
            let end = !matches!(next, Ok(Some(_)));
            if let Ok(Some((line, text))) = next.as_ref().map(Option::as_ref) {
                let at = Location {
                    file: name.clone(),
                    line: *line,
                };
                chunk.push((at, text.clone()));
            }
            if chunk.len() == CHUNK || end {
                if let Err((at, e)) = importer.chunk(std::mem::take(&mut chunk)) {
                    stopped = Some(e.context(at.to_string()));
                    break 'files;
                }
            }
            match next {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    stopped = Some(e);
                    break 'files;
                }
            }
        }
    }
    // Everything read before a failure is still committed.
    importer.finish();
    bar.finish_and_clear();
    importer.report_rejected();
    let c = &importer.counts;
    if let Some(e) = stopped {
        return Err(Failure::Error(e.context(format!(
            "import stopped; the {} events read before this line are committed{}",
            c.committed,
            importer.failed_rooms_note()
        ))));
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "imported {} events ({} already stored, {} rejected) in {} rooms, {} state groups, {:.1} s, {:.0} events/s",
        c.committed,
        c.skipped,
        c.rejected,
        c.rooms.len(),
        importer.pipeline.builder.groups_stored(),
        secs,
        c.committed as f64 / secs.max(1e-9)
    );
    let failed = importer.failed_rooms_note();
    if !failed.is_empty() {
        return Err(Failure::Error(Error::other(format!(
            "some rooms were not imported whole{failed}"
        ))));
    }
    Ok(())
}

impl Importer {
    /// Imports a chunk of numbered lines: parses them in order (stopping at the
    /// first bad one), asks storage once which are already stored, and handles
    /// each of the good ones before reporting the bad one.
    fn chunk(
        &mut self,
        lines: Vec<(Location, String)>,
    ) -> std::result::Result<(), (Location, Error)> {
        let mut parsed = Vec::with_capacity(lines.len());
        let mut failure = None;
        for (at, text) in lines {
            match self.reader.read(&text) {
                Ok(pdu) => parsed.push((at, pdu)),
                Err(e) => {
                    failure = Some((at, e));
                    break;
                }
            }
        }
        let ids: Vec<String> = parsed.iter().map(|(_, p)| p.event_id.to_string()).collect();
        let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let stored = match self.pipeline.builder.events().stored_events(&id_refs) {
            Ok(stored) => stored,
            Err(e) => {
                let at = parsed.first().map(|p| p.0.clone()).or(failure.map(|f| f.0));
                return Err((at.expect("a chunk is never empty"), e));
            }
        };
        for (at, pdu) in parsed {
            self.event(pdu, &at, &stored).map_err(|e| (at, e))?;
        }
        failure.map_or(Ok(()), Err)
    }

    fn event(&mut self, pdu: Pdu, at: &Location, stored: &HashMap<String, Existing>) -> Result<()> {
        let id = pdu.event_id.to_string();
        let room_id = pdu.room_id.to_string();
        let queue = &self.pipeline.queue;
        let room = self
            .rooms
            .entry(room_id.clone())
            .or_insert_with(|| RoomImport {
                chain: queue.chain(),
                buffer: Vec::new(),
                buffer_start: None,
                stopped: false,
                failed: None,
                not_imported: 0,
            });
        // The failed batch itself is reported when it is waited for.
        if room.stopped || queue.chain_failure(room.chain).is_some() {
            room.stopped = true;
            room.not_imported += 1;
            return Ok(());
        }
        // An event stored already is kept as stored, but for an outlier the
        // auth rules accepted, which an accepted context gives its place in
        // the room's graph (`EventToPersist::write_as`).
        let stored = stored.get(&id);
        if self.pending.contains(&id) || stored.is_some_and(|s| !s.may_be_placed()) {
            self.counts.skipped += 1;
            return Ok(());
        }
        let context = self
            .pipeline
            .builder
            .compute_event_context(&pdu, false, &self.pending)
            .with_context(|| format!("event {id}"))?;
        if stored.is_some() && context.rejected.is_some() {
            // Stays the outlier it is: nothing prepared for it is written.
            self.pipeline
                .builder
                .state()
                .forget_prepared_groups(&context.new_state_groups);
            self.counts.skipped += 1;
            return Ok(());
        }
        let row = ContextBuilder::to_persist(&pdu, &context);
        self.pending.insert(Arc::new(pdu), context);
        room.buffer_start.get_or_insert_with(|| at.clone());
        room.buffer.push(row);
        if room.buffer.len() >= self.batch {
            self.send(&room_id)?;
        }
        Ok(())
    }

    /// Hands the room's buffered events to the queue, as the next link of the
    /// room's chain.
    fn send(&mut self, room_id: &str) -> Result<()> {
        let room = self.rooms.get_mut(room_id).expect("a room with events");
        let batch = std::mem::take(&mut room.buffer);
        let Some(start) = room.buffer_start.take() else {
            return Ok(());
        };
        let ids = batch.iter().map(|e| e.event_id.clone()).collect();
        let rejected = batch
            .iter()
            .filter_map(|e| e.rejected.clone().map(|r| (e.event_id.clone(), r)))
            .collect();
        let handle = self
            .pipeline
            .queue
            .enqueue_chained(room_id, batch, room.chain);
        self.in_flight.push_back(InFlight {
            room: room_id.to_owned(),
            handle,
            ids,
            start,
            rejected,
        });
        while self.in_flight.len() > IN_FLIGHT {
            self.wait_oldest();
        }
        Ok(())
    }

    /// Waits for the oldest batch in flight and counts its outcome; a failure
    /// stops its room.
    fn wait_oldest(&mut self) {
        let Some(batch) = self.in_flight.pop_front() else {
            return;
        };
        // Committed or failed, the batch's events leave `pending`.
        let forgotten = self.pending.forget(batch.ids.iter().map(String::as_str));
        match batch.handle.wait() {
            Ok(written) => {
                let skipped: HashSet<&str> = written.skipped.iter().map(String::as_str).collect();
                self.counts.committed += written.positions.len() as u64;
                self.counts.skipped += written.skipped.len() as u64;
                if !written.positions.is_empty() {
                    self.counts.rooms.insert(batch.room.clone());
                }
                if self.statistics.due(self.counts.committed) {
                    // Only the plans depend on it: an import that cannot
                    // refresh them goes on, slower.
                    if let Err(e) = self.pipeline.builder.events().refresh_statistics() {
                        log::warn!("{e}");
                    }
                }
                for (id, reason) in batch.rejected {
                    if skipped.contains(id.as_str()) {
                        continue;
                    }
                    self.counts.rejected += 1;
                    if self.counts.rejected_shown.len() < REJECTED_SHOWN {
                        self.counts.rejected_shown.push((id, reason));
                    }
                }
                // The room's next events name its state events as auth events
                // and its last event as a prev event. Messages are left out:
                // the cache would hold the whole import.
                let last = batch.ids.last().map(String::as_str);
                for pdu in forgotten {
                    let id = pdu.event_id.as_str();
                    if !skipped.contains(id) && (pdu.is_state() || Some(id) == last) {
                        self.pipeline.builder.remember_committed_pdu(pdu);
                    }
                }
            }
            Err(e) => {
                // The shared error keeps its backtrace; the report carries its text.
                log::debug!("{e:?}");
                let room = self.rooms.get_mut(&batch.room).expect("a room with events");
                room.stopped = true;
                room.not_imported += batch.ids.len() as u64;
                if room.failed.is_none() {
                    log::error!(
                        "room {}: the batch starting at {} failed; the room's later lines are not imported: {e}",
                        batch.room,
                        batch.start
                    );
                    room.failed = Some(RoomFailure {
                        at: batch.start,
                        error: e.to_string(),
                    });
                }
            }
        }
    }

    /// Sends what is buffered and waits for every batch.
    fn finish(&mut self) {
        let state = self.pipeline.builder.state();
        for room in self.rooms.values_mut().filter(|r| r.stopped) {
            room.not_imported += room.buffer.len() as u64;
            // Never written: the groups prepared for them go too.
            state.forget_prepared_groups(room.buffer.iter().flat_map(|e| &e.new_state_groups));
            self.pending
                .forget(room.buffer.iter().map(|e| e.event_id.as_str()));
            room.buffer.clear();
        }
        let mut rooms: Vec<String> = self
            .rooms
            .iter()
            .filter(|(_, r)| !r.buffer.is_empty())
            .map(|(id, _)| id.clone())
            .collect();
        rooms.sort();
        for room in rooms {
            let room_state = self.rooms.get_mut(&room).expect("listed");
            let batch = std::mem::take(&mut room_state.buffer);
            let start = room_state.buffer_start.take().expect("a buffered event");
            let ids = batch.iter().map(|e| e.event_id.clone()).collect();
            let rejected = batch
                .iter()
                .filter_map(|e| e.rejected.clone().map(|r| (e.event_id.clone(), r)))
                .collect();
            let handle = self
                .pipeline
                .queue
                .enqueue_chained(&room, batch, room_state.chain);
            self.in_flight.push_back(InFlight {
                room,
                handle,
                ids,
                start,
                rejected,
            });
        }
        while !self.in_flight.is_empty() {
            self.wait_oldest();
        }
    }

    /// Names the first rejected events on standard error.
    fn report_rejected(&self) {
        let c = &self.counts;
        for (id, reason) in &c.rejected_shown {
            eprintln!("rejected {id}: {reason}");
        }
        if c.rejected > c.rejected_shown.len() as u64 {
            eprintln!(
                "... and {} more rejected events",
                c.rejected - c.rejected_shown.len() as u64
            );
        }
    }

    /// "; room R stopped at FILE:LINE (N events from there on not imported):
    /// ERROR" for each room that stopped.
    fn failed_rooms_note(&self) -> String {
        let failed: BTreeMap<&String, (&RoomFailure, u64)> = self
            .rooms
            .iter()
            .filter_map(|(id, r)| r.failed.as_ref().map(|f| (id, (f, r.not_imported))))
            .collect();
        failed
            .into_iter()
            .map(|(room, (f, n))| {
                format!(
                    "; room {room} stopped at {} ({n} events from there on not imported): {}",
                    f.at, f.error
                )
            })
            .collect()
    }
}
