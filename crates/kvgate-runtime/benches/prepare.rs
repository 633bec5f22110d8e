//! The EPP's per-request CPU work on a prompt, step by step: parse the body, tokenize (cold,
//! and warm for a multi-turn follow-up), hash, and rewrite the body with `nvext.token_data`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use kvgate_core::hashing::{BlockHashes, HashSeed};
use kvgate_tokenize::PromptTokenizer;
use kvgate_wire::openai::{Endpoint, OpenAiRequest};
use std::hint::black_box;

fn words(seed: u64, n: usize) -> String {
    const V: &[&str] = &[
        "cache", "router", "token", "prefix", "worker", "latency", "gateway", "block",
    ];
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            V[(x % V.len() as u64) as usize]
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn body(n_words: usize) -> Vec<u8> {
    serde_json::json!({"model": "qwen3", "max_tokens": 1,
        "messages": [{"role": "user", "content": words(7, n_words)}]})
    .to_string()
    .into_bytes()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("prepare");
    g.sample_size(20);
    for (name, n_words) in [("2k", 2_000usize), ("8k", 8_000), ("50k", 50_000)] {
        let raw = body(n_words);
        let parsed = OpenAiRequest::parse(Endpoint::Chat, &raw).unwrap();
        let warm = PromptTokenizer::embedded().unwrap();
        let tokens = warm.tokenize(&parsed).unwrap();
        eprintln!("{name}: {} bytes, {} tokens", raw.len(), tokens.len());
        g.bench_function(format!("parse/{name}"), |b| {
            b.iter(|| OpenAiRequest::parse(Endpoint::Chat, black_box(&raw)).unwrap())
        });
        g.bench_function(format!("render_template/{name}"), |b| {
            b.iter(|| warm.render(black_box(&parsed)).unwrap())
        });
        g.bench_function(format!("tokenize_cold/{name}"), |b| {
            b.iter_batched(
                || PromptTokenizer::embedded().unwrap(),
                |t| t.tokenize(black_box(&parsed)).unwrap(),
                BatchSize::SmallInput,
            )
        });
        g.bench_function(format!("tokenize_warm/{name}"), |b| {
            b.iter(|| warm.tokenize(black_box(&parsed)).unwrap())
        });
        g.bench_function(format!("hash/{name}"), |b| {
            b.iter(|| BlockHashes::from_tokens(black_box(&tokens), 16, HashSeed::new(None, None)))
        });
        g.bench_function(format!("body_with_token_data/{name}"), |b| {
            b.iter(|| parsed.body_with_token_data(black_box(&tokens)))
        });
        g.bench_function(format!("raw_body_with_token_data/{name}"), |b| {
            b.iter(|| parsed.raw_body_with_token_data(black_box(&raw), black_box(&tokens)))
        });
        g.bench_function(format!("tokenize_one_thread/{name}"), |b| {
            let text = warm.render(&parsed).unwrap();
            let bpe = tiktoken_rs::o200k_base_singleton();
            b.iter(|| bpe.encode_with_special_tokens(black_box(&text)))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
