//! The input grammar kvgate's fuzz targets share (the targets are in `tests/fuzz.rs`).
//!
//! Purely random bytes almost never get past a JSON parser's first byte, so the targets
//! generate documents instead: a flat list of [`Tok`]s that [`Doc::render`] turns into JSON,
//! mostly well formed, with the field names and values kvgate's parsers look for (OpenAI
//! bodies, Dynamo and vLLM KV events, replica-sync messages, workers files, Kubernetes
//! objects), deep nesting, huge strings, invalid UTF-8, bad escapes, and then a [`Mutation`]
//! (truncate, flip a byte, splice in raw bytes). [`Doc::msgpack`] gives the same value in
//! MessagePack for the event decoders. Random documents rarely match a schema, so the main
//! generator is [`Mutant`]: a seed from the target's corpus (`corpus/<target>/`, real
//! examples, kept in the repository) with structural edits (replace, remove, insert, wrap in
//! deep nesting, duplicate, graft a [`Doc`]) and then a byte [`Mutation`]. bolero drives it: on the stable toolchain each target is
//! a test that replays its corpus (`tests/__fuzz__/<target>/corpus`) and then runs random
//! inputs for `BOLERO_RANDOM_TEST_TIME_MS` (1 s by default) or `BOLERO_RANDOM_ITERATIONS`.

use bolero::TypeGenerator;
use std::fmt::Write as _;

/// Field names the parsers read (and a few they must ignore).
pub const KEYS: &[&str] = &[
    "model",
    "messages",
    "role",
    "content",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "stream",
    "stream_options",
    "include_usage",
    "nvext",
    "token_data",
    "type",
    "text",
    "image_url",
    "tools",
    "n",
    "temperature",
    "worker_id",
    "event",
    "event_id",
    "dp_rank",
    "data",
    "stored",
    "removed",
    "cleared",
    "blocks",
    "block_hash",
    "tokens_hash",
    "parent_hash",
    "block_hashes",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "storage_tier",
    "residency_domain",
    "topic",
    "publisher_id",
    "sequence",
    "published_at",
    "payload",
    "ts",
    "events",
    "data_parallel_rank",
    "from",
    "seq",
    "ops",
    "id",
    "prefill_tokens",
    "seqs",
    "locals",
    "output_tokens",
    "prefill_done",
    "bookings",
    "workers",
    "name",
    "url",
    "kv_events",
    "total_kv_blocks",
    "dp_size",
    "role",
    "tokenizer",
    "max_num_batched_tokens",
    "apiVersion",
    "kind",
    "metadata",
    "labels",
    "annotations",
    "namespace",
    "uid",
    "spec",
    "status",
    "podIP",
    "phase",
    "conditions",
    "containers",
    "ports",
    "containerPort",
    "services",
    "componentType",
    "extraPodSpec",
    "selector",
    "targetPorts",
    "endpoints",
    "addresses",
    "ready",
    "deletionTimestamp",
    "ownerReferences",
];

/// String values worth trying where the parsers branch on a value.
pub const VALUES: &[&str] = &[
    "qwen3",
    "user",
    "assistant",
    "system",
    "tool",
    "text",
    "image_url",
    "stored",
    "removed",
    "cleared",
    "kv-events",
    "Booked",
    "Freed",
    "PrefillDone",
    "Rebooked",
    "Output",
    "aggregated",
    "prefill",
    "decode",
    "Running",
    "Ready",
    "True",
    "tcp://127.0.0.1:5557",
    "http://10.0.0.1:8000",
    "10.0.0.1",
    "GPU",
    "CPU_PINNED",
    "DynamoGraphDeployment",
    "nvidia.com/v1alpha1",
    "-1",
    "18446744073709551615",
    "1e400",
    "",
];

/// One token of a document. The renderer keeps the nesting consistent (keys inside objects,
/// separators, closing brackets) so that most documents parse and reach the code behind the
/// parser.
#[derive(Clone, Debug, TypeGenerator)]
pub enum Tok {
    Object,
    Array,
    Close,
    Key(u8),
    Value(u8),
    /// A string of `c`, 64 × (`n` % 512) bytes long (long strings; the body limits are tested
    /// apart).
    Long(u8, u16),
    Int(i64),
    Small(u8),
    Float(f64),
    Bool(bool),
    Null,
    /// A string holding bytes that are not valid UTF-8 or escapes that are not valid JSON.
    Bad(u8),
    /// A bare byte sequence, written as is (breaks the syntax somewhere).
    Raw(Vec<u8>),
}

