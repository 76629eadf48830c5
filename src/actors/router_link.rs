//! A remote node's link to its router: the other end of `remote_node`. It connects to the
//! router's node WebSocket, logs in with the node key, and then carries the node's messages
//! both ways: a local `Miner` sends it what it would send the pool and the queue
//! (`Register`, `Heartbeat`, `GoOffline`, `MinerReport`) and gets `ToMiner` from it; a local
//! `Validator` gets `Validate` and answers with its evidence.
//!
//! A lost connection (closed, failed, or the router silent for its `offline_after`) is
//! redialled with a back-off of 250 ms doubling to 10 s, at most `max_reconnects` times in a
//! row; the tasks the miner held are cancelled (the router has given them to others), and its
//! registration is sent again once the new connection is welcomed. A router that refuses the
//! node for good (a bad key, another protocol version, a model it does not serve) ends the
//! link, and the reason is handed to whoever started it.

use super::messages::{MinerReport, ReportKind, ToMiner};
use super::node_pool::{GoOffline, Heartbeat, Register};
use super::validator::Validate;
use crate::chain::node_key::NodeKey;
use crate::nodes::protocol::{self, NodeFrame, NodeRole, RouterFrame, MAX_FRAME_BYTES};
use crate::task::TaskKey;
use actix::prelude::*;
use futures_util::{SinkExt, StreamExt};
use std::collections::HashSet;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// The longest pause between two connection attempts.
pub const MAX_RECONNECT_BACKOFF: Duration = Duration::from_secs(10);
/// How long one connection attempt (TCP and the WebSocket handshake) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Frames waiting to be written; beyond that the connection is taken as stuck and redialled.
pub const OUTBOX_FRAMES: usize = 1024;
/// How often the link pings the router (the router takes a silent node as gone).
pub const PING_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Clone, Debug)]
pub struct LinkSettings {
    /// `ws://host:9001` (or `wss://`).
    pub url: String,
    pub key: NodeKey,
    pub role: NodeRole,
    /// Failed connection attempts in a row before the link gives up.
    pub max_reconnects: u32,
    /// Whom to trust for `wss://` (a CA or the router's pinned certificate); none: the
    /// public web roots.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

/// Why a link ended for good.
pub type FatalSender = std::sync::mpsc::Sender<String>;

struct Registration {
    model: String,
    backend: String,
    max_tasks: usize,
}

pub struct RouterLink {
    settings: LinkSettings,
    /// Counts connections; events of an older one are ignored.
    generation: u64,
    out: Option<mpsc::Sender<WsMessage>>,
    reader: Option<SpawnHandle>,
    welcomed: bool,
    /// The current connection's challenge: a validator's evidence is signed with it.
    challenge: Option<String>,
    registration: Option<Registration>,
    miner: Option<Recipient<ToMiner>>,
    validator: Option<Recipient<Validate>>,
    /// Assignments passed to the miner and not finished: cancelled when the link is lost.
    tasks: HashSet<TaskKey>,
    failures_in_a_row: u32,
    last_heard: Instant,
    silence_limit: Duration,
    fatal: FatalSender,
}

impl RouterLink {
    pub fn new(settings: LinkSettings, fatal: FatalSender) -> Self {
        Self {
            settings,
            generation: 0,
            out: None,
            reader: None,
            welcomed: false,
            challenge: None,
            registration: None,
            miner: None,
            validator: None,
            tasks: HashSet::new(),
            failures_in_a_row: 0,
            last_heard: Instant::now(),
            silence_limit: Duration::from_secs(15),
            fatal,
        }
    }

    /// A validator node: `Validate` frames go to `validator`.
    pub fn with_validator(mut self, validator: Recipient<Validate>) -> Self {
        self.validator = Some(validator);
        self
    }

    fn node_id(&self) -> String {
        protocol::node_id(self.settings.key.address())
    }

    fn send(&mut self, frame: &NodeFrame) {
        let Some(out) = &self.out else {
            return;
        };
        if out
            .try_send(WsMessage::Text(protocol::encode(frame)))
            .is_err()
        {
            tracing::warn!(node = %self.node_id(), "the connection to the router is stuck; redialling");
            self.out = None; // the tick notices and redials
        }
    }

