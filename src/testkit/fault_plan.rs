//! A fault plan: what goes wrong in a test network and when, derived entirely from a seed (or
//! written out by hand). The same seed gives the same plan: the same link fault rates, the
//! same link decisions message by message (each link draws from its own generator, seeded from
//! the plan's seed and the link's name), and the same scheduled faults at the same offsets.
//! Thread timing is the one thing a seed does not fix.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Duration;

/// Per-message fault rates on a link (each a probability in 0..=1).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LinkFaults {
    pub drop: f64,
    pub duplicate: f64,
    /// Probability that a message is delayed, by up to `delay_max` (which reorders it).
    pub delay: f64,
    pub delay_max: Duration,
    /// Probability that a message's payload is changed (miners' reveals: a corrupted result).
    pub corrupt: f64,
}

impl LinkFaults {
    pub fn none() -> Self {
        Self::default()
    }
    pub fn is_none(&self) -> bool {
        self == &Self::default()
    }
}

/// One thing that goes wrong at a moment.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// The miner's actor stops as if its process died; its supervisor restarts it.
    CrashMiner { miner: usize },
    /// The miner's engine panics on its next generation(s).
    PanicEngine { miner: usize, times: usize },
    /// Everything to and from the miner is held for a while (it looks frozen).
    StallMiner { miner: usize, for_: Duration },
    /// The miner's reveals are corrupted for a while (they no longer match its precommits).
    CorruptResults { miner: usize, for_: Duration },
    /// The chain's RPC does not answer for a while.
    CutChain { for_: Duration },
    /// The store refuses task writes for a while.
    FailStoreWrites { for_: Duration },
    /// The disk is slow for a while: every flush the network waits for (a task's acceptance,
    /// its end) is acknowledged `delay` late.
    SlowStore { delay: Duration, for_: Duration },
    /// The whole network stops and starts again on the same data (every actor restarts).
    RestartNetwork,
}

impl Fault {
    /// How long the fault lasts once it starts (zero for instant ones).
    pub fn duration(&self) -> Duration {
        match self {
            Fault::StallMiner { for_, .. }
            | Fault::CorruptResults { for_, .. }
            | Fault::CutChain { for_ }
            | Fault::FailStoreWrites { for_ }
            | Fault::SlowStore { for_, .. } => *for_,
            _ => Duration::ZERO,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ScheduledFault {
    /// From the moment the plan starts (when the first task is submitted).
    pub at: Duration,
    pub fault: Fault,
}

#[derive(Clone, Debug, PartialEq)]
pub struct FaultPlan {
    pub seed: u64,
    /// Miners' reports to the queue.
    pub to_queue: LinkFaults,
    /// The queue's messages to miners.
    pub to_miner: LinkFaults,
    /// In time order.
    pub schedule: Vec<ScheduledFault>,
    /// Every deadline of the network (ack, precommit, commit) is multiplied by this: below 1,
    /// honest miners miss deadlines they would have met.
    pub deadline_scale: f64,
}

/// Scheduled faults in a random plan at most.
pub const MAX_RANDOM_FAULTS: usize = 5;
/// Random faults start within this time of the plan's start.
pub const RANDOM_FAULT_WINDOW: Duration = Duration::from_millis(1500);

impl FaultPlan {
    /// A plan with no faults at all.
    pub fn calm(seed: u64) -> Self {
        Self {
            seed,
            to_queue: LinkFaults::none(),
            to_miner: LinkFaults::none(),
            schedule: Vec::new(),
            deadline_scale: 1.0,
        }
    }

    /// A random plan for a network of `miners` miners, from `seed` alone.
    pub fn random(seed: u64, miners: usize) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let link = |rng: &mut ChaCha8Rng, corrupt: bool| {
            if rng.gen_bool(0.3) {
                return LinkFaults::none();
            }
            LinkFaults {
                drop: rng.gen_range(0.0..0.08),
                duplicate: rng.gen_range(0.0..0.2),
                delay: rng.gen_range(0.0..0.5),
                delay_max: Duration::from_millis(rng.gen_range(1..40)),
                corrupt: if corrupt {
                    rng.gen_range(0.0..0.1)
                } else {
                    0.0
                },
            }
        };
        let to_queue = link(&mut rng, true);
        let to_miner = link(&mut rng, false);
        let deadline_scale = if rng.gen_bool(0.2) {
            rng.gen_range(0.2..1.0)
        } else {
            1.0
        };
        let count = rng.gen_range(0..=MAX_RANDOM_FAULTS);
        let mut schedule: Vec<ScheduledFault> = (0..count)
            .map(|_| {
                let at =
                    Duration::from_millis(rng.gen_range(0..RANDOM_FAULT_WINDOW.as_millis() as u64));
                let miner = rng.gen_range(0..miners.max(1));
                let for_ = Duration::from_millis(rng.gen_range(50..600));
                let fault = match rng.gen_range(0..8) {
                    0 => Fault::CrashMiner { miner },
                    1 => Fault::PanicEngine {
                        miner,
                        times: rng.gen_range(1..3),
                    },
                    2 => Fault::StallMiner { miner, for_ },
                    3 => Fault::CorruptResults { miner, for_ },
                    4 => Fault::CutChain { for_ },
                    5 => Fault::FailStoreWrites { for_ },
                    6 => Fault::SlowStore {
                        delay: Duration::from_millis(rng.gen_range(5..200)),
                        for_,
                    },
                    _ => Fault::RestartNetwork,
                };
                ScheduledFault { at, fault }
            })
            .collect();
        schedule.sort_by_key(|f| f.at);
        Self {
            seed,
            to_queue,
            to_miner,
            schedule,
            deadline_scale,
        }
    }

    /// The seed a link draws from: the plan's seed and the link's name.
    pub fn link_seed(&self, link: &str) -> u64 {
        let mut bytes = self.seed.to_be_bytes().to_vec();
        bytes.extend_from_slice(link.as_bytes());
        let h = ethers::utils::keccak256(bytes);
        u64::from_be_bytes(h[..8].try_into().expect("8 bytes"))
    }

    /// Whether the plan needs the chain wrapped (so its RPC can be cut).
    pub fn cuts_chain(&self) -> bool {
        self.schedule
            .iter()
            .any(|f| matches!(f.fault, Fault::CutChain { .. }))
    }

    /// Scheduled faults of each kind, for figures.
    pub fn count(&self, kind: fn(&Fault) -> bool) -> usize {
        self.schedule.iter().filter(|f| kind(&f.fault)).count()
    }
}

impl std::fmt::Display for FaultPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "fault plan (seed {}):", self.seed)?;
        writeln!(f, "  miners -> queue: {:?}", self.to_queue)?;
        writeln!(f, "  queue -> miners: {:?}", self.to_miner)?;
        writeln!(f, "  deadlines x{:.2}", self.deadline_scale)?;
        for s in &self.schedule {
            writeln!(f, "  at {:>5} ms: {:?}", s.at.as_millis(), s.fault)?;
        }
        Ok(())
    }
}
