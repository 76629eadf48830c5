//! Cortensor's contracts on a real EVM (the pinned anvil from chain/node_modules), through the
//! ethers bindings: the task protocol with commit-reveal, the access rules, the node pool's
//! states, reputation levels, and batch settlement conserving money.

use cortensor::chain::anvil::{AnvilNode, ANVIL_CHAIN_ID};
use cortensor::chain::contracts::node_pool::NodePoolErrors;
use cortensor::chain::contracts::session_payment::SessionPaymentErrors;
use cortensor::chain::contracts::session_queue_v2::SessionQueueV2Errors;
use cortensor::chain::contracts::session_v2::{Params, SessionV2Errors};
use cortensor::chain::contracts::{
    NodePool, NodeReputation, SessionPayment, SessionQueueV2, SessionV2,
};
use cortensor::chain::deploy::Deployment;
use ethers::abi::AbiEncode;
use ethers::contract::{ContractError, ContractRevert};
use ethers::prelude::*;
use ethers::utils::keccak256;
use rand::SeedableRng;
use std::sync::Arc;

type Client = SignerMiddleware<Provider<Http>, LocalWallet>;

async fn funded(provider: &Provider<Http>, rng: &mut rand_chacha::ChaCha8Rng) -> Arc<Client> {
    let wallet = LocalWallet::new(rng).with_chain_id(ANVIL_CHAIN_ID);
    let _: serde_json::Value = provider
        .request("anvil_setBalance", (wallet.address(), U256::exp10(20)))
        .await
        .unwrap();
    Arc::new(SignerMiddleware::new(provider.clone(), wallet))
}

/// Waits for a sent transaction to be mined, and asserts it succeeded.
trait Mined {
    async fn mined(self) -> TransactionReceipt;
}

impl Mined for PendingTransaction<'_, Http> {
    async fn mined(self) -> TransactionReceipt {
        let receipt = self
            .retries(cortensor::chain::evm::UNSEEN_TX_POLLS)
            .await
            .unwrap()
            .expect("the transaction was dropped");
        assert_eq!(receipt.status, Some(1u64.into()), "reverted: {receipt:?}");
        receipt
    }
}

/// The custom error a call reverted with.
fn revert<E: ContractRevert + std::fmt::Debug, T: std::fmt::Debug>(
    result: Result<T, ContractError<Client>>,
) -> E {
    let err = result.expect_err("the call should revert");
    err.decode_contract_revert::<E>()
        .unwrap_or_else(|| panic!("not the expected revert: {err:?}"))
}

fn params(redundant: u32) -> Params {
    Params {
        name: "conformance".into(),
        metadata: "{}".into(),
        variable_address: Address::zero(),
        min_num_of_nodes: 1,
        max_num_of_nodes: 3,
        redundant,
        num_of_validator_nodes: 0,
        mode: 0,
        reserve_ephemeral_nodes: false,
        sla: 0,
        model_identifier: 0,
        reserve_period: 300,
        max_task_execution_count: 5,
    }
}

