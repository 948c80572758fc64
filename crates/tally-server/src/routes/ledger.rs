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
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct LedgerParams {
    /// 1 to 1000, default 50.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Entries effective at or after this instant (RFC 3339).
    pub from: Option<String>,
    /// Entries effective before this instant (RFC 3339).
    pub to: Option<String>,
    /// Only entries of this kind.
    pub kind: Option<String>,
    /// Only entries of this member (a budget transfer shows for the member
    /// that sent and the one that received it).
    pub member_id: Option<String>,
    /// Only entries priced for this feature.
    pub feature: Option<String>,
    /// Only entries that moved credits into or out of this lot (grant id),
    /// changed it (an expiry change, a void), or for a capture spent from it.
    pub grant_id: Option<String>,
}

/// A customer's journal entries, newest first. A page reads at most 10,000
/// entries: a filtered page may hold fewer than `limit`, even none, and
/// still have a `next_cursor`; follow it until it is null.
#[utoipa::path(get, path = "/v1/customers/{id}/ledger", tag = "ledger", params(LedgerParams),
    responses((status = 200, body = Page<EntryBody>), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = ["read"])))]
pub async fn customer_ledger(
    State(state): State<AppState>,
    caller: Caller,
    Path(customer_id): Path<String>,
    params: ApiQuery<LedgerParams>,
) -> Result<Json<Page<EntryBody>>, ApiError> {
    caller.require(Scope::Read)?;
    let params = params.read()?;
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
        member_id: params
            .member_id
            .as_deref()
            .map(|m| edge::id(m, "member_id"))
            .transpose()?,
        feature: params
            .feature
            .as_deref()
            .map(|f| edge::id(f, "feature").map(|f| f.to_string()))
            .transpose()?,
        grant_id: params
            .grant_id
            .as_deref()
            .map(|g| edge::id(g, "grant_id").map(|g| g.to_string()))
            .transpose()?,
        start,
        limit,
    };
    if let (Some(from), Some(to)) = (query.from, query.to) {
        if to < from {
            return Err(ApiError::invalid("to", "to must not be before from"));
        }
    }
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

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct UsageParams {
    /// `feature` (default) or `member`.
    pub group_by: Option<String>,
    /// `hour`, `day` (default) or `month`: buckets in UTC.
    pub granularity: Option<String>,
    /// Usage at or after this instant (RFC 3339); default: 24 hours, 30 days
    /// or 12 months (by `granularity`) before `to`.
    pub from: Option<String>,
    /// Usage before this instant (RFC 3339); default: the end of the bucket
    /// that holds the present, so that the present counts.
    pub to: Option<String>,
}

/// One group's usage in one bucket.
#[derive(Serialize, ToSchema)]
pub struct UsageLineBody {
    /// The bucket's start (RFC 3339, UTC).
    pub bucket: String,
    /// The feature or member; null for usage without one (a charge by amount
    /// without a feature; spend by no member).
    pub group: Option<String>,
    /// Units used: the quantities of the charges and captures priced by
    /// feature and quantity ("0" for usage charged by amount).
    pub quantity: String,
    /// Credits the charges and captures consumed.
    pub credits: String,
    /// How many charges and captures.
    pub records: u64,
}

#[derive(Serialize, ToSchema)]
pub struct UsageBody {
    pub customer_id: String,
    pub group_by: String,
    pub granularity: String,
    pub from: String,
    pub to: String,
    /// Oldest bucket first; within a bucket, by group (null first). Buckets
    /// and groups without usage are left out.
    pub data: Vec<UsageLineBody>,
}

/// A customer's usage: quantity and credits per feature (or member) per hour,
/// day or month. Usage counts at its own time (a late event in the bucket of
/// its timestamp, a capture when it captured). Charges and captures count;
/// refunds are not netted out (they are in the ledger). At most 366 days per
/// request, and at most 200,000 of the customer's journal entries recorded
/// since 5 minutes before `from` (else 400 naming `from`).
#[utoipa::path(get, path = "/v1/customers/{id}/usage", tag = "ledger", params(UsageParams),
    responses((status = 200, body = UsageBody), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = ["read"])))]
