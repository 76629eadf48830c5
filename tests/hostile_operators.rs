//! What an operator's set-up must not leave open to strangers, tried through the real binary:
//! a router reachable from other hosts never runs on the public development key (it refuses it,
//! or makes a key of its own and prints it once), and a node's private key file that others can
//! read is refused, as ssh refuses one.

mod common;

use common::fails_naming;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A child process killed when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn router(args: &[&str], data: &std::path::Path) -> Killed {
    let child = Command::new(env!("CARGO_BIN_EXE_cortensor"))
        .arg("router")
        .args([
            "--listen",
            "127.0.0.1:0",
            "--node-listen",
            "127.0.0.1:0",
            "--backend",
            "cpu",
        ])
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("CORTENSOR_OPERATOR_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the router starts");
    Killed(child)
}

/// The lines a child prints on `stream`, as they come.
fn lines(stream: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

#[test]
fn a_router_refuses_the_public_development_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("router.toml");
    std::fs::write(&config, "[router]\napi_keys = [\"default-dev-token\"]\n").unwrap();
    let mut r = router(
        &["--config", config.to_str().unwrap()],
        &dir.path().join("data"),
    );
    let stderr = lines(r.0.stderr.take().unwrap());
    // It must stop by itself, naming the key; a router still serving after a minute took it.
    let mut said = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match stderr.recv_timeout(left) {
            Ok(line) => said.push_str(&(line + "\n")),
            Err(_) => break,
        }
    }
    // Its error output ends as it exits: give the exit itself until the same deadline.
    let mut status = r.0.try_wait().unwrap();
    while status.is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        status = r.0.try_wait().unwrap();
    }
    assert!(
        status.is_some_and(|s| !s.success()),
        "the router ran on the development key:\n{said}"
    );
    assert!(
        said.contains("default-dev-token") && said.contains("public development key"),
        "{said}"
    );
    assert!(!said.contains("panicked"), "{said}");
}

#[test]
fn a_router_with_no_key_makes_one_and_the_development_key_opens_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = router(
        &["--miners", "0", "--validators", "0"],
        &dir.path().join("data"),
    );
    let stdout = lines(r.0.stdout.take().unwrap());
    let (mut url, mut key) = (None, None);
    while url.is_none() || key.is_none() {
        let line = stdout
            .recv_timeout(Duration::from_secs(120))
            .expect("the router prints its address and key");
        if let Some(u) = line.strip_prefix("router:") {
            url = Some(u.trim().to_string());
        }
        if let Some(k) = line.strip_prefix("api key:") {
            key = Some(k.trim().to_string());
        }
    }
    let (url, key) = (url.unwrap(), key.unwrap());
    assert!(key.starts_with("ctsr_op_") && key.len() > 60, "{key}");
    let http = reqwest::blocking::Client::new();
    let status = |k: &str| {
        http.get(format!("{url}/api/v1/status"))
            .bearer_auth(k)
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(status("default-dev-token"), 401);
    assert_eq!(status(&key), 200);
    // Printed once: nothing else the router says repeats it.
    drop(r);
    let again: Vec<String> = stdout.try_iter().filter(|l| l.contains(&key)).collect();
    assert!(again.is_empty(), "{again:?}");
}

#[test]
fn a_node_key_file_others_can_read_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("m.key");
    std::fs::write(
        &key,
        "0x4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318\n",
    )
    .unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let key = key.to_str().unwrap();
    let miner = [
        "miner",
        "--router",
        "ws://127.0.0.1:9",
        "--key",
        key,
        "--max-reconnects",
        "1",
        "--backend",
        "cpu",
    ];
    fails_naming(&miner, "too open");
    fails_naming(&miner, "chmod 600");
    // Made private, the same file is taken (and the miner gets as far as the absent router).
    std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o600)).unwrap();
    fails_naming(&miner, "gave up after 1 failed connection attempts");
}
