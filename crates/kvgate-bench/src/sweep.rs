//! `kvgate bench replay --sweep`: capacity, not latency at one load. Every policy replays the
//! trace at a grid of arrival-rate scales, from the 80%-busy scale (or `--scales`) upward, until
//! every policy other than the default has missed the TTFT p90 objective twice in a row and the
//! grid is 1.5x past the highest capacity found. A policy's capacity is the highest rate whose
//! TTFT p90 is within `--slo-ttft-p90-ms`, interpolated (log TTFT) between the last grid point
//! that meets it and the first that does not.

use crate::replay::{BenchReplayArgs, run_one};
use kvgate_sim::sim::{PolicyResult, SimConfig};
use kvgate_sim::trace::TraceRow;
use serde::Serialize;
use std::collections::BTreeMap;

/// One policy at one grid point.
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    pub ttft_p50_ms: f64,
    pub ttft_p90_ms: f64,
    pub hit_rate: f64,
    pub output_tok_s: f64,
    pub busy_fraction: f64,
}

impl From<&PolicyResult> for Point {
    fn from(r: &PolicyResult) -> Self {
        Self {
            ttft_p50_ms: r.ttft_p50_ms,
            ttft_p90_ms: r.ttft_p90_ms,
            hit_rate: r.hit_rate,
            output_tok_s: r.throughput_tok_s,
            busy_fraction: r.busy_fraction,
        }
    }
}

/// A policy's capacity at the objective.
#[derive(Clone, Debug, Serialize)]
pub struct Capacity {
    /// Interpolated rate scale (0 when even the first grid point misses the objective).
    pub rate_scale: f64,
    /// The highest grid point that meets the objective, if any.
    pub grid_rate_scale: Option<f64>,
    /// False when the last grid point run still meets the objective (capacity is at least this).
    pub bounded: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Sweep {
    pub slo_ttft_p90_ms: f64,
    pub default_policy: String,
    pub scales: Vec<f64>,
    /// Per policy, per grid point run (`None`: skipped, past the policy's knee).
    pub points: BTreeMap<String, Vec<Option<Point>>>,
    pub capacity: BTreeMap<String, Capacity>,
}

impl Sweep {
    fn meets(&self, p: &Point) -> bool {
        p.ttft_p90_ms <= self.slo_ttft_p90_ms
    }

    fn capacity_of(&self, name: &str) -> Capacity {
        let pts = &self.points[name];
        let mut last_ok: Option<usize> = None;
        let mut first_bad: Option<usize> = None;
        for (i, p) in pts.iter().enumerate() {
            let Some(p) = p else { continue };
            if first_bad.is_some() {
                break;
            }
            if self.meets(p) {
                last_ok = Some(i);
            } else {
                first_bad = Some(i);
            }
        }
        let slo = self.slo_ttft_p90_ms.ln();
        match (last_ok, first_bad) {
            (None, _) => Capacity {
                rate_scale: 0.0,
                grid_rate_scale: None,
                bounded: true,
            },
            (Some(i), None) => Capacity {
                rate_scale: self.scales[i],
                grid_rate_scale: Some(self.scales[i]),
                bounded: false,
            },
            (Some(i), Some(j)) => {
                let (a, b) = (pts[i].as_ref(), pts[j].as_ref());
                let (pa, pb) = (
                    a.map_or(1.0, |p| p.ttft_p90_ms.max(1.0).ln()),
                    b.map_or(1.0, |p| p.ttft_p90_ms.max(1.0).ln()),
                );
                let f = if pb > pa {
                    ((slo - pa) / (pb - pa)).clamp(0.0, 1.0)
                } else {
                    0.0
                };
                Capacity {
                    rate_scale: self.scales[i] + f * (self.scales[j] - self.scales[i]),
                    grid_rate_scale: Some(self.scales[i]),
                    bounded: true,
                }
            }
        }
    }
}

/// Runs the (policy, scale) jobs on `threads` threads; results in job order.
fn run_jobs(
    rows: &[TraceRow],
    cfg: &SimConfig,
    seed: u64,
    jobs: &[(String, f64)],
    threads: usize,
) -> Result<Vec<PolicyResult>, String> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let out: std::sync::Mutex<Vec<Option<Result<PolicyResult, String>>>> =
        std::sync::Mutex::new(vec![None; jobs.len()]);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                loop {
                    let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((name, scale)) = jobs.get(k) else {
                        break;
                    };
                    let c = SimConfig {
                        rate_scale: *scale,
                        ..cfg.clone()
                    };
                    let r = run_one(rows, &c, name, seed, true);
                    if let Ok(mut o) = out.lock() {
                        o[k] = Some(r);
                    }
                }
            });
        }
    });
    out.into_inner()
        .map_err(|_| "a sweep thread panicked".to_string())?
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err("a sweep job did not run".into())))
        .collect()
}

