//! Fixed test vectors. The expected values were computed with Dynamo's own router code
//! (`dynamo_kv_router::protocols::compute_block_hash_for_seq` / `compute_seq_hash_for_block`,
//! crate version 1.6.1) and `DefaultHasher` for pod names; `kvgate-peers` re-checks the
//! hashing against that crate on random inputs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use kvgate_core::hashing::{BlockHashes, HashSeed};
use kvgate_core::worker_id::worker_id_for_pod;

struct Vector {
    tokens: Vec<u32>,
    block_size: usize,
    lora: Option<&'static str>,
    salt: Option<&'static str>,
    local: &'static [u64],
    seq: &'static [u64],
}

fn vectors() -> Vec<Vector> {
    vec![
        Vector {
            tokens: (1..=8).collect(),
            block_size: 4,
            lora: None,
            salt: None,
            local: &[14643705804678351452, 16777012769546811212],
            seq: &[14643705804678351452, 4945711292740353085],
        },
        Vector {
            // 10 tokens: the trailing partial block is not hashed
            tokens: (1..=10).collect(),
            block_size: 4,
            lora: Some("my-lora"),
            salt: None,
            local: &[15671544057904749233, 7919241211032067838],
            seq: &[15671544057904749233, 15486599009994050725],
        },
        Vector {
            tokens: (1..=8).collect(),
            block_size: 4,
            lora: None,
            salt: Some("tenant-a"),
            local: &[5738685477468498325, 11202231085456067787],
            seq: &[5738685477468498325, 1076233986426276607],
        },
        Vector {
            tokens: (1..=8).collect(),
            block_size: 4,
            lora: Some("my-lora"),
            salt: Some("tenant-a"),
            local: &[6157910915076630503, 3256431856703716508],
            seq: &[6157910915076630503, 9770935122131878621],
        },
        Vector {
            tokens: (0..64).collect(),
            block_size: 16,
            lora: None,
            salt: None,
            local: &[
                15310707395893867146,
                15292316782987903195,
                5532946206955930018,
                14928757266181269122,
            ],
            seq: &[
                15310707395893867146,
                13769157705258532664,
                11879827756109914528,
                3888788807566526800,
            ],
        },
    ]
}

#[test]
fn block_hashes_match_dynamo_vectors() {
    for v in vectors() {
        let h = BlockHashes::from_tokens(&v.tokens, v.block_size, HashSeed::new(v.lora, v.salt));
        let local: Vec<u64> = h.locals().iter().map(|x| x.0).collect();
        let seq: Vec<u64> = h.seqs().iter().map(|x| x.0).collect();
        assert_eq!(local, v.local, "local, lora={:?} salt={:?}", v.lora, v.salt);
        assert_eq!(seq, v.seq, "sequence, lora={:?} salt={:?}", v.lora, v.salt);
    }
}

#[test]
fn worker_ids_match_dynamo_vectors() {
    assert_eq!(worker_id_for_pod("vllm-worker-0").0, 3637812819037538);
    assert_eq!(
        worker_id_for_pod("qwen3-decode-7d9f8b-abcde").0,
        3477661505063355
    );
}
