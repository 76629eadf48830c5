//! The router's stand-in for a node on another host, one per node WebSocket connection. It
//! logs the node in (`nodes::protocol`: a challenge signed with the node key; a validator
//! only with a key the pool admitted, `AdmitValidators`), then plays the
//! node's part towards the router's actors: the pool gets its registration and heartbeats as
//! from a local miner, the queue sends it `ToMiner` (and validators' `Validate`) and gets its
//! reports, so the session queue treats local and remote miners alike.
//!
//! The connection is gone when the socket closes, when the node is silent for
//! `offline_after`, or when it cannot keep up with what is sent to it (a bounded outbox). The
//! gateway then tells the pool the node is offline and the queue to hand its tasks to others.

use super::messages::{MinerReport, ToMiner};
use super::node_pool::{GoOffline, Heartbeat, NodePool, Register, ValidatorAdmitted};
use super::validator::Validate;
use crate::nodes::gateway::{Joined, Left, NodeGateway};
use crate::nodes::protocol::{self, NodeFrame, NodeRole, RouterFrame, WireValidate};
use crate::validation::consensus::Evidence;
use actix::prelude::*;
use actix_ws::AggregatedMessage;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Frames waiting to be written to one node; a node that lets more pile up is too slow and
/// is disconnected.
pub const OUTBOX_FRAMES: usize = 1024;
/// The longest backend name a miner may announce (and model name the router repeats).
pub const MAX_BACKEND_BYTES: usize = 64;
/// Validations in flight to one remote validator.
pub const MAX_PENDING_VALIDATIONS: usize = 256;

/// What every connection needs from the router.
#[derive(Clone)]
pub struct NodeLinks {
    pub gateway: Addr<NodeGateway>,
    pub queue: Recipient<MinerReport>,
    pub pool: Addr<NodePool>,
    /// The models this router serves (a miner announcing another is refused).
    pub models: Vec<String>,
    /// Tasks one miner may hold at most (a miner announcing more gets this).
    pub max_tasks: usize,
    pub heartbeat: Duration,
    pub offline_after: Duration,
    /// A node must log in within this long of connecting.
    pub login_timeout: Duration,
}

enum Outgoing {
    Text(String),
    Pong(actix_web::web::Bytes),
    Close(Option<String>),
}

#[derive(Clone, Debug)]
struct Node {
    id: String,
    address: ethers::types::Address,
    role: NodeRole,
}

pub struct RemoteNode {
    links: NodeLinks,
    connection: u64,
    peer: String,
    challenge: String,
    out: mpsc::Sender<Outgoing>,
    node: Option<Node>,
    last_heard: Instant,
    /// Validations asked of a remote validator: the task each is about, and who waits.
    validations: HashMap<u64, (crate::task::TaskKey, oneshot::Sender<Evidence>)>,
    next_validation: u64,
}

impl RemoteNode {
    /// Starts the stand-in for a freshly accepted socket; the node must log in first.
    pub fn start(
        links: NodeLinks,
        connection: u64,
        peer: String,
        session: actix_ws::Session,
        stream: actix_ws::AggregatedMessageStream,
    ) -> Addr<RemoteNode> {
        let (out, rx) = mpsc::channel(OUTBOX_FRAMES);
        actix_rt::spawn(write_frames(session, rx));
        RemoteNode::create(move |ctx| {
            ctx.add_stream(stream);
            RemoteNode {
                links,
                connection,
                peer,
                challenge: protocol::new_challenge(),
                out,
                node: None,
                last_heard: Instant::now(),
                validations: HashMap::new(),
                next_validation: 0,
            }
        })
    }

    fn send(&mut self, frame: &RouterFrame, ctx: &mut Context<Self>) {
        self.push(Outgoing::Text(protocol::encode(frame)), ctx);
    }

    fn push(&mut self, item: Outgoing, ctx: &mut Context<Self>) {
        if self.out.try_send(item).is_err() {
            tracing::warn!(peer = %self.peer, node = ?self.node.as_ref().map(|n| &n.id), "the node does not keep up with its frames: disconnected");
            ctx.stop();
        }
    }

