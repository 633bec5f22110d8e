//! The live worker set: the workers file, reloaded when it changes.

use kvgate_wire::workers::{WorkerEntry, WorkersFile};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

#[derive(Clone)]
pub struct WorkerSet {
    inner: Arc<RwLock<Snapshot>>,
}

/// One version of the worker list, with its entries indexed by instance id and by endpoint
/// (lookups per request must not scan a fleet of thousands).
#[derive(Clone)]
struct Snapshot {
    file: Arc<WorkersFile>,
    by_id: Arc<HashMap<u64, usize>>,
    /// `host:port` to the first entry serving it (several workers may share one endpoint).
    by_endpoint: Arc<HashMap<String, usize>>,
}

impl Snapshot {
    fn new(file: WorkersFile) -> Self {
        let by_id = file
            .workers
            .iter()
            .enumerate()
            .map(|(i, w)| (w.instance_id().0, i))
            .collect();
        let mut by_endpoint = HashMap::new();
        for (i, w) in file.workers.iter().enumerate() {
            if let Some(hp) = w.host_port() {
                by_endpoint.entry(hp.to_string()).or_insert(i);
            }
        }
        Self {
            file: Arc::new(file),
            by_id: Arc::new(by_id),
            by_endpoint: Arc::new(by_endpoint),
        }
    }
}

impl WorkerSet {
    pub fn new(file: WorkersFile) -> Self {
        Self {
            inner: Arc::new(RwLock::new(Snapshot::new(file))),
        }
    }

    fn snapshot(&self) -> Snapshot {
        match self.inner.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn current(&self) -> Arc<WorkersFile> {
        self.snapshot().file
    }

    pub(crate) fn replace(&self, file: WorkersFile) {
        let snap = Snapshot::new(file);
        let mut g = match self.inner.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        *g = snap;
    }

    pub fn by_instance_id(&self, id: u64) -> Option<WorkerEntry> {
        self.with_instance(id, Clone::clone)
    }

    /// The first entry (in file order) whose endpoint is `host_port`.
    pub fn by_endpoint(&self, host_port: &str) -> Option<WorkerEntry> {
        let snap = self.snapshot();
        snap.by_endpoint
            .get(host_port)
            .and_then(|&i| snap.file.workers.get(i))
            .cloned()
    }

    /// Calls `f` on the entry with instance id `id`, without copying it.
    pub fn with_instance<R>(&self, id: u64, f: impl FnOnce(&WorkerEntry) -> R) -> Option<R> {
        let snap = self.snapshot();
        snap.by_id
            .get(&id)
            .and_then(|&i| snap.file.workers.get(i))
            .map(f)
    }

    /// Polls `path` and calls `on_change(old, new)` after each successful reload. A file that
    /// fails to parse is reported and ignored (the last good set stays). Watching stops when
    /// `on_change` returns false.
    pub fn watch(
        &self,
        path: PathBuf,
        on_change: impl Fn(&WorkersFile, &WorkersFile) -> bool + Send + 'static,
    ) {
        let set = self.clone();
        tokio::spawn(async move {
            let mtime = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
            let mut last: Option<SystemTime> = mtime(&path);
            let mut last_error: Option<String> = None;
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let now = mtime(&path);
                if now == last {
                    continue;
                }
                match WorkersFile::load(&path) {
                    Ok(new) => {
                        let old = set.current();
                        if new.block_size != old.block_size || new.model != old.model {
                            tracing::error!(
                                "workers file: model and block_size cannot change at runtime; restart to apply"
                            );
                            last = now;
                            continue;
                        }
                        last = now;
                        last_error = None;
                        tracing::info!(workers = new.workers.len(), "workers file reloaded");
                        set.replace(new.clone());
                        if !on_change(&old, &new) {
                            // Nobody listens any more.
                            return;
                        }
                    }
                    // Not marked as seen: a half-written file is retried until it parses.
                    Err(e) => {
                        let msg = e.to_string();
                        if last_error.as_deref() != Some(msg.as_str()) {
                            tracing::error!(error = %msg, "workers file reload failed; keeping the previous one");
                            last_error = Some(msg);
                        }
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(workers: &str) -> WorkersFile {
        WorkersFile::parse(&format!("model: m\nblock_size: 16\nworkers:\n{workers}"))
            .unwrap_or_else(|e| panic!("workers file: {e}"))
    }

    #[test]
    fn endpoints_map_to_the_first_entry_serving_them_and_follow_reloads() {
        let set = WorkerSet::new(file(
            "  - {name: a, url: \"http://10.0.0.1:8000\"}\n  - {name: b, url: \"http://10.0.0.2:8000/v1\"}\n  - {name: c, url: \"http://10.0.0.1:8000\"}\n",
        ));
        let name = |hp: &str| set.by_endpoint(hp).map(|w| w.name);
        assert_eq!(name("10.0.0.1:8000").as_deref(), Some("a"));
        assert_eq!(name("10.0.0.2:8000").as_deref(), Some("b"));
        assert_eq!(name("10.0.0.3:8000"), None);
        assert_eq!(name("10.0.0.1"), None);
        set.replace(file("  - {name: c, url: \"http://10.0.0.1:8000\"}\n"));
        assert_eq!(name("10.0.0.1:8000").as_deref(), Some("c"));
        assert_eq!(name("10.0.0.2:8000"), None);
    }
}
