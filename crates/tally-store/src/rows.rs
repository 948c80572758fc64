//! Conversions between SQLite rows and domain values.
//!
//! Every read of stored data goes through here, and each conversion checks
//! what it reads (a bad enum string or amount is a corrupt database, reported
//! as an error rather than trusted).

use crate::db::{self, params, Connection, Dialect, OptionalExtension, Row};
use tally_core::{
    Amount, CostBasis, CustomerLedger, EntryDraft, EntryKind, Grant, GrantStatus, Hold, HoldStatus,
    Id, Source, Timestamp,
};

use crate::model::{CustomerRecord, EntryRecord, GrantRecord};

/// A grant's columns over `grants g JOIN grant_balances b`, in the order
/// [`grant_record`] reads them.
macro_rules! grant_columns {
    () => {
        "g.id, g.customer_id, g.amount, b.remaining, g.source, g.paid, g.cost_per_credit, g.cost_currency, \
     g.priority, g.effective_at, g.expires_at, g.scope, g.status, b.expired_amount, g.expired_at, g.sequence, \
     g.metadata, g.external_reference, g.created_at, g.awaiting_effect, g.origin"
    };
}

macro_rules! hold_columns {
    () => {
        "id, customer_id, amount, reservations, status, created_at, expires_at, captured, feature, member_id, overdraft"
    };
}

macro_rules! entry_columns {
    () => {
        "sequence, customer_id, kind, amount, reference, member_id, feature, reason, actor, \
     postings, effective_at, recorded_at, balance_after, previous, pricing, facts"
    };
}
pub const ENTRY_COLUMNS: &str = entry_columns!();

fn corrupt(what: &str) -> db::Error {
    db::Error::Corrupt(what.to_string())
}

fn amount(row: &Row, index: usize) -> db::Result<Amount> {
    Amount::from_micros(row.get(index)?).ok_or_else(|| corrupt("amount out of range"))
}

fn id(row: &Row, index: usize) -> db::Result<Id> {
    Ok(Id::derived(&row.get::<_, String>(index)?))
}

fn optional_id(row: &Row, index: usize) -> db::Result<Option<Id>> {
    Ok(row
        .get::<_, Option<String>>(index)?
        .map(|s| Id::derived(&s)))
}

fn json<T: serde::de::DeserializeOwned>(text: &str) -> db::Result<T> {
    serde_json::from_str(text).map_err(|_| corrupt("bad json"))
}

pub fn grant_record(row: &Row) -> db::Result<GrantRecord> {
    let cost_basis = match (
        row.get::<_, Option<i64>>(6)?,
        row.get::<_, Option<String>>(7)?,
    ) {
        (Some(per_credit), Some(currency)) => Some(CostBasis {
            per_credit: Amount::from_micros(per_credit).ok_or_else(|| corrupt("cost basis"))?,
            currency,
        }),
        _ => None,
    };
    let scope = row
        .get::<_, Option<String>>(11)?
        .map(|s| json(&s))
        .transpose()?;
    let grant = Grant {
        id: id(row, 0)?,
        customer_id: id(row, 1)?,
        amount: amount(row, 2)?,
        remaining: amount(row, 3)?,
        source: Source::parse(&row.get::<_, String>(4)?).ok_or_else(|| corrupt("source"))?,
        paid: row.get(5)?,
        cost_basis,
        priority: row.get(8)?,
        effective_at: Timestamp(row.get(9)?),
        expires_at: row.get::<_, Option<i64>>(10)?.map(Timestamp),
        scope,
        status: GrantStatus::parse(&row.get::<_, String>(12)?)
            .ok_or_else(|| corrupt("grant status"))?,
        expired_amount: amount(row, 13)?,
        expired_at: row.get::<_, Option<i64>>(14)?.map(Timestamp),
        sequence: row.get(15)?,
        awaiting_effect: row.get(19)?,
        origin: row
            .get::<_, Option<String>>(20)?
            .map(|origin| Id::derived(&origin)),
    };
    Ok(GrantRecord {
        grant,
        metadata: row.get(16)?,
        external_reference: row.get(17)?,
        created_at: Timestamp(row.get(18)?),
    })
}

pub fn hold(row: &Row) -> db::Result<Hold> {
    Ok(Hold {
        id: id(row, 0)?,
        customer_id: id(row, 1)?,
        amount: amount(row, 2)?,
        reservations: json(&row.get::<_, String>(3)?)?,
        status: HoldStatus::parse(&row.get::<_, String>(4)?)
            .ok_or_else(|| corrupt("hold status"))?,
        created_at: Timestamp(row.get(5)?),
        expires_at: Timestamp(row.get(6)?),
        captured: amount(row, 7)?,
        feature: row.get(8)?,
        member_id: optional_id(row, 9)?,
        overdraft: amount(row, 10)?,
    })
}

pub fn entry(row: &Row) -> db::Result<EntryRecord> {
    let draft = EntryDraft {
        customer_id: id(row, 1)?,
        kind: EntryKind::parse(&row.get::<_, String>(2)?).ok_or_else(|| corrupt("entry kind"))?,
        amount: amount(row, 3)?,
        reference: optional_id(row, 4)?,
        member_id: optional_id(row, 5)?,
        feature: row.get(6)?,
        reason: row.get(7)?,
        postings: json(&row.get::<_, String>(9)?)?,
        effective_at: Timestamp(row.get(10)?),
        balance_after: amount(row, 12)?,
    };
    Ok(EntryRecord {
        sequence: row.get(0)?,
        draft,
        actor: row.get(8)?,
        recorded_at: Timestamp(row.get(11)?),
        pricing: row
            .get::<_, Option<String>>(14)?
            .map(|text| json(&text))
            .transpose()?,
        facts: row
            .get::<_, Option<String>>(15)?
            .map(|text| json(&text))
            .transpose()?,
    })
}

pub fn customer(connection: &Connection, customer_id: &str) -> db::Result<Option<CustomerRecord>> {
    Ok(customer_row(connection, customer_id, false)?.map(|row| row.record))
}

