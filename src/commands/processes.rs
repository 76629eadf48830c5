//! `cortensor testnet --processes`: the same network as `cortensor testnet`, each node a
//! process of its own: `cortensor router` (on anvil unless `--chain` says otherwise), then
//! `cortensor validator` and `cortensor miner` processes joined to it over the node WebSocket
//! on loopback. Children get SIGINT when the testnet stops (and SIGKILL if they linger).

use super::client::Client;
use super::testnet::{answer_prompt, wait_for_ctrl_c, wait_for_miners, TestnetArgs};
use crate::chain::node_key::NodeKey;
use crate::config::ChainKind;
use crate::testnet::{miner_id, node_keys_dir};
use anyhow::Context;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the router may take to answer HTTP after it starts (deploying contracts).
const ROUTER_START_LIMIT: Duration = Duration::from_secs(180);
/// How long a child may take to stop after SIGINT before it is killed.
const STOP_LIMIT: Duration = Duration::from_secs(10);

/// The children, stopped in reverse order when dropped.
struct Children(Vec<(String, Child)>);

impl Children {
    fn spawn(&mut self, name: String, command: &mut Command) -> anyhow::Result<()> {
        let child = command
            // The children's output goes to stderr: stdout stays the answer's.
            .stdout(Stdio::from(std::io::stderr()))
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        eprintln!("testnet: started {name} (pid {})", child.id());
        self.0.push((name, child));
        Ok(())
    }

