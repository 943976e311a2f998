//! The CSV contract: parse a file of transactions into typed rows, or say exactly what is
//! wrong with it, row by row.
//!
//! Columns `transaction_id, amount, currency, timestamp, merchant, status` in any order (extra
//! columns are ignored). Every field is non-empty; `amount` is an exact decimal; `currency` an
//! ISO 4217 code; `timestamp` RFC 3339; `status` one of completed, pending, failed;
//! `transaction_id` unique within the file. Sizes are bounded ([`MAX_TRANSACTION_ID_BYTES`],
//! [`MAX_FIELD_BYTES`], [`MAX_ROW_BYTES`]) so every accepted row fits every backend's keys and
//! items. Files are streamed: memory does not grow with the file, except for 8 bytes per row
//! to find duplicate ids (see [`validate`]).
//!
//! Two ways through a row, with the same verdicts and errors: [`Scanner::parse`] builds the
//! typed [`Row`] (the transformer stores it); [`Scanner::check`] only says whether the row
//! passes (the validator), first with byte tests that vouch for the everyday row without
//! building a `Decimal` or a `DateTime`, and through `parse` for any row they cannot vouch
//! for, so every error message still comes from one place.

use chrono::{DateTime, FixedOffset};
use rust_decimal::Decimal;
use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};
use std::io::{self, BufRead, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The columns every file must have.
pub const REQUIRED_COLUMNS: [&str; 6] = ["transaction_id", "amount", "currency", "timestamp", "merchant", "status"];

/// The longest `transaction_id`, in bytes of UTF-8 (after trimming spaces). It is the key of
/// the transactions table and the sort key of its indexes: DynamoDB allows 2048 bytes in a
/// partition key and 1024 in a sort key, and a page cursor is the id in hex (512 characters
/// at most, well inside what `decode_cursor` accepts), so a quarter of the tightest limit
/// leaves room for keys made of an id and something else.
pub const MAX_TRANSACTION_ID_BYTES: usize = 256;
/// The longest value of every other required field, in bytes of UTF-8 (after trimming). Only
/// `merchant` can reach it in a valid row; the others have fixed shapes.
pub const MAX_FIELD_BYTES: usize = 1024;
/// The longest row, in bytes: its fields (extra columns included, as unquoted) and the commas
/// between them. A stored transaction is then at most a few KiB, far below DynamoDB's 400 KB
/// item, and a page of rows stays small.
pub const MAX_ROW_BYTES: usize = 8 * 1024;

const ID: usize = 0;
const AMOUNT: usize = 1;
const CURRENCY: usize = 2;
const TIMESTAMP: usize = 3;
const MERCHANT: usize = 4;
const STATUS: usize = 5;

/// One problem in a file. `row` counts data rows from 1 (the header is row 0); `column` is
/// absent for problems with a whole row or the whole file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RowError {
    pub row: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<String>,
    pub message: String,
}

impl RowError {
    fn new(row: u64, column: Option<usize>, message: String) -> Self {
        Self { row, column: column.map(|c| REQUIRED_COLUMNS[c].to_owned()), message }
    }
}

/// A transaction's state as the file gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TxStatus {
    Completed,
    Pending,
    Failed,
}

impl TxStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TxStatus::Completed => "completed",
            TxStatus::Pending => "pending",
            TxStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "completed" => Some(TxStatus::Completed),
            "pending" => Some(TxStatus::Pending),
            "failed" => Some(TxStatus::Failed),
            _ => None,
        }
    }
}

/// A valid row, borrowing its text from the record it was read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row<'a> {
    pub transaction_id: &'a str,
    pub amount: Decimal,
    pub currency: &'a str,
    pub timestamp: DateTime<FixedOffset>,
    pub merchant: &'a str,
    pub status: TxStatus,
}

/// Row errors of one file: every one counted, the first `cap` kept.
#[derive(Debug)]
pub struct ErrorLog {
    cap: usize,
    kept: Vec<RowError>,
    total: u64,
}

impl ErrorLog {
    pub fn new(cap: usize) -> Self {
        Self { cap, kept: Vec::new(), total: 0 }
    }

