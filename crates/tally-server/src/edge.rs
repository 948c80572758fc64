//! Parsing at the edge: JSON bodies, amounts, ids, instants, query strings.
//!
//! Everything a client sends is checked here and turned into domain values;
//! a bad value becomes a 400 naming the parameter, before anything is changed.

use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use tally_core::{Amount, Id, Timestamp};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::error::ApiError;

/// The largest request body accepted, in bytes.
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// A body declared longer than [`MAX_BODY_BYTES`] by a caller with a valid
/// API key is still read (and thrown away) up to this length before the 400
/// goes out; see [`drain_and_refuse`].
const MAX_DRAINED_BYTES: u64 = 64 * 1024 * 1024;

/// How long reading an oversized body to its end may take.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The way in of every request to the API's routes and its fallback (not
/// the docs, merged after it), one layer, in this order:
/// - a server that does not run the writer forwards a write to the one that
///   does ([`crate::forward::to_leader`]; a body declared too long is refused
///   there), which counts it;
/// - a request this server answers itself is counted and timed by its route
///   template ([`crate::metrics::Metrics::request`]), whatever the answer;
/// - a body whose `Content-Length` is over [`MAX_BODY_BYTES`] is refused
///   before the handler runs, with the same 400 `invalid_request` as a body
///   found too long while reading, and the rest of it read first if the
///   caller has a valid API key (else the key's 401, body unread:
///   [`drain_and_refuse`]).
///
/// One layer rather than one `from_fn` for each: each costs a boxed future
/// and a clone of the route per request. A build without any of the three
/// took about 7% more single charges a second than one with all three
/// (BENCHMARKS.md, 2026-12-06, thirteenth session).
pub async fn gate(
    axum::extract::State(state): axum::extract::State<crate::AppState>,
    request: Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if let Some(refusal) = dot_segment_refusal(&request) {
        return refusal;
    }
    let request = match crate::forward::to_leader(&state, request).await {
        Ok(forwarded) => return forwarded,
        Err(request) => request,
    };
    let started = std::time::Instant::now();
    let method = crate::metrics::method_label(request.method());
    let route = state.metrics.route_label(
        request
            .extensions()
            .get::<axum::extract::MatchedPath>()
            .map_or("unmatched", |p| p.as_str()),
    );
    let response = match declared_oversize(&request) {
        Some(declared) => drain_and_refuse(&state, request, declared).await,
        None => next.run(request).await,
    };
    state
        .metrics
        .request(method, route, response.status(), started.elapsed());
    response
}

/// The length a request declares, when that is over [`MAX_BODY_BYTES`].
pub fn declared_oversize(request: &Request) -> Option<u64> {
    request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok())
        .filter(|&declared| declared > MAX_BODY_BYTES as u64)
}

/// The 400 for a body declared `declared` bytes long, over the limit, sent
/// once the body is read to its end.
///
/// Answering without reading makes the server close the connection with the
/// client's bytes still unread, and the kernel then resets it: a client still
/// sending often gets the reset instead of the answer. So a declared length
/// up to [`MAX_DRAINED_BYTES`] is read to its end (for at most
/// [`DRAIN_TIMEOUT`]) and discarded, and the connection stays usable. A
/// longer one, or one sent without `Content-Length` (chunked), is still cut
/// off at the limit.
///
/// Reading is only for callers with a valid API key: a request without one
/// is answered at once (401, or what the key's look-up failed with) with its
/// body unread and `Connection: close`, so that nobody without a key can make
/// the server read 64 MiB.
pub async fn drain_and_refuse(
    state: &crate::AppState,
    request: Request,
    declared: u64,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    use futures_util::StreamExt;
    let (mut parts, body) = request.into_parts();
    if let Err(refused) = crate::auth::Caller::from_request_parts(&mut parts, state).await {
        let mut response = refused.into_response();
        response.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
        return response;
    }
    if declared <= MAX_DRAINED_BYTES {
        let mut body = body.into_data_stream();
        let drain = async { while let Some(Ok(_)) = body.next().await {} };
        // A client that stops sending is cut off when the time is up.
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, drain).await;
    }
    ApiError::new(
        "invalid_request",
        format!(
            "the body is {declared} bytes; the limit is {MAX_BODY_BYTES} bytes ({} MiB)",
            MAX_BODY_BYTES / (1024 * 1024)
        ),
    )
    .into_response()
}

