//! What the process-starting benchmarks share: children that die with the bench (and whose
//! start-up lines carry their addresses), free ports, Envoy from the shipped configs, a scratch
//! directory, and the statistics every report uses.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The GAIE gateway: ext_proc to the EPP over TLS, then to the chosen endpoint.
pub const GATEWAY_TLS: &str = include_str!("../../../deploy/envoy/gateway-tls.yaml");
/// The same gateway over plaintext h2c.
pub const GATEWAY_PLAIN: &str = include_str!("../../../deploy/envoy/gateway.yaml");
/// A plain Envoy that routes straight to one upstream: the baseline.
pub const DIRECT: &str = include_str!("../../../deploy/envoy/direct.yaml");
/// The h2c gateway that fails open to plain load balancing while no EPP answers.
pub const GATEWAY_FAIL_OPEN: &str = include_str!("../../../deploy/envoy/gateway-fail-open.yaml");

/// A scratch directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<Self, String> {
        let p = std::env::temp_dir().join(format!("kvgate-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(Self(p))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A nats-server with JetStream on a free loopback port, its store in a scratch directory that
/// outlives restarts and is removed on drop (with the server).
pub struct NatsServer {
    bin: PathBuf,
    port: u16,
    child: Option<Child>,
    store: TempDir,
}

impl NatsServer {
    /// Starts it and waits until it listens; `hint` ends the error when it cannot be run.
    pub fn start(bin: &Path, tag: &str, hint: &str) -> Result<Self, String> {
        let mut n = Self {
            bin: bin.to_path_buf(),
            port: free_port()?,
            child: None,
            store: TempDir::new(&format!("{tag}-js"))?,
        };
        n.restart().map_err(|e| format!("{e}; {hint}"))?;
        Ok(n)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, keeping the store.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// (Re)starts it on the same port and store, and waits until it listens.
    pub fn restart(&mut self) -> Result<(), String> {
        self.stop();
        let child = Command::new(&self.bin)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {} ({e})", self.bin.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() > deadline {
                return Err("nats-server did not start listening".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A child process, killed on drop, with the stdout lines it printed at start-up. Its stderr
/// goes to a file when a directory is given (so that panics can be found afterwards), else to
/// the bench's own stderr.
pub struct Proc {
    name: String,
    child: Child,
    lines: Vec<String>,
    stderr: Option<PathBuf>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// Starts `program` and waits for its first `n_lines` stdout lines.
    pub fn start(
        name: &str,
        program: &Path,
        args: &[&str],
        n_lines: usize,
        stderr_dir: Option<&Path>,
    ) -> Result<Proc, String> {
        let stderr = stderr_dir.map(|d| d.join(format!("{}.stderr", name.replace(' ', "-"))));
        let err_sink = match &stderr {
            Some(p) => Stdio::from(std::fs::File::create(p).map_err(|e| e.to_string())?),
            None => Stdio::inherit(),
        };
        let mut child = Command::new(program)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(if n_lines > 0 {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(err_sink)
            .spawn()
            .map_err(|e| format!("cannot start {name} ({}): {e}", program.display()))?;
        let mut lines = Vec::new();
        if n_lines > 0 {
            let stdout = child.stdout.take().ok_or("no stdout")?;
            let mut reader = BufReader::new(stdout);
            while lines.len() < n_lines {
                let mut l = String::new();
                if reader.read_line(&mut l).map_err(|e| e.to_string())? == 0 {
                    let err = stderr
                        .as_ref()
                        .and_then(|p| std::fs::read_to_string(p).ok())
                        .unwrap_or_default();
                    return Err(format!("{name} exited during start-up: {err}"));
                }
                lines.push(l.trim().to_string());
            }
            // Keep draining stdout so that the child never blocks on a full pipe.
            std::thread::spawn(move || for _ in reader.lines() {});
        }
        Ok(Proc {
            name: name.to_string(),
            child,
            lines,
            stderr,
        })
    }

    /// Starts a `kvgate` subcommand (this very binary) and waits for `n_lines` start-up lines.
    pub fn kvgate(
        args: &[&str],
        n_lines: usize,
        stderr_dir: Option<&Path>,
    ) -> Result<Proc, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let name = format!("kvgate {}", args.first().copied().unwrap_or(""));
        Proc::start(&name, &exe, args, n_lines, stderr_dir)
    }

    /// The stdout lines it printed at start-up.
    pub fn lines(&self) -> &[String] {
        &self.lines
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The first `scheme`-prefixed word of the start-up lines, e.g. `http://` → `127.0.0.1:80`.
    pub fn addr(&self, scheme: &str) -> Result<String, String> {
        self.lines
            .iter()
            .find_map(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(scheme).map(str::to_string))
            })
            .ok_or_else(|| format!("{}: no {scheme} address in {:?}", self.name, self.lines))
    }

    /// Why the process is unwell, if it is: a panic in its stderr file, or an exit.
    pub fn failed(&mut self) -> Option<String> {
        let err = self
            .stderr
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default();
        if let Some(l) = err.lines().find(|l| l.contains("panicked")) {
            return Some(format!("{}: {l}", self.name));
        }
        match self.child.try_wait() {
            Ok(Some(status)) => Some(format!("{} exited: {status}", self.name)),
            _ => None,
        }
    }
}

pub fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}

/// Writes `template` with its `${VAR}`s filled (plus `LISTEN_PORT` and `ADMIN_PORT`) into `dir`,
/// starts Envoy on it with `concurrency` worker threads and waits until it listens.
pub fn start_envoy(
    bin: &Path,
    template: &str,
    vars: &[(&str, String)],
    dir: &Path,
    name: &str,
    concurrency: usize,
) -> Result<(Proc, u16), String> {
    let (port, admin) = (free_port()?, free_port()?);
    let mut cfg = template.to_string();
    let mut all = vec![
        ("LISTEN_PORT", port.to_string()),
        ("ADMIN_PORT", admin.to_string()),
    ];
    all.extend(vars.iter().map(|(k, v)| (*k, v.clone())));
    for (k, v) in all {
        cfg = cfg.replace(&format!("${{{k}}}"), &v);
    }
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, cfg).map_err(|e| e.to_string())?;
    let base_id = (u32::from(port) * 7 + 3).to_string();
    let conc = concurrency.max(1).to_string();
    let cfg_path = path.to_string_lossy().to_string();
    let args = [
        "-c",
        &cfg_path,
        "--base-id",
        &base_id,
        "--disable-hot-restart",
        "-l",
        "error",
        "--concurrency",
        &conc,
    ];
    let p = Proc::start(&format!("envoy {name}"), bin, &args, 0, None)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok((p, port));
        }
        if Instant::now() > deadline {
            return Err(format!("envoy ({name}) did not start"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The arguments that start `kvgate epp` on loopback with every port chosen by the OS and
/// `workers` as its workers file; callers append their own.
pub fn epp_args(workers: &str) -> Vec<&str> {
    vec![
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
        workers,
    ]
}

/// The GAIE gateway (TLS or h2c to the picker) in front of the ext_proc picker at `picker`
/// (`host:port`), failing closed; returns Envoy and its listener port.
pub fn start_gateway(
    bin: &Path,
    tls: bool,
    picker: &str,
    dir: &Path,
    name: &str,
) -> Result<(Proc, u16), String> {
    let (host, port) = picker
        .rsplit_once(':')
        .ok_or_else(|| format!("bad picker address {picker:?}"))?;
    start_envoy(
        bin,
        if tls { GATEWAY_TLS } else { GATEWAY_PLAIN },
        &[
            ("EPP_HOST", host.to_string()),
            ("EPP_PORT", port.to_string()),
            ("FAILURE_MODE_ALLOW", "false".to_string()),
        ],
        dir,
        name,
        1,
    )
}

/// `deploy/envoy/gateway-fail-open.yaml` with its EPP cluster holding every picker in `pickers`
/// (`host:port`, h2c) and its fallback cluster the pool's `endpoints`: each pod's direct-mode
/// sidecar (`ip:port`, an `http://` prefix allowed; an IP, the cluster is `STATIC`) with its worker
/// instance id. `LISTEN_PORT` and `ADMIN_PORT` are left for [`start_envoy`].
pub fn fail_open_gateway_template(
    pickers: &[&str],
    endpoints: &[(&str, u64)],
) -> Result<String, String> {
    let split = |a: &str| -> Result<(String, u16), String> {
        let a = a.strip_prefix("http://").unwrap_or(a).trim_end_matches('/');
        let (h, p) = a
            .rsplit_once(':')
            .ok_or_else(|| format!("{a:?} is not host:port"))?;
        let p = p.parse().map_err(|_| format!("{a:?}: bad port"))?;
        Ok((h.to_string(), p))
    };
    if pickers.is_empty() || endpoints.is_empty() {
        return Err("the fail-open gateway needs at least one picker and one endpoint".into());
    }
    let epp_line = "        - endpoint: {address: {socket_address: {address: ${EPP_HOST}, port_value: ${EPP_PORT}}}}\n";
    if !GATEWAY_FAIL_OPEN.contains(epp_line) {
        return Err("gateway-fail-open.yaml: the EPP endpoint line was not found".into());
    }
    let mut epps = String::new();
    for p in pickers {
        let (h, p) = split(p)?;
        epps.push_str(&format!(
            "        - endpoint: {{address: {{socket_address: {{address: {h}, port_value: {p}}}}}}}\n"
        ));
    }
    let mut pool = Vec::new();
    for (url, id) in endpoints {
        let (h, p) = split(url)?;
        pool.push(format!(
            "{{endpoint: {{address: {{socket_address: {{address: {h}, port_value: {p}}}}}}}, metadata: {{filter_metadata: {{kvgate: {{worker_id: \"{id}\"}}}}}}}}"
        ));
    }
    Ok(GATEWAY_FAIL_OPEN
        .replace(epp_line, &epps)
        .replace("${FALLBACK_ENDPOINTS}", &format!("[{}]", pool.join(", "))))
}

/// Starts the fail-open gateway of [`fail_open_gateway_template`] with `concurrency` worker
/// threads; returns Envoy, its listener port and its admin port (`/stats` counts
/// `http.gateway.ext_proc.failure_mode_allowed` and `cluster.fallback.upstream_rq_total`).
pub fn start_fail_open_gateway(
    bin: &Path,
    pickers: &[&str],
    endpoints: &[(&str, u64)],
    dir: &Path,
    name: &str,
    concurrency: usize,
) -> Result<(Proc, u16, u16), String> {
    let template = fail_open_gateway_template(pickers, endpoints)?;
    let admin = free_port()?;
    let template = template.replace("${ADMIN_PORT}", &admin.to_string());
    let (p, port) = start_envoy(bin, &template, &[], dir, name, concurrency)?;
    Ok((p, port, admin))
}

/// The `q` quantile (nearest rank) of unsorted samples; NaN when there are none.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let i = ((s.len() - 1) as f64 * q).round() as usize;
    s[i]
}

/// User-mode + kernel CPU seconds of a process (Linux `/proc/<pid>/stat`, 100 ticks/s).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Resident memory of a process in MiB (NaN when unknown).
pub fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// The value of an unlabelled sample in Prometheus text (0 when absent).
pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.split(' ').next() == Some(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
