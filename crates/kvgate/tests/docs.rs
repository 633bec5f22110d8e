//! The README's configuration table documents every knob, by env var and flag.

use kvgate_core::config::KNOBS;

#[test]
fn readme_lists_every_knob() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .unwrap_or_else(|e| panic!("README.md: {e}"));
    for k in KNOBS {
        let row = readme
            .lines()
            .find(|l| l.starts_with(&format!("| `{}` |", k.env)))
            .unwrap_or_else(|| panic!("README has no row for {}", k.env));
        assert!(
            row.contains(&format!("`{}`", k.flag)),
            "{} row lacks {}",
            k.env,
            k.flag
        );
        assert!(
            row.contains(&format!("| {} |", k.default)),
            "{} row lacks default {}",
            k.env,
            k.default
        );
    }
}
