//! The client commands: `txpipe upload`, `status`, `files` (against a running gateway) and
//! `validate` (offline, with the validator's own code).
//!
//! Exit status, for scripts: 0 the file completed (or is valid, or is still on its way for
//! `status` without `--watch`), 1 it was rejected for its contents (`validation_failed`, or
//! invalid for `validate`), 2 anything failed (a `*_failed` status, an upload or request the
//! gateway refused or could not answer, a file that cannot be read). With several files the
//! worst one counts.

use crate::client::{ClientError, Gateway};
use crate::output::{self, Out};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;
use txpipe_common::csv_schema::{self, ValidationReport};

/// How a client command ended; the order is "worse".
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Ok = 0,
    Rejected = 1,
    Failed = 2,
}

impl Outcome {
    /// What a file's status means for the exit status: in progress counts as fine.
    pub fn of_status(status: &str) -> Self {
        match status {
            "validation_failed" => Outcome::Rejected,
            s if s.ends_with("_failed") => Outcome::Failed,
            _ => Outcome::Ok,
        }
    }

    /// As [`Self::of_status`], but a `validation_failed` without row errors is the validator
    /// failing (storage, say), not a verdict on the contents: failed, not rejected.
    fn of_record(record: &Value) -> Self {
        match Self::of_status(record["status"].as_str().unwrap_or("")) {
            Outcome::Rejected if record["error_count"].is_null() => Outcome::Failed,
            o => o,
        }
    }
}

impl From<Outcome> for std::process::ExitCode {
    fn from(o: Outcome) -> Self {
        std::process::ExitCode::from(o as u8)
    }
}

/// Where the client commands find the gateway unless told (`txpipe up`'s default address).
const DEFAULT_GATEWAY: &str = "http://127.0.0.1:8080";

