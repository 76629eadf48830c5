//! Miners on "another host" for tests and benchmarks: each runs in an actix system of its own
//! on a thread of its own, joined to a router's node WebSocket over real TCP, with the same
//! `RouterLink` and `Miner` actors `cortensor miner` runs. Stopping one ends its system, so
//! its socket closes as a killed process's would.

use crate::actors::miner::{EngineFactory, Miner, MinerFaults, MinerSpec, NodeUplink};
use crate::actors::router_link::{LinkSettings, RouterLink};
use crate::chain::node_key::NodeKey;
use crate::nodes::protocol::NodeRole;
use actix::prelude::*;
use std::time::Duration;

pub struct RemoteMiner {
    /// Its id on the network (its key's address).
    pub id: String,
    system: Option<actix_rt::System>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Why its link gave up, if it did.
    fatal: std::sync::mpsc::Receiver<String>,
}

impl RemoteMiner {
    /// Starts a miner serving `model` with engines from `engine`, connecting to `router_url`.
    pub fn start(router_url: &str, engine: EngineFactory, model: &str, max_tasks: usize) -> Self {
        Self::start_with_tls(router_url, engine, model, max_tasks, None)
    }

    /// The same over `wss://`, trusting what `tls` trusts.
    pub fn start_with_tls(
        router_url: &str,
        engine: EngineFactory,
        model: &str,
        max_tasks: usize,
        tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    ) -> Self {
        let key = NodeKey::random("remote").named_by_address();
        let id = key.node.clone();
        let settings = LinkSettings {
            url: router_url.to_string(),
            key: key.clone(),
            role: NodeRole::Miner,
            max_reconnects: 50,
            tls,
        };
        let spec = MinerSpec {
            id: id.clone(),
            model: model.to_string(),
            max_tasks,
            heartbeat_interval: Duration::from_millis(100),
            faults: MinerFaults::default(),
            inbound: None,
            key,
        };
        let (fatal_tx, fatal) = std::sync::mpsc::channel();
        let (sys_tx, sys_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("remote-{}", &id[..10]))
            .spawn(move || {
                let system = actix_rt::System::new();
                system.block_on(async move {
                    let link = RouterLink::new(settings, fatal_tx).start();
                    let (uplink, reports) = (NodeUplink::link(&link), link.recipient());
                    Supervisor::start(move |_| Miner::new(spec, engine.clone(), reports, uplink));
                });
                let _ = sys_tx.send(actix_rt::System::current());
                let _ = system.run();
            })
            .expect("a thread starts");
        let system = sys_rx.recv().ok();
        RemoteMiner {
            id,
            system,
            thread: Some(thread),
            fatal,
        }
    }

    /// Why the link gave up, if it has.
    pub fn gave_up(&self) -> Option<String> {
        self.fatal.try_recv().ok()
    }

    /// Stops it at once: its connection drops, as a killed process's does.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        if let Some(system) = self.system.take() {
            system.stop();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for RemoteMiner {
    fn drop(&mut self) {
        self.halt();
    }
}
