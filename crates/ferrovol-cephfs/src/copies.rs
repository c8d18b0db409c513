//! The copies behind restores and clones, each on a thread of its own so
//! that no gRPC call waits for one: CreateVolume starts a copy (or finds
//! the one running), waits for it a bounded time and answers ABORTED with
//! its progress while it runs; the provisioner's retries find it again.
//!
//! A copy nobody asks about any more (the claim was deleted, and the
//! provisioner stopped retrying) is abandoned after an idle time: stopped,
//! and what it made removed. A restarted driver resumes the copies its
//! predecessor left (see `CephFsEngine::resume_copies`), under the same
//! rule.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use ferrovol_ceph::fs::FsMount;
use ferrovol_cephclient::connect::Login;

use crate::copy::{copy_tree, CopyError, Progress};

/// Threads one copy uses.
pub const WORKERS: usize = 8;

/// How a copy ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Done,
    Failed(String),
    /// Stopped: its volume was deleted, or it was abandoned.
    Stopped,
}

/// What a copy needs to run and, abandoned, to clean up after itself.
pub(crate) struct Spec {
    pub login: Login,
    pub fs: String,
    pub from: String,
    pub to: String,
    /// Removes what the copy made (its subvolume, the clone's snapshot,
    /// the name's claim): run when it is abandoned.
    pub cleanup: Box<dyn FnOnce() + Send>,
}

pub(crate) struct Job {
    pub progress: Progress,
    asked: Mutex<Instant>,
    outcome: Mutex<Option<Outcome>>,
    ended: Condvar,
    abandoned: AtomicBool,
}

impl Job {
    /// Someone still wants this copy.
    fn touch(&self) {
        *self.asked.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
    }

    fn idle(&self) -> Duration {
        self.asked.lock().unwrap_or_else(PoisonError::into_inner).elapsed()
    }

    /// Waits at most `limit` for the copy to end: its outcome once it did.
    pub fn wait(&self, limit: Duration) -> Option<Outcome> {
        let outcome = self.outcome.lock().unwrap_or_else(PoisonError::into_inner);
        let (outcome, _) = self
            .ended
            .wait_timeout_while(outcome, limit, |o| o.is_none())
            .unwrap_or_else(PoisonError::into_inner);
        outcome.clone()
    }

    fn ended(&self) -> bool {
        self.outcome.lock().unwrap_or_else(PoisonError::into_inner).is_some()
    }

    fn end(&self, o: Outcome) {
        *self.outcome.lock().unwrap_or_else(PoisonError::into_inner) = Some(o);
        self.ended.notify_all();
    }
}

pub(crate) struct Copies {
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    abandon_after: Duration,
    mounts: Mutex<HashMap<(String, String), Arc<FsMount>>>,
}

