//! The router's node WebSocket (Cortensor's port 9001): remote miners and validators connect
//! here, each connection gets a [`RemoteNode`] stand-in, and the [`NodeGateway`] actor keeps
//! which connection speaks for which node. A node that logs in again (after its link came
//! back) replaces its older connection; only the current connection's end takes the node
//! offline and hands its tasks to other miners.

use crate::actors::messages::MinerReport;
use crate::actors::node_pool::{GoOffline, NodePool};
use crate::actors::remote_node::{NodeLinks, RemoteNode, Replaced};
use crate::actors::session_queue::{JoinValidator, LeaveValidator, NodeLost, SessionQueue};
use crate::actors::validator::Validate;
use crate::nodes::protocol::MAX_FRAME_BYTES;
use actix::prelude::*;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use std::collections::HashMap;
use std::net::{IpAddr, TcpListener};
use std::time::Duration;

/// Logged-in nodes at once; more connections are refused with 503 until some close.
pub const MAX_CONNECTIONS: usize = 4096;

/// How many connections may wait for their login at once: in all, and from one address.
/// Beyond either, a new connection is refused with 503 before its WebSocket opens.
#[derive(Clone, Copy, Debug)]
pub struct LoginLimits {
    pub total: usize,
    pub per_address: usize,
}

pub struct NodeGateway {
    queue: Addr<SessionQueue>,
    pool: Addr<NodePool>,
    /// Node id → (its current connection, its stand-in).
    current: HashMap<String, (u64, Addr<RemoteNode>)>,
    next_connection: u64,
    limits: LoginLimits,
    /// Connections not logged in yet → the address they came from.
    unauthenticated: HashMap<u64, IpAddr>,
    /// Per address: how many of them came from it.
    unauthenticated_from: HashMap<IpAddr, usize>,
}

impl NodeGateway {
    pub fn new(queue: Addr<SessionQueue>, pool: Addr<NodePool>, limits: LoginLimits) -> Self {
        Self {
            queue,
            pool,
            current: HashMap::new(),
            next_connection: 0,
            limits,
            unauthenticated: HashMap::new(),
            unauthenticated_from: HashMap::new(),
        }
    }

    /// The connection is no longer waiting for its login (it logged in, or it ended).
    fn authenticated_or_gone(&mut self, connection: u64) {
        let Some(ip) = self.unauthenticated.remove(&connection) else {
            return;
        };
        if let Some(n) = self.unauthenticated_from.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.unauthenticated_from.remove(&ip);
            }
        }
    }
}

impl Actor for NodeGateway {
    type Context = Context<Self>;
}

/// A number for a new connection from `from`, or why there is none.
#[derive(Message)]
#[rtype(result = "Result<u64, &'static str>")]
pub struct Accept {
    pub from: IpAddr,
}

impl Handler<Accept> for NodeGateway {
    type Result = Result<u64, &'static str>;
    fn handle(&mut self, m: Accept, _: &mut Context<Self>) -> Self::Result {
        if self.current.len() >= MAX_CONNECTIONS {
            return Err("too many node connections");
        }
        if self.unauthenticated.len() >= self.limits.total {
            return Err("too many connections waiting for their login");
        }
        let from_here = self.unauthenticated_from.get(&m.from).copied().unwrap_or(0);
        if from_here >= self.limits.per_address {
            return Err("too many connections from this address waiting for their login");
        }
        self.next_connection += 1;
        let connection = self.next_connection;
        self.unauthenticated.insert(connection, m.from);
        *self.unauthenticated_from.entry(m.from).or_default() += 1;
        Ok(connection)
    }
}

/// A connection logged in as `id`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Joined {
    pub id: String,
    pub connection: u64,
    pub node: Addr<RemoteNode>,
}

impl Handler<Joined> for NodeGateway {
    type Result = ();
    fn handle(&mut self, m: Joined, _: &mut Context<Self>) {
        self.authenticated_or_gone(m.connection);
        if let Some((_, older)) = self.current.insert(m.id, (m.connection, m.node)) {
            older.do_send(Replaced);
        }
    }
}

/// A remote validator is ready for work.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ValidatorReady {
    pub id: String,
    pub connection: u64,
    pub validator: Recipient<Validate>,
}