/// A body read as bytes (to be parsed by the handler), refused unless it
/// is sent as JSON (`Content-Type: application/json`, or another
/// `application/*+json`) when it has any content: an empty body, where a
/// route allows one, needs no type. The refusal is handed to the handler
/// (which takes it with [`JsonBytes::bytes`] after checking the caller's
/// scope), so that a key without the scope hears 403 whatever it sent.
pub struct JsonBytes(Result<axum::body::Bytes, ApiError>);

impl JsonBytes {
    /// The body, or why it is refused (one holding the NUL character too).
    pub fn bytes(self) -> Result<axum::body::Bytes, ApiError> {
        self.0.and_then(refuse_nul)
    }

    /// The body as sent, NUL and all: a batch of usage events refuses each
    /// bad event on its own (its ids are checked, and a dead letter keeps
    /// the NUL as U+FFFD), so that one never fails its neighbours.
    pub fn bytes_as_sent(self) -> Result<axum::body::Bytes, ApiError> {
        self.0
    }
}

/// PostgreSQL's text cannot hold the NUL character (SQLite's can): a body
/// holding one is refused on both stores alike, before anything is done.
fn refuse_nul(bytes: axum::body::Bytes) -> Result<axum::body::Bytes, ApiError> {
    match holds_nul(&bytes) {
        true => Err(ApiError::new(
            "invalid_request",
            "text in the body may not hold the NUL character (\\u0000)",
        )),
        false => Ok(bytes),
    }
}

/// Whether JSON text holds the NUL character: the escape `\u0000` (a raw
/// NUL byte is not JSON at all, and fails to parse), not counting an
/// escaped backslash followed by `u0000`.
fn holds_nul(json: &[u8]) -> bool {
    let mut at = 0;
    while at < json.len() {
        if json[at] == b'\\' {
            if json[at + 1..].starts_with(b"u0000") {
                return true;
            }
            at += 2; // the escaped character, whatever it is
        } else {
            at += 1;
        }
    }
    false
}

impl<S: Send + Sync> FromRequest<S> for JsonBytes {
    type Rejection = std::convert::Infallible;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let json = request
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(is_json);
        // A compressed body would be read as if it were the JSON itself.
        let encoded = request
            .headers()
            .get_all(axum::http::header::CONTENT_ENCODING)
            .iter()
            .any(|value| !value.as_bytes().eq_ignore_ascii_case(b"identity"));
        let bytes = match axum::body::Bytes::from_request(request, state).await {
            Ok(bytes) => bytes,
            Err(e) => {
                if let Some(cut) = crate::serve::body_cut(&e) {
                    return Ok(JsonBytes(Err(cut)));
                }
                return Ok(JsonBytes(Err(ApiError::new(
                    "invalid_request",
                    e.body_text(),
                ))));
            }
        };
        if encoded {
            return Ok(JsonBytes(Err(ApiError::new(
                "invalid_request",
                "Content-Encoding is not supported: send the body uncompressed",
            ))));
        }
        if !json && !bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(JsonBytes(Err(ApiError::new(
                "invalid_request",
                "send the body as JSON with Content-Type: application/json",
            ))));
        }
        Ok(JsonBytes(Ok(bytes)))
    }
}

/// Whether a `Content-Type` names JSON: `application/json` or
/// `application/<anything>+json`, with any parameters.
fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    // Case-insensitive, without a lowercased copy: this runs for every body.
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    kind.eq_ignore_ascii_case("application")
        && (subtype.eq_ignore_ascii_case("json")
            || subtype
                .len()
                .checked_sub(5)
                .and_then(|at| subtype.get(at..))
                .is_some_and(|end| end.eq_ignore_ascii_case("+json")))
}

