//! kvgate's block hashes against Dynamo's own router code (`dynamo-kv-router` 1.6.1), on random
//! token sequences, block sizes, LoRA names and salts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use dynamo_kv_router::protocols::{
    BlockHashOptions, LocalBlockHash, compute_block_hash_for_seq, compute_seq_hash_for_block,
};
use kvgate_core::hashing::{BlockHashes, HashSeed};
use proptest::prelude::*;

fn dynamo(tokens: &[u32], bs: u32, lora: Option<&str>, salt: Option<&str>) -> (Vec<u64>, Vec<u64>) {
    let locals = compute_block_hash_for_seq(
        tokens,
        bs,
        BlockHashOptions {
            lora_name: lora,
            cache_namespace: salt,
            ..Default::default()
        },
    );
    let seqs = compute_seq_hash_for_block(&locals);
    (
        locals.iter().map(|l: &LocalBlockHash| l.0).collect(),
        seqs.to_vec(),
    )
}

fn kvgate(tokens: &[u32], bs: u32, lora: Option<&str>, salt: Option<&str>) -> (Vec<u64>, Vec<u64>) {
    let h = BlockHashes::from_tokens(tokens, bs as usize, HashSeed::new(lora, salt));
    (
        h.locals().iter().map(|l| l.0).collect(),
        h.seqs().iter().map(|s| s.0).collect(),
    )
}

fn name() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        Just(Some(String::new())),
        "[a-z0-9-]{1,12}".prop_map(Some)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn same_hashes_as_dynamo(
        tokens in proptest::collection::vec(any::<u32>(), 0..400),
        bs in prop_oneof![Just(16u32), Just(32), Just(64), 1u32..100],
        lora in name(),
        salt in name(),
    ) {
        let (l, s) = (lora.as_deref(), salt.as_deref());
        prop_assert_eq!(kvgate(&tokens, bs, l, s), dynamo(&tokens, bs, l, s));
    }
}

#[test]
fn same_hashes_on_long_prompts() {
    let tokens: Vec<u32> = (0..50_000u32)
        .map(|i| i.wrapping_mul(2_654_435_761) % 151_936)
        .collect();
    for bs in [16, 64, 512] {
        assert_eq!(
            kvgate(&tokens, bs, None, None),
            dynamo(&tokens, bs, None, None)
        );
        assert_eq!(
            kvgate(&tokens, bs, Some("my-lora"), Some("tenant-a")),
            dynamo(&tokens, bs, Some("my-lora"), Some("tenant-a"))
        );
    }
}
