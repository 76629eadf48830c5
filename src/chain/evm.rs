//! `EvmChain`: the [`Chain`] semantics on Cortensor's contracts, through ethers, on anvil or any
//! EVM node. The router's wallet creates sessions (the API-level owner is kept in the session's
//! metadata), is each session's router, and holds and settles through `SessionPayment`.
//! Nodes whose keys this process holds ([`NodeKey`]) are paid at their wallets' addresses and
//! send their own stages and withdrawals; other nodes are paid at a pseudo-address derived from
//! their id (which nobody can withdraw from).
//!
//! `Chain` is synchronous; ethers is async. Calls go to a thread of this chain's own that runs
//! a tokio runtime, and the caller blocks on the answer: run the chain bridge on an arbiter of
//! its own when it holds an `EvmChain`. A call that panics answers an error; the thread and
//! its runtime carry on (rebuilt if the panic escaped the call), so later calls are served.
//!
//! **Values from the chain are untrusted.** Anyone can call `depositToSession` with more than
//! `u64::MAX` wei, so every number read back is converted without a panic: amounts (balances,
//! payments, token counts) saturate at `u64::MAX` (see [`session_funds`] for a session's),
//! ids and counts beyond `u64` are errors.

use super::contracts::session_payment::SessionPaymentErrors;
use super::contracts::session_v2::{Params, SessionV2Errors};
use super::contracts::{NodeReputation, SessionPayment, SessionQueueV2, SessionV2};
use super::deploy::Deployment;
use super::node_key::NodeKey;
use super::{
    split_payment, Chain, ChainError, HoldRequest, MinerTrace, NodeOutcome, NodeStats, Settlement,
    TaskTrace,
};
use crate::session::{Session, SessionMode, SessionParams, Sla};
use crate::task::TaskKey;
use ethers::abi::AbiEncode;
use ethers::contract::ContractError;
use ethers::prelude::*;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

/// Anvil's first development account (its well-known key): funded on every fresh anvil.
pub const ANVIL_DEV_KEY: &str =
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
/// How often receipts are polled.
pub const RECEIPT_POLL: Duration = Duration::from_millis(20);
/// Sends of one transaction at most (the first try and retries with back-off).
pub const MAX_SEND_ATTEMPTS: u32 = 4;
/// Polls a sent transaction may go unseen before it counts as dropped. ethers' default of 3
/// is 60 ms at [`RECEIPT_POLL`]: short enough for a loaded machine to call a transaction
/// dropped before the node shows it (the likely cause of a contract test's failure under CI
/// load, where a report went uncounted).
pub const UNSEEN_TX_POLLS: usize = 100;

type Client = SignerMiddleware<Provider<Http>, LocalWallet>;
type Job = Box<dyn FnOnce(Arc<Client>, Deployment) -> BoxFuture<'static, ()> + Send>;

pub struct EvmChain {
    jobs: std::sync::mpsc::Sender<Job>,
    pub deployment: Deployment,
    pub address: Address,
    chain_id: u64,
    nodes: Arc<NodeBook>,
}

/// The nodes whose keys this process holds.
#[derive(Default)]
struct NodeBook {
    wallets: HashMap<String, LocalWallet>,
    names: HashMap<Address, String>,
}

impl NodeBook {
    /// Where a node is paid: its wallet, else the pseudo-address of its id.
    fn address(&self, node: &str) -> Address {
        self.wallets
            .get(node)
            .map(|w| w.address())
            .unwrap_or_else(|| node_address(node))
    }

    /// A node's id for an address (the address itself when the node is not known here).
    fn name(&self, address: Address) -> String {
        self.names
            .get(&address)
            .cloned()
            .unwrap_or_else(|| format!("{address:?}"))
    }

    /// A client that signs as the node.
    fn client(&self, c: &Client, node: &str) -> Result<Arc<Client>, ChainError> {
        let wallet = self
            .wallets
            .get(node)
            .ok_or_else(|| ChainError::NoWallet(node.to_string()))?;
        Ok(Arc::new(SignerMiddleware::new(
            c.inner().clone(),
            wallet.clone(),
        )))
    }
}

fn evm<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> ChainError {
    move |e| ChainError::Evm(format!("{what}: {e}"))
}

/// An amount read from the chain (wei, tokens), as this router counts it: saturated at
/// `u64::MAX` when the chain holds more.
pub fn saturating_u64(v: U256) -> u64 {
    if v > U256::from(u64::MAX) {
        u64::MAX
    } else {
        v.low_u64()
    }
}

