//! The one place that touches sled. Records are JSON in trees: `sessions` (owned by the
//! ledger, with its holds' and settlements' marks), `tasks` (owned by the session queue),
//! `meta` (counters: ids, node payments, the embedded ledger's records), `outbox` and
//! `outbox_delivered` (chain writes), `api_keys` and `standby` (peer routers' tasks). Writers make their
//! writes durable ([`Store::flush`], or [`Store::durable`] without blocking) before they
//! acknowledge anything that must survive a crash.
//!
//! Group commit: [`Store::durable`] hands a waiter to one flusher thread, which flushes once for
//! every waiter that queued up meanwhile. sled's log is ordered, so one flush makes every write
//! made before any of those calls durable.
//!
//! Keys are big-endian so a prefix scan returns a session's tasks in order.

use crate::session::Session;
use crate::task::{TaskKey, TaskRecord};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    #[error("a stored record does not decode ({what}): {source}")]
    Corrupt {
        what: String,
        source: serde_json::Error,
    },
    #[error("cannot open the data directory {path}: {message}")]
    Open { path: String, message: String },
    #[error("cannot make writes durable: {0}")]
    Flush(String),
    #[error("task writes are failing (an injected fault)")]
    Injected,
    #[error("session {0} names a hold or settlement mark that does not decode")]
    CorruptMark(u64),
}

/// Switches for fault-injection tests, off unless a test turns them on: task writes that
/// fail (only the task tree: the ledger's writes fail with the chain's own faults), and a slow
/// disk (each acknowledged flush answers its waiters that much later).
#[derive(Clone, Default)]
pub struct WriteFaults {
    failing: Arc<AtomicBool>,
    flush_delay_ms: Arc<AtomicU64>,
}

impl WriteFaults {
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }
    pub fn failing(&self) -> bool {
        self.failing.load(Ordering::SeqCst)
    }
    /// Every flush awaited through [`Store::durable`] from now on answers `delay` late (zero:
    /// the disk's own speed again).
    pub fn set_flush_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.flush_delay_ms.store(ms, Ordering::SeqCst);
    }
    pub fn flush_delay(&self) -> Duration {
        Duration::from_millis(self.flush_delay_ms.load(Ordering::SeqCst))
    }
}

/// Tries at taking the database's lock, and the pause between them (2 s in all).
pub const OPEN_LOCK_ATTEMPTS: u32 = 40;
pub const OPEN_LOCK_PAUSE: Duration = Duration::from_millis(50);

/// A handle on the database; clones share it (sled keeps one `Db` per process).
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    sessions: sled::Tree,
    tasks: sled::Tree,
    meta: sled::Tree,
    outbox: sled::Tree,
    /// Clients' API keys by the SHA-256 of the key (`api::keys`).
    api_keys: sled::Tree,
    /// Outbox entries the chain took, kept until a later check finds them still there.
    delivered: sled::Tree,
    /// Tasks a peer router accepted and has not ended: run here if that router dies.
    standby: sled::Tree,
    flusher: Arc<Flusher>,
    write_faults: WriteFaults,
}

type FlushWaiter = tokio::sync::oneshot::Sender<Result<(), String>>;

