//! Dynamo's worker instance id for a Kubernetes pod name (CONTRACTS.md section 3).
//!
//! Dynamo hashes the pod name with Rust's `DefaultHasher::new()` (SipHash-1-3 with zero keys)
//! through `<str as Hash>` (the bytes, then a `0xff` terminator) and keeps the low 53 bits so the
//! id survives a JSON round trip through a double. We spell the algorithm out instead of
//! calling `DefaultHasher`, whose algorithm std does not promise to keep.

use crate::ids::WorkerId;
use siphasher::sip::SipHasher13;
use std::hash::Hasher;

/// 53 bits: the largest integers a JSON double carries exactly.
pub const WORKER_ID_MASK: u64 = 0x001F_FFFF_FFFF_FFFF;

pub fn worker_id_for_pod(pod_name: &str) -> WorkerId {
    let mut h = SipHasher13::new_with_keys(0, 0);
    h.write(pod_name.as_bytes());
    h.write_u8(0xff);
    WorkerId(h.finish() & WORKER_ID_MASK)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[allow(deprecated)]
    use std::hash::{Hash, SipHasher};

    /// On today's toolchain `DefaultHasher::new()` is SipHash-1-3 with zero keys: check that our
    /// spelled-out version agrees with it (std's deprecated `SipHasher` is SipHash-2-4, so it must not).
    #[test]
    fn matches_std_default_hasher() {
        for name in ["", "vllm-worker-0", "qwen3-decode-7d9f8b-abcde", "ünïcødé"] {
            let mut std_h = std::collections::hash_map::DefaultHasher::new();
            name.hash(&mut std_h);
            assert_eq!(
                worker_id_for_pod(name).0,
                std_h.finish() & WORKER_ID_MASK,
                "{name}"
            );
            #[allow(deprecated)]
            let mut sip24 = SipHasher::new_with_keys(0, 0);
            name.hash(&mut sip24);
            assert_ne!(worker_id_for_pod(name).0, sip24.finish() & WORKER_ID_MASK);
        }
    }

    #[test]
    fn fits_in_53_bits() {
        for i in 0..1000 {
            assert!(worker_id_for_pod(&format!("pod-{i}")).0 <= WORKER_ID_MASK);
        }
    }
}
