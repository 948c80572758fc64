//! Validated identifiers.
//!
//! A client-chosen id is 1–128 characters of `[A-Za-z0-9_.:-]`; it names the
//! resource and is its idempotency key forever. Ids Tally derives itself (for
//! example the grant a refund creates) may be longer, but use the same alphabet.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The most characters a client-chosen id may have.
pub const MAX_ID_LENGTH: usize = 128;

/// An identifier, cheap to clone.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Id(Arc<str>);

/// Why a string is not a valid id.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("id must be 1 to 128 characters of A-Z, a-z, 0-9, '_', '.', ':' or '-'")]
pub struct IdError;

fn allowed(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'.' | b':' | b'-')
}

impl Id {
    /// Parse a client-chosen id.
    pub fn parse(text: &str) -> Result<Id, IdError> {
        if text.is_empty() || text.len() > MAX_ID_LENGTH || !text.bytes().all(allowed) {
            return Err(IdError);
        }
        Ok(Id(Arc::from(text)))
    }

    /// An id Tally derives from other ids; may exceed the client length limit.
    pub fn derived(text: &str) -> Id {
        assert!(
            !text.is_empty() && text.bytes().all(allowed),
            "derived id {text:?}"
        );
        Id(Arc::from(text))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_alphabet_and_refuses_the_rest() {
        for good in ["a", "cus_123", "ord:2026-11-25.1", &"x".repeat(128)] {
            assert!(Id::parse(good).is_ok(), "{good}");
        }
        for bad in ["", "a b", "é", "a/b", "a?b", &"x".repeat(129)] {
            assert_eq!(Id::parse(bad), Err(IdError), "{bad}");
        }
    }
}