pub async fn customer_usage(
    State(state): State<AppState>,
    caller: Caller,
    Path(customer_id): Path<String>,
    params: ApiQuery<UsageParams>,
) -> Result<Json<UsageBody>, ApiError> {
    use tally_store::{Granularity, UsageGroup, UsageQuery};
    caller.require(Scope::Read)?;
    let params = params.read()?;
    let id = edge::id(&customer_id, "id")?;
    let (group_by, group_name) = match params.group_by.as_deref() {
        None | Some("feature") => (UsageGroup::Feature, "feature"),
        Some("member") => (UsageGroup::Member, "member"),
        Some(_) => {
            return Err(ApiError::invalid(
                "group_by",
                "group_by must be feature or member",
            ))
        }
    };
    let (granularity, granularity_name) = match params.granularity.as_deref() {
        Some("hour") => (Granularity::Hour, "hour"),
        None | Some("day") => (Granularity::Day, "day"),
        Some("month") => (Granularity::Month, "month"),
        Some(_) => {
            return Err(ApiError::invalid(
                "granularity",
                "granularity must be hour, day or month",
            ))
        }
    };
    let to = match params.to.as_deref() {
        Some(text) => edge::instant(text, "to")?,
        None => granularity.next(state.store.now()),
    };
    let from = match params.from.as_deref() {
        Some(text) => edge::instant(text, "from")?,
        // The last 24 hours, 30 days or 12 months before `to`.
        None => {
            let buckets = match granularity {
                Granularity::Hour => 24,
                Granularity::Day => 30,
                Granularity::Month => 12,
            };
            let mut from = to;
            for _ in 0..buckets {
                from = granularity.bucket(tally_core::Timestamp(from.0.saturating_sub(1)));
            }
            if from < edge::MIN_INSTANT {
                return Err(ApiError::invalid(
                    "to",
                    "to is too early for the default window before it (from would fall before year 0000); give from",
                ));
            }
            from
        }
    };
    if from >= to {
        return Err(ApiError::invalid("from", "from must be before to"));
    }
    if to
        .plus_seconds(-MAX_USAGE_DAYS * DAY_SECONDS)
        .is_some_and(|earliest| from < earliest)
    {
        return Err(ApiError::invalid(
            "from",
            format!("a usage window spans at most {MAX_USAGE_DAYS} days"),
        ));
    }
    let query = UsageQuery {
        group_by,
        granularity,
        from,
        to,
    };
    let report = state
        .store
        .usage(id.clone(), query)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("customer {id}")))?
        .map_err(|tally_store::TooMuchUsage| {
            ApiError::invalid(
                "from",
                format!(
                    "this report would read more than {} of the customer's journal entries \
                     (every entry recorded since 5 minutes before from); ask for a window that \
                     starts later",
                    tally_store::MAX_USAGE_WALK
                ),
            )
        })?;
    Ok(Json(UsageBody {
        customer_id: id.to_string(),
        group_by: group_name.into(),
        granularity: granularity_name.into(),
        from: edge::rfc3339(from),
        to: edge::rfc3339(to),
        data: report
            .lines
            .into_iter()
            .map(|line| UsageLineBody {
                bucket: edge::rfc3339(line.bucket),
                group: line.group,
                quantity: crate::dto::micros(line.quantity_micros),
                credits: crate::dto::micros(line.credits_micros),
                records: line.records,
            })
            .collect(),
    }))
}

const DAY_SECONDS: i64 = 86_400;
/// The widest usage window one request may ask for.
const MAX_USAGE_DAYS: i64 = 366;

#[derive(Serialize, ToSchema)]
pub struct EntryDetail {
    #[serde(flatten)]
    pub entry: EntryBody,
    /// Why the entry exists, in words.
    pub explanation: String,
    /// For a capture: the lots its credits were spent from, and how much of
    /// each (its postings move them out of the hold, which reserved them from
    /// these lots).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paid_from: Option<Vec<crate::dto::DrawBody>>,
}

/// One journal entry with its postings and why it happened.
#[utoipa::path(get, path = "/v1/ledger/{entry_id}", tag = "ledger",
    responses((status = 200, body = EntryDetail), (status = 404, body = ErrorBody)), security(("bearer" = ["read"])))]
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
    let mut explanation = explain(&record.draft, record.facts.as_ref());
    let paid_from = match (&record.draft.kind, &record.draft.reference) {
        (EntryKind::Capture, Some(hold_id)) => {
            let paid = state
                .store
                .hold(hold_id.clone())
                .await?
                .map(|hold| hold.captured_draws())
                .unwrap_or_default();
            if !paid.is_empty() {
                let lots: Vec<String> = paid
                    .iter()
                    .map(|d| format!("{} from grant {}", amount(d.amount), d.grant_id))
                    .collect();
                explanation = format!(
                    "{explanation} The hold had reserved them: {}.",
                    lots.join(", ")
                );
            }
            Some(crate::dto::draws(&paid))
        }
        _ => None,
    };
    if let Some(pricing) = &record.pricing {
        explanation = format!("{explanation} {}.", pricing.describe());
    }
    Ok(Json(EntryDetail {
        explanation,
        entry: EntryBody::from(&record),
        paid_from,
    }))
}