/// The customer's own columns, its debt and chain head, and the overage
/// policy in force (its own, else its active plan's).
macro_rules! customer_columns {
    (Sqlite) => {
        "SELECT c.id, c.name, c.plan, c.region, c.currency, c.metadata, c.created_at, \
         COALESCE(c.overage, (SELECT json_extract(p.body, '$.overage') FROM subscriptions s \
           JOIN plans p ON p.key = s.plan WHERE s.customer_id = c.id AND s.status = 'active' \
           AND json_extract(s.body, '$.period') >= 0)), c.debt, c.last_entry"
    };
    (Postgres) => {
        "SELECT c.id, c.name, c.plan, c.region, c.currency, c.metadata, c.created_at, \
         COALESCE(c.overage, (SELECT NULLIF((p.body::jsonb -> 'overage')::text, 'null') \
           FROM subscriptions s JOIN plans p ON p.key = s.plan WHERE s.customer_id = c.id \
           AND s.status = 'active' AND (s.body::jsonb -> 'period') >= '0'::jsonb)), \
         c.debt, c.last_entry"
    };
}

/// What the writer keeps of a customer beside its ledger (see
/// [`CustomerSettings`]), as scalar subqueries on the customer's row: one
/// round trip instead of four on PostgreSQL.
macro_rules! customer_settings {
    () => {
        ", c.overage, \
         (SELECT s.body FROM subscriptions s WHERE s.customer_id = c.id AND s.status = 'active'), \
         (SELECT a.body FROM customer_alerts a WHERE a.customer_id = c.id), \
         (SELECT t.body FROM auto_topups t WHERE t.customer_id = c.id), c.plan_history"
    };
}

/// A customer's row as [`customer_row`] reads it.
struct CustomerRow {
    record: CustomerRecord,
    debt: Amount,
    /// The chain head kept on the customer's own row (a customer without
    /// grants carries its head there).
    head: Option<i64>,
    settings: Option<CustomerSettings>,
}

/// What the writer caches of a customer beside its ledger, read with the
/// customer's row (see [`load_ledger_with_settings`]).
pub struct CustomerSettings {
    /// The active subscription, started or scheduled (at most one:
    /// `subscriptions_active`).
    pub subscription: Option<tally_core::Subscription>,
    /// The customer's own overage policy, if it set one.
    pub overage_override: Option<tally_core::OveragePolicy>,
    /// Its alert settings, if it set any.
    pub alerts: Option<crate::model::Alerts>,
    pub auto_topup: Option<tally_core::AutoTopupState>,
    /// The plans it was on, its present one last (empty until it first
    /// changed).
    pub plan_history: crate::model::PlanHistory,
}

/// A customer's record, what it owes, and the chain head kept on its own
/// row, in one statement; with `settings`, also its [`CustomerSettings`].
fn customer_row(
    connection: &Connection,
    customer_id: &str,
    settings: bool,
) -> db::Result<Option<CustomerRow>> {
    let sql = customer_sql(connection.dialect(), settings);
    let body = |row: &Row<'_>, column: usize| row.get::<_, Option<String>>(column);
    connection
        .prepare_cached(sql)?
        .query_row([customer_id], |row| {
            let overage = match row.get::<_, Option<String>>(7)? {
                Some(text) => json(&text)?,
                None => tally_core::OveragePolicy::Block,
            };
            let record = CustomerRecord {
                id: id(row, 0)?,
                name: row.get(1)?,
                plan: row.get(2)?,
                region: row.get(3)?,
                currency: row.get(4)?,
                metadata: row.get(5)?,
                created_at: Timestamp(row.get(6)?),
                overage,
            };
            let settings = match settings {
                false => None,
                true => Some(CustomerSettings {
                    overage_override: body(row, 10)?.map(|t| json(&t)).transpose()?,
                    subscription: body(row, 11)?.map(|t| json(&t)).transpose()?,
                    alerts: body(row, 12)?.map(|t| json(&t)).transpose()?,
                    auto_topup: body(row, 13)?.map(|t| json(&t)).transpose()?,
                    plan_history: body(row, 14)?
                        .map(|t| json(&t))
                        .transpose()?
                        .unwrap_or_default(),
                }),
            };
            Ok(CustomerRow {
                record,
                debt: amount(row, 8)?,
                head: row.get(9)?,
                settings,
            })
        })
        .optional()
}

/// The plans a customer was on (empty until its plan first changed).
pub fn plan_history(
    connection: &Connection,
    customer_id: &str,
) -> db::Result<crate::model::PlanHistory> {
    let text: Option<String> = connection
        .prepare_cached("SELECT plan_history FROM customers WHERE id = ?1")?
        .query_row([customer_id], |row| row.get(0))
        .optional()?
        .flatten();
    Ok(text.map(|t| json(&t)).transpose()?.unwrap_or_default())
}

/// The statement [`customer_row`] reads a customer by.
fn customer_sql(dialect: Dialect, settings: bool) -> &'static str {
    macro_rules! by_id {
        ($($columns:expr),+) => {
            concat!($($columns,)+ " FROM customers c WHERE c.id = ?1")
        };
    }
    match (dialect, settings) {
        (Dialect::Sqlite, false) => by_id!(customer_columns!(Sqlite)),
        (Dialect::Postgres, false) => by_id!(customer_columns!(Postgres)),
        (Dialect::Sqlite, true) => by_id!(customer_columns!(Sqlite), customer_settings!()),
        (Dialect::Postgres, true) => by_id!(customer_columns!(Postgres), customer_settings!()),
    }
}

/// A customer's grants with their balances and the entry each balance row
/// last carried.
const GRANTS_AND_HEAD: &str = concat!(
    "SELECT ",
    grant_columns!(),
    ", b.last_entry FROM grants g JOIN grant_balances b ON b.sequence = g.sequence \
     WHERE g.customer_id = ?1 ORDER BY g.sequence"
);

/// A customer's active holds.
const ACTIVE_HOLDS: &str = concat!(
    "SELECT ",
    hold_columns!(),
    " FROM holds WHERE customer_id = ?1 AND status = 'active'"
);