/// An id or a count read from the chain: beyond `u64` it is an error (nothing this router
/// made can be numbered so high).
fn id_u64(what: &'static str, v: U256) -> Result<u64, ChainError> {
    if v > U256::from(u64::MAX) {
        return Err(ChainError::Evm(format!(
            "{what} {v} is beyond what this router counts (u64)"
        )));
    }
    Ok(v.low_u64())
}

/// A session's funds on chain as `(balance, held, spent, deposit)` in `u64`. Anyone can
/// deposit to any session, so the chain may hold more than `u64::MAX` wei for one: its total
/// (the deposit) then saturates at `u64::MAX`, `spent` and `held` stay exact while they fit,
/// and `balance` is what fits beside them. So `deposit = balance + held + spent` always holds
/// without overflow, and a balance read as `u64::MAX - held - spent` may be more on chain.
pub fn session_funds(balance: U256, held: U256, spent: U256) -> (u64, u64, u64, u64) {
    let cap = U256::from(u64::MAX);
    let spent = spent.min(cap);
    let held = held.min(cap - spent);
    let balance = balance.min(cap - spent - held);
    let (balance, held, spent) = (balance.low_u64(), held.low_u64(), spent.low_u64());
    (balance, held, spent, balance + held + spent)
}

/// The address a node id is paid at when it has no wallet of its own.
pub fn node_address(node: &str) -> Address {
    if let Ok(a) = node.parse::<Address>() {
        return a;
    }
    Address::from_slice(
        &ethers::utils::keccak256(format!("cortensor-node:{node}").as_bytes())[12..],
    )
}

fn client(url: &str, key: &str) -> Result<(Arc<Client>, u64), ChainError> {
    let provider = Provider::<Http>::try_from(url)
        .map_err(evm("the RPC URL"))?
        .interval(RECEIPT_POLL);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(evm("runtime"))?;
    let chain_id = id_u64(
        "the chain id",
        rt.block_on(provider.get_chainid())
            .map_err(evm("eth_chainId"))?,
    )?;
    let wallet: LocalWallet = key
        .trim()
        .parse::<LocalWallet>()
        .map_err(evm("the private key"))?
        .with_chain_id(chain_id);
    Ok((Arc::new(SignerMiddleware::new(provider, wallet)), chain_id))
}

impl EvmChain {
    /// Deploys fresh contracts from `key`'s account (which becomes their admin and the router).
    pub fn deploy(url: &str, key: &str, price_per_token: u64) -> Result<Self, ChainError> {
        let (c, _) = client(url, key)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(evm("runtime"))?;
        let deployment = rt.block_on(async {
            let d =
                Deployment::deploy(c.clone(), U256::from(price_per_token), U256::exp10(15)).await?;
            d.grant_router(c.clone(), c.address()).await?;
            Ok::<_, ChainError>(d)
        })?;
        drop(rt);
        Self::attach(url, key, deployment)
    }

