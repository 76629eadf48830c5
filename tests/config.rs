//! The testnet configuration: the embedded defaults parse, a file changes only the keys it
//! names, and bad values are refused with a message naming them.

use cortensor::config::{TestnetConfig, DEV_API_KEY};

#[test]
fn the_embedded_defaults_parse_and_match_cortensor() {
    let c = TestnetConfig::default();
    assert_eq!(c.router.listen.port(), 5010);
    assert_eq!(c.router.effective_api_keys(), vec![DEV_API_KEY.to_string()]);
    assert_eq!(c.nodes.miners, 3);
    assert_eq!(c.queue.precommit_timeout_ms, 90_000);
}

#[test]
fn an_overlay_changes_only_what_it_names() {
    let c = TestnetConfig::from_toml_str("[nodes]\nminers = 7\n[router]\napi_keys = [\"k\"]", "t")
        .unwrap();
    let d = TestnetConfig::default();
    assert_eq!(c.nodes.miners, 7);
    assert_eq!(c.nodes.validators, d.nodes.validators);
    assert_eq!(c.router.effective_api_keys(), vec!["k".to_string()]);
    assert_eq!(c.queue.ack_timeout_ms, d.queue.ack_timeout_ms);
}

#[test]
fn bad_values_are_refused_by_name() {
    let check = |toml: &str, needle: &str| {
        let e = TestnetConfig::from_toml_str(toml, "bad.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{toml:?}: {e}");
    };
    check("[nodes]\nminers = -1", "miners");
    check("[router]\nlisten = \"not an address\"", "listen");
    check("[router]\napi_keys = [\"\"]", "api_keys");
    check("[queue]\ntick_ms = 0", "tick_ms");
    check(
        "[nodes]\nheartbeat_interval_ms = 1000\noffline_after_ms = 500",
        "offline_after_ms",
    );
    check("[storage]\nsomething = 1", "something");
    check("not toml at all [", "bad.toml");
}
