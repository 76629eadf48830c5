//! A faulty link between two actors: every message sent through it may be dropped, duplicated,
//! delayed (which reorders it against later ones) or corrupted, by a seeded random generator;
//! a [`LinkControl`] shared with the test stalls the link (holds every message until a moment)
//! or corrupts what passes for a while.
//!
//! The link is an actor of its own standing where the real recipient stood (see
//! [`crate::testnet::Wiring`]), so the actors on either side do not know it is there.

use super::fault_plan::LinkFaults;
use actix::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest a message is held by a stall, whatever the control says (a bound on the timers a
/// link keeps).
pub const MAX_STALL: Duration = Duration::from_secs(30);

/// What a link has done, for the test's figures.
#[derive(Debug, Default)]
pub struct LinkCounters {
    pub passed: AtomicU64,
    pub dropped: AtomicU64,
    pub duplicated: AtomicU64,
    pub delayed: AtomicU64,
    pub corrupted: AtomicU64,
}

impl LinkCounters {
    /// Faults injected so far (everything but messages passed untouched).
    pub fn faults(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
            + self.duplicated.load(Ordering::Relaxed)
            + self.delayed.load(Ordering::Relaxed)
            + self.corrupted.load(Ordering::Relaxed)
    }
}

/// Switches a test flips while the network runs, per node.
#[derive(Debug, Default)]
pub struct LinkControl {
    stalled_until: Mutex<Option<Instant>>,
    corrupting: AtomicBool,
}

impl LinkControl {
    /// Holds every message until `for_` from now (the node looks frozen).
    pub fn stall(&self, for_: Duration) {
        *self.stalled_until.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Instant::now() + for_.min(MAX_STALL));
    }
    pub fn set_corrupting(&self, on: bool) {
        self.corrupting.store(on, Ordering::SeqCst);
    }
    fn stall_left(&self) -> Duration {
        let until = *self.stalled_until.lock().unwrap_or_else(|e| e.into_inner());
        until.map_or(Duration::ZERO, |t| {
            t.saturating_duration_since(Instant::now())
        })
    }
}

/// Changes a message the way a broken or dishonest sender would; false when the message
/// carries nothing worth changing.
pub type Corruptor<M> = Arc<dyn Fn(&mut M) -> bool + Send + Sync>;

pub struct FaultyLink<M: Message<Result = ()> + Clone + Send + 'static> {
    target: Recipient<M>,
    faults: LinkFaults,
    rng: ChaCha8Rng,
    control: Arc<LinkControl>,
    counters: Arc<LinkCounters>,
    corruptor: Option<Corruptor<M>>,
}

impl<M: Message<Result = ()> + Clone + Send + 'static> FaultyLink<M> {
    pub fn new(
        target: Recipient<M>,
        faults: LinkFaults,
        seed: u64,
        control: Arc<LinkControl>,
        counters: Arc<LinkCounters>,
        corruptor: Option<Corruptor<M>>,
    ) -> Self {
        Self {
            target,
            faults,
            rng: ChaCha8Rng::seed_from_u64(seed),
            control,
            counters,
            corruptor,
        }
    }
}

impl<M: Message<Result = ()> + Clone + Send + 'static> Actor for FaultyLink<M> {
    type Context = Context<Self>;
}

impl<M: Message<Result = ()> + Clone + Send + 'static> Handler<M> for FaultyLink<M> {
    type Result = ();
    fn handle(&mut self, mut m: M, ctx: &mut Context<Self>) {
        // Every draw happens whatever the outcome, so a seed gives the same decisions.
        let drop = self.rng.gen_bool(self.faults.drop);
        let duplicate = self.rng.gen_bool(self.faults.duplicate);
        let corrupt = self.rng.gen_bool(self.faults.corrupt);
        let delays = [self.delay(), self.delay()];
        if drop {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if corrupt || self.control.corrupting.load(Ordering::SeqCst) {
            if let Some(corruptor) = &self.corruptor {
                if corruptor(&mut m) {
                    self.counters.corrupted.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let copies = if duplicate {
            self.counters.duplicated.fetch_add(1, Ordering::Relaxed);
            2
        } else {
            1
        };
        let stall = self.control.stall_left();
        for delay in delays.into_iter().take(copies) {
            let wait = delay + stall;
            if wait.is_zero() {
                self.counters.passed.fetch_add(1, Ordering::Relaxed);
                self.target.do_send(m.clone());
            } else {
                self.counters.delayed.fetch_add(1, Ordering::Relaxed);
                let m = m.clone();
                ctx.run_later(wait, move |link, _| link.target.do_send(m));
            }
        }
    }
}

impl<M: Message<Result = ()> + Clone + Send + 'static> FaultyLink<M> {
    fn delay(&mut self) -> Duration {
        let max = self.faults.delay_max.as_micros() as u64;
        let delayed = self.rng.gen_bool(self.faults.delay);
        let micros = self.rng.gen_range(0..=max);
        if delayed {
            Duration::from_micros(micros)
        } else {
            Duration::ZERO
        }
    }
}
