//! The test kit: what it takes to write actor-level fault-injection tests against the network.
//! Our own tests use it; so can anyone's.
//!
//! - [`TestnetBuilder`] starts an in-process network (scripted or real engines, the embedded
//!   ledger or an EVM) with a [`FaultPlan`] wired between its actors; [`TestNetwork`] drives
//!   it over real HTTP, applies faults, restarts it on the same data, and at the end checks
//!   the invariants ([`invariants`]) over the recorded [`crate::history::History`].
//! - [`FaultPlan`]: seeded; kills or panics actors, stalls them, delays / drops / duplicates /
//!   reorders messages between miners and the queue, corrupts miners' results, shortens
//!   deadlines, cuts the chain's RPC, fails store writes, restarts the whole network.
//! - [`scenario`]: a seeded workload run under a random plan: what CI runs for 100+ seeds.
//! - [`scripted_engine`]: a deterministic engine (a test double; never what ships).
//! - [`sse`]: a streamed response's events, as a client reads them.

pub mod chain_cut;
pub mod fault_plan;
pub mod invariants;
pub mod link;
pub mod network;
pub mod remote;
pub mod scenario;
pub mod scripted_engine;
pub mod sse;

pub use fault_plan::{Fault, FaultPlan, LinkFaults, ScheduledFault};
pub use network::{Engines, Report, TestNetwork, TestnetBuilder};
