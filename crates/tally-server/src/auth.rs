//! API keys and scopes.
//!
//! A key is shown once when created and stored only as its SHA-256 hash.
//! Scopes nest: `admin` may do everything, `write` may also read and ingest,
//! `ingest` may only send usage, `read` may only read.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::AppState;

/// How long a looked-up key is trusted without asking the store again.
const KEY_CACHE_TTL: Duration = Duration::from_secs(10);
const KEY_CACHE_MAX: usize = 10_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Admin,
    Write,
    Ingest,
    Read,
}

impl Scope {
    pub fn parse(text: &str) -> Option<Scope> {
        match text {
            "admin" => Some(Scope::Admin),
            "write" => Some(Scope::Write),
            "ingest" => Some(Scope::Ingest),
            "read" => Some(Scope::Read),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::Write => "write",
            Scope::Ingest => "ingest",
            Scope::Read => "read",
        }
    }

    /// Whether a key with this scope may do what `needed` guards.
    pub fn allows(self, needed: Scope) -> bool {
        match self {
            Scope::Admin => true,
            Scope::Write => needed != Scope::Admin,
            Scope::Ingest => needed == Scope::Ingest,
            Scope::Read => needed == Scope::Read,
        }
    }
}

/// A new random key: `tk_` and 32 random bytes in hex.
pub fn generate_key() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("tk_{}", hex::encode(bytes))
}

/// Compare two secrets in time independent of where they differ (both are
/// hashed first, so neither their content nor their length leaks).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use sha2::Digest;
    let (a, b) = (sha2::Sha256::digest(a), sha2::Sha256::digest(b));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Cache of recent key look-ups, by hash.
#[derive(Default)]
pub struct KeyCache {
    entries: Mutex<HashMap<String, (String, Scope, Instant)>>,
}

impl KeyCache {
    /// Forget every key looked up (a key was revoked).
    pub fn clear(&self) {
        self.entries.lock().expect("key cache").clear();
    }
}

/// The authenticated caller.
#[derive(Clone, Debug)]
pub struct Caller {
    pub key_id: String,
    pub scope: Scope,
}

impl Caller {
    pub fn require(&self, needed: Scope) -> Result<(), ApiError> {
        if self.scope.allows(needed) {
            Ok(())
        } else {
            Err(ApiError::new(
                "forbidden",
                format!(
                    "this key has scope {}; this request needs {}",
                    self.scope.as_str(),
                    needed.as_str()
                ),
            ))
        }
    }

    pub fn actor(&self) -> Option<String> {
        Some(format!("key:{}", self.key_id))
    }
}

/// The key id of `TALLY_ADMIN_KEY` (its actor is `key:bootstrap-admin`): no
/// stored key may take it, or the audit trail could not tell them apart.
pub const BOOTSTRAP_ADMIN: &str = "bootstrap-admin";

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        authenticate(&parts.headers, state).await
    }
}

/// The caller a request's `Authorization` header names, or a 401 (a 400 for
/// more than one such header: which one counts would be a guess).
pub async fn authenticate(
    headers: &axum::http::HeaderMap,
    state: &AppState,
) -> Result<Caller, ApiError> {
    let missing = || {
        ApiError::new(
            "unauthorized",
            "send an API key as Authorization: Bearer <key>",
        )
    };
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next().ok_or_else(missing)?;
    if values.next().is_some() {
        return Err(ApiError::invalid(
            "authorization",
            "send one Authorization header, not several",
        ));
    }
    let key = value
        .to_str()
        .ok()
        // The scheme's name is case-insensitive (RFC 9110, 11.1).
        .and_then(|v| {
            let (scheme, key) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(key)
        })
        .map(str::trim)
        .ok_or_else(missing)?;
    if key.is_empty() {
        return Err(missing());
    }
    let hash = hash_key(key);
    if state.admin_key_hash.as_deref() == Some(hash.as_str()) {
        return Ok(Caller {
            key_id: BOOTSTRAP_ADMIN.into(),
            scope: Scope::Admin,
        });
    }
    if let Some((id, scope, at)) = state
        .key_cache
        .entries
        .lock()
        .expect("key cache")
        .get(&hash)
        .cloned()
    {
        if at.elapsed() < KEY_CACHE_TTL {
            return Ok(Caller { key_id: id, scope });
        }
    }
    let record = state.store.api_key(hash.clone()).await?;
    let Some(record) = record else {
        return Err(ApiError::new("unauthorized", "the API key is not valid"));
    };
    let scope = Scope::parse(&record.scope)
        .ok_or_else(|| ApiError::new("unauthorized", "the API key is not valid"))?;
    let mut cache = state.key_cache.entries.lock().expect("key cache");
    if cache.len() >= KEY_CACHE_MAX {
        cache.clear();
    }
    cache.insert(hash, (record.id.clone(), scope, Instant::now()));
    Ok(Caller {
        key_id: record.id,
        scope,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_nest() {
        use Scope::*;
        let table = [
            (Admin, [true, true, true, true]),
            (Write, [false, true, true, true]),
            (Ingest, [false, false, true, false]),
            (Read, [false, false, false, true]),
        ];
        for (scope, expected) in table {
            let got = [Admin, Write, Ingest, Read].map(|needed| scope.allows(needed));
            assert_eq!(got, expected, "{scope:?}");
        }
    }

    #[test]
    fn keys_are_random_and_hashed() {
        let (a, b) = (generate_key(), generate_key());
        assert_ne!(a, b);
        assert_eq!(hash_key(&a).len(), 64);
        assert_ne!(hash_key(&a), a);
    }
}
