//! The journal: a customer's entries and one entry with its explanation.

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use tally_core::{EntryDraft, EntryKind};
use tally_store::LedgerQuery;
use utoipa::{IntoParams, ToSchema};

use crate::auth::{Caller, Scope};
use crate::dto::{amount, EntryBody, Page};
use crate::edge::{self, ApiQuery, Path};
use crate::error::{ApiError, ErrorBody};
use crate::AppState;

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct LedgerParams {
    /// 1 to 1000, default 50.
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Entries effective at or after this instant (RFC 3339).
    pub from: Option<String>,
    /// Entries effective before this instant (RFC 3339).
    pub to: Option<String>,
    /// Only entries of this kind.
    pub kind: Option<String>,
}

/// A customer's journal entries, newest first.
#[utoipa::path(get, path = "/v1/customers/{id}/ledger", tag = "ledger", params(LedgerParams),
    responses((status = 200, body = Page<EntryBody>), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn customer_ledger(
    State(state): State<AppState>,
    caller: Caller,
    Path(customer_id): Path<String>,
    ApiQuery(params): ApiQuery<LedgerParams>,
) -> Result<Json<Page<EntryBody>>, ApiError> {
    caller.require(Scope::Read)?;
    let id = edge::id(&customer_id, "id")?;
    let limit = edge::limit(params.limit)?;
    let start = edge::cursor(params.cursor.as_deref(), "ent_")?;
    let kind = params
        .kind
        .as_deref()
        .map(|k| {
            EntryKind::parse(k).ok_or_else(|| {
                let kinds: Vec<&str> = EntryKind::ALL.iter().map(|k| k.as_str()).collect();
                ApiError::invalid("kind", format!("kind must be one of {}", kinds.join(", ")))
            })
        })
        .transpose()?;
    let query = LedgerQuery {
        from: params
            .from
            .as_deref()
            .map(|t| edge::instant(t, "from"))
            .transpose()?,
        to: params
            .to
            .as_deref()
            .map(|t| edge::instant(t, "to"))
            .transpose()?,
        kind,
        start,
        limit,
    };
    let page = state
        .store
        .ledger(id.clone(), query)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("customer {id}")))?;
    Ok(Json(Page {
        data: page.entries.iter().map(EntryBody::from).collect(),
        next_cursor: page.next.map(crate::dto::entry_id),
    }))
}

#[derive(Serialize, ToSchema)]
pub struct EntryDetail {
    #[serde(flatten)]
    pub entry: EntryBody,
    /// Why the entry exists, in words.
    pub explanation: String,
}

/// One journal entry with its postings and why it happened.
#[utoipa::path(get, path = "/v1/ledger/{entry_id}", tag = "ledger",
    responses((status = 200, body = EntryDetail), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub async fn get_entry(
    State(state): State<AppState>,
    caller: Caller,
    Path(entry_id): Path<String>,
) -> Result<Json<EntryDetail>, ApiError> {
    caller.require(Scope::Read)?;
    let not_found = || ApiError::not_found(format!("entry {entry_id}"));
    let sequence = entry_id
        .strip_prefix("ent_")
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(not_found)?;
    let record = state.store.entry(sequence).await?.ok_or_else(not_found)?;
    Ok(Json(EntryDetail {
        explanation: match &record.pricing {
            Some(pricing) => format!("{} {}.", explain(&record.draft), pricing.describe()),
            None => explain(&record.draft),
        },
        entry: EntryBody::from(&record),
    }))
}

/// A sentence for what an entry did, then each posting.
pub fn explain(entry: &EntryDraft) -> String {
    let reference = entry
        .reference
        .as_ref()
        .map_or(String::new(), |r| r.to_string());
    let spent_on = entry
        .feature
        .as_ref()
        .map_or(String::new(), |f| format!(" on {f}"));
    let member = entry
        .member_id
        .as_ref()
        .map_or(String::new(), |m| format!(" by member {m}"));
    let lead = match entry.kind {
        EntryKind::Grant => format!("grant {reference} added {} credits", amount(entry.amount)),
        EntryKind::Charge => format!(
            "charge {reference} spent {}{spent_on}{member}",
            amount(entry.amount)
        ),
        EntryKind::Hold => format!(
            "hold {reference} reserved {}{spent_on}{member}",
            amount(entry.amount)
        ),
        EntryKind::Capture => format!(
            "hold {reference} was captured for {}{spent_on}{member}",
            amount(entry.amount)
        ),
        EntryKind::Release => format!(
            "hold {reference} was released, returning {}",
            amount(entry.amount)
        ),
        EntryKind::HoldExpired => format!(
            "hold {reference} timed out, returning {}",
            amount(entry.amount)
        ),
        EntryKind::Refund => format!("refund {reference} gave back {}", amount(entry.amount)),
        EntryKind::Void => format!("void {reference} took back {}", amount(entry.amount)),
        EntryKind::Expire => format!(
            "grant {reference} expired with {} unused",
            amount(entry.amount)
        ),
        EntryKind::ExpiryExtended => {
            format!("expiry change {reference} moved a grant's expiry later")
        }
        EntryKind::Reinstate => format!(
            "expiry change {reference} reinstated {} expired credits",
            amount(entry.amount)
        ),
        EntryKind::DebtRepaid => format!(
            "grant {reference} took effect and repaid {} of debt",
            amount(entry.amount)
        ),
        EntryKind::TransferOut => format!(
            "transfer {reference} sent {} to another customer",
            amount(entry.amount)
        ),
        EntryKind::TransferIn => format!(
            "transfer {reference} brought {} from another customer",
            amount(entry.amount)
        ),
        EntryKind::BudgetTransfer => format!(
            "transfer {reference} moved {} of budget between members",
            amount(entry.amount)
        ),
        EntryKind::Rollover => format!(
            "{} unused plan credits rolled over into grant {reference}",
            amount(entry.amount)
        ),
    };
    let on_debt = entry.debt_drawn();
    let lead = if on_debt.is_positive() {
        format!(
            "{lead}, {} of it past the credits as debt under the overage policy",
            amount(on_debt)
        )
    } else {
        lead
    };
    let moves: Vec<String> = entry
        .postings
        .iter()
        .map(|p| format!("{} from {} to {}", amount(p.amount), p.from, p.to))
        .collect();
    let reason = entry
        .reason
        .as_ref()
        .map_or(String::new(), |r| format!(" (reason: {r})"));
    if moves.is_empty() {
        format!("{lead}{reason}.")
    } else {
        format!("{lead}{reason}: {}.", moves.join("; "))
    }
}
