//! Reputation on its own (counters, decayed score, levels, suspension) and in the network: a
//! miner whose results keep being rejected is suspended and no longer selected, while honest
//! miners rise in level.

mod common;

use common::{scripted, scripts};
use cortensor::reputation::*;
use cortensor::testkit::scripted_engine::Script;
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;

fn rules() -> ReputationRules {
    ReputationRules::default()
}

#[test]
fn counters_follow_the_stages_each_outcome_implies() {
    let r = rules();
    let mut n = NodeReputation::new(&r);
    n.record(Outcome::Accepted, 0, &r);
    n.record(Outcome::Missed(Stage::Precommit), 0, &r);
    n.record(Outcome::Missed(Stage::Commit), 0, &r);
    n.record(Outcome::Rejected, 0, &r);
    let c = &n.counters;
    assert_eq!((c.acks_on_time, c.acks_missed), (4, 0));
    assert_eq!((c.precommits_on_time, c.precommits_missed), (3, 1));
    assert_eq!((c.commits_on_time, c.commits_missed), (2, 1));
    assert_eq!((c.accepted, c.rejected), (1, 1));
    assert_eq!(n.success_rate(), 0.25);
}

#[test]
fn the_score_decays_toward_recent_behaviour() {
    let r = rules();
    let mut n = NodeReputation::new(&r);
    for _ in 0..50 {
        n.record(Outcome::Accepted, 0, &r);
    }
    assert!(n.points() > 990, "{}", n.points());
    let good = n.points();
    n.record(Outcome::Rejected, 0, &r);
    let after_one = n.points();
    assert!(after_one < good && after_one > 850, "{after_one}");
    // A forged reveal costs as much as three failures.
    let mut m = NodeReputation::new(&r);
    let mut f = NodeReputation::new(&r);
    m.record(Outcome::WrongReveal, 0, &r);
    for _ in 0..3 {
        f.record(Outcome::Failed, 0, &r);
    }
    assert_eq!(m.points(), f.points());
}

#[test]
fn levels_rise_with_per_level_streaks_and_fall_on_failures() {
    let r = rules();
    let mut n = NodeReputation::new(&r);
    let mut successes = 0;
    while n.level < 3 {
        n.record(Outcome::Accepted, 0, &r);
        successes += 1;
        assert!(successes < 100);
    }
    // 3 + 4 + 5 successes in a row for levels 1, 2 and 3.
    assert_eq!(successes, 3 + 4 + 5);
    // A wrong reveal costs a level at once.
    let changes = n.record(Outcome::WrongReveal, 0, &r);
    assert_eq!(changes[0], Change::Level { from: 3, to: 2 });
    // Failures pull the success rate under the level's bar: down again.
    let mut fell = false;
    for _ in 0..10 {
        if n.record(Outcome::Failed, 0, &r)
            .contains(&Change::Level { from: 2, to: 1 })
        {
            fell = true;
            break;
        }
    }
    assert!(fell, "{n:?}");
    assert!(upgrade_rate(10) > upgrade_rate(0) && upgrade_streak(10) > upgrade_streak(0));
}

#[test]
fn a_node_below_the_bar_is_suspended_for_a_while() {
    let r = rules();
    let mut n = NodeReputation::new(&r);
    let mut at = None;
    for i in 0..20u64 {
        if let Some(Change::Suspended { until_ms }) = n
            .record(Outcome::Rejected, i, &r)
            .into_iter()
            .find(|c| matches!(c, Change::Suspended { .. }))
        {
            at = Some((i, until_ms));
            break;
        }
    }
    let (i, until) = at.expect("suspended");
    assert_eq!(until, i + r.suspension_ms);
    assert!(n.suspended(i + 1) && !n.suspended(until));
}

#[test]
fn a_miner_whose_results_keep_being_rejected_is_suspended_and_honest_ones_rise() {
    let dir = tempfile::tempdir().unwrap();
    let net = scripted(
        "nodes.miners = 4\nqueue.tick_ms = 10",
        scripts(&[(
            "miner-3",
            Script {
                dishonest: true,
                ..Script::default()
            },
        )]),
        HashMap::new(),
        dir.path(),
    );
    let sid = net.session(3, 10_000_000);
    let mut assigned_after_suspension = 0;
    let mut suspended = false;
    for i in 0..40 {
        let (status, v) = net.post(
            "/api/v1/completions",
            &json!({"session_id": sid, "prompt": format!("question {i}"), "max_tokens": 4}),
        );
        assert_eq!(status, 200, "{v}");
        let task = net.task(sid, v["task_id"].as_u64().unwrap());
        let on_task = task["assigned_miners"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m == "miner-3");
        if suspended && on_task {
            assigned_after_suspension += 1;
        }
        let (_, miners) = net.get("/api/v1/miners");
        if miners["nodes"]["miner-3"]["state"] == "suspended" {
            suspended = true;
        }
    }
    let (_, miners) = net.get("/api/v1/miners");
    let byz = &miners["nodes"]["miner-3"];
    assert!(suspended, "{byz}");
    assert_eq!(assigned_after_suspension, 0, "{byz}");
    assert!(byz["counters"]["rejected"].as_u64().unwrap() >= 8, "{byz}");
    assert!(byz["reputation"].as_i64().unwrap() < 300, "{byz}");
    for honest in ["miner-1", "miner-2", "miner-4"] {
        let m = &miners["nodes"][honest];
        assert!(m["level"].as_u64().unwrap() >= 1, "{m}");
        assert_eq!(m["counters"]["rejected"], 0, "{m}");
        assert!(m["reputation"].as_i64().unwrap() > 500, "{m}");
    }
    // The outcomes reach the chain's records (in batches, within a second): the byzantine
    // miner's failures and an honest miner's successes.
    net.wait_for(Duration::from_secs(10), "outcomes on chain", |n| {
        let (_, miners) = n.get("/api/v1/miners");
        let failures = miners["nodes"]["miner-3"]["chain_record"]["failures"].as_u64();
        let rejected = miners["nodes"]["miner-3"]["counters"]["rejected"].as_u64();
        let successes = miners["nodes"]["miner-1"]["chain_record"]["successes"].as_u64();
        let accepted = miners["nodes"]["miner-1"]["counters"]["accepted"].as_u64();
        failures.is_some() && failures == rejected && successes.is_some() && successes == accepted
    });
    let (_, miners) = net.get("/api/v1/miners");
    let record = &miners["nodes"]["miner-1"]["chain_record"];
    assert_eq!(record["failures"], 0, "{record}");
    assert_eq!(
        record["level"], miners["nodes"]["miner-1"]["level"],
        "{record}"
    );
    assert_eq!(
        record["successes"],
        miners["nodes"]["miner-1"]["counters"]["accepted"]
    );
    assert!(record["tokens"].as_u64().unwrap() > 0, "{record}");
}