/// Free-form JSON in a request (metadata, properties, rules, a plan's
/// period) read like `serde_json::Value`, except that an object naming a key
/// twice, at any depth, is refused: `serde_json::Value` keeps the last one
/// silently, so `{"model": "a", "model": "b"}` would be read as `"b"`.
pub struct StrictValue(pub serde_json::Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

/// The key serde_json's `arbitrary_precision` numbers travel under.
const PRIVATE_NUMBER: &str = "$serde_json::private::Number";

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("any JSON value")
    }

    fn visit_bool<E>(self, value: bool) -> Result<Self::Value, E> {
        Ok(value.into())
    }

    fn visit_i64<E>(self, value: i64) -> Result<Self::Value, E> {
        Ok(value.into())
    }

    fn visit_u64<E>(self, value: u64) -> Result<Self::Value, E> {
        Ok(value.into())
    }

    fn visit_f64<E: serde::de::Error>(self, value: f64) -> Result<Self::Value, E> {
        serde_json::Number::from_f64(value)
            .map(serde_json::Value::Number)
            .ok_or_else(|| E::custom("a number JSON cannot hold"))
    }

    fn visit_str<E>(self, value: &str) -> Result<Self::Value, E> {
        Ok(value.into())
    }

    fn visit_string<E>(self, value: String) -> Result<Self::Value, E> {
        Ok(value.into())
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        StrictValue::deserialize(deserializer).map(|value| value.0)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictValue(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(serde_json::Value::Array(items))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            // serde_json (built with `arbitrary_precision`) hands a number
            // that is not a 64-bit integer to the visitor as a map of this
            // one key to the number's text.
            if key == PRIVATE_NUMBER && object.is_empty() {
                let text: String = map.next_value()?;
                let number = text
                    .parse::<serde_json::Number>()
                    .map_err(serde::de::Error::custom)?;
                return Ok(serde_json::Value::Number(number));
            }
            if object.contains_key(&key) {
                return Err(serde::de::Error::custom(format!("duplicate key `{key}`")));
            }
            let StrictValue(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(serde_json::Value::Object(object))
    }
}

/// `#[serde(deserialize_with)]` for a `serde_json::Value` field: [`StrictValue`].
pub fn strict<'de, D: Deserializer<'de>>(deserializer: D) -> Result<serde_json::Value, D::Error> {
    StrictValue::deserialize(deserializer).map(|value| value.0)
}

/// [`strict`] for an optional field (with `#[serde(default)]`).
pub fn strict_opt<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<serde_json::Value>, D::Error> {
    Option::<StrictValue>::deserialize(deserializer).map(|value| value.map(|v| v.0))
}

/// [`strict`] for a list.
pub fn strict_vec<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<serde_json::Value>, D::Error> {
    Vec::<StrictValue>::deserialize(deserializer)
        .map(|values| values.into_iter().map(|v| v.0).collect())
}

/// [`strict`] for an optional list (with `#[serde(default)]`).
pub fn strict_opt_vec<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Vec<serde_json::Value>>, D::Error> {
    Option::<Vec<StrictValue>>::deserialize(deserializer)
        .map(|values| values.map(|values| values.into_iter().map(|v| v.0).collect()))
}

/// `#[serde(default, deserialize_with = "present")]` on an `Option<Option<T>>`
/// field: `None` when the field is left out, `Some(None)` when it is `null`.
pub fn present<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(deserializer).map(Some)
}

/// A [`present`] field that may be left out but not be `null` (a PATCH
/// keeps what is left out; `null` would say to remove what cannot be).
pub fn not_null<T>(field: Option<Option<T>>, param: &str) -> Result<Option<T>, ApiError> {
    match field {
        Some(None) => Err(ApiError::invalid(
            param,
            format!("{param} may not be null; leave it out to keep it"),
        )),
        Some(Some(value)) => Ok(Some(value)),
        None => Ok(None),
    }
}

/// A JSON body whose rejections are API errors. The refusal is handed to the
/// handler, which takes the body with [`ApiJson::read`] after checking the
/// caller's scope: a key without the scope hears 403 whatever it sent, before
/// any 400 about the body (API.md).
pub struct ApiJson<T>(Result<T, ApiError>);

impl<T> ApiJson<T> {
    /// The body, or why it cannot be read.
    pub fn read(self) -> Result<T, ApiError> {
        self.0
    }
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = std::convert::Infallible;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Ok(body) = JsonBytes::from_request(request, state).await;
        Ok(ApiJson(body.bytes().and_then(|bytes| {
            // A JSON array would otherwise fill the struct's fields by position.
            match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
                Some(b'{') => {}
                _ => {
                    return Err(ApiError::new(
                        "invalid_request",
                        "send a JSON object as the body, with Content-Type: application/json",
                    ))
                }
            }
            parse_body(&bytes)
        })))
    }
}

