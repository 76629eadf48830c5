//! Nodes on other hosts: the wire protocol between a router and its remote miners and
//! validators, and the router's node WebSocket that accepts them. The actors at either end
//! are `actors::remote_node` (the router's stand-in for a node) and `actors::router_link`
//! (the node's link to its router).

pub mod gateway;
pub mod protocol;
