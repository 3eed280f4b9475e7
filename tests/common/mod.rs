//! Helpers shared by the property tests (`tests/proptest_*.rs`).

use proptest::prelude::ProptestConfig;

/// The proptest settings of a property that gets `1/share` of the case budget:
/// `PROPTEST_CASES` (default 2000) bounds the run time of a whole file, and nothing is
/// persisted (failures print their seed).
pub fn config(share: u32) -> ProptestConfig {
    let cases: u32 = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    ProptestConfig {
        cases: (cases / share.max(1)).max(1),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}
