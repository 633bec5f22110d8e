//! Runs one [`Engine`] (one dp rank) in real time: a task that steps the engine, sleeps for each
//! forward pass (divided by the speed-up ratio), hands tokens to the requests' streams, and
//! passes KV events to the publisher seam.

use crate::publisher::EventSink;
use kvgate_engine::{Engine, EngineRequest, EngineStats, SubmitError, TokenOutput};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

enum Command {
    Submit(
        EngineRequest,
        mpsc::UnboundedSender<TokenOutput>,
        oneshot::Sender<Result<(), SubmitError>>,
    ),
    Abort(u64),
    /// The engine hashes of every cached block, sorted.
    Dump(oneshot::Sender<Vec<u64>>),
}

/// A handle on one running engine.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::UnboundedSender<Command>,
    stats: Arc<Mutex<EngineStats>>,
    pub rank: u32,
}

impl EngineHandle {
    /// Starts the engine task on the current runtime.
    pub fn spawn(engine: Engine, rank: u32, speedup: f64, sink: Arc<dyn EventSink>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(Mutex::new(engine.stats()));
        tokio::spawn(run(
            engine,
            rank,
            speedup.max(1e-3),
            sink,
            rx,
            stats.clone(),
        ));
        Self { tx, stats, rank }
    }

    /// Queues a request; tokens arrive on the returned stream, the last one `finished`.
    pub async fn submit(
        &self,
        req: EngineRequest,
    ) -> Result<mpsc::UnboundedReceiver<TokenOutput>, SubmitError> {
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (ack_tx, ack_rx) = oneshot::channel();
        if self.tx.send(Command::Submit(req, out_tx, ack_tx)).is_err() {
            return Err(SubmitError::EngineGone);
        }
        match ack_rx.await {
            Ok(Ok(())) => Ok(out_rx),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(SubmitError::EngineGone),
        }
    }

    pub fn abort(&self, id: u64) {
        let _ = self.tx.send(Command::Abort(id));
    }

    /// The engine hashes of the blocks this rank caches now (what its KV events announced).
    pub async fn dump(&self) -> Option<Vec<u64>> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Command::Dump(tx)).ok()?;
        rx.await.ok()
    }

    pub fn stats(&self) -> EngineStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }
}

async fn run(
    mut engine: Engine,
    rank: u32,
    speedup: f64,
    sink: Arc<dyn EventSink>,
    mut rx: mpsc::UnboundedReceiver<Command>,
    stats: Arc<Mutex<EngineStats>>,
) {
    let mut streams: HashMap<u64, mpsc::UnboundedSender<TokenOutput>> = HashMap::new();
    let mut deadline = Instant::now();
    let handle = |cmd: Command,
                  engine: &mut Engine,
                  streams: &mut HashMap<u64, mpsc::UnboundedSender<TokenOutput>>| {
        match cmd {
            Command::Submit(req, out, ack) => {
                let id = req.id;
                let r = engine.submit(req);
                if r.is_ok() {
                    streams.insert(id, out);
                }
                let _ = ack.send(r);
            }
            Command::Abort(id) => {
                engine.abort(id);
                streams.remove(&id);
            }
            Command::Dump(reply) => {
                let mut blocks: Vec<u64> = engine
                    .pool()
                    .cached_seqs()
                    .map(|s| kvgate_engine::pool::engine_hash(s).0)
                    .collect();
                blocks.sort_unstable();
                let _ = reply.send(blocks);
            }
        }
    };
    loop {
        while let Ok(cmd) = rx.try_recv() {
            handle(cmd, &mut engine, &mut streams);
        }
        if engine.is_idle() {
            if let Ok(mut s) = stats.lock() {
                *s = engine.stats();
            }
            match rx.recv().await {
                Some(cmd) => handle(cmd, &mut engine, &mut streams),
                None => return,
            }
            deadline = Instant::now();
            continue;
        }
        let Some(step) = engine.step() else { continue };
        // The forward pass takes its simulated time; its outputs exist at its end.
        deadline += Duration::from_secs_f64(step.duration.as_secs_f64() / speedup);
        let now = Instant::now();
        if deadline < now {
            deadline = now;
        }
        tokio::time::sleep_until(deadline).await;
        if !step.events.is_empty() {
            sink.publish(rank, &step.events);
        }
        for out in step.outputs {
            let gone = match streams.get(&out.id) {
                Some(tx) => tx.send(out).is_err(),
                None => true,
            };
            if out.finished.is_some() {
                streams.remove(&out.id);
            } else if gone {
                // The client went away: stop generating for it.
                engine.abort(out.id);
                streams.remove(&out.id);
            }
        }
        if let Ok(mut s) = stats.lock() {
            *s = engine.stats();
        }
    }
}
