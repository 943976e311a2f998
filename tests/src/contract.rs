//! The storage contract: one suite per storage trait, run against every adapter (the
//! embedded ones now; S3/DynamoDB ones use the same functions).

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use rust_decimal::Decimal;
use std::str::FromStr;
use std::sync::Arc;
use tokio::io::AsyncReadExt;
use txpipe_common::csv_schema::TxStatus;
use txpipe_common::status::{FileStatus, StatusRecord, StatusUpdate};
use txpipe_common::storage::{
    Advance, ApiKeyRecord, ApiKeyStore, Claim, IdempotencyStore, IdempotentUpload, NewClaim, ObjectStore, QuotaUse,
    StatusChange, StatusStore, StorageError, StorageErrorKind, Transaction, TransactionStore, VersionRef, WriteOutcome,
};
use txpipe_common::FileId;

fn stream(chunks: Vec<std::io::Result<&'static [u8]>>) -> txpipe_common::storage::ByteStream {
    futures::stream::iter(chunks.into_iter().map(|c| c.map(Bytes::from_static))).boxed()
}

/// The kind of the error a call must have failed with.
fn kind_of<T>(result: Result<T, StorageError>) -> StorageErrorKind {
    match result {
        Ok(_) => panic!("expected a storage error"),
        Err(e) => e.kind(),
    }
}

async fn read_all(store: &Arc<dyn ObjectStore>, key: &str) -> Vec<u8> {
    let mut buf = Vec::new();
    store.get(key).await.unwrap().read_to_end(&mut buf).await.unwrap();
    buf
}

/// Objects: stored whole from a stream, read back, deleted; a failed stream leaves nothing.
pub async fn object_store(store: Arc<dyn ObjectStore>) {
    store.check().await.unwrap();
    let key = format!("uploads/{}.csv", FileId::new());
    let size = store.put(&key, stream(vec![Ok(b"a,b\n"), Ok(b"1,2\n")])).await.unwrap();
    assert_eq!(size, 8);
    assert_eq!(read_all(&store, &key).await, b"a,b\n1,2\n");

    // overwrite replaces, whatever the sizes (the local store keeps small and large objects
    // in different places: the newest put is what a read finds)
    store.put(&key, stream(vec![Ok(b"x")])).await.unwrap();
    assert_eq!(read_all(&store, &key).await, b"x");
    let larger = vec![b'l'; 300 * 1024];
    let size = store.put(&key, futures::stream::iter([Ok(Bytes::from(larger.clone()))]).boxed()).await.unwrap();
    assert_eq!(size, larger.len() as u64);
    assert!(read_all(&store, &key).await == larger, "a large object replaces a small one");
    store.put(&key, stream(vec![Ok(b"x")])).await.unwrap();
    assert_eq!(read_all(&store, &key).await, b"x", "and a small one a large one");

    store.delete(&key).await.unwrap();
    assert_eq!(kind_of(store.get(&key).await), StorageErrorKind::NotFound);
    store.delete(&key).await.expect("deleting a missing object is fine");

    // a large object, in many small chunks (multipart on S3 when over its threshold)
    let big: Vec<u8> = (0..11 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let chunks: Vec<std::io::Result<Bytes>> = big.chunks(64 * 1024).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
    let big_key = format!("uploads/{}.csv", FileId::new());
    let size = store.put(&big_key, futures::stream::iter(chunks).boxed()).await.unwrap();
    assert_eq!(size, big.len() as u64);
    assert!(read_all(&store, &big_key).await == big, "the large object reads back byte for byte");
    store.delete(&big_key).await.unwrap();

    let broken = format!("uploads/{}.csv", FileId::new());
    let err = store
        .put(&broken, stream(vec![Ok(b"partial"), Err(std::io::Error::other("client went away"))]))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StorageErrorKind::UploadFailed, "{err}");
    let source = std::error::Error::source(&err).expect("the stream's own error");
    assert_eq!(source.to_string(), "client went away");
    assert_eq!(kind_of(store.get(&broken).await), StorageErrorKind::NotFound, "a failed upload leaves nothing");
}

fn record(at: DateTime<Utc>) -> StatusRecord {
    let id = FileId::new();
    StatusRecord::uploaded(id, format!("uploads/{id}.csv"), 42, at)
}

