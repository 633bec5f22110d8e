//! The NATS event plane: KV events in Dynamo's `RouterEvent` format, over a JetStream stream
//! with a durable consumer (default) or a plain core-NATS subscription.
//!
//! Layout (Dynamo's): core NATS publishes on `namespace.{ns}.component.{c}.kv-events`; with
//! JetStream the stream is that subject slugified (`namespace-{ns}-component-{c}-kv-events`),
//! capturing `{stream}.*` (publishers use `{stream}.queue`) and the core subject too, so events
//! from either kind of publisher are kept. Each router replica reads through its own durable
//! consumer, acknowledging every applied event.
//!
//! Start-up: the consumer is re-created to deliver the whole retained stream, which rebuilds the
//! index from scratch (a restarted router has an empty index; resuming from its last ack would
//! leave out everything before it). While the process lives, the durable consumer is what lets
//! it ride out a NATS restart: the server keeps its position and redelivers what was not acked.
//!
//! Snapshots (`--kv-snapshot FILE` or `--kv-snapshot-bucket BUCKET`, [`crate::snapshot`]): the
//! index, the stream sequence it covers and the ranks' publishers are written every few
//! seconds; a restarted (or replacement) router restores it and reads the stream from the next
//! sequence, instead of replaying everything (and losing what `max_age` already dropped).
//!
//! Engine restarts: besides `cleared` events and envelope sequences, a rank's events from a
//! new publisher or with an event id gone back drop the rank's blocks
//! ([`kvgate_core::incarnation`]), also across a snapshot restore.
//!
//! Blindness: while the connection to NATS is down the router cannot know what workers cache;
//! it then routes on load alone ([`Router::set_events_blind`]) and says so in its metrics.

use crate::events::{EventStats, apply_sequenced};
pub use crate::snapshot::SnapshotTarget;
use async_nats::jetstream;
use futures::StreamExt;
use kvgate_core::envelope::{EnvelopeCheck, EnvelopeTracker};
use kvgate_core::incarnation::Incarnations;
use kvgate_core::router::Router;
use kvgate_core::sequencer::EventSequencer;
use kvgate_wire::dynamo::{
    RouterEvent, endpoint_kv_events_subject, kv_events_subject, stream_name, stream_queue_subject,
};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where and how to read (or publish) KV events on NATS.
#[derive(Clone, Debug)]
pub struct NatsEventConfig {
    pub url: String,
    pub namespace: String,
    pub component: String,
    /// Dynamo endpoint of the workers (`generate`): Dynamo 1.6 publishes on
    /// `namespace.{ns}.component.{c}.endpoint.{e}.kv-events`.
    pub endpoint: String,
    /// Dynamo's component of the prefill workers of a disaggregated graph (`prefill`): their
    /// events are read too, from the same endpoint name.
    pub prefill_component: Option<String>,
    /// JetStream stream + durable consumer (true) or a core-NATS subscription (false).
    pub durable: bool,
    /// Durable consumer name: one per router replica.
    pub consumer: String,
    /// How long the stream keeps events.
    pub max_age: Duration,
    /// Index snapshot, in a file or a JetStream object store (JetStream only): restored at
    /// start-up, then the stream is read from the sequence after the snapshot's; rewritten
    /// every `snapshot_every`.
    pub snapshot: Option<SnapshotTarget>,
    pub snapshot_every: Duration,
}

impl NatsEventConfig {
    /// The component-level subject (kvgate before Dynamo 1.6 compatibility; still read).
    pub fn subject(&self) -> String {
        kv_events_subject(&self.namespace, &self.component)
    }

    /// The subject a Dynamo 1.6 worker publishes its KV events on (core NATS).
    pub fn endpoint_subject(&self) -> String {
        endpoint_kv_events_subject(&self.namespace, &self.component, &self.endpoint)
    }

    /// Every Dynamo 1.6 subject read: the workers' and the prefill workers'.
    pub fn endpoint_subjects(&self) -> Vec<String> {
        let mut out = vec![self.endpoint_subject()];
        if let Some(p) = &self.prefill_component
            && p != &self.component
        {
            out.push(endpoint_kv_events_subject(
                &self.namespace,
                p,
                &self.endpoint,
            ));
        }
        out
    }