    /// Ends the connection, telling the node why.
    fn reject(&mut self, reason: String, retry: bool, ctx: &mut Context<Self>) {
        tracing::warn!(peer = %self.peer, node = ?self.node.as_ref().map(|n| &n.id), %reason, "node connection refused");
        self.send(
            &RouterFrame::Rejected {
                reason: reason.clone(),
                retry,
            },
            ctx,
        );
        let _ = self.out.try_send(Outgoing::Close(Some(reason)));
        ctx.stop();
    }

    fn on_frame(&mut self, frame: NodeFrame, ctx: &mut Context<Self>) {
        let Some(node) = self.node.clone() else {
            return self.login(frame, ctx);
        };
        match (frame, node.role) {
            (NodeFrame::Hello { .. }, _) => {
                self.reject("already logged in".into(), false, ctx);
            }
            (
                NodeFrame::Register {
                    model,
                    backend,
                    max_tasks,
                },
                NodeRole::Miner,
            ) => {
                if !self.links.models.contains(&model) {
                    // The name is echoed back (and logged) only when it is short.
                    let named = match model.len() {
                        0..=MAX_BACKEND_BYTES => format!("{model:?}"),
                        n => format!("a model name of {n} bytes"),
                    };
                    let reason = format!("this router serves {:?}, not {named}", self.links.models);
                    return self.reject(reason, false, ctx);
                }
                if backend.len() > MAX_BACKEND_BYTES {
                    let reason = format!(
                        "a backend name of {} bytes is over the limit of {MAX_BACKEND_BYTES}",
                        backend.len()
                    );
                    return self.reject(reason, false, ctx);
                }
                tracing::info!(node = %node.id, peer = %self.peer, %model, %backend, "remote miner registered");
                self.links.pool.do_send(Register {
                    id: node.id.clone(),
                    address: node.address,
                    model,
                    backend,
                    max_load: max_tasks.clamp(1, self.links.max_tasks),
                    addr: ctx.address().recipient(),
                });
            }
            (NodeFrame::Heartbeat, NodeRole::Miner) => {
                self.links.pool.do_send(Heartbeat { id: node.id });
            }
            (NodeFrame::Heartbeat, NodeRole::Validator) => {}
            (NodeFrame::Offline, NodeRole::Miner) => {
                self.links.pool.do_send(GoOffline { id: node.id });
            }
            (
                NodeFrame::Report {
                    key,
                    nonce,
                    kind,
                    signature,
                },
                NodeRole::Miner,
            ) => {
                // The report speaks for the node that logged in, whatever it claims: its
                // signature is then checked against that node's key by the queue.
                self.links.queue.do_send(MinerReport {
                    key,
                    miner: node.id,
                    nonce,
                    kind,
                    signature,
                });
            }
            (NodeFrame::ValidatorReady, NodeRole::Validator) => {
                tracing::info!(node = %node.id, peer = %self.peer, "remote validator ready");
                self.links
                    .gateway
                    .do_send(crate::nodes::gateway::ValidatorReady {
                        id: node.id,
                        connection: self.connection,
                        validator: ctx.address().recipient(),
                    });
            }
            (
                NodeFrame::Evidence {
                    id,
                    evidence,
                    signature,
                },
                NodeRole::Validator,
            ) => {
                let Some((key, waiting)) = self.validations.remove(&id) else {
                    return;
                };
                let opened = protocol::open_evidence(
                    &self.challenge,
                    id,
                    key,
                    &evidence,
                    &signature,
                    node.address,
                );
                let evidence = match opened {
                    Ok(mut evidence) => {
                        evidence.validator = node.id;
                        evidence
                    }
                    Err(e) => {
                        tracing::warn!(node = %node.id, task = %key, error = %e, "remote evidence refused");
                        failed_evidence(node.id, &format!("evidence refused: {e}"))
                    }
                };
                let _ = waiting.send(evidence);
            }
            (frame, role) => {
                let reason = format!("a {role:?} node may not send {}", frame_name(&frame));
                self.reject(reason, false, ctx);
            }
        }
    }

