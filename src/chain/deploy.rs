//! Deploys Cortensor's contracts and wires their roles: the session registry may hold and enqueue
//! (SESSION_CONTRACT on payment and queue); routers and reporters are granted per operator.

use super::contracts::{NodePool, NodeReputation, SessionPayment, SessionQueueV2, SessionV2};
use super::ChainError;
use ethers::prelude::*;
use std::sync::Arc;

/// Where the contracts live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Deployment {
    pub payment: Address,
    pub queue: Address,
    pub sessions: Address,
    pub nodes: Address,
    pub reputation: Address,
}

/// Successes in a row that raise a node's level, failures in a row that lower it.
pub const UPGRADE_STREAK: u64 = 5;
pub const DOWNGRADE_STREAK: u64 = 2;

fn evm<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> ChainError + '_ {
    move |e| ChainError::Evm(format!("{what}: {e}"))
}

/// Sends a transaction and waits for its receipt.
async fn confirm<M: Middleware + 'static>(
    what: &str,
    call: ContractCall<M, ()>,
) -> Result<(), ChainError> {
    let receipt = call
        .send()
        .await
        .map_err(evm(what))?
        .retries(super::evm::UNSEEN_TX_POLLS)
        .await
        .map_err(evm(what))?
        .ok_or_else(|| ChainError::Evm(format!("{what}: the transaction was dropped")))?;
    if receipt.status != Some(1u64.into()) {
        return Err(ChainError::Evm(format!("{what}: the transaction reverted")));
    }
    Ok(())
}

pub fn role(name: &str) -> [u8; 32] {
    ethers::utils::keccak256(name.as_bytes())
}

impl Deployment {
    /// Deploys every contract from `client`'s account (which becomes their ADMIN).
    pub async fn deploy<M: Middleware + 'static>(
        client: Arc<M>,
        price_per_token: U256,
        min_stake: U256,
    ) -> Result<Self, ChainError> {
        let payment = SessionPayment::deploy(client.clone(), ())
            .map_err(evm("SessionPayment"))?
            .send()
            .await
            .map_err(evm("deploying SessionPayment"))?;
        let queue = SessionQueueV2::deploy(client.clone(), ())
            .map_err(evm("SessionQueueV2"))?
            .send()
            .await
            .map_err(evm("deploying SessionQueueV2"))?;
        let sessions = SessionV2::deploy(
            client.clone(),
            (queue.address(), payment.address(), price_per_token),
        )
        .map_err(evm("SessionV2"))?
        .send()
        .await
        .map_err(evm("deploying SessionV2"))?;
        let nodes = NodePool::deploy(client.clone(), min_stake)
            .map_err(evm("NodePool"))?
            .send()
            .await
            .map_err(evm("deploying NodePool"))?;
        let reputation = NodeReputation::deploy(client.clone(), (UPGRADE_STREAK, DOWNGRADE_STREAK))
            .map_err(evm("NodeReputation"))?
            .send()
            .await
            .map_err(evm("deploying NodeReputation"))?;
        let session_contract = role("SESSION_CONTRACT");
        let granted = payment.grant_role(session_contract, sessions.address());
        confirm("granting SESSION_CONTRACT on payment", granted).await?;
        let granted = queue.grant_role(session_contract, sessions.address());
        confirm("granting SESSION_CONTRACT on the queue", granted).await?;
        Ok(Self {
            payment: payment.address(),
            queue: queue.address(),
            sessions: sessions.address(),
            nodes: nodes.address(),
            reputation: reputation.address(),
        })
    }

    /// Lets `router` enqueue, assign and end tasks, move nodes, settle payments and report
    /// reputation.
    pub async fn grant_router<M: Middleware + 'static>(
        &self,
        admin: Arc<M>,
        router: Address,
    ) -> Result<(), ChainError> {
        let (r, settle) = (role("ROUTER"), role("SESSION_CONTRACT"));
        let queue = SessionQueueV2::new(self.queue, admin.clone());
        confirm("granting ROUTER on the queue", queue.grant_role(r, router)).await?;
        // Enqueueing, for sessions that record every task stage on chain.
        let enqueue = queue.grant_role(settle, router);
        confirm("granting enqueueing on the queue", enqueue).await?;
        let nodes = NodePool::new(self.nodes, admin.clone());
        confirm(
            "granting ROUTER on the node pool",
            nodes.grant_role(r, router),
        )
        .await?;
        let payment = SessionPayment::new(self.payment, admin.clone());
        confirm("granting settlement", payment.grant_role(settle, router)).await?;
        let reputation = NodeReputation::new(self.reputation, admin);
        confirm(
            "granting REPORTER",
            reputation.grant_role(role("REPORTER"), router),
        )
        .await?;
        Ok(())
    }
}
