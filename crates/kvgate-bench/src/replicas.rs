//! `kvgate bench replay --router-replicas N`: N router replicas behind one gateway against one
//! router, in virtual time ([`kvgate_sim::replicas`]).
//!
//! The rows compared are the base policy alone and, for every sync delay given and for sync
//! off, N replicas of it. A variant is named `BASE@N/sync-Dms/SPREAD` or `BASE@N/unsynced/SPREAD`,
//! and is an ordinary policy to the replay and to the sweep: `--sweep` measures each variant's
//! capacity, and the report adds each one's hit rate and TTFT p90 against the single replica's
//! at the single replica's knee (its highest grid point within the objective).

use crate::replay::BenchReplayArgs;
use crate::sweep::Sweep;
use kvgate_sim::policy::{KvRouter, Policy};
use kvgate_sim::replicas::{Replicated, Spread};
use kvgate_sim::sim::{PolicyResult, SimConfig, fleet_view};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// Base policies that can be replicated: the router core's (they book, so sync means something).
pub const REPLICABLE: [&str; 2] = ["kvgate", "dynamo"];

/// A replicated variant, parsed from its name.
#[derive(Clone, Debug, PartialEq)]
pub struct Variant {
    pub base: String,
    pub replicas: usize,
    /// `None`: sync off.
    pub delay_ms: Option<f64>,
    pub spread: Spread,
}

impl Variant {
    pub fn name(&self) -> String {
        let sync = match self.delay_ms {
            Some(d) => format!("sync-{d}ms"),
            None => "unsynced".to_string(),
        };
        format!(
            "{}@{}/{sync}/{}",
            self.base,
            self.replicas,
            self.spread.as_str()
        )
    }

    /// `None` when `name` is not a variant's (no `@`).
    pub fn parse(name: &str) -> Option<Result<Self, String>> {
        let (base, rest) = name.split_once('@')?;
        Some(Self::parse_parts(name, base, rest))
    }

    fn parse_parts(name: &str, base: &str, rest: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "bad replicated policy {name:?} (want BASE@N/sync-Dms/SPREAD or BASE@N/unsynced/SPREAD)"
            )
        };
        if !REPLICABLE.contains(&base) {
            return Err(format!(
                "{name:?}: only {} can run as replicas (policies that book their decisions)",
                REPLICABLE.join(" and ")
            ));
        }
        let mut parts = rest.split('/');
        let (Some(n), Some(sync), Some(spread), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let replicas: usize = n.parse().map_err(|_| bad())?;
        let delay_ms = match sync {
            "unsynced" => None,
            s => Some(
                s.strip_prefix("sync-")
                    .and_then(|d| d.strip_suffix("ms"))
                    .and_then(|d| d.parse::<f64>().ok())
                    .filter(|d| d.is_finite() && *d >= 0.0)
                    .ok_or_else(bad)?,
            ),
        };
        Ok(Self {
            base: base.to_string(),
            replicas,
            delay_ms,
            spread: Spread::parse(spread)?,
        })
    }

    pub fn policy(&self, cfg: &SimConfig, seed: u64) -> Result<Box<dyn Policy>, String> {
        let fleet = fleet_view(cfg);
        let bs = cfg.engine.block_size;
        let base = self.base.clone();
        let p = Replicated::new(
            &self.name(),
            self.replicas,
            self.spread,
            self.delay_ms.map(|d| Duration::from_secs_f64(d / 1000.0)),
            seed,
            |i| {
                // Each replica its own tie-break stream, as separate processes would have.
                let s = seed.wrapping_add(i as u64);
                match base.as_str() {
                    "dynamo" => KvRouter::dynamo(&fleet, bs, s),
                    _ => KvRouter::kvgate(&fleet, bs, s),
                }
            },
        )?;
        Ok(Box::new(p))
    }
}

/// The policies a replica comparison runs: the base alone, then its variants.
pub fn policies(a: &BenchReplayArgs) -> Result<Vec<String>, String> {
    let base = a.replica_base_policy.as_str();
    if !REPLICABLE.contains(&base) {
        return Err(format!(
            "--replica-base-policy {base:?}: only {} can run as replicas",
            REPLICABLE.join(" and ")
        ));
    }
    if a.router_replicas < 2 {
        return Err("--router-replicas must be >= 2 to compare replicas with one router".into());
    }
    let spread = Spread::parse(&a.replica_spread)?;
    let mut out = vec![base.to_string()];
    for s in &a.replica_sync {
        match s.as_str() {
            "on" => {
                if a.replica_sync_delay_ms.is_empty() {
                    return Err(
                        "--replica-sync on needs at least one --replica-sync-delay-ms".into(),
                    );
                }
                for &d in &a.replica_sync_delay_ms {
                    if !(d.is_finite() && d >= 0.0) {
                        return Err(format!("--replica-sync-delay-ms {d}: must be >= 0"));
                    }
                    out.push(
                        Variant {
                            base: base.to_string(),
                            replicas: a.router_replicas as usize,
                            delay_ms: Some(d),
                            spread,
                        }
                        .name(),
                    );
                }
            }
            "off" => out.push(
                Variant {
                    base: base.to_string(),
                    replicas: a.router_replicas as usize,
                    delay_ms: None,
                    spread,
                }
                .name(),
            ),
            other => return Err(format!("--replica-sync {other:?}: want on, off or on,off")),
        }
    }
    out.dedup();
    Ok(out)
}

