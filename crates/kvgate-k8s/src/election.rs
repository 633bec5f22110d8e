//! The kube-rs side of [`crate::lease`]: reads the `coordination.k8s.io/v1` Lease, and creates
//! or replaces it (guarded by its resourceVersion) as [`Elector`] decides. A 409 Conflict means
//! another copy wrote first. Each round is bounded in time, so a hung API call never keeps a
//! leader leading past its renew deadline.

use crate::lease::{Change, Elector, Observed, Step, Timing};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use std::hash::BuildHasher;
use std::time::{Duration, Instant};

/// Which Lease, and who this copy is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElectionConfig {
    pub lease_name: String,
    pub namespace: String,
    /// Unique per copy: two copies with one identity are told apart only by who wrote last.
    pub identity: String,
    pub timing: Timing,
}

/// The default identity: the pod name (`POD_NAME`, else `HOSTNAME`, else the host name) and a
/// random suffix, so a restarted copy is never mistaken for its predecessor.
pub fn default_identity() -> String {
    let host = ["POD_NAME", "HOSTNAME"]
        .into_iter()
        .filter_map(|k| std::env::var(k).ok())
        .chain(std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .find(|h| !h.is_empty())
        .unwrap_or_else(|| "kvgate-operator".into());
    // RandomState is seeded from the OS.
    let r = std::collections::hash_map::RandomState::new()
        .hash_one((std::process::id(), std::time::SystemTime::now()));
    format!("{host}_{:08x}", r as u32)
}

fn wall_now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

fn observed(l: Lease) -> Observed {
    Observed {
        spec: l.spec.unwrap_or_default(),
        resource_version: l.metadata.resource_version,
    }
}

/// What one round did, besides changes of role.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoundReport {
    pub changes: Vec<Change>,
    /// A write was refused with a 409 (someone else wrote first).
    pub conflict: bool,
    /// The read or write failed (or timed out); the message says which.
    pub error: Option<String>,
}

/// One copy's campaign for the Lease.
pub struct Campaign {
    api: Api<Lease>,
    cfg: ElectionConfig,
    elector: Elector,
}

impl Campaign {
    pub fn new(client: kube::Client, cfg: ElectionConfig) -> Self {
        Self {
            api: Api::namespaced(client, &cfg.namespace),
            elector: Elector::new(cfg.identity.clone(), cfg.timing),
            cfg,
        }
    }

    pub fn config(&self) -> &ElectionConfig {
        &self.cfg
    }

    pub fn is_leader(&self) -> bool {
        self.elector.is_leader(Instant::now())
    }

    /// The holder of the Lease as last read.
    pub fn holder(&self) -> Option<&str> {
        self.elector.observed_holder()
    }

    /// A passed renew deadline, reported once.
    pub fn check(&mut self) -> Option<Change> {
        self.elector.check(Instant::now())
    }

    /// When the next round is due: a retry period from now, or the lead's deadline if sooner.
    pub fn next_round(&self) -> Instant {
        let next = Instant::now() + self.cfg.timing.retry_period;
        self.elector.lead_deadline().map_or(next, |d| d.min(next))
    }

    fn lease_ref(&self) -> String {
        format!("{}/{}", self.cfg.namespace, self.cfg.lease_name)
    }

    /// Read, decide, write; bounded by the lead's deadline when leading, else by the renew
    /// deadline.
    pub async fn round(&mut self) -> RoundReport {
        let started = Instant::now();
        let bound = match self.elector.lead_deadline() {
            Some(d) => d.saturating_duration_since(started),
            None => self.cfg.timing.renew_deadline,
        }
        .max(Duration::from_millis(1));
        let mut report = match tokio::time::timeout(bound, self.round_inner(started)).await {
            Ok(r) => r,
            Err(_) => RoundReport {
                error: Some(format!(
                    "no answer about Lease {} within {bound:?}",
                    self.lease_ref()
                )),
                ..RoundReport::default()
            },
        };
        report.changes.extend(self.check());
        report
    }

    async fn round_inner(&mut self, sent: Instant) -> RoundReport {
        let mut report = RoundReport::default();
        let name = self.cfg.lease_name.clone();
        let read = match self.api.get_opt(&name).await {
            Ok(l) => l.map(observed),
            Err(e) => {
                report.error = Some(format!("cannot read Lease {}: {e}", self.lease_ref()));
                return report;
            }
        };
        let (step, change) = self.elector.on_read(sent, wall_now(), read);
        report.changes.extend(change);
        self.write(sent, step, &mut report).await;
        report
    }

    async fn write(&mut self, sent: Instant, step: Step, report: &mut RoundReport) {
        let meta = |rv: Option<String>| ObjectMeta {
            name: Some(self.cfg.lease_name.clone()),
            namespace: Some(self.cfg.namespace.clone()),
            resource_version: rv,
            ..ObjectMeta::default()
        };
        let (verb, result) = match step {
            Step::Wait => return,
            Step::Create(spec) => (
                "create",
                self.api
                    .create(
                        &PostParams::default(),
                        &Lease {
                            metadata: meta(None),
                            spec: Some(spec),
                        },
                    )
                    .await,
            ),
            Step::Replace {
                spec,
                resource_version,
            } => (
                "update",
                self.api
                    .replace(
                        &self.cfg.lease_name,
                        &PostParams::default(),
                        &Lease {
                            metadata: meta(Some(resource_version)),
                            spec: Some(spec),
                        },
                    )
                    .await,
            ),
        };
        match result {
            Ok(l) => report
                .changes
                .extend(self.elector.on_written(sent, observed(l))),
            // 409: written by someone else since it was read (or created first); 404: deleted
            // since. Either way, read again next round.
            Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {
                report.conflict = s.code == 409;
                self.elector.on_conflict();
            }
            Err(e) => {
                let hint = match &e {
                    kube::Error::Api(s) if s.code == 403 => {
                        " (the ServiceAccount needs get, create and update on coordination.k8s.io leases in that namespace)"
                    }
                    _ => "",
                };
                report.error = Some(format!(
                    "cannot {verb} Lease {}: {e}{hint}",
                    self.lease_ref()
                ));
            }
        }
    }

    /// Gives the Lease up (shutting down), so another copy takes over at once. The caller has
    /// already stopped reconciling. Best effort, bounded by the retry period.
    pub async fn release(&mut self) -> Option<Change> {
        let (step, change) = self.elector.release(wall_now())?;
        let mut report = RoundReport::default();
        let bound = self.cfg.timing.retry_period;
        match tokio::time::timeout(bound, self.write(Instant::now(), step, &mut report)).await {
            Ok(()) if report.error.is_none() && !report.conflict => {
                tracing::info!(lease = %self.lease_ref(), "released the lease");
            }
            Ok(()) => {
                tracing::warn!(lease = %self.lease_ref(), error = ?report.error, "cannot release the lease; another copy takes over once it expires")
            }
            Err(_) => {
                tracing::warn!(lease = %self.lease_ref(), "no answer releasing the lease; another copy takes over once it expires")
            }
        }
        Some(change)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_identities_differ_per_copy() {
        let a = default_identity();
        let b = default_identity();
        assert_ne!(a, b);
        let (host, suffix) = a.rsplit_once('_').unwrap();
        assert!(!host.is_empty());
        assert_eq!(suffix.len(), 8);
    }
}
