//! The input of `hs-main import`: JSON lines from a file, from standard input
//! (`-`) or from a gzip file (`.gz`), read one line at a time with a bound on a
//! line's length, so that a runaway line costs no more memory than the bound
//! and is reported with its file and line number.

use event_context::MAX_PDU_BYTES;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use storage_core::{Error, Result};

/// The longest line read. A PDU is at most [`MAX_PDU_BYTES`] of canonical JSON;
/// the lines Synapse's `event_json` holds are compact too, so this leaves room
/// for whitespace that an export might add, and no more.
pub const MAX_LINE_BYTES: usize = 4 * MAX_PDU_BYTES;

/// An input file's lines. Empty lines are skipped, but counted.
pub struct Lines {
    reader: Box<dyn BufRead + Send>,
    name: String,
    line_no: usize,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Lines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lines")
            .field("name", &self.name)
            .field("line_no", &self.line_no)
            .finish_non_exhaustive()
    }
}

impl Lines {
    /// Opens `path`: `-` is standard input, a name ending in `.gz` is decompressed.
    /// `wrap` sees the raw bytes as they are read (a progress bar counts them).
    pub fn open(
        path: &Path,
        wrap: impl FnOnce(Box<dyn Read + Send>) -> Box<dyn Read + Send>,
    ) -> Result<Lines> {
        let name = path.display().to_string();
        let raw: Box<dyn Read + Send> = if path.as_os_str() == "-" {
            Box::new(std::io::stdin())
        } else {
            Box::new(
                std::fs::File::open(path)
                    .map_err(|e| Error::from(e).context(format!("opening {name}")))?,
            )
        };
        let raw = wrap(raw);
        let reader: Box<dyn BufRead + Send> = if path.extension().is_some_and(|e| e == "gz") {
            Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(raw)))
        } else {
            Box::new(BufReader::new(raw))
        };
        Ok(Lines::new(name, reader))
    }

    pub fn new(name: String, reader: Box<dyn BufRead + Send>) -> Lines {
        Lines {
            reader,
            name,
            line_no: 0,
            buf: Vec::new(),
        }
    }

    /// What the input is called in messages (`-` for standard input).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The next non-empty line with its 1-based number; `None` at the end. An
    /// unreadable line (I/O, invalid UTF-8, over [`MAX_LINE_BYTES`]) is an error
    /// naming the file and line.
    pub fn next_line(&mut self) -> Result<Option<(usize, String)>> {
        loop {
            self.buf.clear();
            self.line_no += 1;
            let at = format!("{}:{}", self.name, self.line_no);
            let (read, complete) = self
                .read_bounded()
                .map_err(|e| Error::from(e).context(at.clone()))?;
            if read == 0 {
                return Ok(None);
            }
            if !complete {
                return Err(Error::invalid_argument(format!(
                    "{at}: the line is longer than {MAX_LINE_BYTES} bytes (a PDU is at most \
                     {MAX_PDU_BYTES} bytes of canonical JSON)"
                )));
            }
            let text = std::str::from_utf8(&self.buf).map_err(|e| {
                Error::invalid_argument(format!(
                    "{at}: not valid UTF-8 (byte {}): {e}",
                    e.valid_up_to() + 1
                ))
            })?;
            let text = text.trim();
            if !text.is_empty() {
                return Ok(Some((self.line_no, text.to_owned())));
            }
        }
    }

    /// Reads up to the next newline, keeping at most [`MAX_LINE_BYTES`] in
    /// `buf`; returns the bytes consumed and whether the line fitted.
    fn read_bounded(&mut self) -> std::io::Result<(usize, bool)> {
        let mut consumed = 0;
        let mut fits = true;
        loop {
            let available = match self.reader.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if available.is_empty() {
                return Ok((consumed, fits));
            }
            let (part, done) = match memchr(available) {
                Some(i) => (&available[..=i], true),
                None => (available, false),
            };
            let n = part.len();
            if fits && self.buf.len() + n <= MAX_LINE_BYTES + 1 {
                self.buf.extend_from_slice(part);
            } else {
                fits = false;
                self.buf.clear();
            }
            self.reader.consume(n);
            consumed += n;
            if done {
                return Ok((consumed, fits));
            }
        }
    }
}

fn memchr(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|b| *b == b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: Vec<u8>) -> Lines {
        Lines::new("input".into(), Box::new(std::io::Cursor::new(input)))
    }

    #[test]
    fn numbers_lines_and_skips_empty_ones() {
        let mut l = lines(b"a\n\n  \nb\r\nc".to_vec());
        assert_eq!(l.next_line().unwrap(), Some((1, "a".into())));
        assert_eq!(l.next_line().unwrap(), Some((4, "b".into())));
        assert_eq!(l.next_line().unwrap(), Some((5, "c".into())));
        assert_eq!(l.next_line().unwrap(), None);
    }

    #[test]
    fn a_line_over_the_bound_is_an_error_naming_it_and_is_not_kept() {
        let mut input = b"first\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', MAX_LINE_BYTES * 3));
        input.extend(b"\nlast\n");
        let mut l = lines(input);
        assert_eq!(l.next_line().unwrap(), Some((1, "first".into())));
        let e = l.next_line().unwrap_err().to_string();
        assert!(e.contains("input:2") && e.contains("longer than"), "{e}");
        assert!(l.buf.capacity() <= 2 * (MAX_LINE_BYTES + 1));
        // The reader is past the long line: the next one reads.
        assert_eq!(l.next_line().unwrap(), Some((3, "last".into())));
    }

    #[test]
    fn invalid_utf8_names_its_line() {
        let mut l = lines(b"ok\n\xff\xfe\n".to_vec());
        assert!(l.next_line().unwrap().is_some());
        let e = l.next_line().unwrap_err().to_string();
        assert!(e.contains("input:2") && e.contains("UTF-8"), "{e}");
    }

    #[test]
    fn gzip_input_is_decompressed() {
        use std::io::Write;
        let dir = std::env::temp_dir().join(format!("hs-lines-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.jsonl.gz");
        let mut gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&path).unwrap(),
            flate2::Compression::fast(),
        );
        gz.write_all(b"one\ntwo\n").unwrap();
        gz.finish().unwrap();
        let mut l = Lines::open(&path, |r| r).unwrap();
        assert_eq!(l.next_line().unwrap(), Some((1, "one".into())));
        assert_eq!(l.next_line().unwrap(), Some((2, "two".into())));
        assert_eq!(l.next_line().unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