/// The candidates for the head of customer `?1`'s entry chain, as a table
/// `heads(head)`: the last entry each grant's balance row carried, and the
/// customer row's own (an aggregate over a union: the same SQL on both
/// databases). The head is the largest.
macro_rules! chain_heads {
    () => {
        "(SELECT MAX(b.last_entry) AS head FROM grants g \
           JOIN grant_balances b ON b.sequence = g.sequence WHERE g.customer_id = ?1 \
         UNION ALL SELECT last_entry FROM customers WHERE id = ?1) heads"
    };
}

/// The balance the customer's last entry reported: the entry at the head of
/// its chain, as [`chain_head`] finds it (no row: no entries yet).
const LAST_BALANCE: &str = concat!(
    "SELECT sequence, balance_after FROM entries WHERE sequence = (SELECT MAX(head) FROM ",
    chain_heads!(),
    ")"
);

/// A customer's members, by id.
const MEMBERS: &str = "SELECT body FROM members WHERE customer_id = ?1 ORDER BY id";

/// A customer's grants with their balances, oldest first.
pub fn customer_grants(connection: &Connection, customer_id: &str) -> db::Result<Vec<GrantRecord>> {
    Ok(grants_and_head(connection, customer_id)?.0)
}

/// A customer's grants, and the newest entry any of their balance rows
/// carries (the chain head, unless the customer row carries a newer one).
fn grants_and_head(
    connection: &Connection,
    customer_id: &str,
) -> db::Result<(Vec<GrantRecord>, Option<i64>)> {
    let mut statement = connection.prepare_cached(GRANTS_AND_HEAD)?;
    let mut rows = statement.query([customer_id])?;
    let mut records = Vec::new();
    let mut head: Option<i64> = None;
    while let Some(row) = rows.next()? {
        records.push(grant_record(&row)?);
        // `b.last_entry`, the column after the 21 of `grant_columns!`.
        head = head.max(row.get::<_, Option<i64>>(21)?);
    }
    Ok((records, head))
}

pub fn active_holds(connection: &Connection, customer_id: &str) -> db::Result<Vec<Hold>> {
    let mut statement = connection.prepare_cached(ACTIVE_HOLDS)?;
    let rows = statement.query_map([customer_id], hold)?;
    rows.collect()
}

pub fn hold_by_id(connection: &Connection, hold_id: &str) -> db::Result<Option<Hold>> {
    let sql = concat!("SELECT ", hold_columns!(), " FROM holds WHERE id = ?1");
    connection
        .prepare_cached(sql)?
        .query_row([hold_id], hold)
        .optional()
}

/// The head of a customer's entry chain; `None` when the customer does not exist.
pub fn customer_head(
    connection: &Connection,
    customer_id: &str,
) -> db::Result<Option<Option<i64>>> {
    let exists: bool = connection
        .prepare_cached("SELECT EXISTS(SELECT 1 FROM customers WHERE id = ?1)")?
        .query_row([customer_id], |row| row.get(0))?;
    if !exists {
        return Ok(None);
    }
    chain_head(connection, customer_id).map(Some)
}

/// The head of an existing customer's entry chain (`None`: no entries yet).
pub fn chain_head(connection: &Connection, customer_id: &str) -> db::Result<Option<i64>> {
    connection
        .prepare_cached(concat!(
            "SELECT COALESCE(MAX(head), 0) FROM ",
            chain_heads!()
        ))?
        .query_row([customer_id], |row| row.get::<_, i64>(0))
        .map(|head| (head > 0).then_some(head))
}

/// One entry and the sequence of the same customer's previous entry.
pub fn entry_link(
    connection: &Connection,
    sequence: i64,
) -> db::Result<Option<(EntryRecord, Option<i64>)>> {
    connection
        .prepare_cached(concat!(
            "SELECT ",
            entry_columns!(),
            " FROM entries WHERE sequence = ?1"
        ))?
        .query_row([sequence], |row| Ok((entry(row)?, row.get(13)?)))
        .optional()
}

/// A customer's ledger as [`load_ledger`] reads it.
pub struct LoadedLedger {
    pub ledger: CustomerLedger,
    pub customer: CustomerRecord,
    pub grants: Vec<GrantRecord>,
    /// The head of the customer's entry chain (`None`: no entries yet), as
    /// [`chain_head`] reads it.
    pub head: Option<i64>,
}

/// Load a customer's ledger; `None` when the customer does not exist. Four
/// statements: the customer (with its debt), its grants (with the chain
/// head), its active holds and its members.
pub fn load_ledger(connection: &Connection, customer_id: &Id) -> db::Result<Option<LoadedLedger>> {
    let queries = [
        customer_sql(connection.dialect(), false),
        GRANTS_AND_HEAD,
        ACTIVE_HOLDS,
        MEMBERS,
    ];
    read_ahead(connection, customer_id, &queries, || {
        Ok(read_ledger(connection, customer_id, false)?.map(|(loaded, _)| loaded))
    })
}

/// The writer's cold load: [`load_ledger`], the customer's
/// [`CustomerSettings`] read with its row, and the balance its last entry
/// reported (zero before any), in five statements. The settings are tested
/// by the HTTP tests that restart a server, in `it::plans`, `it::overage`,
/// `it::topups` and `it::notifications`: without any one setting, one fails.
pub fn load_ledger_with_settings(
    connection: &Connection,
    customer_id: &Id,
) -> db::Result<Option<(LoadedLedger, CustomerSettings, Amount)>> {
    let queries = [
        customer_sql(connection.dialect(), true),
        GRANTS_AND_HEAD,
        ACTIVE_HOLDS,
        MEMBERS,
        LAST_BALANCE,
    ];
    read_ahead(connection, customer_id, &queries, || {
        let Some((loaded, settings)) = read_ledger(connection, customer_id, true)? else {
            return Ok(None);
        };
        let settings = settings.expect("customer_row reads the settings when asked");
        let balance = match (loaded.head, last_balance(connection, customer_id)?) {
            (None, None) => Amount::ZERO,
            (Some(head), Some((sequence, balance))) if head == sequence => balance,
            (head, last) => {
                return Err(corrupt(&format!(
                    "customer {customer_id}: chain head {head:?}, last entry read {:?}",
                    last.map(|(sequence, _)| sequence)
                )))
            }
        };
        Ok(Some((loaded, settings, balance)))
    })
}

