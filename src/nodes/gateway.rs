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
use std::net::TcpListener;
use std::time::Duration;

/// Connections accepted at once; more are refused with 503 until some close.
pub const MAX_CONNECTIONS: usize = 4096;

pub struct NodeGateway {
    queue: Addr<SessionQueue>,
    pool: Addr<NodePool>,
    /// Node id → (its current connection, its stand-in).
    current: HashMap<String, (u64, Addr<RemoteNode>)>,
    next_connection: u64,
}

impl NodeGateway {
    pub fn new(queue: Addr<SessionQueue>, pool: Addr<NodePool>) -> Self {
        Self {
            queue,
            pool,
            current: HashMap::new(),
            next_connection: 0,
        }
    }
}

impl Actor for NodeGateway {
    type Context = Context<Self>;
}

/// A number for a new connection, or none when there are too many.
#[derive(Message)]
#[rtype(result = "Option<u64>")]
pub struct Accept;

impl Handler<Accept> for NodeGateway {
    type Result = Option<u64>;
    fn handle(&mut self, _: Accept, _: &mut Context<Self>) -> Option<u64> {
        if self.current.len() >= MAX_CONNECTIONS {
            return None;
        }
        self.next_connection += 1;
        Some(self.next_connection)
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

/// A connection ended.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Left {
    pub id: String,
    pub connection: u64,
}

impl Handler<Left> for NodeGateway {
    type Result = ();
    fn handle(&mut self, m: Left, _: &mut Context<Self>) {
        if self.current.get(&m.id).map(|(c, _)| *c) != Some(m.connection) {
            return; // a replaced connection: the node lives on in the newer one
        }
        self.current.remove(&m.id);
        self.pool.do_send(GoOffline { id: m.id.clone() });
        self.queue.do_send(LeaveValidator { id: m.id.clone() });
        self.queue.do_send(NodeLost { miner: m.id });
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
    let peer = req
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|| "unknown".into());
    let Ok(Some(connection)) = links.gateway.send(Accept).await else {
        return Ok(HttpResponse::ServiceUnavailable().json(serde_json::json!({
            "error": {"code": "overloaded", "message": "too many node connections"}
        })));
    };
    let (response, session, stream) = actix_ws::handle(&req, body)?;
    let stream = stream
        .max_frame_size(MAX_FRAME_BYTES)
        .aggregate_continuations()
        .max_continuation_size(MAX_FRAME_BYTES);
    RemoteNode::start(links.get_ref().clone(), connection, peer, session, stream);
    Ok(response)
}