/// What happens to the rendered bytes.
#[derive(Clone, Debug, TypeGenerator)]
pub enum Mutation {
    None,
    /// Keep the first `n` % len bytes.
    Truncate(u16),
    /// XOR one byte.
    Flip(u16, u8),
    /// Insert bytes at a position.
    Insert(u16, Vec<u8>),
}

#[derive(Clone, Debug, TypeGenerator)]
pub struct Doc {
    pub toks: Vec<Tok>,
    /// Do not close what is still open at the end (an unterminated document).
    pub leave_open: bool,
    pub mutation: Mutation,
}

#[derive(Clone, Copy, PartialEq)]
enum Frame {
    /// In an object: whether a key is pending its value, and whether any member was written.
    Obj {
        want_value: bool,
        any: bool,
    },
    Arr {
        any: bool,
    },
}

const MAX_DEPTH: usize = 300;

impl Doc {
    /// The document as JSON text (bytes: it may hold invalid UTF-8).
    pub fn render(&self) -> Vec<u8> {
        let mut out: Vec<u8> = Vec::new();
        let mut stack: Vec<Frame> = Vec::new();
        let mut started = false;
        for t in &self.toks {
            if let Tok::Raw(b) = t {
                out.extend(b.iter().take(64));
                continue;
            }
            if let Tok::Close = t {
                match stack.pop() {
                    Some(Frame::Obj { want_value, .. }) => {
                        if want_value {
                            out.extend_from_slice(b"null");
                        }
                        out.push(b'}');
                    }
                    Some(Frame::Arr { .. }) => out.push(b']'),
                    None => {}
                }
                continue;
            }
            // A value (or a key) at the current position.
            match stack.last_mut() {
                None if started => continue, // one top-level value
                None => started = true,
                Some(Frame::Obj { want_value, any }) => {
                    if !*want_value {
                        // A key is due: use this token's key if it is one, a dictionary key
                        // otherwise.
                        if *any {
                            out.push(b',');
                        }
                        *any = true;
                        let k = match t {
                            Tok::Key(i) => KEYS[*i as usize % KEYS.len()],
                            Tok::Small(i) => KEYS[*i as usize % KEYS.len()],
                            _ => "model",
                        };
                        let _ = write!(Wr(&mut out), "\"{k}\":");
                        *want_value = true;
                        if matches!(t, Tok::Key(_)) {
                            continue;
                        }
                    }
                    *want_value = false;
                }
                Some(Frame::Arr { any }) => {
                    if *any {
                        out.push(b',');
                    }
                    *any = true;
                }
            }
            match t {
                Tok::Object if stack.len() < MAX_DEPTH => {
                    out.push(b'{');
                    stack.push(Frame::Obj {
                        want_value: false,
                        any: false,
                    });
                }
                Tok::Array if stack.len() < MAX_DEPTH => {
                    out.push(b'[');
                    stack.push(Frame::Arr { any: false });
                }
                Tok::Object | Tok::Array => out.extend_from_slice(b"null"),
                Tok::Key(i) | Tok::Value(i) => {
                    let v = if matches!(t, Tok::Key(_)) {
                        KEYS[*i as usize % KEYS.len()]
                    } else {
                        VALUES[*i as usize % VALUES.len()]
                    };
                    let _ = write!(Wr(&mut out), "\"{v}\"");
                }
                Tok::Long(c, n) => {
                    let c = b'a' + c % 26;
                    out.push(b'"');
                    out.extend(std::iter::repeat_n(c, (*n as usize % 512) * 64));
                    out.push(b'"');
                }
                Tok::Int(i) => {
                    let _ = write!(Wr(&mut out), "{i}");
                }
                Tok::Small(i) => {
                    let _ = write!(Wr(&mut out), "{i}");
                }
                Tok::Float(f) if f.is_finite() => {
                    let _ = write!(Wr(&mut out), "{f}");
                }
                Tok::Float(_) => out.extend_from_slice(b"1e999"),
                Tok::Bool(b) => {
                    let _ = write!(Wr(&mut out), "{b}");
                }
                Tok::Null => out.extend_from_slice(b"null"),
                Tok::Bad(k) => {
                    const BAD: &[&[u8]] = &[
                        b"\"\xff\xfe\"",
                        b"\"\xc3\"",
                        b"\"\\ud800\"",
                        b"\"\\udc00\\ud800\"",
                        b"\"\\u00\"",
                        b"\"\\x41\"",
                        b"\"a\x00b\"",
                        b"\"\\u0000\"",
                        b"\"\xe2\x80\xae\"",
                        b"\"<|im_start|>system\"",
                        b"\"<|endoftext|>\"",
                    ];
                    out.extend_from_slice(BAD[*k as usize % BAD.len()]);
                }
                Tok::Close | Tok::Raw(_) => {}
            }
        }
        if !self.leave_open {
            while let Some(f) = stack.pop() {
                match f {
                    Frame::Obj { want_value, .. } => {
                        if want_value {
                            out.extend_from_slice(b"null");
                        }
                        out.push(b'}');
                    }
                    Frame::Arr { .. } => out.push(b']'),
                }
            }
        }
        self.mutation.apply(&mut out);
        out
    }

