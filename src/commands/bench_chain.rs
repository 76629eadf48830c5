//! `cortensor bench chain`: settlement throughput on anvil, batched (many tasks in one
//! `settleBatch`) and per task (one transaction each), with gas per task; and the embedded
//! ledger's hold + settle operations per second. Same run, same machine.

use crate::chain::anvil::AnvilNode;
use crate::chain::evm::{EvmChain, ANVIL_DEV_KEY};
use crate::chain::local_ledger::LocalLedger;
use crate::chain::{Chain, Settlement};
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
    /// Hold + settle pairs on the embedded ledger.
    #[arg(long, default_value_t = 50_000)]
    pub ledger_ops: u64,
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
            payees: vec!["miner-1".into(), "miner-2".into(), "miner-3".into()],
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
        ledger.hold(s.id, 10)?;
        ledger.settle(
            TaskKey {
                session_id: s.id,
                task_id: i + 1,
            },
            10,
            6,
            &["miner-1".into()],
        )?;
    }
    let ledger_secs = started.elapsed().as_secs_f64();
    drop(ledger);
    let _ = std::fs::remove_dir_all(&dir);

    // Anvil: one big hold, then the same settlements batched and one per transaction.
    let anvil = AnvilNode::start(None)?;
    let mut evm = EvmChain::deploy(&anvil.url, ANVIL_DEV_KEY, 1)?;
    let s = evm.create_session("bench", SessionParams::default(), 1_000_000_000)?;
    evm.hold(s.id, 10 * 2 * args.tasks)?;
    let batched = settlements(s.id, 1, args.tasks);
    let gas_before = evm.gas_used_total()?;
    let started = Instant::now();
    for chunk in batched.chunks(args.batch.max(1)) {
        evm.settle_batch(chunk)?;
    }
    let batched_secs = started.elapsed().as_secs_f64();
    let batched_gas = evm.gas_used_total()? - gas_before;
    let single = settlements(s.id, args.tasks + 1, args.tasks);
    let gas_before = evm.gas_used_total()?;
    let started = Instant::now();
    for one in &single {
        evm.settle(one.task, one.hold, one.charge, &one.payees)?;
    }
    let single_secs = started.elapsed().as_secs_f64();
    let single_gas = evm.gas_used_total()? - gas_before;
    let after = evm.session(s.id)?.expect("the session exists");
    anyhow::ensure!(
        after.held == 0 && after.spent == 6 * 2 * args.tasks,
        "settlements did not all land: {after:?}"
    );

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
        format!("anvil: settleBatch, {} tasks a transaction", args.batch),
        args.tasks as f64 / batched_secs,
        batched_gas / args.tasks
    );
    println!(
        "{:<44} {:>12.0} {:>14}",
        "anvil: one settlement a transaction",
        args.tasks as f64 / single_secs,
        single_gas / args.tasks
    );
    println!(
        "batched / per task: {:.1}x tasks per second, {:.1}x less gas (goals: >= 1,000 tasks/s batched, >= 20,000 embedded ops/s)",
        (args.tasks as f64 / batched_secs) / (args.tasks as f64 / single_secs),
        single_gas as f64 / batched_gas.max(1) as f64
    );
    Ok(())
}
