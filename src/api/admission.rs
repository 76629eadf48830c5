//! Admission control: a bound on tasks in flight, per key and in total. Actix mailboxes give no
//! back-pressure, so this is where overload is refused (429 with Retry-After) instead of queued
//! without limit.

use super::error::ApiError;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub struct Admission {
    max_per_key: usize,
    max_total: usize,
    retry_after_s: u64,
    in_flight: Mutex<(usize, HashMap<String, usize>)>,
}

/// One admitted task; dropping it frees the slot.
pub struct Permit {
    admission: Arc<Admission>,
    owner: String,
}

impl Admission {
    pub fn new(max_per_key: usize, max_total: usize, retry_after_s: u64) -> Arc<Self> {
        Arc::new(Self {
            max_per_key,
            max_total,
            retry_after_s,
            in_flight: Mutex::new((0, HashMap::new())),
        })
    }

    /// Admits one task for `owner`, whose own limit (a key's quota) replaces the per-key
    /// default when given.
    pub fn try_admit(
        self: &Arc<Self>,
        owner: &str,
        own_limit: Option<usize>,
    ) -> Result<Permit, ApiError> {
        let max_per_key = own_limit.unwrap_or(self.max_per_key);
        let mut guard = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        let (total, per_key) = &mut *guard;
        let mine = per_key.get(owner).copied().unwrap_or(0);
        if *total >= self.max_total {
            return Err(ApiError::RateLimited(
                format!("{} in total", self.max_total),
                self.retry_after_s,
            ));
        }
        if mine >= max_per_key {
            return Err(ApiError::RateLimited(
                format!("{max_per_key} for this key"),
                self.retry_after_s,
            ));
        }
        *total += 1;
        per_key.insert(owner.to_string(), mine + 1);
        Ok(Permit {
            admission: self.clone(),
            owner: owner.to_string(),
        })
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).0
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut guard = self
            .admission
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (total, per_key) = &mut *guard;
        *total = total.saturating_sub(1);
        if let Some(n) = per_key.get_mut(&self.owner) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                per_key.remove(&self.owner);
            }
        }
    }
}
