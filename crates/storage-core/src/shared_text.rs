//! Text read from the database into shared strings (`Arc<str>`), and the
//! process-wide interner for the few strings that repeat in every row.
//!
//! The state caches keep maps whose entries are copied whenever a persistent
//! map copies part of itself (an overlay node path, an array merged with its
//! changes): with `String`s, each copy allocated and copied three strings;
//! with `Arc<str>` it bumps reference counts. Decoding a column straight into an `Arc<str>` costs
//! one allocation, as decoding into a `String` did, and an interned column
//! (event types: a handful per room) costs none.

use diesel::deserialize::{FromSql, FromSqlRow};
use diesel::pg::{Pg, PgValue};
use diesel::sql_types::Text;
use diesel::sqlite::{Sqlite, SqliteValue};
use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};

/// How many distinct strings [`intern`] keeps. Event types are chosen by
/// senders (remote servers too): past this many, a new one is allocated per
/// use rather than kept for the life of the process, so no sender can grow
/// the set without bound.
const MAX_INTERNED: usize = 4_096;

fn interned() -> &'static Mutex<HashSet<Arc<str>, foldhash::fast::RandomState>> {
    static SET: OnceLock<Mutex<HashSet<Arc<str>, foldhash::fast::RandomState>>> = OnceLock::new();
    SET.get_or_init(Mutex::default)
}

thread_local! {
    /// The last string this thread interned: rows come in runs of one event
    /// type, so most lookups end here without taking the lock.
    static LAST: RefCell<Option<Arc<str>>> = const { RefCell::new(None) };
}

/// One shared copy of `s` for the whole process (up to [`MAX_INTERNED`]
/// distinct strings; past that, a fresh one). For event types and other
/// strings of a small set that every row repeats.
pub fn intern(s: &str) -> Arc<str> {
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if let Some(l) = last.as_ref().filter(|l| ***l == *s) {
            return l.clone();
        }
        let shared = {
            let mut set = interned().lock().unwrap_or_else(|p| p.into_inner());
            match set.get(s) {
                Some(found) => found.clone(),
                None if set.len() < MAX_INTERNED => {
                    let new: Arc<str> = Arc::from(s);
                    set.insert(new.clone());
                    new
                }
                None => Arc::from(s),
            }
        };
        *last = Some(shared.clone());
        shared
    })
}

/// A text column decoded into an `Arc<str>`: one allocation, no `String` first.
#[derive(Debug, Clone, PartialEq, Eq, Hash, FromSqlRow)]
pub struct SharedText(pub Arc<str>);

/// A text column decoded through [`intern`]: no allocation for a string seen
/// before.
#[derive(Debug, Clone, PartialEq, Eq, Hash, FromSqlRow)]
pub struct InternedText(pub Arc<str>);

fn pg_str(value: PgValue<'_>) -> diesel::deserialize::Result<&str> {
    Ok(std::str::from_utf8(value.as_bytes())?)
}

impl FromSql<Text, Sqlite> for SharedText {
    /// `read_text` checks the UTF-8 twice; going through diesel's `String`
    /// (one check, then a copy into the `Arc`) measured worse: 576M against
    /// 567M instructions for the HQ room's 88,269 rows (callgrind).
    fn from_sql(mut value: SqliteValue<'_, '_, '_>) -> diesel::deserialize::Result<Self> {
        Ok(SharedText(Arc::from(value.read_text())))
    }
}

impl FromSql<Text, Pg> for SharedText {
    fn from_sql(value: PgValue<'_>) -> diesel::deserialize::Result<Self> {
        Ok(SharedText(Arc::from(pg_str(value)?)))
    }
}

impl FromSql<Text, Sqlite> for InternedText {
    fn from_sql(mut value: SqliteValue<'_, '_, '_>) -> diesel::deserialize::Result<Self> {
        Ok(InternedText(intern(value.read_text())))
    }
}

impl FromSql<Text, Pg> for InternedText {
    fn from_sql(value: PgValue<'_>) -> diesel::deserialize::Result<Self> {
        Ok(InternedText(intern(pg_str(value)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interned_strings_are_shared() {
        let a = intern("m.room.member");
        let b = intern(&String::from("m.room.member"));
        assert!(Arc::ptr_eq(&a, &b));
        let c = intern("m.room.create");
        assert_eq!(&*c, "m.room.create");
        // Shared across threads too, not only through the thread's last one.
        let d = std::thread::spawn(|| intern("m.room.member"))
            .join()
            .unwrap();
        assert!(Arc::ptr_eq(&a, &d));
    }
}