/// A JSON body read into `T`: its structs take only objects, at any depth
/// ([`crate::objects`]), and nothing may follow the document.
pub fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    crate::objects::from_slice(bytes).map_err(|error| json_error(&error))
}

fn json_error(error: &serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    // (The content type is `JsonBytes`'s to check, before.)
    match error.inner().classify() {
        serde_json::error::Category::Data => match data_error_param(error) {
            Some(param) => ApiError::invalid(&param, error.to_string()),
            None => ApiError::new("invalid_request", error.to_string()),
        },
        _ => ApiError::new(
            "invalid_request",
            format!(
                "the body is not valid JSON: Failed to parse the request body as JSON: {error}"
            ),
        ),
    }
}

/// The field a JSON body's data error is about, as a path (`amount`,
/// `events[2].quantity`, `from.customer_id`): where the deserializer stopped,
/// and for a missing or unknown field, that field's name below it.
fn data_error_param(error: &serde_path_to_error::Error<serde_json::Error>) -> Option<String> {
    let path = error.path().to_string();
    let path = (path != "." && !path.contains('?')).then_some(path);
    let inner = error.inner().to_string();
    let named = named_field(&inner);
    match (path, named) {
        // An unknown field's path already ends with it; a missing one's does not.
        (Some(path), Some(name)) if path == name || path.ends_with(&format!(".{name}")) => {
            Some(path)
        }
        (Some(path), Some(name)) => Some(format!("{path}.{name}")),
        (Some(path), None) => Some(path),
        (None, Some(name)) => Some(name.to_string()),
        (None, None) => None,
    }
}

/// The field a deserializer's message names: a missing, unknown or repeated one.
fn named_field(message: &str) -> Option<&str> {
    ["missing field `", "unknown field `", "duplicate field `"]
        .iter()
        .find_map(|prefix| message.strip_prefix(prefix))
        .and_then(|rest| rest.split('`').next())
        .filter(|name| !name.is_empty())
}

/// The field a deserializer stopped at (`limit`, `from.customer_id`), or for
/// a field missing or not known at the top, its name from the message.
pub fn error_param<E: std::fmt::Display>(error: &serde_path_to_error::Error<E>) -> Option<String> {
    let path = error.path().to_string();
    match !path.is_empty() && path != "." {
        true => Some(path),
        false => named_field(&error.inner().to_string()).map(str::to_owned),
    }
}

/// A query string whose rejections are API errors, handed to the handler as
/// [`ApiJson`] hands a body: read with [`ApiQuery::read`] after the scope is
/// checked, so that a key without the scope hears 403 whatever it asked.
pub struct ApiQuery<T>(Result<T, ApiError>);

impl<T> ApiQuery<T> {
    /// The query, or why it cannot be read.
    pub fn read(self) -> Result<T, ApiError> {
        self.0
    }
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Ok(ApiQuery(
            match axum::extract::Query::<T>::from_request_parts(parts, state).await {
                Ok(axum::extract::Query(value)) => Ok(value),
                Err(rejection) => Err(query_error::<T>(rejection, parts.uri.query())),
            },
        ))
    }
}

/// The query parameter a query string's error is about (`limit` in
/// `?limit=abc`) and what is wrong with it, read again with the path kept.
fn query_param<T: DeserializeOwned>(query: Option<&str>) -> Option<(Option<String>, String)> {
    let parse = form_urlencoded::parse(query.unwrap_or_default().as_bytes());
    match serde_path_to_error::deserialize::<_, T>(serde_urlencoded::Deserializer::new(parse)) {
        Err(error) => Some((error_param(&error), error.inner().to_string())),
        Ok(_) => None,
    }
}

fn query_error<T: DeserializeOwned>(rejection: QueryRejection, query: Option<&str>) -> ApiError {
    match query_param::<T>(query) {
        // Every list's `limit` says the same, whatever the text was (but
        // a `limit` where none is taken, or given twice, says so).
        Some((Some(param), detail))
            if param == "limit"
                && !detail.starts_with("unknown field")
                && !detail.starts_with("duplicate field") =>
        {
            ApiError::invalid("limit", "limit must be a whole number between 1 and 1000")
        }
        Some((Some(param), detail)) => {
            ApiError::invalid(&param, format!("bad query string: {param}: {detail}"))
        }
        Some((None, detail)) => {
            ApiError::new("invalid_request", format!("bad query string: {detail}"))
        }
        None => ApiError::new(
            "invalid_request",
            format!("bad query string: {}", rejection.body_text()),
        ),
    }
}

