//! The OpenAPI document (`GET /openapi.json`, `src/api/openapi.json`) against the code: every
//! registered route is documented and every documented route registered; no route bypasses
//! the route table; the error codes, the session fields and the limits it states are the
//! code's. Schemathesis then checks the live server against it (`tests/api_schemathesis.rs`).

use actix_web::App;
use cortensor::api::completion::{
    MAX_STOP_STRINGS, PENALTY_RANGE, REPEAT_PENALTY_MAX, SECONDS_RANGE, TEMPERATURE_MAX,
};
use cortensor::api::openai::MAX_SUBTASKS;
use cortensor::api::openapi::DOCUMENT;
use cortensor::api::routes::Route;
use cortensor::session::{
    Session, SessionParams, MAX_METADATA_BYTES, MAX_NAME_BYTES, MAX_NODES_PER_SESSION,
    MAX_RESERVE_PERIOD_S,
};
use serde_json::Value;
use std::collections::BTreeSet;

fn document() -> Value {
    serde_json::from_str(DOCUMENT).expect("openapi.json is JSON")
}

/// What the server registers, through the same function `serve` uses.
fn registered() -> Vec<Route> {
    let mut routes = Vec::new();
    let _ = App::new().configure(|cfg| routes = cortensor::api::register_routes(cfg));
    routes
}

fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().unwrap().keys() {
            if ["get", "post", "put", "patch", "delete", "head", "options"]
                .contains(&method.as_str())
            {
                out.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    out
}

#[test]
fn every_route_is_documented_and_every_documented_route_is_served() {
    let doc = document();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.0."));
    let served: BTreeSet<(String, String)> = registered()
        .into_iter()
        .map(|r| (r.method.to_string(), r.path.to_string()))
        .collect();
    assert!(
        served.len() >= 20,
        "the route table looks empty: {served:?}"
    );
    let documented = documented(&doc);
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty(),
        "served but missing from src/api/openapi.json: {undocumented:?}"
    );
    assert!(
        unserved.is_empty(),
        "documented but not served: {unserved:?}"
    );
    // Path parameters are declared where the path has them.
    for (method, path) in &documented {
        let op = &doc["paths"][path][method.to_lowercase()];
        let declared: BTreeSet<String> = op["parameters"]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .filter(|p| p["in"] == "path")
                    .map(|p| p["name"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default();
        let in_path: BTreeSet<String> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(str::to_string)
            .collect();
        assert_eq!(declared, in_path, "{method} {path}");
        assert!(
            op["operationId"].is_string(),
            "{method} {path} has no operationId"
        );
    }
}

/// Every route must go through the table (`src/api/routes.rs`): a route registered with actix
/// directly would be served and never checked against the document.
#[test]
fn no_route_bypasses_the_route_table() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/api");
    let mut files = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if !name.ends_with(".rs") || name == "routes.rs" {
            continue;
        }
        files += 1;
        let text = std::fs::read_to_string(&path).unwrap();
        for needle in [
            "web::get()",
            "web::post()",
            "web::put()",
            "web::delete()",
            "web::resource(",
            "web::scope(",
            ".route(",
            ".service(",
        ] {
            assert!(
                !text.contains(needle),
                "src/api/{name} registers a route itself ({needle}); add it through routes::Routes"
            );
        }
    }
    assert!(files >= 10, "read only {files} files under {dir}");
}