    fn login(&mut self, frame: NodeFrame, ctx: &mut Context<Self>) {
        let NodeFrame::Hello {
            version,
            role,
            address,
            signature,
        } = frame
        else {
            return self.reject(
                format!("expected hello, got {}", frame_name(&frame)),
                false,
                ctx,
            );
        };
        if let Err(e) = protocol::verify_hello(&self.challenge, version, role, address, &signature)
        {
            return self.reject(e.to_string(), false, ctx);
        }
        let node = Node {
            id: protocol::node_id(address),
            address,
            role,
        };
        if role == NodeRole::Validator {
            // A validator decides verdicts: only keys the operator admitted may be one. Nothing
            // else from the node is read until the pool answers.
            let admitted = self.links.pool.send(ValidatorAdmitted(address));
            ctx.wait(
                admitted
                    .into_actor(self)
                    .map(move |admitted, this, ctx| match admitted {
                        Ok(true) => this.logged_in(node, ctx),
                        Ok(false) => this.reject(
                            format!(
                                "validator {} is not admitted: its address is not on this router's validator allow-list (nodes.validators_allowed)",
                                node.id
                            ),
                            false,
                            ctx,
                        ),
                        Err(_) => this.reject("the router cannot admit validators now".into(), true, ctx),
                    }),
            );
            return;
        }
        self.logged_in(node, ctx);
    }

    fn logged_in(&mut self, node: Node, ctx: &mut Context<Self>) {
        let role = node.role;
        tracing::info!(node = %node.id, ?role, peer = %self.peer, "node logged in");
        self.links.gateway.do_send(Joined {
            id: node.id.clone(),
            connection: self.connection,
            node: ctx.address(),
        });
        self.send(
            &RouterFrame::Welcome {
                node: node.id.clone(),
                heartbeat_ms: self.links.heartbeat.as_millis() as u64,
                offline_after_ms: self.links.offline_after.as_millis() as u64,
            },
            ctx,
        );
        self.node = Some(node);
    }
}

/// What a validation that got no usable answer counts as: the validator could not check.
fn failed_evidence(validator: String, why: &str) -> Evidence {
    Evidence {
        validator,
        miners: vec![],
        errors: vec![why.to_string()],
    }
}

fn frame_name(frame: &NodeFrame) -> &'static str {
    match frame {
        NodeFrame::Hello { .. } => "hello",
        NodeFrame::Register { .. } => "register",
        NodeFrame::ValidatorReady => "validator_ready",
        NodeFrame::Heartbeat => "heartbeat",
        NodeFrame::Offline => "offline",
        NodeFrame::Report { .. } => "report",
        NodeFrame::Evidence { .. } => "evidence",
    }
}

/// Writes queued frames to the socket in order; ends (closing it) when the actor drops its
/// sender or the socket fails.
async fn write_frames(mut session: actix_ws::Session, mut rx: mpsc::Receiver<Outgoing>) {
    let mut reason = None;
    while let Some(item) = rx.recv().await {
        let sent = match item {
            Outgoing::Text(text) => session.text(text).await,
            Outgoing::Pong(bytes) => session.pong(&bytes).await,
            Outgoing::Close(why) => {
                reason = why;
                break;
            }
        };
        if sent.is_err() {
            return;
        }
    }
    let close = reason.map(|r| actix_ws::CloseReason {
        code: actix_ws::CloseCode::Policy,
        description: Some(r.chars().take(120).collect()),
    });
    let _ = session.close(close).await;
}