/// Path parameters whose rejections (e.g. a segment that is not UTF-8) are API errors.
///
/// Named `Path`, like axum's, so that the OpenAPI generator still documents
/// the path parameters of the handlers that use it.
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Path(value)),
            Err(rejection) => Err(ApiError::new(
                "invalid_request",
                format!("bad path: {}", rejection.body_text()),
            )),
        }
    }
}

/// An amount as sent: a decimal string or a JSON number, never rounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AmountInput(pub Amount);

/// In the OpenAPI document: a decimal string (at most 6 fractional digits,
/// never rounded) or a JSON number with the same digits.
impl utoipa::PartialSchema for AmountInput {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(r"^-?[0-9]+(\.[0-9]{1,6})?$"))
                    .examples(["1.5"]),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Number)
                    .examples([1.5]),
            )
            .description(Some(
                "an amount: a decimal string such as \"1.5\" (preferred: JSON numbers lose digits in \
                 many clients) or a number; at most 6 fractional digits, never rounded",
            ))
            .into()
    }
}

impl utoipa::ToSchema for AmountInput {}

impl<'de> Deserialize<'de> for AmountInput {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        // serde_json's arbitrary_precision keeps a number's exact text.
        let text = match serde_json::Value::deserialize(deserializer)? {
            serde_json::Value::String(text) => text,
            serde_json::Value::Number(number) => {
                let text = number.to_string();
                // A number in exponent form (`1e-05`, as Python writes
                // 0.00001) is the same number: written out in full, exactly.
                match text.contains(['e', 'E']) {
                    true => tally_core::amount::written_out(&text).ok_or_else(|| {
                        D::Error::custom(format!(
                            "amount {text:?}: amount must be a decimal number within 1,000,000,000,000 \
                             with at most 6 fractional digits"
                        ))
                    })?,
                    false => text,
                }
            }
            _ => {
                return Err(D::Error::custom(
                    "amount must be a decimal string such as \"1.5\" or a number",
                ))
            }
        };
        Amount::parse(&text)
            .map(AmountInput)
            .map_err(|e| D::Error::custom(format!("amount {text:?}: {e}")))
    }
}

/// Written back as a decimal string, as every amount in a response.
impl serde::Serialize for AmountInput {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0.to_string())
    }
}

/// A positive amount, or a 400 naming `param`.
pub fn positive(amount: AmountInput, param: &str) -> Result<Amount, ApiError> {
    if amount.0.is_positive() {
        Ok(amount.0)
    } else {
        Err(ApiError::invalid(
            param,
            format!("{param} must be greater than zero"),
        ))
    }
}

/// Parse a client-chosen id, or a 400 naming `param`.
pub fn id(text: &str, param: &str) -> Result<Id, ApiError> {
    if is_dot_segment(text) {
        return Err(ApiError::invalid(
            param,
            format!("{param} may not be . or .. (a URL path cannot name it)"),
        ));
    }
    Id::parse(text).map_err(|e| ApiError::invalid(param, format!("{param}: {e}")))
}

/// `.` or `..`, also percent-encoded (`%2e`): a segment a URL's path
/// resolves away, so that a proxy, a browser or this server's own
/// forwarding to the writer would send the request to another route.
fn is_dot_segment(segment: &str) -> bool {
    let decoded = segment.replace("%2e", ".").replace("%2E", ".");
    decoded == "." || decoded == ".."
}

/// A 400 for a path with a `.` or `..` segment, before it is forwarded or
/// routed: the writer would see another path than this server did.
fn dot_segment_refusal(request: &Request) -> Option<axum::response::Response> {
    use axum::response::IntoResponse;
    request
        .uri()
        .path()
        // A URL parser reads `\` as `/` in an http(s) path (the forwarding
        // to the writer would resolve `x\..\` away).
        .split(['/', '\\'])
        .any(is_dot_segment)
        .then(|| {
            ApiError::invalid(
                "path",
                "a path segment may not be . or .. (an id may not be either)",
            )
            .into_response()
        })
}

/// The last instant the API can write: 9999-12-31T23:59:59.999999Z.
pub const MAX_INSTANT: Timestamp = Timestamp(253_402_300_799_999_999);
/// The first instant the API can write: 0000-01-01T00:00:00Z.
pub const MIN_INSTANT: Timestamp = Timestamp(-62_167_219_200_000_000);