/// `read`, with the `queries` (each with the one parameter `customer_id`)
/// sent ahead together: on PostgreSQL in one round trip
/// ([`Connection::prefetch`]); what `read` did not take is dropped after it.
fn read_ahead<T>(
    connection: &Connection,
    customer_id: &Id,
    queries: &[&str],
    read: impl FnOnce() -> db::Result<T>,
) -> db::Result<T> {
    connection.prefetch(queries, customer_id.as_str())?;
    let read = read();
    connection.forget_prefetched();
    read
}

/// The sequence and reported balance of the entry at the head of a
/// customer's chain ([`LAST_BALANCE`]).
fn last_balance(connection: &Connection, customer_id: &Id) -> db::Result<Option<(i64, Amount)>> {
    connection
        .prepare_cached(LAST_BALANCE)?
        .query_row([customer_id.as_str()], |row| {
            let balance =
                Amount::from_micros(row.get(1)?).ok_or_else(|| corrupt("amount out of range"))?;
            Ok((row.get(0)?, balance))
        })
        .optional()
}

fn read_ledger(
    connection: &Connection,
    customer_id: &Id,
    settings: bool,
) -> db::Result<Option<(LoadedLedger, Option<CustomerSettings>)>> {
    let Some(CustomerRow {
        record: customer,
        debt,
        head: own_head,
        settings,
    }) = customer_row(connection, customer_id.as_str(), settings)?
    else {
        return Ok(None);
    };
    let (records, grants_head) = grants_and_head(connection, customer_id.as_str())?;
    let grants = records.iter().map(|r| r.grant.clone()).collect();
    let holds = active_holds(connection, customer_id.as_str())?;
    let members = members(connection, customer_id.as_str())?;
    let mut ledger = CustomerLedger::from_parts(customer_id.clone(), grants, holds)
        .with_debt(debt)
        .with_members(members);
    ledger.set_overage(customer.overage);
    // As `chain_head`: the largest over the balance rows and the customer row.
    let head = own_head.max(grants_head).filter(|head| *head > 0);
    let loaded = LoadedLedger {
        ledger,
        customer,
        grants: records,
        head,
    };
    Ok(Some((loaded, settings)))
}

/// Insert a new grant's rows.
pub fn insert_grant(
    connection: &Connection,
    grant: &Grant,
    record: Option<&GrantRecord>,
    now: Timestamp,
) -> db::Result<()> {
    let scope = grant
        .scope
        .as_ref()
        .map(|s| serde_json::to_string(s).expect("scope serializes"));
    connection
        .prepare_cached(
            "INSERT INTO grants (id, customer_id, amount, source, paid, cost_per_credit, cost_currency, priority, \
             effective_at, expires_at, scope, status, expired_at, sequence, metadata, external_reference, created_at, \
             awaiting_effect, origin) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,\
             COALESCE(?16, (SELECT o.external_reference FROM grants o WHERE o.id = ?19)),?17,?18,?19)",
        )?
        .execute(params![
            grant.id.as_str(),
            grant.customer_id.as_str(),
            grant.amount.micros(),
            grant.source.as_str(),
            grant.paid,
            grant.cost_basis.as_ref().map(|c| c.per_credit.micros()),
            grant.cost_basis.as_ref().map(|c| c.currency.as_str()),
            grant.priority,
            grant.effective_at.micros(),
            grant.expires_at.map(Timestamp::micros),
            scope,
            grant.status.as_str(),
            grant.expired_at.map(Timestamp::micros),
            grant.sequence,
            record.and_then(|r| r.metadata.as_deref()),
            record.and_then(|r| r.external_reference.as_deref()),
            record.map_or(now, |r| r.created_at).micros(),
            grant.awaiting_effect,
            grant.origin.as_ref().map(Id::as_str),
        ])?;
    connection
        .prepare_cached(
            "INSERT INTO grant_balances (sequence, remaining, expired_amount) VALUES (?1, ?2, ?3)",
        )?
        .execute(params![
            grant.sequence,
            grant.remaining.micros(),
            grant.expired_amount.micros()
        ])?;
    Ok(())
}

/// The fields of a grant a charge never changes: a change to them is rare and
/// also rewrites the `grants_due` index entry.
pub type GrantLifecycle = (
    tally_core::GrantStatus,
    Option<Timestamp>,
    Option<Timestamp>,
    bool,
);

pub fn lifecycle(grant: &Grant) -> GrantLifecycle {
    (
        grant.status,
        grant.expires_at,
        grant.expired_at,
        grant.awaiting_effect,
    )
}

/// Write what spending changes (remaining, expired amount, chain head), and,
/// when `lifecycle_changed`, the status and expiry too. The grant's rows
/// exist. The balance row is a deferred write (set-based on PostgreSQL).
pub fn update_grant(
    connection: &Connection,
    grant: &Grant,
    head: Option<i64>,
    lifecycle_changed: bool,
) -> db::Result<()> {
    connection.defer(
        db::Shape::UpdateByFirst,
        "UPDATE grant_balances SET remaining = ?2, expired_amount = ?3, last_entry = ?4 WHERE sequence = ?1",
        params![grant.sequence, grant.remaining.micros(), grant.expired_amount.micros(), head],
    )?;
    if lifecycle_changed {
        // Deferred too (a lot's expiry in a tick's renewals was a round trip
        // of its own on PostgreSQL); the grant's row was inserted by an
        // earlier statement, which ran at once.
        connection.defer(
            db::Shape::UpdateByFirst,
            "UPDATE grants SET status = ?2, expires_at = ?3, expired_at = ?4, awaiting_effect = ?5 \
             WHERE id = ?1",
            params![
                grant.id.as_str(),
                grant.status.as_str(),
                grant.expires_at.map(Timestamp::micros),
                grant.expired_at.map(Timestamp::micros),
                grant.awaiting_effect,
            ],
        )?;
    }
    Ok(())
}