    pub fn push(&mut self, e: RowError) {
        self.total += 1;
        if self.kept.len() < self.cap {
            self.kept.push(e);
        }
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn into_parts(self) -> (Vec<RowError>, u64) {
        (self.kept, self.total)
    }
}

/// Where each required column sits in the file's header.
#[derive(Clone, Debug)]
struct Columns {
    index: [usize; 6],
    width: usize,
}

impl Columns {
    fn from_header(header: &Record) -> Result<Self, Vec<RowError>> {
        let mut index = [usize::MAX; 6];
        let mut errors = Vec::new();
        let mut names = Vec::with_capacity(header.len());
        for (i, raw) in header.iter().enumerate() {
            let raw = if i == 0 { raw.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(raw) } else { raw };
            let name = String::from_utf8_lossy(raw.trim_ascii()).into_owned();
            if let Some(c) = REQUIRED_COLUMNS.iter().position(|r| *r == name) {
                if index[c] != usize::MAX {
                    errors.push(RowError::new(
                        0,
                        Some(c),
                        format!("column '{name}' appears more than once in the header"),
                    ));
                }
                index[c] = i;
            }
            names.push(name);
        }
        let missing: Vec<&str> =
            REQUIRED_COLUMNS.iter().zip(index).filter(|(_, i)| *i == usize::MAX).map(|(n, _)| *n).collect();
        if !missing.is_empty() {
            errors.push(RowError::new(
                0,
                None,
                format!(
                    "the header lacks required column(s) {}; it has: {} (expected {})",
                    missing.join(", "),
                    show(&names.join(", ")),
                    REQUIRED_COLUMNS.join(", ")
                ),
            ));
        }
        if errors.is_empty() {
            Ok(Self { index, width: header.len() })
        } else {
            Err(errors)
        }
    }
}

/// Shortens a value for an error message (to [`SHOW_MAX_BYTES`] bytes, escapes counted) and
/// makes control characters visible: an error quotes at most this much of any value, so the
/// errors a status record keeps stay small whatever the file holds.
fn show(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        let escaped: String = c.escape_debug().collect();
        if out.len() + escaped.len() > SHOW_MAX_BYTES {
            out.push('…');
            break;
        }
        out.push_str(&escaped);
    }
    out
}

/// The most bytes of a value an error message quotes.
const SHOW_MAX_BYTES: usize = 60;

/// The error for a field over its size limit, or None.
fn too_big(c: usize, value: &str) -> Option<String> {
    let limit = if c == ID { MAX_TRANSACTION_ID_BYTES } else { MAX_FIELD_BYTES };
    (value.len() > limit).then(|| {
        format!(
            "{} '{}' is {} bytes long; the limit is {limit} bytes (UTF-8)",
            REQUIRED_COLUMNS[c],
            show(value),
            value.len()
        )
    })
}

fn parse_amount(s: &str) -> Result<Decimal, String> {
    let b = s.as_bytes();
    let digits = b.strip_prefix(b"-").or_else(|| b.strip_prefix(b"+")).unwrap_or(b);
    let (int, frac) = match digits.iter().position(|&c| c == b'.') {
        Some(p) => (&digits[..p], Some(&digits[p + 1..])),
        None => (digits, None),
    };
    let well_formed = !int.is_empty()
        && int.iter().all(u8::is_ascii_digit)
        && frac.is_none_or(|f| !f.is_empty() && f.iter().all(u8::is_ascii_digit));
    if !well_formed {
        return Err(format!(
            "'{}' is not a decimal amount (digits, an optional sign and decimal point, like -12.50)",
            show(s)
        ));
    }
    // the exact type holds 28 digits always, 29 below 2^96 (79228162514264337593543950336)
    Decimal::from_str_exact(s).map_err(|_| {
        format!(
            "'{}' has more digits than an exact amount can hold (28, or 29 up to 79228162514264337593543950335)",
            show(s)
        )
    })
}

/// The most digits an amount can have and certainly be exact: below 10^28 its value fits
/// `Decimal`'s 96-bit mantissa (up to about 7.9 * 10^28), and its scale is at most 28.
const EXACT_DIGITS: usize = 28;

