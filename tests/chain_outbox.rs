//! The outbox on its own, against the embedded ledger as its chain: holds and settlements are
//! answered from the view before the chain has them, the view survives a restart with writes
//! still pending, repeats change nothing, and delivery brings the chain to the same state.

use cortensor::actors::chain_outbox::Outbox;
use cortensor::chain::local_ledger::LocalLedger;
use cortensor::chain::{Chain, Settlement};
use cortensor::session::SessionParams;
use cortensor::store::Store;
use cortensor::task::TaskKey;
use std::time::Duration;

#[test]
fn the_view_runs_ahead_of_the_chain_and_survives_a_restart() {
    let chain_dir = tempfile::tempdir().unwrap();
    let router_dir = tempfile::tempdir().unwrap();
    let mut chain = LocalLedger::new(Store::open(chain_dir.path()).unwrap());
    let sid = chain
        .create_session("o", SessionParams::default(), 1_000)
        .unwrap()
        .id;
    let task = TaskKey {
        session_id: sid,
        task_id: 1,
    };
    let store = Store::open(router_dir.path()).unwrap();
    let mut outbox = Outbox::new(store.clone(), Duration::from_secs(5));
    let view = outbox.hold(&mut chain, task, 300).unwrap();
    assert_eq!((view.balance, view.held), (700, 300));
    assert_eq!(
        chain.session(sid).unwrap().unwrap().balance,
        1_000,
        "not delivered yet"
    );

    // A restart: a new outbox on the same store rebuilds the view from the chain plus the
    // writes still waiting.
    drop(outbox);
    let mut outbox = Outbox::new(store, Duration::from_secs(5));
    let view = outbox.session(&mut chain, sid).unwrap().unwrap();
    assert_eq!((view.balance, view.held), (700, 300));
    // The same hold again (a retried request) changes nothing.
    let view = outbox.hold(&mut chain, task, 300).unwrap();
    assert_eq!((view.balance, view.held), (700, 300));
    let over = TaskKey {
        session_id: sid,
        task_id: 2,
    };
    assert!(
        outbox.hold(&mut chain, over, 701).is_err(),
        "the view's balance bounds holds"
    );

    outbox
        .settle(Settlement {
            task,
            hold: 300,
            charge: 100,
            payees: vec!["m".into()],
            trace: None,
        })
        .unwrap();
    let view = outbox.session(&mut chain, sid).unwrap().unwrap();
    assert_eq!((view.balance, view.held, view.spent), (900, 0, 100));
    assert_eq!(outbox.counts().pending, 2);

    outbox.deliver(&mut chain).unwrap();
    let on_chain = chain.session(sid).unwrap().unwrap();
    assert_eq!(
        (on_chain.balance, on_chain.held, on_chain.spent),
        (900, 0, 100)
    );
    assert_eq!(chain.node_pending_payment("m").unwrap(), 100);
    let counts = outbox.counts();
    assert_eq!((counts.pending, counts.unconfirmed), (0, 2));
}
