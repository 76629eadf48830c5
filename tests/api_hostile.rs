//! Hostile input at the HTTP edge, over real HTTP against a testnet of scripted miners:
//! - a table of the named edge cases (oversized prompt, invalid UTF-8, huge `max_tokens`,
//!   NaN / infinite / negative sampling values, unknown sessions and models...) on both the
//!   router API and the OpenAI-compatible one, each a 4xx with a JSON error `code`;
//! - property tests: arbitrary JSON values, field-shaped objects and arbitrary bytes posted to
//!   every POST route (never a 5xx; a 4xx always carries a JSON error code; the server still
//!   answers afterwards), and arbitrary text and binary frames on the WebSocket (an error
//!   frame or a close, never silence or a dead server).
//!
//! The property tests use a fixed seed (printed; `CORTENSOR_PROPTEST_SEED` overrides it) so
//! a failure replays; proptest prints the smallest failing input.

mod common;

use common::{scripted, Net};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;

/// Small, so an oversized prompt is cheap to send.
const MAX_BODY: usize = 16 * 1024;
const DEFAULT_SEED: u64 = 0x5eed_1e55;

fn net() -> (Net, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let overlay = format!(
        "nodes.miners = 2\nnodes.probes_required = 0\nrouter.max_body_bytes = {MAX_BODY}\n\
         router.api_keys = [\"alice\", \"bob\"]\nqueue.ack_timeout_ms = 500"
    );
    (
        scripted(&overlay, HashMap::new(), HashMap::new(), dir.path()),
        dir,
    )
}

fn seed() -> u64 {
    let seed = std::env::var("CORTENSOR_PROPTEST_SEED")
        .ok()
        .map(|s| s.parse().expect("CORTENSOR_PROPTEST_SEED is a number"))
        .unwrap_or(DEFAULT_SEED);
    println!("proptest seed {seed} (set CORTENSOR_PROPTEST_SEED to replay another)");
    seed
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        rng_seed: RngSeed::Fixed(seed()),
        failure_persistence: None,
        // Each case is an HTTP round trip: shrinking stays bounded.
        max_shrink_iters: 256,
        ..Config::default()
    })
}

/// One request of the table.
struct Req {
    method: &'static str,
    path: String,
    body: Option<Vec<u8>>,
    headers: Vec<(&'static str, String)>,
}

fn get(path: &str) -> Req {
    Req {
        method: "GET",
        path: path.into(),
        body: None,
        headers: vec![],
    }
}

/// A POST whose body is `text` as it is: it may be invalid JSON (NaN) or invalid UTF-8.
fn raw(path: &str, text: impl Into<Vec<u8>>) -> Req {
    Req {
        method: "POST",
        path: path.into(),
        body: Some(text.into()),
        headers: vec![],
    }
}

/// `text` with every `#` made a byte that is never valid UTF-8.
fn invalid_utf8(text: &str) -> Vec<u8> {
    text.bytes()
        .map(|b| if b == b'#' { 0xff } else { b })
        .collect()
}

fn post(path: &str, body: Value) -> Req {
    raw(path, body.to_string())
}

impl Req {
    fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.push((name, value.into()));
        self
    }
    fn method(mut self, method: &'static str) -> Self {
        self.method = method;
        self
    }
}

/// Sends `req` as alice; returns the status, the body as JSON (Null if it is not) and the
/// headers.
fn send(net: &Net, req: &Req) -> (u16, Value, reqwest::header::HeaderMap) {
    let method = reqwest::Method::from_bytes(req.method.as_bytes()).unwrap();
    let mut r = net
        .http
        .request(method, net.url(&req.path))
        .bearer_auth("alice");
    if let Some(b) = &req.body {
        r = r.header("Content-Type", "application/json").body(b.clone());
    }
    for (k, v) in &req.headers {
        r = r.header(*k, v.as_str());
    }
    let response = r.send().expect("the server answers");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.bytes().unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        headers,
    )
}