pub fn upsert_hold(connection: &Connection, hold: &Hold) -> db::Result<()> {
    let mut statement = connection.prepare_cached(concat!(
        "INSERT INTO holds (",
        hold_columns!(),
        ") VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11) \
         ON CONFLICT(id) DO UPDATE SET status = excluded.status, captured = excluded.captured"
    ))?;
    statement.execute(params![
        hold.id.as_str(),
        hold.customer_id.as_str(),
        hold.amount.micros(),
        serde_json::to_string(&hold.reservations).expect("reservations serialize"),
        hold.status.as_str(),
        hold.created_at.micros(),
        hold.expires_at.micros(),
        hold.captured.micros(),
        hold.feature.as_deref(),
        hold.member_id.as_ref().map(Id::as_str),
        hold.overdraft.micros(),
    ])?;
    Ok(())
}

/// The journal entry insert (deferred: set-based with the group's other
/// entries on PostgreSQL, or a binary `COPY` for a large group).
pub(crate) const INSERT_ENTRY: &str = concat!(
    "INSERT INTO entries (",
    entry_columns!(),
    ") VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16)"
);

pub fn insert_entry(
    connection: &Connection,
    sequence: i64,
    draft: &EntryDraft,
    actor: Option<&str>,
    recorded_at: Timestamp,
    previous: Option<i64>,
    (pricing, facts): (
        Option<&tally_core::pricebook::Pricing>,
        Option<&crate::model::EntryFacts>,
    ),
) -> db::Result<()> {
    // Deferred: set-based with the group's other entries on PostgreSQL.
    connection.defer(
        db::Shape::Insert,
        INSERT_ENTRY,
        params![
            sequence,
            draft.customer_id.as_str(),
            draft.kind.as_str(),
            draft.amount.micros(),
            draft.reference.as_ref().map(Id::as_str),
            draft.member_id.as_ref().map(Id::as_str),
            draft.feature.as_deref(),
            draft.reason.as_deref(),
            actor,
            serde_json::to_string(&draft.postings).expect("postings serialize"),
            draft.effective_at.micros(),
            recorded_at.micros(),
            draft.balance_after.micros(),
            previous,
            pricing.map(|p| serde_json::to_string(p).expect("pricing serializes")),
            facts.map(|f| serde_json::to_string(f).expect("facts serialize")),
        ],
    )
}

const DEAD_LETTER_COLUMNS: &str =
    "id, source, event_id, customer_id, payload, code, message, attempts, \
     first_seen, last_seen, status, resolved_at, note";

pub fn dead_letter_row(row: &Row) -> db::Result<crate::DeadLetterRecord> {
    Ok(crate::DeadLetterRecord {
        id: row.get(0)?,
        source: row.get(1)?,
        event_id: row.get(2)?,
        customer_id: row.get(3)?,
        payload: row.get(4)?,
        code: row.get(5)?,
        message: row.get(6)?,
        attempts: row.get(7)?,
        first_seen: Timestamp(row.get(8)?),
        last_seen: Timestamp(row.get(9)?),
        status: crate::DeadLetterStatus::parse(&row.get::<_, String>(10)?)
            .ok_or_else(|| corrupt("dead letter status"))?,
        resolved_at: row.get::<_, Option<i64>>(11)?.map(Timestamp),
        note: row.get(12)?,
    })
}

pub fn dead_letter(
    connection: &Connection,
    id: i64,
) -> db::Result<Option<crate::DeadLetterRecord>> {
    let sql = format!("SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters WHERE id = ?1");
    connection
        .prepare_cached(&sql)?
        .query_row([id], dead_letter_row)
        .optional()
}

pub fn dead_letter_by_key(
    connection: &Connection,
    key: &str,
) -> db::Result<Option<crate::DeadLetterRecord>> {
    let sql = format!("SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters WHERE key = ?1");
    connection
        .prepare_cached(&sql)?
        .query_row([key], dead_letter_row)
        .optional()
}

/// Dead letters by id, from `after` (exclusive), optionally of one status and source.
pub fn dead_letters(
    connection: &Connection,
    status: Option<crate::DeadLetterStatus>,
    source: Option<&str>,
    after: i64,
    limit: usize,
) -> db::Result<Vec<crate::DeadLetterRecord>> {
    let sql = format!(
        "SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters WHERE id > ?1 \
         AND (CAST(?2 AS TEXT) IS NULL OR status = ?2) AND (CAST(?3 AS TEXT) IS NULL OR source = ?3) ORDER BY id LIMIT ?4"
    );
    let mut statement = connection.prepare_cached(&sql)?;
    let rows = statement.query_map(
        params![after, status.map(|s| s.as_str()), source, limit as i64],
        dead_letter_row,
    )?;
    rows.collect()
}

/// Every plan.
pub fn plans(connection: &Connection) -> db::Result<Vec<tally_core::Plan>> {
    let mut statement = connection.prepare_cached("SELECT body FROM plans ORDER BY key")?;
    let rows = statement.query_map([], |row| json(&row.get::<_, String>(0)?))?;
    rows.collect()
}

pub fn plan(connection: &Connection, key: &str) -> db::Result<Option<tally_core::Plan>> {
    connection
        .prepare_cached("SELECT body FROM plans WHERE key = ?1")?
        .query_row([key], |row| json(&row.get::<_, String>(0)?))
        .optional()
}

pub fn upsert_plan(
    connection: &Connection,
    plan: &tally_core::Plan,
    now: Timestamp,
    actor: Option<&str>,
) -> db::Result<()> {
    let body = serde_json::to_string(plan).expect("plan serializes");
    connection
        .prepare_cached(
            "INSERT INTO plans (key, body, created_at, updated_at, updated_by) VALUES (?1, ?2, ?3, ?3, ?4) \
             ON CONFLICT (key) DO UPDATE SET body = excluded.body, updated_at = excluded.updated_at, \
             updated_by = excluded.updated_by",
        )?
        .execute(params![plan.key, body, now.micros(), actor])?;
    Ok(())
}