#[test]
fn the_task_protocol_access_rules_and_money_on_a_real_evm() {
    let anvil = AnvilNode::start(None).expect("anvil starts");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        // Receipts are polled; anvil mines at once, so poll often.
        let provider = Provider::<Http>::try_from(anvil.url.as_str())
            .unwrap()
            .interval(std::time::Duration::from_millis(10));
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let admin = funded(&provider, &mut rng).await;
        let user = funded(&provider, &mut rng).await;
        let router = funded(&provider, &mut rng).await;
        let m1 = funded(&provider, &mut rng).await;
        let m2 = funded(&provider, &mut rng).await;
        let outsider = funded(&provider, &mut rng).await;
        let d = Deployment::deploy(admin.clone(), U256::one(), U256::exp10(15))
            .await
            .unwrap();
        d.grant_router(admin.clone(), router.address())
            .await
            .unwrap();

        // Sessions: created by a user, who alone may change them.
        let sessions = SessionV2::new(d.sessions, user.clone());
        let e: SessionV2Errors = revert(sessions.create(params(0)).send().await.map(|_| ()));
        assert!(matches!(e, SessionV2Errors::InvalidParams(_)), "{e:?}");
        sessions
            .create(params(2))
            .send()
            .await
            .unwrap()
            .mined()
            .await;
        let sid = U256::one();
        assert_eq!(
            sessions.get_session(sid).call().await.unwrap().owner,
            user.address()
        );
        let e: SessionV2Errors = revert(
            SessionV2::new(d.sessions, outsider.clone())
                .update(sid, params(1))
                .send()
                .await
                .map(|_| ()),
        );
        assert!(matches!(e, SessionV2Errors::NotOwner(_)), "{e:?}");
        sessions
            .add_router(sid, router.address())
            .send()
            .await
            .unwrap()
            .mined()
            .await;

        let payment = SessionPayment::new(d.payment, user.clone());
        payment
            .deposit_to_session(sid)
            .value(1_000u64)
            .send()
            .await
            .unwrap()
            .mined()
            .await;

        // Only the session's routers submit; a submission holds maxTokens × redundant × price.
        let llm: Vec<U256> = [100u64, 70, 95, 40, 110, 0, 0]
            .iter()
            .map(|&v| U256::from(v))
            .collect();
        let submit = |s: &SessionV2<Client>| {
            s.submit(
                sid,
                U256::zero(),
                Bytes::from(b"prompt".to_vec()),
                U256::zero(),
                String::new(),
                llm.clone(),
                vec![],
                "ref".into(),
            )
        };
        let e: SessionV2Errors = revert(
            submit(&SessionV2::new(d.sessions, outsider.clone()))
                .send()
                .await
                .map(|_| ()),
        );
        assert!(matches!(e, SessionV2Errors::NotRouter(_)), "{e:?}");
        submit(&SessionV2::new(d.sessions, router.clone()))
            .send()
            .await
            .unwrap()
            .mined()
            .await;
        assert_eq!(
            payment.session_held(sid).call().await.unwrap(),
            U256::from(200)
        );
        assert_eq!(
            payment.session_balances(sid).call().await.unwrap(),
            U256::from(800)
        );
        // More than the balance covers is refused.
        let big: Vec<U256> = [10_000u64].iter().map(|&v| U256::from(v)).collect();
        let e: SessionPaymentErrors = revert(
            SessionV2::new(d.sessions, router.clone())
                .submit(
                    sid,
                    U256::zero(),
                    Bytes::default(),
                    U256::zero(),
                    String::new(),
                    big,
                    vec![],
                    String::new(),
                )
                .send()
                .await
                .map(|_| ()),
        );
        assert!(
            matches!(e, SessionPaymentErrors::InsufficientBalance(_)),
            "{e:?}"
        );

        // The task: assigned by the router, acked/precommitted/committed by its miners only.
        let queue = |c: &Arc<Client>| SessionQueueV2::new(d.queue, c.clone());
        let tid = U256::one();
        assert_eq!(queue(&router).task_count(sid).call().await.unwrap(), tid);
        let e: SessionQueueV2Errors = revert(
            queue(&outsider)
                .assign_task(sid, tid, vec![outsider.address()], U256::zero())
                .send()
                .await
                .map(|_| ()),
        );
        assert!(matches!(e, SessionQueueV2Errors::MissingRole(_)), "{e:?}");
        queue(&router)
            .assign_task(sid, tid, vec![m1.address(), m2.address()], U256::zero())
            .send()
            .await
            .unwrap()
            .mined()
            .await;
        let e: SessionQueueV2Errors =
            revert(queue(&outsider).ack(sid, tid).send().await.map(|_| ()));
        assert!(matches!(e, SessionQueueV2Errors::NotAssigned(_)), "{e:?}");
        queue(&m1).ack(sid, tid).send().await.unwrap().mined().await;
        let e: SessionQueueV2Errors = revert(queue(&m1).ack(sid, tid).send().await.map(|_| ()));
        assert!(matches!(e, SessionQueueV2Errors::AlreadyDone(_)), "{e:?}");
        let answer = b"Paris is the capital of France.".to_vec();
        let hash = keccak256(&answer);
        // A reveal before every precommit is in is refused.
        queue(&m1)
            .precommit(sid, tid, hash)
            .send()
            .await
            .unwrap()
            .mined()
            .await;
        let e: SessionQueueV2Errors = revert(
            queue(&m1)
                .commit(sid, tid, Bytes::from(answer.clone()))
                .send()
                .await
                .map(|_| ()),
        );
        assert!(matches!(e, SessionQueueV2Errors::WrongStage(_)), "{e:?}");
        queue(&m2)
            .precommit(sid, tid, hash)
            .send()
            .await
            .unwrap()
            .mined()
            .await;
        // A reveal that does not match its precommit is refused.
        let e: SessionQueueV2Errors = revert(
            queue(&m1)
                .commit(sid, tid, Bytes::from(b"something else".to_vec()))
                .send()
                .await
                .map(|_| ()),
        );
        assert!(matches!(e, SessionQueueV2Errors::HashMismatch(_)), "{e:?}");
        queue(&m1)
            .commit(sid, tid, Bytes::from(answer.clone()))
            .send()
            .await
            .unwrap()
            .mined()
            .await;
        queue(&m2)
            .commit(sid, tid, Bytes::from(answer.clone()))
            .send()
            .await
            .unwrap()
            .mined()
            .await;
        let (miners, results) = queue(&router)
            .get_task_results(sid, tid)
            .call()
            .await
            .unwrap();
        assert_eq!(miners, vec![m1.address(), m2.address()]);
        assert!(results.iter().all(|r| r.to_vec() == answer));
        assert!(queue(&router)
            .verify_hash(Bytes::from(answer.clone()), hash)
            .call()
            .await
            .unwrap());
        let e: SessionQueueV2Errors = revert(
            queue(&outsider)
                .end(sid, tid, false)
                .send()
                .await
                .map(|_| ()),
        );
        assert!(matches!(e, SessionQueueV2Errors::MissingRole(_)), "{e:?}");
        queue(&router)
            .end(sid, tid, false)
            .send()
            .await
            .unwrap()
            .mined()
            .await;
        let task = queue(&router).get_task(sid, tid).call().await.unwrap();
        assert!(task.ended && !task.force_ended);

        // Batch settlement: the hold ends, 120 is charged and paid to the two miners; a repeat
        // of the same task key changes nothing.
        let settle = SessionPayment::new(d.payment, router.clone());
        let key: [u8; 32] = keccak256((sid, tid).encode());
        let root: [u8; 32] = keccak256(&answer);
        for _ in 0..2 {
            let nodes = if task.ended {
                vec![m1.address(), m2.address()]
            } else {
                vec![]
            };
            let first = settle.settled(key).call().await.unwrap();
            let (nodes, amounts) = if first {
                (vec![], vec![])
            } else {
                (nodes, vec![U256::from(60), U256::from(60)])
            };
            settle
                .settle_batch(
                    root,
                    vec![key],
                    vec![sid],
                    vec![U256::from(200)],
                    vec![U256::from(120)],
                    nodes,
                    amounts,
                )
                .send()
                .await
                .unwrap()
                .mined()
                .await;
        }
        assert_eq!(
            payment.session_held(sid).call().await.unwrap(),
            U256::zero()
        );
        assert_eq!(
            payment.session_balances(sid).call().await.unwrap(),
            U256::from(880)
        );
        assert_eq!(
            payment
                .node_pending_payments(m1.address())
                .call()
                .await
                .unwrap(),
            U256::from(60)
        );

        // Only a node withdraws its own payments.
        let e: SessionPaymentErrors = revert(
            SessionPayment::new(d.payment, outsider.clone())
                .withdraw_node_payment()
                .send()
                .await
                .map(|_| ()),
        );
        assert!(
            matches!(e, SessionPaymentErrors::NothingToWithdraw(_)),
            "{e:?}"
        );
        let before = provider.get_balance(m1.address(), None).await.unwrap();
        let receipt = SessionPayment::new(d.payment, m1.clone())
            .withdraw_node_payment()
            .send()
            .await
            .unwrap()
            .mined()
            .await;
        let gas = receipt.gas_used.unwrap() * receipt.effective_gas_price.unwrap();
        assert_eq!(
            provider.get_balance(m1.address(), None).await.unwrap() + gas - before,
            U256::from(60)
        );

        // Money is conserved.
        let p = &payment;
        let total = p.session_balances(sid).call().await.unwrap()
            + p.session_held(sid).call().await.unwrap()
            + p.total_network_balance().call().await.unwrap()
            + p.node_pending_payments(m1.address()).call().await.unwrap()
            + p.node_pending_payments(m2.address()).call().await.unwrap()
            + p.total_withdrawn().call().await.unwrap();
        assert_eq!(total, p.total_deposited().call().await.unwrap());
    });
}

