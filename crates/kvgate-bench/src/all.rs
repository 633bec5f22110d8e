//! `kvgate bench all`: runs every benchmark one after the other (each in its own process, as a
//! user would) and writes one markdown report, with the replay plot, to `bench/results/`.
//!
//! The indexer comparison lives in the test-only `kvgate-peers` crate (the peers are never
//! linked into this binary); it is run through `cargo bench` when the source tree and cargo are
//! at hand, and reported as skipped otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const DEFAULT_OUT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../bench/results");
const WORKSPACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

#[derive(clap::Args, Debug, Clone)]
pub struct BenchAllArgs {
    /// Where the report (`report.md`) and the replay plot go.
    #[arg(long, default_value = DEFAULT_OUT)]
    pub out: PathBuf,
    /// Smaller runs of everything (minutes instead of tens of minutes); the report says so.
    #[arg(long)]
    pub quick: bool,
    /// Benchmarks to leave out (epp, fleet, disagg, events, replay, indexer).
    #[arg(long, value_delimiter = ',')]
    pub skip: Vec<String>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct BenchIndexerArgs {
    /// The first 3,000 trace requests instead of all 12,031.
    #[arg(long)]
    pub quick: bool,
    /// One JSON object: `{"indexers": {"<name>": {"mixed_ops_per_s", "query_p99_us", "bytes_per_block", ...}}}`.
    #[arg(long)]
    pub json: bool,
    /// Measure one indexer only (kvgate, kvgate-sharded-1t, kvgate-sharded-2t,
    /// dynamo-radix-tree, dynamo-crtc-thread-pool, kv-index-chain) and skip the agreement pass.
    #[arg(long, value_name = "KEY")]
    pub only: Option<String>,
}

/// The `cargo bench` arguments of the indexer comparison.
fn indexer_args(quick: bool, json: bool, only: Option<&str>) -> Vec<String> {
    let mut args: Vec<String> = ["bench", "-p", "kvgate-peers", "--bench", "indexer", "--"]
        .into_iter()
        .map(String::from)
        .collect();
    if quick {
        args.push("--quick".into());
    }
    if json {
        args.push("--json".into());
    }
    if let Some(o) = only {
        args.extend(["--only".to_string(), o.to_string()]);
    }
    args
}

fn have_tree() -> bool {
    Path::new(WORKSPACE).join("crates/kvgate-peers").exists()
}

/// `kvgate bench indexer`: runs the comparison with the terminal attached.
pub fn run_indexer(a: BenchIndexerArgs) -> Result<(), String> {
    if !have_tree() {
        return Err(format!(
            "the indexer comparison needs kvgate's source tree (crates/kvgate-peers under {WORKSPACE}) and cargo: the peer indexers are benchmark-only dependencies, never built into this binary"
        ));
    }
    let args = indexer_args(a.quick, a.json, a.only.as_deref());
    let status = Command::new("cargo")
        .args(&args)
        .current_dir(WORKSPACE)
        .status()
        .map_err(|e| format!("cannot start cargo: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("cargo {} failed: {status}", args.join(" ")))
    }
}

struct Section {
    title: &'static str,
    command: String,
    outcome: Result<String, String>,
    seconds: f64,
}

fn run(program: &Path, args: &[String], dir: Option<&str>) -> Result<String, String> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(8).collect();
        Err(format!(
            "exit {:?}: {}",
            out.status.code(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ))
    }
}

pub fn run_all(a: BenchAllArgs) -> Result<(), String> {
    const KNOWN: [&str; 6] = ["epp", "fleet", "disagg", "events", "replay", "indexer"];
    for s in &a.skip {
        if !KNOWN.contains(&s.as_str()) {
            return Err(format!(
                "--skip {s:?}: not a benchmark (known: {})",
                KNOWN.join(", ")
            ));
        }
    }
    std::fs::create_dir_all(&a.out)
        .map_err(|e| format!("cannot create {}: {e}", a.out.display()))?;
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    // Resolve `..` so that the commands in the report read as a user would type them.
    let out = std::fs::canonicalize(&a.out).unwrap_or_else(|_| a.out.clone());
    let plot = out.join("replay.svg");
    let q = a.quick;
    let mut plan: Vec<(&'static str, &'static str, Vec<String>)> = vec![
        (
            "epp",
            "EPP overhead behind a real Envoy",
            if q {
                vec![
                    "bench",
                    "epp",
                    "--requests",
                    "10",
                    "--conversations",
                    "3",
                    "--concurrency",
                    "16,64",
                    "--load-sizes",
                    "8000",
                ]
            } else {
                vec!["bench", "epp"]
            }
            .into_iter()
            .map(String::from)
            .collect(),
        ),
        (
            "disagg",
            "Aggregated vs disaggregated serving",
            if q {
                vec!["bench", "disagg", "--conversations", "10"]
            } else {
                vec!["bench", "disagg"]
            }
            .into_iter()
            .map(String::from)
            .collect(),
        ),
        (
            "fleet",
            "The router at 1,000 and 10,000 worker ranks",
            if q {
                vec![
                    "bench",
                    "fleet",
                    "--ranks",
                    "1000,10000",
                    "--prompt-tokens",
                    "2048",
                    "--requests",
                    "1000",
                ]
            } else {
                vec!["bench", "fleet"]
            }
            .into_iter()
            .map(String::from)
            .collect(),
        ),
        (
            "events",
            "KV events applied per second",
            if q {
                vec!["bench", "events", "--events", "20000"]
            } else {
                vec!["bench", "events"]
            }
            .into_iter()
            .map(String::from)
            .collect(),
        ),
    ];
    let mut replay: Vec<String> = ["bench", "replay", "--plot"]
        .into_iter()
        .map(String::from)
        .collect();
    replay.push(plot.display().to_string());
    if q {
        replay.extend(
            ["--requests", "2000", "--tokens-per-trace-block", "128"]
                .into_iter()
                .map(String::from),
        );
    }
    plan.push((
        "replay",
        "Routing quality (virtual-time trace replay)",
        replay,
    ));
    let mut sections = Vec::new();
    for (key, title, args) in plan {
        if a.skip.iter().any(|s| s == key) {
            continue;
        }
        eprintln!("== kvgate {}", args.join(" "));
        let t = Instant::now();
        let outcome = run(&me, &args, None);
        let workspace = std::fs::canonicalize(WORKSPACE).unwrap_or_else(|_| WORKSPACE.into());
        let prefix = format!("{}/", workspace.display());
        sections.push(Section {
            title,
            command: format!("kvgate {}", args.join(" ").replace(&prefix, "")),
            outcome,
            seconds: t.elapsed().as_secs_f64(),
        });
    }
    if !a.skip.iter().any(|s| s == "indexer") {
        let args = indexer_args(q, false, None);
        eprintln!("== cargo {}", args.join(" "));
        let t = Instant::now();
        let outcome = if have_tree() {
            run(Path::new("cargo"), &args, Some(WORKSPACE))
        } else {
            Err("skipped: the kvgate source tree (crates/kvgate-peers) is not here".into())
        };
        sections.push(Section {
            title: "Prefix indexers side by side",
            command: format!("cargo {}", args.join(" ")),
            outcome,
            seconds: t.elapsed().as_secs_f64(),
        });
    }
    let mut md = String::from("# kvgate benchmark report\n\n");
    md.push_str(&format!(
        "Written by `kvgate bench all{}` on {} ({} CPUs){}. Each section is one run; the machine may be shared, so\ncompare figures within a section, not across reports.\n\n",
        if q { " --quick" } else { "" },
        std::env::consts::ARCH,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if q { ", **quick mode: reduced sizes**" } else { "" }
    ));
    let mut failed = 0;
    for s in &sections {
        md.push_str(&format!(
            "## {}\n\n`{}` ({:.0} s)\n\n",
            s.title, s.command, s.seconds
        ));
        match &s.outcome {
            Ok(text) => {
                md.push_str(text.trim());
                md.push_str("\n\n");
                if s.title.starts_with("Routing") && plot.exists() {
                    md.push_str("![TTFT CDFs and hit rates](replay.svg)\n\n");
                }
            }
            Err(e) => {
                failed += 1;
                md.push_str(&format!("**Did not run**: {}\n\n", e.trim()));
            }
        }
    }
    let path = out.join("report.md");
    std::fs::write(&path, md).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    println!("report: {}", path.display());
    if failed > 0 {
        return Err(format!(
            "{failed} of {} benchmarks did not run (see the report)",
            sections.len()
        ));
    }
    Ok(())
}