/// Status: created once, moved only forward, atomically, with history kept.
pub async fn status_store(store: Arc<dyn StatusStore>) {
    store.check().await.unwrap();
    let t = Utc::now();
    let r = record(t);
    let id = r.file_id;
    assert_eq!(store.get(id).await.unwrap(), None);
    store.create(&r).await.unwrap();
    assert_eq!(kind_of(store.create(&r).await), StorageErrorKind::AlreadyExists);
    assert_eq!(store.get(id).await.unwrap().unwrap(), r);

    let moved = store.advance(id, FileStatus::Validating, StatusUpdate::default(), t).await.unwrap();
    assert!(matches!(moved, Advance::Moved(ref r) if r.status == FileStatus::Validating));
    let update = StatusUpdate { row_count: Some(7), ..Default::default() };
    store.advance(id, FileStatus::Validated, update, t).await.unwrap();
    match store.advance(id, FileStatus::Validating, StatusUpdate::default(), t).await.unwrap() {
        Advance::Refused(r) => assert_eq!(r.status, FileStatus::Validated),
        other => panic!("moving back must be refused: {other:?}"),
    }
    let now = store.get(id).await.unwrap().unwrap();
    assert_eq!(now.status, FileStatus::Validated);
    assert_eq!(now.row_count, Some(7));
    assert_eq!(now.history.len(), 3);

    let missing = FileId::new();
    let advanced = store.advance(missing, FileStatus::Validating, StatusUpdate::default(), t).await;
    assert_eq!(kind_of(advanced), StorageErrorKind::NotFound);

    // concurrent movers: exactly one wins each step
    let r2 = record(t);
    store.create(&r2).await.unwrap();
    let tries = (0..8).map(|_| {
        let s = store.clone();
        let id = r2.file_id;
        tokio::spawn(async move {
            s.advance(id, FileStatus::Validating, StatusUpdate::default(), Utc::now()).await.unwrap()
        })
    });
    let results = futures::future::join_all(tries).await;
    let wins = results.iter().filter(|r| matches!(r.as_ref().unwrap(), Advance::Moved(_))).count();
    assert_eq!(wins, 1);

    // an announced file cannot be withdrawn; an unannounced one can, once
    assert!(!store.withdraw(id).await.unwrap());
    assert!(store.get(id).await.unwrap().is_some());
    let mut pending = record(t);
    pending.announced = false;
    store.create(&pending).await.unwrap();
    assert!(!store.get(pending.file_id).await.unwrap().unwrap().announced);
    store.mark_announced(pending.file_id).await.unwrap();
    assert!(store.get(pending.file_id).await.unwrap().unwrap().announced);
    assert!(!store.withdraw(pending.file_id).await.unwrap(), "announced: kept");
    // a change after the mark (a claim) lands, and the file stays announced
    let claimed = store
        .update(pending.file_id, Arc::new(|r| r.advance(FileStatus::Validating, StatusUpdate::default(), Utc::now())))
        .await;
    assert!(matches!(claimed.unwrap(), Advance::Moved(r) if r.announced));
    store.mark_announced(pending.file_id).await.unwrap();
    let now = store.get(pending.file_id).await.unwrap().unwrap();
    assert!(now.announced && now.status == FileStatus::Validating, "{now:?}");
    assert!(!store.withdraw(pending.file_id).await.unwrap(), "claimed: kept");
    let mut withdrawn = record(t);
    withdrawn.announced = false;
    store.create(&withdrawn).await.unwrap();
    assert!(store.withdraw(withdrawn.file_id).await.unwrap());
    assert_eq!(store.get(withdrawn.file_id).await.unwrap(), None);
    assert!(!store.withdraw(withdrawn.file_id).await.unwrap(), "unknown: nothing to do");

    // the sweeper's query: unannounced records older than a time, and only those
    let hour_ago = t - chrono::Duration::hours(1);
    let mut stale = record(hour_ago);
    stale.announced = false;
    let mut fresh = record(t);
    fresh.announced = false;
    let old_announced = record(hour_ago);
    for r in [&stale, &fresh, &old_announced] {
        store.create(r).await.unwrap();
    }
    let cutoff = t - chrono::Duration::minutes(10);
    assert_eq!(store.unannounced(cutoff, 100).await.unwrap(), vec![stale.file_id]);
    let everything = store.unannounced(t + chrono::Duration::minutes(1), 100).await.unwrap();
    assert_eq!(everything.len(), 2, "both unannounced, neither announced one: {everything:?}");
    store.mark_announced(stale.file_id).await.unwrap();
    assert_eq!(store.unannounced(cutoff, 100).await.unwrap(), vec![], "announced: out of the index");
    assert!(store.withdraw(fresh.file_id).await.unwrap());
    assert_eq!(store.unannounced(t + chrono::Duration::minutes(1), 100).await.unwrap(), vec![]);

    status_store_attempts(&store, t).await;
}

