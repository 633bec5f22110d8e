//! Event plane flags shared by `kvgate epp`, `kvgate frontend` (kv mode) and `kvgate mocker`.

use clap::{Args, ValueEnum};
use kvgate_runtime::nats::NatsEventConfig;
use kvgate_runtime::replica::ReplicaSyncConfig;
use kvgate_runtime::routing::EventPlane;
use kvgate_runtime::snapshot::{SnapshotTarget, check_bucket_name, check_object_key};
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PlaneArg {
    /// Dynamo 1.6's NATS event plane (its MessagePack envelope on the endpoint's core-NATS
    /// subject; kept in a JetStream stream with `--durable-kv-events`).
    Nats,
    /// vLLM's ZMQ publishers, one per worker rank (`kv_events` in the workers file; the mocker's
    /// `--zmq-kv-events`).
    Zmq,
}

#[derive(Args, Debug, Clone)]
pub struct EventPlaneArgs {
    /// Where KV events travel.
    #[arg(long, value_enum, env = "DYN_EVENT_PLANE", default_value = "zmq")]
    pub event_plane: PlaneArg,
    /// NATS server (with `--event-plane nats`).
    #[arg(long, env = "NATS_SERVER", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Dynamo namespace: the subject is `namespace.{ns}.component.{component}.kv-events`.
    #[arg(long, env = "DYN_NAMESPACE", default_value = "dynamo")]
    pub namespace: String,
    /// Dynamo component of the workers.
    #[arg(long, default_value = "backend")]
    pub component: String,
    /// Dynamo endpoint of the workers: Dynamo 1.6 workers publish KV events on
    /// `namespace.{ns}.component.{component}.endpoint.{endpoint}.kv-events`.
    #[arg(
        long = "dynamo-endpoint",
        env = "DYN_ENDPOINT",
        default_value = "generate"
    )]
    pub endpoint: String,
    /// Dynamo component of a disaggregated graph's prefill workers: their KV events (and, with
    /// Dynamo discovery, the workers) are taken too; empty: none.
    #[arg(long, default_value = "prefill")]
    pub prefill_component: String,
    /// Keep KV events in a JetStream stream read through a durable consumer (survives NATS and
    /// router restarts); `--durable-kv-events=false` uses a core-NATS subscription.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub durable_kv_events: bool,
    /// Durable consumer name; each router replica needs its own (default: `kvgate-` + the
    /// host name, which is the pod name on Kubernetes).
    #[arg(long, env = "KVGATE_KV_CONSUMER")]
    pub kv_consumer: Option<String>,
    /// Seconds the JetStream stream keeps events.
    #[arg(long, env = "DYN_NATS_STREAM_MAX_AGE", default_value_t = 3600)]
    pub nats_stream_max_age: u64,
    /// Index snapshot file (NATS JetStream): restored at start-up (the stream is then read from
    /// where the snapshot ends) and rewritten every `--kv-snapshot-interval-secs`.
    #[arg(long, env = "KVGATE_KV_SNAPSHOT")]
    pub kv_snapshot: Option<std::path::PathBuf>,
    /// Keep the index snapshot in this JetStream object store bucket instead of a file (created
    /// when missing): a replacement pod without a volume restores it. Replicas of one router
    /// deployment share one object (`--kv-snapshot-key`).
    #[arg(
        long,
        env = "KVGATE_KV_SNAPSHOT_BUCKET",
        conflicts_with = "kv_snapshot"
    )]
    pub kv_snapshot_bucket: Option<String>,
    /// Object name of the snapshot in `--kv-snapshot-bucket`: one per router deployment whose
    /// replicas read the same workers (default: the event stream's name,
    /// `namespace-{ns}-component-{c}-kv-events`).
    #[arg(long, env = "KVGATE_KV_SNAPSHOT_KEY", requires = "kv_snapshot_bucket")]
    pub kv_snapshot_key: Option<String>,
    #[arg(long, default_value_t = 30.0)]
    pub kv_snapshot_interval_secs: f64,
    /// With replica sync: how much cheaper this replica's home share of the workers is while
    /// its peers decide at the same moment (bursts spread over replicas faster than sync
    /// delivers). 0 turns it off. See docs/ha.md#bursts.
    #[arg(
        long,
        env = "KVGATE_REPLICA_HOME_DISCOUNT",
        default_value_t = kvgate_runtime::replica::DEFAULT_HOME_DISCOUNT
    )]
    pub replica_home_discount: f64,
    /// With replica sync: a peer decision heard within this many milliseconds of one of this
    /// replica's counts as made at the same moment (set it above the sync delay).
    #[arg(
        long,
        env = "KVGATE_REPLICA_HERD_WINDOW_MS",
        default_value_t = kvgate_runtime::replica::DEFAULT_HERD_WINDOW_MS
    )]
    pub replica_herd_window_ms: f64,
}

