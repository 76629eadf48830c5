//! Miners' reports are signed with their node keys and checked by the queue: a miner whose
//! signatures are forged gets nothing accepted (and nothing paid), and a genuinely signed
//! report moved to another task, or to another assignment, is refused.

mod common;

use common::{faults, scripted};
use cortensor::actors::messages::{MinerReport, ReportKind};
use cortensor::actors::miner::MinerFaults;
use cortensor::actors::report_signing::{self, SignatureError};
use cortensor::actors::session_queue::GetTask;
use cortensor::chain::node_key::NodeKey;
use cortensor::task::TaskKey;
use cortensor::testkit::scripted_engine::Script;
use cortensor::testnet::node_keys_dir;
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;

#[test]
fn signatures_bind_the_task_the_miner_the_assignment_and_the_content() {
    let key = NodeKey::random("miner-1");
    let other = NodeKey::random("miner-1");
    let task = TaskKey {
        session_id: 1,
        task_id: 2,
    };
    let mut report = MinerReport {
        key: task,
        miner: "miner-1".into(),
        nonce: 7,
        kind: ReportKind::Precommit {
            hash: "0xabc".into(),
        },
        signature: None,
    };
    assert_eq!(
        report_signing::verify(&report, key.address()),
        Err(SignatureError::Unsigned)
    );
    report_signing::sign(&mut report, &key);
    assert_eq!(report_signing::verify(&report, key.address()), Ok(()));
    // Signed as the node's Ethereum wallet signs the same digest, bit for bit.
    assert_eq!(
        report.signature,
        Some(
            key.wallet
                .sign_hash(report_signing::report_digest(&report))
                .unwrap()
        )
    );
    assert!(matches!(
        report_signing::verify(&report, other.address()),
        Err(SignatureError::WrongSigner { .. })
    ));
    // Any field changed after signing: the signature no longer recovers the miner's address.
    type Change = Box<dyn Fn(&mut MinerReport)>;
    let changes: Vec<(&str, Change)> = vec![
        ("task", Box::new(|r| r.key.task_id = 3)),
        ("session", Box::new(|r| r.key.session_id = 9)),
        ("miner", Box::new(|r| r.miner = "miner-2".into())),
        ("nonce", Box::new(|r| r.nonce = 8)),
        (
            "content",
            Box::new(|r| {
                r.kind = ReportKind::Precommit {
                    hash: "0xabd".into(),
                }
            }),
        ),
        ("kind", Box::new(|r| r.kind = ReportKind::Ack)),
    ];
    // The queue remembers a key once a signature recovered it and checks later reports
    // against it: the same verdicts, whether the key is known or not.
    let mut known = report_signing::SignerKeys::default();
    assert_eq!(known.verify(&report, key.address()), Ok(()));
    assert_eq!(known.verify(&report, key.address()), Ok(()));
    let mut by_other = report.clone();
    report_signing::sign(&mut by_other, &other);
    assert!(matches!(
        known.verify(&by_other, key.address()),
        Err(SignatureError::WrongSigner { signer, .. }) if signer == other.address()
    ));
    // A high-S twin of a valid signature (same r, s' = n - s, v flipped) is the same
    // signature to ethers' recovery; the known-key check takes it the same way.
    let mut twin = report.clone();
    let sig = twin.signature.as_mut().unwrap();
    let n = ethers::types::U256::from_str_radix(
        "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141",
        16,
    )
    .unwrap();
    sig.s = n - sig.s;
    sig.v = if sig.v == 27 { 28 } else { 27 };
    assert_eq!(
        report_signing::verify(&twin, key.address()),
        known.verify(&twin, key.address())
    );
    for (what, change) in changes {
        let mut moved = report.clone();
        change(&mut moved);
        assert!(
            report_signing::verify(&moved, key.address()).is_err(),
            "a report with its {what} changed still verified"
        );
        assert!(
            known.verify(&moved, key.address()).is_err(),
            "a report with its {what} changed still verified against the known key"
        );
    }
}

#[test]
fn a_forging_miner_gets_nothing_accepted_and_nothing_paid() {
    let dir = tempfile::tempdir().unwrap();
    let forger = MinerFaults {
        forge_signatures: true,
        ..MinerFaults::default()
    };
    let net = scripted(
        "nodes.miners = 3\nqueue.ack_timeout_ms = 300\nqueue.max_replacements = 3",
        HashMap::new(),
        faults(&[("miner-2", forger)]),
        dir.path(),
    );
    let sid = net.session(2, 1_000_000);
    let mut forger_assigned = 0;
    for i in 0..6 {
        let (status, v) = net.post(
            "/api/v1/completions",
            &json!({"session_id": sid, "prompt": format!("signed {i}"), "max_tokens": 6}),
        );
        assert_eq!(status, 200, "{v}");
        assert!(
            !v["miners"].as_array().unwrap().contains(&json!("miner-2")),
            "the forger's result was accepted: {v}"
        );
        let task = net.task(sid, v["task_id"].as_u64().unwrap());
        forger_assigned += task["assignments"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["miner"] == "miner-2")
            .count();
    }
    assert!(
        forger_assigned > 0,
        "the forger was never assigned: nothing was tested"
    );
    assert!(net.metric("cortensor_rejected_reports_total") > 0.0);
    let (_, miners) = net.get("/api/v1/miners");
    assert_eq!(miners["nodes"]["miner-2"]["pending_payment"], 0, "{miners}");
    assert!(
        miners["nodes"]["miner-1"]["pending_payment"]
            .as_u64()
            .unwrap()
            > 0
    );
}