/// Two processes on the same tables (`a` and `b`: two stores opened on one database or one
/// table): what one remembers of a record never hides the other's change, and a record one
/// remembers is the record as stored.
pub async fn status_store_two_processes(a: Arc<dyn StatusStore>, b: Arc<dyn StatusStore>) {
    let t = Utc::now();
    let r = record(t);
    let id = r.file_id;
    a.create(&r).await.unwrap();
    assert!(matches!(
        a.advance(id, FileStatus::Validating, StatusUpdate::default(), t).await.unwrap(),
        Advance::Moved(_)
    ));
    if let Some(seen) = a.remembered(id) {
        assert_eq!(Some(seen), b.get(id).await.unwrap(), "remembered as stored");
    }
    // b moves the file on behind a's back; a's next change starts from b's record
    let update = StatusUpdate { row_count: Some(3), ..Default::default() };
    assert!(matches!(b.advance(id, FileStatus::Validated, update, t).await.unwrap(), Advance::Moved(_)));
    match a.advance(id, FileStatus::Validating, StatusUpdate::default(), t).await.unwrap() {
        Advance::Refused(r) => assert_eq!((r.status, r.row_count), (FileStatus::Validated, Some(3))),
        other => panic!("a must see b's move: {other:?}"),
    }
    let bump = |n: u64| -> txpipe_common::storage::Change {
        Arc::new(move |r: &mut StatusRecord| {
            r.size_bytes += n;
            true
        })
    };
    a.update(id, bump(1)).await.unwrap();
    b.update(id, bump(10)).await.unwrap();
    a.update(id, bump(100)).await.unwrap();
    let now = b.get(id).await.unwrap().unwrap();
    assert_eq!(now.size_bytes, r.size_bytes + 111, "no change lost between the two");
    if let Some(seen) = a.remembered(id) {
        assert_eq!(seen, now);
    }
    // withdrawn in one, unknown to the other's next change
    let mut pending = record(t);
    pending.announced = false;
    a.create(&pending).await.unwrap();
    assert!(b.withdraw(pending.file_id).await.unwrap());
    assert_eq!(kind_of(a.update(pending.file_id, bump(1)).await), StorageErrorKind::NotFound);
}

/// What the attempt rules and the stuck-file sweep need: an atomic change of a record that no
/// concurrent change is lost to, and the query of files in a working status with no sign of life.
async fn status_store_attempts(store: &Arc<dyn StatusStore>, t: DateTime<Utc>) {
    use txpipe_common::status::Attempt;
    use txpipe_common::storage::Change;
    let hour_ago = t - chrono::Duration::hours(1);
    let mut working = record(hour_ago);
    assert!(working.advance(FileStatus::Validating, StatusUpdate::default(), hour_ago));
    store.create(&working).await.unwrap();
    let id = working.file_id;
    let cutoff = t - chrono::Duration::minutes(10);
    let later = t + chrono::Duration::minutes(1);
    assert!(store.stalled(FileStatus::Validating, cutoff, 100).await.unwrap().contains(&id));
    assert!(!store.stalled(FileStatus::Processing, later, 100).await.unwrap().contains(&id), "by status");

    // a heartbeat is a sign of life
    let beat: Change = Arc::new(move |r| {
        r.attempt = Some(Attempt {
            id: "a".into(),
            started: 1,
            crashes: 0,
            renewed_at: t,
            live: true,
            alone: false,
            suspect: false,
        });
        true
    });
    assert!(matches!(store.update(id, beat).await.unwrap(), Advance::Moved(ref r) if r.attempt.is_some()));
    assert!(!store.stalled(FileStatus::Validating, cutoff, 100).await.unwrap().contains(&id), "alive since t");
    assert!(store.stalled(FileStatus::Validating, later, 100).await.unwrap().contains(&id));

    // a change that changes nothing is refused and writes nothing; an unknown file is not found
    let noop: Change = Arc::new(|_| false);
    assert!(matches!(store.update(id, noop).await.unwrap(), Advance::Refused(ref r) if r.attempt.is_some()));
    assert_eq!(kind_of(store.update(FileId::new(), Arc::new(|_| true)).await), StorageErrorKind::NotFound);

    // concurrent changes: none is lost
    let bumps = (0..8).map(|_| {
        let s = store.clone();
        tokio::spawn(async move {
            let bump: Change = Arc::new(|r| {
                r.attempt.as_mut().expect("an attempt").started += 1;
                true
            });
            s.update(id, bump).await.unwrap()
        })
    });
    futures::future::join_all(bumps).await;
    assert_eq!(store.get(id).await.unwrap().unwrap().attempt.unwrap().started, 9);

    // out of its working status, out of the query
    store.advance(id, FileStatus::Validated, StatusUpdate::default(), t).await.unwrap();
    assert!(!store.stalled(FileStatus::Validating, later, 100).await.unwrap().contains(&id));
    assert_eq!(store.get(id).await.unwrap().unwrap().attempt, None, "a status change ends the attempt");
}