    /// Uses contracts already deployed at `deployment`.
    pub fn attach(url: &str, key: &str, deployment: Deployment) -> Result<Self, ChainError> {
        let (c, chain_id) = client(url, key)?;
        let address = c.address();
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("evm-chain".into())
            .spawn(move || {
                let runtime = || {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                };
                let Ok(mut rt) = runtime() else {
                    return;
                };
                while let Ok(job) = rx.recv() {
                    // `call` turns a job's panic into its answer; this catches one that
                    // escaped it, and the thread starts over on a fresh runtime.
                    let run = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        rt.block_on(job(c.clone(), deployment))
                    }));
                    if run.is_err() {
                        tracing::error!("a chain call panicked on the chain thread; it restarts");
                        match runtime() {
                            Ok(fresh) => rt = fresh,
                            Err(_) => return,
                        }
                    }
                }
            })
            .map_err(evm("the chain thread"))?;
        Ok(Self {
            jobs: tx,
            deployment,
            address,
            chain_id,
            nodes: Arc::default(),
        })
    }

    /// Pays these nodes at their wallets and lets them send their own transactions.
    pub fn with_node_keys(mut self, keys: &[NodeKey]) -> Self {
        let mut book = NodeBook::default();
        for k in keys {
            let wallet = k.wallet.clone().with_chain_id(self.chain_id);
            book.names.insert(wallet.address(), k.node.clone());
            book.wallets.insert(k.node.clone(), wallet);
        }
        self.nodes = Arc::new(book);
        self
    }

    /// Grants another router's account the router's roles (this account must be the
    /// contracts' admin: the one that deployed them).
    pub fn grant_router(&self, router: Address) -> Result<(), ChainError> {
        self.call(move |c, d| Box::pin(async move { d.grant_router(c, router).await }))
    }

    /// Sends `wei` from the router's account to each known node wallet holding less than half
    /// of that, so nodes can pay for their gas (a local chain's convenience).
    pub fn fund_nodes(&self, wei: U256) -> Result<(), ChainError> {
        let addresses: Vec<Address> = self.nodes.wallets.values().map(|w| w.address()).collect();
        self.call(move |c, _| {
            Box::pin(async move {
                for a in addresses {
                    let balance = c
                        .get_balance(a, None)
                        .await
                        .map_err(evm("eth_getBalance"))?;
                    if balance >= wei / 2 {
                        continue;
                    }
                    let tx = TransactionRequest::new().to(a).value(wei);
                    c.send_transaction(tx, None)
                        .await
                        .map_err(evm("funding a node"))?
                        .await
                        .map_err(evm("funding a node"))?;
                }
                Ok(())
            })
        })
    }

    /// A node wallet's balance in wei, for the nodes known here.
    pub fn node_wallet_balance(&self, node: &str) -> Result<U256, ChainError> {
        let address = self.nodes.address(node);
        self.call(move |c, _| {
            Box::pin(async move {
                c.get_balance(address, None)
                    .await
                    .map_err(evm("eth_getBalance"))
            })
        })
    }

    /// Gas used by every transaction on the chain so far, summed over its blocks (for benchmarks
    /// on a fresh local node).
    pub fn gas_used_total(&self) -> Result<u64, ChainError> {
        self.call(move |c, _| {
            Box::pin(async move {
                let latest = c
                    .get_block_number()
                    .await
                    .map_err(evm("eth_blockNumber"))?
                    .low_u64();
                let mut total = 0u64;
                for n in 0..=latest {
                    if let Some(b) = c.get_block(n).await.map_err(evm("eth_getBlockByNumber"))? {
                        total = total.saturating_add(saturating_u64(b.gas_used));
                    }
                }
                Ok(total)
            })
        })
    }

    /// One `SessionPayment` transaction on an existing session; the session afterwards.
    fn payment_write(
        &self,
        session_id: u64,
        what: &'static str,
        build: impl FnOnce(&SessionPayment<Client>) -> ContractCall<Client, ()> + Send + 'static,
    ) -> Result<Session, ChainError> {
        self.call(move |c, d| {
            Box::pin(async move {
                existing(c.clone(), d, session_id).await?;
                let payment = SessionPayment::new(d.payment, c.clone());
                send(what, build(&payment))
                    .await
                    .map_err(|e| chain_error(session_id, e))?;
                existing(c, d, session_id).await
            })
        })
    }

    /// Runs `f` on the chain's thread and waits for its answer; a panic inside `f` (or the
    /// future it makes) is answered as an error, and the thread serves the next call.
    fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(Arc<Client>, Deployment) -> BoxFuture<'static, Result<T, ChainError>>
            + Send
            + 'static,
    ) -> Result<T, ChainError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let job: Job = Box::new(move |c, d| {
            Box::pin(async move {
                let answer = match std::panic::catch_unwind(AssertUnwindSafe(|| f(c, d))) {
                    Ok(future) => AssertUnwindSafe(future)
                        .catch_unwind()
                        .await
                        .unwrap_or_else(|p| Err(panicked(p.as_ref()))),
                    Err(p) => Err(panicked(p.as_ref())),
                };
                let _ = tx.send(answer);
            })
        });
        self.jobs
            .send(job)
            .map_err(|_| ChainError::Evm("the chain thread stopped".into()))?;
        rx.recv()
            .map_err(|_| ChainError::Evm("the chain thread stopped".into()))?
    }
}

/// A chain call's panic, as its answer.
fn panicked(payload: &(dyn std::any::Any + Send)) -> ChainError {
    ChainError::Evm(format!(
        "the chain call panicked: {}",
        super::panic_message(payload)
    ))
}

/// Sends a transaction and waits for its receipt, retrying transport failures with back-off;
/// a revert is returned at once.
async fn send<D: ethers::abi::Detokenize + Send + Sync>(
    what: &'static str,
    call: ContractCall<Client, D>,
) -> Result<TransactionReceipt, ContractError<Client>> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match call.send().await {
            Ok(pending) => match pending.retries(UNSEEN_TX_POLLS).await {
                Ok(Some(receipt)) => return Ok(receipt),
                Ok(None) => {
                    return Err(ContractError::ProviderError {
                        e: ProviderError::CustomError(format!(
                            "{what}: the transaction was dropped"
                        )),
                    })
                }
                Err(e) => return Err(ContractError::ProviderError { e }),
            },
            Err(e) if e.as_revert().is_some() || attempt >= MAX_SEND_ATTEMPTS => return Err(e),
            Err(e) => {
                tracing::warn!(%what, attempt, error = %e, "sending failed; retrying");
                tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
            }
        }
    }
}

