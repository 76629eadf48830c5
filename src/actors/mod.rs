//! The actors of one router and its nodes, one file each, and the messages they exchange.
//!
//! ```text
//! api ─SubmitTask→ Router ─ReserveTaskId→ SessionQueue, ─Hold→ ChainBridge
//!                    └─Enqueue→ SessionQueue ─SelectMiners→ NodePool
//!                                   │ └─ToMiner::Assign/Reveal/Cancel→ Miner×k ─MinerReport→ SessionQueue
//!                                   ├─Validate→ Validator ─Verdict→
//!                                   └─Settle→ ChainBridge
//! ```
//! **Invariant:** no state is shared between actors; they talk through typed messages only.
//! Each actor that blocks (sled flushes, inference) runs on an arbiter (thread) of its own.

pub mod chain_bridge;
pub mod chain_outbox;
pub mod messages;
pub mod miner;
pub mod node_pool;
pub mod peer_routers;
pub mod remote_node;
pub mod report_signing;
pub mod router;
pub mod router_link;
pub mod session_queue;
pub mod validator;