/// A first version of transaction `id`, as `file_id` wrote it.
pub fn tx(id: &str, file_id: FileId, amount: &str) -> Transaction {
    let ts = DateTime::parse_from_rfc3339("2024-01-15T10:30:00+02:00").unwrap();
    Transaction {
        transaction_id: id.into(),
        amount: Decimal::from_str(amount).unwrap(),
        currency: "EUR".into(),
        timestamp: ts,
        timestamp_epoch: ts.timestamp(),
        merchant: "Acme, \"Inc\"".into(),
        status: TxStatus::Pending,
        file_id,
        processed_at: Utc::now(),
        version: 1,
        replaces: None,
    }
}

fn written(o: WriteOutcome) {
    assert_eq!(o, WriteOutcome::Written);
}

/// Transactions: exact amounts; conditional versions (a write lands only over the version it
/// expects, all or nothing); each file's versions paged by id; a transaction's current version
/// and its history; reverting a version brings back the one it replaced.
pub async fn transaction_store(store: Arc<dyn TransactionStore>) {
    store.check().await.unwrap();
    let (f1, f2, f3) = (FileId::new(), FileId::new(), FileId::new());
    let p = uuid::Uuid::new_v4().simple().to_string();
    let rows: Vec<_> = (0..5).map(|i| tx(&format!("{p}-{i}"), f1, "12345678901234567890.12345678")).collect();
    written(store.write(&rows).await.unwrap());
    let ids: Vec<String> = rows.iter().map(|r| r.transaction_id.clone()).collect();
    let mut current = store.current(&ids).await.unwrap();
    current.sort_by(|a, b| a.transaction_id.cmp(&b.transaction_id));
    assert_eq!(current, rows);
    assert_eq!(store.current(&[format!("{p}-none")]).await.unwrap(), vec![], "an unknown id is left out");

    // the same first versions again: refused, each naming what is there
    let WriteOutcome::Stale(stale) = store.write(&rows[..2]).await.unwrap() else { panic!("a second first version") };
    assert_eq!(stale.len(), 2);
    assert!(stale.iter().all(|(id, now)| now.as_ref().map(|t| &t.transaction_id) == Some(id)));

    let page = store.list_by_file(f1, 2, None).await.unwrap();
    assert_eq!(page.items, rows[..2]);
    let page2 = store.list_by_file(f1, 2, page.next_cursor.as_deref()).await.unwrap();
    assert_eq!(page2.items, rows[2..4]);
    let page3 = store.list_by_file(f1, 2, page2.next_cursor.as_deref()).await.unwrap();
    assert_eq!(page3.items, rows[4..]);
    assert_eq!(page3.next_cursor, None);
    assert_eq!(page.items[0].amount.to_string(), "12345678901234567890.12345678");

    // all or nothing: one refused version keeps the others of the call from being written
    let new_id = format!("{p}-new");
    let mixed = vec![tx(&new_id, f2, "1"), tx(&format!("{p}-0"), f2, "2")];
    let WriteOutcome::Stale(stale) = store.write(&mixed).await.unwrap() else { panic!("refused") };
    assert_eq!(stale.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>(), vec![format!("{p}-0")]);
    assert_eq!(store.current(std::slice::from_ref(&new_id)).await.unwrap(), vec![], "nothing written");

    // a later version replaces the current one; the earlier stays with its file
    let v2 = tx(&format!("{p}-0"), f2, "0.10").replacing(&rows[0]);
    written(store.write(&[v2.clone(), tx(&new_id, f2, "1")]).await.unwrap());
    assert_eq!(store.current(&[format!("{p}-0")]).await.unwrap(), vec![v2.clone()]);
    assert_eq!(store.list_by_file(f1, 10, None).await.unwrap().items, rows, "f1's rows as f1 wrote them");
    // paged, a file's replaced versions and its current ones come in one id order
    let (f4, mut paged, mut cursor) = (FileId::new(), Vec::new(), None);
    written(store.write(&[tx(&format!("{p}-3"), f4, "0.30").replacing(&rows[3])]).await.unwrap());
    loop {
        let page = store.list_by_file(f1, 2, cursor.as_deref()).await.unwrap();
        assert!(page.items.len() <= 2);
        paged.extend(page.items);
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(paged, rows, "every version f1 wrote, once, in order");
    assert_eq!(store.version(f1, &format!("{p}-3")).await.unwrap(), Some(rows[3].clone()));
    assert_eq!(store.list_by_file(f2, 10, None).await.unwrap().items.len(), 2);
    assert_eq!(store.version(f1, &format!("{p}-0")).await.unwrap(), Some(rows[0].clone()));
    assert_eq!(store.version(f2, &format!("{p}-0")).await.unwrap(), Some(v2.clone()));
    assert_eq!(v2.replaces, Some(VersionRef { file_id: f1, version: 1 }));
    // a stale expectation (replacing version 1 again) is refused
    let late = tx(&format!("{p}-0"), f3, "9").replacing(&rows[0]);
    let WriteOutcome::Stale(stale) = store.write(&[late]).await.unwrap() else { panic!("stale version") };
    assert_eq!(stale[0].1, Some(v2.clone()));

    // reverting the current version brings back the one it replaced; a first version goes
    store.revert(f2, &format!("{p}-0")).await.unwrap();
    assert_eq!(store.current(&[format!("{p}-0")]).await.unwrap(), vec![rows[0].clone()]);
    assert_eq!(store.version(f2, &format!("{p}-0")).await.unwrap(), None);
    store.revert(f2, &new_id).await.unwrap();
    assert_eq!(store.current(std::slice::from_ref(&new_id)).await.unwrap(), vec![]);
    assert!(store.list_by_file(f2, 10, None).await.unwrap().items.is_empty());
    store.revert(f2, &new_id).await.expect("reverting what is not there is harmless");
    // reverting a version a later one replaced forgets it and leaves the current alone
    let v2 = tx(&format!("{p}-1"), f2, "5").replacing(&rows[1]);
    written(store.write(std::slice::from_ref(&v2)).await.unwrap());
    store.revert(f1, &format!("{p}-1")).await.unwrap();
    assert_eq!(store.current(&[format!("{p}-1")]).await.unwrap(), vec![v2]);
    assert_eq!(store.version(f1, &format!("{p}-1")).await.unwrap(), None);

    assert_eq!(kind_of(store.list_by_file(f1, 10, Some("not-a-cursor")).await), StorageErrorKind::InvalidCursor);
    assert!(store.list_by_file(FileId::new(), 10, None).await.unwrap().items.is_empty());

    // many writers racing for one new transaction: exactly one wins
    let race = format!("{p}-race");
    let tries = (0..8).map(|i| {
        let (s, t) = (store.clone(), tx(&race, FileId::new(), &format!("{i}")));
        tokio::spawn(async move { s.write(&[t]).await.unwrap() })
    });
    let won =
        futures::future::join_all(tries).await.into_iter().filter(|r| r.as_ref().unwrap() == &WriteOutcome::Written);
    assert_eq!(won.count(), 1);
}

/// Rows and a status change in one call: the change is made only when every row went in, by
/// the store itself or, if it says so (`None`), by its caller; a refused row leaves both
/// undone. Whoever makes it, the record ends up moved once. True if the store made it.
pub async fn write_then(transactions: Arc<dyn TransactionStore>, statuses: Arc<dyn StatusStore>) -> bool {
    let t = Utc::now();
    let mut record = StatusRecord::uploaded(FileId::new(), "k".into(), 10, t);
    assert!(record.advance(FileStatus::Validated, StatusUpdate::default(), t));
    let id = record.file_id;
    statuses.create(&record).await.unwrap();
    let p = uuid::Uuid::new_v4().simple().to_string();
    let rows: Vec<_> = (0..3).map(|i| tx(&format!("{p}-{i}"), id, "1")).collect();
    let passed = Some((FileStatus::Processing, t));
    let change = StatusChange {
        file_id: id,
        to: FileStatus::Processed,
        update: StatusUpdate { records_processed: Some(3), passed, ..Default::default() },
        at: t,
    };

    // a refused row: nothing written, no change made
    let other = tx(&format!("{p}-taken"), FileId::new(), "2");
    written(transactions.write(std::slice::from_ref(&other)).await.unwrap());
    let mut refused = rows.clone();
    refused.push(tx(&other.transaction_id, id, "2"));
    let (outcome, moved) = transactions.write_then(&refused, change.clone()).await.unwrap();
    assert!(matches!(outcome, WriteOutcome::Stale(ref s) if s.len() == 1), "{outcome:?}");
    assert!(moved.is_none(), "no change with a refused row");
    assert_eq!(statuses.get(id).await.unwrap().unwrap().status, FileStatus::Validated);
    assert!(transactions.current(&[rows[0].transaction_id.clone()]).await.unwrap().is_empty(), "nothing written");

    // every row in: the change is made with them, or left to the caller
    let (outcome, moved) = transactions.write_then(&rows, change.clone()).await.unwrap();
    written(outcome);
    let by_store = moved.is_some();
    let now = match moved {
        Some(Advance::Moved(r)) => r,
        Some(refused) => panic!("a change that moves forward was refused: {refused:?}"),
        None => match statuses.advance(id, change.to, change.update.clone(), change.at).await.unwrap() {
            Advance::Moved(r) => r,
            refused => panic!("{refused:?}"),
        },
    };
    assert_eq!((now.status, now.records_processed), (FileStatus::Processed, Some(3)));
    assert_eq!(statuses.get(id).await.unwrap().unwrap(), now, "stored as returned");
    let path: Vec<_> = now.history.iter().map(|h| h.status).collect();
    assert_eq!(path, [FileStatus::Uploaded, FileStatus::Validated, FileStatus::Processing, FileStatus::Processed]);
    assert_eq!(transactions.list_by_file(id, 10, None).await.unwrap().items, rows);
    by_store
}

fn key(name: &str, admin: bool) -> ApiKeyRecord {
    ApiKeyRecord {
        name: name.into(),
        hash: txpipe_common::auth::hash_key(&format!("txp_{}", uuid::Uuid::new_v4().simple())),
        admin,
        daily_quota: 3,
        rate_per_second: 2.5,
        burst: 4,
        created_at: Utc::now(),
        revoked_at: None,
    }
}

/// API keys: found by hash, names and hashes never taken twice, listed without loss, revoked
/// for good; the daily counter counts up to its limit and no further, even with many callers
/// at once, per key and per day, and gives back.
pub async fn api_key_store(store: Arc<dyn ApiKeyStore>) {
    store.check().await.unwrap();
    let p = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let (a, b) = (key(&format!("a-{p}"), false), key(&format!("b-{p}"), true));
    assert_eq!(store.get_by_hash(&a.hash).await.unwrap(), None);
    store.create(&a).await.unwrap();
    store.create(&b).await.unwrap();
    assert_eq!(store.get_by_hash(&a.hash).await.unwrap(), Some(a.clone()));
    assert_eq!(store.get_by_hash(&b.hash).await.unwrap().map(|k| k.admin), Some(true));
    let same_name = ApiKeyRecord { hash: key("x", false).hash, ..a.clone() };
    assert_eq!(kind_of(store.create(&same_name).await), StorageErrorKind::AlreadyExists);
    assert_eq!(store.get_by_hash(&same_name.hash).await.unwrap(), None, "a refused key leaves nothing");
    let listed = store.list().await.unwrap();
    let mine: Vec<_> = listed.iter().filter(|k| k.name.ends_with(p)).collect();
    assert_eq!(mine, vec![&a, &b], "listed by name");

    let at = Utc::now();
    store.revoke(&a.name, at).await.unwrap();
    store.revoke(&a.name, Utc::now()).await.expect("revoking again is harmless");
    let revoked = store.get_by_hash(&a.hash).await.unwrap().unwrap();
    assert_eq!(revoked.revoked_at.map(|t| t.timestamp_millis()), Some(at.timestamp_millis()));
    assert_eq!(kind_of(store.revoke(&format!("nobody-{p}"), at).await), StorageErrorKind::NotFound);
    assert_eq!(
        kind_of(store.create(&ApiKeyRecord { hash: key("y", false).hash, ..a.clone() }).await),
        StorageErrorKind::AlreadyExists,
        "a revoked key's name stays taken"
    );

    let day = chrono::NaiveDate::from_ymd_opt(2024, 1, 15).unwrap();
    assert_eq!(store.consume(&a.name, day, 2).await.unwrap(), QuotaUse::Counted(1));
    assert_eq!(store.consume(&a.name, day, 2).await.unwrap(), QuotaUse::Counted(2));
    assert_eq!(store.consume(&a.name, day, 2).await.unwrap(), QuotaUse::Exhausted);
    assert_eq!(store.consume(&b.name, day, 2).await.unwrap(), QuotaUse::Counted(1), "each key counts alone");
    store.give_back(&a.name, day).await.unwrap();
    assert_eq!(store.consume(&a.name, day, 2).await.unwrap(), QuotaUse::Counted(2), "given back, counted again");
    assert_eq!(store.consume(&a.name, day, 3).await.unwrap(), QuotaUse::Counted(3), "a raised limit applies at once");
    let next = day.succ_opt().unwrap();
    assert_eq!(store.consume(&a.name, next, 2).await.unwrap(), QuotaUse::Counted(1), "a new day starts at zero");
    store.give_back(&b.name, next).await.expect("giving back what was never counted is harmless");
    assert_eq!(store.consume(&b.name, next, 1).await.unwrap(), QuotaUse::Counted(1), "and never goes below zero");

    // many callers at once (as several gateway replicas): exactly `limit` are counted
    let c = format!("c-{p}");
    let tries = (0..12).map(|_| {
        let (s, c) = (store.clone(), c.clone());
        tokio::spawn(async move { s.consume(&c, day, 5).await.unwrap() })
    });
    let results = futures::future::join_all(tries).await;
    let counted = results.iter().filter(|r| matches!(r.as_ref().unwrap(), QuotaUse::Counted(_))).count();
    assert_eq!(counted, 5);
}

/// Listing files: newest first, by owner or all, by status and time, paged by cursor; uploads
/// not yet announced are left out.
pub async fn status_listing(store: Arc<dyn StatusStore>) {
    use txpipe_common::storage::{FilePage, FileQuery};
    let p = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let (alice, bob) = (format!("alice-{p}"), format!("bob-{p}"));
    let t = Utc::now();
    let mins = |m: i64| t - chrono::Duration::minutes(m);
    let owned = |owner: &str, at: DateTime<Utc>| {
        let mut r = record(at);
        r.uploaded_by = Some(owner.to_owned());
        r
    };
    let (r1, r2, r3) = (owned(&alice, mins(180)), owned(&alice, mins(120)), owned(&alice, mins(60)));
    // the same time as r3: the listing then goes by file_id, newest (largest) first
    let r4 = StatusRecord { file_id: FileId::new(), ..r3.clone() };
    let b1 = owned(&bob, mins(90));
    let nobody = record(mins(30));
    let mut pending = owned(&alice, mins(1));
    pending.announced = false;
    for r in [&r1, &r2, &r3, &r4, &b1, &nobody, &pending] {
        store.create(r).await.unwrap();
    }
    let list = |owner: Option<&str>, limit: usize| FileQuery {
        owner: owner.map(str::to_owned),
        status: None,
        since: None,
        limit,
        cursor: None,
    };
    let ids = |page: &FilePage| page.items.iter().map(|r| r.file_id).collect::<Vec<_>>();
    let (newer, older) = if r4.file_id > r3.file_id { (&r4, &r3) } else { (&r3, &r4) };
    let alices = vec![newer.file_id, older.file_id, r2.file_id, r1.file_id];

    let page = store.list(&list(Some(&alice), 10)).await.unwrap();
    assert_eq!(ids(&page), alices, "newest first, only alice's, not the unannounced one");
    assert_eq!(page.next_cursor, None);
    assert_eq!(page.items[2], r2, "whole records");
    assert_eq!(ids(&store.list(&list(Some(&bob), 10)).await.unwrap()), vec![b1.file_id]);
    assert!(store.list(&list(Some(&format!("carol-{p}")), 10)).await.unwrap().items.is_empty());

    // every owner's (admin keys): this test's files in order among any others the table holds
    let mine = [r1.file_id, r2.file_id, r3.file_id, r4.file_id, b1.file_id, nobody.file_id, pending.file_id];
    let all = store.list(&list(None, 1000)).await.unwrap();
    let all: Vec<FileId> = ids(&all).into_iter().filter(|id| mine.contains(id)).collect();
    assert_eq!(all, vec![nobody.file_id, newer.file_id, older.file_id, b1.file_id, r2.file_id, r1.file_id]);

    // a page at a time: the same files, each once, the last page without a cursor
    let mut q = list(Some(&alice), 1);
    let mut seen = Vec::new();
    loop {
        let page = store.list(&q).await.unwrap();
        assert!(page.items.len() <= 1);
        seen.extend(ids(&page));
        match page.next_cursor {
            Some(c) => q.cursor = Some(c),
            None => break,
        }
        assert!(seen.len() <= alices.len(), "paging must end");
    }
    assert_eq!(seen, alices);

    // by status, and since a time (inclusive)
    store.advance(r2.file_id, FileStatus::Validating, StatusUpdate::default(), t).await.unwrap();
    let validating = FileQuery { status: Some(FileStatus::Validating), ..list(Some(&alice), 10) };
    assert_eq!(ids(&store.list(&validating).await.unwrap()), vec![r2.file_id]);
    let moved = &store.list(&validating).await.unwrap().items[0];
    assert_eq!(moved.status, FileStatus::Validating, "the record as it now is");
    let since = FileQuery { since: Some(r2.created_at), ..list(Some(&alice), 10) };
    assert_eq!(ids(&store.list(&since).await.unwrap()), alices[..3]);
    let filtered_page = FileQuery { status: Some(FileStatus::Uploaded), ..list(Some(&alice), 2) };
    let first = store.list(&filtered_page).await.unwrap();
    assert_eq!(ids(&first), alices[..2]);
    let rest = store.list(&FileQuery { cursor: first.next_cursor, ..filtered_page }).await.unwrap();
    assert_eq!(ids(&rest), vec![r1.file_id], "r2 (validating) is skipped");

    // once announced, an upload is listed
    store.mark_announced(pending.file_id).await.unwrap();
    assert_eq!(ids(&store.list(&list(Some(&alice), 1)).await.unwrap()), vec![pending.file_id]);

    // cursors that are not this listing's are refused
    let transaction_style = "7431".to_owned(); // hex of "t1"
    for bad in ["zz".to_owned(), transaction_style] {
        let q = FileQuery { cursor: Some(bad), ..list(Some(&alice), 10) };
        assert_eq!(kind_of(store.list(&q).await), StorageErrorKind::InvalidCursor);
    }
}

/// Idempotency keys: a key is claimed once (also by many at once), held while in flight (and
/// renewed), answered with its upload once completed, freed when released or when its holder's
/// lease runs out, forgotten after its window; only the claim's own token completes or releases it, and
/// keys are independent (another API key's record of the same Idempotency-Key is another key).
pub async fn idempotency_store(store: Arc<dyn IdempotencyStore>) {
    store.check().await.unwrap();
    let p = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let now = Utc::now();
    let hour = chrono::Duration::hours(1);
    let claim = |key: &str, token: &str, lease_until: DateTime<Utc>, expires_at: DateTime<Utc>| NewClaim {
        key: format!("{key}-{p}"),
        token: token.into(),
        now,
        lease_until,
        expires_at,
    };
    let fresh = |key: &str, token: &str| claim(key, token, now + hour, now + hour * 24);
    let upload = |size_bytes: u64| IdempotentUpload {
        file_id: FileId::new(),
        size_bytes,
        sha256: "ab".repeat(32),
        options: Default::default(),
    };

    let a = fresh("alice#k1", "t1");
    assert_eq!(store.claim(&a).await.unwrap(), Claim::Claimed);
    assert_eq!(store.claim(&fresh("alice#k1", "t2")).await.unwrap(), Claim::InFlight, "held while in flight");
    assert_eq!(store.claim(&fresh("bob#k1", "t3")).await.unwrap(), Claim::Claimed, "another key's record is apart");
    let first = upload(42);
    assert!(!store.complete(&a.key, "t2", &first).await.unwrap(), "only the claim's own token completes it");
    assert!(store.complete(&a.key, "t1", &first).await.unwrap());
    assert!(!store.complete(&a.key, "t1", &upload(7)).await.unwrap(), "completed once");
    assert_eq!(store.claim(&fresh("alice#k1", "t4")).await.unwrap(), Claim::Done(first.clone()));
    store.release(&a.key, "t1").await.unwrap();
    assert_eq!(store.claim(&fresh("alice#k1", "t5")).await.unwrap(), Claim::Done(first), "a done key stays done");

    // released (its upload failed): the next request has it
    let b = fresh("alice#k2", "t1");
    assert_eq!(store.claim(&b).await.unwrap(), Claim::Claimed);
    store.release(&b.key, "t9").await.unwrap();
    assert_eq!(store.claim(&fresh("alice#k2", "t2")).await.unwrap(), Claim::InFlight, "another token cannot free it");
    store.release(&b.key, "t1").await.unwrap();
    assert_eq!(store.claim(&fresh("alice#k2", "t3")).await.unwrap(), Claim::Claimed);
    assert!(!store.complete(&b.key, "t1", &upload(1)).await.unwrap(), "a released claim cannot complete");

    // a claim whose lease ran out (its gateway died) is taken over; the old holder loses it
    let c = claim("alice#k3", "t1", now - hour, now + hour * 24);
    assert_eq!(store.claim(&c).await.unwrap(), Claim::Claimed);
    assert_eq!(store.claim(&fresh("alice#k3", "t2")).await.unwrap(), Claim::Claimed, "taken over");
    assert!(!store.complete(&c.key, "t1", &upload(1)).await.unwrap());
    assert!(store.complete(&c.key, "t2", &upload(2)).await.unwrap());

    // a claim renewed while its upload streams keeps its key past its first lease
    let e = claim("alice#k6", "t1", now - hour, now + hour * 24);
    assert_eq!(store.claim(&e).await.unwrap(), Claim::Claimed);
    assert!(!store.renew(&e.key, "t9", now + hour).await.unwrap(), "only its own token renews it");
    assert!(store.renew(&e.key, "t1", now + hour).await.unwrap());
    assert_eq!(store.claim(&fresh("alice#k6", "t2")).await.unwrap(), Claim::InFlight, "renewed: still held");
    assert!(store.complete(&e.key, "t1", &upload(3)).await.unwrap());
    assert!(!store.renew(&e.key, "t1", now + hour).await.unwrap(), "a done key is not renewed");

    // past its window a record is forgotten, done or not
    let d = claim("alice#k4", "t1", now + hour, now - hour);
    assert_eq!(store.claim(&d).await.unwrap(), Claim::Claimed);
    assert!(store.complete(&d.key, "t1", &upload(1)).await.unwrap());
    assert_eq!(store.claim(&fresh("alice#k4", "t2")).await.unwrap(), Claim::Claimed, "expired: a new request");

    // many at once (as several gateway replicas): exactly one claims
    let tries = (0..8).map(|i| {
        let (s, c) = (store.clone(), fresh("alice#k5", &format!("r{i}")));
        tokio::spawn(async move { s.claim(&c).await.unwrap() })
    });
    let results = futures::future::join_all(tries).await;
    let claimed = results.iter().filter(|r| *r.as_ref().unwrap() == Claim::Claimed).count();
    assert_eq!(claimed, 1, "{results:?}");
}