/// A sentence for what an entry did, then each posting.
pub fn explain(entry: &EntryDraft, facts: Option<&tally_store::EntryFacts>) -> String {
    let lot = facts
        .and_then(|f| f.grant_id.as_deref())
        .map_or("a grant".to_owned(), |id| format!("grant {id}"));
    let never_or =
        |at: Option<tally_core::Timestamp>| at.map_or("never".to_owned(), |t| t.rfc3339());
    let other = facts
        .and_then(|f| f.counterparty.as_deref())
        .map_or("another customer".to_owned(), |c| format!("customer {c}"));
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
        EntryKind::Refund => match facts.and_then(|f| f.refund_of.as_deref()) {
            Some(of) => format!(
                "refund {reference} of {}{of}{} gave back {}",
                match facts.is_some_and(|f| f.refund_of_hold == Some(true)) {
                    true => "captured hold ",
                    false => "",
                },
                entry
                    .member_id
                    .as_ref()
                    .map_or(String::new(), |m| format!(" (spent by member {m})")),
                amount(entry.amount)
            ),
            None => format!("refund {reference} gave back {}", amount(entry.amount)),
        },
        EntryKind::Void => match facts.and_then(|f| f.grant_id.as_deref()) {
            Some(id) => format!(
                "void {reference} took back {} of grant {id}",
                amount(entry.amount)
            ),
            None => format!("void {reference} took back {}", amount(entry.amount)),
        },
        EntryKind::Expire => format!(
            "grant {reference} expired with {} unused",
            amount(entry.amount)
        ),
        EntryKind::ExpiryExtended => match facts.and_then(|f| f.expiry.as_ref()) {
            Some(change) => format!(
                "expiry change {reference} moved the expiry of {lot} from {} to {}",
                never_or(change.before),
                never_or(change.after)
            ),
            None => format!("expiry change {reference} moved {lot}'s expiry later"),
        },
        EntryKind::Reinstate => match facts.and_then(|f| f.expiry.as_ref()) {
            Some(change) => format!(
                "expiry change {reference} reinstated {} expired credits of {lot} (it expired at {}), {}",
                amount(entry.amount),
                never_or(change.expired_at.or(change.before)),
                change
                    .after
                    .map_or("with no expiry now".to_owned(), |t| format!("until {}", t.rfc3339()))
            ),
            // An upgrade's grace (its reference is the subscription), or
            // an expiry change recorded before entries kept their facts.
            None => format!(
                "{reference} reinstated {} expired credits",
                amount(entry.amount)
            ),
        },
        EntryKind::DebtRepaid => format!(
            "grant {reference} took effect and repaid {} of debt",
            amount(entry.amount)
        ),
        EntryKind::TransferOut => format!(
            "transfer {reference} sent {} to {other}",
            amount(entry.amount)
        ),
        EntryKind::TransferIn => format!(
            "transfer {reference} brought {} from {other}",
            amount(entry.amount)
        ),
        EntryKind::BudgetTransfer => match (
            entry.member_id.as_ref(),
            facts.and_then(|f| f.counterparty_member.as_deref()),
        ) {
            (Some(from), Some(to)) => format!(
                "transfer {reference} moved {} of budget from member {from} to member {to}",
                amount(entry.amount)
            ),
            _ => format!(
                "transfer {reference} moved {} of budget between members",
                amount(entry.amount)
            ),
        },
        EntryKind::GrantEffective => format!(
            "grant {reference} took effect: its {} credits became available",
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
    // A hold past the credits reserves the rest of its amount against the
    // overage limit: no credits move for that part (a capture takes it as
    // debt), so its postings add up to less than the entry's amount.
    let reserved = entry.overage_reserved();
    let lead = if reserved.is_positive() {
        format!(
            "{lead}, {} of it against the overage limit (no credits move for that part)",
            amount(reserved)
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