/// Maps a contract error to the chain's typed errors.
fn chain_error(session_id: u64, e: ContractError<Client>) -> ChainError {
    if let Some(p) = e.decode_contract_revert::<SessionPaymentErrors>() {
        if let SessionPaymentErrors::InsufficientBalance(b) = p {
            return ChainError::InsufficientBalance {
                session_id,
                needed: saturating_u64(b.needed),
                available: saturating_u64(b.available),
            };
        }
        return ChainError::Evm(format!("SessionPayment reverted: {p:?}"));
    }
    if let Some(s) = e.decode_contract_revert::<SessionV2Errors>() {
        return match s {
            SessionV2Errors::NoSuchSession(_) => ChainError::NoSuchSession(session_id),
            SessionV2Errors::InvalidParams(p) => ChainError::InvalidParams(p.reason),
            other => ChainError::Evm(format!("SessionV2 reverted: {other:?}")),
        };
    }
    ChainError::Evm(e.to_string())
}

fn to_params(owner: &str, p: &SessionParams) -> Params {
    let metadata = serde_json::json!({
        "owner": owner,
        "metadata": p.metadata,
        "task_record": p.task_record,
        "validation": p.validation,
        "consensus": p.consensus,
        "disagreement_policy": p.disagreement_policy,
        "poi_threshold": p.poi_threshold,
        "judge_threshold": p.judge_threshold,
    })
    .to_string();
    Params {
        name: p.name.clone(),
        metadata,
        variable_address: Address::zero(),
        min_num_of_nodes: p.min_num_of_nodes,
        max_num_of_nodes: p.max_num_of_nodes,
        redundant: p.redundant,
        num_of_validator_nodes: p.num_of_validator_nodes,
        mode: p.mode.into(),
        reserve_ephemeral_nodes: p.reserve_ephemeral_nodes,
        sla: p.sla.into(),
        model_identifier: p.model_identifier,
        reserve_period: p.reserve_period,
        max_task_execution_count: p.max_task_execution_count,
    }
}

async fn read_session(
    c: Arc<Client>,
    d: Deployment,
    id: u64,
) -> Result<Option<Session>, ChainError> {
    let sessions = SessionV2::new(d.sessions, c.clone());
    let s = match sessions.get_session(U256::from(id)).call().await {
        Ok(s) => s,
        Err(e) => {
            return match chain_error(id, e) {
                ChainError::NoSuchSession(_) => Ok(None),
                other => Err(other),
            }
        }
    };
    let payment = SessionPayment::new(d.payment, c);
    let sid = U256::from(id);
    let balance = payment
        .session_balances(sid)
        .call()
        .await
        .map_err(|e| chain_error(id, e))?;
    let held = payment
        .session_held(sid)
        .call()
        .await
        .map_err(|e| chain_error(id, e))?;
    let spent = payment
        .session_network_usage(sid)
        .call()
        .await
        .map_err(|e| chain_error(id, e))?;
    let (balance, held, spent, deposit) = session_funds(balance, held, spent);
    let meta: serde_json::Value = serde_json::from_str(&s.params.metadata).unwrap_or_default();
    let p = s.params;
    Ok(Some(Session {
        id,
        owner: meta["owner"].as_str().unwrap_or_default().to_string(),
        params: SessionParams {
            name: p.name,
            metadata: meta["metadata"].as_str().unwrap_or_default().to_string(),
            min_num_of_nodes: p.min_num_of_nodes,
            max_num_of_nodes: p.max_num_of_nodes,
            redundant: p.redundant,
            num_of_validator_nodes: p.num_of_validator_nodes,
            mode: SessionMode::try_from(p.mode).unwrap_or_default(),
            reserve_ephemeral_nodes: p.reserve_ephemeral_nodes,
            sla: Sla::try_from(p.sla).unwrap_or_default(),
            model_identifier: p.model_identifier,
            reserve_period: p.reserve_period,
            max_task_execution_count: p.max_task_execution_count,
            task_record: serde_json::from_value(meta["task_record"].clone()).unwrap_or_default(),
            validation: serde_json::from_value(meta["validation"].clone()).unwrap_or_default(),
            consensus: serde_json::from_value(meta["consensus"].clone()).unwrap_or_default(),
            disagreement_policy: serde_json::from_value(meta["disagreement_policy"].clone())
                .unwrap_or_default(),
            poi_threshold: meta["poi_threshold"]
                .as_f64()
                .map_or(crate::validation::poi::DEFAULT_POI_THRESHOLD, |t| t as f32),
            judge_threshold: meta["judge_threshold"]
                .as_f64()
                .map_or(crate::session::DEFAULT_JUDGE_THRESHOLD, |t| t as f32),
        },
        created_at_ms: saturating_u64(s.created_at).saturating_mul(1000),
        deposit,
        balance,
        held,
        spent,
        tasks_submitted: 0,
    }))
}

