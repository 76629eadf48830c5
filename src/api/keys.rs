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

/// Adds `add` (0 or 1) to each key's task count; the counts after.
#[derive(Message)]
#[rtype(result = "Result<Vec<u64>, StoreError>")]
struct CountTasks {
    hashes: Vec<String>,
    add: u64,
}

impl Handler<CountTasks> for KeyStore {
    type Result = Result<Vec<u64>, StoreError>;
    fn handle(&mut self, m: CountTasks, _: &mut Context<Self>) -> Self::Result {
        m.hashes
            .iter()
            .map(|h| {
                let name = format!("key-tasks/{h}");
                if m.add == 0 {
                    self.store.amount(&name)
                } else {
                    // One atomic increment: two requests cannot both take the last task.
                    self.store.add_amount(&name, m.add)
                }
            })
            .collect()
    }
}

pub struct KeyRing {
    by_hash: RwLock<HashMap<String, KeyEntry>>,
    store: Addr<KeyStore>,
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
                    created_at_ms: 0,
                    revoked: false,
                },
            );
        }
        Ok(Self {
            by_hash: RwLock::new(by_hash),
            store: KeyStore { store }.start(),
        })
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

    /// Every key's entry, with the first 8 hex digits of its hash and the tasks it used.
    pub async fn list(&self) -> Result<Vec<(String, KeyEntry, u64)>, KeyError> {
        let mut all: Vec<(String, KeyEntry)> = self
            .by_hash
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(h, e)| (h.clone(), e.clone()))
            .collect();
        all.sort_by(|a, b| a.1.name.cmp(&b.1.name));
        let hashes = all.iter().map(|(h, _)| h.clone()).collect();
        let used = self.store.send(CountTasks { hashes, add: 0 }).await??;
        Ok(all
            .into_iter()
            .zip(used)
            .map(|((h, e), used)| {
                let used = e.max_tasks.map_or(used, |m| used.min(m));
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
        Ok(entry)
    }

    /// Counts one task against the key's quota, or refuses it when the quota is used up.
    pub async fn take_task(&self, hash: &str, entry: &KeyEntry) -> Result<(), KeyError> {
        let Some(max) = entry.max_tasks else {
            return Ok(());
        };
        let used = self
            .store
            .send(CountTasks {
                hashes: vec![hash.to_string()],
                add: 1,
            })
            .await??;
        if used.first().copied().unwrap_or(0) > max {
            return Err(KeyError::QuotaExhausted(max));
        }
        Ok(())
    }
}