/// The sweep itself. `start` is the first grid scale when `--scales` is not given.
pub fn sweep(
    a: &BenchReplayArgs,
    rows: &[TraceRow],
    cfg: &SimConfig,
    start: f64,
    default_policy: &str,
) -> Result<Sweep, String> {
    let explicit = !a.scales.is_empty();
    let step = a.grid_step;
    if !(step.is_finite() && step > 1.0) {
        return Err("--grid-step must be > 1".into());
    }
    let mut sw = Sweep {
        slo_ttft_p90_ms: a.slo_ttft_p90_ms,
        default_policy: default_policy.to_string(),
        scales: Vec::new(),
        points: a.policies.iter().map(|p| (p.clone(), Vec::new())).collect(),
        capacity: BTreeMap::new(),
    };
    let mut misses: BTreeMap<String, usize> = a.policies.iter().map(|p| (p.clone(), 0)).collect();
    let mut scale = if explicit { a.scales[0] } else { start };
    for k in 0..a.max_points {
        if explicit {
            match a.scales.get(k) {
                Some(&s) => scale = s,
                None => break,
            }
        }
        // A policy past its knee (two misses in a row) stops, except the default: its hit rate
        // past every other policy's capacity is one of the things measured.
        let active: Vec<String> = a
            .policies
            .iter()
            .filter(|p| explicit || p.as_str() == default_policy || misses[p.as_str()] < 2)
            .cloned()
            .collect();
        if !explicit {
            let others_done = a
                .policies
                .iter()
                .all(|p| p == default_policy || misses[p.as_str()] >= 2);
            let max_cap = a
                .policies
                .iter()
                .map(|p| sw.capacity_of(p).rate_scale)
                .fold(0.0, f64::max);
            let default_done = misses.get(default_policy).is_none_or(|&m| m >= 2);
            if !sw.scales.is_empty() && others_done && default_done && scale > 1.5 * max_cap {
                break;
            }
        }
        if !a.json {
            eprintln!(
                "  rate scale {scale:.3}: {} ({} policies)",
                active.join(", "),
                active.len()
            );
        }
        let jobs: Vec<(String, f64)> = active.iter().map(|p| (p.clone(), scale)).collect();
        let results = run_jobs(rows, cfg, a.seed, &jobs, a.threads)?;
        sw.scales.push(scale);
        for p in &a.policies {
            let point = active
                .iter()
                .position(|x| x == p)
                .map(|i| Point::from(&results[i]));
            if let Some(pt) = &point {
                let m = misses.entry(p.clone()).or_default();
                *m = if sw.slo_ttft_p90_ms >= pt.ttft_p90_ms {
                    0
                } else {
                    *m + 1
                };
            }
            if let Some(v) = sw.points.get_mut(p) {
                v.push(point);
            }
        }
        scale *= step;
    }
    let names: Vec<String> = sw.points.keys().cloned().collect();
    for n in names {
        let c = sw.capacity_of(&n);
        sw.capacity.insert(n, c);
    }
    Ok(sw)
}

/// The issue's targets for the default policy, checked on a sweep.
#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    pub best_other: Option<String>,
    pub ratio_to_best_other: Option<f64>,
    pub ratio_to_round_robin: Option<f64>,
    /// TTFT p90 no worse than the best peer's at every grid point up to that peer's capacity.
    pub no_worse_below_peer_capacity: bool,
    /// Hit rate at the first grid point past every peer's capacity / at the first grid point.
    pub overload_hit_ratio: Option<f64>,
}