/// A task's settlement key on chain: keccak256(abi.encode(sessionId, taskId)).
pub fn task_key(task: TaskKey) -> [u8; 32] {
    ethers::utils::keccak256((U256::from(task.session_id), U256::from(task.task_id)).encode())
}

async fn existing(c: Arc<Client>, d: Deployment, id: u64) -> Result<Session, ChainError> {
    read_session(c, d, id)
        .await?
        .ok_or(ChainError::NoSuchSession(id))
}

impl Chain for EvmChain {
    fn create_session(
        &mut self,
        owner: &str,
        params: SessionParams,
        deposit: u64,
    ) -> Result<Session, ChainError> {
        params.validate().map_err(ChainError::InvalidParams)?;
        let p = to_params(owner, &params);
        self.call(move |c, d| {
            Box::pin(async move {
                let sessions = SessionV2::new(d.sessions, c.clone());
                let receipt = send("create", sessions.create(p))
                    .await
                    .map_err(|e| chain_error(0, e))?;
                let event_id = receipt
                    .logs
                    .iter()
                    .filter(|l| l.address == d.sessions)
                    .find_map(|l| {
                        sessions
                            .decode_event::<super::contracts::session_v2::SessionCreatedFilter>(
                                "SessionCreated",
                                l.topics.clone(),
                                l.data.clone(),
                            )
                            .ok()
                    })
                    .ok_or_else(|| ChainError::Evm("no SessionCreated event".into()))?
                    .session_id;
                let sid = id_u64("the new session's id", event_id)?;
                let id = U256::from(sid);
                send("addRouter", sessions.add_router(id, c.address()))
                    .await
                    .map_err(|e| chain_error(sid, e))?;
                if deposit > 0 {
                    let payment = SessionPayment::new(d.payment, c.clone());
                    send(
                        "depositToSession",
                        payment.deposit_to_session(id).value(deposit),
                    )
                    .await
                    .map_err(|e| chain_error(sid, e))?;
                }
                existing(c, d, sid).await
            })
        })
    }

    fn session(&mut self, id: u64) -> Result<Option<Session>, ChainError> {
        self.call(move |c, d| Box::pin(read_session(c, d, id)))
    }

    fn sessions(&self) -> Result<Vec<Session>, ChainError> {
        self.call(move |c, d| {
            Box::pin(async move {
                let count = id_u64(
                    "the session count",
                    SessionV2::new(d.sessions, c.clone())
                        .session_count()
                        .call()
                        .await
                        .map_err(|e| chain_error(0, e))?,
                )?;
                let mut out = Vec::new();
                for id in 1..=count {
                    if let Some(s) = read_session(c.clone(), d, id).await? {
                        out.push(s);
                    }
                }
                Ok(out)
            })
        })
    }

    fn deposit(&mut self, session_id: u64, amount: u64) -> Result<Session, ChainError> {
        self.payment_write(session_id, "depositToSession", move |p| {
            p.deposit_to_session(U256::from(session_id)).value(amount)
        })
    }

    fn hold(&mut self, task: TaskKey, amount: u64) -> Result<Session, ChainError> {
        let sid = task.session_id;
        self.call(move |c, d| {
            Box::pin(async move {
                let session = existing(c.clone(), d, sid).await?;
                let payment = SessionPayment::new(d.payment, c.clone());
                let key = task_key(task);
                let recorded = payment
                    .keyed_holds(key)
                    .call()
                    .await
                    .map_err(|e| chain_error(sid, e))?;
                if !recorded.is_zero() {
                    return Ok(session);
                }
                if session.balance < amount {
                    return Err(ChainError::InsufficientBalance {
                        session_id: sid,
                        needed: amount,
                        available: session.balance,
                    });
                }
                let call =
                    payment.hold_batch(vec![key], vec![U256::from(sid)], vec![U256::from(amount)]);
                send("holdBatch", call)
                    .await
                    .map_err(|e| chain_error(sid, e))?;
                existing(c, d, sid).await
            })
        })
    }