#[test]
fn node_pool_states_and_reputation_levels() {
    let anvil = AnvilNode::start(None).expect("anvil starts");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        // Receipts are polled; anvil mines at once, so poll often.
        let provider = Provider::<Http>::try_from(anvil.url.as_str())
            .unwrap()
            .interval(std::time::Duration::from_millis(10));
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let admin = funded(&provider, &mut rng).await;
        let router = funded(&provider, &mut rng).await;
        let node = funded(&provider, &mut rng).await;
        let d = Deployment::deploy(admin.clone(), U256::one(), U256::exp10(15))
            .await
            .unwrap();
        d.grant_router(admin.clone(), router.address())
            .await
            .unwrap();
        let pool = |c: &Arc<Client>| NodePool::new(d.nodes, c.clone());

        let e: NodePoolErrors = revert(
            pool(&node)
                .register("llama-3".into())
                .value(1u64)
                .send()
                .await
                .map(|_| ()),
        );
        assert!(matches!(e, NodePoolErrors::StakeTooLow(_)), "{e:?}");
        pool(&node)
            .register("llama-3".into())
            .value(U256::exp10(15))
            .send()
            .await
            .unwrap()
            .mined()
            .await;
        let e: NodePoolErrors = revert(
            pool(&node)
                .register("llama-3".into())
                .value(U256::exp10(15))
                .send()
                .await
                .map(|_| ()),
        );
        assert!(matches!(e, NodePoolErrors::AlreadyRegistered(_)), "{e:?}");
        let state = |n: (u8, U256, String, U256, U256)| n.0;
        assert_eq!(
            state(pool(&router).nodes(node.address()).call().await.unwrap()),
            1
        ); // ephemeral
        let e: NodePoolErrors = revert(
            pool(&node)
                .reserve(node.address(), U256::one())
                .send()
                .await
                .map(|_| ()),
        );
        assert!(matches!(e, NodePoolErrors::MissingRole(_)), "{e:?}");
        pool(&router)
            .reserve(node.address(), U256::one())
            .send()
            .await
            .unwrap()
            .mined()
            .await;
        assert_eq!(
            state(pool(&router).nodes(node.address()).call().await.unwrap()),
            2
        ); // reserved
        let e: NodePoolErrors = revert(pool(&node).unregister().send().await.map(|_| ()));
        assert!(
            matches!(e, NodePoolErrors::WrongState(_)),
            "a reserved node cannot leave: {e:?}"
        );
        pool(&router)
            .release_by_node_id(node.address())
            .send()
            .await
            .unwrap()
            .mined()
            .await;
        assert_eq!(
            state(pool(&router).nodes(node.address()).call().await.unwrap()),
            3
        ); // released
        pool(&router)
            .revalidate(node.address())
            .send()
            .await
            .unwrap()
            .mined()
            .await;
        pool(&router)
            .dedicate(node.address(), U256::from(2))
            .send()
            .await
            .unwrap()
            .mined()
            .await;
        assert_eq!(
            state(pool(&router).nodes(node.address()).call().await.unwrap()),
            4
        ); // dedicated
        pool(&admin)
            .suspend(node.address())
            .send()
            .await
            .unwrap()
            .mined()
            .await;
        assert_eq!(
            state(pool(&router).nodes(node.address()).call().await.unwrap()),
            5
        ); // suspended

        let reputation = NodeReputation::new(d.reputation, router.clone());
        for _ in 0..5 {
            reputation
                .report_task_completion(node.address(), true, U256::from(32))
                .send()
                .await
                .unwrap()
                .mined()
                .await;
        }
        let level = |s: (u64, u64, u64, u64, u128, u8, U256)| s.5;
        assert_eq!(
            level(reputation.stats(node.address()).call().await.unwrap()),
            1
        );
        for _ in 0..2 {
            reputation
                .report_task_completion(node.address(), false, U256::zero())
                .send()
                .await
                .unwrap()
                .mined()
                .await;
        }
        let s = reputation.stats(node.address()).call().await.unwrap();
        assert_eq!((s.0, s.1, s.4, level(s)), (5, 2, 160, 0));
        let outsider = NodeReputation::new(d.reputation, node.clone());
        let call = outsider.report_task_completion(node.address(), true, U256::zero());
        assert!(call.send().await.is_err(), "only reporters report");
    });
}