pub fn verdict(sw: &Sweep) -> Verdict {
    let d = sw.default_policy.as_str();
    let cap = |n: &str| sw.capacity.get(n).map(|c| c.rate_scale);
    let best_other = sw
        .capacity
        .iter()
        .filter(|(n, _)| n.as_str() != d)
        .max_by(|a, b| a.1.rate_scale.total_cmp(&b.1.rate_scale))
        .map(|(n, _)| n.clone());
    let ratio = |other: Option<f64>| match (cap(d), other) {
        (Some(x), Some(y)) if y > 0.0 => Some(x / y),
        _ => None,
    };
    let ratio_to_best_other = ratio(best_other.as_deref().and_then(cap));
    let ratio_to_round_robin = ratio(cap("round-robin"));
    let mut no_worse = true;
    if let (Some(best), Some(mine)) = (best_other.as_deref(), sw.points.get(d)) {
        let best_cap = cap(best).unwrap_or(0.0);
        if let Some(theirs) = sw.points.get(best) {
            for (i, s) in sw.scales.iter().enumerate() {
                if *s > best_cap + 1e-12 {
                    break;
                }
                if let (Some(Some(m)), Some(Some(t))) = (mine.get(i), theirs.get(i))
                    && m.ttft_p90_ms > t.ttft_p90_ms
                {
                    no_worse = false;
                }
            }
        }
    }
    let peers_max = sw
        .capacity
        .iter()
        .filter(|(n, _)| n.as_str() != d)
        .map(|(_, c)| c.rate_scale)
        .fold(0.0, f64::max);
    let overload_hit_ratio = sw.points.get(d).and_then(|mine| {
        let first = mine.first()?.as_ref()?.hit_rate;
        let i = sw.scales.iter().position(|s| *s > peers_max)?;
        let past = mine.get(i)?.as_ref()?.hit_rate;
        (first > 0.0).then(|| past / first)
    });
    Verdict {
        best_other,
        ratio_to_best_other,
        ratio_to_round_robin,
        no_worse_below_peer_capacity: no_worse,
        overload_hit_ratio,
    }
}

/// The sweep as markdown: TTFT p90 and hit rate per point, then capacities and the verdict.
pub fn table(sw: &Sweep, v: &Verdict) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "TTFT p90 (ms) / prefix hit rate / output tok/s at each rate scale ('-': skipped past the knee):\n"
    );
    let _ = write!(o, "| policy |");
    for s in &sw.scales {
        let _ = write!(o, " x{s:.2} |");
    }
    let _ = writeln!(o, " capacity at p90 <= {:.0} ms |", sw.slo_ttft_p90_ms);
    let _ = writeln!(o, "|---|{}---|", "---|".repeat(sw.scales.len()));
    for (n, pts) in &sw.points {
        let _ = write!(o, "| {n} |");
        for p in pts {
            match p {
                Some(p) => {
                    let _ = write!(
                        o,
                        " {:.0} / {:.3} / {:.0} |",
                        p.ttft_p90_ms, p.hit_rate, p.output_tok_s
                    );
                }
                None => {
                    let _ = write!(o, " - |");
                }
            }
        }
        let c = &sw.capacity[n];
        let _ = writeln!(
            o,
            " {}{:.2} |",
            if c.bounded { "" } else { ">= " },
            c.rate_scale
        );
    }
    let f = |x: Option<f64>| x.map_or("n/a".to_string(), |v| format!("{v:.2}"));
    let _ = writeln!(
        o,
        "\n{}: capacity {:.2}; x{} vs the best other ({}), x{} vs round-robin; TTFT p90 no worse than {} up to its capacity: {}; hit rate past every peer's capacity / at the first point: {}",
        sw.default_policy,
        sw.capacity
            .get(&sw.default_policy)
            .map_or(0.0, |c| c.rate_scale),
        f(v.ratio_to_best_other),
        v.best_other.as_deref().unwrap_or("n/a"),
        f(v.ratio_to_round_robin),
        v.best_other.as_deref().unwrap_or("n/a"),
        if v.no_worse_below_peer_capacity {
            "yes"
        } else {
            "no"
        },
        f(v.overload_hit_ratio)
    );
    o
}

