//! What the client commands print: human lines (summaries of status records, the file table,
//! validation reports), JSON lines for `--json`, and progress bars and spinners on a terminal.
//!
//! Output never panics: stdout is written with `writeln!` and a closed pipe (`txpipe files |
//! head -1`) quietly ends the output while the command finishes and exits as it would have.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;
use std::fmt::Display;
use std::io::{IsTerminal, Write};
use std::time::Duration;
use txpipe_common::csv_schema::ValidationReport;

/// How many row errors a summary shows before pointing at the rest.
pub const SHOWN_ERRORS: usize = 10;

/// Standard output, written line by line; after a failed write (the reader has gone) the
/// remaining lines are dropped.
#[derive(Default)]
pub struct Out {
    closed: bool,
}

impl Out {
    pub fn line(&mut self, s: impl Display) {
        if self.closed {
            return;
        }
        let mut out = std::io::stdout().lock();
        if writeln!(out, "{s}").and_then(|()| out.flush()).is_err() {
            self.closed = true;
        }
    }

    pub fn lines(&mut self, lines: impl IntoIterator<Item = String>) {
        for l in lines {
            self.line(l);
        }
    }

    /// One JSON document on one line (a stable shape for scripts: JSON Lines).
    pub fn json(&mut self, v: &Value) {
        self.line(v);
    }
}

/// One line on stderr, prefixed `txpipe: `; a failed write is ignored (there is nowhere left
/// to say anything).
pub fn warn(s: impl Display) {
    let _ = writeln!(std::io::stderr().lock(), "txpipe: {s}");
}

/// Progress is drawn only for a person watching: stderr is a terminal and the output is not
/// for a script.
pub fn show_progress(json: bool) -> bool {
    !json && std::io::stderr().is_terminal()
}