/// One edge case: `req` must get `status` with the error `code`, as JSON.
fn check(net: &Net, req: Req, status: u16, code: &str) {
    let (got, v, _) = send(net, &req);
    let shown = req
        .body
        .as_ref()
        .map(|b| String::from_utf8_lossy(&b[..b.len().min(200)]).into_owned());
    assert_eq!(
        (
            got,
            v["error"]["code"]
                .as_str()
                .unwrap_or("(no JSON error code)")
        ),
        (status, code),
        "{} {} {shown:?}: {v}",
        req.method,
        req.path
    );
    assert!(
        !v["error"]["message"].as_str().unwrap_or("").is_empty(),
        "{v}"
    );
}

#[test]
#[rustfmt::skip] // the table: one case a line
fn the_named_edge_cases_get_a_4xx_with_a_json_error_code() {
    let (net, _dir) = net();
    let sid = net.testnet.default_session; // alice's default session
    let balance = net.session_view(sid)["balance"].clone();
    let c = "/api/v1/completions";
    let cs = &format!("/api/v1/completions/{sid}");
    let chat = "/v1/chat/completions";
    let oc = "/v1/completions";
    let m = "scripted-echo";
    let big = "x".repeat(MAX_BODY + 1);
    // Deeper than serde_json's recursion limit (128), within the body limit.
    let nested = format!("{}1{}", "[".repeat(5_000), "]".repeat(5_000));
    let u64_max = u64::MAX.to_string();
    let past_u64 = "18446744073709551616";
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let (bad, invalid, too_large) = (400, "invalid_request", 413);

    // The router API.
    check(&net, post(c, json!({"prompt": big})), too_large, "payload_too_large");
    check(&net, raw(c, b"{\"prompt\": \"\xff\xfe\xfd\"}".to_vec()), bad, invalid);
    check(&net, raw(c, b"\xc3\x28".to_vec()), bad, invalid);
    check(&net, raw(c, nested.clone()), bad, invalid);
    check(&net, raw(c, ""), bad, invalid);
    check(&net, raw(c, "null"), bad, invalid);
    check(&net, raw(c, "[\"x\"]"), bad, invalid);
    check(&net, post(c, json!({"prompt": "x", "max_tokens": 1e12})), bad, invalid);
    check(&net, post(c, json!({"prompt": "x", "max_tokens": 1_000_000_000_000u64})), bad, invalid);
    check(&net, raw(c, format!("{{\"prompt\":\"x\",\"max_tokens\":{u64_max}}}")), bad, invalid);
    check(&net, raw(c, format!("{{\"prompt\":\"x\",\"max_tokens\":{past_u64}}}")), bad, invalid);
    check(&net, post(c, json!({"prompt": "x", "max_tokens": -1})), bad, invalid);
    check(&net, raw(c, "{\"prompt\":\"x\",\"temperature\":NaN}"), bad, invalid);
    check(&net, raw(c, "{\"prompt\":\"x\",\"temperature\":Infinity}"), bad, invalid);
    check(&net, raw(c, "{\"prompt\":\"x\",\"temperature\":-Infinity}"), bad, invalid);
    check(&net, raw(c, "{\"prompt\":\"x\",\"temperature\":1e999}"), bad, invalid);
    check(&net, post(c, json!({"prompt": "x", "temperature": "NaN"})), bad, invalid);
    check(&net, post(c, json!({"prompt": "x", "temperature": -0.5})), bad, invalid);
    check(&net, post(c, json!({"prompt": "x", "temperature": 2.0000000000000004})), bad, invalid);
    check(&net, post(c, json!({"prompt": "x", "top_p": 0})), bad, invalid);
    check(&net, post(c, json!({"prompt": "x", "top_p": -1})), bad, invalid);
    check(&net, post(c, json!({"prompt": "x", "top_p": 1.5})), bad, invalid);
    check(&net, raw(c, "{\"prompt\":\"x\",\"top_p\":NaN}"), bad, invalid);
    check(&net, post(c, json!({"prompt": "x", "top_k": -1})), bad, invalid);
    check(&net, post(c, json!({"prompt": "x", "top_k": 1.5})), bad, invalid);
    check(&net, post(c, json!({"prompt": "x", "presence_penalty": 2.5})), bad, invalid);
    check(&net, post(c, json!({"prompt": "x", "frequency_penalty": -3})), bad, invalid);
    check(&net, raw(c, "{\"prompt\":\"x\",\"frequency_penalty\":NaN}"), bad, invalid);
    // The engines refuse repeat_penalty 0: it used to fail on every miner (a 502).
    check(&net, post(c, json!({"prompt": "x", "repeat_penalty": 0})), bad, invalid);
    check(&net, post(c, json!({"prompt": "x", "repeat_penalty": -1})), bad, invalid);
    check(&net, post(c, json!({"prompt": "x", "timeout": 0.001})), bad, invalid);
    check(&net, post(c, json!({"prompt": "x", "timeout": 1e300})), bad, invalid);
    check(&net, raw(c, "{\"prompt\":\"x\",\"precommit_timeout\":NaN}"), bad, invalid);
    check(&net, post(c, json!({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]})), bad, invalid);
    check(&net, post(c, json!({"prompt": "x", "prompt_type": 256})), bad, invalid);
    check(&net, post(c, json!({"prompt": "   "})), bad, invalid);
    check(&net, post(c, json!({"prompt": 5})), bad, invalid);
    check(&net, post(c, json!({"session_id": 987_654, "prompt": "x"})), 404, "session_not_found");
    check(&net, post(c, json!({"session_id": " 1", "prompt": "x"})), bad, invalid);
    check(&net, raw(c, format!("{{\"session_id\":{past_u64},\"prompt\":\"x\"}}")), bad, invalid);
    check(&net, post("/api/v1/completions/987654", json!({"prompt": "x"})), 404, "session_not_found");
    check(&net, post(&format!("/api/v1/completions/{past_u64}"), json!({"prompt": "x"})), bad, invalid);
    check(&net, post(cs, json!({"prompt": "x", "temperature": -1})), bad, invalid);
    check(&net, get("/api/v1/tasks/987654/1"), 404, "task_not_found");
    check(&net, get("/api/v1/tasks/987654"), 404, "session_not_found");
    check(&net, get(&format!("/api/v1/tasks/{sid}/-1")), bad, invalid);
    check(&net, get(&format!("/api/v1/tasks/{sid}?limit=-1")), bad, invalid);
    check(&net, post(c, json!({"prompt": "x"})).method("PUT"), 405, "method_not_allowed");
    check(&net, get("/api/v1/ws"), bad, invalid);
    // Sessions: an unknown model, out-of-range numbers, a reservation that overflowed the clock.
    let s = "/api/v1/sessions";
    check(&net, post(s, json!({"model_identifier": 7})), bad, invalid);
    check(&net, post(s, json!({"reserve_period": u64::MAX})), bad, invalid);
    check(&net, post(s, json!({"deposit": -1})), bad, invalid);
    check(&net, post(s, json!({"poi_threshold": 0})), bad, invalid);
    check(&net, raw(s, "{\"judge_threshold\":NaN}"), bad, invalid);
    check(&net, post(s, json!({"name": "n".repeat(257)})), bad, invalid);
    check(&net, post(s, json!({"max_num_of_nodes": 17})), bad, invalid);
    check(&net, raw(s, "[1, 2]"), bad, invalid);
    check(&net, post("/api/v1/sessions/987654/nodes", json!({"node": "miner-1"})), 404, "session_not_found");
    // Validation requests.
    let v = "/api/v1/validate";
    check(&net, raw(v, "{\"task_request_input\":\"q\",\"temperature\":NaN}"), bad, invalid);
    check(&net, post(v, json!({"task_request_input": "q", "temperature": 101})), bad, invalid);
    check(&net, post(v, json!({"task_request_input": "q", "top_p": 0})), bad, invalid);
    check(&net, post(v, json!({"task_request_input": "q", "judge_threshold": 10.000000000000002})), bad, invalid);
    check(&net, post(v, json!({"task_request_input": "q", "task_result_output": vec!["a"; 17]})), bad, invalid);
    check(&net, raw(v, "[null, null]"), bad, invalid);

    // The OpenAI-compatible API.
    for p in [chat, oc] {
        let body = |extra: Value| {
            let mut b = if p == chat {
                json!({"model": m, "messages": msgs})
            } else {
                json!({"model": m, "prompt": "hi"})
            };
            for (k, v) in extra.as_object().unwrap() {
                b[k] = v.clone();
            }
            b
        };
        let with = |extra: &str| {
            let b = body(json!({})).to_string();
            format!("{},{extra}}}", &b[..b.len() - 1])
        };
        check(&net, post(p, body(json!({"prompt": big, "messages": [{"role": "user", "content": big}]}))), too_large, "payload_too_large");
        check(&net, raw(p, invalid_utf8(&with("\"user\":\"#\""))), bad, invalid);
        check(&net, raw(p, nested.clone()), bad, invalid);
        check(&net, post(p, body(json!({"max_tokens": 1e12}))), bad, invalid);
        check(&net, post(p, body(json!({"max_tokens": 1_000_000_000_000u64}))), bad, invalid);
        check(&net, raw(p, with(&format!("\"max_tokens\":{u64_max}"))), bad, invalid);
        check(&net, raw(p, with(&format!("\"max_completion_tokens\":{u64_max}"))), bad, invalid);
        check(&net, raw(p, with(&format!("\"max_tokens\":{past_u64}"))), bad, invalid);
        check(&net, raw(p, with("\"temperature\":NaN")), bad, invalid);
        check(&net, raw(p, with("\"temperature\":Infinity")), bad, invalid);
        check(&net, post(p, body(json!({"temperature": -1}))), bad, invalid);
        check(&net, post(p, body(json!({"temperature": 3}))), bad, invalid);
        check(&net, post(p, body(json!({"top_p": 0}))), bad, invalid);
        check(&net, raw(p, with("\"top_p\":-Infinity")), bad, invalid);
        check(&net, post(p, body(json!({"top_k": -5}))), bad, invalid);
        check(&net, post(p, body(json!({"presence_penalty": -2.5}))), bad, invalid);
        check(&net, raw(p, with("\"frequency_penalty\":NaN")), bad, invalid);
        check(&net, post(p, body(json!({"repeat_penalty": 0}))), bad, invalid);
        check(&net, post(p, body(json!({"seed": -1}))), bad, invalid);
        check(&net, post(p, body(json!({"n": 0}))), bad, invalid);
        check(&net, post(p, body(json!({"n": 17}))), bad, invalid);
        check(&net, post(p, body(json!({"n": 17, "stream": true}))), bad, invalid);
        check(&net, post(p, body(json!({"model": "gpt-4"}))), 404, "model_not_found");
        check(&net, post(p, body(json!({}))).header("X-Cortensor-Session", "987654"), 404, "session_not_found");
        check(&net, post(p, body(json!({}))).header("X-Cortensor-Session", "abc"), bad, invalid);
        check(&net, post(p, body(json!({}))).header("X-Cortensor-Session", past_u64), bad, invalid);
        check(&net, raw(p, "[]"), bad, invalid);
    }
    check(&net, post(chat, json!({"model": m, "messages": [{"role": "tool", "content": "x"}]})), bad, invalid);
    check(&net, post(chat, json!({"model": m, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]})), bad, invalid);
    check(&net, post(chat, json!({"model": m, "messages": []})), bad, invalid);
    check(&net, post(oc, json!({"model": m, "prompt": ""})), bad, invalid);
    check(&net, post(oc, json!({"model": m, "prompt": ["a", ""]})), bad, invalid);
    check(&net, get("/v1/models/gpt-4"), 404, "model_not_found");
    check(&net, get("/v1/models").method("DELETE"), 405, "method_not_allowed");

    // A 405 names what the path serves.
    let (_, _, headers) = send(&net, &get("/api/v1/sessions").method("PATCH"));
    assert_eq!(headers["allow"], "GET, POST");
    // Listing past the last possible task id used to overflow (a panic in the handler).
    let (status, v, _) = send(&net, &get(&format!("/api/v1/tasks/{sid}?after={u64_max}")));
    assert_eq!((status, &v["count"]), (200, &json!(0)), "{v}");
    // Nothing above was charged, and the network still serves a good request.
    assert_eq!(net.session_view(sid)["balance"], balance);
    let (status, v, _) = send(
        &net,
        &post(c, json!({"prompt": "still alive", "max_tokens": 4})),
    );
    assert_eq!(status, 200, "{v}");
    let (status, v, _) = send(
        &net,
        &post(chat, json!({"model": m, "messages": msgs, "max_tokens": 4})),
    );
    assert_eq!(status, 200, "{v}");
}

