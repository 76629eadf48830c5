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
        "[router]\npeers = [{ url = \"http://b:5010\", instance = 0 }]",
        "instance",
    );
    check(
        "[router]\npeers = [{ url = \"b:5010\", instance = 1 }]",
        "http://",
    );
    check(
        "[router]\npeers = [{ url = \"http://b:5010\", instance = 1, address = \"0x12\" }]",
        "address",
    );
    check(
        "[router]\npeers = [{ url = \"http://b:5010\", instance = 1, color = 1 }]",
        "color",
    );
    check(
        "[nodes]\nheartbeat_interval_ms = 1000\noffline_after_ms = 500",
        "offline_after_ms",
    );
    check("[storage]\nsomething = 1", "something");
    check("not toml at all [", "bad.toml");
    check("[chain.contracts]\npayment = \"0x12\"", "chain");
    check(
        "[chain.contracts]\npayment = \"0x5FbDB2315678afecb367f032d93F642f64180aa3\"",
        "queue",
    );
}

#[test]
fn deployed_contracts_are_named_in_the_configuration() {
    let a = |n: u8| format!("\"0x{}\"", format!("{n:02x}").repeat(20));
    let toml = format!(
        "[chain]\nkind = \"anvil\"\n[chain.contracts]\npayment = {}\nqueue = {}\nsessions = {}\nnodes = {}\nreputation = {}",
        a(1), a(2), a(3), a(4), a(5)
    );
    let c = TestnetConfig::from_toml_str(&toml, "t").unwrap();
    let d = c.chain.contracts.expect("the addresses");
    assert_eq!(
        format!("{:?}", d.payment),
        "0x0101010101010101010101010101010101010101"
    );
    assert_eq!(
        format!("{:?}", d.reputation),
        "0x0505050505050505050505050505050505050505"
    );
    assert!(TestnetConfig::default().chain.contracts.is_none());
}

#[test]
fn an_exposed_router_never_keeps_the_public_development_key() {
    // On loopback the development key stays.
    let mut local = TestnetConfig::default();
    assert_eq!(local.router.settle_operator_keys(false).unwrap(), None);
    assert_eq!(
        local.router.effective_api_keys(),
        vec![DEV_API_KEY.to_string()]
    );
    // Exposed with none configured: a random key of its own, different each time.
    let mut exposed = TestnetConfig::default();
    let made = exposed.router.settle_operator_keys(true).unwrap().unwrap();
    assert_eq!(exposed.router.effective_api_keys(), vec![made.clone()]);
    let mut other = TestnetConfig::default();
    assert_ne!(other.router.settle_operator_keys(true).unwrap(), Some(made));
    // Exposed with the development key configured: refused, naming it.
    let mut dev = TestnetConfig::from_toml_str(
        "[router]\napi_keys = [\"mine\", \"default-dev-token\"]",
        "t",
    )
    .unwrap();
    let e = dev
        .router
        .settle_operator_keys(true)
        .unwrap_err()
        .to_string();
    assert!(e.contains(DEV_API_KEY), "{e}");
    // Exposed with keys of its own: kept as they are.
    let mut own = TestnetConfig::from_toml_str("[router]\napi_keys = [\"mine\"]", "t").unwrap();
    assert_eq!(own.router.settle_operator_keys(true).unwrap(), None);
    assert_eq!(own.router.effective_api_keys(), vec!["mine".to_string()]);
}

#[test]
fn the_node_socket_leaves_loopback_only_behind_tls() {
    use cortensor::commands::router::default_node_listen;
    assert!(default_node_listen(false).ip().is_loopback());
    assert!(default_node_listen(true).ip().is_unspecified());
    assert_eq!(default_node_listen(false).port(), 9001);
}