    /// The document's value in MessagePack, when it renders to valid JSON.
    pub fn msgpack(&self) -> Option<Vec<u8>> {
        let v: serde_json::Value = serde_json::from_slice(&self.render()).ok()?;
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &to_msgpack(&v)).ok()?;
        Some(out)
    }
}

impl Mutation {
    pub fn apply(&self, out: &mut Vec<u8>) {
        match self {
            Mutation::None => {}
            Mutation::Truncate(n) if !out.is_empty() => {
                let n = *n as usize % out.len();
                out.truncate(n);
            }
            Mutation::Flip(at, x) if !out.is_empty() => {
                let i = *at as usize % out.len();
                out[i] ^= x | 1;
            }
            Mutation::Insert(at, bytes) => {
                let i = *at as usize % (out.len() + 1);
                let bytes: Vec<u8> = bytes.iter().take(32).copied().collect();
                out.splice(i..i, bytes);
            }
            _ => {}
        }
    }
}

/// JSON to MessagePack, integers as integers and byte-like arrays kept as arrays (the
/// decoders accept both; `bin` comes from [`bin_payload`]).
pub fn to_msgpack(v: &serde_json::Value) -> rmpv::Value {
    use rmpv::Value as M;
    use serde_json::Value as J;
    match v {
        J::Null => M::Nil,
        J::Bool(b) => M::Boolean(*b),
        J::Number(n) => n
            .as_u64()
            .map(M::from)
            .or_else(|| n.as_i64().map(M::from))
            .unwrap_or_else(|| M::F64(n.as_f64().unwrap_or(0.0))),
        J::String(s) => M::from(s.as_str()),
        J::Array(a) => M::Array(a.iter().map(to_msgpack).collect()),
        J::Object(o) => M::Map(
            o.iter()
                .map(|(k, v)| (M::from(k.as_str()), to_msgpack(v)))
                .collect(),
        ),
    }
}

/// A Dynamo event-plane envelope in MessagePack around `payload` (as a `bin`).
pub fn bin_payload(payload: &[u8], sequence: u64) -> Vec<u8> {
    use rmpv::Value as M;
    let env = M::Map(vec![
        (M::from("topic"), M::from("kv-events")),
        (M::from("publisher_id"), M::from(7u64)),
        (M::from("sequence"), M::from(sequence)),
        (M::from("published_at"), M::from(1_700_000_000_000u64)),
        (M::from("payload"), M::Binary(payload.to_vec())),
    ]);
    let mut out = Vec::new();
    let _ = rmpv::encode::write_value(&mut out, &env);
    out
}

/// The seeds of `corpus/<target>/` (JSON, or YAML for `.yaml` files), as values.
pub fn seeds(target: &str) -> Vec<serde_json::Value> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    let out: Vec<serde_json::Value> = files
        .iter()
        .filter_map(|p| {
            let text = std::fs::read_to_string(p).ok()?;
            if p.extension().is_some_and(|e| e == "yaml") {
                serde_yaml_ng::from_str(&text).ok()
            } else {
                serde_json::from_str(&text).ok()
            }
        })
        .collect();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    out
}

/// A scalar or small value an edit puts into a document.
#[derive(Clone, Debug, TypeGenerator)]
pub enum Leaf {
    Int(i64),
    Small(u8),
    Neg(u8),
    Float(f64),
    Bool(bool),
    Null,
    Value(u8),
    Key(u8),
    Long(u8, u16),
    Ints(Vec<u32>),
    EmptyArray,
    EmptyObject,
}

impl Leaf {
    fn value(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            Leaf::Int(i) => J::from(*i),
            Leaf::Small(i) => J::from(*i),
            Leaf::Neg(i) => J::from(-i64::from(*i)),
            Leaf::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
            Leaf::Bool(b) => J::Bool(*b),
            Leaf::Null => J::Null,
            Leaf::Value(i) => J::from(VALUES[*i as usize % VALUES.len()]),
            Leaf::Key(i) => J::from(KEYS[*i as usize % KEYS.len()]),
            Leaf::Long(c, n) => J::from(
                std::iter::repeat_n((b'a' + c % 26) as char, (*n as usize % 512) * 64)
                    .collect::<String>(),
            ),
            Leaf::Ints(v) => J::from(v.iter().take(256).copied().collect::<Vec<u32>>()),
            Leaf::EmptyArray => J::Array(Vec::new()),
            Leaf::EmptyObject => J::Object(Default::default()),
        }
    }
}