impl Handler<ValidatorReady> for NodeGateway {
    type Result = ();
    fn handle(&mut self, m: ValidatorReady, _: &mut Context<Self>) {
        if self.current.get(&m.id).map(|(c, _)| *c) == Some(m.connection) {
            self.queue.do_send(JoinValidator {
                id: m.id,
                validator: m.validator,
            });
        }
    }
}

/// A connection ended; `id` is the node it logged in as (none if it never did).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Left {
    pub id: Option<String>,
    pub connection: u64,
}

impl Handler<Left> for NodeGateway {
    type Result = ();
    fn handle(&mut self, m: Left, _: &mut Context<Self>) {
        self.authenticated_or_gone(m.connection);
        let Some(id) = m.id else {
            return;
        };
        if self.current.get(&id).map(|(c, _)| *c) != Some(m.connection) {
            return; // a replaced connection: the node lives on in the newer one
        }
        self.current.remove(&id);
        self.pool.do_send(GoOffline { id: id.clone() });
        self.queue.do_send(LeaveValidator { id: id.clone() });
        self.queue.do_send(NodeLost { miner: id });
    }
}

/// How many nodes are connected and logged in.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct ConnectedNodes;

impl Handler<ConnectedNodes> for NodeGateway {
    type Result = usize;
    fn handle(&mut self, _: ConnectedNodes, _: &mut Context<Self>) -> usize {
        self.current.len()
    }
}

/// What the node server needs: everything a connection's stand-in gets.
#[derive(Clone)]
pub struct GatewaySettings {
    pub models: Vec<String>,
    pub max_tasks: usize,
    pub heartbeat: Duration,
    pub offline_after: Duration,
    /// A connection not logged in this long after it opened is closed.
    pub login_timeout: Duration,
}

/// Serves the node WebSocket on `listener` (at `/` and `/node`).
pub fn serve(
    gateway: Addr<NodeGateway>,
    queue: Recipient<MinerReport>,
    pool: Addr<NodePool>,
    settings: GatewaySettings,
    listener: TcpListener,
    tls: Option<rustls::ServerConfig>,
) -> std::io::Result<actix_web::dev::Server> {
    let links = NodeLinks {
        gateway,
        queue,
        pool,
        models: settings.models,
        max_tasks: settings.max_tasks,
        heartbeat: settings.heartbeat,
        offline_after: settings.offline_after,
        login_timeout: settings.login_timeout,
    };
    let data = web::Data::new(links);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .route("/", web::get().to(connect))
            .route("/node", web::get().to(connect))
    })
    // Frames are small and latency matters: no Nagle delay on the router's side either.
    .on_connect(|connection, _| {
        if let Some(tcp) = connection.downcast_ref::<actix_web::rt::net::TcpStream>() {
            let _ = tcp.set_nodelay(true);
        }
    })
    .workers(2)
    .disable_signals()
    .shutdown_timeout(1);
    let server = match tls {
        Some(tls) => server.listen_rustls_0_21(listener, tls)?,
        None => server.listen(listener)?,
    };
    Ok(server.run())
}

async fn connect(
    req: HttpRequest,
    body: web::Payload,
    links: web::Data<NodeLinks>,
) -> actix_web::Result<HttpResponse> {
    let address = req.peer_addr();
    let peer = address
        .map(|a| a.to_string())
        .unwrap_or_else(|| "unknown".into());
    let from = address.map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip());
    let accepted = links
        .gateway
        .send(Accept { from })
        .await
        .unwrap_or(Err("the node gateway is not running"));
    let connection = match accepted {
        Ok(connection) => connection,
        Err(why) => {
            tracing::warn!(%peer, why, "node connection refused");
            return Ok(HttpResponse::ServiceUnavailable().json(serde_json::json!({
                "error": {"code": "overloaded", "message": why}
            })));
        }
    };
    let (response, session, stream) = match actix_ws::handle(&req, body) {
        Ok(parts) => parts,
        Err(e) => {
            links.gateway.do_send(Left {
                id: None,
                connection,
            });
            return Err(e);
        }
    };
    let stream = stream
        .max_frame_size(MAX_FRAME_BYTES)
        .aggregate_continuations()
        .max_continuation_size(MAX_FRAME_BYTES);
    RemoteNode::start(links.get_ref().clone(), connection, peer, session, stream);
    Ok(response)
}
