//! `txpipe bench validate`: generates a CSV of N rows and measures the validator's core on
//! it beside a bare `csv` crate parse of the same file, in the same run, with peak memory.

use std::io::{BufWriter, Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

/// Writes `rows` valid transactions to `path` (about 88 bytes a row).
pub fn generate(path: &Path, rows: u64) -> std::io::Result<u64> {
    let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    writeln!(w, "transaction_id,amount,currency,timestamp,merchant,status")?;
    const CURRENCIES: [&str; 4] = ["USD", "EUR", "GBP", "JPY"];
    const STATUSES: [&str; 3] = ["completed", "pending", "failed"];
    for i in 0..rows {
        writeln!(
            w,
            "txn-{i:012},{}.{:02},{},2024-{:02}-{:02}T{:02}:{:02}:{:02}Z,Merchant store number {:06},{}",
            (i * 7919) % 100_000,
            i % 100,
            CURRENCIES[(i % 4) as usize],
            i % 12 + 1,
            i % 28 + 1,
            i % 24,
            i % 60,
            (i * 7) % 60,
            i % 1_000_000,
            STATUSES[(i % 3) as usize],
        )?;
    }
    w.flush()?;
    Ok(std::fs::metadata(path)?.len())
}

/// Peak resident memory of this process so far, in bytes (Linux; None elsewhere).
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The figures of one benchmark run.
#[derive(Debug)]
pub struct BenchReport {
    pub bytes: u64,
    pub rows: u64,
    pub bare_csv: Duration,
    pub validate: Duration,
    pub peak_rss: Option<u64>,
}

impl BenchReport {
    fn mbps(&self, d: Duration) -> f64 {
        self.bytes as f64 / 1e6 / d.as_secs_f64()
    }

    pub fn print(&self) {
        println!("file: {} rows, {:.1} MB", self.rows, self.bytes as f64 / 1e6);
        println!(
            "bare csv parse (ByteRecord): {:>8.1} MB/s  ({:.3} s)",
            self.mbps(self.bare_csv),
            self.bare_csv.as_secs_f64()
        );
        println!(
            "txpipe validate:             {:>8.1} MB/s  ({:.3} s)",
            self.mbps(self.validate),
            self.validate.as_secs_f64()
        );
        println!("validate / bare csv:         {:>8.2}", self.mbps(self.validate) / self.mbps(self.bare_csv));
        if let Some(rss) = self.peak_rss {
            println!("peak memory (VmHWM):         {:>8.1} MB", rss as f64 / 1e6);
        }
    }
}

fn bare_parse(path: &Path) -> std::io::Result<u64> {
    let file = std::fs::File::open(path)?;
    let mut rdr = csv::ReaderBuilder::new().has_headers(true).buffer_capacity(256 * 1024).from_reader(file);
    let mut rec = csv::ByteRecord::new();
    let mut n = 0;
    while rdr.read_byte_record(&mut rec).map_err(std::io::Error::other)? {
        n += 1;
    }
    Ok(n)
}

/// Validates `path` and bare-parses it, timing both (best of `runs`).
pub fn run(path: &Path, runs: u32) -> std::io::Result<BenchReport> {
    let bytes = std::fs::metadata(path)?.len();
    // warm the page cache so both measure parsing, not the disk
    std::io::copy(&mut std::fs::File::open(path)?.take(u64::MAX), &mut std::io::sink())?;
    let mut bare_csv = Duration::MAX;
    let mut validate = Duration::MAX;
    let mut rows = 0;
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        rows = bare_parse(path)?;
        bare_csv = bare_csv.min(t.elapsed());
        let t = Instant::now();
        let report = txpipe_common::csv_schema::validate(|| std::fs::File::open(path), 100)?;
        validate = validate.min(t.elapsed());
        if !report.is_valid() || report.row_count != rows {
            return Err(std::io::Error::other(format!("benchmark file did not validate: {:?}", report.errors.first())));
        }
    }
    Ok(BenchReport { bytes, rows, bare_csv, validate, peak_rss: peak_rss() })
}