/// The `code` enum of the error body holds every code the server can send.
#[test]
fn every_error_code_is_documented() {
    let doc = document();
    let enum_codes: BTreeSet<String> = doc["components"]["schemas"]["Error"]["properties"]["error"]
        ["properties"]["code"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    // Codes in the source: the fixed ones in ApiError::code, the first argument of every
    // `NotFound(`, and the `("task_...", StatusCode` pairs of task_error.
    let source = |name: &str| {
        std::fs::read_to_string(format!("{}/src/api/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    };
    let literal_after = |text: &str, marker: &str| -> Vec<String> {
        text.match_indices(marker)
            .filter_map(|(i, _)| {
                let rest = text[i + marker.len()..].trim_start().strip_prefix('"')?;
                Some(rest.split('"').next()?.to_string())
            })
            .collect()
    };
    let mut found = BTreeSet::new();
    let error_rs = source("error.rs");
    let code_fn =
        &error_rs[error_rs.find("pub fn code(").unwrap()..error_rs.find("fn kind(").unwrap()];
    found.extend(literal_after(code_fn, "=>"));
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/src/api")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".rs") {
            found.extend(literal_after(&source(&name), "NotFound("));
        }
    }
    found.extend(
        literal_after(&source("completion.rs"), "=> (")
            .into_iter()
            .filter(|c| c.starts_with("task_")),
    );
    for must in [
        "session_not_found",
        "model_not_found",
        "task_timeout",
        "method_not_allowed",
        "unauthorized",
        "internal_error",
    ] {
        assert!(found.contains(must), "the scan missed {must}: {found:?}");
    }
    let missing: Vec<_> = found.difference(&enum_codes).collect();
    assert!(
        missing.is_empty(),
        "codes the server sends that the document lacks: {missing:?}"
    );
}

fn schema<'a>(doc: &'a Value, name: &str) -> &'a Value {
    &doc["components"]["schemas"][name]
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

/// Session fields: the request's are SessionParams' plus `deposit`; the view's are what
/// `views::session` writes.
#[test]
fn session_fields_match_the_code() {
    let doc = document();
    let mut create = keys(&serde_json::to_value(SessionParams::default()).unwrap());
    create.insert("deposit".into());
    assert_eq!(keys(&schema(&doc, "SessionCreate")["properties"]), create);
    let session = Session {
        id: 1,
        owner: "o".into(),
        params: SessionParams::default(),
        created_at_ms: 0,
        deposit: 0,
        balance: 0,
        held: 0,
        spent: 0,
        tasks_submitted: 0,
    };
    let view = cortensor::api::views::session(&session);
    assert_eq!(keys(&schema(&doc, "Session")["properties"]), keys(&view));
}

/// The limits the document states are the code's.
#[test]
fn stated_limits_are_the_codes() {
    let doc = document();
    let create = &schema(&doc, "SessionCreate")["properties"];
    let n = MAX_NODES_PER_SESSION as u64;
    for field in [
        "min_num_of_nodes",
        "max_num_of_nodes",
        "redundant",
        "num_of_validator_nodes",
    ] {
        assert_eq!(create[field]["maximum"].as_u64(), Some(n), "{field}");
    }
    assert_eq!(
        create["reserve_period"]["maximum"].as_u64(),
        Some(MAX_RESERVE_PERIOD_S)
    );
    assert_eq!(
        create["name"]["maxLength"].as_u64(),
        Some(MAX_NAME_BYTES as u64)
    );
    assert_eq!(
        create["metadata"]["maxLength"].as_u64(),
        Some(MAX_METADATA_BYTES as u64)
    );

    let completion = &schema(&doc, "CompletionRequest")["properties"];
    let openai = &schema(&doc, "OpenAICommon")["properties"];
    for props in [completion, openai] {
        assert_eq!(
            props["stop"]["oneOf"][1]["maxItems"].as_u64(),
            Some(MAX_STOP_STRINGS as u64)
        );
        assert_eq!(
            props["temperature"]["maximum"].as_f64(),
            Some(TEMPERATURE_MAX)
        );
        for p in ["presence_penalty", "frequency_penalty"] {
            assert_eq!(props[p]["minimum"].as_f64(), Some(PENALTY_RANGE.0), "{p}");
            assert_eq!(props[p]["maximum"].as_f64(), Some(PENALTY_RANGE.1), "{p}");
        }
        assert_eq!(
            props["repeat_penalty"]["maximum"].as_f64(),
            Some(REPEAT_PENALTY_MAX)
        );
        assert_eq!(props["top_p"]["exclusiveMinimum"], true);
    }
    // Batched prompts and `n` choices: as many choices come back as were asked for.
    let subtasks = Some(MAX_SUBTASKS as u64);
    assert_eq!(openai["n"]["maximum"].as_u64(), subtasks);
    let openai_completion = &schema(&doc, "CompletionRequestOpenAI")["allOf"][1]["properties"];
    assert_eq!(
        openai_completion["prompt"]["oneOf"][1]["maxItems"].as_u64(),
        subtasks
    );
    for response in ["ChatCompletion", "TextCompletion"] {
        let choices = &schema(&doc, response)["properties"]["choices"];
        assert_eq!(choices["maxItems"].as_u64(), subtasks, "{response}");
    }
    for field in ["timeout", "precommit_timeout"] {
        assert_eq!(
            completion[field]["minimum"].as_f64(),
            Some(SECONDS_RANGE.0),
            "{field}"
        );
        assert_eq!(
            completion[field]["maximum"].as_f64(),
            Some(SECONDS_RANGE.1),
            "{field}"
        );
    }
}