/// The flusher thread; the last `Store` clone to go joins it, so the database is closed (and
/// its lock released) when the last handle is dropped.
struct Flusher {
    waiters: Option<std::sync::mpsc::Sender<FlushWaiter>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.waiters.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Flushes once per batch of waiters; ends when every `Store` clone is gone.
fn flusher_thread(db: sled::Db, waiters: std::sync::mpsc::Receiver<FlushWaiter>) {
    while let Ok(first) = waiters.recv() {
        let mut batch = vec![first];
        batch.extend(waiters.try_iter());
        let result = db.flush().map(|_| ()).map_err(|e| e.to_string());
        for w in batch {
            let _ = w.send(result.clone());
        }
    }
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
            path: dir.display().to_string(),
            message: e.to_string(),
        })?;
        // A database closed a moment ago in this process may still be locked by sled's own
        // background flusher, which lets go on its next wake-up: wait for it, boundedly.
        let mut attempt = 0;
        let db = loop {
            match sled::Config::new().path(dir.join("sled")).open() {
                Ok(db) => break db,
                Err(sled::Error::Io(e))
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        && attempt < OPEN_LOCK_ATTEMPTS =>
                {
                    attempt += 1;
                    std::thread::sleep(OPEN_LOCK_PAUSE);
                }
                Err(e) => {
                    return Err(StoreError::Open {
                        path: dir.display().to_string(),
                        message: e.to_string(),
                    })
                }
            }
        };
        Self::from_db(db)
    }

    /// A database that lives in memory and disappears when dropped (benchmarks).
    pub fn temporary() -> Result<Self, StoreError> {
        Self::from_db(sled::Config::new().temporary(true).open()?)
    }

    fn from_db(db: sled::Db) -> Result<Self, StoreError> {
        let (sender, waiters) = std::sync::mpsc::channel();
        let flusher_db = db.clone();
        let thread = std::thread::Builder::new()
            .name("store-flusher".into())
            .spawn(move || flusher_thread(flusher_db, waiters))
            .map_err(|e| StoreError::Open {
                path: "flusher thread".into(),
                message: e.to_string(),
            })?;
        let flusher = Arc::new(Flusher {
            waiters: Some(sender),
            thread: Some(thread),
        });
        let store = Self {
            sessions: db.open_tree("sessions")?,
            tasks: db.open_tree("tasks")?,
            meta: db.open_tree("meta")?,
            outbox: db.open_tree("outbox")?,
            api_keys: db.open_tree("api_keys")?,
            delivered: db.open_tree("outbox_delivered")?,
            standby: db.open_tree("standby")?,
            db,
            flusher,
            write_faults: WriteFaults::default(),
        };
        store.finish_interrupted_marks()?;
        store.finish_interrupted_payments()?;
        Ok(store)
    }

    /// Task writes fail, and flushes answer late, while `faults` says so (fault-injection
    /// tests).
    pub fn with_write_faults(mut self, faults: WriteFaults) -> Self {
        self.write_faults = faults;
        self
    }

    /// Resolves once every write made before this call is on disk, without blocking the
    /// caller's thread; concurrent callers share one flush. (With a slow disk injected, it
    /// resolves that much later; it must then be awaited on a tokio runtime, as actors are.)
    pub fn durable(&self) -> impl std::future::Future<Output = Result<(), StoreError>> + 'static {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sent = match &self.flusher.waiters {
            Some(waiters) => waiters.send(tx).map_err(|_| ()),
            None => Err(()),
        };
        let injected_delay = self.write_faults.flush_delay();
        async move {
            sent.map_err(|_| StoreError::Flush("the flusher thread stopped".into()))?;
            let result = match rx.await {
                Ok(result) => result.map_err(StoreError::Flush),
                Err(_) => Err(StoreError::Flush("the flusher thread stopped".into())),
            };
            if !injected_delay.is_zero() {
                tokio::time::sleep(injected_delay).await;
            }
            result
        }
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// The next value of a named counter (1, 2, ...), atomically.
    pub fn next_id(&self, counter: &str) -> Result<u64, StoreError> {
        let value = self.meta.update_and_fetch(counter.as_bytes(), |old| {
            let n = old
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            Some((n + 1).to_be_bytes().to_vec())
        })?;
        let bytes = value.expect("update_and_fetch returned the stored value");
        Ok(u64::from_be_bytes(
            <[u8; 8]>::try_from(&bytes[..]).unwrap_or([0; 8]),
        ))
    }

    pub fn put_session(&self, session: &Session) -> Result<(), StoreError> {
        put(&self.sessions, &session.id.to_be_bytes(), session)
    }

    pub fn session(&self, id: u64) -> Result<Option<Session>, StoreError> {
        get(&self.sessions, &id.to_be_bytes(), "session")
    }

    pub fn sessions(&self) -> Result<Vec<Session>, StoreError> {
        scan(self.session_records(), "session")
    }

    /// The session records alone, in order of id. A session's key is its id (8 bytes); its
    /// tasks' marks follow it under longer keys, and are stepped over without being read.
    fn session_records(&self) -> impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>> + '_ {
        let mut from = Some(0u64);
        std::iter::from_fn(move || {
            let start = from?;
            let found = self
                .sessions
                .range(start.to_be_bytes()..)
                .find(|item| item.as_ref().map_or(true, |(k, _)| k.len() == 8));
            from = match &found {
                Some(Ok((k, _))) => id_of_session_key(k).checked_add(1),
                _ => None,
            };
            found
        })
    }

    pub fn put_api_key<T: Serialize>(&self, hash: &str, entry: &T) -> Result<(), StoreError> {
        put(&self.api_keys, hash.as_bytes(), entry)
    }

    /// Every stored API key entry, with its hash.
    pub fn api_keys<T: DeserializeOwned>(&self) -> Result<Vec<(String, T)>, StoreError> {
        self.api_keys
            .iter()
            .map(|item| {
                let (k, v) = item?;
                let entry = serde_json::from_slice(&v).map_err(|source| StoreError::Corrupt {
                    what: "api key".into(),
                    source,
                })?;
                Ok((String::from_utf8_lossy(&k).into_owned(), entry))
            })
            .collect()
    }

    pub fn put_task(&self, task: &TaskRecord) -> Result<(), StoreError> {
        if self.write_faults.failing() {
            return Err(StoreError::Injected);
        }
        put(&self.tasks, &task_key_bytes(task.key), task)
    }

    pub fn task(&self, key: TaskKey) -> Result<Option<TaskRecord>, StoreError> {
        get(&self.tasks, &task_key_bytes(key), "task")
    }

    /// Keeps a copy of a task a peer router accepted.
    /// Keeps a peer's task; whether it is new here.
    pub fn put_standby(&self, task: &TaskRecord) -> Result<bool, StoreError> {
        let key = task_key_bytes(task.key);
        let new = !self.standby.contains_key(key)?;
        put(&self.standby, &key, task)?;
        Ok(new)
    }

    /// Forgets a peer's task; whether it was kept.
    pub fn remove_standby(&self, key: TaskKey) -> Result<bool, StoreError> {
        Ok(self.standby.remove(task_key_bytes(key))?.is_some())
    }

    /// How many peers' tasks are kept.
    pub fn standby_count(&self) -> usize {
        self.standby.len()
    }

    /// The peers' tasks kept here, in key order.
    pub fn standby_tasks(&self) -> Result<Vec<TaskRecord>, StoreError> {
        self.standby
            .iter()
            .values()
            .map(|v| {
                serde_json::from_slice(&v?).map_err(|source| StoreError::Corrupt {
                    what: "standby task".into(),
                    source,
                })
            })
            .collect()
    }

    /// A session's tasks in id order, at most `limit`, starting after task `after`.
    pub fn session_tasks(
        &self,
        session_id: u64,
        after: u64,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        let start = task_key_bytes(TaskKey {
            session_id,
            task_id: after.saturating_add(1),
        });
        let end = task_key_bytes(TaskKey {
            session_id,
            task_id: u64::MAX,
        });
        scan(self.tasks.range(start..=end).take(limit), "task")
    }

    /// A task's mark of `kind` (the embedded ledger's holds and settlements), kept in the
    /// sessions tree next to its session.
    pub fn task_mark(&self, task: TaskKey, kind: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.sessions.get(mark_key(task, kind))?.map(|v| v.to_vec()))
    }

    /// Writes a task's mark unless it is there; `false` if it was.
    pub fn put_task_mark_once(
        &self,
        task: TaskKey,
        kind: &str,
        value: &[u8],
    ) -> Result<bool, StoreError> {
        Ok(self
            .sessions
            .compare_and_swap(mark_key(task, kind), None as Option<&[u8]>, Some(value))?
            .is_ok())
    }

    /// Writes a session and a task's mark (a crash between the two is finished when the store
    /// is opened again), unless the mark is already there (then nothing changes and `false`
    /// comes back). Holds and settlements use it to happen once. Callers serialize their writes to one session (the ledger is one
    /// actor).
    ///
    /// Two plain writes rather than a sled batch: every batch seals sled's log buffer twice
    /// (two more disk writes), which cost about a third of `bench orchestrate`'s throughput.
    /// The session goes first and names the mark; the mark follows. sled recovers a prefix of
    /// its log, so a crash between the two leaves a session naming a missing mark, which
    /// [`Store::open`] writes before anyone reads ([`Store::finish_interrupted_marks`]).
    pub fn put_session_with_mark_once(
        &self,
        session: &Session,
        task: TaskKey,
        kind: &str,
        value: &[u8],
    ) -> Result<bool, StoreError> {
        // A settlement with nothing to pay writes exactly this: the session, then the mark.
        self.put_settlement_once(session, task, kind, value, &[])
    }

    /// A settlement, once: like [`Store::put_session_with_mark_once`], and then its payments
    /// (amounts added to counters such as a node's `pay/{node}`), so that a crash anywhere in
    /// it loses no payment and repeats none. `false` (and no change) if the mark is there.
    ///
    /// The writes, in order: the payments to be made (one record, overwritten by the next
    /// settlement that pays anyone), the session naming the mark, the mark, then each payment,
    /// each counter tagged with the task that last added to it. sled recovers a prefix of its
    /// log, so when [`Store::open`] finds the record naming a settled task, no later settlement
    /// has paid anyone, and a payee whose counter is not tagged with that task was not paid
    /// yet ([`Store::finish_interrupted_payments`]). A payee named twice is paid the sum once.
    pub fn put_settlement_once(
        &self,
        session: &Session,
        task: TaskKey,
        kind: &str,
        value: &[u8],
        payments: &[(String, u64)],
    ) -> Result<bool, StoreError> {
        let mark = mark_key(task, kind);
        if self.sessions.contains_key(&mark)? {
            return Ok(false);
        }
        let payments = merged_payments(payments);
        if !payments.is_empty() {
            let record = PaymentsInProgress {
                task,
                kind: kind.to_string(),
                payments: payments.clone(),
            };
            put(&self.meta, PAYMENTS_IN_PROGRESS, &record)?;
        }
        self.put_session_naming_mark(session, &mark, value)?;
        self.sessions.insert(mark, value)?;
        for (name, amount) in &payments {
            self.add_payment(name, *amount, task)?;
        }
        Ok(true)
    }

    /// Adds a settlement's payment to the counter `name`, tagging it with the task.
    fn add_payment(&self, name: &str, amount: u64, task: TaskKey) -> Result<(), StoreError> {
        let tag = task_key_bytes(task);
        self.meta.update_and_fetch(name.as_bytes(), |old| {
            Some(counter_value(amount_of(old).saturating_add(amount), &tag))
        })?;
        Ok(())
    }

    /// Pays what the last settlement had not paid when a crash came (see
    /// [`Store::put_settlement_once`]). Runs after [`Store::finish_interrupted_marks`]: a
    /// settlement whose mark is still missing never happened, and pays nothing.
    fn finish_interrupted_payments(&self) -> Result<(), StoreError> {
        let Some(last): Option<PaymentsInProgress> =
            get(&self.meta, PAYMENTS_IN_PROGRESS, "payments in progress")?
        else {
            return Ok(());
        };
        if !self
            .sessions
            .contains_key(mark_key(last.task, &last.kind))?
        {
            return Ok(());
        }
        let tag = task_key_bytes(last.task);
        let mut finished = false;
        for (name, amount) in &last.payments {
            let counter = self.meta.get(name.as_bytes())?;
            if tag_of(counter.as_deref()) != tag {
                tracing::warn!(task = %last.task, payee = %name, "finishing a payment a crash interrupted");
                self.add_payment(name, *amount, last.task)?;
                finished = true;
            }
        }
        if finished {
            self.flush()?;
        }
        Ok(())
    }

    /// The first half of [`Store::put_session_with_mark_once`]: the session, naming the mark
    /// that is to follow it.
    fn put_session_naming_mark(
        &self,
        session: &Session,
        mark: &[u8],
        value: &[u8],
    ) -> Result<(), StoreError> {
        let record = SessionNamingMark {
            session,
            mark: Some(NamedMark {
                key: hex::encode(mark),
                value: hex::encode(value),
            }),
        };
        put(&self.sessions, &session.id.to_be_bytes(), &record)
    }

    /// Writes every mark a session names that is missing: a crash came between the session
    /// and its mark. Reads only the session records.
    fn finish_interrupted_marks(&self) -> Result<(), StoreError> {
        let mut finished = false;
        for item in self.session_records() {
            let (key, bytes) = item?;
            let named: MarkOfSession =
                serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
                    what: "session".into(),
                    source,
                })?;
            let Some(mark) = named.mark else { continue };
            let (Ok(mark_key), Ok(value)) = (hex::decode(&mark.key), hex::decode(&mark.value))
            else {
                return Err(StoreError::CorruptMark(id_of_session_key(&key)));
            };
            if !self.sessions.contains_key(&mark_key)? {
                tracing::warn!(
                    session = id_of_session_key(&key),
                    "finishing a hold or settlement a crash interrupted"
                );
                self.sessions.insert(mark_key, value)?;
                finished = true;
            }
        }
        if finished {
            self.flush()?;
        }
        Ok(())
    }

    /// Adds to an amount kept under `name` in the counters tree (clients' key quotas; node
    /// payments go through [`Store::put_settlement_once`]).
    pub fn add_amount(&self, name: &str, amount: u64) -> Result<u64, StoreError> {
        let value = self.meta.update_and_fetch(name.as_bytes(), |old| {
            Some(counter_value(
                amount_of(old).saturating_add(amount),
                tag_of(old),
            ))
        })?;
        Ok(amount_of(value.as_deref()))
    }

    /// Adds `amount` to the counter `name` only if the sum stays within `limit`, atomically
    /// (two requests cannot both take the last of a key's credit or quota): the sum after, or
    /// `None` when it would pass the limit (the counter then stays as it was).
    pub fn add_amount_within(
        &self,
        name: &str,
        amount: u64,
        limit: u64,
    ) -> Result<Option<u64>, StoreError> {
        let mut taken = None;
        self.meta.update_and_fetch(name.as_bytes(), |old| {
            let before = amount_of(old);
            match before.checked_add(amount).filter(|after| *after <= limit) {
                Some(after) => {
                    taken = Some(after);
                    Some(counter_value(after, tag_of(old)))
                }
                None => {
                    taken = None;
                    old.map(<[u8]>::to_vec)
                }
            }
        })?;
        Ok(taken)
    }

    /// Takes `amount` back off the counter `name` (at most down to zero): what
    /// [`Store::add_amount_within`] took for something that was then not accepted.
    pub fn sub_amount(&self, name: &str, amount: u64) -> Result<u64, StoreError> {
        let value = self.meta.update_and_fetch(name.as_bytes(), |old| {
            Some(counter_value(
                amount_of(old).saturating_sub(amount),
                tag_of(old),
            ))
        })?;
        Ok(amount_of(value.as_deref()))
    }

    pub fn amount(&self, name: &str) -> Result<u64, StoreError> {
        Ok(amount_of(self.meta.get(name.as_bytes())?.as_deref()))
    }

    /// Moves the whole amount kept under `from` onto each of `to`, in one transaction; what
    /// was moved comes back (node withdrawals: onto the node's and the overall total). The
    /// counters keep their tags (see [`Store::put_settlement_once`]).
    pub fn move_amount(&self, from: &str, to: &[&str]) -> Result<u64, StoreError> {
        self.meta
            .transaction(|meta| {
                let old = meta.get(from.as_bytes())?;
                let amount = amount_of(old.as_deref());
                meta.insert(from.as_bytes(), counter_value(0, tag_of(old.as_deref())))?;
                for name in to {
                    let old = meta.get(name.as_bytes())?;
                    let total = amount_of(old.as_deref()).saturating_add(amount);
                    let value = counter_value(total, tag_of(old.as_deref()));
                    meta.insert(name.as_bytes(), value)?;
                }
                Ok(amount)
            })
            .map_err(transaction_error)
    }

    /// A named record of the chain's own (the embedded ledger's per-stage task records).
    pub fn put_chain_record<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StoreError> {
        put(&self.meta, name.as_bytes(), value)
    }

    pub fn chain_record<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, StoreError> {
        get(&self.meta, name.as_bytes(), name)
    }

    /// Appends a chain write to the outbox unless `marker` says it was appended before (then
    /// `false` comes back and nothing changes); durable with the next flush.
    pub fn outbox_push_once<T: Serialize>(
        &self,
        marker: &str,
        item: &T,
    ) -> Result<bool, StoreError> {
        use sled::Transactional;
        let seq = self.next_id("outbox_seq")?.to_be_bytes();
        let bytes = serde_json::to_vec(item).expect("records always serialize");
        (&self.outbox, &self.meta)
            .transaction(|(outbox, meta)| {
                if meta.get(marker.as_bytes())?.is_some() {
                    return Ok(false);
                }
                meta.insert(marker.as_bytes(), &[1u8][..])?;
                outbox.insert(&seq[..], bytes.clone())?;
                Ok(true)
            })
            .map_err(transaction_error)
    }

    /// The oldest `limit` entries of the outbox, with their sequence numbers.
    pub fn outbox_peek<T: DeserializeOwned>(
        &self,
        limit: usize,
    ) -> Result<Vec<(u64, T)>, StoreError> {
        self.outbox
            .iter()
            .take(limit)
            .map(|item| {
                let (k, v) = item?;
                let seq = u64::from_be_bytes(<[u8; 8]>::try_from(&k[..]).unwrap_or([0; 8]));
                let value = serde_json::from_slice(&v).map_err(|source| StoreError::Corrupt {
                    what: "outbox entry".into(),
                    source,
                })?;
                Ok((seq, value))
            })
            .collect()
    }

    /// Marks entries delivered at `at_ms`: they leave the outbox for the delivered tree, where
    /// they wait for confirmation (see `delivered_due`).
    pub fn outbox_delivered(&self, seqs: &[u64], at_ms: u64) -> Result<(), StoreError> {
        self.move_entries(&self.outbox, &self.delivered, seqs, |v| {
            let mut out = at_ms.to_be_bytes().to_vec();
            out.extend_from_slice(v);
            out
        })
    }

    /// Records a write made directly (not through the outbox) as delivered at `at_ms`, so that
    /// it is confirmed like the outbox's own.
    pub fn record_delivered<T: Serialize>(&self, item: &T, at_ms: u64) -> Result<(), StoreError> {
        let seq = self.next_id("outbox_seq")?;
        let mut value = at_ms.to_be_bytes().to_vec();
        value.extend_from_slice(&serde_json::to_vec(item).expect("records always serialize"));
        self.delivered.insert(seq.to_be_bytes(), value)?;
        Ok(())
    }

    /// The oldest delivered entries, up to `limit`, delivered at or before `before_ms`.
    pub fn delivered_due<T: DeserializeOwned>(
        &self,
        before_ms: u64,
        limit: usize,
    ) -> Result<Vec<(u64, T)>, StoreError> {
        let mut out = Vec::new();
        for item in self.delivered.iter().take(limit) {
            let (k, v) = item?;
            let seq = u64::from_be_bytes(<[u8; 8]>::try_from(&k[..]).unwrap_or([0; 8]));
            let at =
                u64::from_be_bytes(<[u8; 8]>::try_from(&v[..8.min(v.len())]).unwrap_or([0; 8]));
            if at > before_ms {
                break; // entries are in delivery order, so the rest are younger
            }
            let value = serde_json::from_slice(&v[8..]).map_err(|source| StoreError::Corrupt {
                what: "delivered outbox entry".into(),
                source,
            })?;
            out.push((seq, value));
        }
        Ok(out)
    }

    /// Confirmed: the chain still has them.
    pub fn delivered_remove(&self, seqs: &[u64]) -> Result<(), StoreError> {
        for seq in seqs {
            self.delivered.remove(seq.to_be_bytes())?;
        }
        Ok(())
    }

    /// Lost by the chain (a rollback): back into the outbox, under their first sequence
    /// numbers, so they go out again before anything newer.
    pub fn delivered_requeue(&self, seqs: &[u64]) -> Result<(), StoreError> {
        self.move_entries(&self.delivered, &self.outbox, seqs, |v| {
            v[8.min(v.len())..].to_vec()
        })
    }

    fn move_entries(
        &self,
        from: &sled::Tree,
        to: &sled::Tree,
        seqs: &[u64],
        convert: impl Fn(&[u8]) -> Vec<u8>,
    ) -> Result<(), StoreError> {
        use sled::Transactional;
        (from, to)
            .transaction(|(from, to)| {
                for seq in seqs {
                    let k = seq.to_be_bytes();
                    if let Some(v) = from.remove(&k[..])? {
                        to.insert(&k[..], convert(&v))?;
                    }
                }
                Ok(())
            })
            .map_err(transaction_error)
    }

    /// Counts by walking the tree: for reports, not for hot paths (see `outbox_idle`).
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// Nothing waits for delivery or confirmation (cheap: looks at one entry of each tree).
    pub fn outbox_idle(&self) -> bool {
        self.outbox.is_empty() && self.delivered.is_empty()
    }

    /// Delivered entries not yet confirmed.
    pub fn delivered_len(&self) -> usize {
        self.delivered.len()
    }

    /// Tasks that had not reached a terminal state when last written.
    /// Tasks a restart must take up again: those not ended, and those ended whose settlement
    /// was not confirmed.
    pub fn unfinished_tasks(&self) -> Result<Vec<TaskRecord>, StoreError> {
        Ok(scan::<TaskRecord>(self.tasks.iter(), "task")?
            .into_iter()
            .filter(|t| !t.state.is_terminal() || t.settlement_due.is_some())
            .collect())
    }
}