/// A byte-counting bar for an upload of `len` bytes, or a hidden one.
pub fn upload_bar(visible: bool, name: &str, len: u64) -> ProgressBar {
    if !visible {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "{msg} [{bar:30.cyan/blue}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(name.to_owned());
    bar
}

/// A spinner with a message, or a hidden one.
pub fn spinner(visible: bool, msg: String) -> ProgressBar {
    if !visible {
        return ProgressBar::hidden();
    }
    let s = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    s.set_style(
        ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    s.set_message(msg);
    s.enable_steady_tick(Duration::from_millis(100));
    s
}

fn plural(n: u64, one: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {one}s")
    }
}

fn count(record: &Value, field: &str) -> Option<u64> {
    record[field].as_u64()
}

/// A time as `2024-01-15 10:30:00Z` (to the second), or as given when it is not RFC 3339.
pub fn short_time(v: &Value) -> String {
    match v.as_str() {
        Some(t) => match chrono::DateTime::parse_from_rfc3339(t) {
            Ok(t) => t.with_timezone(&chrono::Utc).format("%Y-%m-%d %H:%M:%SZ").to_string(),
            Err(_) => crate::client::one_line(t),
        },
        None => "-".into(),
    }
}

/// One row error as `row 3, column amount: message` (`header: ...` for row 0).
pub fn error_line(row: u64, column: Option<&str>, message: &str) -> String {
    let at = if row == 0 { "header".to_owned() } else { format!("row {row}") };
    let message = crate::client::one_line(message);
    match column {
        Some(c) => format!("{at}, column {}: {message}", crate::client::one_line(c)),
        None => format!("{at}: {message}"),
    }
}

/// The first row errors of a status record (or report), indented, and a line for the rest.
fn error_lines(errors: &[Value], total: u64, rest_hint: &str) -> Vec<String> {
    let mut out: Vec<String> = errors
        .iter()
        .take(SHOWN_ERRORS)
        .map(|e| {
            let line =
                error_line(e["row"].as_u64().unwrap_or(0), e["column"].as_str(), e["message"].as_str().unwrap_or(""));
            format!("  {line}")
        })
        .collect();
    let shown = out.len() as u64;
    if total > shown {
        out.push(format!("  … and {} more{rest_hint}", total - shown));
    }
    out
}

/// What a file's final (or current) status record says, in a few lines, prefixed by `name`
/// (the file's path for `upload`, its id for `status`).
pub fn summary(name: &str, record: &Value) -> Vec<String> {
    let status = record["status"].as_str().unwrap_or("unknown");
    let id = record["file_id"].as_str().unwrap_or("?");
    let hint = format!(" (txpipe status {id})");
    // `txpipe status` names a file by its id already
    let file = if name == id { String::new() } else { format!(" (file {id})") };
    let errors = record["errors"].as_array().map(Vec::as_slice).unwrap_or_default();
    let error_count = count(record, "error_count").unwrap_or(errors.len() as u64);
    match status {
        "completed" => {
            let mut line =
                format!("{name}: completed, {} stored", plural(count(record, "records_processed").unwrap_or(0), "row"));
            if let Some(n) = count(record, "already_stored").filter(|n| *n > 0) {
                line.push_str(&format!(", {n} already stored by other files"));
            }
            if let Some(n) = count(record, "rejected_rows").filter(|n| *n > 0) {
                line.push_str(&format!(", {} rejected (partial mode)", plural(n, "row")));
            }
            line.push_str(&file);
            let mut out = vec![line];
            out.extend(error_lines(errors, error_count, &hint));
            out
        }
        // with row errors: the verdict on the contents (without, the validator failed: below)
        "validation_failed" if !record["error_count"].is_null() => {
            let mut out = vec![format!(
                "{name}: rejected, {} in {}{file}",
                plural(error_count, "problem"),
                plural(count(record, "row_count").unwrap_or(0), "row")
            )];
            out.extend(error_lines(errors, error_count, &hint));
            out
        }
        s if s.ends_with("_failed") => {
            let reason =
                record["reason"].as_str().map(crate::client::one_line).unwrap_or_else(|| "no reason given".into());
            vec![format!("{name}: failed ({s}): {reason}{file}")]
        }
        s => vec![format!("{name}: {}{file}", crate::client::one_line(s))],
    }
}

/// `txpipe status` without `--watch`: the record as labelled lines.
pub fn details(record: &Value) -> Vec<String> {
    let field = |label: &str, value: String| format!("{label:<10} {value}");
    let mut out = vec![
        field("file_id", record["file_id"].as_str().unwrap_or("?").to_owned()),
        field("status", record["status"].as_str().map(crate::client::one_line).unwrap_or_else(|| "unknown".into())),
    ];
    let mut uploaded = short_time(&record["created_at"]);
    if let Some(by) = record["uploaded_by"].as_str() {
        uploaded.push_str(&format!(" by {}", crate::client::one_line(by)));
    }
    if let Some(n) = count(record, "size_bytes") {
        uploaded.push_str(&format!(", {}", plural(n, "byte")));
    }
    out.push(field("uploaded", uploaded));
    out.push(field("updated", short_time(&record["updated_at"])));
    if let Some(rows) = count(record, "row_count") {
        let mut line = plural(rows, "row");
        if let Some(n) = count(record, "records_processed") {
            line.push_str(&format!(", {n} stored"));
        }
        if let Some(n) = count(record, "already_stored").filter(|n| *n > 0) {
            line.push_str(&format!(", {n} already stored by other files"));
        }
        if let Some(n) = count(record, "rejected_rows").filter(|n| *n > 0) {
            line.push_str(&format!(", {n} rejected"));
        }
        out.push(field("rows", line));
    }
    let errors = record["errors"].as_array().map(Vec::as_slice).unwrap_or_default();
    if let Some(n) = count(record, "error_count").filter(|n| *n > 0) {
        out.push(field("errors", n.to_string()));
        out.extend(error_lines(errors, n, " (--json shows every kept error)"));
    }
    if let Some(reason) = record["reason"].as_str() {
        out.push(field("reason", crate::client::one_line(reason)));
    }
    let history = record["history"].as_array().map(Vec::as_slice).unwrap_or_default();
    let omitted = count(record, "history_omitted").unwrap_or(0);
    for (i, h) in history.iter().enumerate() {
        let label = if i == 0 { "history" } else { "" };
        let mut line = format!(
            "{}  {}",
            short_time(&h["at"]),
            h["status"].as_str().map(crate::client::one_line).unwrap_or_default()
        );
        if let Some(r) = h["reason"].as_str() {
            line.push_str(&format!(": {}", crate::client::one_line(r)));
        }
        out.push(field(label, line));
        // the record keeps the first change and the latest ones
        if i == 0 && omitted > 0 {
            out.push(field("", format!("… {omitted} more")));
        }
    }
    out
}

/// The table of `txpipe files`: file_id, status, created_at, rows.
pub fn files_table(items: &[Value]) -> Vec<String> {
    let mut out = vec![format!("{:<36}  {:<19}  {:<20}  {:>9}", "FILE_ID", "STATUS", "CREATED_AT", "ROWS")];
    for f in items {
        out.push(format!(
            "{:<36}  {:<19}  {:<20}  {:>9}",
            f["file_id"].as_str().map(crate::client::one_line).unwrap_or_else(|| "?".into()),
            f["status"].as_str().map(crate::client::one_line).unwrap_or_else(|| "?".into()),
            short_time(&f["created_at"]),
            count(f, "row_count").map(|n| n.to_string()).unwrap_or_else(|| "-".into()),
        ));
    }
    out
}

/// `txpipe validate`'s human report: the verdict, then the kept errors (all of them: the
/// report was asked for them) and how many more were counted.
pub fn report(name: &str, report: &ValidationReport) -> Vec<String> {
    if report.is_valid() {
        return vec![format!("{name}: valid, {}", plural(report.row_count, "row"))];
    }
    let mut head =
        format!("{name}: invalid, {} in {}", plural(report.error_count, "problem"), plural(report.row_count, "row"));
    if report.rejected_rows > 0 {
        head.push_str(&format!(" ({} with problems)", plural(report.rejected_rows, "row")));
    }
    if report.stopped_early {
        head.push_str("; reading stopped at a row too long to read");
    }
    let mut out = vec![head];
    out.extend(report.errors.iter().map(|e| format!("  {}", error_line(e.row, e.column.as_deref(), &e.message))));
    let shown = report.errors.len() as u64;
    if report.error_count > shown {
        out.push(format!("  … and {} more (raise --max-errors to see them)", report.error_count - shown));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_completed_file_says_how_many_rows_it_stored() {
        let r = json!({"file_id": "f1", "status": "completed", "records_processed": 200, "row_count": 200});
        assert_eq!(summary("a.csv", &r), vec!["a.csv: completed, 200 rows stored (file f1)"]);
        let r = json!({"file_id": "f1", "status": "completed", "records_processed": 1, "already_stored": 2});
        assert_eq!(
            summary("a.csv", &r),
            vec!["a.csv: completed, 1 row stored, 2 already stored by other files (file f1)"]
        );
    }

    #[test]
    fn a_rejected_file_shows_its_first_errors_with_row_and_column() {
        let errors: Vec<Value> = (1..=12).map(|i| json!({"row": i, "column": "amount", "message": "bad"})).collect();
        let r = json!({"file_id": "f1", "status": "validation_failed", "row_count": 20, "error_count": 13,
                       "errors": errors});
        let lines = summary("a.csv", &r);
        assert_eq!(lines[0], "a.csv: rejected, 13 problems in 20 rows (file f1)");
        assert_eq!(lines[1], "  row 1, column amount: bad");
        assert_eq!(lines.len(), 1 + SHOWN_ERRORS + 1);
        assert_eq!(lines.last().unwrap(), "  … and 3 more (txpipe status f1)");
        let header = json!({"file_id": "f", "status": "validation_failed", "row_count": 0, "error_count": 1,
                            "errors": [{"row": 0, "message": "the header lacks"}]});
        assert_eq!(summary("b", &header)[1], "  header: the header lacks");
    }

    #[test]
    fn a_failed_file_gives_its_reason() {
        let r = json!({"file_id": "f1", "status": "processing_failed", "reason": "storage\ndown"});
        assert_eq!(summary("a.csv", &r), vec!["a.csv: failed (processing_failed): storage\\ndown (file f1)"]);
        assert_eq!(summary("f1", &r), vec!["f1: failed (processing_failed): storage\\ndown"]);
        // the validator failing (no row errors) is a failure, not a verdict on the contents
        let r =
            json!({"file_id": "f1", "status": "validation_failed", "error_count": null, "reason": "validator: gone"});
        assert_eq!(summary("f1", &r), vec!["f1: failed (validation_failed): validator: gone"]);
    }

    #[test]
    fn details_show_counts_errors_and_history() {
        let r = json!({"file_id": "f1", "status": "validation_failed", "created_at": "2024-01-15T10:30:00Z",
                       "updated_at": "2024-01-15T10:30:01Z", "size_bytes": 95, "uploaded_by": "acme",
                       "row_count": 4, "error_count": 1, "errors": [{"row": 2, "column": "amount", "message": "bad"}],
                       "history": [{"status": "uploaded", "at": "2024-01-15T10:30:00Z"},
                                   {"status": "validation_failed", "at": "2024-01-15T10:30:01Z", "reason": "1 problem"}]});
        assert_eq!(
            details(&r),
            vec![
                "file_id    f1",
                "status     validation_failed",
                "uploaded   2024-01-15 10:30:00Z by acme, 95 bytes",
                "updated    2024-01-15 10:30:01Z",
                "rows       4 rows",
                "errors     1",
                "  row 2, column amount: bad",
                "history    2024-01-15 10:30:00Z  uploaded",
                "           2024-01-15 10:30:01Z  validation_failed: 1 problem",
            ]
        );
    }

    #[test]
    fn the_files_table_has_a_row_per_file() {
        let items = vec![
            json!({"file_id": "0190", "status": "completed", "created_at": "2024-01-15T10:30:00.123Z", "row_count": 3}),
            json!({"file_id": "0191", "status": "uploaded", "created_at": "2024-01-15T10:31:00Z"}),
        ];
        let t = files_table(&items);
        assert_eq!(t.len(), 3);
        assert!(
            t[1].contains("completed") && t[1].contains("2024-01-15 10:30:00Z") && t[1].ends_with(" 3"),
            "{}",
            t[1]
        );
        assert!(t[2].ends_with(" -"), "{}", t[2]);
    }

    #[test]
    fn the_validation_report_lists_errors_and_the_rest() {
        let r = ValidationReport {
            row_count: 5,
            error_count: 3,
            errors: vec![txpipe_common::csv_schema::RowError {
                row: 2,
                column: Some("currency".into()),
                message: "'usd' is not".into(),
            }],
            rejected_rows: 2,
            stopped_early: false,
        };
        assert_eq!(
            report("t.csv", &r),
            vec![
                "t.csv: invalid, 3 problems in 5 rows (2 rows with problems)",
                "  row 2, column currency: 'usd' is not",
                "  … and 2 more (raise --max-errors to see them)",
            ]
        );
    }
}
