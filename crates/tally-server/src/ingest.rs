//! Usage events from every source (HTTP batches, Kafka, NATS, Pub/Sub push,
//! dead-letter replays) through one path: read the event, charge it through
//! the store, and say what happened. An event that cannot be read or charged
//! becomes a dead letter with its reason; it never blocks the events after it.

use base64::Engine;
use serde::Deserialize;
use tally_core::{Amount, Timestamp};
use tally_store::{Command, EventOutcome, NewDeadLetter, NewEvent, Outcome, Refusal, StoreError};

use crate::edge::{self, AmountInput};
use crate::error::ApiError;
use crate::routes::spend::properties_of;
use crate::AppState;

/// An event as every source sends it (the shape of an element of `POST /v1/events`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventInput {
    id: String,
    customer_id: String,
    feature: String,
    quantity: AmountInput,
    member_id: Option<String>,
    timestamp: Option<String>,
    #[serde(default, deserialize_with = "crate::edge::strict_opt")]
    properties: Option<serde_json::Value>,
}

/// What became of one event.
#[derive(Clone, Debug)]
pub enum EventResult {
    /// Charged now.
    Charged(EventOutcome),
    /// Charged before: the original result.
    Duplicate(EventOutcome),
    /// Not charged; kept as a dead letter (its id is still unused).
    Rejected { code: String, message: String },
}

impl EventResult {
    /// `charged`, `duplicate` or `rejected`: the result's status, as the API and metrics name it.
    pub fn status(&self) -> &'static str {
        match self {
            EventResult::Charged(_) => "charged",
            EventResult::Duplicate(_) => "duplicate",
            EventResult::Rejected { .. } => "rejected",
        }
    }
}

/// The code of a dead letter that holds no event text to replay: a message
/// without a payload, one that is not UTF-8 (kept as base64), a Pub/Sub
/// push that is not an envelope. Its payload describes or keeps the message
/// as received; replaying it is refused (`dead_letter_not_replayable`).
pub const UNREADABLE: &str = "unreadable_message";

/// Read one event; a malformed one is an error with a code and a message.
pub fn parse_event(text: &str, source: &str) -> Result<NewEvent, ApiError> {
    // Its structs take only objects: an array would fill them by position.
    let input: EventInput = crate::objects::from_slice_untracked(text.as_bytes()).map_err(|e| {
        // Read again only when it failed, to name the field (tracking the
        // path costs every event something).
        let path = crate::objects::from_slice::<EventInput>(text.as_bytes())
            .err()
            .map(|e| e.path().to_string())
            .filter(|path| !path.is_empty() && path != ".");
        let message = match path {
            Some(path) => format!("the event is not valid: {path}: {e}"),
            None => format!("the event is not valid: {e}"),
        };
        ApiError::new("invalid_event", message)
    })?;
    let invalid = |e: ApiError| ApiError::new("invalid_event", e.message);
    let quantity: Amount = edge::positive(input.quantity, "quantity").map_err(invalid)?;
    Ok(NewEvent {
        id: edge::id(&input.id, "id").map_err(invalid)?,
        customer_id: edge::id(&input.customer_id, "customer_id").map_err(invalid)?,
        feature: edge::id(&input.feature, "feature")
            .map_err(invalid)?
            .to_string(),
        quantity,
        member_id: input
            .member_id
            .map(|m| edge::id(&m, "member_id"))
            .transpose()
            .map_err(invalid)?,
        timestamp: input
            .timestamp
            .map(|t| edge::instant(&t, "timestamp"))
            .transpose()
            .map_err(invalid)?,
        properties: properties_of(input.properties).map_err(invalid)?,
        source: source.to_owned(),
        received_at: None,
    })
}

/// The id and customer of a payload, when it has them, for its dead letter.
fn identity(text: &str) -> (Option<String>, Option<String>) {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(text) else {
        return (None, None);
    };
    let field = |name: &str| {
        value
            .get(name)
            .and_then(|v| v.as_str())
            .map(|s| s.chars().take(128).collect())
    };
    (field("id"), field("customer_id"))
}