/// A customer's subscriptions, the latest first.
pub fn subscriptions(
    connection: &Connection,
    customer_id: &str,
) -> db::Result<Vec<tally_core::Subscription>> {
    // The active one, else the one changed last (not the one starting last:
    // a canceled subscription that was to start in years would hide a newer
    // one).
    let mut statement = connection.prepare_cached(
        "SELECT body FROM subscriptions WHERE customer_id = ?1 \
         ORDER BY status = 'active' DESC, updated_at DESC, id DESC",
    )?;
    let rows = statement.query_map([customer_id], |row| json(&row.get::<_, String>(0)?))?;
    rows.collect()
}

/// The active subscription that would renew more than `limit` times after
/// `now` and by `to` (its renewal number `limit` after `now`, counted from
/// 0, falls at or before `to`) soonest, and the instant of that renewal, as
/// the writer dates renewals (`Subscription::renewal_at`). Renewals due by
/// `now` and not applied (refused ones) do not count: a step does not add
/// them.
pub fn renewing_more_than(
    connection: &Connection,
    limit: i64,
    now: Timestamp,
    to: Timestamp,
) -> db::Result<Option<(tally_core::Subscription, Timestamp)>> {
    let plans: std::collections::HashMap<String, tally_core::Plan> = plans(connection)?
        .into_iter()
        .map(|plan| (plan.key.clone(), plan))
        .collect();
    let mut statement = connection.prepare_cached(
        "SELECT body FROM subscriptions WHERE status = 'active' AND period_end <= ?1",
    )?;
    let rows = statement.query_map([to.micros()], |row| {
        json::<tally_core::Subscription>(&row.get::<_, String>(0)?)
    })?;
    let mut soonest: Option<(tally_core::Subscription, Timestamp)> = None;
    for subscription in rows {
        let subscription = subscription?;
        let next = subscription
            .next_plan
            .as_deref()
            .unwrap_or(&subscription.plan);
        let (Some(current), Some(next)) = (plans.get(&subscription.plan), plans.get(next)) else {
            continue;
        };
        let overdue = subscription.renewals_by(current, next, now);
        let Some(at) = overdue
            .checked_add(limit)
            .and_then(|k| subscription.renewal_at(current, next, k))
            .filter(|at| *at <= to)
        else {
            continue;
        };
        if soonest.as_ref().is_none_or(|(_, earliest)| at < *earliest) {
            soonest = Some((subscription, at));
        }
    }
    Ok(soonest)
}

pub fn upsert_subscription(
    connection: &Connection,
    subscription: &tally_core::Subscription,
    now: Timestamp,
) -> db::Result<()> {
    let body = serde_json::to_string(subscription).expect("subscription serializes");
    connection
        .prepare_cached(
            "INSERT INTO subscriptions (id, customer_id, plan, status, period_end, body, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (id) DO UPDATE SET plan = excluded.plan, \
             status = excluded.status, period_end = excluded.period_end, body = excluded.body, \
             updated_at = excluded.updated_at",
        )?
        .execute(params![
            subscription.id.as_str(),
            subscription.customer_id.as_str(),
            subscription.plan,
            subscription.status.as_str(),
            subscription.period_end.micros(),
            body,
            now.micros()
        ])?;
    Ok(())
}

/// A customer's members, by id.
pub fn members(connection: &Connection, customer_id: &str) -> db::Result<Vec<tally_core::Member>> {
    let mut statement = connection.prepare_cached(MEMBERS)?;
    let rows = statement.query_map([customer_id], |row| json(&row.get::<_, String>(0)?))?;
    rows.collect()
}

pub fn upsert_member(
    connection: &Connection,
    customer_id: &str,
    member: &tally_core::Member,
    now: Timestamp,
) -> db::Result<()> {
    connection
        .prepare_cached(
            "INSERT INTO members (customer_id, id, body, updated_at) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (customer_id, id) DO UPDATE SET body = excluded.body, updated_at = excluded.updated_at",
        )?
        .execute(params![
            customer_id,
            member.id.as_str(),
            serde_json::to_string(member).expect("member serializes"),
            now.micros()
        ])?;
    Ok(())
}

/// One endpoint's deliveries due at `now`, the oldest first, each with the
/// body every attempt sends (built from the stored row, so it never
/// changes); `webhook_deliveries_pending_by_endpoint`. The worker reads each
/// endpoint's apart, so that one whose receiver hangs never holds up another's.
pub fn due_deliveries_of(
    connection: &Connection,
    endpoint_id: &str,
    now: Timestamp,
    durable: i64,
    limit: i64,
) -> db::Result<Vec<crate::model::DueDelivery>> {
    let mut statement = connection.prepare_cached(
        "SELECT d.id, d.attempts, e.url, e.secret, n.sequence, n.type, n.customer_id, n.payload, n.created_at, \
         d.endpoint_id, \
         CASE WHEN e.previous_secret_expires_at > ?1 THEN e.previous_secret END \
         FROM webhook_deliveries d JOIN webhook_endpoints e ON e.id = d.endpoint_id \
         JOIN notifications n ON n.sequence = d.notification \
         WHERE d.endpoint_id = ?4 AND d.status = 'pending' AND d.next_attempt_at <= ?1 \
         AND d.notification <= ?3 \
         ORDER BY d.next_attempt_at LIMIT ?2",
    )?;
    let rows = statement.query_map(
        params![now.micros(), limit, durable, endpoint_id],
        due_delivery,
    )?;
    rows.collect()
}

/// The endpoints with deliveries due at `now` (`webhook_deliveries_due`).
pub fn due_endpoints(
    connection: &Connection,
    now: Timestamp,
    durable: i64,
) -> db::Result<Vec<String>> {
    let mut statement = connection.prepare_cached(
        "SELECT DISTINCT endpoint_id FROM webhook_deliveries \
         WHERE status = 'pending' AND next_attempt_at <= ?1 AND notification <= ?2",
    )?;
    let rows = statement.query_map(params![now.micros(), durable], |row| row.get(0))?;
    rows.collect()
}

