//! The upload API as its users meet it (issue 10): `multipart/form-data` uploads as
//! `curl -F file=@transactions.csv` sends them, the listing of one's files (`GET /files`), and
//! the OpenAPI document at `GET /openapi.json` against what the gateway really serves.

use serde_json::Value;
use std::collections::BTreeSet;
use txpipe_common::status::FileStatus;
use txpipe_tests::{valid_csv, TestFleet, UNLIMITED};

const BOUNDARY: &str = "------------------------txpipe7d3a";

/// One part of a form: name, filename, content type, bytes.
type Part<'a> = (&'a str, Option<&'a str>, Option<&'a str>, &'a [u8]);

/// A multipart/form-data body as curl builds it.
fn form(parts: &[Part<'_>]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, filename, content_type, bytes) in parts {
        body.extend_from_slice(format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"").as_bytes());
        if let Some(f) = filename {
            body.extend_from_slice(format!("; filename=\"{f}\"").as_bytes());
        }
        body.extend_from_slice(b"\r\n");
        if let Some(ct) = content_type {
            body.extend_from_slice(format!("Content-Type: {ct}\r\n").as_bytes());
        }
        body.extend_from_slice(b"\r\n");
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

fn form_type() -> String {
    format!("multipart/form-data; boundary={BOUNDARY}")
}

/// The status and JSON body of an answer.
async fn answer(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_form_upload_is_stored_and_processed_like_a_raw_one() {
    let fleet = TestFleet::spawn_with(|s| s.max_upload_bytes = 4096).await;
    let csv = valid_csv("form", 20);
    assert!(csv.len() < 4096);

    // curl -F note=hello -F file=@transactions.csv: the part's own type is not held against it
    let body = form(&[
        ("note", None, None, b"hello"),
        ("file", Some("transactions.csv"), Some("application/vnd.ms-excel"), csv.as_bytes()),
        ("after", None, Some("text/plain"), b"ignored too"),
    ]);
    let (status, accepted) = answer(fleet.post_upload(body, &form_type()).await).await;
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(accepted["size_bytes"], csv.len(), "the file part's bytes, not the form's");
    // the file's SHA-256, taken while it streamed, in the 202 and the status record
    let sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(csv.as_bytes()));
    assert_eq!(accepted["sha256"], sha256.as_str(), "the file part's digest, not the form's");
    let id = accepted["file_id"].as_str().unwrap().parse().unwrap();
    let done = fleet.wait_for_status(id, &[FileStatus::Completed, FileStatus::ValidationFailed]).await;
    assert_eq!((done.status, done.row_count), (FileStatus::Completed, Some(20)), "{done:#?}");
    assert_eq!(done.sha256.as_deref(), Some(sha256.as_str()));
    let rows = fleet.transactions(id, 100).await;
    assert_eq!(rows.len(), 20);
    assert_eq!(rows[0].transaction_id, "form-000000");

    // the only file part, whatever its name; and a part named file without a filename
    // (curl -F 'file=<transactions.csv'), sent in small chunks without a Content-Length
    let only = form(&[("upload", Some("x.csv"), None, csv.as_bytes())]);
    assert_eq!(fleet.post_upload(only, &form_type()).await.status(), 202);
    let text_field = form(&[("file", None, None, csv.as_bytes())]);
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = text_field.chunks(100).map(|c| Ok(c.to_vec())).collect();
    let streamed = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
    let (status, body) = answer(fleet.post_upload(streamed, &form_type()).await).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(fleet.object_count().await, 3);
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_form_without_exactly_one_file_part_or_over_the_limit_is_refused_and_leaves_nothing() {
    let fleet = TestFleet::spawn_with(|s| s.max_upload_bytes = 4096).await;
    let csv = valid_csv("bad", 5);
    let big = valid_csv("big", 200);
    assert!(big.len() > 4096);
    let filler = vec![b'x'; 100 * 1024];
    let cases: Vec<(&str, Vec<u8>, String, u16, &str)> = vec![
        (
            "two file parts",
            form(&[("file", Some("a.csv"), None, csv.as_bytes()), ("more", Some("b.csv"), None, csv.as_bytes())]),
            form_type(),
            400,
            "more than one file part",
        ),
        ("no file part", form(&[("note", None, None, b"hello")]), form_type(), 400, "no file part"),
        ("an empty form", form(&[]), form_type(), 400, "no file part"),
        ("an empty file", form(&[("file", Some("a.csv"), None, b"")]), form_type(), 400, "empty"),
        ("no boundary", form(&[("file", None, None, csv.as_bytes())]), "multipart/form-data".into(), 400, "boundary"),
        (
            "cut off before its closing boundary",
            format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\n{csv}").into_bytes(),
            form_type(),
            400,
            "malformed",
        ),
        ("a file over the limit", form(&[("file", Some("a.csv"), None, big.as_bytes())]), form_type(), 413, "limit"),
        (
            "a small file beside a huge ignored field",
            form(&[("file", Some("a.csv"), None, csv.as_bytes()), ("junk", None, None, &filler)]),
            form_type(),
            413,
            "limit",
        ),
    ];
    for (name, body, content_type, want, says) in cases {
        let (status, err) = answer(fleet.post_upload(body, &content_type).await).await;
        assert_eq!(status, want, "{name}: {err}");
        let message = err["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{name}: {message:?} should say {says:?}");
    }
    // the same huge form streamed without a Content-Length is cut off as it arrives
    let huge = form(&[("file", Some("a.csv"), None, &filler)]);
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = huge.chunks(4096).map(|c| Ok(c.to_vec())).collect();
    let streamed = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
    assert_eq!(fleet.post_upload(streamed, &form_type()).await.status(), 413);
    assert_eq!(fleet.object_count().await, 0, "refused forms leave no object behind");
    assert!(fleet.unannounced().await.is_empty());
    let (code, listed) = fleet.get_json("/files").await;
    assert_eq!((code, listed["items"].as_array().map(Vec::len)), (200, Some(0)), "and no file: {listed}");
    fleet.shutdown().await;
}

/// Every file of a listing, following its cursors.
async fn list_all(fleet: &TestFleet, key: &str, query: &str) -> Vec<Value> {
    let mut all = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/files?{query}");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let (code, page) = fleet.get_as(Some(key), &path).await;
        assert_eq!(code, 200, "{path}: {page}");
        all.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return all,
        }
        assert!(all.len() < 1000, "paging must end");
    }
}