    pub fn stream(&self) -> String {
        stream_name(&self.subject())
    }

    /// The subject kvgate publishers used before Dynamo 1.6 compatibility (still captured):
    /// `{stream}.queue` with JetStream, the component subject without.
    pub fn publish_subject(&self) -> String {
        if self.durable {
            stream_queue_subject(&self.stream())
        } else {
            self.subject()
        }
    }
}

/// A NATS client that retries forever (also the first connection), reconnecting quickly, and
/// reports connection changes to `on_state(connected)`.
pub async fn connect(
    url: &str,
    name: &str,
    on_state: impl Fn(bool) + Send + Sync + 'static,
) -> Result<async_nats::Client, String> {
    let on_state = Arc::new(on_state);
    let url_for_log = url.to_string();
    async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .reconnect_delay_callback(|attempt| {
            Duration::from_millis(100u64.saturating_mul(1 << attempt.min(5)))
                .min(Duration::from_secs(2))
        })
        .event_callback(move |event| {
            let on_state = on_state.clone();
            let url = url_for_log.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        tracing::info!(%url, "NATS connected");
                        on_state(true);
                    }
                    async_nats::Event::Disconnected => {
                        tracing::warn!(%url, "NATS disconnected");
                        on_state(false);
                    }
                    other => tracing::debug!(%url, event = %other, "NATS"),
                }
            }
        })
        .connect(url)
        .await
        .map_err(|e| format!("cannot connect to NATS at {url}: {e}"))
}

/// The subjects kvgate's stream captures: the Dynamo 1.6 endpoint subject workers publish on
/// (core NATS), the component subject and the stream's own `{stream}.*` (kvgate publishers
/// before Dynamo 1.6 compatibility).
pub fn stream_subjects(cfg: &NatsEventConfig) -> Vec<String> {
    let mut subjects = cfg.endpoint_subjects();
    subjects.push(cfg.subject());
    subjects.push(format!("{}.*", cfg.stream()));
    subjects
}

/// The stream holding the KV events (created when missing, with Dynamo's layout). A stream
/// made by an older kvgate, without the endpoint subject, gets it added.
pub async fn ensure_stream(
    js: &jetstream::Context,
    cfg: &NatsEventConfig,
) -> Result<jetstream::stream::Stream, String> {
    let stream = cfg.stream();
    let subjects = stream_subjects(cfg);
    let config = jetstream::stream::Config {
        name: stream.clone(),
        subjects: subjects.clone(),
        max_age: cfg.max_age,
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    };
    let mut handle = js
        .get_or_create_stream(config)
        .await
        .map_err(|e| format!("JetStream stream {stream}: {e}"))?;
    let info = handle
        .info()
        .await
        .map_err(|e| format!("JetStream stream {stream}: {e}"))?;
    let missing: Vec<String> = subjects
        .iter()
        .filter(|s| !info.config.subjects.contains(s))
        .cloned()
        .collect();
    if !missing.is_empty() {
        let mut updated = info.config.clone();
        updated.subjects.extend(missing.iter().cloned());
        js.update_stream(updated).await.map_err(|e| {
            format!("JetStream stream {stream}: cannot add subjects {missing:?}: {e}")
        })?;
        tracing::info!(%stream, ?missing, "KV event stream now captures the Dynamo 1.6 subjects too");
        handle = js
            .get_stream(&stream)
            .await
            .map_err(|e| format!("JetStream stream {stream}: {e}"))?;
    }
    Ok(handle)
}

