//! The live worker set: the workers file, reloaded when it changes.

use kvgate_wire::workers::{WorkerEntry, WorkersFile};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

#[derive(Clone)]
pub struct WorkerSet {
    inner: Arc<RwLock<Arc<WorkersFile>>>,
}

impl WorkerSet {
    pub fn new(file: WorkersFile) -> Self {
        Self {
            inner: Arc::new(RwLock::new(Arc::new(file))),
        }
    }

    pub fn current(&self) -> Arc<WorkersFile> {
        match self.inner.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub(crate) fn replace(&self, file: WorkersFile) {
        let mut g = match self.inner.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        *g = Arc::new(file);
    }

    pub fn by_instance_id(&self, id: u64) -> Option<WorkerEntry> {
        self.current()
            .workers
            .iter()
            .find(|w| w.instance_id().0 == id)
            .cloned()
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