    fn hold_batch(&mut self, holds: &[HoldRequest]) -> Result<(), ChainError> {
        let holds = holds.to_vec();
        self.call(move |c, d| {
            Box::pin(async move {
                let payment = SessionPayment::new(d.payment, c.clone());
                let keys = holds.iter().map(|h| task_key(h.task)).collect();
                let sids = holds
                    .iter()
                    .map(|h| U256::from(h.task.session_id))
                    .collect();
                let amounts = holds.iter().map(|h| U256::from(h.amount)).collect();
                send("holdBatch", payment.hold_batch(keys, sids, amounts))
                    .await
                    .map_err(|e| chain_error(0, e))?;
                Ok(())
            })
        })
    }

    fn hold_recorded(&self, task: TaskKey) -> Result<bool, ChainError> {
        let key = task_key(task);
        self.call(move |c, d| {
            Box::pin(async move {
                let recorded = SessionPayment::new(d.payment, c)
                    .keyed_holds(key)
                    .call()
                    .await
                    .map_err(|e| chain_error(task.session_id, e))?;
                Ok(!recorded.is_zero())
            })
        })
    }

    fn settle(
        &mut self,
        task: TaskKey,
        hold: u64,
        charge: u64,
        payees: &[String],
    ) -> Result<Session, ChainError> {
        let one = Settlement {
            task,
            hold,
            charge,
            payees: payees.to_vec(),
            trace: None,
        };
        self.settle_batch(&[one])?;
        self.session(task.session_id)?
            .ok_or(ChainError::NoSuchSession(task.session_id))
    }

    fn settle_batch(&mut self, batch: &[Settlement]) -> Result<(), ChainError> {
        let batch = batch.to_vec();
        let book = self.nodes.clone();
        self.call(move |c, d| {
            Box::pin(async move {
                let payment = SessionPayment::new(d.payment, c.clone());
                let read = |e| chain_error(0, e);
                let mut seen = HashSet::new();
                let batch: Vec<Settlement> =
                    batch.into_iter().filter(|s| seen.insert(s.task)).collect();
                if batch.is_empty() {
                    return Ok(());
                }
                let keys: Vec<[u8; 32]> = batch.iter().map(|s| task_key(s.task)).collect();
                let sids: Vec<U256> = batch
                    .iter()
                    .map(|s| U256::from(s.task.session_id))
                    .collect();
                let holds: Vec<U256> = batch.iter().map(|s| U256::from(s.hold)).collect();
                let charges: Vec<U256> = batch.iter().map(|s| U256::from(s.charge)).collect();
                // What the contract will charge each task (its caps, keys settled before), in
                // one call, split among each task's payees.
                let charged = payment
                    .settle_charges(keys.clone(), sids.clone(), holds.clone(), charges.clone())
                    .call()
                    .await
                    .map_err(read)?;
                // Summed in U256: a batch's payments to one node may pass u64 together.
                let mut owed: BTreeMap<Address, U256> = BTreeMap::new();
                for (s, c) in batch.iter().zip(&charged) {
                    // The contract charges at most the hold we sent (a u64); more is an error.
                    let c = id_u64("a charge settleCharges answered", *c)?;
                    for (p, a) in s.payees.iter().zip(split_payment(c, s.payees.len())) {
                        *owed.entry(book.address(p)).or_default() += U256::from(a);
                    }
                }
                let root = ethers::utils::keccak256(keys.concat());
                let (nodes, amounts): (Vec<Address>, Vec<U256>) = owed.into_iter().unzip();
                let call = payment.settle_batch(root, keys, sids, holds, charges, nodes, amounts);
                send("settleBatch", call).await.map_err(read)?;
                Ok(())
            })
        })
    }

    fn settled(&self, task: TaskKey) -> Result<bool, ChainError> {
        let key = task_key(task);
        self.call(move |c, d| {
            Box::pin(async move {
                SessionPayment::new(d.payment, c)
                    .settled(key)
                    .call()
                    .await
                    .map_err(|e| chain_error(task.session_id, e))
            })
        })
    }

    fn node_pending_payment(&self, node: &str) -> Result<u64, ChainError> {
        let address = self.nodes.address(node);
        self.call(move |c, d| {
            Box::pin(async move {
                let payment = SessionPayment::new(d.payment, c);
                let pending = payment
                    .node_pending_payments(address)
                    .call()
                    .await
                    .map_err(|e| chain_error(0, e))?;
                Ok(saturating_u64(pending))
            })
        })
    }

