//! A node's reputation, as the node pool keeps it: counters of on-time and missed stages and of
//! accepted and rejected results; a decayed score; a cognitive level 0..=10 moved by per-level
//! rules; suspension while the score is too low. Pure: the pool feeds it outcomes and reads it.
//!
//! - **Score** (0..=1, shown as 0..=1000): every outcome moves it toward 1 (success) or 0
//!   (failure) by `1 - decay` of the distance, so old behaviour fades geometrically.
//! - **Levels**: a task outcome (accepted; or rejected, failed, missed, wrong reveal) counts as a
//!   success or a failure. From level L a node rises after `3 + L` successes in a row if at
//!   least `60 + 3.5·L` % of its last [`WINDOW`] task outcomes succeeded; it falls one level
//!   when that percentage drops 15 points below its level's bar (with at least half a window
//!   recorded), and at once on a wrong reveal. Higher levels ask for longer, cleaner records.
//! - **Suspension**: below `suspend_below` the node is suspended for `suspension_ms` (not
//!   selected); afterwards its score restarts just above the bar, on probation.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Task outcomes the level rules look at.
pub const WINDOW: usize = 20;
pub const MAX_LEVEL: u8 = 10;

/// A stage of a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Ack,
    Precommit,
    Commit,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Ack => "ack",
            Stage::Precommit => "precommit",
            Stage::Commit => "commit",
        }
    }
}

/// What a node did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Its result was accepted (every stage was on time).
    Accepted,
    /// Its result was rejected by validation (every stage was on time).
    Rejected,
    /// It missed the deadline of a stage (the stages before were on time).
    Missed(Stage),
    /// Its engine failed the task.
    Failed,
    /// Its reveal did not match its precommit.
    WrongReveal,
}

impl Outcome {
    pub fn success(self) -> bool {
        self == Outcome::Accepted
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    pub acks_on_time: u64,
    pub acks_missed: u64,
    pub precommits_on_time: u64,
    pub precommits_missed: u64,
    pub commits_on_time: u64,
    pub commits_missed: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub failed: u64,
    pub wrong_reveals: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReputationRules {
    /// Weight of the past in the score per outcome.
    pub decay: f64,
    pub initial_score: f64,
    /// Suspended below this score.
    pub suspend_below: f64,
    pub suspension_ms: u64,
}

impl Default for ReputationRules {
    fn default() -> Self {
        Self {
            decay: 0.9,
            initial_score: 0.5,
            suspend_below: 0.2,
            suspension_ms: 60_000,
        }
    }
}

/// Successes in a row needed to rise from `level`.
pub fn upgrade_streak(level: u8) -> u32 {
    3 + level as u32
}

/// The success percentage (0..=1) over the window needed to rise from `level`.
pub fn upgrade_rate(level: u8) -> f64 {
    0.60 + 0.035 * level as f64
}

/// Below this success percentage a node at `level` falls a level.
pub fn downgrade_rate(level: u8) -> f64 {
    upgrade_rate(level) - 0.15
}

/// A change worth telling (the pool logs it and records it).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Change {
    Level { from: u8, to: u8 },
    Suspended { until_ms: u64 },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeReputation {
    pub counters: Counters,
    /// 0..=1.
    pub score: f64,
    pub level: u8,
    pub consecutive_successes: u32,
    /// The last [`WINDOW`] task outcomes (true: success), oldest first.
    pub recent: VecDeque<bool>,
    pub suspended_until_ms: Option<u64>,
}

impl NodeReputation {
    pub fn new(rules: &ReputationRules) -> Self {
        Self {
            counters: Counters::default(),
            score: rules.initial_score,
            level: 0,
            consecutive_successes: 0,
            recent: VecDeque::with_capacity(WINDOW),
            suspended_until_ms: None,
        }
    }

    /// The score as the API and the reputation-weighted consensus show it: 0..=1000.
    pub fn points(&self) -> i64 {
        (self.score * 1000.0).round() as i64
    }

    pub fn success_rate(&self) -> f64 {
        if self.recent.is_empty() {
            return 1.0;
        }
        self.recent.iter().filter(|s| **s).count() as f64 / self.recent.len() as f64
    }

    pub fn suspended(&self, now_ms: u64) -> bool {
        self.suspended_until_ms.is_some_and(|t| t > now_ms)
    }

    /// Records one outcome at `now_ms`; returns what changed.
    pub fn record(
        &mut self,
        outcome: Outcome,
        now_ms: u64,
        rules: &ReputationRules,
    ) -> Vec<Change> {
        let c = &mut self.counters;
        match outcome {
            Outcome::Accepted | Outcome::Rejected => {
                c.acks_on_time += 1;
                c.precommits_on_time += 1;
                c.commits_on_time += 1;
                if outcome == Outcome::Accepted {
                    c.accepted += 1;
                } else {
                    c.rejected += 1;
                }
            }
            Outcome::Missed(Stage::Ack) => c.acks_missed += 1,
            Outcome::Missed(Stage::Precommit) => {
                c.acks_on_time += 1;
                c.precommits_missed += 1;
            }
            Outcome::Missed(Stage::Commit) => {
                c.acks_on_time += 1;
                c.precommits_on_time += 1;
                c.commits_missed += 1;
            }
            Outcome::Failed => c.failed += 1,
            Outcome::WrongReveal => c.wrong_reveals += 1,
        }
        let success = outcome.success();
        let target = if success { 1.0 } else { 0.0 };
        // A forged reveal weighs as much as three ordinary failures.
        let weight = if outcome == Outcome::WrongReveal {
            3
        } else {
            1
        };
        for _ in 0..weight {
            self.score = rules.decay * self.score + (1.0 - rules.decay) * target;
        }
        if self.recent.len() == WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(success);

        let mut changes = Vec::new();
        let from = self.level;
        if success {
            self.consecutive_successes += 1;
            if self.level < MAX_LEVEL
                && self.consecutive_successes >= upgrade_streak(self.level)
                && self.success_rate() >= upgrade_rate(self.level)
            {
                self.level += 1;
                self.consecutive_successes = 0;
            }
        } else {
            self.consecutive_successes = 0;
            let enough = self.recent.len() >= WINDOW / 2;
            if self.level > 0
                && (outcome == Outcome::WrongReveal
                    || enough && self.success_rate() < downgrade_rate(self.level))
            {
                self.level -= 1;
            }
        }
        if self.level != from {
            changes.push(Change::Level {
                from,
                to: self.level,
            });
        }
        if self.score < rules.suspend_below && !self.suspended(now_ms) {
            let until_ms = now_ms + rules.suspension_ms;
            self.suspended_until_ms = Some(until_ms);
            // On probation afterwards: just above the bar, so one more failure suspends again.
            self.score = rules.suspend_below + (1.0 - rules.decay) * 0.5;
            changes.push(Change::Suspended { until_ms });
        }
        changes
    }
}