/// Field names the request bodies use, so generated objects reach past the first check.
const FIELDS: &[&str] = &[
    "prompt",
    "session_id",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "presence_penalty",
    "frequency_penalty",
    "repeat_penalty",
    "seed",
    "stop",
    "stream",
    "timeout",
    "precommit_timeout",
    "prompt_type",
    "prompt_template",
    "model",
    "messages",
    "n",
    "stream_options",
    "node",
    "name",
    "redundant",
    "max_num_of_nodes",
    "mode",
    "reserve_period",
    "deposit",
    "validation",
    "task_request_input",
    "task_result_output",
    "evaluation_mode",
    "num_of_validator_nodes",
    "poi_threshold",
    "judge_threshold",
    "role",
    "content",
    "type",
    "text",
    "task_id",
    "id",
];

/// Leaves: the values that break parsers (huge and tiny numbers, odd strings).
fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        prop::sample::select(vec![
            json!(0),
            json!(1),
            json!(-1),
            json!(2),
            json!(1e12),
            json!(u64::MAX),
            json!(-0.0),
            json!(0.5),
            json!(1.0000000000000002),
            json!(1e308),
            json!(5e-324),
            json!(""),
            json!("1"),
            json!("NaN"),
            json!("\u{0}"),
            json!("\u{feff}"),
            json!("scripted-echo"),
            json!("user"),
            json!("text"),
            json!("miner-1"),
            json!("exact"),
            json!(["a"]),
        ]),
        ".{0,40}".prop_map(Value::String),
    ]
}