/// True when [`parse_amount`] certainly accepts `b`: an optional sign, digits, and optionally
/// a point and more digits, at most [`EXACT_DIGITS`] in all, so `Decimal::from_str_exact` has
/// nothing to refuse. False means only "not certain" (a longer amount may still be exact).
fn amount_certainly_exact(b: &[u8]) -> bool {
    let digits = match b {
        [b'-' | b'+', rest @ ..] => rest,
        _ => b,
    };
    let int = digits.iter().take_while(|c| c.is_ascii_digit()).count();
    let frac = match &digits[int..] {
        [] => 0,
        [b'.', frac @ ..] if !frac.is_empty() && frac.iter().all(u8::is_ascii_digit) => frac.len(),
        _ => return false,
    };
    int > 0 && int + frac <= EXACT_DIGITS
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400)) => 29,
        2 => 28,
        _ => 0,
    }
}

/// True when `DateTime::parse_from_rfc3339` certainly accepts `s`, checked by hand in a
/// fraction of chrono's time: the everyday shape `YYYY-MM-DD`, `T` (or `t` or a space),
/// `hh:mm:ss` (seconds to 59), an optional `.` and one or more digits, then `Z`, `z` or
/// `±hh:mm` (hours to 23, so the offset is under a day), with a date that exists. False
/// means only "not this shape": leap seconds (`:60`), the U+2212 minus sign and every
/// invalid value are left to chrono, whose verdict then stands.
fn rfc3339_common_shape(s: &[u8]) -> bool {
    let Some((head, rest)) = s.split_first_chunk::<19>() else {
        return false;
    };
    // YYYY-MM-DDThh:mm:ss: the digits' places, then the separators'
    const DIGITS: [usize; 14] = [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18];
    if DIGITS.iter().any(|&i| !head[i].is_ascii_digit())
        || head[4] != b'-'
        || head[7] != b'-'
        || !matches!(head[10], b'T' | b't' | b' ')
        || head[13] != b':'
        || head[16] != b':'
    {
        return false;
    }
    let two = |i: usize| u32::from(head[i] - b'0') * 10 + u32::from(head[i + 1] - b'0');
    let (year, month, day) = (two(0) * 100 + two(2), two(5), two(8));
    if day == 0 || day > days_in_month(year, month) || two(11) > 23 || two(14) > 59 || two(17) > 59 {
        return false;
    }
    let rest = match rest {
        [b'.', fraction @ ..] => {
            let digits = fraction.iter().take_while(|c| c.is_ascii_digit()).count();
            if digits == 0 {
                return false;
            }
            &fraction[digits..]
        }
        _ => rest,
    };
    match rest {
        [b'Z' | b'z'] => true,
        [b'+' | b'-', offset @ ..] => match offset {
            [h0, h1, b':', m0, m1] if [h0, h1, m0, m1].iter().all(|c| c.is_ascii_digit()) => {
                (h0 - b'0') * 10 + (h1 - b'0') <= 23 && *m0 <= b'5'
            }
            _ => false,
        },
        _ => false,
    }
}

/// A streaming reader of one CSV file: the header first, then one record at a time.
pub struct Scanner<R: Read> {
    reader: Records<R>,
    columns: Columns,
    record: Record,
    row: u64,
    /// Where the last whole record ended, in bytes: the reader refuses to run far past it.
    boundary: Arc<AtomicU64>,
    too_long: Option<RowError>,
}

/// The longest record (row) accepted. A longer one is almost always a quote left open, which
/// would otherwise make the rest of the file one field held in memory.
pub const MAX_RECORD_BYTES: u64 = 1024 * 1024;
const READ_BUFFER: usize = 256 * 1024;

#[derive(Debug)]
struct RecordTooLong;

impl std::fmt::Display for RecordTooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a record longer than {MAX_RECORD_BYTES} bytes")
    }
}

impl std::error::Error for RecordTooLong {}

/// A reader that fails once it has read more than a record's worth past the last record end.
struct Bounded<R> {
    inner: R,
    read: u64,
    boundary: Arc<AtomicU64>,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // the csv reader reads ahead by up to its buffer, so allow that much slack
        if self.read.saturating_sub(self.boundary.load(Ordering::Relaxed)) > MAX_RECORD_BYTES + READ_BUFFER as u64 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, RecordTooLong));
        }
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

fn is_too_long(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<RecordTooLong>())
}

fn too_long_error(row: u64) -> RowError {
    RowError::new(
        row,
        None,
        format!(
            "the row is longer than {} MiB; is a quote left open? (everything after an unclosed quote is one field)",
            MAX_RECORD_BYTES / (1024 * 1024)
        ),
    )
}