fn ids(files: &[Value]) -> Vec<String> {
    files.iter().map(|f| f["file_id"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn each_key_lists_its_own_files_newest_first_and_admins_list_all() {
    let fleet = TestFleet::spawn().await;
    let alice = fleet.new_key("alice", false, UNLIMITED).await;
    let bob = fleet.new_key("bob", false, UNLIMITED).await;
    let mut alices = Vec::new();
    for (i, body) in [valid_csv("a0", 2), "transaction_id,amount\nx,1\n".into(), valid_csv("a2", 2)].iter().enumerate()
    {
        let resp = fleet.upload_as(&alice, body.clone()).await;
        let (status, accepted) = answer(resp).await;
        assert_eq!(status, 202, "upload {i}: {accepted}");
        alices.push(accepted["file_id"].as_str().unwrap().to_owned());
    }
    let (_, b) = answer(fleet.upload_as(&bob, valid_csv("b0", 2)).await).await;
    let bobs = vec![b["file_id"].as_str().unwrap().to_owned()];
    for id in alices.iter().chain(&bobs) {
        let id = id.parse().unwrap();
        fleet.wait_for_status(id, &[FileStatus::Completed, FileStatus::ValidationFailed]).await;
    }
    let newest_first: Vec<String> = alices.iter().rev().cloned().collect();

    let (code, page) = fleet.get_as(Some(&alice), "/files").await;
    assert_eq!(code, 200, "{page}");
    assert_eq!(ids(page["items"].as_array().unwrap()), newest_first);
    assert_eq!(page["next_cursor"], Value::Null);
    assert_eq!(page["items"][0]["uploaded_by"], "alice");
    assert_eq!(ids(&list_all(&fleet, &bob, "").await), bobs, "bob sees only his own");
    let everyone = ids(&list_all(&fleet, &fleet.api_key, "").await);
    assert_eq!(everyone.len(), 4, "an admin key lists every file: {everyone:?}");
    assert_eq!(everyone[0], bobs[0], "bob's was uploaded last");

    // a page at a time, by status, since a time
    assert_eq!(ids(&list_all(&fleet, &alice, "limit=1").await), newest_first);
    let rejected = list_all(&fleet, &alice, "status=validation_failed").await;
    assert_eq!(ids(&rejected), vec![alices[1].clone()]);
    assert!(rejected[0]["error_count"].as_u64() > Some(0), "{}", rejected[0]);
    assert_eq!(
        ids(&list_all(&fleet, &alice, "status=completed&limit=1").await),
        vec![alices[2].clone(), alices[0].clone()]
    );
    let (_, second) = fleet.get_as(Some(&alice), &format!("/files/{}", alices[1])).await;
    let since = second["created_at"].as_str().unwrap().replace('+', "%2B");
    assert_eq!(ids(&list_all(&fleet, &alice, &format!("since={since}")).await), newest_first[..2]);

    // bad parameters: 400 in the one error shape, saying what is wrong
    for (query, says) in [
        ("status=done", "status must be one of"),
        ("since=yesterday", "RFC 3339"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("cursor=zz", "cursor"),
        ("cursor=7431", "cursor"),
        ("limit=1&limit=2", "limit"),
    ] {
        let (code, err) = fleet.get_as(Some(&alice), &format!("/files?{query}")).await;
        assert_eq!((code, err["error"].as_str()), (400, Some("bad_request")), "{query}: {err}");
        assert!(err["message"].as_str().unwrap().contains(says), "{query}: {err}");
    }
    let (code, _) = fleet.get_as(None, "/files").await;
    assert_eq!(code, 401, "listing needs a key");
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_page_of_files_stops_at_the_byte_budget() {
    let fleet = TestFleet::spawn_with(|s| s.max_page_bytes = 1024).await;
    let mut uploaded = Vec::new();
    for i in 0..3 {
        let id = fleet.upload(valid_csv(&format!("p{i}"), 2)).await.file_id;
        fleet.wait_for_status(id, &[FileStatus::Completed]).await;
        uploaded.push(id.to_string());
    }
    let first = fleet.get_ok("/files?limit=10").await;
    let n = first["items"].as_array().unwrap().len();
    assert!((1..3).contains(&n), "a page stops at the byte budget: {n} files");
    assert!(first["next_cursor"].is_string());
    uploaded.reverse();
    assert_eq!(ids(&list_all(&fleet, &fleet.api_key, "limit=10").await), uploaded, "the cursors still give all");
    fleet.shutdown().await;
}

/// The `(METHOD, path)` pairs the document lists.
fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            ops.insert((method.to_uppercase(), path.clone()));
        }
    }
    ops
}

#[tokio::test]
async fn the_openapi_document_describes_exactly_what_the_gateway_serves() {
    let fleet = TestFleet::spawn_local().await;
    let id = fleet.upload(valid_csv("doc", 3)).await.file_id;
    fleet.wait_for_status(id, &[FileStatus::Completed]).await;

    // served without a key, as JSON, OpenAPI 3.1
    let resp = fleet.request_as(None, reqwest::Method::GET, "/openapi.json").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("application/json"));
    let doc: Value = resp.json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");

    // every route the gateway serves, and no other
    let want: BTreeSet<(String, String)> = [
        ("POST", "/upload"),
        ("GET", "/files"),
        ("GET", "/files/{file_id}"),
        ("GET", "/files/{file_id}/transactions"),
        ("GET", "/transactions/{transaction_id}"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
    ]
    .iter()
    .map(|(m, p)| (m.to_string(), p.to_string()))
    .collect();
    assert_eq!(operations(&doc), want);
    let methods = ["GET", "POST", "PUT", "DELETE", "PATCH"];
    let paths: BTreeSet<&String> = want.iter().map(|(_, p)| p).collect();
    for path in paths {
        let url = path.replace("{file_id}", &id.to_string()).replace("{transaction_id}", "doc-000001");
        for method in methods {
            let documented = want.contains(&(method.to_owned(), path.clone()));
            let op = &doc["paths"][path.as_str()][method.to_lowercase()];
            let keyed = op["security"].is_array();
            // with the fleet's admin key: a documented operation is served, any other method is 405
            let req = fleet.http.request(method.parse().unwrap(), format!("{}{url}", fleet.base_url));
            let req =
                if method == "POST" { req.header("content-type", "text/csv").body(valid_csv("d", 1)) } else { req };
            let (code, body) = answer(req.send().await.unwrap()).await;
            if documented {
                assert!(code < 400, "{method} {path} is documented but answered {code}: {body}");
                assert!(op["responses"][code.to_string()].is_object(), "{method} {path}: {code} is not documented");
                // and one without a key is refused exactly when the document says a key is needed
                let (anon, _) =
                    answer(fleet.request_as(None, method.parse().unwrap(), &url).send().await.unwrap()).await;
                assert_eq!(anon == 401, keyed, "{method} {path}: answered {anon} without a key");
            } else {
                assert_eq!(code, 405, "{method} {path} is not documented but answered {code}: {body}");
            }
        }
    }

    // the error shape, the key's header, the upload's two kinds of body, the listing's parameters
    let error = &doc["components"]["schemas"]["ErrorBody"];
    let required: BTreeSet<&str> = error["required"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert_eq!(required, BTreeSet::from(["error", "message"]));
    let (_, not_found) = fleet.get_json("/files/00000000-0000-7000-8000-000000000000").await;
    for field in not_found.as_object().unwrap().keys() {
        assert!(error["properties"][field].is_object(), "{field} of {not_found} is in the error schema");
    }
    let key = &doc["components"]["securitySchemes"]["api_key"];
    assert_eq!(
        (key["type"].as_str(), key["in"].as_str(), key["name"].as_str()),
        (Some("apiKey"), Some("header"), Some("x-api-key"))
    );
    let upload = &doc["paths"]["/upload"]["post"];
    let content = upload["requestBody"]["content"].as_object().unwrap();
    assert!(content.contains_key("text/csv") && content.contains_key("multipart/form-data"), "{content:?}");
    for code in ["202", "400", "401", "408", "413", "415", "429", "503"] {
        assert!(upload["responses"][code].is_object(), "POST /upload documents {code}");
    }
    let params: BTreeSet<&str> = doc["paths"]["/files"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(params, BTreeSet::from(["status", "since", "limit", "cursor"]));
    let statuses = doc["components"]["schemas"]["FileStatus"]["enum"].as_array().unwrap().len();
    assert_eq!(statuses, FileStatus::ALL.len());
    fleet.shutdown().await;
}