/// One structural edit at the node numbered `at` (pre-order, modulo the node count).
#[derive(Clone, Debug, TypeGenerator)]
pub enum Edit {
    Set(u16, Leaf),
    Remove(u16),
    /// Add a member (a dictionary key) to an object, or an element to an array.
    Insert(u16, u8, Leaf),
    /// Wrap the node in `n` % 200 arrays (deep nesting).
    Wrap(u16, u8),
    /// Repeat an array's elements (`n` % 64 times).
    Repeat(u16, u8),
    Graft(u16, Doc),
}

/// A corpus seed, edited, rendered in one of the target's forms, byte-mutated.
#[derive(Clone, Debug, TypeGenerator)]
pub struct Mutant {
    pub seed: u8,
    /// How many of `edits` apply: `n` % 4 (a quarter of the inputs are seeds as they are,
    /// so that deep paths stay reached).
    pub n: u8,
    pub edits: Vec<Edit>,
    /// 0: compact JSON, 1: pretty JSON, 2: YAML (for the targets that read YAML).
    pub form: u8,
    pub bytes: Mutation,
    /// The byte mutation applies when this is 0 modulo 4.
    pub damage: u8,
}

impl Mutant {
    /// The edited value.
    pub fn value(&self, seeds: &[serde_json::Value]) -> serde_json::Value {
        let mut v = seeds[self.seed as usize % seeds.len()].clone();
        for e in self.edits.iter().take(self.n as usize % 4) {
            edit(&mut v, e);
        }
        v
    }

    /// The edited value as bytes; `yaml`: whether form 2 is YAML for this target.
    pub fn render(&self, seeds: &[serde_json::Value], yaml: bool) -> Vec<u8> {
        let v = self.value(seeds);
        let mut out = match self.form % 3 {
            1 => serde_json::to_vec_pretty(&v).unwrap_or_default(),
            2 if yaml => serde_yaml_ng::to_string(&v)
                .unwrap_or_default()
                .into_bytes(),
            _ => serde_json::to_vec(&v).unwrap_or_default(),
        };
        if self.damage.is_multiple_of(4) {
            self.bytes.apply(&mut out);
        }
        out
    }
}

fn count(v: &serde_json::Value) -> usize {
    1 + match v {
        serde_json::Value::Array(a) => a.iter().map(count).sum(),
        serde_json::Value::Object(o) => o.values().map(count).sum(),
        _ => 0,
    }
}

fn edit(root: &mut serde_json::Value, e: &Edit) {
    use serde_json::Value as J;
    let at = match e {
        Edit::Set(a, _)
        | Edit::Remove(a)
        | Edit::Insert(a, _, _)
        | Edit::Wrap(a, _)
        | Edit::Repeat(a, _)
        | Edit::Graft(a, _) => *a as usize % count(root),
    };
    if let Edit::Remove(_) = e {
        remove(root, &mut at.clone());
        return;
    }
    let Some(target) = walk(root, at) else {
        return;
    };
    match e {
        Edit::Set(_, l) => *target = l.value(),
        Edit::Insert(_, k, l) => match target {
            J::Object(o) => {
                o.insert(KEYS[*k as usize % KEYS.len()].to_string(), l.value());
            }
            J::Array(a) => a.insert(*k as usize % (a.len() + 1), l.value()),
            _ => *target = l.value(),
        },
        Edit::Wrap(_, n) => {
            let mut w = std::mem::take(target);
            for _ in 0..(*n as usize % 200) {
                w = J::Array(vec![w]);
            }
            *target = w;
        }
        Edit::Repeat(_, n) => {
            if let J::Array(a) = target
                && !a.is_empty()
            {
                let copy = a.clone();
                for _ in 0..(*n as usize % 64) {
                    a.extend(copy.iter().cloned());
                    if a.len() > 4096 {
                        break;
                    }
                }
            }
        }
        Edit::Graft(_, d) => {
            if let Ok(v) = serde_json::from_slice::<J>(&d.render()) {
                *target = v;
            }
        }
        Edit::Remove(_) => {}
    }
}

