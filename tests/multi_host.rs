//! Three hosts on one machine: network namespaces joined by veth pairs, with the router in
//! one, a miner in a second, and anvil (and a second miner) in the third. Each node is the
//! real `cortensor` binary with the real model. A task running on the first miner when its
//! namespace's link is cut still completes (the second miner takes it over), and the cut
//! miner is marked offline. The host namespace cannot reach the router at all: the traffic
//! stays inside the namespaces.
//!
//! Needs root (namespaces); CI runs as root.

use cortensor::chain::anvil::anvil_binary;
use cortensor::chain::evm::ANVIL_DEV_KEY;
use cortensor::chain::node_key::NodeKey;
use cortensor::nodes::protocol::node_id;
use serde_json::{json, Value};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_cortensor");
/// The operator key the router of this test is configured with.
const OPERATOR_KEY: &str = "multi-host-operator-key";

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The namespaces and the processes in them; all removed on drop.
struct Hosts {
    names: Vec<String>,
    children: Vec<(String, Child)>,
}

impl Hosts {
    fn spawn(&mut self, name: &str, ns: &str, args: &[&str], log: &std::path::Path) {
        let file = std::fs::File::create(log.join(format!("{name}.log"))).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .env("RUST_LOG", "cortensor=info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        self.children.push((name.to_string(), child));
    }

    fn check_alive(&mut self, log: &std::path::Path) {
        for (name, child) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                let text =
                    std::fs::read_to_string(log.join(format!("{name}.log"))).unwrap_or_default();
                panic!("{name} exited ({status}):\n{text}");
            }
        }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for (_, child) in self.children.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in &self.names {
            // Killing `ip netns exec` leaves its child; end everything in the namespace.
            let _ = Command::new("ip")
                .args(["netns", "pids", ns])
                .output()
                .map(|o| {
                    for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                        if let Ok(pid) = pid.parse::<i32>() {
                            // SAFETY: kill(2) on processes inside our own test namespace.
                            unsafe { libc::kill(pid, libc::SIGKILL) };
                        }
                    }
                });
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Runs `f` on a thread inside namespace `ns` (threads it starts are inside too).
fn in_namespace<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("the namespace exists");
        // SAFETY: setns(2) on this thread only, with an open namespace descriptor.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("the namespace thread")
}

/// The remote ends of a namespace's established TCP connections (the machine's own: None).
fn established_peers(ns: Option<&str>) -> Vec<String> {
    let mut command = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "ss"]);
            c
        }
        None => Command::new("ss"),
    };
    let out = command
        .args(["-Htn", "state", "established"])
        .output()
        .expect("ss runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3).map(str::to_string))
        .collect()
}

fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap()
}