#[derive(clap::Args)]
pub struct GatewayArgs {
    /// The gateway's base URL.
    #[arg(long, default_value = DEFAULT_GATEWAY)]
    pub gateway: String,
    /// The API key to send (as x-api-key).
    #[arg(long = "api-key", env = "TXPIPE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

impl GatewayArgs {
    fn connect(&self) -> Result<Gateway, ClientError> {
        Gateway::new(&self.gateway, self.api_key.as_deref())
    }
}

#[derive(clap::Args)]
pub struct UploadArgs {
    /// CSV files to upload (each its own upload, in the order given).
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Wait for each file's final status and summarise it (exit 0 completed, 1 rejected, 2 failed).
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up after this many seconds (exit 2).
    #[arg(long, value_name = "SECONDS", requires = "wait")]
    pub timeout: Option<u64>,
    /// Sent as the Idempotency-Key header; with several files the Nth (from 1) gets KEY-N.
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,
    /// One JSON line per file, in the order given: the gateway's answer (the final status
    /// record with --wait, its error body if it refused).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

#[derive(clap::Args)]
pub struct StatusArgs {
    pub file_id: String,
    /// Print again at every change of status until a final one (exit 0 completed, 1 rejected,
    /// 2 failed).
    #[arg(long)]
    pub watch: bool,
    /// With --watch: give up after this many seconds (exit 2).
    #[arg(long, value_name = "SECONDS", requires = "watch")]
    pub timeout: Option<u64>,
    /// The status record as the gateway gives it, on one line (one line per change with --watch).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

#[derive(clap::Args)]
pub struct FilesArgs {
    /// Only files now in this status (uploaded, validating, ..., completed, validation_failed...).
    #[arg(long)]
    pub status: Option<String>,
    /// Only files uploaded at or after this time (RFC 3339, e.g. 2024-01-15T10:30:00Z).
    #[arg(long)]
    pub since: Option<String>,
    /// Files a page (1-1000; the gateway's default is 100).
    #[arg(long)]
    pub limit: Option<u32>,
    /// Start at this page (the `next_cursor` of the previous one).
    #[arg(long)]
    pub cursor: Option<String>,
    /// Follow every page to the end.
    #[arg(long)]
    pub all: bool,
    /// The gateway's page as it is (`{"items","next_cursor"}`), on one line; with --all, every
    /// item in one such document.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

#[derive(clap::Args)]
pub struct ValidateArgs {
    /// CSV files to check against the contract, offline (nothing is sent anywhere).
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Row errors to report (every one is counted); the gateway keeps 100 by default.
    #[arg(long, default_value_t = 100)]
    pub max_errors: usize,
    /// One JSON line per file: the report (`row_count`, `error_count`, `errors`, `rejected_rows`,
    /// `stopped_early`; the same fields as the status record's).
    #[arg(long)]
    pub json: bool,
}

/// The idempotency key of the `n`th (from 1) of `of` files: the key itself for one file, so
/// it is exactly what was given; `KEY-n` for several, so each file is its own upload and
/// running the same command again (same files, same order) repeats none of them.
pub fn idempotency_key_for(key: &str, n: usize, of: usize) -> String {
    if of == 1 {
        key.to_owned()
    } else {
        format!("{key}-{n}")
    }
}

/// `txpipe upload FILE... [--wait]`.
pub async fn upload(args: UploadArgs) -> Outcome {
    let mut out = Out::default();
    let gateway = match args.gateway.connect() {
        Ok(g) => g,
        Err(e) => return fail(&mut out, args.json, None, &e),
    };
    let progress = output::show_progress(args.json);
    let count = args.files.len();
    // every upload first, so the files go through the pipeline together while we wait
    let mut accepted: Vec<(String, Result<Value, ClientError>)> = Vec::new();
    for (i, path) in args.files.iter().enumerate() {
        let name = path.display().to_string();
        let key = args.idempotency_key.as_deref().map(|k| idempotency_key_for(k, i + 1, count));
        let result = upload_one(&gateway, path, &name, key.as_deref(), progress).await;
        match &result {
            Ok(answer) if !args.json => out.line(format!(
                "{name}: uploaded as {} ({})",
                answer["file_id"].as_str().unwrap_or("?"),
                answer["size_bytes"].as_u64().map(|n| format!("{n} bytes")).unwrap_or_else(|| "size unknown".into())
            )),
            Ok(answer) if !args.wait => out.json(answer),
            Ok(_) => {}
            // refused uploads are said at once (and in order in the JSON lines below)
            Err(e) => {
                say(Some(&name), e);
                if args.json && !args.wait {
                    out.json(&e.to_json());
                }
            }
        }
        accepted.push((name, result));
    }
    let mut worst = Outcome::Ok;
    for (name, result) in accepted {
        let answer = match result {
            Ok(a) => a,
            Err(e) => {
                if args.json && args.wait {
                    out.json(&e.to_json());
                }
                worst = worst.max(Outcome::Failed);
                continue;
            }
        };
        if !args.wait {
            continue;
        }
        let id = answer["file_id"].as_str().unwrap_or_default().to_owned();
        let spin = output::spinner(progress, format!("{name}: {}", answer["status"].as_str().unwrap_or("uploaded")));
        let timeout = args.timeout.map(Duration::from_secs);
        let result = gateway
            .wait_final(&id, timeout, |r| spin.set_message(format!("{name}: {}", r["status"].as_str().unwrap_or("?"))))
            .await;
        spin.finish_and_clear();
        match result {
            Ok(record) => {
                worst = worst.max(Outcome::of_record(&record));
                if args.json {
                    out.json(&record);
                } else {
                    out.lines(output::summary(&name, &record));
                }
            }
            Err(e) => {
                worst = worst.max(fail(&mut out, args.json, Some(&name), &e));
            }
        }
    }
    worst
}

/// Uploads refused as busy or rate-limited (429, 503 with a short `Retry-After`) are sent
/// again this many times: the gateway keeps nothing of them, so trying again is safe.
const UPLOAD_RETRIES: u32 = 3;
/// The longest `Retry-After` worth waiting for (a daily quota's says hours: that is reported).
const MAX_UPLOAD_RETRY_AFTER: u64 = 30;

async fn upload_one(
    gateway: &Gateway,
    path: &Path,
    name: &str,
    key: Option<&str>,
    progress: bool,
) -> Result<Value, ClientError> {
    let mut retries = 0;
    loop {
        // the size only sizes the bar: the client reads it again when it opens the file
        let len = if progress { tokio::fs::metadata(path).await.map(|m| m.len()).unwrap_or(0) } else { 0 };
        let bar = output::upload_bar(progress, name, len);
        let counter = bar.clone();
        let result = gateway.upload(path, key, move |n| counter.inc(n)).await;
        bar.finish_and_clear();
        match &result {
            Err(e) if retries < UPLOAD_RETRIES => match retry_wait(e) {
                Some(wait) => {
                    retries += 1;
                    output::warn(format!("{name}: {e}; trying again in {wait} s"));
                    tokio::time::sleep(Duration::from_secs(wait)).await;
                }
                None => return result,
            },
            _ => return result,
        }
    }
}

/// How long to wait before sending again a request refused as busy or rate-limited (429, 503)
/// with a `Retry-After` short enough to wait for (the gateway kept nothing of it); None for
/// any other answer.
fn retry_wait(e: &ClientError) -> Option<u64> {
    match e {
        ClientError::Refused { status: 429 | 503, retry_after: Some(s), .. } if *s <= MAX_UPLOAD_RETRY_AFTER => {
            Some((*s).max(1))
        }
        _ => None,
    }
}

/// Says `e` on stderr, after the file it is about (unless the error names it already).
fn say(name: Option<&str>, e: &ClientError) {
    match name {
        Some(n) if !matches!(e, ClientError::File { .. }) => output::warn(format!("{n}: {e}")),
        _ => output::warn(e),
    }
}

/// Says `e` on stderr (and as a JSON line with --json); a failure, exit 2.
fn fail(out: &mut Out, json: bool, name: Option<&str>, e: &ClientError) -> Outcome {
    say(name, e);
    if json {
        out.json(&e.to_json());
    }
    Outcome::Failed
}

/// `txpipe status FILE_ID [--watch]`.
pub async fn status(args: StatusArgs) -> Outcome {
    let mut out = Out::default();
    let gateway = match args.gateway.connect() {
        Ok(g) => g,
        Err(e) => return fail(&mut out, args.json, None, &e),
    };
    if !args.watch {
        return match gateway.file(&args.file_id).await {
            Ok(record) => {
                if args.json {
                    out.json(&record);
                } else {
                    out.lines(output::details(&record));
                }
                Outcome::of_record(&record)
            }
            Err(e) => fail(&mut out, args.json, None, &e),
        };
    }
    let progress = output::show_progress(args.json);
    let spin = output::spinner(progress, format!("{}: waiting", args.file_id));
    let mut last: Option<String> = None;
    let timeout = args.timeout.map(Duration::from_secs);
    let result = gateway
        .wait_final(&args.file_id, timeout, |record| {
            let status = record["status"].as_str().unwrap_or("unknown").to_owned();
            if last.as_deref() == Some(status.as_str()) {
                return;
            }
            // a final record is printed once, below, as the summary
            let is_final = txpipe_common::status::FileStatus::parse(&status).is_some_and(|s| s.is_final());
            if args.json {
                spin.suspend(|| out.json(record));
            } else if !is_final {
                let when = output::short_time(&record["updated_at"]);
                spin.suspend(|| out.line(format!("{when}  {}", output::summary(&args.file_id, record).join("\n"))));
            }
            spin.set_message(format!("{}: {status}", args.file_id));
            last = Some(status);
        })
        .await;
    spin.finish_and_clear();
    match result {
        Ok(record) => {
            if !args.json {
                let when = output::short_time(&record["updated_at"]);
                let mut lines = output::summary(&args.file_id, &record);
                if let Some(first) = lines.first_mut() {
                    *first = format!("{when}  {first}");
                }
                out.lines(lines);
            }
            Outcome::of_record(&record)
        }
        Err(e) => fail(&mut out, args.json, None, &e),
    }
}

/// `txpipe files [--status S] [--since T] [--limit N] [--cursor C] [--all]`.
pub async fn files(args: FilesArgs) -> Outcome {
    let mut out = Out::default();
    let gateway = match args.gateway.connect() {
        Ok(g) => g,
        Err(e) => return fail(&mut out, args.json, None, &e),
    };
    let mut query: Vec<(&str, String)> = Vec::new();
    if let Some(s) = &args.status {
        query.push(("status", s.clone()));
    }
    if let Some(s) = &args.since {
        query.push(("since", s.clone()));
    }
    if let Some(n) = args.limit {
        query.push(("limit", n.to_string()));
    }
    let mut cursor = args.cursor.clone();
    let mut items: Vec<Value> = Vec::new();
    loop {
        let mut q = query.clone();
        if let Some(c) = &cursor {
            q.push(("cursor", c.clone()));
        }
        let page = match files_page(&gateway, &q).await {
            Ok(p) => p,
            Err(e) => return fail(&mut out, args.json, None, &e),
        };
        let next = page["next_cursor"].as_str().map(str::to_owned);
        if !args.all {
            if args.json {
                out.json(&page);
            } else {
                let page_items = page["items"].as_array().map(Vec::as_slice).unwrap_or_default();
                print_table(&mut out, page_items);
                if let Some(c) = next {
                    output::warn(format!("more files: {} (or --all)", next_page_command(&args, &c)));
                }
            }
            return Outcome::Ok;
        }
        if let Some(page_items) = page["items"].as_array() {
            items.extend(page_items.iter().cloned());
        }
        match next {
            // a cursor that comes back unchanged would loop for ever
            Some(c) if cursor.as_deref() != Some(c.as_str()) => cursor = Some(c),
            _ => break,
        }
    }
    if args.json {
        out.json(&serde_json::json!({ "items": items, "next_cursor": null }));
    } else {
        print_table(&mut out, &items);
    }
    Outcome::Ok
}

/// Times a page of `txpipe files` is asked again after a busy or rate-limited answer (429,
/// 503 with a short `Retry-After`): following many pages with `--all` soon meets a key's rate.
const PAGE_RETRIES: u32 = 5;

/// One page of `GET /files`, asked again after a short `Retry-After`.
async fn files_page(gateway: &Gateway, query: &[(&str, String)]) -> Result<Value, ClientError> {
    let mut retries = 0;
    loop {
        let result = gateway.files(query).await;
        match &result {
            Err(e) if retries < PAGE_RETRIES => match retry_wait(e) {
                Some(wait) => {
                    retries += 1;
                    output::warn(format!("{e}; trying again in {wait} s"));
                    tokio::time::sleep(Duration::from_secs(wait)).await;
                }
                None => return result,
            },
            _ => return result,
        }
    }
}

/// The command that lists the next page: the same filters, page size and gateway, and `cursor`.
fn next_page_command(args: &FilesArgs, cursor: &str) -> String {
    let mut cmd = String::from("txpipe files");
    if args.gateway.gateway != DEFAULT_GATEWAY {
        cmd.push_str(&format!(" --gateway {}", args.gateway.gateway));
    }
    if let Some(s) = &args.status {
        cmd.push_str(&format!(" --status {s}"));
    }
    if let Some(s) = &args.since {
        cmd.push_str(&format!(" --since {s}"));
    }
    if let Some(n) = args.limit {
        cmd.push_str(&format!(" --limit {n}"));
    }
    cmd.push_str(&format!(" --cursor {cursor}"));
    cmd
}

fn print_table(out: &mut Out, items: &[Value]) {
    if items.is_empty() {
        out.line("no files");
    } else {
        out.lines(output::files_table(items));
    }
}

/// `txpipe validate FILE...`: the same check the validator makes, on local files.
pub async fn validate(args: ValidateArgs) -> Outcome {
    let mut out = Out::default();
    let progress = output::show_progress(args.json);
    let mut worst = Outcome::Ok;
    for path in &args.files {
        let name = path.display().to_string();
        let spin = output::spinner(progress, format!("validating {name}"));
        let result = validate_file(path.clone(), args.max_errors).await;
        spin.finish_and_clear();
        match result {
            Ok(report) => {
                let outcome = if report.is_valid() { Outcome::Ok } else { Outcome::Rejected };
                worst = worst.max(outcome);
                if args.json {
                    out.json(&serde_json::to_value(&report).unwrap_or(Value::Null));
                } else {
                    out.lines(output::report(&name, &report));
                }
            }
            Err(e) => worst = worst.max(fail(&mut out, args.json, None, &e)),
        }
    }
    worst
}

/// [`csv_schema::validate`], as the validator worker calls it, on a local file (on a blocking
/// thread: it reads the whole file, twice if two ids share a hash).
async fn validate_file(path: PathBuf, max_errors: usize) -> Result<ValidationReport, ClientError> {
    let shown = path.display().to_string();
    let task = tokio::task::spawn_blocking(move || csv_schema::validate(|| std::fs::File::open(&path), max_errors));
    match task.await {
        Ok(Ok(report)) => Ok(report),
        Ok(Err(source)) => Err(ClientError::File { path: shown, source }),
        Err(e) => Err(ClientError::File { path: shown, source: std::io::Error::other(e.to_string()) }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_exit_codes() {
        assert_eq!(Outcome::of_status("completed"), Outcome::Ok);
        assert_eq!(Outcome::of_status("processing"), Outcome::Ok);
        assert_eq!(Outcome::of_status("validation_failed"), Outcome::Rejected);
        assert_eq!(Outcome::of_status("processing_failed"), Outcome::Failed);
        assert_eq!(Outcome::of_status("notification_failed"), Outcome::Failed);
        let verdict = serde_json::json!({"status": "validation_failed", "error_count": 2});
        assert_eq!(Outcome::of_record(&verdict), Outcome::Rejected);
        let failure = serde_json::json!({"status": "validation_failed", "error_count": null, "reason": "validator: x"});
        assert_eq!(Outcome::of_record(&failure), Outcome::Failed, "the validator failed, not the file");
        assert_eq!(Outcome::Ok.max(Outcome::Failed).max(Outcome::Rejected), Outcome::Failed);
    }

    #[test]
    fn several_files_get_one_idempotency_key_each() {
        assert_eq!(idempotency_key_for("k", 1, 1), "k");
        assert_eq!(idempotency_key_for("k", 1, 3), "k-1");
        assert_eq!(idempotency_key_for("k", 3, 3), "k-3");
    }
}