    fn withdraw_node_payment(&mut self, node: &str) -> Result<u64, ChainError> {
        let book = self.nodes.clone();
        let node = node.to_string();
        self.call(move |c, d| {
            Box::pin(async move {
                let own = book.client(&c, &node)?;
                let payment = SessionPayment::new(d.payment, own.clone());
                let pending = payment
                    .node_pending_payments(own.address())
                    .call()
                    .await
                    .map_err(|e| chain_error(0, e))?;
                if pending.is_zero() {
                    return Err(ChainError::NothingToWithdraw(node));
                }
                send("withdrawNodePayment", payment.withdraw_node_payment())
                    .await
                    .map_err(|e| chain_error(0, e))?;
                Ok(saturating_u64(pending))
            })
        })
    }

    fn total_withdrawn(&self) -> Result<u64, ChainError> {
        self.call(move |c, d| {
            Box::pin(async move {
                let withdrawn = SessionPayment::new(d.payment, c)
                    .total_withdrawn()
                    .call()
                    .await
                    .map_err(|e| chain_error(0, e))?;
                Ok(saturating_u64(withdrawn))
            })
        })
    }

    fn record_trace(&mut self, task: TaskKey, trace: &TaskTrace) -> Result<(), ChainError> {
        let (book, trace) = (self.nodes.clone(), trace.clone());
        self.call(move |c, d| Box::pin(record_trace(c, d, book, task, trace)))
    }

    fn task_trace(&self, task: TaskKey) -> Result<Option<TaskTrace>, ChainError> {
        let book = self.nodes.clone();
        self.call(move |c, d| Box::pin(read_trace(c, d, book, task)))
    }

    fn report_node_outcomes(&mut self, outcomes: &[NodeOutcome]) -> Result<(), ChainError> {
        if outcomes.is_empty() {
            return Ok(());
        }
        let nodes: Vec<Address> = outcomes
            .iter()
            .map(|o| self.nodes.address(&o.node))
            .collect();
        let success: Vec<bool> = outcomes.iter().map(|o| o.success).collect();
        let tokens: Vec<U256> = outcomes.iter().map(|o| U256::from(o.tokens)).collect();
        let levels: Vec<u8> = outcomes.iter().map(|o| o.level).collect();
        self.call(move |c, d| {
            Box::pin(async move {
                let reputation = NodeReputation::new(d.reputation, c);
                send(
                    "reportBatch",
                    reputation.report_batch(nodes, success, tokens, levels),
                )
                .await
                .map_err(|e| chain_error(0, e))?;
                Ok(())
            })
        })
    }

    fn node_stats(&self, node: &str) -> Result<NodeStats, ChainError> {
        let address = self.nodes.address(node);
        self.call(move |c, d| {
            Box::pin(async move {
                let s = NodeReputation::new(d.reputation, c)
                    .stats(address)
                    .call()
                    .await
                    .map_err(|e| chain_error(0, e))?;
                Ok(NodeStats {
                    successes: s.0,
                    failures: s.1,
                    consecutive_successes: s.2,
                    consecutive_failures: s.3,
                    tokens: u64::try_from(s.4).unwrap_or(u64::MAX),
                    level: s.5,
                })
            })
        })
    }
}