/// Why a file cannot be read at all: it is unreadable (retry), or its header is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("reading the file failed: {0}")]
    Io(#[from] io::Error),
    #[error("the file's header is unusable")]
    Header(Vec<RowError>),
}

/// csv-core parsers with the csv crate's defaults (comma, double quotes, CRLF, LF or CR ends a
/// record) built earlier and reset for reuse. Building one computes its DFA, which takes about
/// as long as parsing a 100-row file, and `csv::Reader` builds one per reader: per file, twice
/// (validator and transformer). (A clone is no shortcut: csv-core 0.1's `Clone` copies only
/// part of the DFA.)
static PARSERS: Mutex<Vec<csv_core::Reader>> = Mutex::new(Vec::new());

/// Parsers kept for reuse: about the files read at once.
const KEPT_PARSERS: usize = 64;

fn take_parser() -> csv_core::Reader {
    let kept = PARSERS.lock().unwrap_or_else(|p| p.into_inner()).pop();
    kept.map_or_else(
        || csv_core::ReaderBuilder::new().build(),
        |mut parser| {
            parser.reset();
            parser
        },
    )
}

/// One CSV record as csv-core leaves it: the fields' bytes end to end (unquoted), and where
/// each field ends.
#[derive(Default)]
struct Record {
    bytes: Vec<u8>,
    ends: Vec<usize>,
    fields: usize,
}

impl Record {
    fn len(&self) -> usize {
        self.fields
    }

    fn get(&self, i: usize) -> Option<&[u8]> {
        let end = *self.ends[..self.fields].get(i)?;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        Some(&self.bytes[start..end])
    }

    fn iter(&self) -> impl Iterator<Item = &[u8]> {
        (0..self.fields).filter_map(|i| self.get(i))
    }

    /// The bytes of all the fields, without separators or quotes.
    fn fields_bytes(&self) -> usize {
        self.fields.checked_sub(1).map_or(0, |last| self.ends[last])
    }
}

/// Records off a buffered source, the way `csv::Reader::read_byte_record` reads them (flexible
/// lengths, no header handling), on a parser from [`PARSERS`] that goes back there after.
struct Records<R: Read> {
    core: csv_core::Reader,
    source: io::BufReader<Bounded<R>>,
    /// Bytes of the source consumed: where the last record read ended.
    consumed: u64,
    done: bool,
}

impl<R: Read> Records<R> {
    fn new(source: Bounded<R>) -> Self {
        Self {
            core: take_parser(),
            source: io::BufReader::with_capacity(READ_BUFFER, source),
            consumed: 0,
            done: false,
        }
    }

    /// Reads the next record into `record`; false at the end of the source.
    fn read(&mut self, record: &mut Record) -> io::Result<bool> {
        use csv_core::ReadRecordResult as Got;
        if self.done {
            return Ok(false);
        }
        if record.bytes.is_empty() {
            record.bytes.resize(256, 0);
            record.ends.resize(16, 0);
        }
        let (mut out, mut end) = (0, 0);
        loop {
            let input = self.source.fill_buf().inspect_err(|_| self.done = true)?;
            let (result, nin, nout, nend) =
                self.core.read_record(input, &mut record.bytes[out..], &mut record.ends[end..]);
            self.source.consume(nin);
            self.consumed += nin as u64;
            out += nout;
            end += nend;
            match result {
                // the Bounded source keeps a record (and so these buffers) within its limit
                Got::InputEmpty => {}
                Got::OutputFull => record.bytes.resize(record.bytes.len() * 2, 0),
                Got::OutputEndsFull => record.ends.resize(record.ends.len() * 2, 0),
                Got::Record => {
                    record.fields = end;
                    return Ok(true);
                }
                Got::End => {
                    self.done = true;
                    return Ok(false);
                }
            }
        }
    }
}

impl<R: Read> Drop for Records<R> {
    fn drop(&mut self) {
        let mut kept = PARSERS.lock().unwrap_or_else(|p| p.into_inner());
        if kept.len() < KEPT_PARSERS {
            kept.push(std::mem::take(&mut self.core));
        }
    }
}