/// Arbitrary JSON, objects keyed mostly by the API's own field names.
fn json_value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 48, 8, |inner| {
        let key = prop_oneof![
            4 => prop::sample::select(FIELDS).prop_map(str::to_string),
            1 => ".{0,8}",
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key, inner), 0..8)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Every POST route, its ids made real (session 1 is alice's default, task 1 exists).
fn post_paths() -> Vec<String> {
    let mut routes = Vec::new();
    let _ = actix_web::App::new().configure(|cfg| routes = cortensor::api::register_routes(cfg));
    let paths: Vec<String> = routes
        .into_iter()
        .filter(|r| r.method == "POST")
        .map(|r| {
            r.path
                .replace("{sid}", "1")
                .replace("{id}", "1")
                .replace("{tid}", "1")
        })
        .collect();
    assert!(paths.len() >= 8, "{paths:?}");
    paths
}

/// What every answer must be: no server error; an error is JSON with a code.
fn judge(path: &str, status: u16, v: &Value, body: &[u8]) -> Result<(), TestCaseError> {
    let shown = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
    prop_assert!(status < 500, "{status} from POST {path} {shown}: {v}");
    if status >= 400 {
        let code = v["error"]["code"].as_str().unwrap_or("");
        prop_assert!(
            !code.is_empty(),
            "{status} without a JSON code from POST {path} {shown}: {v}"
        );
    }
    Ok(())
}

fn post_bytes(net: &Net, path: &str, body: &[u8]) -> (u16, Value) {
    let response = net
        .http
        .post(net.url(path))
        .bearer_auth("alice")
        .header("Content-Type", "application/json")
        .body(body.to_vec())
        .send()
        .expect("the server answers");
    let status = response.status().as_u16();
    let bytes = response.bytes().unwrap();
    // A streamed success is server-sent events, not JSON.
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Cases per property (each posted to every POST route): seconds on 2 cores.
const JSON_CASES: u32 = 500;
const BYTES_CASES: u32 = 300;
const FRAME_CASES: u32 = 500;

#[test]
fn arbitrary_json_and_bytes_on_every_post_route_never_get_a_server_error() {
    let (net, _dir) = net();
    let (status, v) = post_bytes(&net, "/api/v1/completions", br#"{"prompt": "task one"}"#);
    assert_eq!(status, 200, "{v}");
    let paths = post_paths();
    let mut requests = 0u64;
    // Statuses seen, so the test can tell that the inputs reached past the first check.
    let statuses = std::cell::RefCell::new(std::collections::BTreeMap::<u16, u64>::new());

    let mut json_runner = runner(JSON_CASES);
    json_runner
        .run(&json_value(), |value| {
            let body = value.to_string();
            for path in &paths {
                let (status, v) = post_bytes(&net, path, body.as_bytes());
                *statuses.borrow_mut().entry(status).or_default() += 1;
                judge(path, status, &v, body.as_bytes())?;
            }
            Ok(())
        })
        .unwrap();
    requests += JSON_CASES as u64 * paths.len() as u64;

    // Bytes: random ones, and JSON with a byte cut out or flipped (mostly invalid, some of it
    // invalid UTF-8 inside strings).
    let bytes = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        (json_value(), any::<prop::sample::Index>(), any::<u8>()).prop_map(|(v, at, b)| {
            let mut s = v.to_string().into_bytes();
            let i = at.index(s.len());
            s[i] = b;
            s
        }),
    ];
    let mut bytes_runner = runner(BYTES_CASES);
    bytes_runner
        .run(&bytes, |body| {
            for path in &paths {
                let (status, v) = post_bytes(&net, path, &body);
                judge(path, status, &v, &body)?;
            }
            Ok(())
        })
        .unwrap();
    requests += BYTES_CASES as u64 * paths.len() as u64;
    let statuses = statuses.into_inner();
    println!(
        "{requests} requests on {} POST routes; JSON ones by status: {statuses:?}",
        paths.len()
    );
    // Arbitrary objects must reach the handlers: some succeed (a completion, a session, a
    // validation, a cancel), not only refusals.
    let ok: u64 = statuses.range(200..300).map(|(_, n)| n).sum();
    assert!(
        ok * 100 >= JSON_CASES as u64 * paths.len() as u64,
        "{statuses:?}"
    );
    assert!(statuses.contains_key(&400), "{statuses:?}");

    // Still serving.
    let (status, v) = post_bytes(
        &net,
        "/api/v1/completions",
        br#"{"prompt": "after", "max_tokens": 3}"#,
    );
    assert_eq!(status, 200, "{v}");
    let (status, _) = net.get("/api/v1/status");
    assert_eq!(status, 200);
}

type Socket = tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>;

fn connect(net: &Net) -> Socket {
    let url = format!(
        "{}/api/v1/ws?token=alice",
        net.testnet.url.replacen("http://", "ws://", 1)
    );
    let (ws, _) = tungstenite::connect(url).expect("the WebSocket opens");
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    }
    ws
}

/// Sends a ping with a fresh id and reads until its pong: every frame on the way must be a
/// JSON event with a type, and an error event must carry a code. Returns the events seen
/// (pongs for other pings among them).
fn until_pong(ws: &mut Socket) -> Result<Vec<Value>, String> {
    static PINGS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let id = format!(
        "probe-{}",
        PINGS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    ws.send(tungstenite::Message::Text(
        json!({"type": "ping", "id": id}).to_string(),
    ))
    .map_err(|e| format!("send ping: {e}"))?;
    let mut seen = Vec::new();
    loop {
        let message = ws.read().map_err(|e| format!("read: {e} after {seen:?}"))?;
        let text = match message {
            tungstenite::Message::Text(t) => t,
            tungstenite::Message::Ping(_) | tungstenite::Message::Pong(_) => continue,
            other => return Err(format!("unexpected frame {other:?} after {seen:?}")),
        };
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
        let kind = v["type"]
            .as_str()
            .ok_or(format!("no type: {v}"))?
            .to_string();
        if kind == "error" && v["error"]["code"].as_str().unwrap_or("").is_empty() {
            return Err(format!("an error event without a code: {v}"));
        }
        if kind == "pong" && v["id"] == id.as_str() {
            return Ok(seen);
        }
        seen.push(v);
    }
}

#[test]
fn arbitrary_websocket_frames_get_an_error_or_a_close_and_the_server_lives() {
    let (net, _dir) = net();
    let frame = prop_oneof![
        3 => json_value().prop_map(|v| (true, v.to_string().into_bytes())),
        2 => json_value().prop_map(|mut v| {
            // A message of a known type with arbitrary fields.
            let kind = ["submit", "cancel", "ping", "nonsense"][v.to_string().len() % 4];
            if !v.is_object() {
                v = json!({"prompt": v});
            }
            v["type"] = json!(kind);
            (true, v.to_string().into_bytes())
        }),
        1 => ".{0,64}".prop_map(|s: String| (true, s.into_bytes())),
        1 => prop::collection::vec(any::<u8>(), 0..128).prop_map(|b| (false, b)),
    ];
    let ws = std::cell::RefCell::new(connect(&net));
    let (frames, errors) = (std::cell::Cell::new(0u32), std::cell::Cell::new(0u32));
    runner(FRAME_CASES)
        .run(&frame, |(text, bytes)| {
            let message = if text {
                tungstenite::Message::Text(String::from_utf8(bytes).unwrap())
            } else {
                tungstenite::Message::Binary(bytes)
            };
            let binary = !text;
            let mut ws = ws.borrow_mut();
            ws.send(message)
                .map_err(|e| TestCaseError::fail(format!("send: {e}")))?;
            let seen = until_pong(&mut ws).map_err(TestCaseError::fail)?;
            // Nothing is silently dropped: a frame that is not a valid request gets an error.
            if binary {
                prop_assert!(seen.iter().any(|e| e["type"] == "error"), "{seen:?}");
            }
            frames.set(frames.get() + 1);
            errors.set(errors.get() + seen.iter().filter(|e| e["type"] == "error").count() as u32);
            Ok(())
        })
        .unwrap();
    println!("{} frames, {} error events", frames.get(), errors.get());
    assert!(errors.get() > 0);

    // Frames the protocol itself refuses close the connection: over 1 MiB, invalid UTF-8 in
    // a text frame. The server goes on serving new connections.
    let too_big = "x".repeat(cortensor::api::ws::MAX_MESSAGE_BYTES + 1);
    for bad in [
        tungstenite::Message::Text(too_big),
        tungstenite::Message::Frame(tungstenite::protocol::frame::Frame::message(
            vec![0xff, 0xfe, 0x22],
            tungstenite::protocol::frame::coding::OpCode::Data(
                tungstenite::protocol::frame::coding::Data::Text,
            ),
            true,
        )),
    ] {
        let mut ws = connect(&net);
        let _ = ws.send(bad);
        let closed = loop {
            match ws.read() {
                Ok(tungstenite::Message::Close(_)) | Err(_) => break true,
                Ok(tungstenite::Message::Text(t)) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    assert_eq!(v["type"], "error", "{v}");
                }
                Ok(_) => {}
            }
        };
        assert!(closed);
        let mut fresh = connect(&net);
        until_pong(&mut fresh).unwrap();
    }
    let (status, _) = net.get("/api/v1/status");
    assert_eq!(status, 200);
}
