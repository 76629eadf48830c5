//! Two routers on one chain: each is a `cortensor router` process with its own chain account,
//! its own data and its own miner process, both on one anvil. A session opened through the
//! first is served by the second (a client may use either); when the first is SIGKILLed with
//! a task running, the second finishes that task from its own record of it (the first told
//! it when it accepted the task) and the chain's (the first router's hold), and the money on
//! the chain adds up: both tasks charged once, nothing left held.

use cortensor::chain::anvil::AnvilNode;
use cortensor::chain::evm::ANVIL_DEV_KEY;
use cortensor::chain::node_key::NodeKey;
use cortensor::nodes::protocol::node_id;
use serde_json::{json, Value};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_cortensor");
/// anvil's second development account (the first is `ANVIL_DEV_KEY`).
const ANVIL_SECOND_KEY: &str = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d";
/// The operator key both routers are configured with (clients use either router with it).
const KEY: &str = "scale-out-operator-key";

struct Processes(Vec<(String, Child)>);

impl Processes {
    fn spawn(&mut self, name: &str, args: &[&str], log: &Path) {
        let file = std::fs::File::create(log.join(format!("{name}.log"))).unwrap();
        let child = Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "cortensor=info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        self.0.push((name.to_string(), child));
    }

    fn kill(&mut self, name: &str) {
        let (_, child) = self.0.iter_mut().find(|(n, _)| n == name).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap()
}

fn get(url: &str) -> Value {
    http()
        .get(url)
        .bearer_auth(KEY)
        .send()
        .and_then(|r| r.json())
        .unwrap_or(Value::Null)
}

fn wait_for(limit: Duration, what: &str, log: &Path, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < limit,
            "timed out waiting for {what}; logs in {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn ready_miners(api: &str) -> usize {
    cortensor::commands::client::ready_miners(&get(&format!("{api}/api/v1/miners")))
}

#[test]
fn a_second_router_serves_the_session_and_finishes_a_dead_routers_task() {
    let anvil = AnvilNode::start(None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path();
    let (api_a, api_b) = (port(), port());
    let (nodes_a, nodes_b) = (port(), port());
    let (url_a, url_b) = (
        format!("http://127.0.0.1:{api_a}"),
        format!("http://127.0.0.1:{api_b}"),
    );
    let b_account = NodeKey::from_hex("b", ANVIL_SECOND_KEY).unwrap().address();
    let common =
        "[nodes]\nprobes_required = 0\nheartbeat_interval_ms = 300\noffline_after_ms = 2000\n";
    // Each router presents its own peer key to the other; both share the operators' key.
    let config_a = log.join("a.toml");
    std::fs::write(
        &config_a,
        format!(
            "[router]\napi_keys = [\"{KEY}\"]\ninstance = 0\npeer_key = \"router-a-peer-key\"\npeer_dead_after_ms = 2000\npeers = [{{ url = \"{url_b}\", instance = 1, address = \"{b_account:?}\", key = \"router-b-peer-key\" }}]\n{common}"
        ),
    )
    .unwrap();
    let mut processes = Processes(vec![]);
    let data_a = log.join("a");
    let router_args =
        |config: &Path, key: &str, api: u16, nodes: u16, data: &Path| -> Vec<String> {
            [
                "router",
                "--config",
                config.to_str().unwrap(),
                "--chain",
                "rpc",
                "--rpc-url",
                &anvil.url,
                "--private-key",
                key,
                "--listen",
                &format!("127.0.0.1:{api}"),
                "--node-listen",
                &format!("127.0.0.1:{nodes}"),
                "--data-dir",
                data.to_str().unwrap(),
                "--backend",
                "cpu",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect()
        };
    let a = router_args(&config_a, ANVIL_DEV_KEY, api_a, nodes_a, &data_a);
    processes.spawn(
        "router-a",
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
        log,
    );
    let deployment = data_a.join("deployment.json");
    wait_for(Duration::from_secs(120), "router A to deploy", log, || {
        deployment.exists() && get(&format!("{url_a}/api/v1/ping")) != Value::Null
    });
    let d: Value = serde_json::from_str(&std::fs::read_to_string(&deployment).unwrap()).unwrap();
    let config_b = log.join("b.toml");
    std::fs::write(
        &config_b,
        format!(
            "[router]\napi_keys = [\"{KEY}\"]\ninstance = 1\npeer_key = \"router-b-peer-key\"\npeer_dead_after_ms = 2000\npeers = [{{ url = \"{url_a}\", instance = 0, key = \"router-a-peer-key\" }}]\n{common}\n[chain.contracts]\npayment = \"{}\"\nqueue = \"{}\"\nsessions = \"{}\"\nnodes = \"{}\"\nreputation = \"{}\"\n",
            d["payment"].as_str().unwrap(), d["queue"].as_str().unwrap(), d["sessions"].as_str().unwrap(),
            d["nodes"].as_str().unwrap(), d["reputation"].as_str().unwrap()
        ),
    )
    .unwrap();
    let b = router_args(&config_b, ANVIL_SECOND_KEY, api_b, nodes_b, &log.join("b"));
    processes.spawn(
        "router-b",
        &b.iter().map(String::as_str).collect::<Vec<_>>(),
        log,
    );
    let miner_keys: Vec<NodeKey> = (0..2).map(|i| NodeKey::random(&format!("m{i}"))).collect();
    for (name, key, nodes) in [
        ("miner-a", &miner_keys[0], nodes_a),
        ("miner-b", &miner_keys[1], nodes_b),
    ] {
        let router = format!("ws://127.0.0.1:{nodes}");
        let hex = key.private_key_hex();
        processes.spawn(
            name,
            &[
                "miner",
                "--router",
                &router,
                "--key",
                &hex,
                "--threads",
                "1",
                "--backend",
                "cpu",
                "--heartbeat-ms",
                "300",
            ],
            log,
        );
    }
    wait_for(
        Duration::from_secs(180),
        "a miner on each router",
        log,
        || ready_miners(&url_a) == 1 && ready_miners(&url_b) == 1,
    );

    // A session opened through A; B serves it.
    let client = http();
    let session: Value = client
        .post(format!("{url_a}/api/v1/sessions"))
        .bearer_auth(KEY)
        .json(&json!({"name": "two routers", "redundant": 1}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let sid = session["session_id"]
        .as_u64()
        .unwrap_or_else(|| panic!("{session}"));
    let via_b: Value = client
        .post(format!("{url_b}/api/v1/completions"))
        .bearer_auth(KEY)
        .json(&json!({"session_id": sid, "prompt": "Say hello.", "max_tokens": 8}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let b_task = via_b["task_id"]
        .as_u64()
        .unwrap_or_else(|| panic!("{via_b}"));
    assert!(b_task > 1 << 40, "B's task ids are its own: {b_task}");
    assert_eq!(
        via_b["miners"],
        json!([node_id(miner_keys[1].address())]),
        "{via_b}"
    );

    // A long task on A; A dies while its miner generates.
    let long = {
        let url = url_a.clone();
        std::thread::spawn(move || {
            http()
                .post(format!("{url}/api/v1/completions"))
                .bearer_auth(KEY)
                .json(&json!({"session_id": sid, "prompt": "Count from 1 to 400, separated by commas.", "max_tokens": 300}))
                .send()
                .map(|_| ())
        })
    };
    let task_a = format!("{url_a}/api/v1/tasks/{sid}/1");
    wait_for(Duration::from_secs(60), "A's task to be acked", log, || {
        get(&task_a)["assignments"][0]["acked_at"].is_u64()
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(get(&task_a)["status"], "Acked", "still running when A dies");
    processes.kill("router-a");
    let _ = long.join();

    // B finishes it, under its own key, on its own miner.
    let task_b = format!("{url_b}/api/v1/tasks/{sid}/1");
    wait_for(
        Duration::from_secs(240),
        "B to finish A's task",
        log,
        || get(&task_b)["status"] == "Completed",
    );
    let task = get(&task_b);
    assert!(task["resumed"].as_u64().unwrap() >= 1, "{task}");
    assert_eq!(
        task["results"]["miners"],
        json!([node_id(miner_keys[1].address())]),
        "{task}"
    );
    let charged = task["charged"].as_u64().unwrap()
        + get(&format!("{url_b}/api/v1/tasks/{sid}/{b_task}"))["charged"]
            .as_u64()
            .unwrap();
    assert!(charged > 0);

    // The chain: both tasks charged once, A's hold released by B's settlement.
    wait_for(
        Duration::from_secs(60),
        "the settlements on chain",
        log,
        || {
            let s = get(&format!("{url_b}/api/v1/sessions/{sid}"));
            s["held"] == 0 && s["spent"].as_u64() == Some(charged)
        },
    );
}