impl EventPlaneArgs {
    pub(crate) fn check_subject_tokens(&self) -> Result<(), String> {
        for (flag, v) in [
            ("--namespace", &self.namespace),
            ("--component", &self.component),
            ("--dynamo-endpoint", &self.endpoint),
        ] {
            if v.is_empty() || v.contains(['.', '*', '>', ' ']) {
                return Err(format!(
                    "{flag} {v:?} must be non-empty and free of '.', '*', '>' and spaces (it is one NATS subject token)"
                ));
            }
        }
        Ok(())
    }

    /// The prefill component, if any (checked like the other subject tokens).
    pub(crate) fn prefill_component(&self) -> Result<Option<String>, String> {
        let p = &self.prefill_component;
        if p.is_empty() {
            return Ok(None);
        }
        if p.contains(['.', '*', '>', ' ']) {
            return Err(format!(
                "--prefill-component {p:?} must be free of '.', '*', '>' and spaces (it is one NATS subject token)"
            ));
        }
        Ok(Some(p.clone()))
    }

    /// Replica sync over the same NATS server, namespace and component (when `enabled`,
    /// i.e. `DYN_ROUTER_REPLICA_SYNC=true`), whichever plane carries the KV events.
    pub fn replica_sync(&self, enabled: bool) -> Result<Option<ReplicaSyncConfig>, String> {
        if !enabled {
            return Ok(None);
        }
        self.check_subject_tokens()?;
        let d = self.replica_home_discount;
        if !(d.is_finite() && (0.0..1.0).contains(&d)) {
            return Err(format!(
                "--replica-home-discount {d}: must be >= 0 and < 1 (a share of the cost)"
            ));
        }
        let w = self.replica_herd_window_ms;
        if !(w.is_finite() && w > 0.0 && w <= 60_000.0) {
            return Err(format!(
                "--replica-herd-window-ms {w}: must be > 0 and at most 60000"
            ));
        }
        let mut c = ReplicaSyncConfig::new(&self.nats_url, &self.namespace, &self.component);
        c.home_discount = d;
        c.herd_window = Duration::from_secs_f64(w / 1000.0);
        Ok(Some(c))
    }

    fn nats_config(&self) -> Result<NatsEventConfig, String> {
        self.check_subject_tokens()?;
        if !(self.kv_snapshot_interval_secs.is_finite() && self.kv_snapshot_interval_secs >= 0.1) {
            return Err("--kv-snapshot-interval-secs must be >= 0.1".into());
        }
        if (self.kv_snapshot.is_some() || self.kv_snapshot_bucket.is_some())
            && !self.durable_kv_events
        {
            let flag = if self.kv_snapshot.is_some() {
                "--kv-snapshot"
            } else {
                "--kv-snapshot-bucket"
            };
            return Err(format!(
                "{flag} needs --durable-kv-events (a JetStream stream to resume from)"
            ));
        }
        if self.nats_stream_max_age == 0 {
            return Err("--nats-stream-max-age must be > 0".into());
        }
        let consumer = match &self.kv_consumer {
            Some(c) => c.clone(),
            None => {
                let host = std::env::var("HOSTNAME")
                    .ok()
                    .filter(|h| !h.is_empty())
                    .unwrap_or_else(|| "local".into());
                format!("kvgate-{host}")
            }
        };
        // Consumer names are single tokens too.
        let consumer: String = consumer
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        let mut cfg = NatsEventConfig {
            url: self.nats_url.clone(),
            namespace: self.namespace.clone(),
            component: self.component.clone(),
            endpoint: self.endpoint.clone(),
            prefill_component: self.prefill_component()?,
            durable: self.durable_kv_events,
            consumer,
            max_age: Duration::from_secs(self.nats_stream_max_age),
            snapshot: self.kv_snapshot.clone().map(SnapshotTarget::File),
            snapshot_every: Duration::from_secs_f64(self.kv_snapshot_interval_secs),
        };
        if let Some(bucket) = &self.kv_snapshot_bucket {
            check_bucket_name(bucket).map_err(|e| format!("--kv-snapshot-bucket: {e}"))?;
            let key = self.kv_snapshot_key.clone().unwrap_or_else(|| cfg.stream());
            check_object_key(&key).map_err(|e| format!("--kv-snapshot-key: {e}"))?;
            cfg.snapshot = Some(SnapshotTarget::Object {
                bucket: bucket.clone(),
                key,
            });
        }
        Ok(cfg)
    }

    /// Where a router reads its events.
    pub fn router_plane(&self) -> Result<EventPlane, String> {
        Ok(match self.event_plane {
            PlaneArg::Zmq => EventPlane::Zmq,
            PlaneArg::Nats => EventPlane::Nats(Box::new(self.nats_config()?)),
        })
    }

    /// Where the mocker publishes on NATS, if it does.
    pub fn publisher(&self) -> Result<Option<NatsEventConfig>, String> {
        Ok(match self.event_plane {
            PlaneArg::Zmq => None,
            PlaneArg::Nats => Some(self.nats_config()?),
        })
    }
}