/// A session record as written with the mark that follows it (the mark is not part of the
/// session: readers of `Session` do not see it).
#[derive(Serialize)]
struct SessionNamingMark<'a> {
    #[serde(flatten)]
    session: &'a Session,
    mark: Option<NamedMark>,
}

/// Only the mark a session record names.
#[derive(serde::Deserialize)]
struct MarkOfSession {
    #[serde(default)]
    mark: Option<NamedMark>,
}

/// A mark's key and value, in hex.
#[derive(Serialize, serde::Deserialize)]
struct NamedMark {
    key: String,
    value: String,
}

/// The meta key of the last settlement's payments (see [`Store::put_settlement_once`]).
const PAYMENTS_IN_PROGRESS: &[u8] = b"payments_in_progress";

/// A settlement's payments, written before its session and mark.
#[derive(Serialize, serde::Deserialize)]
struct PaymentsInProgress {
    task: TaskKey,
    /// The kind of the settlement's mark.
    kind: String,
    /// Counter names and amounts; each name once.
    payments: Vec<(String, u64)>,
}

/// The payments with each name once (amounts summed, first-seen order) and without zeros.
fn merged_payments(payments: &[(String, u64)]) -> Vec<(String, u64)> {
    let mut merged: Vec<(String, u64)> = Vec::with_capacity(payments.len());
    for (name, amount) in payments.iter().filter(|(_, amount)| *amount > 0) {
        match merged.iter_mut().find(|(n, _)| n == name) {
            Some((_, total)) => *total = total.saturating_add(*amount),
            None => merged.push((name.clone(), *amount)),
        }
    }
    merged
}

