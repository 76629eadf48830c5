//! `cortensor bench chain`: settlement throughput on anvil, batched (many tasks in one
//! `settleBatch`), per task (one transaction each) and per stage (every stage of a 3-miner
//! task as its own transaction, from the miners' own wallets, then its settlement), with gas
//! per task; and the embedded ledger's hold + settle operations per second. Same run, same
//! machine.

use crate::chain::anvil::AnvilNode;
use crate::chain::evm::{EvmChain, ANVIL_DEV_KEY};
use crate::chain::local_ledger::LocalLedger;
use crate::chain::node_key::NodeKey;
use crate::chain::{Chain, HoldRequest, MinerTrace, Settlement, TaskTrace};
use crate::session::SessionParams;
use crate::store::Store;
use crate::task::TaskKey;
use std::time::Instant;

#[derive(Debug, clap::Args)]
pub struct ChainBenchArgs {
    /// Tasks settled on anvil in each mode.
    #[arg(long, default_value_t = 512)]
    pub tasks: u64,
    /// Tasks per settleBatch transaction.
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Tasks recorded stage by stage on anvil.
    #[arg(long, default_value_t = 48)]
    pub per_stage_tasks: u64,
    /// Hold + settle pairs on the embedded ledger.
    #[arg(long, default_value_t = 50_000)]
    pub ledger_ops: u64,
}

const MINERS: [&str; 3] = ["miner-1", "miner-2", "miner-3"];

/// A 3-miner task's stages: all acked, precommitted and committed the same ~100-byte result.
fn trace(task: TaskKey) -> TaskTrace {
    let result = format!(
        r#"["The answer to task {} is four.",[791,4320,311,3465],"stop",24]"#,
        task.task_id
    )
    .into_bytes();
    let hash = ethers::utils::keccak256(&result);
    TaskTrace {
        data: format!("What is 2 + 2? (task {})", task.task_id).into_bytes(),
        miners: MINERS
            .iter()
            .map(|m| MinerTrace {
                node: m.to_string(),
                acked: true,
                precommit: Some(hash),
                commit: Some(result.clone()),
            })
            .collect(),
        force_ended: false,
    }
}

fn settlements(session_id: u64, first_task: u64, n: u64) -> Vec<Settlement> {
    (0..n)
        .map(|i| Settlement {
            task: TaskKey {
                session_id,
                task_id: first_task + i,
            },
            hold: 10,
            charge: 6,
            payees: MINERS.iter().map(|m| m.to_string()).collect(),
            trace: None,
        })
        .collect()
}

