//! Encrypted channels: a network serving its API and its node socket over TLS (a self-signed
//! CA and a certificate it signs). Real clients that trust the CA work: the official `openai`
//! Python client (its `DefaultHttpxClient` given an SSL context with the CA), a Rust HTTPS client, a remote miner over
//! `wss://`. A plaintext client and a client trusting another CA are refused, and so is a
//! miner trusting another CA. A recording TCP relay between the clients and the router shows
//! that neither the prompt nor the answer crosses the wire in plaintext.

mod common;

use common::client_python;

use cortensor::testkit::network::{Engines, TestNetwork, TestnetBuilder};
use cortensor::testkit::remote::RemoteMiner;
use cortensor::testkit::scripted_engine::Script;
use cortensor::tls;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PROMPT: &str = "a secret prompt about lighthouses";

/// A TCP relay on loopback that keeps every byte it forwards, both ways.
struct Relay {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl Relay {
    fn to(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let kept = seen.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let kept = kept.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            kept.lock().unwrap().extend_from_slice(&buf[..n]);
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Relay { addr, seen }
    }

    fn saw(&self, text: &str) -> bool {
        let seen = self.seen.lock().unwrap();
        seen.windows(text.len()).any(|w| w == text.as_bytes())
    }

    fn bytes(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

fn network(pair: &tls::SelfSigned) -> TestNetwork {
    TestnetBuilder::new()
        .miners(0)
        .validators(1)
        .engines(Engines::Scripted(Script::default()))
        .node_gateway()
        .tls(pair)
        .unwrap()
        .start()
        .expect("the network starts")
}

fn https(ca: &Path) -> reqwest::blocking::Client {
    let cert = reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap();
    reqwest::blocking::Client::builder()
        .add_root_certificate(cert)
        .tls_built_in_root_certs(false)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

fn ready(net: &TestNetwork) -> usize {
    net.ready_miners()
}

#[test]
fn tls_serves_trusting_clients_and_refuses_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let pair = tls::self_signed(&dir.path().join("tls"), &[]).unwrap();
    let other = tls::self_signed(&dir.path().join("other"), &[]).unwrap();
    let net = network(&pair);
    assert!(net.url().starts_with("https://"), "{}", net.url());
    let node_url = net.node_url().unwrap();
    assert!(node_url.starts_with("wss://"), "{node_url}");
    let node_addr: SocketAddr = node_url.trim_start_matches("wss://").parse().unwrap();
    let api_addr: SocketAddr = net.url().trim_start_matches("https://").parse().unwrap();

    // A miner that trusts another CA never gets in.
    let (engine, model) = net.engine();
    let wrong = RemoteMiner::start_with_tls(
        &node_url,
        engine.clone(),
        &model,
        4,
        Some(tls::client_config(&other.ca).unwrap()),
    );
    // A plaintext WebSocket client is refused too.
    let plain_ws = format!("ws://{node_addr}");
    assert!(
        tungstenite::connect(plain_ws.as_str()).is_err(),
        "ws:// to the TLS node port"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(ready(&net), 0, "a miner trusting another CA joined");
    drop(wrong);

    // The right CA: a miner joins through a recording relay.
    let node_relay = Relay::to(node_addr);
    let _miner = RemoteMiner::start_with_tls(
        &format!("wss://{}", node_relay.addr),
        engine,
        &model,
        4,
        Some(tls::client_config(&pair.ca).unwrap()),
    );
    let start = Instant::now();
    while ready(&net) < 1 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the wss miner did not join"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // A Rust HTTPS client through a recording relay.
    let api_relay = Relay::to(api_addr);
    let sid = net.create_session(1, 1_000_000).unwrap();
    let answer: Value = https(&pair.ca)
        .post(format!("https://{}/api/v1/completions", api_relay.addr))
        .bearer_auth(net.api_key())
        .json(&json!({"session_id": sid, "prompt": PROMPT, "max_tokens": 6}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let text = answer["choices"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("{answer}"));
    assert!(!text.trim().is_empty());
    for relay in [&api_relay, &node_relay] {
        assert!(relay.bytes() > 0, "traffic went through the relay");
        assert!(!relay.saw(PROMPT), "the prompt crossed in plaintext");
        assert!(!relay.saw(text.trim()), "the answer crossed in plaintext");
    }

    // Plain HTTP to the TLS port, and a client trusting another CA: refused.
    let plain = reqwest::blocking::Client::new()
        .get(format!("http://{api_addr}/api/v1/ping"))
        .send();
    assert!(
        plain.map(|r| !r.status().is_success()).unwrap_or(true),
        "plain HTTP got an answer from the TLS port"
    );
    let stranger = https(&other.ca)
        .get(format!("{}/api/v1/ping", net.url()))
        .send();
    let error = stranger
        .expect_err("a client trusting another CA connected")
        .to_string();
    assert!(!error.is_empty());

    // The official openai client, given the CA through httpx.
    let script = format!(
        r#"
import json, ssl, sys, openai
def trusting(ca):
    return openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=ca))
client = openai.OpenAI(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=0, timeout=60,
                       http_client=trusting(sys.argv[3]))
chat = client.chat.completions.create(model=sys.argv[4], max_tokens=6,
    messages=[{{"role": "user", "content": "{PROMPT}"}}])
print(json.dumps({{"content": chat.choices[0].message.content}}))
try:
    openai.OpenAI(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=0, timeout=10,
                  http_client=trusting(sys.argv[5])).models.list()
    print("stranger connected", file=sys.stderr); sys.exit(3)
except openai.APIConnectionError:
    pass
"#
    );
    let out = std::process::Command::new(client_python())
        .arg("-c")
        .arg(&script)
        .arg(format!("{}/v1", net.url()))
        .arg(net.api_key())
        .arg(pair.ca.to_str().unwrap())
        .arg(&model)
        .arg(other.ca.to_str().unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the openai client over TLS failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["content"].as_str().is_some_and(|c| !c.is_empty()), "{v}");
}