    /// Fails when a child has exited.
    fn check(&mut self) -> anyhow::Result<()> {
        for (name, child) in &mut self.0 {
            if let Some(status) = child.try_wait()? {
                anyhow::bail!("{name} exited ({status}); see its log above");
            }
        }
        Ok(())
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child) in self.0.iter().rev() {
            // SAFETY: kill(2) on a child we spawned and have not reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
        }
        let deadline = Instant::now() + STOP_LIMIT;
        for (name, child) in self.0.iter_mut().rev() {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        eprintln!("testnet: {name} did not stop; killed");
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn run(args: TestnetArgs) -> anyhow::Result<()> {
    let net = &args.network;
    let mut config = net.configuration()?;
    config.validate_local()?;
    // The router runs as `cortensor router`, which never takes the public development key:
    // with none configured, one is made here and handed to it (and printed once, below).
    config.router.settle_operator_keys(true)?;
    let (miners, validators) = (config.nodes.miners, config.nodes.validators);
    if args.prompt.is_some() && args.redundant as usize > miners {
        anyhow::bail!(
            "--redundant {} needs at least that many miners (--miners {miners})",
            args.redundant
        );
    }
    let data_dir = config.storage.data_dir.clone();
    std::fs::create_dir_all(&data_dir)?;
    let keys = node_keys_dir(&data_dir);
    let exe = std::env::current_exe().context("cannot find this program to start its nodes")?;
    let listen = if config.router.listen.port() == 0 {
        std::net::SocketAddr::new(config.router.listen.ip(), free_port()?)
    } else {
        config.router.listen
    };
    let node_port = free_port()?;
    // TLS: the pair is made here (once, in the data directory) and given to every process.
    let tls = match (
        &net.tls_cert,
        &net.tls_key,
        net.tls_self_signed || config.tls.self_signed,
    ) {
        (Some(cert), Some(key), _) => Some((cert.clone(), key.clone(), None)),
        (_, _, true) => {
            let pair = crate::tls::self_signed(&data_dir.join("tls"), &[])?;
            Some((pair.files.cert, pair.files.key, Some(pair.ca)))
        }
        _ if !config.tls.cert.is_empty() => Some((
            config.tls.cert.clone().into(),
            config.tls.key.clone().into(),
            None,
        )),
        _ => None,
    };
    let ca = tls.as_ref().and_then(|(_, _, ca)| ca.clone());
    let (http, ws) = if tls.is_some() {
        ("https", "wss")
    } else {
        ("http", "ws")
    };
    let nodes_url = format!("{ws}://127.0.0.1:{node_port}");
    let chain = net.chain.unwrap_or(ChainKind::Anvil);

    // The validators' keys are made here, before the router starts: it admits exactly them.
    let validator_keys = (0..validators)
        .map(|i| NodeKey::load_or_create(&keys, &format!("validator-{}", i + 1)))
        .collect::<Result<Vec<_>, _>>()
        .context("making the validators' keys")?;

    let mut children = Children(Vec::new());
    let mut router = Command::new(&exe);
    router.arg("router");
    for key in &validator_keys {
        router.args(["--allow-validator", &format!("{:?}", key.address())]);
    }
    router
        .args(["--listen", &listen.to_string()])
        .args(["--node-listen", &format!("127.0.0.1:{node_port}")])
        .args(["--miners", "0", "--validators", "0"])
        .arg("--data-dir")
        .arg(&data_dir)
        .args([
            "--chain",
            match chain {
                ChainKind::Embedded => "embedded",
                ChainKind::Anvil => "anvil",
                ChainKind::Rpc => "rpc",
            },
        ]);
    if let Some(key) = &net.private_key {
        router.env("CORTENSOR_PRIVATE_KEY", key);
    }
    router.env("CORTENSOR_OPERATOR_KEY", &config.router.api_keys[0]);
    if let Some(c) = &net.config {
        router.arg("--config").arg(c);
    }
    if let Some((cert, key, _)) = &tls {
        router.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
    }
    if let Some(url) = &net.rpc_url {
        router.args(["--rpc-url", url]);
    }
    let model_args: Vec<String> = net
        .model
        .iter()
        .flat_map(|m| ["--model".to_string(), m.display().to_string()])
        .chain(
            net.backend
                .iter()
                .flat_map(|b| ["--backend".to_string(), b.clone()]),
        )
        .collect();
    router.args(&model_args);
    let node_tls: Vec<String> = ca
        .iter()
        .flat_map(|ca| ["--ca".to_string(), ca.display().to_string()])
        .collect();
    children.spawn("the router".into(), &mut router)?;

    let api_key = config.router.api_keys[0].clone();
    let client = Client::with_ca(&format!("{http}://{listen}"), &api_key, ca.as_deref())?;
    let started = Instant::now();
    while client.validators().is_err() {
        children.check()?;
        if started.elapsed() > ROUTER_START_LIMIT {
            anyhow::bail!("the router did not answer on {listen} within {ROUTER_START_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let threads = config.nodes.threads_per_miner.to_string();
    // Validators first: new miners are probed, and probes are validated.
    for i in 0..validators {
        let name = format!("validator-{}", i + 1);
        let key = keys.join(format!("{name}.key"));
        let mut command = Command::new(&exe);
        command
            .args(["validator", "--router", &nodes_url, "--threads", &threads])
            .arg("--key")
            .arg(&key)
            .args(&model_args)
            .args(&node_tls);
        children.spawn(name, &mut command)?;
    }
    while client.validators()? < validators {
        children.check()?;
        if started.elapsed() > ROUTER_START_LIMIT {
            anyhow::bail!("the validators did not join within {ROUTER_START_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for i in 0..miners {
        let name = miner_id(i);
        let key = keys.join(format!("{name}.key"));
        let mut command = Command::new(&exe);
        command
            .args(["miner", "--router", &nodes_url, "--threads", &threads])
            .args(["--max-tasks", &config.nodes.max_tasks_per_miner.to_string()])
            .args([
                "--heartbeat-ms",
                &config.nodes.heartbeat_interval_ms.to_string(),
            ])
            .arg("--key")
            .arg(&key)
            .args(&model_args)
            .args(&node_tls);
        children.spawn(name, &mut command)?;
    }
    wait_for_miners(&client, miners, Duration::from_secs(600))?;
    println!("router:  {http}://{listen} (each node a process; nodes join at {nodes_url})");
    if let Some(ca) = &ca {
        println!("tls:     self-signed; clients trust {}", ca.display());
    }
    println!("api key: {api_key}");
    if let Some(prompt) = &args.prompt {
        let sizes = (args.redundant, args.max_tokens);
        return answer_prompt(&client, prompt, sizes, "testnet --processes --prompt");
    }
    wait_for_ctrl_c()?;
    eprintln!("testnet: stopping the nodes");
    Ok(())
}