impl<R: Read> Scanner<R> {
    /// Reads the header and locates the required columns.
    pub fn new(source: R) -> Result<Self, ScanError> {
        let boundary = Arc::new(AtomicU64::new(0));
        let bounded = Bounded { inner: source, read: 0, boundary: boundary.clone() };
        let mut reader = Records::new(bounded);
        let mut header = Record::default();
        let more = match reader.read(&mut header) {
            Err(e) if is_too_long(&e) => return Err(ScanError::Header(vec![too_long_error(0)])),
            other => other?,
        };
        boundary.store(reader.consumed, Ordering::Relaxed);
        if !more {
            return Err(ScanError::Header(vec![RowError::new(
                0,
                None,
                format!("the file is empty: expected a header row with columns {}", REQUIRED_COLUMNS.join(", ")),
            )]));
        }
        let columns = Columns::from_header(&header).map_err(ScanError::Header)?;
        Ok(Self { reader, columns, record: header, row: 0, boundary, too_long: None })
    }

    /// Moves to the next data row; false at the end of the file, or at a row too long to
    /// read (see [`Scanner::too_long`]).
    pub fn advance(&mut self) -> io::Result<bool> {
        let more = match self.reader.read(&mut self.record) {
            Err(e) if is_too_long(&e) => {
                self.too_long = Some(too_long_error(self.row + 1));
                return Ok(false);
            }
            other => other?,
        };
        if more {
            self.row += 1;
            self.boundary.store(self.reader.consumed, Ordering::Relaxed);
        }
        Ok(more)
    }

    /// The error for a row too long to read, if scanning stopped at one.
    pub fn too_long(&self) -> Option<&RowError> {
        self.too_long.as_ref()
    }

    /// The number of the current data row (1 for the first).
    pub fn row(&self) -> u64 {
        self.row
    }

    fn field(&self, c: usize) -> &[u8] {
        self.record.get(self.columns.index[c]).unwrap_or_default().trim_ascii()
    }

    fn ragged(&self) -> bool {
        self.record.len() != self.columns.width
    }

    /// The current row's transaction_id as bytes, if the row has the header's shape.
    pub fn raw_id(&self) -> Option<&[u8]> {
        if self.ragged() {
            return None;
        }
        Some(self.field(ID)).filter(|id| !id.is_empty())
    }

    /// Checks the current row, logging each problem; false if it has any. The same verdict
    /// and errors as [`Scanner::parse`], which it calls only for rows that
    /// [`Scanner::passes_quickly`] cannot vouch for: the validator needs the verdict, not
    /// the values.
    pub fn check(&self, log: &mut ErrorLog) -> bool {
        self.passes_quickly() || self.parse(log).is_some()
    }

    /// True when [`Scanner::parse`] certainly accepts the current row, found with byte
    /// tests alone: no `str`, `Decimal` or `DateTime` built, no per-field UTF-8 check of the
    /// fields whose shape is ASCII. False means only "not certain": `parse` then decides, and
    /// says what is wrong. Each test here implies the corresponding one in `parse` (non-empty,
    /// within its size limit, valid UTF-8, of its type), so nothing passes here that `parse`
    /// would refuse.
    fn passes_quickly(&self) -> bool {
        if self.ragged() || self.record.fields_bytes() + self.record.len().saturating_sub(1) > MAX_ROW_BYTES {
            return false;
        }
        let text = |c: usize, limit: usize| {
            let b = self.field(c);
            !b.is_empty() && b.len() <= limit && (b.is_ascii() || std::str::from_utf8(b).is_ok())
        };
        let timestamp = self.field(TIMESTAMP);
        text(ID, MAX_TRANSACTION_ID_BYTES)
            && text(MERCHANT, MAX_FIELD_BYTES)
            // at most 28 digits, a sign and a point: within the size limit
            && amount_certainly_exact(self.field(AMOUNT))
            && crate::currency::is_iso4217_bytes(self.field(CURRENCY))
            // the shape allows any number of fraction digits, so the limit is checked too
            && timestamp.len() <= MAX_FIELD_BYTES
            && rfc3339_common_shape(timestamp)
            && matches!(self.field(STATUS), b"completed" | b"pending" | b"failed")
    }

