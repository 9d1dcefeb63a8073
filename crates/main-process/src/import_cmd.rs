//! `hs-main import FILE...`: JSON lines of PDUs, as Synapse stores them in
//! `event_json.json`, through the same path as any persisted event: event
//! context (state before, resolution where prev events disagree, auth rules),
//! state groups, the persistence queue.
//!
//! Lines must come in an order where every prev and auth event precedes the
//! events citing it. Events already stored are skipped, so an interrupted import
//! can be run again. A malformed line stops the import with its file and line
//! number, after every event before it has been committed.

use crate::cli::Failure;
use crate::persist::{ExtremityResolver, RoomPersister};
use crate::queue::{Handle, PersistenceQueue};
use event_context::ruma::RoomVersionId;
use event_context::{ContextBuilder, Pdu, PendingEvents};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use storage_core::{Database, Error, Result, ResultExt, StoreConfig};
use storage_events::{EventStore, EventToPersist, EventsStore};
use storage_state::{StateGroup, StateMap};

/// Events handed to the queue at a time, per room.
const BATCH: usize = 100;
/// Lines read, parsed and checked against storage at a time.
const CHUNK: usize = 256;
/// Batches in flight before the reader waits for the oldest.
const IN_FLIGHT: usize = 8;

/// Resolves current state over several forward extremities for the persister,
/// with the batch being written readable before it is stored.
struct Resolver {
    builder: ContextBuilder,
}

impl ExtremityResolver for Resolver {
    fn resolve_groups(
        &self,
        room_id: &str,
        groups: &[StateGroup],
        batch: &[EventToPersist],
    ) -> Result<StateMap> {
        let version = room_version(self.builder.events(), room_id)?
            .ok_or_else(|| Error::corrupt(format!("room {room_id} has no version")))?;
        let mut pending = PendingEvents::default();
        for e in batch {
            let mut pdu = Pdu::from_json(&e.json, Some(&version)).map_err(|err| {
                Error::corrupt(format!("event {} does not parse: {err}", e.event_id))
            })?;
            pdu.rejected = e.rejected.is_some();
            pending.insert_pdu(Arc::new(pdu));
        }
        Ok(self
            .builder
            .resolve_state_of_groups(room_id, &version, groups, &pending)?
            .0)
    }
}

fn room_version(events: &EventsStore, room_id: &str) -> Result<Option<RoomVersionId>> {
    events
        .get_room_version(room_id)?
        .map(|v| {
            RoomVersionId::try_from(v.as_str())
                .map_err(|e| Error::corrupt(format!("room {room_id} has a bad version {v:?}: {e}")))
        })
        .transpose()
}

/// The stores and queue an import (or any writer of events) works with.
#[derive(Debug)]
pub struct Pipeline {
    pub builder: ContextBuilder,
    pub queue: PersistenceQueue,
}

impl Pipeline {
    pub fn open(db: Database, config: &StoreConfig) -> Result<Pipeline> {
        let events = EventsStore::new(db, config)?;
        let builder = ContextBuilder::new(events.clone(), config);
        let persister = RoomPersister::new(
            events,
            Arc::new(Resolver {
                builder: builder.clone(),
            }),
        );
        let queue = PersistenceQueue::new(
            BATCH,
            Box::new(move |room, batch| persister.persist(room, batch)),
        );
        Ok(Pipeline { builder, queue })
    }
}

#[derive(Debug, Default)]
struct Counts {
    events: u64,
    skipped: u64,
    rooms: HashSet<String>,
}

struct Importer {
    pipeline: Pipeline,
    pending: PendingEvents,
    versions: HashMap<String, RoomVersionId>,
    buffers: HashMap<String, Vec<EventToPersist>>,
    in_flight: VecDeque<(Handle, Vec<String>)>,
    counts: Counts,
}

pub fn run(database: &str, files: &[PathBuf]) -> std::result::Result<(), Failure> {
    let started = Instant::now();
    let (_claim, db) = crate::open::open_as_main(database)?;
    let mut importer = Importer {
        pipeline: Pipeline::open(db, &StoreConfig::default())?,
        pending: PendingEvents::default(),
        versions: HashMap::new(),
        buffers: HashMap::new(),
        in_flight: VecDeque::new(),
        counts: Counts::default(),
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
    let mut outcome = Ok(());
    'files: for file in files {
        bar.set_message(file.display().to_string());
        let reader = match std::fs::File::open(file) {
            Ok(f) => BufReader::new(f),
            Err(e) => {
                outcome = Err(Error::from(e).context(format!("opening {}", file.display())));
                break;
            }
        };
        let mut chunk: Vec<(usize, String)> = Vec::with_capacity(CHUNK);
        let mut lines = reader.lines().enumerate().peekable();
        while let Some((n, line)) = lines.next() {
            match line {
                Ok(l) => {
                    bar.inc(l.len() as u64 + 1);
                    if !l.trim().is_empty() {
                        chunk.push((n + 1, l));
                    }
                }
                Err(e) => {
                    outcome = Err(Error::from(e).context(format!("{}:{}", file.display(), n + 1)));
                    break 'files;
                }
            }
            if chunk.len() == CHUNK || lines.peek().is_none() {
                if let Err((line_no, e)) = importer.chunk(std::mem::take(&mut chunk)) {
                    outcome = Err(e.context(format!("{}:{line_no}", file.display())));
                    break 'files;
                }
            }
        }
    }
    // Everything read before a failure is still committed.
    let flushed = importer.finish();
    bar.finish_and_clear();
    outcome?;
    flushed?;
    let secs = started.elapsed().as_secs_f64();
    let c = &importer.counts;
    println!(
        "imported {} events ({} already stored) in {} rooms, {} state groups, {:.1} s, {:.0} events/s",
        c.events,
        c.skipped,
        c.rooms.len(),
        importer.pipeline.builder.groups_stored(),
        secs,
        c.events as f64 / secs.max(1e-9)
    );
    Ok(())
}