#[test]
fn a_task_survives_its_miners_host_losing_its_link() {
    let tag = std::process::id() % 100_000;
    let (r, m, c) = (
        format!("cx-r{tag}"),
        format!("cx-m{tag}"),
        format!("cx-c{tag}"),
    );
    let mut hosts = Hosts {
        names: vec![r.clone(), m.clone(), c.clone()],
        children: vec![],
    };
    for ns in &hosts.names {
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", ns]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }
    // router ⟷ miner host: 10.201.1.0/24; router ⟷ chain host: 10.201.2.0/24.
    let links = [
        (
            &r,
            "10.201.1.1",
            &m,
            "10.201.1.2",
            format!("vrm{tag}"),
            format!("vmr{tag}"),
        ),
        (
            &r,
            "10.201.2.1",
            &c,
            "10.201.2.2",
            format!("vrc{tag}"),
            format!("vcr{tag}"),
        ),
    ];
    for (a, a_ip, b, b_ip, a_if, b_if) in &links {
        ip(&["link", "add", a_if, "type", "veth", "peer", "name", b_if]);
        ip(&["link", "set", a_if, "netns", a]);
        ip(&["link", "set", b_if, "netns", b]);
        ip(&["-n", a, "addr", "add", &format!("{a_ip}/24"), "dev", a_if]);
        ip(&["-n", b, "addr", "add", &format!("{b_ip}/24"), "dev", b_if]);
        ip(&["-n", a, "link", "set", a_if, "up"]);
        ip(&["-n", b, "link", "set", b_if, "up"]);
    }

    let dir = tempfile::tempdir().unwrap();
    let log = dir.path();
    let config = log.join("router.toml");
    std::fs::write(
        &config,
        format!(
            "[router]\napi_keys = [\"{OPERATOR_KEY}\"]\n\
             [nodes]\nprobes_required = 0\nheartbeat_interval_ms = 300\noffline_after_ms = 2000\n"
        ),
    )
    .unwrap();
    let anvil = anvil_binary();
    hosts.spawn(
        "anvil",
        &c,
        &[
            anvil.to_str().unwrap(),
            "--host",
            "10.201.2.2",
            "--port",
            "8545",
            "--silent",
        ],
        log,
    );
    let data = log.join("router-data");
    hosts.spawn(
        "router",
        &r,
        &[
            BIN,
            "router",
            "--config",
            config.to_str().unwrap(),
            "--chain",
            "rpc",
            "--rpc-url",
            "http://10.201.2.2:8545",
            "--private-key",
            ANVIL_DEV_KEY,
            "--listen",
            "10.201.1.1:5010",
            "--node-listen",
            "0.0.0.0:9001",
            "--data-dir",
            data.to_str().unwrap(),
            "--backend",
            "cpu",
        ],
        log,
    );
    let keys: Vec<NodeKey> = (0..2).map(|i| NodeKey::random(&format!("m{i}"))).collect();
    let ids: Vec<String> = keys.iter().map(|k| node_id(k.address())).collect();
    let miner_args = |router: &str, key: &NodeKey| -> Vec<String> {
        [
            BIN,
            "miner",
            "--router",
            router,
            "--key",
            &key.private_key_hex(),
            "--threads",
            "1",
            "--backend",
            "cpu",
            "--heartbeat-ms",
            "300",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let a1 = miner_args("ws://10.201.1.1:9001", &keys[0]);
    let a2 = miner_args("ws://10.201.2.1:9001", &keys[1]);
    hosts.spawn(
        "miner-1",
        &m,
        &a1.iter().map(String::as_str).collect::<Vec<_>>(),
        log,
    );
    hosts.spawn(
        "miner-2",
        &c,
        &a2.iter().map(String::as_str).collect::<Vec<_>>(),
        log,
    );

    let api = "http://10.201.1.1:5010";
    // A router other hosts reach refuses the public development key: it has its own.
    let auth = OPERATOR_KEY;
    let started = Instant::now();
    loop {
        hosts.check_alive(log);
        let ready = in_namespace(&r, move || {
            http()
                .get(format!("{api}/api/v1/miners"))
                .bearer_auth(auth)
                .send()
                .and_then(|r| r.json::<Value>())
                .map(|v| cortensor::commands::client::ready_miners(&v))
                .unwrap_or(0)
        });
        if ready == 2 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "the miners did not join: see {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    let (miner_1, miner_2) = (ids[0].clone(), ids[1].clone());
    let cut = (m.clone(), format!("vmr{tag}"));
    let outcome = in_namespace(&r, move || {
        let client = http();
        let sid = client
            .post(format!("{api}/api/v1/sessions"))
            .bearer_auth(auth)
            .json(&json!({"name": "multi-host", "redundant": 1, "max_num_of_nodes": 2}))
            .send()
            .unwrap()
            .json::<Value>()
            .unwrap()["session_id"]
            .as_u64()
            .unwrap();
        // Two tasks at once: least load first puts one on each miner.
        let prompt = "Count from 1 to 400, separated by commas.";
        let tasks: Vec<_> = (0..2)
            .map(|_| {
                let client = client.clone();
                let t = std::thread::spawn(move || {
                    client
                        .post(format!("{api}/api/v1/completions"))
                        .bearer_auth(auth)
                        .json(&json!({"session_id": sid, "prompt": prompt, "max_tokens": 400}))
                        .send()
                        .and_then(|r| r.json::<Value>())
                });
                std::thread::sleep(Duration::from_millis(300));
                t
            })
            .collect();
        let task = |tid: u64| -> Value {
            client
                .get(format!("{api}/api/v1/tasks/{sid}/{tid}"))
                .bearer_auth(auth)
                .send()
                .unwrap()
                .json()
                .unwrap()
        };
        // Find the task on miner 1, acked and still generating.
        let start = Instant::now();
        let on_miner_1 = loop {
            let found = (1..=2).find(|&tid| {
                let t = task(tid);
                t["assignments"][0]["miner"] == miner_1.as_str()
                    && t["assignments"][0]["acked_at"].is_u64()
            });
            if let Some(tid) = found {
                break tid;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no task reached miner 1"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        std::thread::sleep(Duration::from_millis(500));
        let before = task(on_miner_1);
        assert_eq!(
            before["assignments"][0]["state"], "Acked",
            "still generating: {before}"
        );
        // Cut the miner host's link.
        let (ns, dev) = cut;
        ip(&["-n", &ns, "link", "set", &dev, "down"]);
        let answers: Vec<Value> = tasks
            .into_iter()
            .map(|t| t.join().unwrap().expect("every client gets an answer"))
            .collect();
        let after = task(on_miner_1);
        let miners = client
            .get(format!("{api}/api/v1/miners"))
            .bearer_auth(auth)
            .send()
            .unwrap()
            .json::<Value>()
            .unwrap();
        (answers, after, miners, miner_1, miner_2)
    });
    let (answers, after, miners, miner_1, miner_2) = outcome;
    // Every connection of the router's host is with the other namespaces (or itself), and
    // the machine's own namespace holds none with them.
    let router_peers = established_peers(Some(&r));
    assert!(!router_peers.is_empty(), "the router has connections");
    for peer in &router_peers {
        assert!(
            peer.starts_with("10.201.") || peer.starts_with("127.0.0.1"),
            "the router talks to {peer}, outside the namespaces: {router_peers:?}"
        );
    }
    let host_peers = established_peers(None);
    assert!(
        host_peers.iter().all(|p| !p.starts_with("10.201.")),
        "the machine's own namespace talks to the namespaces: {host_peers:?}"
    );
    for a in &answers {
        assert!(
            a["choices"][0]["text"]
                .as_str()
                .is_some_and(|t| !t.is_empty()),
            "{a}"
        );
    }
    assert_eq!(after["status"], "Completed", "{after}");
    assert_eq!(after["assignments"][0]["miner"], miner_1.as_str());
    assert_eq!(after["assignments"][0]["state"], "Replaced", "{after}");
    assert_eq!(after["results"]["miners"], json!([miner_2]), "{after}");
    assert_eq!(miners["nodes"][&miner_1]["state"], "offline", "{miners}");
}