/// Charge one event given as JSON bytes (a stream message). `Err` only when
/// the store is unavailable: the message must then be delivered again.
pub async fn ingest_bytes(
    state: &AppState,
    bytes: &[u8],
    source: &str,
) -> Result<EventResult, ApiError> {
    send_bytes(state, bytes, source).await.finish(state).await
}

/// Charge one event given as its JSON text (a message, or one element of a
/// batch); a dead letter keeps exactly that text.
pub async fn ingest_text(
    state: &AppState,
    text: &str,
    source: &str,
) -> Result<EventResult, ApiError> {
    ingest_text_received(state, text, source, None, None).await
}

/// [`ingest_text`] for an event that first arrived at `received_at` (a
/// dead letter's replay): without a timestamp of its own it is charged as
/// of then, not of now. `actor` as in [`send_text`].
pub async fn ingest_text_received(
    state: &AppState,
    text: &str,
    source: &str,
    received_at: Option<Timestamp>,
    actor: Option<String>,
) -> Result<EventResult, ApiError> {
    send_text(state, text, source, received_at, actor)
        .await
        .finish(state)
        .await
}

/// An event on its way: in the writer's queue (or set aside as a dead
/// letter), its outcome still to come ([`Sent::finish`]). Events sent one
/// after another, each send awaited before the next, are charged in that
/// order: the first of two with one id is the one charged, and the last
/// ones of a batch are the ones refused when credits run out. (Sent all at
/// once, a batch of 128 or more was charged out of order: the runtime's
/// budget paused the sends after 127, and the rest went in reverse.)
pub struct Sent<'a> {
    step: Step<'a>,
    source: &'static str,
    arrived: std::time::Instant,
}

enum Step<'a> {
    /// In the writer's queue.
    Charging {
        answer: tally_store::Pending,
        event: NewEvent,
        payload: std::borrow::Cow<'a, str>,
    },
    /// Not an event: kept as a dead letter once finished.
    Letter(NewDeadLetter),
    /// The store is unavailable.
    Failed(ApiError),
}

/// Read one event given as its JSON text and put it in the writer's queue.
/// Its entry's actor is `actor` (the API key that sent or replayed it), or
/// else the source it came from (`source:kafka`).
pub async fn send_text<'a>(
    state: &AppState,
    text: &'a str,
    source: &str,
    received_at: Option<Timestamp>,
    actor: Option<String>,
) -> Sent<'a> {
    let arrived = std::time::Instant::now();
    let step = match parse_event(text, source) {
        Ok(event) => {
            let event = NewEvent {
                received_at,
                ..event
            };
            match state
                .store
                .submit(
                    Command::Event(event.clone()),
                    actor.or_else(|| Some(format!("source:{source}"))),
                )
                .await
            {
                Ok(answer) => Step::Charging {
                    answer,
                    event,
                    payload: std::borrow::Cow::Borrowed(text),
                },
                Err(error) => Step::Failed(error.into()),
            }
        }
        Err(error) => {
            // Only a malformed event pays for a second, loose reading.
            let (event_id, customer_id) = identity(text);
            Step::Letter(NewDeadLetter {
                source: source.to_owned(),
                event_id,
                customer_id,
                payload: text.to_owned(),
                code: error.code,
                message: error.message,
            })
        }
    };
    Sent {
        step,
        source: crate::metrics::source_label(source),
        arrived,
    }
}

/// [`send_text`] for an event given as JSON bytes (a stream message).
pub async fn send_bytes(state: &AppState, bytes: &[u8], source: &str) -> Sent<'static> {
    match std::str::from_utf8(bytes) {
        Ok(text) => send_text(state, text, source, None, None)
            .await
            .into_owned(),
        Err(_) => Sent {
            step: Step::Letter(NewDeadLetter {
                source: source.to_owned(),
                event_id: None,
                customer_id: None,
                // Kept exactly, as base64: replaying it is refused again
                // rather than charging a changed event.
                payload: format!(
                    "base64:{}",
                    base64::engine::general_purpose::STANDARD.encode(bytes)
                ),
                code: UNREADABLE.into(),
                message: "the message is not UTF-8 text (its bytes are kept as base64)".into(),
            }),
            source: crate::metrics::source_label(source),
            arrived: std::time::Instant::now(),
        },
    }
}

