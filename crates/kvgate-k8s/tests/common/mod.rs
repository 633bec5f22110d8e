//! Shared test helpers: the upstream InferencePool CRD, read from `$KVGATE_SHARED_DIR/k8s/` or
//! else the nearest `shared/k8s/` beside the repository or one of its parent folders (the
//! project's `../shared`); never copied into the repository.

#![allow(dead_code)]

use kvgate_k8s::CrdSchema;
use std::path::PathBuf;

const CRD: &str = "k8s/inference.networking.k8s.io_inferencepools.yaml";

pub fn shared_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KVGATE_SHARED_DIR") {
        return PathBuf::from(d);
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    repo.ancestors()
        .map(|a| a.join("shared"))
        .find(|s| s.join(CRD).is_file())
        .unwrap_or_else(|| repo.join("../shared"))
}

/// The InferencePool v1 schema. Fails (never skips) when the CRD is not there.
pub fn pool_schema() -> CrdSchema {
    let path = shared_dir().join(CRD);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "the upstream InferencePool CRD is needed at {} (set KVGATE_SHARED_DIR to the folder holding k8s/): {e}",
            path.display()
        )
    });
    CrdSchema::from_crd(&text, "v1").expect("InferencePool CRD v1 schema")
}