    fn connect(&mut self, ctx: &mut Context<Self>) {
        self.generation += 1;
        self.challenge = None;
        let generation = self.generation;
        let url = self.settings.url.clone();
        let connector = self
            .settings
            .tls
            .clone()
            .map(tokio_tungstenite::Connector::Rustls);
        let dial = async move {
            let config = WebSocketConfig {
                max_message_size: Some(MAX_FRAME_BYTES),
                max_frame_size: Some(MAX_FRAME_BYTES),
                ..WebSocketConfig::default()
            };
            match tokio::time::timeout(
                CONNECT_TIMEOUT,
                tokio_tungstenite::connect_async_tls_with_config(
                    url.as_str(),
                    Some(config),
                    true,
                    connector,
                ),
            )
            .await
            {
                Ok(Ok((socket, _))) => Ok(socket),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {CONNECT_TIMEOUT:?}")),
            }
        };
        ctx.spawn(dial.into_actor(self).map(move |dialled, link, ctx| {
            if generation != link.generation {
                return;
            }
            match dialled {
                Ok(socket) => {
                    let (sink, stream) = socket.split();
                    let (tx, rx) = mpsc::channel(OUTBOX_FRAMES);
                    actix_rt::spawn(write_frames(sink, rx));
                    link.out = Some(tx);
                    link.last_heard = Instant::now();
                    let events = stream
                        .map(move |m| LinkEvent::Frame(generation, m.map_err(|e| e.to_string())))
                        .chain(futures_util::stream::once(async move {
                            LinkEvent::Closed(generation)
                        }));
                    link.reader = Some(ctx.add_stream(events));
                }
                Err(e) => link.lost(&format!("cannot reach {}: {e}", link.settings.url), ctx),
            }
        }));
    }

    /// The connection is gone: cancel what the miner held, and dial again after a pause.
    fn lost(&mut self, why: &str, ctx: &mut Context<Self>) {
        self.generation += 1; // whatever the old connection still says is ignored
        self.out = None;
        if let Some(reader) = self.reader.take() {
            ctx.cancel_future(reader);
        }
        self.welcomed = false;
        if let Some(miner) = &self.miner {
            for key in self.tasks.drain() {
                miner.do_send(ToMiner::Cancel { key });
            }
        }
        self.failures_in_a_row += 1;
        if self.failures_in_a_row > self.settings.max_reconnects {
            let reason = format!(
                "gave up after {} failed connection attempts in a row: {why}",
                self.failures_in_a_row - 1
            );
            return self.give_up(reason, ctx);
        }
        let backoff = Duration::from_millis(250u64 << self.failures_in_a_row.min(6))
            .min(MAX_RECONNECT_BACKOFF);
        tracing::warn!(node = %self.node_id(), router = %self.settings.url, %why, ?backoff, attempt = self.failures_in_a_row, "link to the router lost; redialling");
        ctx.run_later(backoff, |link, ctx| link.connect(ctx));
    }

    fn give_up(&mut self, reason: String, ctx: &mut Context<Self>) {
        tracing::error!(node = %self.node_id(), router = %self.settings.url, %reason, "the link to the router ends");
        let _ = self.fatal.send(reason);
        ctx.stop();
    }

    fn on_frame(&mut self, frame: RouterFrame, ctx: &mut Context<Self>) {
        match frame {
            RouterFrame::Challenge {
                versions,
                challenge,
            } => {
                if !(versions[0]..=versions[1]).contains(&protocol::PROTOCOL_VERSION) {
                    let reason = format!(
                        "the router speaks protocol versions {} to {}, this node {}",
                        versions[0],
                        versions[1],
                        protocol::PROTOCOL_VERSION
                    );
                    return self.give_up(reason, ctx);
                }
                match protocol::hello(&challenge, self.settings.role, &self.settings.key) {
                    Ok(hello) => {
                        self.challenge = Some(challenge);
                        self.send(&hello);
                    }
                    Err(e) => self.lost(&e.to_string(), ctx),
                }
            }
            RouterFrame::Welcome {
                node,
                offline_after_ms,
                ..
            } => {
                tracing::info!(%node, router = %self.settings.url, "logged in to the router");
                self.welcomed = true;
                self.failures_in_a_row = 0;
                self.silence_limit = Duration::from_millis(offline_after_ms.max(1000));
                if let Some(r) = &self.registration {
                    let frame = NodeFrame::Register {
                        model: r.model.clone(),
                        backend: r.backend.clone(),
                        max_tasks: r.max_tasks,
                    };
                    self.send(&frame);
                }
                if self.validator.is_some() {
                    self.send(&NodeFrame::ValidatorReady);
                }
            }
            RouterFrame::Rejected { reason, retry } => {
                if retry {
                    self.lost(&format!("the router refused: {reason}"), ctx);
                } else {
                    self.give_up(format!("the router refused this node: {reason}"), ctx);
                }
            }
            RouterFrame::Assign {
                key,
                nonce,
                request,
                stream_tokens,
            } => {
                if let Some(miner) = &self.miner {
                    self.tasks.insert(key);
                    miner.do_send(ToMiner::Assign {
                        key,
                        nonce,
                        request,
                        stream_tokens,
                    });
                }
            }
            RouterFrame::Reveal { key } => {
                if let Some(miner) = &self.miner {
                    miner.do_send(ToMiner::Reveal { key });
                }
            }
            RouterFrame::Cancel { key } => {
                self.tasks.remove(&key);
                if let Some(miner) = &self.miner {
                    miner.do_send(ToMiner::Cancel { key });
                }
            }
            RouterFrame::Validate { id, validate } => {
                let (Some(validator), Some(challenge)) =
                    (self.validator.clone(), self.challenge.clone())
                else {
                    return;
                };
                let key = validate.key;
                let ask = Validate {
                    key: validate.key,
                    request: validate.request,
                    results: validate.results,
                    plan: validate.plan,
                    seeded: validate.seeded,
                };
                let generation = self.generation;
                ctx.spawn(
                    validator
                        .send(ask)
                        .into_actor(self)
                        .map(move |evidence, link, _| {
                            let (Ok(evidence), true) = (evidence, generation == link.generation)
                            else {
                                return;
                            };
                            match protocol::signed_evidence(
                                &challenge,
                                id,
                                key,
                                &evidence,
                                &link.settings.key,
                            ) {
                                Ok(frame) => link.send(&frame),
                                Err(e) => {
                                    tracing::error!(task = %key, error = %e, "cannot sign the evidence")
                                }
                            }
                        }),
                );
            }
            RouterFrame::Ping => {}
        }
    }
}

/// Writes frames in order; ends when the link drops its sender (closing the socket) or the
/// socket fails.
async fn write_frames<S>(mut sink: S, mut rx: mpsc::Receiver<WsMessage>)
where
    S: futures_util::Sink<WsMessage> + Unpin,
{
    while let Some(message) = rx.recv().await {
        if sink.send(message).await.is_err() {
            return;
        }
    }
    let _ = sink.send(WsMessage::Close(None)).await;
}

enum LinkEvent {
    Frame(u64, Result<WsMessage, String>),
    Closed(u64),
}

impl Actor for RouterLink {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.connect(ctx);
        ctx.run_interval(PING_INTERVAL, |link, ctx| {
            let connected = link.reader.is_some();
            if connected && link.out.is_none() {
                return link.lost("the connection is stuck", ctx);
            }
            if connected && link.last_heard.elapsed() > link.silence_limit {
                let why = format!("the router is silent for {:?}", link.last_heard.elapsed());
                return link.lost(&why, ctx);
            }
            if let Some(out) = &link.out {
                let _ = out.try_send(WsMessage::Ping(Vec::new()));
            }
        });
    }
}