fn due_delivery(row: &Row) -> db::Result<crate::model::DueDelivery> {
    let data: serde_json::Value = json(&row.get::<_, String>(7)?)?;
    let body = serde_json::json!({
        "id": format!("evt_{}", row.get::<_, i64>(4)?),
        "type": row.get::<_, String>(5)?,
        "customer_id": row.get::<_, Option<String>>(6)?,
        "created_at": Timestamp(row.get(8)?).rfc3339(),
        "data": data,
    });
    Ok(crate::model::DueDelivery {
        id: row.get(0)?,
        endpoint_id: row.get(9)?,
        attempts: row.get(1)?,
        url: row.get(2)?,
        secret: row.get(3)?,
        previous_secret: row.get(10)?,
        body: body.to_string(),
    })
}

/// An endpoint's deliveries, the newest first, of notifications before
/// `before` (a page's cursor: one delivery per notification and endpoint).
pub fn deliveries(
    connection: &Connection,
    endpoint_id: &str,
    before: i64,
    limit: i64,
) -> db::Result<Vec<crate::model::DeliveryRecord>> {
    let mut statement = connection.prepare_cached(
        "SELECT d.id, d.endpoint_id, d.notification, n.type, n.customer_id, d.status, d.attempts, \
         d.last_status, d.last_error, d.next_attempt_at, d.delivered_at, d.created_at \
         FROM webhook_deliveries d JOIN notifications n ON n.sequence = d.notification \
         WHERE d.endpoint_id = ?1 AND d.notification < ?2 ORDER BY d.notification DESC LIMIT ?3",
    )?;
    let rows = statement.query_map(params![endpoint_id, before, limit], |row| {
        Ok(crate::model::DeliveryRecord {
            id: row.get(0)?,
            endpoint_id: row.get(1)?,
            notification: row.get(2)?,
            kind: row.get(3)?,
            customer_id: row.get(4)?,
            status: row.get(5)?,
            attempts: row.get(6)?,
            last_status: row.get(7)?,
            last_error: row.get(8)?,
            next_attempt_at: row.get::<_, Option<i64>>(9)?.map(Timestamp),
            delivered_at: row.get::<_, Option<i64>>(10)?.map(Timestamp),
            created_at: Timestamp(row.get(11)?),
        })
    })?;
    rows.collect()
}

/// Every webhook endpoint, by id.
pub fn webhook_endpoints(
    connection: &Connection,
) -> db::Result<Vec<crate::model::WebhookEndpointRecord>> {
    let mut statement = connection.prepare_cached(
        "SELECT id, url, events, secret, created_at, previous_secret_expires_at \
         FROM webhook_endpoints WHERE deleted_at IS NULL ORDER BY id",
    )?;
    let rows = statement.query_map([], |row| {
        Ok(crate::model::WebhookEndpointRecord {
            id: id(row, 0)?,
            url: row.get(1)?,
            events: json(&row.get::<_, String>(2)?)?,
            secret: row.get(3)?,
            created_at: Timestamp(row.get(4)?),
            previous_secret_expires_at: row.get::<_, Option<i64>>(5)?.map(Timestamp),
        })
    })?;
    rows.collect()
}

/// The end of the customer's active subscription's period if it is over by
/// `now` (a renewal due and not applied).
pub fn unrenewed_boundary(
    connection: &Connection,
    customer_id: &str,
    now: Timestamp,
) -> db::Result<Option<Timestamp>> {
    connection
        .prepare_cached(
            "SELECT period_end FROM subscriptions WHERE customer_id = ?1 \
             AND status = 'active' AND period_end <= ?2",
        )?
        .query_row(params![customer_id, now.micros()], |row| {
            Ok(Timestamp(row.get(0)?))
        })
        .optional()
}

pub fn credit_packs(connection: &Connection) -> db::Result<Vec<tally_core::CreditPack>> {
    let mut statement = connection.prepare_cached("SELECT body FROM credit_packs ORDER BY key")?;
    let rows = statement.query_map([], |row| json(&row.get::<_, String>(0)?))?;
    rows.collect()
}

pub fn upsert_credit_pack(
    connection: &Connection,
    pack: &tally_core::CreditPack,
    now: Timestamp,
) -> db::Result<()> {
    let body = serde_json::to_string(pack).expect("pack serializes");
    connection
        .prepare_cached(
            "INSERT INTO credit_packs (key, body, updated_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (key) DO UPDATE SET body = excluded.body, updated_at = excluded.updated_at",
        )?
        .execute(params![pack.key, body, now.micros()])?;
    Ok(())
}

const TOPUP_COLUMNS: &str = "id, customer_id, origin, pack, quantity, credits, price, currency, \
    expires_after_days, priority, status, payment_due_at, payment_reference, failure_reason, \
    grant_id, entry_id, created_at, resolved_at, sequence";

fn topup_row(row: &Row) -> db::Result<(crate::model::TopupRecord, i64)> {
    let status: String = row.get(10)?;
    if !["pending_payment", "succeeded", "failed"].contains(&status.as_str()) {
        return Err(corrupt("bad top-up status"));
    }
    Ok((
        crate::model::TopupRecord {
            id: id(row, 0)?,
            customer_id: id(row, 1)?,
            origin: row.get(2)?,
            pack: row.get(3)?,
            quantity: row.get(4)?,
            credits: amount(row, 5)?,
            price: amount(row, 6)?,
            currency: row.get(7)?,
            expires_after_days: row.get(8)?,
            priority: row.get(9)?,
            status,
            payment_due_at: Timestamp(row.get(11)?),
            payment_reference: row.get(12)?,
            failure_reason: row.get(13)?,
            grant_id: optional_id(row, 14)?,
            entry_id: row.get(15)?,
            created_at: Timestamp(row.get(16)?),
            resolved_at: row.get::<_, Option<i64>>(17)?.map(Timestamp),
        },
        row.get(18)?,
    ))
}

pub fn topup(connection: &Connection, id: &str) -> db::Result<Option<crate::model::TopupRecord>> {
    connection
        .prepare_cached(&format!("SELECT {TOPUP_COLUMNS} FROM topups WHERE id = ?1"))?
        .query_row([id], topup_row)
        .map(|(record, _)| record)
        .optional()
}