#[test]
fn a_signed_report_replayed_into_another_task_or_assignment_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // Slow miners, so the tasks stay open while the replays arrive.
    let slow = Script::slow(Duration::from_millis(60));
    let net = scripted(
        "nodes.miners = 1",
        common::scripts(&[("miner-1", slow)]),
        HashMap::new(),
        dir.path(),
    );
    let sid = net.session(1, 1_000_000);
    let submit = |prompt: &'static str| {
        let (client, url, key) = (
            net.http.clone(),
            net.url("/api/v1/completions"),
            net.testnet.api_key.clone(),
        );
        std::thread::spawn(move || {
            client
                .post(url)
                .bearer_auth(key)
                .json(&json!({"session_id": sid, "prompt": prompt, "max_tokens": 8}))
                .send()
                .unwrap()
                .json::<serde_json::Value>()
                .unwrap()
        })
    };
    let first = submit("first");
    let second = submit("second");
    let queue = net.testnet.actors.queue.clone();
    let system = actix_rt::System::new();
    let nonce_of = |task_id: u64| {
        let key = TaskKey {
            session_id: sid,
            task_id,
        };
        for _ in 0..2000 {
            if let Some(r) = system.block_on(queue.send(GetTask(key))).unwrap().unwrap() {
                if let Some(a) = r.assignments.first() {
                    return a.nonce;
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("task {task_id} was never assigned");
    };
    let (n1, n2) = (nonce_of(1), nonce_of(2));
    assert_ne!(n1, n2);
    let miner_key = NodeKey::load(&node_keys_dir(dir.path()), "miner-1").unwrap();
    // A genuine failure report for task 1 (what an eavesdropper could have captured)...
    let mut genuine = MinerReport {
        key: TaskKey {
            session_id: sid,
            task_id: 1,
        },
        miner: "miner-1".into(),
        nonce: n1,
        kind: ReportKind::Failed {
            error: "replayed".into(),
        },
        signature: None,
    };
    report_signing::sign(&mut genuine, &miner_key);
    // ...moved to task 2 (same signature), and re-signed under the wrong assignment's nonce.
    let mut moved = genuine.clone();
    moved.key.task_id = 2;
    moved.nonce = n2;
    let mut stale = genuine.clone();
    stale.key.task_id = 2;
    report_signing::sign(&mut stale, &miner_key); // signed, but with task 1's nonce
    let before = net.metric("cortensor_rejected_reports_total");
    queue.do_send(moved);
    queue.do_send(stale);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(net.metric("cortensor_rejected_reports_total") - before, 2.0);
    // Neither replay disturbed task 2: it completes with the miner's own result.
    let v2 = second.join().unwrap();
    assert_eq!(v2["usage"]["completion_tokens"], 8, "{v2}");
    let v1 = first.join().unwrap();
    assert!(v1["choices"].is_array(), "{v1}");
}

#[test]
fn only_a_reveal_matching_its_signed_precommit_skips_the_signature_check() {
    use cortensor::task::TaskResult;
    let result = TaskResult {
        text: "four".into(),
        token_ids: vec![1, 2],
        finish_reason: cortensor::models::engine::FinishReason::Stop,
        prompt_tokens: 3,
    };
    let commit = |result: &TaskResult, miner: &str| MinerReport {
        key: TaskKey {
            session_id: 1,
            task_id: 1,
        },
        miner: miner.into(),
        nonce: 7,
        kind: ReportKind::Commit {
            result: result.clone(),
        },
        signature: None,
    };
    let precommitted = result.commitment_hex("miner-1");
    // The precommitted result, under the miner's name: authenticated by the precommit.
    assert!(report_signing::authenticated_by_precommit(
        &commit(&result, "miner-1"),
        Some(&precommitted)
    ));
    // Anything else still needs the miner's signature: another result, another miner's name
    // (the hash names the miner), no precommit, or a report that is not a reveal.
    let mut other = result.clone();
    other.text.push('!');
    for (what, report, hash) in [
        (
            "another result",
            commit(&other, "miner-1"),
            Some(precommitted.as_str()),
        ),
        (
            "another miner",
            commit(&result, "miner-2"),
            Some(precommitted.as_str()),
        ),
        ("no precommit", commit(&result, "miner-1"), None),
    ] {
        assert!(
            !report_signing::authenticated_by_precommit(&report, hash),
            "{what} skipped the check"
        );
    }
    let mut ack = commit(&result, "miner-1");
    ack.kind = ReportKind::Ack;
    assert!(!report_signing::authenticated_by_precommit(
        &ack,
        Some(&precommitted)
    ));
}