/// Reads KV events from NATS into the router until the task is aborted.
pub fn consume(
    router: Arc<Mutex<Router>>,
    stats: Arc<EventStats>,
    cfg: NatsEventConfig,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let on_state = {
            let router = router.clone();
            let stats = stats.clone();
            move |connected: bool| set_connected(&router, &stats, connected)
        };
        // Blind until the first connection.
        set_connected(&router, &stats, false);
        let client = match connect(&cfg.url, "kvgate-router", on_state).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("{e}");
                return;
            }
        };
        let mut order = EventOrder {
            seq: EventSequencer::new(1024, Duration::from_secs(2)),
            envelopes: EnvelopeTracker::new(65_536),
            incarnations: Incarnations::new(),
        };
        if cfg.durable {
            run_jetstream(&client, &router, &stats, &cfg, &mut order).await;
        } else {
            run_core(&client, &router, &stats, &cfg, &mut order).await;
        }
    })
}

fn set_connected(router: &Mutex<Router>, stats: &EventStats, connected: bool) {
    let was = stats.plane_connected.swap(connected, Ordering::Relaxed);
    if was && !connected {
        stats.plane_disconnects.fetch_add(1, Ordering::Relaxed);
    }
    if let Ok(mut r) = router.lock() {
        r.set_events_blind(!connected);
    }
}

/// Per-subscription state: event-id order per rank, envelope order per publisher, and each
/// rank's publishers (to see engine restarts nobody announced).
struct EventOrder {
    seq: EventSequencer,
    envelopes: EnvelopeTracker,
    incarnations: Incarnations,
}

/// `redelivered`: JetStream delivered this message before (its ack was lost). Its events that
/// are behind the publisher's sequence are duplicates, never a restart (an old `cleared` must not
/// wipe the rank).
fn handle(
    router: &Mutex<Router>,
    stats: &EventStats,
    order: &mut EventOrder,
    payload: &[u8],
    redelivered: bool,
    stored_unix_secs: Option<f64>,
) {
    stats.batches.fetch_add(1, Ordering::Relaxed);
    let decoded = match RouterEvent::decode_envelope(payload) {
        Ok(d) => d,
        Err(e) => {
            stats.decode_errors.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %e, "undecodable KV event message");
            return;
        }
    };
    // The publisher's own time first; JetStream's stored time otherwise.
    let published = decoded
        .published_at
        .map(|ms| ms as f64 / 1000.0)
        .or(stored_unix_secs)
        .unwrap_or(0.0);
    if let Some(p) = decoded.publisher {
        let ranks = decoded.events.iter().map(|e| e.source());
        match order.envelopes.offer(p.id, p.sequence, ranks, redelivered) {
            EnvelopeCheck::InOrder => {}
            EnvelopeCheck::Duplicate => {
                stats
                    .duplicates
                    .fetch_add(decoded.events.len() as u64, Ordering::Relaxed);
                return;
            }
            EnvelopeCheck::Gap { missing, ranks } => {
                stats.seq_gaps.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    publisher = p.id,
                    missing,
                    ranks = ranks.len(),
                    "KV event messages lost (envelope sequence jumped); dropping the publisher's ranks to rebuild them from new events"
                );
                resync_ranks(router, stats, order, &ranks);
            }
            EnvelopeCheck::Restarted { ranks } => {
                tracing::info!(publisher = p.id, "KV event publisher started over");
                resync_ranks(router, stats, order, &ranks);
            }
        }
    }
    let now = Instant::now();
    for e in decoded.events {
        if let Some(reason) = e.unsupported() {
            stats.skip(reason, &format_args!("worker {} ({reason})", e.worker_id));
            continue;
        }
        let e = e.to_kv_event();
        if redelivered
            && order
                .seq
                .expected(e.source)
                .is_some_and(|next| e.event_id < next)
        {
            stats.duplicates.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        // One router lock per event, for the check and the apply alike (decisions wait on
        // it, so not one per message either).
        let Ok(mut r) = router.lock() else { return };
        // A rank outside discovery is counted and dropped by the router, and never
        // tracked here (the sequencer would grow with whatever ids a publisher sends).
        if !r.is_target(e.source) {
            r.apply_event(&e);
            continue;
        }
        // A restart nobody announced (a new publisher for the rank, its ids back): the old
        // process's blocks go, and this event is the new process's first.
        let publisher = decoded.publisher.map(|p| p.id);
        if let Some(reason) = order
            .incarnations
            .check(e.source, publisher, e.event_id, redelivered)
        {
            tracing::info!(
                worker = e.source.worker.0,
                dp_rank = e.source.dp_rank.0,
                reason = reason.as_str(),
                "KV event publisher restarted; dropping the rank's indexed blocks"
            );
            stats.restart(reason.as_str());
            order.seq.reset(e.source);
            crate::events::clear_rank(&mut r, e.source, e.event_id);
            stats.resyncs.fetch_add(1, Ordering::Relaxed);
        }
        let out = order.seq.offer(e, now);
        crate::events::apply_sequenced_to(&mut r, stats, out);
    }
    stats.apply_lag.observe_published(published);
}

