//! API keys. Operators' keys come from the configuration; clients' keys are issued by an
//! operator (`POST /api/v1/keys`), each with its quotas (tasks in flight, tasks in all) and a
//! default session. Only the SHA-256 of a key is kept (in memory and, for clients' keys, in the
//! store): a key is shown once, when it is issued, and cannot be recovered from what is stored.
//!
//! The ring answers lookups from memory; what must persist goes to the [`KeyStore`] actor, so
//! the store is held by the actor system alone and closes with it.

use crate::store::{Store, StoreError};
use crate::testnet::owner_of_key;
use actix::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::RwLock;

/// Clients' keys at most (a bound on what the ring holds).
pub const MAX_CLIENT_KEYS: usize = 10_000;
/// What an issued key starts with (so it is recognisable in logs and secret scanners).
pub const KEY_PREFIX: &str = "ctsr_";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("a key named {0:?} exists already")]
    NameTaken(String),
    #[error("no key is named {0:?}")]
    NoSuchKey(String),
    #[error("the router holds {MAX_CLIENT_KEYS} client keys, its limit")]
    Full,
    #[error("this key's quota of {0} tasks is used up")]
    QuotaExhausted(u64),
    #[error("this key has opened {0} sessions, its limit")]
    TooManySessions(usize),
    #[error("a deposit of {wanted} is more than this key's remaining credit of {left} (an operator grants credit)")]
    NoCredit { wanted: u64, left: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the key store stopped: {0}")]
    Stopped(#[from] MailboxError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// From the configuration: may issue and revoke clients' keys.
    Operator,
    Client,
}

/// What is known of a key (never the key itself).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyEntry {
    pub name: String,
    /// The owner identity of its sessions and tasks.
    pub owner: String,
    pub role: Role,
    /// Tasks in flight at once (none: the router's per-key default).
    pub max_inflight: Option<usize>,
    /// Tasks in all (none: unlimited).
    pub max_tasks: Option<u64>,
    /// The session its OpenAI-compatible requests use.
    pub default_session: Option<u64>,
    /// What an operator granted it in all for its sessions' deposits (a client's deposits
    /// come from here and nowhere else; operators' keys are not limited). Keys stored
    /// before credit existed have none.
    #[serde(default)]
    pub credit: u64,
    pub created_at_ms: u64,
    pub revoked: bool,
}

/// SHA-256 of a key, hex: how keys are looked up and stored.
pub fn key_hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Persists keys and counts tasks against quotas (the one holder of the store here).
pub struct KeyStore {
    store: Store,
}

impl Actor for KeyStore {
    type Context = Context<Self>;
}

#[derive(Message)]
#[rtype(result = "Result<(), StoreError>")]
struct SaveKey {
    hash: String,
    entry: KeyEntry,
}

impl Handler<SaveKey> for KeyStore {
    type Result = Result<(), StoreError>;
    fn handle(&mut self, m: SaveKey, _: &mut Context<Self>) -> Self::Result {
        self.store.put_api_key(&m.hash, &m.entry)?;
        self.store.flush()
    }
}

/// What a key has used of a limit: its tasks, or its credit.
#[derive(Clone, Copy, Debug)]
enum Counter {
    Tasks,
    Credit,
    Sessions,
}

impl Counter {
    /// Whether what it takes is flushed before it is answered: credit is money a crash must
    /// not hand out twice; a task quota is checked on every task and keeps sled's own pace
    /// (as it always did).
    fn durable(self) -> bool {
        matches!(self, Counter::Credit)
    }

    /// The counter's name in the store.
    fn name(self, hash: &str) -> String {
        match self {
            Counter::Tasks => format!("key-tasks/{hash}"),
            Counter::Credit => format!("key-credit-spent/{hash}"),
            Counter::Sessions => format!("key-sessions/{hash}"),
        }
    }
}

/// Each key's count of one counter.
#[derive(Message)]
#[rtype(result = "Result<Vec<u64>, StoreError>")]
struct ReadCounts {
    hashes: Vec<String>,
    counter: Counter,
}

impl Handler<ReadCounts> for KeyStore {
    type Result = Result<Vec<u64>, StoreError>;
    fn handle(&mut self, m: ReadCounts, _: &mut Context<Self>) -> Self::Result {
        m.hashes
            .iter()
            .map(|h| self.store.amount(&m.counter.name(h)))
            .collect()
    }
}