/// Parse an RFC 3339 instant, or a 400 naming `param`.
pub fn instant(text: &str, param: &str) -> Result<Timestamp, ApiError> {
    let parsed = OffsetDateTime::parse(text, &Rfc3339).map_err(|_| {
        ApiError::invalid(
            param,
            format!("{param} must be an RFC 3339 time such as 2026-01-31T00:00:00Z"),
        )
    })?;
    let micros = parsed.unix_timestamp_nanos() / 1000;
    // An offset can carry a valid local time outside the years 0000-9999 in UTC.
    let in_range = |t: &Timestamp| (MIN_INSTANT..=MAX_INSTANT).contains(t);
    i64::try_from(micros)
        .ok()
        .map(Timestamp)
        .filter(in_range)
        .ok_or_else(|| {
            ApiError::invalid(
                param,
                format!("{param} must be between 0000-01-01T00:00:00Z and 9999-12-31T23:59:59Z"),
            )
        })
}

/// An instant as RFC 3339 UTC text ([`Timestamp::rfc3339`]).
pub fn rfc3339(at: Timestamp) -> String {
    at.rfc3339()
}

/// A free-text field with a bounded length.
pub fn text(
    value: Option<String>,
    param: &str,
    max_chars: usize,
) -> Result<Option<String>, ApiError> {
    match value {
        Some(v) if v.chars().count() > max_chars => Err(ApiError::invalid(
            param,
            format!("{param} must be at most {max_chars} characters"),
        )),
        other => Ok(other),
    }
}

/// A metadata object, stored as its JSON text.
pub fn metadata(value: Option<serde_json::Value>) -> Result<Option<String>, ApiError> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Object(map)) => {
            let text = serde_json::to_string(&map).expect("json serializes");
            if text.len() > 16 * 1024 {
                return Err(ApiError::invalid(
                    "metadata",
                    "metadata must be at most 16 KiB of JSON",
                ));
            }
            Ok(Some(text))
        }
        Some(_) => Err(ApiError::invalid(
            "metadata",
            "metadata must be a JSON object",
        )),
    }
}

/// Stored metadata text back to JSON.
pub fn metadata_value(text: &Option<String>) -> Option<serde_json::Value> {
    text.as_ref().and_then(|t| serde_json::from_str(t).ok())
}

/// A list cursor `<prefix><sequence>` as this API returns them, or a 400.
pub fn cursor(value: Option<&str>, prefix: &str) -> Result<Option<i64>, ApiError> {
    value
        .map(|c| {
            c.strip_prefix(prefix)
                .and_then(|n| n.parse::<i64>().ok())
                .ok_or_else(|| ApiError::invalid("cursor", "cursor is not one this API returned"))
        })
        .transpose()
}

/// `?limit=&cursor=` of a list that is read whole and paged in memory (the
/// price book's features and versions, plans, credit packs, webhook
/// endpoints, a customer's members and contracts: configuration, not history).
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// 1 to 1000, default 50.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// One page of `items` (the whole list, in its order): up to `limit` items
/// after the one the cursor names, and the cursor of the next page when
/// there are more. A cursor names the last item of its page by its key
/// (`key`), so an item added meanwhile shows on a later page if it sorts
/// after it; a cursor whose item is not in the list is a 400.
pub fn page<T>(
    items: Vec<T>,
    key: impl Fn(&T) -> &str,
    params: &ListParams,
) -> Result<(Vec<T>, Option<String>), ApiError> {
    let limit = limit(params.limit)?;
    let bad = || {
        ApiError::invalid(
            "cursor",
            "cursor is not one this API returned for this list",
        )
    };
    let start = match params.cursor.as_deref() {
        None => 0,
        Some(cursor) => {
            let after = cursor.strip_prefix(CURSOR_PREFIX).ok_or_else(bad)?;
            items
                .iter()
                .position(|item| key(item) == after)
                .ok_or_else(bad)?
                + 1
        }
    };
    let mut rest: Vec<T> = items.into_iter().skip(start).collect();
    let next = if rest.len() > limit {
        rest.truncate(limit);
        rest.last()
            .map(|item| format!("{CURSOR_PREFIX}{}", key(item)))
    } else {
        None
    };
    Ok((rest, next))
}

