//! Public helpers for tests that drive the network: a scripted engine (a test double for
//! orchestration tests; never what ships) and, in [`crate::testnet`], the in-process testnet.

pub mod scripted_engine;
