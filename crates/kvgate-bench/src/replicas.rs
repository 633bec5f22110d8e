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
    /// Replica homes against herding (0: off) and their window (`None`: twice the sync
    /// delay); named only when not the defaults (`/home-off`, `/home-D` or `/home-D-Wms`).
    pub home_discount: f64,
    pub herd_window_ms: Option<f64>,
}

use kvgate_runtime::replica::DEFAULT_HOME_DISCOUNT;

impl Variant {
    pub fn name(&self) -> String {
        let sync = match self.delay_ms {
            Some(d) => format!("sync-{d}ms"),
            None => "unsynced".to_string(),
        };
        let home = if self.home_discount == 0.0 {
            "/home-off".to_string()
        } else if let Some(w) = self.herd_window_ms {
            format!("/home-{}-{w}ms", self.home_discount)
        } else if self.home_discount != DEFAULT_HOME_DISCOUNT {
            format!("/home-{}", self.home_discount)
        } else {
            String::new()
        };
        format!(
            "{}@{}/{sync}/{}{home}",
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
        let (Some(n), Some(sync), Some(spread), home, None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(bad());
        };
        let (home_discount, herd_window_ms) = match home {
            None => (DEFAULT_HOME_DISCOUNT, None),
            Some("home-off") => (0.0, None),
            Some(h) => {
                let h = h.strip_prefix("home-").ok_or_else(bad)?;
                let (d, w) = match h.split_once('-') {
                    Some((d, w)) => (d, w.strip_suffix("ms").ok_or_else(bad)?),
                    None => (h, ""),
                };
                let d: f64 = d.parse().map_err(|_| bad())?;
                let w: Option<f64> = if w.is_empty() {
                    None
                } else {
                    Some(w.parse().map_err(|_| bad())?)
                };
                check_home(d, w)?;
                (d, w)
            }
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
            home_discount,
            herd_window_ms,
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
                let r = match base.as_str() {
                    "dynamo" => KvRouter::dynamo(&fleet, bs, s),
                    _ => KvRouter::kvgate(&fleet, bs, s),
                }?;
                Ok(r)
            },
        )?
        .with_home(
            (self.home_discount > 0.0).then_some(self.home_discount),
            Duration::from_secs_f64(
                self.herd_window_ms
                    .unwrap_or(2.0 * self.delay_ms.unwrap_or(0.0))
                    .max(1e-3)
                    / 1000.0,
            ),
        );
        Ok(Box::new(p))
    }
}

/// Refuses a home discount or herd window the product would refuse.
pub fn check_home(discount: f64, window_ms: Option<f64>) -> Result<(), String> {
    if !(discount.is_finite() && (0.0..1.0).contains(&discount)) {
        return Err(format!(
            "replica home discount {discount}: must be >= 0 and < 1"
        ));
    }
    if let Some(w) = window_ms
        && !(w.is_finite() && w > 0.0)
    {
        return Err(format!("replica herd window {w} ms: must be > 0"));
    }
    Ok(())
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
    check_home(a.replica_home_discount, a.replica_herd_window_ms)?;
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
                            home_discount: a.replica_home_discount,
                            herd_window_ms: a.replica_herd_window_ms,
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
                    home_discount: a.replica_home_discount,
                    herd_window_ms: a.replica_herd_window_ms,
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
            home_discount: DEFAULT_HOME_DISCOUNT,
            herd_window_ms: None,
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
        for (name, d, w) in [
            ("kvgate@4/sync-1ms/random/home-off", 0.0, None),
            ("kvgate@4/sync-1ms/random/home-0.2", 0.2, None),
            ("kvgate@4/sync-1ms/random/home-0.2-5ms", 0.2, Some(5.0)),
        ] {
            let v = Variant::parse(name).unwrap().unwrap();
            assert_eq!((v.home_discount, v.herd_window_ms), (d, w), "{name}");
            assert_eq!(v.name(), name);
        }
        for bad in [
            "round-robin@4/unsynced/random",
            "kvgate@x/unsynced/random",
            "kvgate@4/sync-ms/random",
            "kvgate@4/sync--1ms/random",
            "kvgate@4/unsynced/sideways",
            "kvgate@4/unsynced",
            "kvgate@4/unsynced/random/home-1.5",
            "kvgate@4/unsynced/random/home-0.2-0ms",
            "kvgate@4/unsynced/random/homes",
            "kvgate@4/unsynced/random/home-off/x",
        ] {
            assert!(matches!(Variant::parse(bad), Some(Err(_))), "{bad}");
        }
    }
}
