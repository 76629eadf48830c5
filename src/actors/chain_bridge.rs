//! The bridge to the chain: one actor owns the [`Chain`] implementation, so every session and
//! balance change is serialized through it. The embedded ledger answers in microseconds (its
//! only flushes are for session creation and deposits); a chain that blocks on RPC round trips
//! must run this actor on an arbiter of its own.

use crate::chain::{Chain, ChainError};
use crate::session::{Session, SessionParams};
use crate::task::TaskKey;
use actix::prelude::*;

pub struct ChainBridge {
    chain: Box<dyn Chain>,
}

impl ChainBridge {
    pub fn new(chain: Box<dyn Chain>) -> Self {
        Self { chain }
    }
}

impl Actor for ChainBridge {
    type Context = Context<Self>;
}

#[derive(Message)]
#[rtype(result = "Result<Session, ChainError>")]
pub struct CreateSession {
    pub owner: String,
    pub params: SessionParams,
    pub deposit: u64,
}

#[derive(Message)]
#[rtype(result = "Result<Option<Session>, ChainError>")]
pub struct GetSession(pub u64);

#[derive(Message)]
#[rtype(result = "Result<Vec<Session>, ChainError>")]
pub struct ListSessions;

#[derive(Message)]
#[rtype(result = "Result<Session, ChainError>")]
pub struct Hold {
    pub session_id: u64,
    pub amount: u64,
}

#[derive(Message)]
#[rtype(result = "Result<Session, ChainError>")]
pub struct ReleaseHold {
    pub session_id: u64,
    pub amount: u64,
}

#[derive(Message)]
#[rtype(result = "Result<Session, ChainError>")]
pub struct Settle {
    pub task: TaskKey,
    pub hold: u64,
    pub charge: u64,
    pub payees: Vec<String>,
}

#[derive(Message)]
#[rtype(result = "Result<u64, ChainError>")]
pub struct NodePendingPayment(pub String);

impl Handler<CreateSession> for ChainBridge {
    type Result = Result<Session, ChainError>;
    fn handle(&mut self, m: CreateSession, _: &mut Context<Self>) -> Self::Result {
        self.chain.create_session(&m.owner, m.params, m.deposit)
    }
}

impl Handler<GetSession> for ChainBridge {
    type Result = Result<Option<Session>, ChainError>;
    fn handle(&mut self, m: GetSession, _: &mut Context<Self>) -> Self::Result {
        self.chain.session(m.0)
    }
}

impl Handler<ListSessions> for ChainBridge {
    type Result = Result<Vec<Session>, ChainError>;
    fn handle(&mut self, _: ListSessions, _: &mut Context<Self>) -> Self::Result {
        self.chain.sessions()
    }
}

impl Handler<Hold> for ChainBridge {
    type Result = Result<Session, ChainError>;
    fn handle(&mut self, m: Hold, _: &mut Context<Self>) -> Self::Result {
        self.chain.hold(m.session_id, m.amount)
    }
}

impl Handler<ReleaseHold> for ChainBridge {
    type Result = Result<Session, ChainError>;
    fn handle(&mut self, m: ReleaseHold, _: &mut Context<Self>) -> Self::Result {
        self.chain.release_hold(m.session_id, m.amount)
    }
}

impl Handler<Settle> for ChainBridge {
    type Result = Result<Session, ChainError>;
    fn handle(&mut self, m: Settle, _: &mut Context<Self>) -> Self::Result {
        self.chain.settle(m.task, m.hold, m.charge, &m.payees)
    }
}

impl Handler<NodePendingPayment> for ChainBridge {
    type Result = Result<u64, ChainError>;
    fn handle(&mut self, m: NodePendingPayment, _: &mut Context<Self>) -> Self::Result {
        self.chain.node_pending_payment(&m.0)
    }
}
