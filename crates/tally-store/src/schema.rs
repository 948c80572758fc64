//! Numbered migrations of the SQLite schema.
//!
//! Amounts are integer micro-credits, instants integer microseconds since the
//! epoch. A migration is applied once, in order, inside one transaction.

use crate::db::{self, params, Connection, Dialect};

const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        r#"
CREATE TABLE customers (
    id TEXT PRIMARY KEY,
    name TEXT, plan TEXT, region TEXT, currency TEXT, metadata TEXT,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE grants (
    id TEXT PRIMARY KEY,
    customer_id TEXT NOT NULL REFERENCES customers(id),
    amount INTEGER NOT NULL CHECK (amount > 0),
    source TEXT NOT NULL,
    paid INTEGER NOT NULL,
    cost_per_credit INTEGER, cost_currency TEXT,
    priority INTEGER NOT NULL,
    effective_at INTEGER NOT NULL,
    expires_at INTEGER,
    scope TEXT,
    status TEXT NOT NULL,
    expired_at INTEGER,
    sequence INTEGER NOT NULL UNIQUE,
    metadata TEXT, external_reference TEXT,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;
-- What spending changes, apart from the rest of the grant: a narrow row keyed by
-- integer, so a group of charges over many customers rewrites few pages.
CREATE TABLE grant_balances (
    sequence INTEGER PRIMARY KEY,
    remaining INTEGER NOT NULL CHECK (remaining >= 0),
    expired_amount INTEGER NOT NULL CHECK (expired_amount >= 0),
    -- the customer's newest journal entry when this row was last written: the
    -- head of the customer's entry chain is the largest of these over its grants
    -- (written with the rows a group changes anyway, so a charge costs no extra
    -- random page write)
    last_entry INTEGER
);
CREATE INDEX grants_by_customer ON grants(customer_id, sequence);
CREATE INDEX grants_due ON grants(status, expires_at);
CREATE TABLE holds (
    id TEXT PRIMARY KEY,
    customer_id TEXT NOT NULL REFERENCES customers(id),
    amount INTEGER NOT NULL CHECK (amount > 0),
    reservations TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    captured INTEGER NOT NULL,
    feature TEXT, member_id TEXT
);
CREATE INDEX holds_due ON holds(status, expires_at);
CREATE INDEX holds_by_customer ON holds(customer_id, status);
-- Every id-carrying request and its outcome, appended in order. The
-- uniqueness of (kind, id) is enforced by the writer's in-memory index, which
-- it rebuilds from this table at start: a B-tree keyed by client ids (random,
-- like UUIDs) would dirty a random page on every insert.
CREATE TABLE operations (
    sequence INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    id TEXT NOT NULL,
    request_hash BLOB NOT NULL,
    ok INTEGER NOT NULL,
    response TEXT NOT NULL,
    customer_id TEXT,
    amount INTEGER,
    refunded INTEGER,
    feature TEXT,
    recorded_at INTEGER NOT NULL
);
CREATE TABLE entries (
    sequence INTEGER PRIMARY KEY,
    customer_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    amount INTEGER NOT NULL,
    reference TEXT, member_id TEXT, feature TEXT, reason TEXT, actor TEXT,
    postings TEXT NOT NULL,
    effective_at INTEGER NOT NULL,
    recorded_at INTEGER NOT NULL,
    balance_after INTEGER NOT NULL,
    -- the same customer's previous entry: a customer's history is a chain walked
    -- by primary key, so appending never touches a random index page
    previous INTEGER
);
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    scope TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
"#,
    ),
    (
        2,
        r#"
-- The price book (issue 3).
CREATE TABLE features (
    key TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    unit TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE pricebooks (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('draft', 'published')),
    copied_from TEXT,
    rules TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    created_by TEXT,
    updated_at INTEGER NOT NULL,
    effective_at INTEGER,
    published_at INTEGER,
    published_by TEXT,
    published_seq INTEGER UNIQUE
);
CREATE TABLE contracts (
    customer_id TEXT PRIMARY KEY REFERENCES customers(id),
    body TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    updated_by TEXT
) WITHOUT ROWID;
-- The price a hold locked when it was placed, for pricing its capture.
CREATE TABLE hold_pricing (
    hold_id TEXT PRIMARY KEY,
    pricing TEXT NOT NULL
) WITHOUT ROWID;
-- What priced a charge or capture: version, rule, quantity, properties.
ALTER TABLE entries ADD COLUMN pricing TEXT;
"#,
    ),
    (
        3,
        r#"
-- Usage events that could not be charged (issue 4), one row per event (or
-- per unreadable payload), counting its attempts.
CREATE TABLE dead_letters (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    source TEXT NOT NULL,
    event_id TEXT,
    customer_id TEXT,
    payload TEXT NOT NULL,
    code TEXT NOT NULL,
    message TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    first_seen INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'replayed', 'discarded')),
    resolved_at INTEGER,
    note TEXT
);
CREATE INDEX dead_letters_by_status ON dead_letters(status, id);
"#,
    ),
    (
        4,
        r#"
-- A customer may have several contracts (a renewal set before it starts):
-- at any instant the most recently set one whose window contains it applies.
CREATE TABLE customer_contracts (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    customer_id TEXT NOT NULL REFERENCES customers(id),
    body TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    updated_by TEXT
);
CREATE INDEX customer_contracts_by_customer ON customer_contracts(customer_id, seq);
INSERT INTO customer_contracts (id, customer_id, body, updated_at, updated_by)
    SELECT json_extract(body, '$.id'), customer_id, body, updated_at, updated_by FROM contracts;
DROP TABLE contracts;
"#,
    ),
    (
        5,
        r#"
-- Overage: a customer's policy (JSON, NULL = block) and what it owes beyond
-- zero; a hold's part reserved beyond the credits.
ALTER TABLE customers ADD COLUMN overage TEXT;
ALTER TABLE customers ADD COLUMN debt INTEGER NOT NULL DEFAULT 0;
ALTER TABLE holds ADD COLUMN overdraft INTEGER NOT NULL DEFAULT 0;
CREATE INDEX customers_in_debt ON customers(id) WHERE debt > 0;
-- The head of the entry chain of a customer without grants (usage on debt,
-- free usage); with grants it is carried on their balance rows.
ALTER TABLE customers ADD COLUMN last_entry INTEGER;
"#,
    ),
    (
        6,
        r#"
-- Plans (the body is the core's Plan as JSON) and subscriptions (the core's
-- Subscription as JSON, with the columns the scheduler and reads select by).
CREATE TABLE plans (
    key TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    updated_by TEXT
) WITHOUT ROWID;
CREATE TABLE subscriptions (
    id TEXT PRIMARY KEY,
    customer_id TEXT NOT NULL REFERENCES customers(id),
    plan TEXT NOT NULL REFERENCES plans(key),
    status TEXT NOT NULL CHECK (status IN ('active', 'canceled')),
    period_end INTEGER NOT NULL,
    body TEXT NOT NULL,
    updated_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE UNIQUE INDEX subscriptions_active ON subscriptions(customer_id) WHERE status = 'active';
CREATE INDEX subscriptions_due ON subscriptions(period_end) WHERE status = 'active';
CREATE INDEX subscriptions_by_customer ON subscriptions(customer_id);
"#,
    ),
    (
        7,
        r#"
-- Notifications: alert settings, webhook endpoints, the outbox (written in
-- the same transaction as the change it reports) and one delivery per
-- notification and endpoint, retried until delivered or given up.
CREATE TABLE customer_alerts (
    customer_id TEXT PRIMARY KEY REFERENCES customers(id),
    body TEXT NOT NULL,
    grant_expiring_days INTEGER,
    updated_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE webhook_endpoints (
    id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    events TEXT NOT NULL,
    secret TEXT NOT NULL,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE notifications (
    sequence INTEGER PRIMARY KEY,
    type TEXT NOT NULL,
    customer_id TEXT,
    payload TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE webhook_deliveries (
    id TEXT PRIMARY KEY,
    notification INTEGER NOT NULL REFERENCES notifications(sequence),
    endpoint_id TEXT NOT NULL REFERENCES webhook_endpoints(id),
    status TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts INTEGER NOT NULL,
    next_attempt_at INTEGER,
    last_status INTEGER,
    last_error TEXT,
    delivered_at INTEGER,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX webhook_deliveries_due ON webhook_deliveries(next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_by_endpoint ON webhook_deliveries(endpoint_id, notification);
-- The lots a grant.expiring notification was sent for.
CREATE TABLE expiring_notices (grant_id TEXT PRIMARY KEY, sent_at INTEGER NOT NULL) WITHOUT ROWID;
"#,
    ),
    (
        8,
        r#"
-- Members of a customer with their budget and what they spent in its
-- current window (the core's Member as JSON).
CREATE TABLE members (
    customer_id TEXT NOT NULL REFERENCES customers(id),
    id TEXT NOT NULL,
    body TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (customer_id, id)
) WITHOUT ROWID;
"#,
    ),
    (
        9,
        r#"
-- Credit packs (the core's CreditPack as JSON).
CREATE TABLE credit_packs (
    key TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    updated_at INTEGER NOT NULL
) WITHOUT ROWID;
-- Top-ups: a payment asked for, then the pack's credits granted (grant
-- `topup:<id>`) once it is confirmed, or failed.
CREATE TABLE topups (
    sequence INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    customer_id TEXT NOT NULL REFERENCES customers(id),
    origin TEXT NOT NULL CHECK (origin IN ('manual', 'auto')),
    pack TEXT NOT NULL,
    quantity INTEGER NOT NULL,
    credits INTEGER NOT NULL,
    price INTEGER NOT NULL,
    currency TEXT NOT NULL,
    -- The pack's terms when the top-up started: what the grant gets.
    expires_after_days INTEGER,
    priority INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending_payment', 'succeeded', 'failed')),
    payment_due_at INTEGER NOT NULL,
    payment_reference TEXT,
    failure_reason TEXT,
    grant_id TEXT,
    entry_id INTEGER,
    created_at INTEGER NOT NULL,
    resolved_at INTEGER
);
CREATE INDEX topups_by_customer ON topups(customer_id, sequence);
CREATE INDEX topups_payment_due ON topups(payment_due_at) WHERE status = 'pending_payment';
-- A customer's automatic top-up (the core's AutoTopupState as JSON).
CREATE TABLE auto_topups (
    customer_id TEXT PRIMARY KEY REFERENCES customers(id),
    body TEXT NOT NULL,
    updated_at INTEGER NOT NULL
) WITHOUT ROWID;
"#,
    ),
    (
        10,
        r#"
-- Pruning settled notifications after their retention.
CREATE INDEX notifications_by_time ON notifications(created_at);
CREATE INDEX webhook_deliveries_by_notification ON webhook_deliveries(notification);
"#,
    ),
    (
        11,
        r#"
-- The server that runs the writer of a shared (PostgreSQL) database, where
-- the others forward writes; unused by the embedded store.
CREATE TABLE leader (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    url TEXT NOT NULL,
    since INTEGER NOT NULL
);
"#,
    ),
    (
        12,
        r#"
-- The engine's clock as the writer last read it (ticks record it). A manual
-- clock (`--manual-clock`) resumes from it, so that servers sharing a
-- database share one test clock and a new writer never goes back in time.
CREATE TABLE engine_clock (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    micros INTEGER NOT NULL
);
"#,
    ),
    (
        13,
        r#"
-- Active lots in expiry order, ties by id: the tick's sweep for
-- grant.expiring takes them a chunk at a time from where it stopped. (SQLite's
-- index already ended with the id, the table's key; PostgreSQL sorted every
-- lot in the range on every tick without it.)
DROP INDEX grants_due;
CREATE INDEX grants_due ON grants(status, expires_at, id);
"#,
    ),
    (
        14,
        r#"
-- A lot issued with its effective_at ahead: 1 until the ledger records it
-- taking effect (a `grant_effective` entry moves its credits from
-- `pending:<id>` into the lot). The tick finds such lots through the partial
-- index, which holds only them. Lots stored before read 0: nothing owed.
ALTER TABLE grants ADD COLUMN awaiting_effect INTEGER NOT NULL DEFAULT 0;
CREATE INDEX grants_taking_effect ON grants(effective_at) WHERE awaiting_effect = 1;
-- A lot the ledger made from another's credits (a refund's, a hold's return to
-- a voided lot): the lot they were first granted in (`Grant::origin`).
ALTER TABLE grants ADD COLUMN origin TEXT;
-- The credits of a top-up voided so far, in its lot and in lots made from it:
-- each void gives back the part of the price that brings the total to the
-- price of all voided so far, so the parts add up to the payment exactly.
ALTER TABLE topups ADD COLUMN voided_credits INTEGER NOT NULL DEFAULT 0;
"#,
    ),
    (
        15,
        r#"
-- The plans a customer was on, as JSON ([{"since": time or null, "plan": key
-- or null}], oldest first, the present one last): a late usage event is priced
-- by the plan in force at its timestamp. NULL until the plan first changes
-- after this migration (the present plan then applies at every time; a change
-- made before it is not known, and the plan of that time applies before it).
ALTER TABLE customers ADD COLUMN plan_history TEXT;
"#,
    ),
    (
        16,
        r#"
-- The longest event window (`--event-window-seconds`) any writer ran with: a
-- simulation looks that far past its window for late events, so that events a
-- longer window once let in still count after the window is shortened.
CREATE TABLE event_window (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seconds INTEGER NOT NULL
);
"#,
    ),
    (
        17,
        r#"
-- What an entry is about that its postings do not say, as JSON (support's
-- audit trail): the lot an expiry change or a void of an empty lot changed,
-- the expiry before and after, a transfer's other customer. NULL for the rest.
ALTER TABLE entries ADD COLUMN facts TEXT;
"#,
    ),
    (
        18,
        r#"
-- Each endpoint's due deliveries, read apart by the delivery worker, so that
-- an endpoint whose receiver hangs never holds up the others.
CREATE INDEX webhook_deliveries_pending_by_endpoint
    ON webhook_deliveries(endpoint_id, next_attempt_at) WHERE status = 'pending';
"#,
    ),
    (
        19,
        r#"
-- When an endpoint was deleted (`DELETE /v1/webhook-endpoints/{id}`): it gets
-- no more notifications and its id stays taken. NULL while it is live.
ALTER TABLE webhook_endpoints ADD COLUMN deleted_at INTEGER;
"#,
    ),
    (
        20,
        r#"
-- When an API key was revoked (`DELETE /v1/api-keys/{id}`, `tally keys
-- revoke`): it authenticates nothing from then on. NULL while it is valid.
ALTER TABLE api_keys ADD COLUMN revoked_at INTEGER;
-- A top-up's start counts the credits of the customer's top-ups a payment
-- may still complete (`rows::unresolved_topup_credits`): only those rows.
CREATE INDEX topups_unresolved_by_customer ON topups(customer_id)
    WHERE status IN ('pending_payment', 'failed');
"#,
    ),
    (
        21,
        r#"
-- The latest instant usage was priced at (an event's stamp may be up to 5
-- minutes ahead of the clock): a price book published later takes effect
-- after it. NULL until usage is priced.
ALTER TABLE engine_clock ADD COLUMN priced_through INTEGER;
"#,
    ),
    (
        22,
        r#"
-- The credits voided so far of each paid lot bought outside a top-up and of
-- the lots made from its credits (release, refund and transfer lots, whose
-- `origin` it is): what a void gives back is priced from the total, so the
-- voids of one purchase add up to its value in whole minor units.
CREATE TABLE lot_voids (
    root TEXT PRIMARY KEY,
    voided_credits INTEGER NOT NULL
);
-- On PostgreSQL, the clock the writer runs on (1: --manual-clock, 0: the
-- real clock) and the wall-clock instant its last tick said so: a server on
-- the other clock is refused while that is recent (`check_engine_clock`).
ALTER TABLE engine_clock ADD COLUMN manual INTEGER;
ALTER TABLE engine_clock ADD COLUMN mode_seen_at INTEGER;
"#,
    ),
    (
        23,
        r#"
-- A webhook endpoint's secret before its last rotation, which signs
-- deliveries beside the new one until `previous_secret_expires_at` on the
-- engine's clock (NULL: none).
ALTER TABLE webhook_endpoints ADD COLUMN previous_secret TEXT;
ALTER TABLE webhook_endpoints ADD COLUMN previous_secret_expires_at INTEGER;
"#,
    ),
];

/// The key of the advisory lock that serializes migrations on PostgreSQL
/// (several servers may start at once).
const MIGRATION_LOCK: i64 = 0x7461_6c6c_0001;

/// A migration as PostgreSQL reads it. The migrations are written once, for
/// SQLite; the differences are few and mechanical: 64-bit integers, bytes,
/// no `WITHOUT ROWID`, identity columns where SQLite numbers rows itself, and
/// JSON access.
pub fn postgres_ddl(sql: &str) -> String {
    let mut out = sql
        .replace(
            "id INTEGER PRIMARY KEY,",
            "id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,",
        )
        .replace(
            "seq INTEGER PRIMARY KEY,",
            "seq BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,",
        )
        .replace(") WITHOUT ROWID;", ");")
        .replace("json_extract(body, '$.id')", "(body::jsonb ->> 'id')")
        .replace(" BLOB", " BYTEA");
    // The auto-numbered top-up sequence (the only other table SQLite numbers).
    out = out.replace(
        "CREATE TABLE topups (\n    sequence INTEGER PRIMARY KEY,",
        "CREATE TABLE topups (\n    sequence BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,",
    );
    out.replace(" INTEGER", " BIGINT")
}

/// Apply the migrations not yet applied; returns how many ran.
pub fn migrate(connection: &Connection) -> db::Result<usize> {
    let postgres = connection.dialect() == Dialect::Postgres;
    if postgres {
        connection.query_row("SELECT pg_advisory_lock(?1)", [MIGRATION_LOCK], |_| Ok(()))?;
    }
    let result = apply(connection, postgres);
    if postgres {
        connection.query_row(
            "SELECT pg_advisory_unlock(?1)",
            [MIGRATION_LOCK],
            |_| Ok(()),
        )?;
    }
    result
}

fn apply(connection: &Connection, postgres: bool) -> db::Result<usize> {
    connection.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
    )?;
    refuse_newer(connection)?;
    let begin = if postgres { "BEGIN" } else { "BEGIN IMMEDIATE" };
    let mut applied = 0;
    for (version, sql) in MIGRATIONS {
        connection.execute_batch(begin)?;
        let step = || -> db::Result<bool> {
            let done: bool = connection.query_row(
                "SELECT EXISTS(SELECT 1 FROM schema_migrations WHERE version = ?1)",
                [version],
                |row| row.get(0),
            )?;
            if done {
                return Ok(false);
            }
            if postgres {
                connection.execute_batch(&postgres_ddl(sql))?;
            } else {
                connection.execute_batch(sql)?;
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            connection.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
                params![version, now],
            )?;
            Ok(true)
        };
        match step() {
            Ok(ran) => {
                connection.execute_batch("COMMIT")?;
                applied += usize::from(ran);
            }
            Err(error) => {
                let _ = connection.execute_batch("ROLLBACK");
                return Err(error);
            }
        }
    }
    Ok(applied)
}

/// Fail with [`db::Error::NewerSchema`] if a newer build migrated the
/// database (a rollback of a rolling upgrade, or an older server leading
/// again after the newer ones migrated): this build would write rows without
/// what the newer schema expects of them, so it neither starts on it nor
/// runs its writer.
pub fn refuse_newer(connection: &Connection) -> db::Result<()> {
    let found: Option<i64> =
        connection.query_row("SELECT max(version) FROM schema_migrations", [], |row| {
            row.get(0)
        })?;
    match found.filter(|&found| found > latest_version()) {
        Some(found) => Err(db::Error::NewerSchema {
            found,
            known: latest_version(),
        }),
        None => Ok(()),
    }
}

/// The highest migration this build knows.
pub fn latest_version() -> i64 {
    MIGRATIONS.last().map_or(0, |(version, _)| *version)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database migrated by a newer build (its `schema_migrations` has a
    /// version this build does not know) is refused, saying so, and left
    /// as it is; on both stores.
    #[test]
    fn a_schema_newer_than_the_build_is_refused() {
        for (connection, _place) in crate::db::tests::connections("newer_schema") {
            assert_eq!(migrate(&connection).unwrap(), MIGRATIONS.len());
            assert_eq!(migrate(&connection).unwrap(), 0, "nothing left to apply");
            let newer = latest_version() + 1;
            connection
                .execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, 0)",
                    params![newer],
                )
                .unwrap();
            let refused = migrate(&connection).unwrap_err();
            assert!(
                matches!(refused, db::Error::NewerSchema { found, known }
                    if found == newer && known == latest_version()),
                "{refused}"
            );
            assert!(refused.to_string().contains("a newer Tally migrated it"));
            let versions: i64 = connection
                .query_row("SELECT count(*) FROM schema_migrations", [], |row| {
                    row.get(0)
                })
                .unwrap();
            assert_eq!(versions, MIGRATIONS.len() as i64 + 1);
        }
    }

    #[test]
    fn the_postgres_schema_has_no_sqlite_types_left() {
        for (version, sql) in MIGRATIONS {
            let ddl = postgres_ddl(sql);
            for sqlite_only in [" INTEGER", "BLOB", "WITHOUT ROWID", "json_extract"] {
                assert!(
                    !ddl.contains(sqlite_only),
                    "migration {version}: {sqlite_only}"
                );
            }
        }
        let first = postgres_ddl(MIGRATIONS[0].1);
        assert!(first.contains("request_hash BYTEA NOT NULL"));
        assert!(postgres_ddl(MIGRATIONS[8].1)
            .contains("sequence BIGINT GENERATED BY DEFAULT AS IDENTITY"));
    }
}