impl Copies {
    pub fn new(abandon_after: Duration) -> Arc<Copies> {
        Arc::new(Copies { jobs: Mutex::default(), abandon_after, mounts: Mutex::default() })
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Job>>> {
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The copy into volume `key`, started with `spec()` unless it runs;
    /// marked as asked for now.
    pub fn ensure(self: &Arc<Self>, key: &str, spec: impl FnOnce() -> Spec) -> Arc<Job> {
        let mut jobs = self.jobs();
        if let Some(job) = jobs.get(key) {
            job.touch();
            return job.clone();
        }
        let job = Arc::new(Job {
            progress: Progress::default(),
            asked: Mutex::new(Instant::now()),
            outcome: Mutex::new(None),
            ended: Condvar::new(),
            abandoned: AtomicBool::new(false),
        });
        jobs.insert(key.to_string(), job.clone());
        drop(jobs);
        let (copies, j, key, spec) = (self.clone(), job.clone(), key.to_string(), spec());
        let started = std::thread::Builder::new()
            .name("cephfs-copy".into())
            .spawn(move || copies.run(&key, &j, spec));
        if let Err(e) = started {
            job.end(Outcome::Failed(format!("cannot start the copy's thread: {e}")));
        }
        job
    }

    /// Forgets an ended copy.
    pub fn forget(&self, key: &str) {
        self.jobs().remove(key);
    }

    /// Stops the copy into `key` if one runs and waits (at most `limit`)
    /// for it to end; forgets it.
    pub fn stop(&self, key: &str, limit: Duration) -> bool {
        let Some(job) = self.jobs().get(key).cloned() else { return true };
        job.progress.stop.store(true, Ordering::Relaxed);
        let ended = job.wait(limit).is_some();
        if ended {
            self.forget(key);
        }
        ended
    }

    /// Whether a copy into `key` runs in this process.
    pub fn is_running(&self, key: &str) -> bool {
        self.jobs().contains_key(key)
    }

    /// (copies running, bytes copied, bytes to copy in all) for metrics.
    pub fn totals(&self) -> (u64, u64, u64) {
        let jobs = self.jobs();
        let running: Vec<_> = jobs.values().filter(|j| !j.ended()).collect();
        let sum = |f: fn(&Progress) -> &std::sync::atomic::AtomicU64| {
            running.iter().map(|j| f(&j.progress).load(Ordering::Relaxed)).sum::<u64>()
        };
        (running.len() as u64, sum(|p| &p.bytes_done), sum(|p| &p.bytes_total))
    }

    pub fn abandon_after(&self) -> Duration {
        self.abandon_after
    }

    /// One client per file system and credentials for every copy (and the
    /// group snapshots): made once, one at a time.
    pub fn client(&self, login: &Login, fs: &str) -> Result<Arc<FsMount>, String> {
        let mut mounts = self.mounts.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (login.identity(), fs.to_string());
        if let Some(m) = mounts.get(&key) {
            return Ok(m.clone());
        }
        let m = Arc::new(login.mount_fs(fs).map_err(|e| e.message().to_string())?);
        mounts.insert(key, m.clone());
        Ok(m)
    }

    /// Whether `job` is still the copy into `key` (nobody collected it).
    fn holds(&self, key: &str, job: &Arc<Job>) -> bool {
        self.jobs().get(key).is_some_and(|j| Arc::ptr_eq(j, job))
    }

    /// Forgets `job` if nobody collected it meanwhile: whether it did.
    fn take(&self, key: &str, job: &Arc<Job>) -> bool {
        let mut jobs = self.jobs();
        let held = jobs.get(key).is_some_and(|j| Arc::ptr_eq(j, job));
        if held {
            jobs.remove(key);
        }
        held
    }

    fn run(&self, key: &str, job: &Arc<Job>, spec: Spec) {
        let watcher = std::thread::current();
        let idle = || job.idle() > self.abandon_after;
        let result = std::thread::scope(|s| {
            let copy = s.spawn(|| {
                let result = self.client(&spec.login, &spec.fs).and_then(|m| {
                    match copy_tree(&m, &spec.from, &spec.to, WORKERS, &job.progress) {
                        Ok(()) => Ok(()),
                        Err(CopyError::Stopped) => Err(String::new()),
                        Err(CopyError::Ceph(e)) => Err(e.to_string()),
                    }
                });
                watcher.unpark();
                result
            });
            // Nobody asked for a while: the copy is abandoned.
            while !copy.is_finished() {
                if idle() {
                    job.abandoned.store(true, Ordering::Relaxed);
                    job.progress.stop.store(true, Ordering::Relaxed);
                }
                std::thread::park_timeout(Duration::from_secs(1));
            }
            copy.join().unwrap_or_else(|_| Err("the copy panicked".into()))
        });
        if !job.abandoned.load(Ordering::Relaxed) {
            job.end(match result {
                Ok(()) => Outcome::Done,
                Err(e) if e.is_empty() => Outcome::Stopped,
                Err(e) => Outcome::Failed(e),
            });
            // Ended, but what nobody collects is abandoned all the same.
            while self.holds(key, job) && !idle() {
                std::thread::park_timeout(Duration::from_secs(1));
            }
        }
        if !self.take(key, job) {
            return; // collected (or stopped by a delete)
        }
        tracing::warn!(
            volume = key,
            "a copy nobody asked about for {:?} is abandoned and removed",
            self.abandon_after
        );
        (spec.cleanup)();
        job.end(Outcome::Stopped);
    }
}