    /// Parses the current row, logging each problem; `None` if it has any.
    pub fn parse(&self, log: &mut ErrorLog) -> Option<Row<'_>> {
        let row = self.row;
        if self.ragged() {
            log.push(RowError::new(
                row,
                None,
                format!("the row has {} fields but the header has {}", self.record.len(), self.columns.width),
            ));
            return None;
        }
        let before = log.total();
        // the fields' bytes (unquoted) and the commas between them
        let size = self.record.fields_bytes() + self.record.len().saturating_sub(1);
        if size > MAX_ROW_BYTES {
            log.push(RowError::new(
                row,
                None,
                format!(
                    "the row is {size} bytes long (its fields and the commas between them); the limit is {MAX_ROW_BYTES} bytes"
                ),
            ));
        }
        let mut text = [""; 6];
        let mut amount = None;
        let mut timestamp = None;
        let mut status = None;
        // one pass in column order, so a row's errors read left to right
        for (c, slot) in text.iter_mut().enumerate() {
            let value = match std::str::from_utf8(self.field(c)) {
                Ok("") => {
                    log.push(RowError::new(row, Some(c), format!("{} is empty", REQUIRED_COLUMNS[c])));
                    continue;
                }
                Ok(v) => v,
                Err(_) => {
                    log.push(RowError::new(row, Some(c), "is not valid UTF-8 text".into()));
                    continue;
                }
            };
            if let Some(message) = too_big(c, value) {
                // what the value is matters less than that it cannot be stored: say only that
                log.push(RowError::new(row, Some(c), message));
                continue;
            }
            *slot = value;
            let problem = match c {
                AMOUNT => parse_amount(value).map(|a| amount = Some(a)).err(),
                CURRENCY if !crate::currency::is_iso4217(value) => Some(format!(
                    "'{}' is not an ISO 4217 currency code (three upper-case letters, like USD)",
                    show(value)
                )),
                TIMESTAMP => match DateTime::parse_from_rfc3339(value) {
                    Ok(t) => {
                        timestamp = Some(t);
                        None
                    }
                    Err(_) => {
                        Some(format!("'{}' is not an RFC 3339 date-time (like 2024-01-15T10:30:00Z)", show(value)))
                    }
                },
                STATUS => match TxStatus::parse(value) {
                    Some(s) => {
                        status = Some(s);
                        None
                    }
                    None => Some(format!("'{}' is not one of completed, pending, failed", show(value))),
                },
                _ => None,
            };
            if let Some(message) = problem {
                log.push(RowError::new(row, Some(c), message));
            }
        }
        if log.total() != before {
            return None;
        }
        Some(Row {
            transaction_id: text[ID],
            amount: amount?,
            currency: text[CURRENCY],
            timestamp: timestamp?,
            merchant: text[MERCHANT],
            status: status?,
        })
    }
}

/// The verdict on one file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidationReport {
    /// Data rows read (the header not counted).
    pub row_count: u64,
    /// Every problem found.
    pub error_count: u64,
    /// The first problems, in row order, up to the cap.
    pub errors: Vec<RowError>,
    /// Data rows with at least one problem (what partial mode leaves out).
    #[serde(default)]
    pub rejected_rows: u64,
    /// Reading stopped at a row too long to read: the rows after it are unknown.
    #[serde(default)]
    pub stopped_early: bool,
}

impl ValidationReport {
    pub fn is_valid(&self) -> bool {
        self.error_count == 0
    }

    /// True when partial mode can store the rest: the file was read to its end and some rows
    /// are valid.
    pub fn has_valid_rows(&self) -> bool {
        !self.stopped_early && self.row_count > self.rejected_rows
    }

    fn from_header(errors: Vec<RowError>, cap: usize) -> Self {
        let error_count = errors.len() as u64;
        Self {
            row_count: 0,
            error_count,
            errors: errors.into_iter().take(cap).collect(),
            rejected_rows: 0,
            stopped_early: false,
        }
    }
}

/// The 64-bit hash by which ids are told apart on a first pass.
pub fn id_hash(id: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(id)
}

/// The id hashes of a file's rows, to find those that appear more than once.
///
/// Appending a hash costs next to nothing, where inserting it into one set of a million is a
/// cache miss a row (a fifth of the validator's time, more than any check). The hashes are
/// uniform, so their top byte spreads them over 256 partitions of about equal size, each
/// small enough for its repeats to be found in the cache at the end. 8 bytes a row and the
/// vectors' spare capacity (about 9 MB for a million rows, where the set took 27 MB at its
/// peak, while it grew).
struct IdHashes {
    parts: Box<[Vec<u64>; 256]>,
}

impl IdHashes {
    fn new() -> Self {
        Self { parts: Box::new(std::array::from_fn(|_| Vec::new())) }
    }