impl Importer {
    /// Imports a chunk of numbered lines: parses them in order (stopping at the
    /// first bad one), asks storage once which are already stored, and handles
    /// each of the good ones before reporting the bad one.
    fn chunk(&mut self, lines: Vec<(usize, String)>) -> std::result::Result<(), (usize, Error)> {
        let mut parsed = Vec::with_capacity(lines.len());
        let mut failure = None;
        for (line_no, text) in &lines {
            match self.parse(text) {
                Ok(pdu) => {
                    if pdu.event_type == "m.room.create" && pdu.state_key.as_deref() == Some("") {
                        self.versions
                            .insert(pdu.room_id.to_string(), pdu.room_version.clone());
                    }
                    parsed.push((*line_no, pdu));
                }
                Err(e) => {
                    failure = Some((*line_no, e));
                    break;
                }
            }
        }
        let ids: Vec<String> = parsed.iter().map(|(_, p)| p.event_id.to_string()).collect();
        let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let stored = self
            .pipeline
            .builder
            .events()
            .have_events(&id_refs)
            .map_err(|e| (parsed.first().map_or(0, |p| p.0), e))?;
        for (line_no, pdu) in parsed {
            self.event(pdu, &stored).map_err(|e| (line_no, e))?;
        }
        failure.map_or(Ok(()), Err)
    }

    fn event(&mut self, pdu: Pdu, stored: &HashSet<String>) -> Result<()> {
        let id = pdu.event_id.to_string();
        let room_id = pdu.room_id.to_string();
        if self.pending.contains(&id) || stored.contains(&id) {
            self.counts.skipped += 1;
            return Ok(());
        }
        let context = self
            .pipeline
            .builder
            .compute_event_context(&pdu, false, &self.pending)
            .with_context(|| format!("event {id}"))?;
        let row = ContextBuilder::to_persist(&pdu, &context);
        self.pending.insert(Arc::new(pdu), context);
        self.counts.events += 1;
        self.counts.rooms.insert(room_id.clone());
        let buffer = self.buffers.entry(room_id.clone()).or_default();
        buffer.push(row);
        if buffer.len() >= BATCH {
            let batch = std::mem::take(buffer);
            self.send(&room_id, batch)?;
        }
        Ok(())
    }

    /// Reads a line as a PDU of its room's version.
    fn parse(&self, line: &str) -> Result<Pdu> {
        let head: serde_json::Value = serde_json::from_str(line).map_err(|e| {
            Error::invalid_argument(format!("malformed event: not valid JSON: {e}"))
        })?;
        let is_create = head.get("type").and_then(|t| t.as_str()) == Some("m.room.create")
            && head.get("state_key").and_then(|k| k.as_str()) == Some("");
        let version = if is_create {
            None
        } else {
            let room_id = head
                .get("room_id")
                .and_then(|r| r.as_str())
                .ok_or_else(|| {
                    Error::invalid_argument("malformed event: missing field `room_id`")
                })?;
            let version = match self.versions.get(room_id) {
                Some(v) => Some(v.clone()),
                None => room_version(self.pipeline.builder.events(), room_id)?,
            };
            Some(version.ok_or_else(|| {
                Error::invalid_argument(format!(
                    "event for unknown room {room_id}: its m.room.create event must come first"
                ))
            })?)
        };
        Pdu::from_json(line, version.as_ref())
            .map_err(|e| Error::invalid_argument(format!("malformed event: {e}")))
    }

    fn send(&mut self, room_id: &str, batch: Vec<EventToPersist>) -> Result<()> {
        let ids = batch.iter().map(|e| e.event_id.clone()).collect();
        let handle = self.pipeline.queue.enqueue(room_id, batch);
        self.in_flight.push_back((handle, ids));
        while self.in_flight.len() > IN_FLIGHT {
            self.wait_oldest()?;
        }
        Ok(())
    }

    fn wait_oldest(&mut self) -> Result<()> {
        if let Some((handle, ids)) = self.in_flight.pop_front() {
            let batch = handle.wait().map_err(|e| {
                // The shared error keeps its backtrace; this copy carries its text.
                log::debug!("{e:?}");
                Error::other(e.to_string())
            })?;
            self.counts.skipped += batch.skipped.len() as u64;
            self.counts.events -= batch.skipped.len() as u64;
            self.pending.forget(ids.iter().map(String::as_str));
        }
        Ok(())
    }

    /// Sends what is buffered and waits for every batch.
    fn finish(&mut self) -> Result<()> {
        let mut rooms: Vec<String> = self.buffers.keys().cloned().collect();
        rooms.sort();
        for room in rooms {
            let batch = std::mem::take(self.buffers.get_mut(&room).expect("listed"));
            if !batch.is_empty() {
                let ids = batch.iter().map(|e| e.event_id.clone()).collect();
                let handle = self.pipeline.queue.enqueue(&room, batch);
                self.in_flight.push_back((handle, ids));
            }
        }
        let mut first_error = None;
        while !self.in_flight.is_empty() {
            if let Err(e) = self.wait_oldest() {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