/// Takes `amount` of a key's counter if it stays within `limit` (flushed if the counter is
/// durable): the count after, or `None` with nothing taken.
#[derive(Message)]
#[rtype(result = "Result<Option<u64>, StoreError>")]
struct TakeWithin {
    hash: String,
    counter: Counter,
    amount: u64,
    limit: u64,
}

impl Handler<TakeWithin> for KeyStore {
    type Result = Result<Option<u64>, StoreError>;
    fn handle(&mut self, m: TakeWithin, _: &mut Context<Self>) -> Self::Result {
        let name = m.counter.name(&m.hash);
        let taken = self.store.add_amount_within(&name, m.amount, m.limit)?;
        if taken.is_some() && m.counter.durable() {
            self.store.flush()?;
        }
        Ok(taken)
    }
}

/// Gives back what [`TakeWithin`] took for something then not accepted.
#[derive(Message)]
#[rtype(result = "Result<(), StoreError>")]
struct GiveBack {
    hash: String,
    counter: Counter,
    amount: u64,
}

impl Handler<GiveBack> for KeyStore {
    type Result = Result<(), StoreError>;
    fn handle(&mut self, m: GiveBack, _: &mut Context<Self>) -> Self::Result {
        self.store.sub_amount(&m.counter.name(&m.hash), m.amount)?;
        if m.counter.durable() {
            self.store.flush()?;
        }
        Ok(())
    }
}

pub struct KeyRing {
    by_hash: RwLock<HashMap<String, KeyEntry>>,
    store: Addr<KeyStore>,
    /// Counts revocations: open connections (WebSockets) watch it and check their key again.
    revocations: tokio::sync::watch::Sender<u64>,
}

impl KeyRing {
    /// Operators' keys (with the owners' default sessions) and the clients' keys in the store;
    /// starts the key store actor (call inside the actor system).
    pub fn new(
        operator_keys: &[String],
        default_sessions: &HashMap<String, u64>,
        store: Store,
    ) -> Result<Self, StoreError> {
        let mut by_hash: HashMap<String, KeyEntry> = store.api_keys()?.into_iter().collect();
        for (i, key) in operator_keys.iter().enumerate() {
            let owner = owner_of_key(key);
            by_hash.insert(
                key_hash(key),
                KeyEntry {
                    name: format!("operator-{}", i + 1),
                    default_session: default_sessions.get(&owner).copied(),
                    owner,
                    role: Role::Operator,
                    max_inflight: None,
                    max_tasks: None,
                    credit: 0,
                    created_at_ms: 0,
                    revoked: false,
                },
            );
        }
        Ok(Self {
            by_hash: RwLock::new(by_hash),
            store: KeyStore { store }.start(),
            revocations: tokio::sync::watch::channel(0).0,
        })
    }

    /// Changes whenever a key is revoked: a connection that lives on after its request
    /// watches it and asks [`KeyRing::is_live`] again.
    pub fn revocations(&self) -> tokio::sync::watch::Receiver<u64> {
        self.revocations.subscribe()
    }

    /// Whether the key with this hash still authenticates.
    pub fn is_live(&self, hash: &str) -> bool {
        self.entry(hash).is_some_and(|e| !e.revoked)
    }

