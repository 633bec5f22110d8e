//! The deployment files: the Dockerfile passes hadolint (`.tools/bin/hadolint`, installed by
//! scripts/setup.sh; fails, never skips, without it) and builds with the toolchain the
//! repository pins.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn the_dockerfile_passes_hadolint() {
    let hadolint = root().join(".tools/bin/hadolint");
    let out = Command::new(&hadolint)
        .arg(root().join("Dockerfile"))
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup.sh)", hadolint.display()));
    assert!(
        out.status.success(),
        "hadolint:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_dockerfile_builds_the_kvgate_binary_with_the_pinned_toolchain_as_non_root() {
    let docker = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let toolchain = std::fs::read_to_string(root().join("rust-toolchain.toml")).unwrap();
    let channel = toolchain
        .lines()
        .find_map(|l| l.strip_prefix("channel = "))
        .map(|c| c.trim_matches('"'))
        .unwrap();
    assert!(
        docker.contains(&format!("FROM rust:{channel}-")),
        "the build stage must use rust {channel} (rust-toolchain.toml)"
    );
    assert!(docker.contains(&format!("RUSTUP_TOOLCHAIN={channel}")));
    assert!(docker.contains("cargo build --release --locked -p kvgate"));
    assert!(docker.contains("USER 65532:65532"));
    assert!(docker.contains(r#"ENTRYPOINT ["/usr/local/bin/kvgate"]"#));
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    for p in ["target/", ".tools/"] {
        assert!(ignore.lines().any(|l| l == p), "{p} not in .dockerignore");
    }
}
