#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Tokenization: the embedded tokenizer and template, and the exactness of the multi-turn cache.

use kvgate_tokenize::template::ChatTemplate;
use kvgate_tokenize::{PromptTokenizer, Tiktoken, Tokenizer};
use kvgate_wire::openai::{Endpoint, OpenAiRequest};
use proptest::prelude::*;
use serde_json::json;
use std::sync::{Arc, OnceLock};

fn embedded() -> &'static PromptTokenizer {
    static P: OnceLock<PromptTokenizer> = OnceLock::new();
    P.get_or_init(|| PromptTokenizer::embedded().unwrap())
}

fn chat(messages: serde_json::Value) -> OpenAiRequest {
    OpenAiRequest::parse(
        Endpoint::Chat,
        json!({"model": "m", "messages": messages})
            .to_string()
            .as_bytes(),
    )
    .unwrap()
}

#[test]
fn chatml_renders_as_documented() {
    let r = chat(
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]),
    );
    assert_eq!(
        embedded().render(&r).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let mut with_tools = r.clone();
    with_tools.tools = Some(json!([{"type": "function", "function": {"name": "f"}}]));
    let text = embedded().render(&with_tools).unwrap();
    // Python json.dumps style, client key order kept, no HTML escaping
    assert!(
        text.starts_with("<|im_start|>system\n# Tools\n[{\"type\": \"function\", \"function\": {\"name\": \"f\"}}]<|im_end|>\n"),
        "{text}"
    );
    let mut odd = r.clone();
    odd.tools = Some(json!([{"description": "a < b & c's"}]));
    assert!(
        embedded()
            .render(&odd)
            .unwrap()
            .contains("[{\"description\": \"a < b & c's\"}]")
    );
}

#[test]
fn tiktoken_round_trips_and_knows_its_specials() {
    let t = Tiktoken::o200k_base().unwrap();
    let ids = t.encode("hello world").unwrap();
    assert_eq!(t.decode(&ids), "hello world");
    assert_eq!(t.encode("<|endoftext|>").unwrap(), vec![199999]);
}