impl StreamHandler<LinkEvent> for RouterLink {
    fn handle(&mut self, event: LinkEvent, ctx: &mut Context<Self>) {
        match event {
            LinkEvent::Frame(generation, _) | LinkEvent::Closed(generation)
                if generation != self.generation => {}
            LinkEvent::Closed(_) => self.lost("the router closed the connection", ctx),
            LinkEvent::Frame(_, Err(e)) => self.lost(&e, ctx),
            LinkEvent::Frame(_, Ok(message)) => {
                self.last_heard = Instant::now();
                match message {
                    WsMessage::Text(text) => match protocol::decode::<RouterFrame>(&text) {
                        Ok(frame) => self.on_frame(frame, ctx),
                        Err(e) => self.give_up(format!("the router sent {e}"), ctx),
                    },
                    WsMessage::Close(_) => self.lost("the router closed the connection", ctx),
                    _ => {} // pings are answered by the socket; pongs only count as life
                }
            }
        }
    }

    /// A connection's stream ending is handled by its `Closed` event; the link lives on.
    fn finished(&mut self, _: &mut Context<Self>) {}
}

impl Handler<MinerReport> for RouterLink {
    type Result = ();
    fn handle(&mut self, m: MinerReport, _: &mut Context<Self>) {
        if matches!(
            m.kind,
            ReportKind::Commit { .. } | ReportKind::Failed { .. } | ReportKind::Refused { .. }
        ) {
            self.tasks.remove(&m.key);
        }
        if self.welcomed {
            self.send(&NodeFrame::Report {
                key: m.key,
                nonce: m.nonce,
                kind: m.kind,
                signature: m.signature,
            });
        }
    }
}

impl Handler<Register> for RouterLink {
    type Result = ();
    fn handle(&mut self, m: Register, _: &mut Context<Self>) {
        self.miner = Some(m.addr);
        self.registration = Some(Registration {
            model: m.model.clone(),
            backend: m.backend.clone(),
            max_tasks: m.max_load,
        });
        if self.welcomed {
            self.send(&NodeFrame::Register {
                model: m.model,
                backend: m.backend,
                max_tasks: m.max_load,
            });
        }
    }
}

impl Handler<Heartbeat> for RouterLink {
    type Result = ();
    fn handle(&mut self, _: Heartbeat, _: &mut Context<Self>) {
        if self.welcomed {
            self.send(&NodeFrame::Heartbeat);
        }
    }
}

/// The node shuts down: close the connection properly and stop.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnect;

impl Handler<Disconnect> for RouterLink {
    type Result = ();
    fn handle(&mut self, _: Disconnect, ctx: &mut Context<Self>) {
        // Dropping the sender ends the writer, which sends a close frame.
        self.out = None;
        self.generation += 1;
        ctx.stop();
    }
}

impl Handler<GoOffline> for RouterLink {
    type Result = ();
    fn handle(&mut self, _: GoOffline, _: &mut Context<Self>) {
        self.registration = None;
        self.tasks.clear();
        if self.welcomed {
            self.send(&NodeFrame::Offline);
        }
    }
}
