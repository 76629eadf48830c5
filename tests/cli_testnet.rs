//! The testnet and client commands as an operator uses them: the real binary, the real model,
//! a client in another process, Ctrl-C, and bad input that must be named in the error.

mod common;

use common::{cortensor, fails_naming};

use cortensor::chain::anvil::AnvilNode;
use cortensor::chain::evm::ANVIL_DEV_KEY;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `cortensor node withdraw` for miner-1: what it printed, after checking it paid something.
fn withdraw_miner_1(data: &str) -> String {
    let out = cortensor(&["node", "withdraw", "--data-dir", data, "--node", "miner-1"]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let amount: u64 = said
        .strip_prefix("miner-1 withdrew ")
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{said}"));
    assert!(amount > 0, "{said}");
    said
}

#[test]
fn bad_configuration_is_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    fails_naming(
        &["testnet", "--config", "/no/such/testnet.toml"],
        "/no/such/testnet.toml",
    );
    let bogus = dir.path().join("bogus.toml");
    std::fs::write(&bogus, "[router]\nbogus_key = 1\n").unwrap();
    fails_naming(
        &["testnet", "--config", bogus.to_str().unwrap()],
        "bogus_key",
    );
    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, "[queue\n").unwrap();
    fails_naming(
        &["testnet", "--config", broken.to_str().unwrap()],
        "broken.toml",
    );
    let invalid = dir.path().join("invalid.toml");
    std::fs::write(&invalid, "[nodes]\nvalidators = 0\n").unwrap();
    fails_naming(
        &["testnet", "--config", invalid.to_str().unwrap()],
        "nodes.validators",
    );
    fails_naming(
        &["testnet", "--backend", "quantum", "--listen", "127.0.0.1:0"],
        "quantum",
    );
    fails_naming(
        &[
            "testnet",
            "--model",
            "/no/such/model.gguf",
            "--listen",
            "127.0.0.1:0",
        ],
        "/no/such/model.gguf",
    );
    fails_naming(
        &["prompt", "--url", "http://127.0.0.1:1", "hello"],
        "cannot reach the router",
    );
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"this is not a model").unwrap();
    fails_naming(
        &[
            "testnet",
            "--model",
            junk.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        "junk.gguf",
    );
}

#[test]
fn an_operator_runs_a_testnet_talks_to_it_and_stops_it_with_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cortensor"))
        .args([
            "testnet",
            "--listen",
            "127.0.0.1:0",
            "--miners",
            "2",
            "--backend",
            "cpu",
            "--data-dir",
        ])
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    let url = loop {
        let line = lines.next().expect("the testnet prints its URL").unwrap();
        printed.push(line.clone());
        if let Some(u) = line.strip_prefix("router:") {
            break u.trim().to_string();
        }
    };
    for _ in 0..3 {
        printed.push(lines.next().unwrap().unwrap());
    }
    let printed = printed.join("\n");
    assert!(printed.contains("default-dev-token"), "{printed}");
    assert!(printed.contains("curl"), "{printed}");

    let out = cortensor(&[
        "session",
        "create",
        "--url",
        &url,
        "--redundant",
        "2",
        "--name",
        "cli",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sid = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(
        sid.parse::<u64>().is_ok(),
        "session create prints an id: {sid}"
    );
    let out = cortensor(&[
        "prompt",
        "--url",
        &url,
        "--session",
        &sid,
        "--max-tokens",
        "12",
        "What is 2 + 2?",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("session {sid}, task 1")));
    let out = cortensor(&["session", "show", "--url", &url, &sid]);
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["redundant"], 2);
    assert!(shown["spent"].as_u64().unwrap() > 0);

    // Ctrl-C: a clean exit.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the testnet did not stop on Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status:?}");
    // With the testnet stopped, a miner collects its earnings from the embedded ledger, once.
    let data = dir.path().to_str().unwrap();
    withdraw_miner_1(data);
    fails_naming(
        &["node", "withdraw", "--data-dir", data, "--node", "miner-1"],
        "nothing to withdraw",
    );
    // The data survived: the same directory serves the finished task.
    let restarted = Command::new(env!("CARGO_BIN_EXE_cortensor"))
        .args([
            "testnet",
            "--listen",
            "127.0.0.1:0",
            "--miners",
            "1",
            "--backend",
            "cpu",
            "--data-dir",
        ])
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut restarted = restarted;
    let mut lines = BufReader::new(restarted.stdout.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().unwrap().unwrap();
        if let Some(u) = line.strip_prefix("router:") {
            break u.trim().to_string();
        }
    };
    let task: serde_json::Value = reqwest::blocking::Client::new()
        .get(format!("{url}/api/v1/tasks/{sid}/1"))
        .bearer_auth("default-dev-token")
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(task["status"], "Completed", "{task}");
    assert_eq!(task["results"]["data"].as_array().unwrap().len(), 2);
    restarted.kill().unwrap();
    restarted.wait().unwrap();
}