/// TTFT p90 (log scale, SLO dashed) and hit rate against the rate scale, one line per policy.
pub fn svg(sw: &Sweep, title: &str, colours: &[&str]) -> String {
    use std::fmt::Write as _;
    let (w, h) = (1100.0, 470.0);
    let (t, pw, ph) = (50.0, 440.0, 330.0);
    let lefts = [70.0, 600.0];
    let (lo_s, hi_s) = (
        sw.scales.first().copied().unwrap_or(1.0),
        sw.scales.last().copied().unwrap_or(2.0),
    );
    let x = |l: f64, s: f64| l + (s - lo_s) / (hi_s - lo_s).max(1e-9) * pw;
    let (lo_ms, hi_ms) = (1.0f64, 6.0f64); // 10 ms .. 1000 s
    let y_ms =
        |ms: f64| t + ph - (ms.max(1.0).log10().clamp(lo_ms, hi_ms) - lo_ms) / (hi_ms - lo_ms) * ph;
    let y_hit = |v: f64| t + ph - v.clamp(0.0, 1.0) * ph;
    let mut o = String::new();
    let _ = write!(
        o,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="70" y="24" font-size="15">{}</text>"##,
        crate::replay::esc(title)
    );
    for (panel, &l) in lefts.iter().enumerate() {
        let _ = write!(
            o,
            r##"<rect x="{l}" y="{t}" width="{pw}" height="{ph}" fill="none" stroke="#333"/><text x="{}" y="{}" text-anchor="middle">arrival rate (x the trace's)</text>"##,
            l + pw / 2.0,
            t + ph + 36.0
        );
        for s in &sw.scales {
            let xx = x(l, *s);
            let _ = write!(
                o,
                r##"<line x1="{xx}" y1="{t}" x2="{xx}" y2="{}" stroke="#eee"/><text x="{xx}" y="{}" text-anchor="middle" font-size="10">{s:.1}</text>"##,
                t + ph,
                t + ph + 16.0
            );
        }
        if panel == 0 {
            for (ms, label) in [
                (10.0, "10 ms"),
                (100.0, "100 ms"),
                (1e3, "1 s"),
                (1e4, "10 s"),
                (1e5, "100 s"),
                (1e6, "1000 s"),
            ] {
                let yy = y_ms(ms);
                let _ = write!(
                    o,
                    r##"<line x1="{l}" y1="{yy}" x2="{}" y2="{yy}" stroke="#eee"/><text x="{}" y="{}" text-anchor="end">{label}</text>"##,
                    l + pw,
                    l - 6.0,
                    yy + 4.0
                );
            }
            let yy = y_ms(sw.slo_ttft_p90_ms);
            let _ = write!(
                o,
                r##"<line x1="{l}" y1="{yy}" x2="{}" y2="{yy}" stroke="#333" stroke-dasharray="5 4"/><text x="{}" y="{}" text-anchor="end">SLO</text><text x="{l}" y="{}">TTFT p90</text>"##,
                l + pw,
                l + pw - 4.0,
                yy - 4.0,
                t - 6.0
            );
        } else {
            for v in [0.0, 0.25, 0.5, 0.75, 1.0] {
                let yy = y_hit(v);
                let _ = write!(
                    o,
                    r##"<line x1="{l}" y1="{yy}" x2="{}" y2="{yy}" stroke="#eee"/><text x="{}" y="{}" text-anchor="end">{v:.2}</text>"##,
                    l + pw,
                    l - 6.0,
                    yy + 4.0
                );
            }
            let _ = write!(
                o,
                r##"<text x="{l}" y="{}">prefix hit rate</text>"##,
                t - 6.0
            );
        }
    }
    for (i, (name, pts)) in sw.points.iter().enumerate() {
        let c = colours[i % colours.len()];
        let width = if *name == sw.default_policy { 3.0 } else { 1.5 };
        for (panel, &l) in lefts.iter().enumerate() {
            let mut line = String::new();
            for (k, p) in pts.iter().enumerate() {
                if let Some(p) = p {
                    let yy = if panel == 0 {
                        y_ms(p.ttft_p90_ms)
                    } else {
                        y_hit(p.hit_rate)
                    };
                    let _ = write!(line, "{:.1},{:.1} ", x(l, sw.scales[k]), yy);
                }
            }
            let _ = write!(
                o,
                r##"<polyline points="{line}" fill="none" stroke="{c}" stroke-width="{width}"/>"##
            );
        }
        let _ = write!(
            o,
            r##"<text x="{}" y="{}" fill="{c}">{}</text>"##,
            lefts[0] + 8.0,
            t + 16.0 + 14.0 * i as f64,
            crate::replay::esc(name)
        );
    }
    o.push_str("</svg>");
    o
}
