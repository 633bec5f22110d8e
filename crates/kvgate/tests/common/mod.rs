//! Starts real `kvgate` processes on loopback for end-to-end tests; kills them on drop.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub struct Proc {
    child: Child,
    /// Lines printed on stdout (addresses).
    pub lines: Vec<String>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// Starts `kvgate ARGS` and waits until it printed `n_lines` lines (its bound addresses).
    pub fn start(args: &[&str], n_lines: usize) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kvgate"))
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start kvgate");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut lines = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while lines.len() < n_lines {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) => lines.push(l),
                Err(_) => panic!("kvgate {args:?} did not start (printed {lines:?})"),
            }
        }
        Proc { child, lines }
    }

    /// The first `http://...` address printed.
    pub fn url(&self) -> String {
        self.lines
            .iter()
            .find_map(|l| l.split_whitespace().find(|w| w.starts_with("http://")))
            .unwrap()
            .to_string()
    }

    /// The first `tcp://...` address printed.
    pub fn zmq(&self) -> String {
        self.lines
            .iter()
            .find_map(|l| l.split_whitespace().find(|w| w.starts_with("tcp://")))
            .unwrap()
            .to_string()
    }
}

/// A mocker with block size 16, `speedup` times faster than real time, KV events on ZMQ.
pub fn mocker(worker_id: u64, speedup: f64, extra: &[&str]) -> Proc {
    let id = worker_id.to_string();
    let sp = speedup.to_string();
    let mut args = vec![
        "mocker",
        "--port",
        "0",
        "--block-size",
        "16",
        "--num-gpu-blocks",
        "4096",
        "--worker-id",
        &id,
        "--speedup-ratio",
        &sp,
        "--zmq-kv-events",
        "tcp://127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let dp: usize = extra
        .iter()
        .position(|a| *a == "--dp-size")
        .and_then(|i| extra.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    Proc::start(&args, 1 + dp)
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "kvgate-{tag}-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos() ^ (rand_u64() as u128)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_u64() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// A workers file for these mockers (ids 1001, 1002, ...).
pub fn workers_file(
    dir: &TempDir,
    mockers: &[(&Proc, u64)],
    extra_worker: Option<(&str, u64, &str)>,
) -> PathBuf {
    let mut y = String::from("model: qwen3\nblock_size: 16\nworkers:\n");
    for (i, (m, id)) in mockers.iter().enumerate() {
        // one "publishing KV events on tcp://..." line per dp rank
        let dp = m
            .lines
            .iter()
            .filter(|l| l.contains("tcp://"))
            .count()
            .max(1);
        y.push_str(&format!(
            "  - name: worker-{i}\n    id: {id}\n    url: {}\n    dp_size: {dp}\n    total_kv_blocks: 4096\n    max_num_batched_tokens: 8192\n    kv_events: {}\n",
            m.url(),
            m.zmq()
        ));
    }
    if let Some((name, id, url)) = extra_worker {
        y.push_str(&format!("  - name: {name}\n    id: {id}\n    url: {url}\n"));
    }
    let path = dir.0.join("workers.yaml");
    std::fs::write(&path, y).unwrap();
    path
}

pub fn frontend(workers: &std::path::Path, mode: &str, extra: &[&str]) -> Proc {
    let w = workers.to_str().unwrap();
    let mut args = vec![
        "frontend",
        "--port",
        "0",
        "--workers",
        w,
        "--router-mode",
        mode,
    ];
    args.extend_from_slice(extra);
    Proc::start(&args, 1)
}

/// A long, distinct prompt text (about `words` words) for prefix `tag`.
pub fn text(tag: &str, words: usize) -> String {
    (0..words)
        .map(|i| format!("{tag}{} ", i * 7919 % 1000))
        .collect()
}

pub fn chat_body(content: &str, max_tokens: u32, stream: bool) -> serde_json::Value {
    serde_json::json!({
        "model": "qwen3",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "stream": stream,
        "stream_options": {"include_usage": true},
    })
}

/// A Prometheus sample value (first line starting with `name`).
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
