//! Property test of the gateway's edge: random methods, paths, query strings and headers
//! against a live gateway never drop the connection or get a 500, and every 4xx has the JSON
//! error shape. Bounded: a fixed number of cases, each with a client timeout.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use std::time::Duration;
use txpipe_tests::TestFleet;

const CASES: u32 = 200;

#[derive(Debug, Clone)]
struct Probe {
    method: &'static str,
    path: String,
    query: Option<String>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn probe(known_id: String) -> impl Strategy<Value = Probe> {
    let method = prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]);
    // bits of paths the gateway knows, and junk: percent-escapes (valid or not), dots, UTF-8
    let segment = prop_oneof![
        Just("files".to_owned()),
        Just("transactions".to_owned()),
        Just("upload".to_owned()),
        Just(known_id),
        "[a-zA-Z0-9._~-]{0,12}",
        "(%[0-9A-Fa-f]{2}|%[G-Z]{2}|é|\\.\\.|[a-z]){0,8}",
    ];
    let path = prop::collection::vec(segment, 0..5).prop_map(|parts| format!("/{}", parts.join("/")));
    let query = prop::option::of(prop_oneof![
        "(limit|cursor|x)=[0-9a-fA-F%é+;=&]{0,24}",
        "((limit|cursor)=[0-9a-f]{0,6}&){1,4}",
        "[ -~]{0,40}",
    ]);
    let header = ("x-[a-z-]{1,10}|content-type|content-length|traceparent|accept", "[ -~]{0,40}");
    let headers = prop::collection::vec(header, 0..4);
    let body = prop::collection::vec(any::<u8>(), 0..64);
    (method, path, query, headers, body).prop_map(|(method, path, query, headers, body)| Probe {
        method,
        path,
        query,
        headers,
        body,
    })
}

async fn check(fleet: &TestFleet, client: &reqwest::Client, p: Probe) -> Result<(), TestCaseError> {
    let mut url = format!("{}{}", fleet.base_url, p.path);
    if let Some(q) = &p.query {
        url.push('?');
        url.push_str(q);
    }
    let Ok(url) = reqwest::Url::parse(&url) else { return Ok(()) };
    let (k, v) = fleet.key_header();
    let mut req = client.request(p.method.parse().unwrap(), url).header(k, v).body(p.body.clone());
    for (name, value) in &p.headers {
        req = req.header(name.as_str(), value.as_str());
    }
    let Ok(req) = req.build() else { return Ok(()) };
    let resp = client.execute(req).await.map_err(|e| TestCaseError::fail(format!("no answer: {e}")))?;
    let status = resp.status();
    prop_assert!(status != 500, "500 for {p:?}");
    if !resp.headers().contains_key("x-request-id") {
        // HTTP that hyper cannot parse (a bad content-length, say) is refused by hyper itself
        // before there is a request to route: a bare 400 and the connection closed
        prop_assert!(status == 400 || status == 431, "{status} without a request id for {p:?}");
        return Ok(());
    }
    if status.is_client_error() && p.method != "HEAD" {
        let body: serde_json::Value =
            resp.json().await.map_err(|e| TestCaseError::fail(format!("{status} without JSON for {p:?}: {e}")))?;
        prop_assert!(body["error"].is_string() && body["message"].is_string(), "{status} {body} for {p:?}");
    }
    Ok(())
}

#[test]
fn no_request_panics_the_gateway_and_every_4xx_is_json() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let fleet = rt.block_on(TestFleet::spawn_local());
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let known = rt.block_on(fleet.upload(txpipe_tests::valid_csv("fz", 3))).file_id.to_string();
    let mut runner = TestRunner::new(Config { cases: CASES, failure_persistence: None, ..Config::default() });
    let result = runner.run(&probe(known), |p| rt.block_on(check(&fleet, &client, p)));
    rt.block_on(fleet.shutdown());
    result.unwrap();
}