/// A customer's top-ups, newest first, from before `before` (a sequence);
/// each with its sequence (the next page's cursor).
pub fn topups(
    connection: &Connection,
    customer_id: &str,
    before: Option<i64>,
    limit: usize,
) -> db::Result<Vec<(crate::model::TopupRecord, i64)>> {
    let mut statement = connection.prepare_cached(&format!(
        "SELECT {TOPUP_COLUMNS} FROM topups WHERE customer_id = ?1 AND sequence < ?2 \
         ORDER BY sequence DESC LIMIT ?3"
    ))?;
    let rows = statement.query_map(
        params![
            customer_id,
            before.unwrap_or(i64::MAX),
            i64::try_from(limit).unwrap_or(i64::MAX)
        ],
        topup_row,
    )?;
    rows.collect()
}

pub fn insert_topup(connection: &Connection, topup: &crate::model::TopupRecord) -> db::Result<()> {
    connection
        .prepare_cached(
            "INSERT INTO topups (id, customer_id, origin, pack, quantity, credits, price, currency, \
             expires_after_days, priority, status, payment_due_at, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
        )?
        .execute(params![
            topup.id.as_str(),
            topup.customer_id.as_str(),
            topup.origin,
            topup.pack,
            topup.quantity,
            topup.credits.micros(),
            topup.price.micros(),
            topup.currency,
            topup.expires_after_days,
            topup.priority,
            topup.status,
            topup.payment_due_at.micros(),
            topup.created_at.micros()
        ])?;
    Ok(())
}

/// Write a top-up's resolution (its status and what came of it).
pub fn resolve_topup(connection: &Connection, topup: &crate::model::TopupRecord) -> db::Result<()> {
    connection
        .prepare_cached(
            "UPDATE topups SET status = ?1, payment_reference = ?2, failure_reason = ?3, grant_id = ?4, \
             entry_id = ?5, resolved_at = ?6 WHERE id = ?7",
        )?
        .execute(params![
            topup.status,
            topup.payment_reference,
            topup.failure_reason,
            topup.grant_id.as_ref().map(Id::as_str),
            topup.entry_id,
            topup.resolved_at.map(Timestamp::micros),
            topup.id.as_str()
        ])?;
    Ok(())
}

/// The credits of a customer's top-ups that may still be granted: those
/// awaiting their payment, and those whose payment deadline passed (a late
/// confirmation still grants them).
pub fn unresolved_topup_credits(
    connection: &Connection,
    customer_id: &str,
) -> db::Result<Vec<i64>> {
    let mut statement = connection.prepare_cached(
        "SELECT credits FROM topups WHERE customer_id = ?1 AND (status = 'pending_payment' \
         OR (status = 'failed' AND failure_reason = 'payment_timeout'))",
    )?;
    let rows = statement.query_map([customer_id], |row| row.get(0))?;
    rows.collect()
}

fn api_key_row(row: &Row<'_>) -> db::Result<crate::model::ApiKeyInfo> {
    Ok(crate::model::ApiKeyInfo {
        id: row.get(0)?,
        scope: row.get(1)?,
        created_at: Timestamp(row.get(2)?),
        revoked_at: row.get::<_, Option<i64>>(3)?.map(Timestamp),
    })
}

/// Every API key, oldest first.
pub fn api_keys(connection: &Connection) -> db::Result<Vec<crate::model::ApiKeyInfo>> {
    let mut statement = connection.prepare_cached(
        "SELECT id, scope, created_at, revoked_at FROM api_keys ORDER BY created_at, id",
    )?;
    let rows = statement.query_map([], api_key_row)?;
    rows.collect()
}

/// Revoke key `id` at `now` (a key revoked before keeps its instant); the
/// key as it is then, `None` if there is no such key.
pub fn revoke_api_key(
    connection: &Connection,
    id: &str,
    now: Timestamp,
) -> db::Result<Option<crate::model::ApiKeyInfo>> {
    connection
        .prepare_cached("UPDATE api_keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL")?
        .execute(params![id, now.micros()])?;
    connection
        .prepare_cached("SELECT id, scope, created_at, revoked_at FROM api_keys WHERE id = ?1")?
        .query_row([id], api_key_row)
        .optional()
}

/// The top-ups whose payment is overdue, oldest first.
pub fn overdue_topups(
    connection: &Connection,
    now: Timestamp,
    limit: i64,
) -> db::Result<Vec<String>> {
    let mut statement = connection.prepare_cached(
        "SELECT id FROM topups WHERE status = 'pending_payment' AND payment_due_at <= ?1 \
         ORDER BY payment_due_at LIMIT ?2",
    )?;
    let rows = statement.query_map(params![now.micros(), limit], |row| row.get(0))?;
    rows.collect()
}

/// The next automatic top-up's number.
pub fn next_topup_sequence(connection: &Connection) -> db::Result<i64> {
    connection
        .prepare_cached("SELECT COALESCE(MAX(sequence), 0) + 1 FROM topups")?
        .query_row([], |row| row.get(0))
}

pub fn auto_topup(
    connection: &Connection,
    customer_id: &str,
) -> db::Result<Option<tally_core::AutoTopupState>> {
    connection
        .prepare_cached("SELECT body FROM auto_topups WHERE customer_id = ?1")?
        .query_row([customer_id], |row| json(&row.get::<_, String>(0)?))
        .optional()
}

/// A customer's alert settings, if it set any.
pub fn alerts(
    connection: &Connection,
    customer_id: &str,
) -> db::Result<Option<crate::model::Alerts>> {
    connection
        .prepare_cached("SELECT body FROM customer_alerts WHERE customer_id = ?1")?
        .query_row([customer_id], |row| json(&row.get::<_, String>(0)?))
        .optional()
}

pub fn upsert_auto_topup(
    connection: &Connection,
    customer_id: &str,
    state: &tally_core::AutoTopupState,
    now: Timestamp,
) -> db::Result<()> {
    let body = serde_json::to_string(state).expect("auto top-up serializes");
    connection
        .prepare_cached(
            "INSERT INTO auto_topups (customer_id, body, updated_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (customer_id) DO UPDATE SET body = excluded.body, updated_at = excluded.updated_at",
        )?
        .execute(params![customer_id, body, now.micros()])?;
    Ok(())
}
