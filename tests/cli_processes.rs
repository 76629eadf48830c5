//! Nodes as processes: `cortensor testnet --processes` runs a router, validators and miners
//! as separate processes (the real binary and model) on anvil, joined over the node
//! WebSocket, and answers a prompt; `cortensor miner` / `validator` name bad input and give
//! up on a router that is not there, with the reason.

mod common;

use common::{cortensor, fails_naming};

use std::process::Command;
use std::time::Instant;

/// `cortensor testnet --processes` with one validator answering a prompt, on `data`.
fn processes_testnet(data: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "testnet",
        "--processes",
        "--validators",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--prompt",
        "Name three primary colours.",
    ];
    args.extend_from_slice(extra);
    cortensor(&args)
}

#[test]
fn testnet_processes_answers_a_prompt_with_each_node_a_process() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let started = Instant::now();
    let out = processes_testnet(
        &data,
        &["--miners", "2", "--redundant", "2", "--max-tokens", "16"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    eprintln!("testnet --processes answered in {:?}", started.elapsed());
    // Each miner is a process with its own key; the task names them by their addresses.
    let addresses: Vec<String> = ["miner-1", "miner-2"]
        .iter()
        .map(|m| {
            let key = std::fs::read_to_string(data.join(format!("node-keys/{m}.key"))).unwrap();
            let key = cortensor::chain::node_key::NodeKey::from_hex(m, &key).unwrap();
            cortensor::nodes::protocol::node_id(key.address())
        })
        .collect();
    let line = stdout
        .lines()
        .find(|l| l.starts_with("task "))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(line.contains("\"Completed\" by 2 miner(s)"), "{line}");
    for a in &addresses {
        assert!(line.contains(a.as_str()), "{a} is not among {line}");
    }
    // The contracts were deployed on the anvil the router ran.
    assert!(data.join("deployment.json").exists());
    // Every child stopped with the testnet.
    let ps = Command::new("ps").args(["-eo", "args"]).output().unwrap();
    let ps = String::from_utf8_lossy(&ps.stdout);
    assert!(
        !ps.lines().any(|l| l.contains(data.to_str().unwrap())),
        "a node outlived the testnet:\n{ps}"
    );
}

#[test]
fn testnet_processes_over_tls_answers_through_its_own_ca() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = processes_testnet(
        &data,
        &[
            "--tls-self-signed",
            "--miners",
            "1",
            "--redundant",
            "1",
            "--max-tokens",
            "8",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("https://127.0.0.1:"), "{stdout}");
    assert!(stdout.contains("nodes join at wss://"), "{stdout}");
    assert!(stdout.contains("\"Completed\" by 1 miner(s)"), "{stdout}");
    assert!(data.join("tls/ca.pem").exists());
}

#[test]
fn nodes_name_bad_input_and_an_absent_router() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("m.key");
    let key = key.to_str().unwrap();
    fails_naming(
        &["miner", "--router", "http://127.0.0.1:9001", "--key", key],
        "ws://",
    );
    fails_naming(
        &[
            "miner",
            "--router",
            "ws://127.0.0.1:9",
            "--key",
            "not-a-key",
        ],
        "not-a-key",
    );
    // Nothing listens there: it gives up after its reconnects, with the reason.
    fails_naming(
        &[
            "miner",
            "--router",
            "ws://127.0.0.1:9",
            "--key",
            key,
            "--max-reconnects",
            "1",
            "--backend",
            "cpu",
        ],
        "gave up after 1 failed connection attempts",
    );
    // The key file was made (mode 0600) and is reused.
    let mode = std::fs::metadata(key).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.permissions().mode() & 0o777, 0o600);
    fails_naming(&["validator", "--router", "tcp://x", "--key", key], "ws://");
}