impl Actor for RemoteNode {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let challenge = RouterFrame::Challenge {
            versions: [protocol::MIN_VERSION, protocol::PROTOCOL_VERSION],
            challenge: self.challenge.clone(),
        };
        self.send(&challenge, ctx);
        let login_timeout = self.links.login_timeout;
        ctx.run_later(login_timeout, move |node, ctx| {
            if node.node.is_none() {
                let reason = format!("no login within {login_timeout:?}");
                node.reject(reason, true, ctx);
            }
        });
        ctx.run_interval(self.links.heartbeat, |node, ctx| {
            // Validations the queue gave up waiting for.
            node.validations.retain(|_, (_, waiting)| !waiting.is_closed());
            if node.last_heard.elapsed() > node.links.offline_after {
                tracing::warn!(node = ?node.node.as_ref().map(|n| &n.id), peer = %node.peer, silent = ?node.last_heard.elapsed(), "remote node silent: taken as gone");
                ctx.stop();
                return;
            }
            node.send(&RouterFrame::Ping, ctx);
        });
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        let _ = self.out.try_send(Outgoing::Close(None));
        if let Some(node) = &self.node {
            tracing::info!(node = %node.id, peer = %self.peer, "node connection closed");
        }
        // Also when it never logged in: the gateway counts connections waiting for a login.
        self.links.gateway.do_send(Left {
            id: self.node.as_ref().map(|n| n.id.clone()),
            connection: self.connection,
        });
    }
}

impl StreamHandler<Result<AggregatedMessage, actix_ws::ProtocolError>> for RemoteNode {
    fn handle(
        &mut self,
        item: Result<AggregatedMessage, actix_ws::ProtocolError>,
        ctx: &mut Context<Self>,
    ) {
        self.last_heard = Instant::now();
        match item {
            Ok(AggregatedMessage::Text(text)) => match protocol::decode::<NodeFrame>(&text) {
                Ok(frame) => self.on_frame(frame, ctx),
                Err(e) => self.reject(e.to_string(), false, ctx),
            },
            Ok(AggregatedMessage::Binary(_)) => {
                self.reject("frames are JSON text, not binary".into(), false, ctx)
            }
            Ok(AggregatedMessage::Ping(bytes)) => self.push(Outgoing::Pong(bytes), ctx),
            Ok(AggregatedMessage::Pong(_)) => {}
            Ok(AggregatedMessage::Close(_)) => ctx.stop(),
            Err(actix_ws::ProtocolError::Io(e)) => {
                tracing::info!(peer = %self.peer, error = %e, "node connection dropped");
                ctx.stop();
            }
            Err(e) => {
                // Oversized frames end here: the socket cannot be read past them.
                let reason = format!("websocket protocol error: {e}");
                self.reject(reason, false, ctx);
            }
        }
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

/// The gateway closes a connection a newer login of the same node replaced.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Replaced;

impl Handler<Replaced> for RemoteNode {
    type Result = ();
    fn handle(&mut self, _: Replaced, ctx: &mut Context<Self>) {
        self.node = None; // the newer connection speaks for the node now
        self.reject("replaced by a newer login of this node".into(), false, ctx);
    }
}

impl Handler<ToMiner> for RemoteNode {
    type Result = ();
    fn handle(&mut self, m: ToMiner, ctx: &mut Context<Self>) {
        let frame = match m {
            ToMiner::Assign {
                key,
                nonce,
                request,
                stream_tokens,
            } => RouterFrame::Assign {
                key,
                nonce,
                request,
                stream_tokens,
            },
            ToMiner::Reveal { key } => RouterFrame::Reveal { key },
            ToMiner::Cancel { key } => RouterFrame::Cancel { key },
        };
        self.send(&frame, ctx);
    }
}

impl Handler<Validate> for RemoteNode {
    type Result = ResponseFuture<Evidence>;
    fn handle(&mut self, m: Validate, ctx: &mut Context<Self>) -> Self::Result {
        let validator = self.node.as_ref().map(|n| n.id.clone()).unwrap_or_default();
        let failed = move |why: &str| failed_evidence(validator.clone(), why);
        if self.validations.len() >= MAX_PENDING_VALIDATIONS {
            let evidence = failed("the remote validator has too many validations in flight");
            return Box::pin(async move { evidence });
        }
        self.next_validation += 1;
        let id = self.next_validation;
        let (tx, rx) = oneshot::channel();
        self.validations.insert(id, (m.key, tx));
        let frame = RouterFrame::Validate {
            id,
            validate: WireValidate {
                key: m.key,
                request: m.request,
                results: m.results,
                plan: m.plan,
                seeded: m.seeded,
            },
        };
        self.send(&frame, ctx);
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| failed("the remote validator's connection was lost"))
        })
    }
}
