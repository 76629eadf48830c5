//! The bounded load test (`cortensor bench load` with smaller numbers): many clients at once,
//! most streaming, against scripted miners on loopback. Overload is refused with 429 (with
//! Retry-After) and nothing else fails; every request retried after its 429s is served in the
//! end; memory stays bounded. The figures are printed.

use cortensor::commands::bench_load::{measure, LoadArgs};

#[test]
fn overload_is_answered_with_429_and_nothing_else() {
    let args = LoadArgs {
        requests: 3_000,
        concurrency: 400,
        stream_share: 0.7,
        tokens: 16,
        token_delay_ms: 1,
        miners: 4,
        config: String::new(),
    };
    let figures = measure(&args).expect("the load runs");
    eprintln!("{figures}");
    assert!(
        figures.errors.is_empty(),
        "errors other than 429: {figures}"
    );
    // Every request is served in the end: overload delays, it never loses.
    assert_eq!(figures.completed, args.requests, "{figures}");
    assert!(
        figures.rate_limited > 0,
        "the load never reached the admission limit: {figures}"
    );
    // Bounded: the in-flight limits cap what the network holds, whatever the offered load.
    assert!(
        figures.rss_peak_mb - figures.rss_before_mb < 1024.0,
        "memory grew by more than 1 GiB: {figures}"
    );
}
