#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The official `openai` Python client (installed into .tools/venv by scripts/setup.sh) talks
//! to the frontend: chat and completions, streaming and not, usage with cached tokens.

mod common;

use common::*;
use std::path::PathBuf;
use std::process::Command;

const SCRIPT: &str = r#"
import sys, openai
c = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused")
r = c.chat.completions.create(model="qwen3", messages=[{"role": "user", "content": "hello " * 100}], max_tokens=3)
assert r.choices[0].finish_reason == "length", r
assert r.usage.completion_tokens == 3, r.usage
r2 = c.chat.completions.create(model="qwen3", messages=[{"role": "user", "content": "hello " * 100}], max_tokens=3)
assert r2.usage.prompt_tokens_details.cached_tokens > 0, r2.usage
chunks = list(c.chat.completions.create(model="qwen3", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                        stream=True, stream_options={"include_usage": True}))
text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
assert chunks[-1].usage.completion_tokens == 4, chunks[-1]
assert len(text) > 0
cmpl = c.completions.create(model="qwen3", prompt="once upon a time", max_tokens=2)
assert cmpl.usage.completion_tokens == 2
try:
    c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    raise SystemExit("expected NotFoundError")
except openai.NotFoundError as e:
    assert "nope" in str(e)
print("openai client ok", r2.usage.prompt_tokens_details.cached_tokens)
"#;

#[test]
fn the_official_openai_client_works() {
    let py = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.tools/venv/bin/python");
    assert!(
        py.exists(),
        "{} is missing: run `bash scripts/setup.sh` first",
        py.display()
    );
    let a = mocker(1001, 50.0, &[]);
    let dir = TempDir::new("openai");
    let wf = workers_file(&dir, &[(&a, 1001)], None);
    let fe = frontend(&wf, "kv", &[]);
    let out = Command::new(py)
        .arg("-c")
        .arg(SCRIPT)
        .arg(fe.url())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "openai client failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("openai client ok"), "{stdout}");
}
