//! Shared test helpers: the upstream InferencePool CRD (read from `../shared/k8s/` beside the
//! repository, or `$KVGATE_SHARED_DIR/k8s/`; never copied into the repository).

#![allow(dead_code)]

use kvgate_k8s::CrdSchema;
use std::path::PathBuf;

pub fn shared_dir() -> PathBuf {
    std::env::var_os("KVGATE_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"))
}

/// The InferencePool v1 schema. Fails (never skips) when the CRD is not there.
pub fn pool_schema() -> CrdSchema {
    let path = shared_dir().join("k8s/inference.networking.k8s.io_inferencepools.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "the upstream InferencePool CRD is needed at {} (set KVGATE_SHARED_DIR to the folder holding k8s/): {e}",
            path.display()
        )
    });
    CrdSchema::from_crd(&text, "v1").expect("InferencePool CRD v1 schema")
}