    fn push(&mut self, hash: u64) {
        self.parts[(hash >> 56) as usize].push(hash);
    }

    /// The hashes pushed more than once.
    fn repeated(self) -> FxHashSet<u64> {
        let mut repeated = FxHashSet::default();
        let mut seen = FxHashSet::default();
        // each partition is freed once looked at
        for part in *self.parts {
            seen.clear();
            seen.reserve(part.len());
            for hash in part {
                if !seen.insert(hash) {
                    repeated.insert(hash);
                }
            }
        }
        repeated
    }
}

/// Checks a whole file against the contract, counting every problem and keeping the first
/// `max_errors` of them.
///
/// `open` gives the file's bytes from the start; it is called a second time only if two
/// rows' ids share a 64-bit hash. The first pass keeps just those hashes (8 bytes a row, in
/// 256 partitions compared one by one at the end), so a million-row file is checked in under
/// 20 MB; the second pass keeps the text of the few suspect ids to tell real duplicates from
/// hash collisions, so the answer is exact. Rows are checked with [`Scanner::check`]. An `Err` is an I/O failure (worth retrying), never a problem with the file's contents.
pub fn validate<R: Read>(mut open: impl FnMut() -> io::Result<R>, max_errors: usize) -> io::Result<ValidationReport> {
    let mut scanner = match Scanner::new(open()?) {
        Ok(s) => s,
        Err(ScanError::Io(e)) => return Err(e),
        Err(ScanError::Header(errors)) => return Ok(ValidationReport::from_header(errors, max_errors)),
    };
    let mut log = ErrorLog::new(max_errors);
    let mut hashes = IdHashes::new();
    let mut rejected_rows = 0u64;
    while scanner.advance()? {
        if !scanner.check(&mut log) {
            rejected_rows += 1;
        }
        if let Some(id) = scanner.raw_id() {
            hashes.push(id_hash(id));
        }
    }
    if let Some(e) = scanner.too_long() {
        log.push(e.clone());
        rejected_rows += 1;
    }
    let row_count = scanner.row();
    let suspects = hashes.repeated();
    if row_count == 0 && scanner.too_long().is_none() {
        log.push(RowError::new(0, None, "the file has a header but no data rows".into()));
    }
    let (mut errors, mut error_count) = log.into_parts();
    if !suspects.is_empty() {
        let (dups, dup_count, valid_dups) = find_duplicates(open()?, &suspects, max_errors)?;
        error_count += dup_count;
        rejected_rows += valid_dups;
        errors.extend(dups);
        // stable: within a row, field errors stay before the duplicate-id error
        errors.sort_by_key(|e| e.row);
        errors.truncate(max_errors);
    }
    let stopped_early = scanner.too_long().is_some();
    Ok(ValidationReport { row_count, error_count, errors, rejected_rows, stopped_early })
}

/// Second pass: exact duplicate detection among the rows whose id hash was seen twice. Returns
/// the errors, their count, and how many of the duplicate rows had no other problem (rows not
/// yet counted as rejected).
fn find_duplicates<R: Read>(source: R, suspects: &FxHashSet<u64>, cap: usize) -> io::Result<(Vec<RowError>, u64, u64)> {
    let mut scanner = match Scanner::new(source) {
        Ok(s) => s,
        Err(ScanError::Io(e)) => return Err(e),
        Err(ScanError::Header(_)) => return Err(io::Error::other("the file changed while it was being validated")),
    };
    let mut first_seen: FxHashMap<Vec<u8>, u64> = FxHashMap::default();
    let mut log = ErrorLog::new(cap);
    let mut valid_dups = 0u64;
    while scanner.advance()? {
        let Some(id) = scanner.raw_id() else { continue };
        if !suspects.contains(&id_hash(id)) {
            continue;
        }
        match first_seen.get(id) {
            Some(first) => {
                log.push(RowError::new(
                    scanner.row(),
                    Some(ID),
                    format!("transaction_id '{}' already appears in row {first}", show(&String::from_utf8_lossy(id))),
                ));
                if scanner.check(&mut ErrorLog::new(0)) {
                    valid_dups += 1;
                }
            }
            None => {
                first_seen.insert(id.to_vec(), scanner.row());
            }
        }
    }
    let (errors, total) = log.into_parts();
    Ok((errors, total, valid_dups))
}

#[cfg(test)]
mod tests;
