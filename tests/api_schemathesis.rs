//! schemathesis (pinned, installed by scripts/setup) against the server's own `/openapi.json`,
//! on a testnet of scripted miners: every operation gets generated valid and invalid requests
//! (examples, boundary coverage, fuzzing), and no response may be a server error, carry a
//! status, content type or header the document does not list, or a body its schema refuses.
//! The hypothesis seed is fixed (printed; `SCHEMATHESIS_SEED` overrides it) so a failure
//! replays.

mod common;

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Examples per operation in the fuzzing phase (the coverage phase adds its boundary cases).
const MAX_EXAMPLES: u32 = 100;
/// The run must end well within this (it takes about a minute on 2 cores).
const LIMIT: Duration = Duration::from_secs(240);
const DEFAULT_SEED: u64 = 20_260_101;

fn schemathesis() -> PathBuf {
    let home = std::env::var_os("CORTENSOR_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/cortensor"));
    let bin = home.join("venv-clients/bin/schemathesis");
    assert!(
        bin.exists(),
        "{} is missing: run scripts/setup (it installs schemathesis)",
        bin.display()
    );
    bin
}

#[test]
fn schemathesis_finds_no_server_error_and_no_schema_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    // Two scripted miners that join at once; a session's default deposit covers every
    // completion schemathesis sends. A task that finds no free miner (schemathesis reserves
    // them with the sessions it creates) gives up after the ack timeout: kept short.
    let net = common::scripted(
        "nodes.miners = 2\nnodes.probes_required = 0\nrouter.max_body_bytes = 65536\n\
         queue.ack_timeout_ms = 500",
        HashMap::new(),
        HashMap::new(),
        dir.path(),
    );
    // tests/schemathesis.toml names session 1 as an existing one.
    assert_eq!(net.testnet.default_session, 1);
    // What is served is the document in the source tree.
    let served = net.http.get(net.url("/openapi.json")).send().unwrap();
    assert_eq!(served.status(), 200);
    assert_eq!(served.text().unwrap(), cortensor::api::openapi::DOCUMENT);

    let seed: u64 = std::env::var("SCHEMATHESIS_SEED")
        .ok()
        .map(|s| s.parse().expect("SCHEMATHESIS_SEED is a number"))
        .unwrap_or(DEFAULT_SEED);
    println!("schemathesis seed {seed} (set SCHEMATHESIS_SEED to replay another)");
    // A crash inside the tool itself (CPython 3.11 can fail hypothesis's own source
    // introspection: "SystemError: AST constructor recursion depth mismatch", made rare by the
    // single worker) is no finding about the API: such a run is repeated, once. Any check
    // failure fails at once.
    let mut attempt = 1;
    let (status, out, stderr) = loop {
        let (status, out, stderr) =
            run_schemathesis(&net.url("/openapi.json"), &net.testnet.api_key, seed);
        let tool_crash = !status.success()
            && out.contains("Runtime Error")
            && out.contains("SystemError")
            && !out.contains("FAILURES");
        if tool_crash && attempt == 1 {
            println!("schemathesis crashed inside itself (not a finding); running it again");
            attempt += 1;
            continue;
        }
        break (status, out, stderr);
    };
    assert!(
        status.success(),
        "schemathesis failed (seed {seed}, {status}):\n{out}\n{stderr}"
    );
    // It tested every operation, and the server is still there afterwards.
    let mut routes = 0;
    let _ =
        actix_web::App::new().configure(|cfg| routes = cortensor::api::register_routes(cfg).len());
    // schemathesis leaves out the operation that serves the schema it loaded (/openapi.json).
    let tested = routes - 1;
    assert!(
        out.contains(&format!("{tested} selected / {tested} total")),
        "schemathesis did not test all {tested} operations:\n{out}"
    );
    let (code, _) = net.get("/api/v1/status");
    assert_eq!(code, 200);
}

/// One schemathesis run against `url`: its exit status, output and errors (printed too).
fn run_schemathesis(url: &str, key: &str, seed: u64) -> (std::process::ExitStatus, String, String) {
    let work = tempfile::tempdir().unwrap();
    let mut child = Command::new(schemathesis())
        .current_dir(work.path())
        .args([
            "--config-file",
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/schemathesis.toml"),
        ])
        .args(["run", url])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_headers_conformance,response_schema_conformance,negative_data_rejection",
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            &MAX_EXAMPLES.to_string(),
            "--seed",
            &seed.to_string(),
            // One worker: CPython before 3.11.8 / 3.12.1 (Debian's 3.11 among them) can fail
            // `ast.parse` run by two threads at once (gh-106905), which hypothesis does to
            // describe its strategies.
            "--workers",
            "1",
            "--request-timeout",
            "60",
            "--generation-database",
            "none",
            "--no-color",
            "--suppress-health-check",
            "all",
            "-H",
            &format!("Authorization: Bearer {}", key),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("schemathesis starts");
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = stdout.read_to_string(&mut out);
        out
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut stderr = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
    let out = reader.join().unwrap();
    println!("{out}\n{stderr}");
    println!("schemathesis ran {:.0} s", started.elapsed().as_secs_f64());
    let status = status.unwrap_or_else(|| panic!("schemathesis ran past {LIMIT:?}"));
    (status, out, stderr)
}