/// A counter's amount: its first eight bytes (big-endian); what follows is a settlement's tag.
fn amount_of(value: Option<&[u8]>) -> u64 {
    value
        .and_then(|v| v.get(..8))
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

/// A counter's tag: what follows its amount (the task that last paid into it, or nothing).
fn tag_of(value: Option<&[u8]>) -> &[u8] {
    value.and_then(|v| v.get(8..)).unwrap_or_default()
}

/// A counter's bytes: the amount (big-endian), then the tag.
fn counter_value(amount: u64, tag: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(8 + tag.len());
    value.extend_from_slice(&amount.to_be_bytes());
    value.extend_from_slice(tag);
    value
}

fn id_of_session_key(key: &[u8]) -> u64 {
    u64::from_be_bytes(<[u8; 8]>::try_from(key).unwrap_or([0xff; 8]))
}

fn task_key_bytes(key: TaskKey) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&key.session_id.to_be_bytes());
    bytes[8..].copy_from_slice(&key.task_id.to_be_bytes());
    bytes
}

/// A task's mark: its session's key, the kind, the task id.
fn mark_key(task: TaskKey, kind: &str) -> Vec<u8> {
    let mut key = task.session_id.to_be_bytes().to_vec();
    key.push(kind.len() as u8);
    key.extend_from_slice(kind.as_bytes());
    key.extend_from_slice(&task.task_id.to_be_bytes());
    key
}