impl Sent<'_> {
    /// The same, keeping its own copy of the event's text (for a task of
    /// its own, after the message it came in is gone).
    fn into_owned(self) -> Sent<'static> {
        let step = match self.step {
            Step::Charging {
                answer,
                event,
                payload,
            } => Step::Charging {
                answer,
                event,
                payload: std::borrow::Cow::Owned(payload.into_owned()),
            },
            Step::Letter(letter) => Step::Letter(letter),
            Step::Failed(error) => Step::Failed(error),
        };
        Sent {
            step,
            source: self.source,
            arrived: self.arrived,
        }
    }

    /// What became of the event, once durable: charged, a duplicate, or
    /// refused and kept as a dead letter (durable before this returns).
    /// `Err` only when the store is unavailable.
    pub async fn finish(self, state: &AppState) -> Result<EventResult, ApiError> {
        let result = match self.step {
            Step::Charging {
                answer,
                event,
                payload,
            } => settle(state, answer.answer().await, event, &payload).await,
            Step::Letter(letter) => dead_letter(state, letter).await,
            Step::Failed(error) => Err(error),
        };
        if result.is_ok() {
            state
                .metrics
                .event_latency(self.source, self.arrived.elapsed());
        }
        result
    }
}

/// The writer's answer to an event: a refused one becomes a dead letter
/// (durable before this returns) keeping `payload`, the event as received.
async fn settle(
    state: &AppState,
    answer: Result<tally_store::Executed, StoreError>,
    event: NewEvent,
    payload: &str,
) -> Result<EventResult, ApiError> {
    let keep = |event: &NewEvent| NewDeadLetter {
        source: event.source.clone(),
        event_id: Some(event.id.to_string()),
        customer_id: Some(event.customer_id.to_string()),
        payload: payload.to_owned(),
        code: String::new(),
        message: String::new(),
    };
    let mut letter = None;
    let result = match answer {
        Ok(executed) => match executed.result {
            Ok(Outcome::Event(outcome)) if executed.replayed => EventResult::Duplicate(outcome),
            Ok(Outcome::Event(outcome)) => EventResult::Charged(outcome),
            Ok(other) => {
                tracing::error!(?other, "an event answered with another outcome");
                return Err(ApiError::new("unavailable", "unexpected outcome"));
            }
            Err(Refusal { code, message, .. }) => {
                letter = Some(NewDeadLetter {
                    code: code.clone(),
                    message: message.clone(),
                    ..keep(&event)
                });
                EventResult::Rejected { code, message }
            }
        },
        Err(StoreError::Unavailable(reason)) => return Err(StoreError::Unavailable(reason).into()),
        // Same id, other content: refused, and kept for a person to look at.
        Err(error) => {
            let error = ApiError::from(error);
            letter = Some(NewDeadLetter {
                code: error.code.clone(),
                message: error.message.clone(),
                ..keep(&event)
            });
            EventResult::Rejected {
                code: error.code,
                message: error.message,
            }
        }
    };
    if let Some(letter) = letter {
        return dead_letter(state, letter).await;
    }
    Ok(result)
}

async fn dead_letter(state: &AppState, letter: NewDeadLetter) -> Result<EventResult, ApiError> {
    let (code, message) = (letter.code.clone(), letter.message.clone());
    state
        .store
        .execute(Command::DeadLetter(letter), None)
        .await
        .map_err(ApiError::from)?;
    Ok(EventResult::Rejected { code, message })
}

/// Keep a payload that is not an event at all (say, a malformed envelope).
pub async fn ingest_invalid(
    state: &AppState,
    payload: String,
    source: &str,
    why: &str,
) -> Result<EventResult, ApiError> {
    dead_letter(
        state,
        NewDeadLetter {
            source: source.to_owned(),
            event_id: None,
            customer_id: None,
            payload,
            code: UNREADABLE.into(),
            message: why.to_owned(),
        },
    )
    .await
}
