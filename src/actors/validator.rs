//! A validator: decides which committed results a task accepts. Here, the majority of equal
//! results (by their keccak256); embedding and likelihood checks come with richer validation.

use super::messages::Verdict;
use crate::task::{majority, TaskKey, TaskResult};
use actix::prelude::*;

pub struct Validator {
    pub id: String,
    pub verdicts: u64,
}

impl Validator {
    pub fn new(id: String) -> Self {
        Self { id, verdicts: 0 }
    }
}

impl Actor for Validator {
    type Context = Context<Self>;
}

impl Supervised for Validator {}

/// Decide on the committed results of one task: (miner, result) pairs.
#[derive(Message, Clone)]
#[rtype(result = "Verdict")]
pub struct Validate {
    pub key: TaskKey,
    pub results: Vec<(String, TaskResult)>,
}

impl Handler<Validate> for Validator {
    type Result = MessageResult<Validate>;
    fn handle(&mut self, m: Validate, _: &mut Context<Self>) -> Self::Result {
        self.verdicts += 1;
        let pairs: Vec<(&str, &TaskResult)> = m
            .results
            .iter()
            .map(|(miner, r)| (miner.as_str(), r))
            .collect();
        MessageResult(majority(&pairs))
    }
}