fn transaction_error(e: sled::transaction::TransactionError<()>) -> StoreError {
    match e {
        sled::transaction::TransactionError::Storage(e) => StoreError::Sled(e),
        sled::transaction::TransactionError::Abort(()) => {
            StoreError::Sled(sled::Error::Unsupported("aborted".into()))
        }
    }
}

fn put<T: Serialize>(tree: &sled::Tree, key: &[u8], value: &T) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec(value).expect("records always serialize");
    tree.insert(key, bytes)?;
    Ok(())
}

fn get<T: DeserializeOwned>(
    tree: &sled::Tree,
    key: &[u8],
    what: &str,
) -> Result<Option<T>, StoreError> {
    match tree.get(key)? {
        None => Ok(None),
        Some(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| StoreError::Corrupt {
                    what: what.to_string(),
                    source,
                })
        }
    }
}

fn scan<T: DeserializeOwned>(
    iter: impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>,
    what: &str,
) -> Result<Vec<T>, StoreError> {
    iter.map(|item| {
        let (_, bytes) = item?;
        serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
            what: what.to_string(),
            source,
        })
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::SessionParams;

    fn session(id: u64, balance: u64) -> Session {
        Session {
            id,
            owner: "owner".into(),
            params: SessionParams::default(),
            created_at_ms: 1,
            deposit: 100,
            balance,
            held: 100 - balance,
            spent: 0,
            tasks_submitted: 1,
        }
    }

    fn task(session_id: u64, task_id: u64) -> TaskKey {
        TaskKey {
            session_id,
            task_id,
        }
    }

    #[test]
    fn a_mark_its_session_names_is_written_on_open_when_a_crash_came_between() {
        let dir = tempfile::tempdir().unwrap();
        let held = session(1, 92);
        {
            let store = Store::open(dir.path()).unwrap();
            store.put_session(&session(1, 100)).unwrap();
            // The session is written, then the process dies before the mark.
            store
                .put_session_naming_mark(&held, &mark_key(task(1, 7), "hold"), &8u64.to_be_bytes())
                .unwrap();
            store.flush().unwrap();
            assert_eq!(store.task_mark(task(1, 7), "hold").unwrap(), None);
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store.task_mark(task(1, 7), "hold").unwrap(),
            Some(8u64.to_be_bytes().to_vec())
        );
        assert_eq!(store.session(1).unwrap(), Some(held.clone()));
        // A second try of the same hold changes nothing.
        assert!(!store
            .put_session_with_mark_once(&session(1, 84), task(1, 7), "hold", &8u64.to_be_bytes())
            .unwrap());
        assert_eq!(store.session(1).unwrap(), Some(held));
    }

    #[test]
    fn a_session_and_its_mark_are_written_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.put_session(&session(3, 100)).unwrap();
        assert!(store
            .put_session_with_mark_once(&session(3, 90), task(3, 1), "hold", &[10])
            .unwrap());
        assert!(!store
            .put_session_with_mark_once(&session(3, 80), task(3, 1), "hold", &[10])
            .unwrap());
        assert!(store
            .put_session_with_mark_once(&session(3, 95), task(3, 1), "settled", &[1])
            .unwrap());
        assert_eq!(store.session(3).unwrap(), Some(session(3, 95)));
        assert_eq!(store.task_mark(task(3, 1), "hold").unwrap(), Some(vec![10]));
        assert_eq!(
            store.task_mark(task(3, 1), "settled").unwrap(),
            Some(vec![1])
        );
    }

    fn pays(pairs: &[(&str, u64)]) -> Vec<(String, u64)> {
        pairs.iter().map(|(n, a)| (n.to_string(), *a)).collect()
    }

    #[test]
    fn a_settlement_pays_each_payee_once_and_only_the_first_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.put_session(&session(4, 100)).unwrap();
        let payments = pays(&[("pay/a", 3), ("pay/b", 0), ("pay/a", 2), ("pay/c", 1)]);
        assert!(store
            .put_settlement_once(&session(4, 94), task(4, 1), "settled", &[1], &payments)
            .unwrap());
        assert!(!store
            .put_settlement_once(&session(4, 90), task(4, 1), "settled", &[1], &payments)
            .unwrap());
        assert_eq!(store.amount("pay/a").unwrap(), 5);
        assert_eq!(store.amount("pay/b").unwrap(), 0);
        assert_eq!(store.amount("pay/c").unwrap(), 1);
        assert_eq!(store.session(4).unwrap(), Some(session(4, 94)));
    }

    /// Every point a crash can cut a settlement at (sled keeps a prefix of the writes): the
    /// store reopened pays what the settlement owed exactly once, and nothing for one that
    /// never reached its session.
    #[test]
    fn a_settlement_a_crash_cut_anywhere_is_paid_exactly_once_on_open() {
        let payments = pays(&[("pay/a", 7), ("pay/b", 4)]);
        let settled = task(2, 5);
        // Writes done before the crash: 0 = none, 1 = the payments record, 2 = + the
        // session, 3 = + the mark, 4 = + the first payment, 5 = all.
        for done in 0..=5usize {
            let dir = tempfile::tempdir().unwrap();
            {
                let store = Store::open(dir.path()).unwrap();
                store.put_session(&session(2, 100)).unwrap();
                // An earlier settlement of another task paid `a` already.
                assert!(store
                    .put_settlement_once(
                        &session(2, 100),
                        task(2, 1),
                        "settled",
                        &[1],
                        &pays(&[("pay/a", 10)])
                    )
                    .unwrap());
                let mark = mark_key(settled, "settled");
                if done >= 1 {
                    let record = PaymentsInProgress {
                        task: settled,
                        kind: "settled".into(),
                        payments: payments.clone(),
                    };
                    put(&store.meta, PAYMENTS_IN_PROGRESS, &record).unwrap();
                }
                if done >= 2 {
                    store
                        .put_session_naming_mark(&session(2, 89), &mark, &[1])
                        .unwrap();
                }
                if done >= 3 {
                    store.sessions.insert(&mark, &[1]).unwrap();
                }
                for (name, amount) in payments.iter().take(done.saturating_sub(3)) {
                    store.add_payment(name, *amount, settled).unwrap();
                }
                store.flush().unwrap();
            }
            let reached_session = done >= 2;
            for _reopening in 0..2 {
                let store = Store::open(dir.path()).unwrap();
                let (a, b) = if reached_session { (17, 4) } else { (10, 0) };
                assert_eq!(store.amount("pay/a").unwrap(), a, "cut after {done} writes");
                assert_eq!(store.amount("pay/b").unwrap(), b, "cut after {done} writes");
                assert_eq!(
                    store.task_mark(settled, "settled").unwrap().is_some(),
                    reached_session
                );
            }
        }
    }

    #[test]
    fn a_withdrawal_after_a_settlement_is_not_undone_by_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store.put_session(&session(6, 100)).unwrap();
            assert!(store
                .put_settlement_once(
                    &session(6, 91),
                    task(6, 1),
                    "settled",
                    &[1],
                    &pays(&[("pay/n", 9)])
                )
                .unwrap());
            assert_eq!(store.move_amount("pay/n", &["withdrawn/n"]).unwrap(), 9);
            store.flush().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.amount("pay/n").unwrap(), 0);
        assert_eq!(store.amount("withdrawn/n").unwrap(), 9);
    }

    #[test]
    fn sessions_lists_every_session_and_no_mark() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for id in [1, 2, 5, u64::MAX] {
            store.put_session(&session(id, 100)).unwrap();
        }
        for (id, t) in [(1, 1), (1, 2), (2, 1), (5, 9)] {
            assert!(store
                .put_session_with_mark_once(&session(id, 100 - t), task(id, t), "hold", &[1])
                .unwrap());
        }
        let ids: Vec<u64> = store.sessions().unwrap().iter().map(|s| s.id).collect();
        assert_eq!(ids, vec![1, 2, 5, u64::MAX]);
        assert_eq!(store.session(5).unwrap(), Some(session(5, 91)));
    }
}