/// One variant against the single replica, at one rate.
#[derive(Clone, Debug, Serialize)]
pub struct VsSingle {
    pub hit_rate: f64,
    pub hit_ratio_vs_single: f64,
    pub ttft_p90_ms: f64,
    pub ttft_p90_ratio_vs_single: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity_ratio_vs_single: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_bookings_at_end: Option<usize>,
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { f64::NAN }
}

/// One run at one rate: every variant against the first (the single replica).
pub fn compare(results: &[(String, PolicyResult)]) -> BTreeMap<String, VsSingle> {
    let Some((_, single)) = results.first() else {
        return BTreeMap::new();
    };
    results
        .iter()
        .map(|(n, r)| {
            (
                n.clone(),
                VsSingle {
                    hit_rate: r.hit_rate,
                    hit_ratio_vs_single: ratio(r.hit_rate, single.hit_rate),
                    ttft_p90_ms: r.ttft_p90_ms,
                    ttft_p90_ratio_vs_single: ratio(r.ttft_p90_ms, single.ttft_p90_ms),
                    capacity_ratio_vs_single: None,
                    open_bookings_at_end: r.open_bookings_at_end,
                },
            )
        })
        .collect()
}

/// What a replica sweep says: every variant at the single replica's knee, and its capacity.
#[derive(Clone, Debug, Serialize)]
pub struct SweepVsSingle {
    pub single: String,
    /// The single replica's highest grid point within the objective (`None`: none was).
    pub knee_rate_scale: Option<f64>,
    pub variants: BTreeMap<String, VsSingle>,
}

pub fn sweep_vs_single(sw: &Sweep, single: &str) -> SweepVsSingle {
    let cap = |n: &str| sw.capacity.get(n).map_or(0.0, |c| c.rate_scale);
    let knee = sw.capacity.get(single).and_then(|c| c.grid_rate_scale);
    let at = knee.and_then(|k| sw.scales.iter().position(|s| (*s - k).abs() < 1e-12));
    let point = |n: &str| at.and_then(|i| sw.points.get(n)?.get(i)?.clone());
    let mut variants = BTreeMap::new();
    if let Some(base) = point(single) {
        for n in sw.points.keys() {
            let Some(p) = point(n) else { continue };
            variants.insert(
                n.clone(),
                VsSingle {
                    hit_rate: p.hit_rate,
                    hit_ratio_vs_single: ratio(p.hit_rate, base.hit_rate),
                    ttft_p90_ms: p.ttft_p90_ms,
                    ttft_p90_ratio_vs_single: ratio(p.ttft_p90_ms, base.ttft_p90_ms),
                    capacity_ratio_vs_single: Some(ratio(cap(n), cap(single))),
                    open_bookings_at_end: None,
                },
            );
        }
    }
    SweepVsSingle {
        single: single.to_string(),
        knee_rate_scale: knee,
        variants,
    }
}

/// The comparison as markdown.
pub fn table(rows: &BTreeMap<String, VsSingle>, order: &[String]) -> String {
    use std::fmt::Write as _;
    let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.2}"));
    let mut o = String::from(
        "| router | hit rate | vs one | TTFT p90 (ms) | vs one | capacity vs one | bookings left |\n|---|---|---|---|---|---|---|\n",
    );
    for n in order {
        let Some(v) = rows.get(n) else { continue };
        let _ = writeln!(
            o,
            "| {n} | {:.3} | {:.3} | {:.0} | {:.3} | {} | {} |",
            v.hit_rate,
            v.hit_ratio_vs_single,
            v.ttft_p90_ms,
            v.ttft_p90_ratio_vs_single,
            f(v.capacity_ratio_vs_single),
            v.open_bookings_at_end
                .map_or("-".to_string(), |b| b.to_string())
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variant_names_round_trip_and_bad_ones_are_refused() {
        let v = Variant {
            base: "kvgate".into(),
            replicas: 4,
            delay_ms: Some(2.5),
            spread: Spread::Random,
        };
        assert_eq!(v.name(), "kvgate@4/sync-2.5ms/random");
        assert_eq!(Variant::parse(&v.name()), Some(Ok(v)));
        let off = Variant::parse("dynamo@16/unsynced/round-robin");
        assert!(matches!(
            off,
            Some(Ok(Variant {
                delay_ms: None,
                replicas: 16,
                ..
            }))
        ));
        assert_eq!(Variant::parse("kvgate"), None);
        for bad in [
            "round-robin@4/unsynced/random",
            "kvgate@x/unsynced/random",
            "kvgate@4/sync-ms/random",
            "kvgate@4/sync--1ms/random",
            "kvgate@4/unsynced/sideways",
            "kvgate@4/unsynced",
        ] {
            assert!(matches!(Variant::parse(bad), Some(Err(_))), "{bad}");
        }
    }
}