#[test]
fn completions_use_text_or_ids() {
    let p = embedded();
    let r =
        OpenAiRequest::parse(Endpoint::Completion, br#"{"model":"m","prompt":[5,6,7]}"#).unwrap();
    assert_eq!(p.tokenize(&r).unwrap(), vec![5, 6, 7]);
    let r = OpenAiRequest::parse(
        Endpoint::Completion,
        br#"{"model":"m","prompt":"hello world"}"#,
    )
    .unwrap();
    assert_eq!(
        p.tokenize(&r).unwrap(),
        p.tokenizer().encode("hello world").unwrap()
    );
}

#[test]
fn later_turns_reuse_earlier_segments() {
    let p = PromptTokenizer::new(
        Arc::new(Tiktoken::o200k_base().unwrap()),
        ChatTemplate::chatml(),
        1 << 20,
    );
    let long = "lorem ipsum dolor sit amet ".repeat(40);
    let mut msgs = vec![json!({"role": "system", "content": long})];
    for turn in 0..5 {
        msgs.push(json!({"role": "user", "content": format!("question {turn}: {long}")}));
        let r = chat(json!(msgs));
        let ids = p.tokenize(&r).unwrap();
        assert_eq!(ids, p.tokenizer().encode(&p.render(&r).unwrap()).unwrap());
        msgs.push(json!({"role": "assistant", "content": format!("answer {turn}: {long}")}));
    }
    // every turn after the first re-encoded only its new messages
    assert!(
        p.cache().hits() >= 10,
        "hits {} misses {}",
        p.cache().hits(),
        p.cache().misses()
    );
}

fn content() -> impl Strategy<Value = String> {
    // Adversarial content: markers, spaces and newlines around them, unicode, digits.
    proptest::collection::vec(
        prop_oneof![
            Just("<|im_start|>".to_string()),
            Just("<|im_end|>".to_string()),
            Just(" ".to_string()),
            Just("\n".to_string()),
            Just("\n\n ".to_string()),
            Just("  ".to_string()),
            "[a-zA-Z]{1,8}",
            "[0-9]{1,5}",
            "[\\p{L}\\p{N}\\p{P}\\p{S} ]{1,12}",
            Just("éàü 日本語 🚀".to_string()),
        ],
        0..24,
    )
    .prop_map(|parts| parts.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// The cached, segmented encoding equals encoding the whole rendered prompt, for any content,
    /// on a cold cache and on a warm one.
    #[test]
    fn cache_is_exact(contents in proptest::collection::vec(content(), 1..6), system in content()) {
        let p = PromptTokenizer::new(Arc::new(Tiktoken::o200k_base().unwrap()), ChatTemplate::chatml(), 1 << 16);
        let mut msgs = vec![json!({"role": "system", "content": system})];
        for (i, c) in contents.iter().enumerate() {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            msgs.push(json!({"role": role, "content": c}));
            let r = chat(json!(msgs));
            let full = p.tokenizer().encode(&p.render(&r).unwrap()).unwrap();
            prop_assert_eq!(p.tokenize(&r).unwrap(), full.clone());
            prop_assert_eq!(p.tokenize(&r).unwrap(), full);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// Parallel encoding cuts the text at o200k-safe points; the ids must equal one-piece
    /// encoding for any text (adversarial pieces: markers, contractions, unicode, digits).
    #[test]
    fn parallel_tiktoken_encoding_is_exact(
        parts in proptest::collection::vec(
            prop_oneof![
                content(),
                Just("'s 're don't".to_string()),
                Just(" a b c ".to_string()),
                Just("x  y\t z\r\nw".to_string()),
            ],
            1..12,
        ),
        pieces in 2usize..6,
    ) {
        let text = parts.concat();
        let t = kvgate_tokenize::Tiktoken::o200k_base().unwrap();
        let whole = kvgate_tokenize::Tokenizer::encode(&t, &text).unwrap();
        prop_assert_eq!(t.encode_parallel(&text, pieces), whole);
    }
}

#[test]
fn long_prompts_are_encoded_in_parallel_and_exactly() {
    let t = kvgate_tokenize::Tiktoken::o200k_base().unwrap();
    let text: String = (0..20_000)
        .map(|i| {
            [
                "alpha ",
                "beta, ",
                "gamma's ",
                "délta ",
                "42 ",
                "\n\n",
                "<|im_end|>\n",
            ][i % 7]
        })
        .collect();
    let single = tiktoken_rs::o200k_base_singleton().encode_with_special_tokens(&text);
    // Cuts are found in this text, so more than one piece really is used.
    assert!(kvgate_tokenize::o200k_cut_near(&text, text.len() / 2, 4096).is_some());
    assert_eq!(t.encode_parallel(&text, 4), single);
    assert_eq!(
        kvgate_tokenize::Tokenizer::encode(&t, &text).unwrap(),
        single
    );
}

#[test]
fn o200k_vocabulary_holds_the_regular_and_special_ids_only() {
    let tok = kvgate_tokenize::PromptTokenizer::embedded().unwrap();
    let v = tok.vocabulary();
    // 199,998 merge ranks (0..=199,997), `<|endoftext|>` 199,999, `<|endofprompt|>` 200,018.
    assert_eq!(v.len(), 200_000);
    for id in [0, 199_997, 199_999, 200_018] {
        assert!(v.contains(id), "{id}");
    }
    for id in [199_998, 200_000, 200_017, 200_019, u32::MAX] {
        assert!(!v.contains(id), "{id}");
    }
    assert_eq!(v.first_unknown(&[1, 2, 199_998, 7]), Some((2, 199_998)));
    assert!(tok.check_ids(&[1, 200_018], "prompt").is_ok());
    let e = tok
        .check_ids(&[1, 300_000], "nvext.token_data")
        .unwrap_err();
    assert_eq!(e.field().as_deref(), Some("nvext.token_data[1]"));
    assert!(e.to_string().contains("300000"), "{e}");
}