    /// The entry of a live key, with its hash.
    pub fn authenticate(&self, key: &str) -> Option<(String, KeyEntry)> {
        let hash = key_hash(key);
        let entry = self
            .by_hash
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&hash)
            .filter(|e| !e.revoked)
            .cloned()?;
        Some((hash, entry))
    }

    async fn save(&self, hash: &str, entry: KeyEntry) -> Result<(), KeyError> {
        self.store
            .send(SaveKey {
                hash: hash.to_string(),
                entry,
            })
            .await??;
        Ok(())
    }

    /// A new random key; the caller must still give it a default session
    /// ([`KeyRing::set_default_session`]). Returns the key (shown once) and its entry.
    pub async fn issue(
        &self,
        name: &str,
        max_inflight: Option<usize>,
        max_tasks: Option<u64>,
        credit: u64,
    ) -> Result<(String, KeyEntry), KeyError> {
        let secret: [u8; 32] = rand::random();
        let key = format!("{KEY_PREFIX}{}", hex::encode(secret));
        let hash = key_hash(&key);
        let entry = KeyEntry {
            name: name.to_string(),
            owner: owner_of_key(&key),
            role: Role::Client,
            max_inflight,
            max_tasks,
            default_session: None,
            credit,
            created_at_ms: crate::task::now_ms(),
            revoked: false,
        };
        {
            let mut ring = self.by_hash.write().unwrap_or_else(|e| e.into_inner());
            if ring.values().any(|e| e.name == name) {
                return Err(KeyError::NameTaken(name.to_string()));
            }
            if ring.values().filter(|e| e.role == Role::Client).count() >= MAX_CLIENT_KEYS {
                return Err(KeyError::Full);
            }
            ring.insert(hash.clone(), entry.clone());
        }
        if let Err(e) = self.save(&hash, entry.clone()).await {
            self.by_hash
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&hash);
            return Err(e);
        }
        Ok((key, entry))
    }

    pub async fn set_default_session(&self, hash: &str, session: u64) -> Result<(), KeyError> {
        let entry = {
            let mut ring = self.by_hash.write().unwrap_or_else(|e| e.into_inner());
            let entry = ring
                .get_mut(hash)
                .ok_or_else(|| KeyError::NoSuchKey(hash.to_string()))?;
            entry.default_session = Some(session);
            entry.clone()
        };
        self.save(hash, entry).await
    }

    /// Every key's entry, with the first 8 hex digits of its hash and what it used.
    pub async fn list(&self) -> Result<Vec<(String, KeyEntry, KeyUse)>, KeyError> {
        let mut all: Vec<(String, KeyEntry)> = self
            .by_hash
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(h, e)| (h.clone(), e.clone()))
            .collect();
        all.sort_by(|a, b| a.1.name.cmp(&b.1.name));
        let hashes: Vec<String> = all.iter().map(|(h, _)| h.clone()).collect();
        let tasks = self.counts(hashes.clone(), Counter::Tasks).await?;
        let spent = self.counts(hashes, Counter::Credit).await?;
        Ok(all
            .into_iter()
            .zip(tasks.into_iter().zip(spent))
            .map(|((h, e), (tasks, credit_spent))| {
                let tasks = e.max_tasks.map_or(tasks, |m| tasks.min(m));
                let used = KeyUse {
                    tasks,
                    credit_spent,
                };
                (h[..8].to_string(), e, used)
            })
            .collect())
    }

    /// Revokes a client's key by name: it authenticates no more (its sessions stay).
    pub async fn revoke(&self, name: &str) -> Result<KeyEntry, KeyError> {
        let (hash, entry) = {
            let mut ring = self.by_hash.write().unwrap_or_else(|e| e.into_inner());
            let (hash, entry) = ring
                .iter_mut()
                .find(|(_, e)| e.name == name && e.role == Role::Client)
                .ok_or_else(|| KeyError::NoSuchKey(name.to_string()))?;
            entry.revoked = true;
            (hash.clone(), entry.clone())
        };
        self.save(&hash, entry.clone()).await?;
        self.revocations.send_modify(|n| *n = n.wrapping_add(1));
        Ok(entry)
    }

    /// Counts one task against the key's quota, or refuses it when the quota is used up.
    /// A task then not accepted is given back ([`KeyRing::give_back_task`]): the quota counts
    /// accepted tasks only.
    pub async fn take_task(&self, hash: &str, entry: &KeyEntry) -> Result<(), KeyError> {
        let Some(max) = entry.max_tasks else {
            return Ok(());
        };
        let taken = self
            .store
            .send(TakeWithin {
                hash: hash.to_string(),
                counter: Counter::Tasks,
                amount: 1,
                limit: max,
            })
            .await??;
        taken.map(drop).ok_or(KeyError::QuotaExhausted(max))
    }

    /// Gives back a task [`KeyRing::take_task`] counted that was not accepted.
    pub async fn give_back_task(&self, hash: &str, entry: &KeyEntry) -> Result<(), KeyError> {
        if entry.max_tasks.is_none() {
            return Ok(());
        }
        self.give_back(hash, Counter::Tasks, 1).await
    }

    /// Takes a deposit out of the key's credit (operators' keys are not limited), or refuses
    /// it with what is left. A deposit then not made is given back with
    /// [`KeyRing::refund_credit`].
    pub async fn spend_credit(
        &self,
        hash: &str,
        entry: &KeyEntry,
        amount: u64,
    ) -> Result<(), KeyError> {
        if entry.role == Role::Operator || amount == 0 {
            return Ok(());
        }
        // The entry read now, not the caller's copy: a top-up since counts.
        let credit = self.entry(hash).map_or(0, |e| e.credit);
        let taken = self
            .store
            .send(TakeWithin {
                hash: hash.to_string(),
                counter: Counter::Credit,
                amount,
                limit: credit,
            })
            .await??;
        if taken.is_some() {
            return Ok(());
        }
        let left = credit.saturating_sub(self.credit_spent(hash).await?);
        Err(KeyError::NoCredit {
            wanted: amount,
            left,
        })
    }

    /// Counts a session the key opens against its limit (operators' keys are not limited),
    /// atomically: two requests cannot both open the last one. A session then not opened is
    /// given back with [`KeyRing::give_back_session`].
    pub async fn take_session(
        &self,
        hash: &str,
        entry: &KeyEntry,
        max: usize,
    ) -> Result<(), KeyError> {
        if entry.role == Role::Operator {
            return Ok(());
        }
        let taken = self
            .store
            .send(TakeWithin {
                hash: hash.to_string(),
                counter: Counter::Sessions,
                amount: 1,
                limit: max as u64,
            })
            .await??;
        taken.map(drop).ok_or(KeyError::TooManySessions(max))
    }

    /// Gives back a session [`KeyRing::take_session`] counted that was not opened.
    pub async fn give_back_session(&self, hash: &str, entry: &KeyEntry) -> Result<(), KeyError> {
        if entry.role == Role::Operator {
            return Ok(());
        }
        self.give_back(hash, Counter::Sessions, 1).await
    }

    /// Gives back a deposit [`KeyRing::spend_credit`] took that was not made.
    pub async fn refund_credit(
        &self,
        hash: &str,
        entry: &KeyEntry,
        amount: u64,
    ) -> Result<(), KeyError> {
        if entry.role == Role::Operator || amount == 0 {
            return Ok(());
        }
        self.give_back(hash, Counter::Credit, amount).await
    }

    /// Adds to a client's credit by name (an operator's top-up): the key's hash and entry
    /// after.
    pub async fn grant_credit(
        &self,
        name: &str,
        amount: u64,
    ) -> Result<(String, KeyEntry), KeyError> {
        let (hash, entry) = {
            let mut ring = self.by_hash.write().unwrap_or_else(|e| e.into_inner());
            let (hash, entry) = ring
                .iter_mut()
                .find(|(_, e)| e.name == name && e.role == Role::Client)
                .ok_or_else(|| KeyError::NoSuchKey(name.to_string()))?;
            entry.credit = entry.credit.saturating_add(amount);
            (hash.clone(), entry.clone())
        };
        self.save(&hash, entry.clone()).await?;
        Ok((hash, entry))
    }

    /// What a key has spent of its credit.
    pub async fn credit_spent(&self, hash: &str) -> Result<u64, KeyError> {
        let spent = self.counts(vec![hash.to_string()], Counter::Credit).await?;
        Ok(spent.first().copied().unwrap_or(0))
    }

    /// Each key's count of one counter.
    async fn counts(&self, hashes: Vec<String>, counter: Counter) -> Result<Vec<u64>, KeyError> {
        Ok(self.store.send(ReadCounts { hashes, counter }).await??)
    }

    fn entry(&self, hash: &str) -> Option<KeyEntry> {
        self.by_hash
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(hash)
            .cloned()
    }

    async fn give_back(&self, hash: &str, counter: Counter, amount: u64) -> Result<(), KeyError> {
        self.store
            .send(GiveBack {
                hash: hash.to_string(),
                counter,
                amount,
            })
            .await??;
        Ok(())
    }
}

/// What a key used of its limits.
#[derive(Clone, Copy, Debug)]
pub struct KeyUse {
    pub tasks: u64,
    pub credit_spent: u64,
}