/// Replays a task's stages on the queue contract, skipping each one the chain already has
/// (so a repeat after a lost receipt or a restart changes nothing).
async fn record_trace(
    c: Arc<Client>,
    d: Deployment,
    book: Arc<NodeBook>,
    task: TaskKey,
    trace: TaskTrace,
) -> Result<(), ChainError> {
    let (sid, key) = (U256::from(task.session_id), task_key(task));
    let fail = |e| chain_error(task.session_id, e);
    let queue = SessionQueueV2::new(d.queue, c.clone());
    let mut id = queue.task_id_by_key(key).call().await.map_err(fail)?;
    if id.is_zero() {
        let data = Bytes::from(trace.data.clone());
        send(
            "enqueueTaskWithKey",
            queue.enqueue_task_with_key(sid, key, data),
        )
        .await
        .map_err(fail)?;
        id = queue.task_id_by_key(key).call().await.map_err(fail)?;
    }
    let on_chain = queue.get_task(sid, id).call().await.map_err(fail)?;
    if on_chain.ended {
        return Ok(()); // the end is the last stage: all of it is there
    }
    let model = existing(c.clone(), d, task.session_id)
        .await?
        .params
        .model_identifier;
    let missing: Vec<Address> = trace
        .miners
        .iter()
        .map(|m| book.address(&m.node))
        .filter(|a| !on_chain.assigned_miners.contains(a))
        .collect();
    if !missing.is_empty() {
        let assign = queue.assign_task(sid, id, missing, U256::from(model));
        send("assignTask", assign).await.map_err(fail)?;
    }
    // Each miner's own stages, from its own wallet; a miner whose key is not here cannot sign.
    let mut signers = Vec::new();
    for m in &trace.miners {
        match book.client(&c, &m.node) {
            Ok(own) => signers.push((m, SessionQueueV2::new(d.queue, own))),
            Err(e) => tracing::warn!(task = %task, error = %e, "a miner's stages are not recorded"),
        }
    }
    for (m, own) in &signers {
        let r = queue
            .get_miner_record(sid, id, book.address(&m.node))
            .call()
            .await
            .map_err(fail)?;
        if m.acked && r.ack_at.is_zero() {
            send("ack", own.ack(sid, id)).await.map_err(fail)?;
        }
        if let (Some(hash), true) = (m.precommit, r.precommit_at.is_zero()) {
            send("precommit", own.precommit(sid, id, hash))
                .await
                .map_err(fail)?;
        }
    }
    if signers.iter().any(|(m, _)| m.commit.is_some()) {
        // Reveals need the precommit stage over; the router ends it when not every assigned
        // miner precommitted (a replaced one never does).
        let status = queue.get_task(sid, id).call().await.map_err(fail)?.status;
        if status < PRECOMMITTED {
            send("endPrecommit", queue.end_precommit(sid, id))
                .await
                .map_err(fail)?;
        }
    }
    for (m, own) in &signers {
        let Some(result) = &m.commit else { continue };
        let r = queue
            .get_miner_record(sid, id, book.address(&m.node))
            .call()
            .await
            .map_err(fail)?;
        if r.commit_at.is_zero() {
            let commit = own.commit(sid, id, Bytes::from(result.clone()));
            send("commit", commit).await.map_err(fail)?;
        }
    }
    send("end", queue.end(sid, id, trace.force_ended))
        .await
        .map_err(fail)?;
    Ok(())
}

/// `SessionQueueV2.Status.Precommitted`.
const PRECOMMITTED: u8 = 4;

async fn read_trace(
    c: Arc<Client>,
    d: Deployment,
    book: Arc<NodeBook>,
    task: TaskKey,
) -> Result<Option<TaskTrace>, ChainError> {
    let (sid, key) = (U256::from(task.session_id), task_key(task));
    let fail = |e| chain_error(task.session_id, e);
    let queue = SessionQueueV2::new(d.queue, c);
    let id = queue.task_id_by_key(key).call().await.map_err(fail)?;
    if id.is_zero() {
        return Ok(None);
    }
    let t = queue.get_task(sid, id).call().await.map_err(fail)?;
    let mut miners = Vec::new();
    for a in t.assigned_miners {
        let r = queue
            .get_miner_record(sid, id, a)
            .call()
            .await
            .map_err(fail)?;
        miners.push(MinerTrace {
            node: book.name(a),
            acked: !r.ack_at.is_zero(),
            precommit: (!r.precommit_at.is_zero()).then_some(r.precommit_hash),
            commit: (!r.commit_at.is_zero()).then(|| r.result.to_vec()),
        });
    }
    Ok(Some(TaskTrace {
        data: t.data.to_vec(),
        miners,
        force_ended: t.force_ended,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::anvil::AnvilNode;

    /// A call that panics on the chain's thread (as `as_u64` on a stranger's deposit once did)
    /// answers an error, and the same thread serves the calls after it.
    #[test]
    fn a_panicking_call_is_an_error_and_the_chain_thread_serves_on() {
        let anvil = AnvilNode::start(None).expect("anvil starts");
        let mut chain = EvmChain::deploy(&anvil.url, ANVIL_DEV_KEY, 1).expect("deployed");
        let answer: Result<(), ChainError> =
            chain.call(|_, _| Box::pin(async { panic!("an injected panic") }));
        assert!(
            matches!(&answer, Err(ChainError::Evm(m)) if m.contains("an injected panic")),
            "{answer:?}"
        );
        let params = SessionParams {
            name: "after a panic".into(),
            redundant: 1,
            ..SessionParams::default()
        };
        let s = chain
            .create_session("owner", params, 10)
            .expect("the chain thread serves on");
        assert_eq!((s.balance, s.deposit), (10, 10));
        assert_eq!(chain.session(s.id).unwrap().map(|s| s.balance), Some(10));
    }
}