/// Drops what the index holds for `ranks` and lets their event ids start afresh.
fn resync_ranks(
    router: &Mutex<Router>,
    stats: &EventStats,
    order: &mut EventOrder,
    ranks: &[kvgate_core::WorkerRank],
) {
    let Ok(mut r) = router.lock() else { return };
    for &rank in ranks {
        order.seq.reset(rank);
        order.incarnations.forget(rank);
        if r.is_target(rank) {
            crate::events::clear_rank(&mut r, rank, 0);
            stats.resyncs.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn poll_gaps(router: &Mutex<Router>, stats: &EventStats, order: &mut EventOrder) {
    for out in order.seq.poll_gaps(Instant::now()) {
        apply_sequenced(router, stats, out);
    }
    // Forget the ranks that left discovery.
    if let Ok(r) = router.lock() {
        order.seq.retain(|s| r.is_target(s));
        order.envelopes.retain_ranks(|s| r.is_target(s));
        order.incarnations.retain(|s| r.is_target(s));
    }
}

async fn run_core(
    client: &async_nats::Client,
    router: &Mutex<Router>,
    stats: &EventStats,
    cfg: &NatsEventConfig,
    order: &mut EventOrder,
) {
    // Dynamo 1.6 workers publish on the endpoint subject; kvgate publishers before it on the
    // component subject. Both are read, as one stream of messages.
    let mut subjects = cfg.endpoint_subjects();
    subjects.push(cfg.subject());
    let mut subs = Vec::new();
    for subject in &subjects {
        let sub = loop {
            match client.subscribe(subject.clone()).await {
                Ok(s) => break s,
                Err(e) => {
                    tracing::warn!(%subject, error = %e, "cannot subscribe; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        subs.push(sub);
    }
    let mut sub = futures::stream::select_all(subs);
    let subject = subjects.join(", ");
    tracing::info!(%subject, "reading KV events (core NATS)");
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            msg = sub.next() => match msg {
                Some(m) => handle(router, stats, order, &m.payload, false, None),
                None => return,
            },
            _ = tick.tick() => poll_gaps(router, stats, order),
        }
    }
}

/// Restores the index from the snapshot, if there is a good one; returns the stream sequence
/// to resume after. A missing snapshot is a cold start; an unreadable, damaged or foreign one is
/// logged, counted and ignored (the index is rebuilt from the stream).
async fn restore(
    js: &jetstream::Context,
    router: &Mutex<Router>,
    stats: &EventStats,
    order: &mut EventOrder,
    target: &SnapshotTarget,
    stream: &str,
) -> Option<u64> {
    let t0 = Instant::now();
    let mut attempt = 0;
    let bytes = loop {
        attempt += 1;
        match crate::snapshot::load(Some(js), target).await {
            Ok(Some(b)) => break b,
            Ok(None) => {
                tracing::info!(%target, "no index snapshot yet; reading the whole stream");
                return None;
            }
            // A read can race a replica replacing the object, or NATS can be slow: retry.
            Err(e) if attempt < 3 => {
                tracing::debug!(%target, error = %e, "index snapshot read failed; retrying");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(e) => {
                tracing::warn!(%target, error = %e, "cannot read the index snapshot; rebuilding from the stream");
                stats.snapshots_discarded.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        }
    };
    let fetched = t0.elapsed().as_secs_f64();
    let len = bytes.len();
    let restored = {
        let Ok(mut r) = router.lock() else {
            return None;
        };
        crate::snapshot::restore_router(&mut r, &bytes, stream)
    };
    drop(bytes);
    let restored = match restored {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(%target, error = %e, "index snapshot ignored; rebuilding from the stream");
            stats.snapshots_discarded.fetch_add(1, Ordering::Relaxed);
            return None;
        }
    };
    order
        .incarnations
        .import(restored.incarnations.iter().copied());
    let secs = t0.elapsed().as_secs_f64();
    if let Ok(mut m) = stats.restore_seconds.lock() {
        *m = Some(secs);
    }
    stats
        .restored_events
        .store(restored.events, Ordering::Relaxed);
    stats.snapshot_bytes.store(len as u64, Ordering::Relaxed);
    tracing::info!(
        %target,
        events = restored.events,
        bytes = len,
        seconds = secs,
        fetch_seconds = fetched,
        stream_sequence = restored.stream_sequence,
        "index restored from snapshot"
    );
    Some(restored.stream_sequence)
}

async fn run_jetstream(
    client: &async_nats::Client,
    router: &Mutex<Router>,
    stats: &Arc<EventStats>,
    cfg: &NatsEventConfig,
    order: &mut EventOrder,
) {
    let js = jetstream::new(client.clone());
    let mut fresh_start = true;
    let mut resume_after = match &cfg.snapshot {
        Some(target) => restore(&js, router, stats, order, target, &cfg.stream()).await,
        None => None,
    };
    let mut last_applied = resume_after.unwrap_or(0);
    let mut backoff = Duration::from_millis(200);
    loop {
        match jetstream_session(
            &js,
            router,
            stats,
            cfg,
            order,
            fresh_start.then_some(resume_after),
            &mut last_applied,
        )
        .await
        {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(error = %e, "JetStream KV event consumer interrupted; retrying");
            }
        }
        // Only the first session starts from the beginning; later ones resume at the ack point.
        if stats.events.load(Ordering::Relaxed) > 0 || stats.batches.load(Ordering::Relaxed) > 0 {
            fresh_start = false;
            resume_after = None;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

async fn jetstream_session(
    js: &jetstream::Context,
    router: &Mutex<Router>,
    stats: &Arc<EventStats>,
    cfg: &NatsEventConfig,
    order: &mut EventOrder,
    // Some: a new process (Some(Some(s)): its index was restored up to stream sequence s).
    fresh_start: Option<Option<u64>>,
    last_applied: &mut u64,
) -> Result<(), String> {
    let mut stream = ensure_stream(js, cfg).await?;
    let mut fresh_start = fresh_start;
    if let Some(Some(s)) = fresh_start {
        // The snapshot only holds if the stream still has everything after it.
        let info = stream
            .info()
            .await
            .map_err(|e| format!("stream info: {e}"))?;
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        let continues = first <= s + 1 && s <= last;
        if !continues {
            tracing::warn!(
                snapshot_sequence = s,
                first,
                last,
                "the KV event stream no longer continues the index snapshot; rebuilding from the stream"
            );
            if let Ok(mut r) = router.lock() {
                for w in r.index().workers() {
                    crate::events::clear_rank(&mut r, w, 0);
                }
            }
            // The stream is read from its start: what the snapshot knew of publishers and
            // event ids would take the old events for restarts.
            order.incarnations.clear();
            *last_applied = 0;
            fresh_start = Some(None);
        }
    }
    let deliver_policy = match fresh_start {
        Some(Some(s)) => jetstream::consumer::DeliverPolicy::ByStartSequence {
            start_sequence: s + 1,
        },
        _ => jetstream::consumer::DeliverPolicy::All,
    };
    if fresh_start.is_some() {
        // A new process starts over (from the snapshot's sequence or the stream's start); an
        // old consumer would resume at the previous process's ack point instead.
        match stream.delete_consumer(&cfg.consumer).await {
            Ok(_) => tracing::info!(consumer = %cfg.consumer, "previous consumer replaced"),
            Err(e) if e.to_string().to_ascii_lowercase().contains("not found") => {}
            Err(e) => return Err(format!("cannot replace consumer {}: {e}", cfg.consumer)),
        }
    }
    let consumer: jetstream::consumer::PullConsumer = stream
        .get_or_create_consumer(
            &cfg.consumer,
            jetstream::consumer::pull::Config {
                durable_name: Some(cfg.consumer.clone()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                deliver_policy,
                inactive_threshold: Duration::from_secs(3600),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| format!("consumer {}: {e}", cfg.consumer))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| format!("consumer {}: {e}", cfg.consumer))?;
    tracing::info!(stream = %cfg.stream(), consumer = %cfg.consumer, "reading KV events (JetStream)");
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut snap_tick = tokio::time::interval(cfg.snapshot_every.max(Duration::from_millis(100)));
    let mut snapped = *last_applied;
    // One write at a time, in the background: reading events goes on during an upload.
    let mut writing: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        tokio::select! {
            _ = snap_tick.tick() => {
                // Not while events wait for missing ones: the snapshot's sequence would cover
                // messages whose events it does not hold.
                if let Some(target) = &cfg.snapshot
                    && *last_applied != snapped
                    && !order.seq.holding()
                    && writing.as_ref().is_none_or(|w| w.is_finished())
                {
                    let incarnations = order.incarnations.export();
                    let bytes = match router.lock() {
                        Ok(r) => crate::snapshot::encode_router(&r, &cfg.stream(), *last_applied, &incarnations),
                        Err(_) => continue,
                    };
                    // The stored snapshot was unusable: replace it whatever sequence it claims.
                    let force = stats.snapshots_discarded.load(Ordering::Relaxed) > 0
                        && stats.snapshots_written.load(Ordering::Relaxed) == 0;
                    writing = Some(spawn_write(js.clone(), stats.clone(), target.clone(), cfg.stream(), *last_applied, bytes, force));
                    snapped = *last_applied;
                }
            }
            msg = messages.next() => match msg {
                Some(Ok(m)) => {
                    let info = m.info().ok().map(|i| {
                        let stored = i.published.unix_timestamp_nanos() as f64 / 1e9;
                        (i.stream_sequence, i.delivered, stored)
                    });
                    let redelivered = info.is_some_and(|(_, d, _)| d > 1);
                    handle(router, stats, order, &m.payload, redelivered, info.map(|i| i.2));
                    if let Some((stream_sequence, _, _)) = info {
                        *last_applied = (*last_applied).max(stream_sequence);
                    }
                    if let Err(e) = m.ack().await {
                        tracing::debug!(error = %e, "ack failed (will be redelivered)");
                    }
                }
                Some(Err(e)) => {
                    // Missed heartbeats while the server is away: the stream recovers by itself.
                    tracing::debug!(error = %e, "JetStream consumer");
                }
                None => return Err("message stream ended".into()),
            },
            _ = tick.tick() => poll_gaps(router, stats, order),
        }
    }
}

/// Writes one snapshot in the background, counting the outcome.
fn spawn_write(
    js: jetstream::Context,
    stats: Arc<EventStats>,
    target: SnapshotTarget,
    stream: String,
    stream_sequence: u64,
    bytes: Vec<u8>,
    force: bool,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let len = bytes.len() as u64;
        let t0 = Instant::now();
        match crate::snapshot::store(Some(&js), &target, &stream, stream_sequence, bytes, force)
            .await
        {
            Ok(crate::snapshot::Stored::Written) => {
                stats.snapshots_written.fetch_add(1, Ordering::Relaxed);
                stats.snapshot_bytes.store(len, Ordering::Relaxed);
                tracing::debug!(%target, bytes = len, stream_sequence, seconds = t0.elapsed().as_secs_f64(), "index snapshot written");
            }
            Ok(crate::snapshot::Stored::AlreadyNewer) => {
                tracing::debug!(%target, stream_sequence, "index snapshot not written: the stored one is as new");
            }
            Err(e) => {
                stats.snapshot_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%target, error = %e, "cannot write the index snapshot");
            }
        }
    })
}