#[test]
fn the_testnet_answers_a_prompt_on_anvil_and_keeps_its_chain_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let run = || {
        let out = cortensor(&[
            "testnet",
            "--chain",
            "anvil",
            "--listen",
            "127.0.0.1:0",
            "--miners",
            "2",
            "--redundant",
            "2",
            "--backend",
            "cpu",
            "--max-tokens",
            "8",
            "--data-dir",
            data,
            "--prompt",
            "Say hello.",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let first = run();
    assert!(first.contains("chain:   Cortensor's contracts"), "{first}");
    assert!(first.contains("\"Completed\" by 2 miner(s)"), "{first}");
    // The second run attaches to the same contracts: the sessions of the first are still there.
    let second = run();
    let session = |out: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix("session: "))
            .and_then(|l| l.split(' ').next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap()
    };
    assert_eq!(session(&second), session(&first) + 1, "{second}");
    let contracts = |out: &str| {
        out.lines()
            .find(|l| l.starts_with("chain:"))
            .unwrap()
            .to_string()
    };
    assert_eq!(contracts(&first), contracts(&second));

    // A miner withdraws with its own key into its own wallet; the testnet has stopped, so the
    // command brings its anvil back from the saved state for the purpose.
    let address = first
        .lines()
        .find_map(|l| l.strip_prefix("node:    miner-1 is paid at "))
        .unwrap_or_else(|| panic!("{first}"))
        .to_string();
    let said = withdraw_miner_1(data);
    assert!(said.contains(&format!("to {address}")), "{said}");
    fails_naming(
        &["node", "withdraw", "--data-dir", data, "--node", "miner-1"],
        "nothing to withdraw",
    );
    fails_naming(
        &["node", "withdraw", "--data-dir", data, "--node", "miner-9"],
        "no key for node \"miner-9\"",
    );

    // Any EVM node, with the contracts named in the configuration: a fresh data directory
    // attaches to them (the same chain, served by an anvil this test runs) and goes on.
    let anvil = AnvilNode::start(Some(&dir.path().join("anvil-state.json"))).unwrap();
    let deployment: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("deployment.json")).unwrap())
            .unwrap();
    let mut toml = String::from("[chain.contracts]\n");
    for name in ["payment", "queue", "sessions", "nodes", "reputation"] {
        toml += &format!("{name} = {}\n", deployment[name]);
    }
    let other = tempfile::tempdir().unwrap();
    let config = other.path().join("contracts.toml");
    std::fs::write(&config, toml).unwrap();
    let out = cortensor(&[
        "testnet",
        "--chain",
        "rpc",
        "--rpc-url",
        &anvil.url,
        "--private-key",
        ANVIL_DEV_KEY,
        "--config",
        config.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--miners",
        "1",
        "--redundant",
        "1",
        "--backend",
        "cpu",
        "--max-tokens",
        "4",
        "--data-dir",
        other.path().join("data").to_str().unwrap(),
        "--prompt",
        "Say hello.",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let third = String::from_utf8(out.stdout).unwrap();
    assert_eq!(contracts(&third), contracts(&first));
    assert_eq!(session(&third), session(&second) + 1, "{third}");
}