/// What starts a cursor of [`page`].
const CURSOR_PREFIX: &str = "after:";

/// The `limit` of a list: default 50, at most 1000.
pub fn limit(value: Option<usize>) -> Result<usize, ApiError> {
    match value.unwrap_or(50) {
        0 => Err(ApiError::invalid(
            "limit",
            "limit must be a whole number between 1 and 1000",
        )),
        n if n > 1000 => Err(ApiError::invalid(
            "limit",
            "limit must be a whole number between 1 and 1000",
        )),
        n => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_from_strings_and_numbers_are_exact() {
        let parse = |json: &str| serde_json::from_str::<AmountInput>(json).map(|a| a.0.micros());
        assert_eq!(parse("\"1.5\"").unwrap(), 1_500_000);
        assert_eq!(parse("1.5").unwrap(), 1_500_000);
        assert_eq!(parse("0.1").unwrap(), 100_000);
        assert_eq!(parse("12").unwrap(), 12_000_000);
        assert!(parse("1.0000001").is_err());
        assert!(parse("true").is_err());
        // Exponent forms are the same numbers (Python writes 0.00001 as
        // 1e-05; they were refused): exact, and held to the same digits.
        assert_eq!(parse("1e3").unwrap(), 1_000_000_000);
        assert_eq!(parse("1E+3").unwrap(), 1_000_000_000);
        assert_eq!(parse("1e-05").unwrap(), 10);
        assert_eq!(parse("-2.5e-1").unwrap(), -250_000);
        assert_eq!(parse("1.500e2").unwrap(), 150_000_000);
        assert_eq!(parse("123456e-6").unwrap(), 123_456);
        assert_eq!(parse("1e12").unwrap(), 1_000_000_000_000_000_000);
        assert!(parse("1e-07").is_err(), "7 fractional digits");
        assert!(parse("1e13").is_err(), "past the largest amount");
        assert!(parse("1e400").is_err());
        assert!(parse("1e-400").is_err());
    }

    #[test]
    fn json_content_types_are_recognised_in_any_case() {
        for yes in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/vnd.tally+json",
            " application/problem+JSON ",
        ] {
            assert!(is_json(yes), "{yes}");
        }
        for no in [
            "text/plain",
            "application/jsonx",
            "text/json",
            "application",
            "json",
            "application/x+jso",
        ] {
            assert!(!is_json(no), "{no}");
        }
    }

    #[test]
    fn the_nul_character_is_found_only_as_an_escape() {
        assert!(holds_nul(br#"{"name":"a\u0000b"}"#));
        assert!(
            holds_nul(br#"{"name":"\\\u0000"}"#),
            "a backslash, then NUL"
        );
        assert!(
            !holds_nul(br#"{"name":"\\u0000"}"#),
            "a backslash, then u0000"
        );
        assert!(holds_nul(br#"{"name":"\u00001"}"#), "NUL, then 1");
        assert!(!holds_nul(br#"{"name":"\u0001 u0000"}"#));
        assert!(!holds_nul(br#"{"name":"trailing\"#));
    }

    #[test]
    fn instants_round_trip() {
        let at = instant("2026-11-25T10:00:00.5Z", "t").unwrap();
        assert_eq!(rfc3339(at), "2026-11-25T10:00:00.500000Z");
        let at = instant("1969-12-31T23:59:59.000001Z", "t").unwrap();
        assert_eq!(rfc3339(at), "1969-12-31T23:59:59.000001Z");
        assert_eq!(rfc3339(Timestamp(0)), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(MAX_INSTANT), "9999-12-31T23:59:59.999999Z");
        assert_eq!(
            instant("9999-12-31T23:59:59.999999Z", "t").unwrap(),
            MAX_INSTANT
        );
        assert!(instant("yesterday", "t").is_err());
        // Valid RFC 3339 text whose UTC instant falls outside years 0000-9999.
        assert!(instant("0000-01-01T00:00:00+23:59", "t").is_err());
        assert!(instant("9999-12-31T23:59:59-23:59", "t").is_err());
        assert_eq!(instant("0000-01-01T00:00:00Z", "t").unwrap(), MIN_INSTANT);
        assert_eq!(rfc3339(MIN_INSTANT), "0000-01-01T00:00:00Z");
        assert!(!rfc3339(Timestamp(i64::MIN)).is_empty());
    }
}