pub fn run(args: ChainBenchArgs) -> anyhow::Result<()> {
    // The embedded ledger.
    let dir = std::env::temp_dir().join(format!("cortensor-bench-chain-{}", std::process::id()));
    let mut ledger = LocalLedger::new(Store::open(&dir)?);
    let s = ledger.create_session("bench", SessionParams::default(), u64::MAX / 4)?;
    let started = Instant::now();
    for i in 0..args.ledger_ops {
        let task = TaskKey {
            session_id: s.id,
            task_id: i + 1,
        };
        ledger.hold(task, 10)?;
        ledger.settle(task, 10, 6, &["miner-1".into()])?;
    }
    let ledger_secs = started.elapsed().as_secs_f64();
    drop(ledger);
    let _ = std::fs::remove_dir_all(&dir);

    // Anvil: each task held and settled, batched (a holdBatch and a settleBatch per batch of
    // tasks), one transaction each, and per stage.
    let anvil = AnvilNode::start(None)?;
    let keys: Vec<NodeKey> = MINERS.iter().map(|m| NodeKey::random(m)).collect();
    let mut evm = EvmChain::deploy(&anvil.url, ANVIL_DEV_KEY, 1)?.with_node_keys(&keys);
    evm.fund_nodes(ethers::types::U256::exp10(19))?;
    let s = evm.create_session("bench", SessionParams::default(), 1_000_000_000)?;
    let batched = settlements(s.id, 1, args.tasks);
    let gas_before = evm.gas_used_total()?;
    let started = Instant::now();
    for chunk in batched.chunks(args.batch.max(1)) {
        let holds: Vec<HoldRequest> = chunk
            .iter()
            .map(|t| HoldRequest {
                task: t.task,
                amount: t.hold,
            })
            .collect();
        evm.hold_batch(&holds)?;
        evm.settle_batch(chunk)?;
    }
    let batched_secs = started.elapsed().as_secs_f64();
    let batched_gas = evm.gas_used_total()? - gas_before;
    let single = settlements(s.id, args.tasks + 1, args.tasks);
    let gas_before = evm.gas_used_total()?;
    let started = Instant::now();
    for one in &single {
        evm.hold(one.task, one.hold)?;
        evm.settle(one.task, one.hold, one.charge, &one.payees)?;
    }
    let single_secs = started.elapsed().as_secs_f64();
    let single_gas = evm.gas_used_total()? - gas_before;
    let staged = settlements(s.id, 2 * args.tasks + 1, args.per_stage_tasks);
    let gas_before = evm.gas_used_total()?;
    let started = Instant::now();
    for one in &staged {
        evm.hold(one.task, one.hold)?;
        evm.record_trace(one.task, &trace(one.task))?;
        evm.settle(one.task, one.hold, one.charge, &one.payees)?;
    }
    let staged_secs = started.elapsed().as_secs_f64();
    let staged_gas = evm.gas_used_total()? - gas_before;
    let after = evm.session(s.id)?.expect("the session exists");
    anyhow::ensure!(
        after.held == 0 && after.spent == 6 * (2 * args.tasks + args.per_stage_tasks),
        "settlements did not all land: {after:?}"
    );
    let last = staged.last().map(|t| t.task);
    if let Some(task) = last {
        anyhow::ensure!(
            evm.task_trace(task)?.as_ref() == Some(&trace(task)),
            "the last task's stages are not all on chain"
        );
    }

    println!(
        "{:<44} {:>12} {:>14}",
        "chain operation", "per second", "gas per task"
    );
    println!(
        "{:<44} {:>12.0} {:>14}",
        "embedded ledger: hold + settle (pairs)",
        args.ledger_ops as f64 / ledger_secs,
        "-"
    );
    println!(
        "{:<44} {:>12.0} {:>14}",
        "embedded ledger: operations (hold or settle)",
        2.0 * args.ledger_ops as f64 / ledger_secs,
        "-"
    );
    println!(
        "{:<44} {:>12.0} {:>14}",
        format!("anvil: holdBatch + settleBatch, {} tasks each", args.batch),
        args.tasks as f64 / batched_secs,
        batched_gas / args.tasks
    );
    println!(
        "{:<44} {:>12.0} {:>14}",
        "anvil: one hold + one settlement a task",
        args.tasks as f64 / single_secs,
        single_gas / args.tasks
    );
    println!(
        "{:<44} {:>12.1} {:>14}",
        "anvil: per stage (3 miners, 14 transactions)",
        args.per_stage_tasks as f64 / staged_secs,
        staged_gas / args.per_stage_tasks.max(1)
    );
    println!(
        "batched / per task: {:.1}x tasks per second, {:.1}x less gas (goals: >= 1,000 tasks/s batched, >= 20,000 embedded ops/s)",
        (args.tasks as f64 / batched_secs) / (args.tasks as f64 / single_secs),
        single_gas as f64 / batched_gas.max(1) as f64
    );
    println!(
        "batched / per stage: {:.0}x tasks per second, {:.0}x less gas",
        (args.tasks as f64 / batched_secs) / (args.per_stage_tasks as f64 / staged_secs),
        (staged_gas / args.per_stage_tasks.max(1)) as f64
            / (batched_gas / args.tasks.max(1)).max(1) as f64
    );
    Ok(())
}
