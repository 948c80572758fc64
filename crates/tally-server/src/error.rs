//! The one table from every error to its HTTP status, type and stable code.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use tally_store::{Refusal, StoreError};
use utoipa::ToSchema;

/// An error as the API reports it.
#[derive(Clone, Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
    pub param: Option<String>,
    pub retry_after_seconds: Option<u32>,
}

/// `{"error": {...}}`
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// The family: `invalid_request_error`, `authentication_error`, `permission_error`,
    /// `not_found_error`, `conflict_error`, `credit_error`, `api_error`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Stable machine-readable code, e.g. `insufficient_credits`.
    pub code: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
}

/// Status and type for each stable code.
pub fn classify(code: &str) -> (StatusCode, &'static str) {
    match code {
        "invalid_request" | "invalid_amount" | "invalid_expiry" | "amount_too_large"
        | "invalid_id" => (StatusCode::BAD_REQUEST, "invalid_request_error"),
        "method_not_allowed" => (StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error"),
        "request_timeout" => (StatusCode::REQUEST_TIMEOUT, "invalid_request_error"),
        "unauthorized" => (StatusCode::UNAUTHORIZED, "authentication_error"),
        "forbidden" | "manual_clock_disabled" => (StatusCode::FORBIDDEN, "permission_error"),
        "not_found" => (StatusCode::NOT_FOUND, "not_found_error"),
        "idempotency_conflict"
        | "hold_already_resolved"
        | "hold_expired"
        | "grant_not_active"
        | "reinstate_window_passed"
        | "pricebook_not_draft"
        | "dead_letter_resolved"
        | "dead_letter_not_replayable"
        | "plan_period_fixed"
        | "plan_set_by_subscription"
        | "renewal_refused"
        | "topup_not_pending" => (StatusCode::CONFLICT, "conflict_error"),
        "insufficient_credits" | "member_budget_exceeded" => {
            (StatusCode::PAYMENT_REQUIRED, "credit_error")
        }
        "capture_exceeds_hold"
        | "refund_exceeds_charge"
        | "no_price"
        | "unknown_feature"
        | "invalid_rules"
        | "member_without_budget" => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error"),
        "unavailable" | "overloaded" => (StatusCode::SERVICE_UNAVAILABLE, "api_error"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "api_error"),
    }
}

impl ApiError {
    pub fn new(code: &str, message: impl Into<String>) -> ApiError {
        let (status, _) = classify(code);
        ApiError {
            status,
            code: code.to_string(),
            message: message.into(),
            param: None,
            retry_after_seconds: None,
        }
    }

    pub fn invalid(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            param: Some(param.to_string()),
            ..ApiError::new("invalid_request", message)
        }
    }

    pub fn not_found(what: impl std::fmt::Display) -> ApiError {
        ApiError::new("not_found", format!("{what} not found"))
    }
}

/// The field a stored refusal is about, where its code and message tell
/// (refusals are kept without it, as a retry's answer).
pub fn refusal_param(code: &str, message: &str) -> Option<&'static str> {
    match code {
        "invalid_expiry" if message.contains("timeout") => Some("timeout_seconds"),
        "invalid_expiry" => Some("expires_at"),
        "invalid_request" if message.starts_with("effective_at") => Some("effective_at"),
        "invalid_request" if message.starts_with("start_at") => Some("start_at"),
        "invalid_request" if message.starts_with("change:") => Some("change"),
        "invalid_request" if message.starts_with("the id that starts") => Some("id"),
        "invalid_request"
            if message.starts_with("pinned_pricebook")
                || message.starts_with("give lock_rates or pinned_pricebook") =>
        {
            Some("pinned_pricebook")
        }
        "unknown_feature" | "no_price" => Some("feature"),
        // A capture by quantity is refused in units.
        "capture_exceeds_hold" if message.contains(" units") => Some("quantity"),
        "capture_exceeds_hold" | "refund_exceeds_charge" => Some("amount"),
        _ => None,
    }
}

impl From<&Refusal> for ApiError {
    fn from(refusal: &Refusal) -> ApiError {
        let param = refusal_param(&refusal.code, &refusal.message);
        ApiError {
            param: param.map(str::to_owned),
            ..ApiError::new(&refusal.code, refusal.message.clone())
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> ApiError {
        match error {
            StoreError::NotFound(what) => ApiError::not_found(what),
            StoreError::IdempotencyConflict(id) => ApiError::new(
                "idempotency_conflict",
                format!("id {id} was already used with different content; use a new id for a new request"),
            ),
            StoreError::HoldAlreadyResolved(id) => {
                ApiError::new("hold_already_resolved", format!("hold {id} is already resolved"))
            }
            StoreError::Rejected(refusal) => ApiError::from(&refusal),
            StoreError::BadCursor => ApiError::invalid("cursor", "cursor is not one this API returned for this list"),
            StoreError::Unavailable(reason) => {
                tracing::error!(%reason, "store unavailable");
                ApiError { retry_after_seconds: Some(1), ..ApiError::new("unavailable", "storage is unavailable") }
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (_, kind) = classify(&self.code);
        let body = ErrorBody {
            error: ErrorDetail {
                kind,
                code: self.code,
                message: self.message,
                param: self.param,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after_seconds {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        // A 401 names the scheme to authenticate with (RFC 9110, 11.6.1).
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"tally\""),
            );
        }
        response
    }
}