/// The node numbered `i` in pre-order, mutably.
fn walk(v: &mut serde_json::Value, i: usize) -> Option<&mut serde_json::Value> {
    fn go<'a>(v: &'a mut serde_json::Value, i: &mut usize) -> Option<&'a mut serde_json::Value> {
        if *i == 0 {
            return Some(v);
        }
        *i -= 1;
        match v {
            serde_json::Value::Array(a) => {
                for c in a.iter_mut() {
                    let n = count(c);
                    if *i < n {
                        return go(c, i);
                    }
                    *i -= n;
                }
                None
            }
            serde_json::Value::Object(o) => {
                for c in o.values_mut() {
                    let n = count(c);
                    if *i < n {
                        return go(c, i);
                    }
                    *i -= n;
                }
                None
            }
            _ => None,
        }
    }
    let mut i = i;
    go(v, &mut i)
}

/// Removes the node numbered `i` (pre-order) from its parent; the root becomes null.
fn remove(v: &mut serde_json::Value, i: &mut usize) -> bool {
    if *i == 0 {
        *v = serde_json::Value::Null;
        return true;
    }
    *i -= 1;
    match v {
        serde_json::Value::Array(a) => {
            for k in 0..a.len() {
                let n = count(&a[k]);
                if *i == 0 {
                    a.remove(k);
                    return true;
                }
                if *i < n {
                    return remove(&mut a[k], i);
                }
                *i -= n;
            }
            false
        }
        serde_json::Value::Object(o) => {
            let keys: Vec<String> = o.keys().cloned().collect();
            for k in keys {
                let n = o.get(&k).map_or(0, count);
                if *i == 0 {
                    o.remove(&k);
                    return true;
                }
                if *i < n {
                    return o.get_mut(&k).is_some_and(|c| remove(c, i));
                }
                *i -= n;
            }
            false
        }
        _ => false,
    }
}

struct Wr<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Wr<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Counts a target's inputs and reports them, with the process's peak memory, at the end.
pub struct Tally {
    target: &'static str,
    inputs: std::sync::atomic::AtomicU64,
    accepted: std::sync::atomic::AtomicU64,
}

impl Tally {
    pub const fn new(target: &'static str) -> Self {
        Self {
            target,
            inputs: std::sync::atomic::AtomicU64::new(0),
            accepted: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The input got through the parser into the code behind it (how deep the grammar
    /// reaches; reported beside the count).
    pub fn accept(&self) {
        self.accepted
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn count(&self) {
        self.inputs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn inputs(&self) -> u64 {
        self.inputs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Prints `fuzz <target>: <n> inputs (<k> accepted by the parser), 0 panics, peak RSS <m> MiB` (a panic would have
    /// failed the test before this line). Peak RSS is the whole test process's.
    pub fn report(&self) {
        let peak_kib = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .unwrap_or(0);
        println!(
            "fuzz {}: {} inputs ({} accepted by the parser), 0 panics, peak RSS {} MiB",
            self.target,
            self.inputs(),
            self.accepted.load(std::sync::atomic::Ordering::Relaxed),
            peak_kib / 1024
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(toks: Vec<Tok>) -> Doc {
        Doc {
            toks,
            leave_open: false,
            mutation: Mutation::None,
        }
    }

    #[test]
    fn renders_well_formed_json_from_any_token_order() {
        let d = doc(vec![
            Tok::Object,
            Tok::Key(0),
            Tok::Value(0),
            Tok::Key(1),
            Tok::Array,
            Tok::Object,
            Tok::Key(2),
            Tok::Value(1),
            Tok::Close,
            Tok::Small(3),
            Tok::Close,
            Tok::Key(5),
            Tok::Int(-5),
        ]);
        let v: serde_json::Value = serde_json::from_slice(&d.render()).unwrap();
        assert_eq!(v["max_tokens"], -5);
        assert_eq!(v["model"], "qwen3");
        assert_eq!(v["messages"][0]["role"], "user");
        assert_eq!(v["messages"][1], 3);
        assert!(d.msgpack().is_some());
    }

    #[test]
    fn nesting_is_bounded_and_mutations_apply() {
        let d = doc(vec![Tok::Array; 10_000]);
        let r = d.render();
        assert_eq!(r.iter().filter(|b| **b == b'[').count(), MAX_DEPTH);
        let mut t = Doc {
            mutation: Mutation::Truncate(3),
            ..doc(vec![Tok::Value(0)])
        };
        assert_eq!(t.render(), b"\"qw");
        t.mutation = Mutation::Insert(0, vec![0xff]);
        assert_eq!(t.render()[0], 0xff);
    }
}
