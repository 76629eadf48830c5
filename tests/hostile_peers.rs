//! A peer router as an attacker, through the real peer API (`POST /api/v1/peers/tasks`): it
//! authenticates as that peer (never with an operator's key), may tell only of its own tasks,
//! bounded as this router bounds its own, and cannot fill this router's store.

use cortensor::actors::peer_routers::PeerEvent;
use cortensor::actors::session_queue::GetTask;
use cortensor::config::task_id_base;
use cortensor::task::{TaskKey, TaskRecord};
use cortensor::testkit::{TestNetwork, TestnetBuilder};
use serde_json::{json, Value};
use std::time::Duration;

const PEER_KEY: &str = "the-peer-routers-own-key";

fn tell(net: &TestNetwork, key: &str, event: &PeerEvent) -> (u16, Value) {
    let r = reqwest::blocking::Client::new()
        .post(format!("{}/api/v1/peers/tasks", net.url()))
        .bearer_auth(key)
        .json(event)
        .send()
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

/// A record of a real task of this router, to dress up as the peer's.
fn a_real_record(net: &TestNetwork) -> TaskRecord {
    let sid = net.create_session(1, 1_000_000).unwrap();
    let (status, v) = net.post(
        &format!("/api/v1/completions/{sid}"),
        &json!({"prompt": "hi", "max_tokens": 4}),
    );
    assert_eq!(status, 200, "{v}");
    let key = TaskKey {
        session_id: sid,
        task_id: v["task_id"].as_u64().unwrap(),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let queue = net.testnet().actors.queue.clone();
    runtime
        .block_on(queue.send(GetTask(key)))
        .unwrap()
        .unwrap()
        .expect("the task is known")
}

#[test]
fn a_peer_is_trusted_with_its_own_tasks_alone() {
    let net = TestnetBuilder::new()
        .config(&format!(
            "router.peer_key = \"this-routers-peer-key\"\n\
             router.peer_dead_after_ms = 600000\n\
             router.max_standby_tasks = 2\n\
             router.peers = [{{ url = \"http://127.0.0.1:9\", instance = 1, key = \"{PEER_KEY}\" }}]\n"
        ))
        .start()
        .unwrap();
    let real = a_real_record(&net);
    let theirs = |n: u64, change: &dyn Fn(&mut TaskRecord)| {
        let mut t = real.clone();
        t.key.task_id = task_id_base(1) + n;
        t.state = cortensor::task::TaskState::Queued;
        t.assignments.clear();
        t.outcome = None;
        t.finished_at_ms = None;
        t.deadline_ms = cortensor::task::now_ms() + 60_000;
        change(&mut t);
        PeerEvent::Accepted(Box::new(t))
    };
    let honest = theirs(1, &|_| {});

    // An operator's key is not a peer's: a client of this router would otherwise plant tasks.
    let (status, v) = tell(&net, &net.api_key(), &honest);
    assert_eq!(status, 401, "{v}");
    // The peer's own key, but claims beyond its own tasks and bounds.
    let cases: Vec<(&str, PeerEvent)> = vec![
        ("this router's own task", {
            let mut t = real.clone();
            t.state = cortensor::task::TaskState::Queued;
            PeerEvent::Accepted(Box::new(t))
        }),
        ("this router's task ended", PeerEvent::Ended(real.key)),
        (
            "a deadline past the clock's end",
            theirs(2, &|t| t.deadline_ms = u64::MAX),
        ),
        (
            "a precommit timeout of ages",
            theirs(3, &|t| t.precommit_timeout_ms = u64::MAX),
        ),
        ("a hold of everything", theirs(4, &|t| t.hold = u64::MAX)),
        (
            "another owner's session",
            theirs(5, &|t| t.owner = "someone else".into()),
        ),
        (
            "a session that does not exist",
            theirs(6, &|t| t.key.session_id = 999_999),
        ),
        ("a thousand miners", theirs(7, &|t| t.redundancy = 1000)),
        (
            "an ended task",
            theirs(8, &|t| t.state = cortensor::task::TaskState::Completed),
        ),
    ];
    for (what, event) in &cases {
        let (status, v) = tell(&net, PEER_KEY, event);
        assert_eq!(status, 403, "{what}: {v}");
        assert_eq!(v["error"]["code"], "forbidden", "{what}: {v}");
    }
    // What it may say is kept, up to the configured bound.
    let (status, v) = tell(&net, PEER_KEY, &honest);
    assert_eq!(status, 200, "{v}");
    let (status, v) = tell(&net, PEER_KEY, &honest);
    assert_eq!(status, 200, "the same news twice is kept once: {v}");
    let (status, v) = tell(&net, PEER_KEY, &theirs(10, &|_| {}));
    assert_eq!(status, 200, "{v}");
    let (status, v) = tell(&net, PEER_KEY, &theirs(11, &|_| {}));
    assert_eq!(status, 503, "{v}");
    // An end frees room.
    let (status, v) = tell(
        &net,
        PEER_KEY,
        &PeerEvent::Ended(TaskKey {
            session_id: real.key.session_id,
            task_id: task_id_base(1) + 1,
        }),
    );
    assert_eq!(status, 200, "{v}");
    let (status, v) = tell(&net, PEER_KEY, &theirs(11, &|_| {}));
    assert_eq!(status, 200, "{v}");
    let report = net.finish(Duration::from_secs(30));
    assert!(report.violations.is_empty(), "{report}");
}
