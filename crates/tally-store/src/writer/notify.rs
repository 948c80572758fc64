//! Notifications: the customer's live stream and the webhook outbox.
//!
//! Every journal entry passes through [`Writer::after_entry`]. A change is
//! queued for the live stream (published by the syncer once durable), and
//! what a webhook endpoint subscribed to (a balance falling below a
//! threshold or to zero, a lot or hold expiring, a renewal) is written to
//! `notifications` with one `webhook_deliveries` row per endpoint, in the
//! same transaction as the change: a notification exists exactly when its
//! change committed. The delivery worker (tally-server) sends them, at least
//! once, with a stable delivery id.

use crate::db::{self, params, Connection, OptionalExtension};
use serde_json::json;
use tally_core::{EntryDraft, EntryKind, Id, Timestamp};

use super::{Failure, Writer};
use crate::model::WebhookEndpointRecord;
use crate::model::{Alerts, BalanceChange, NewWebhookEndpoint, Outcome, StoreError};

/// A notification's row (deferred: one statement a group on PostgreSQL).
pub(crate) const INSERT_NOTIFICATION: &str =
    "INSERT INTO notifications (sequence, type, customer_id, payload, created_at) \
     VALUES (?1, ?2, ?3, ?4, ?5)";

/// A delivery's row, every value a parameter in column order, so that it
/// has a set-based form and a `COPY` form (deferred, after the
/// notifications it references).
pub(crate) const INSERT_DELIVERY: &str =
    "INSERT INTO webhook_deliveries (id, notification, endpoint_id, status, attempts, \
     next_attempt_at, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)";

/// A delivery is given up after this many failed attempts.
pub const MAX_DELIVERY_ATTEMPTS: i64 = 20;
/// Notifications whose deliveries are all settled are deleted, with their
/// delivery log, this long after they were made.
const RETENTION_DAYS: i64 = 30;
/// Notifications pruned per round; a full round is followed by another at
/// the next tick, else the next round is an hour later on the engine's clock.
const PRUNE_BATCH: i64 = 1000;
/// The longest wait between two attempts.
const MAX_BACKOFF_SECONDS: i64 = 3600;
const DAY_MICROS: i64 = 86_400_000_000;
/// How far ahead of a lot's expiry a `grant.expiring` warning can come (the
/// largest `grant_expiring_days`, 90), in µs: the sweep's reach.
pub(super) const WARNING_HORIZON: i64 = 90 * DAY_MICROS;

/// Where a read of lots in expiry order resumes: after `cursor` (an expiry
/// and a lot id), unless that has expired by `now`; then after `now`.
fn resume_after(cursor: Option<(i64, String)>, now: i64) -> (i64, String) {
    match cursor {
        Some((expires_at, id)) if expires_at > now => (expires_at, id),
        _ => (now, String::new()),
    }
}

/// A lot looked at for `grant.expiring`: its id, customer, expiry and
/// remaining credits, the customer's `grant_expiring_days`, and whether it
/// was warned already.
type Seen = (String, String, i64, i64, Option<i64>, bool);

fn seen_row(row: &db::Row<'_>) -> db::Result<Seen> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
        row.get(5)?,
    ))
}

/// The lots whose ids are in `?1` (a JSON array, read as each database
/// reads one), active and expiring after `?2`, as [`Seen`]. The ids drive the
/// join, each looked up by primary key. Without statistics (SQLite here
/// always; PostgreSQL before its first `ANALYZE`) both would otherwise walk
/// the active lots through `grants_due`: SQLite's CROSS JOIN fixes the
/// order, and on PostgreSQL a lateral subquery kept apart by `OFFSET 0`
/// does. Checked by the writer's test `the_listed_lots_are_read_by_id`.
macro_rules! recent_lots {
    ($ids:literal) => {
        concat!(
            "SELECT g.id, g.customer_id, g.expires_at, b.remaining, a.grant_expiring_days, \
               EXISTS (SELECT 1 FROM expiring_notices n WHERE n.grant_id = g.id) \
             FROM ",
            $ids,
            " JOIN grant_balances b ON b.sequence = g.sequence \
             LEFT JOIN customer_alerts a ON a.customer_id = g.customer_id \
             WHERE g.status = 'active' AND g.expires_at > ?2 \
             ORDER BY g.expires_at, g.id"
        )
    };
}
pub(super) const RECENT_LOTS_SQLITE: &str = recent_lots!(
    "(SELECT value AS id FROM json_each(?1)) AS ids CROSS JOIN grants g ON g.id = ids.id"
);
pub(super) const RECENT_LOTS_POSTGRES: &str = recent_lots!(
    "jsonb_array_elements_text(CAST(?1 AS jsonb)) AS ids(id) \
     CROSS JOIN LATERAL (SELECT * FROM grants WHERE grants.id = ids.id OFFSET 0) g"
);

/// Every `grant_expiring_days` value some customer has set.
pub(super) fn load_expiring_days(connection: &Connection) -> db::Result<Vec<i64>> {
    let mut statement = connection.prepare(
        "SELECT DISTINCT grant_expiring_days FROM customer_alerts \
         WHERE grant_expiring_days IS NOT NULL",
    )?;
    let rows = statement.query_map([], |row| row.get(0))?;
    rows.collect()
}

pub(super) struct Endpoint {
    id: String,
    events: Vec<String>,
}

impl Endpoint {
    fn wants(&self, kind: &str) -> bool {
        self.events.iter().any(|e| e == "*" || e == kind)
    }
}

pub(super) fn load_endpoints(connection: &Connection) -> db::Result<Vec<Endpoint>> {
    Ok(crate::rows::webhook_endpoints(connection)?
        .into_iter()
        .map(|e| Endpoint {
            id: e.id.to_string(),
            events: e.events,
        })
        .collect())
}

/// Seconds to wait after the `attempts`-th failed attempt: 1, 2, 4, ... up to an hour.
pub fn backoff_seconds(attempts: i64) -> i64 {
    let exponent = u32::try_from(attempts.clamp(1, 13) - 1).unwrap_or(0);
    (1i64 << exponent).min(MAX_BACKOFF_SECONDS)
}

impl Writer {
    /// After each journal entry: the live stream, and balance notifications.
    pub(super) fn after_entry(
        &mut self,
        draft: &EntryDraft,
        sequence: i64,
        recorded: Timestamp,
        before: tally_core::Amount,
        auto_topup: bool,
    ) -> db::Result<()> {
        // Queued only while someone listens (a stream that opens while this
        // group is open reads the balance after a round trip through the
        // writer, so it sees this change in the balance instead).
        if self.live.as_ref().is_some_and(|l| l.receiver_count() > 0) {
            self.group_changes.push(BalanceChange {
                customer_id: draft.customer_id.clone(),
                entry_id: sequence,
                kind: draft.kind,
                amount: draft.amount,
                balance_after: draft.balance_after,
                recorded_at: recorded,
            });
        }
        // A void (a chargeback, a refunded purchase) does not buy credits by
        // itself; the next spend below the threshold does.
        if auto_topup && draft.kind != EntryKind::Void {
            self.topup_checks.push(draft.customer_id.clone());
        }
        if self.endpoints.is_empty() {
            return Ok(());
        }
        let after = draft.balance_after;
        let reference = draft.reference.as_ref().map(Id::to_string);
        let mut notes = Vec::new();
        match draft.kind {
            EntryKind::Expire => notes.push((
                "grant.expired",
                json!({ "grant_id": reference, "amount": draft.amount.to_string(),
                        "expired_at": draft.effective_at.rfc3339(), "balance": after.to_string() }),
            )),
            EntryKind::HoldExpired => notes.push((
                "hold.expired",
                json!({ "hold_id": reference, "amount": draft.amount.to_string(),
                        "balance": after.to_string() }),
            )),
            _ => {}
        }
        // Credits a hold gives back (released, timed out, captured for
        // less) to a lot that expired meanwhile expire as they come back:
        // told as the lot's expiry too, so that the notifications add up to
        // every credit that expired.
        if draft.kind != EntryKind::Expire {
            for posting in &draft.postings {
                if let (tally_core::Account::Grant(lot), tally_core::Account::Expired) =
                    (&posting.from, &posting.to)
                {
                    notes.push((
                        "grant.expired",
                        json!({ "grant_id": lot.to_string(), "amount": posting.amount.to_string(),
                                "expired_at": draft.effective_at.rfc3339(),
                                "balance": after.to_string() }),
                    ));
                }
            }
        }
        for (kind, data) in notes {
            self.notify(kind, Some(&draft.customer_id), data)?;
        }
        // Thresholds are crossed by what a whole command does, checked once
        // it is complete (`check_balance_alerts`): a renewal expires the old
        // allocation before it grants the new one, and a balance that passes
        // through zero on the way is not low.
        match self.balance_checks.get_mut(&draft.customer_id) {
            Some((_, last)) => *last = sequence,
            None => {
                self.balance_checks
                    .insert(draft.customer_id.clone(), (before, sequence));
            }
        }
        Ok(())
    }

    /// After a command: `balance.low` for each threshold the command took a
    /// customer's balance below, and `balance.depleted` if it took a
    /// positive balance to zero or less, naming the command's last entry.
    pub(super) fn check_balance_alerts(&mut self) -> db::Result<()> {
        if self.balance_checks.is_empty() {
            return Ok(());
        }
        let mut checks: Vec<(Id, (tally_core::Amount, i64))> =
            std::mem::take(&mut self.balance_checks)
                .into_iter()
                .collect();
        // In the order of their entries.
        checks.sort_by_key(|(_, (_, last))| *last);
        for (customer_id, (before, sequence)) in checks {
            let Some(cached) = self.cache.get(&customer_id) else {
                continue;
            };
            let after = cached.last_net;
            let mut notes = Vec::new();
            if let Some(alerts) = cached.alerts.as_ref() {
                for threshold in &alerts.low_balance {
                    if before >= *threshold && after < *threshold {
                        notes.push((
                            "balance.low",
                            json!({ "threshold": threshold.to_string(), "balance": after.to_string(),
                                    "entry_id": format!("ent_{sequence}") }),
                        ));
                    }
                }
            }
            if before.is_positive() && !after.is_positive() {
                notes.push((
                    "balance.depleted",
                    json!({ "balance": after.to_string(), "entry_id": format!("ent_{sequence}") }),
                ));
            }
            for (kind, data) in notes {
                self.notify(kind, Some(&customer_id), data)?;
            }
        }
        Ok(())
    }

    /// Write a notification and a delivery to every endpoint that wants it.
    pub(super) fn notify(
        &mut self,
        kind: &str,
        customer_id: Option<&Id>,
        data: serde_json::Value,
    ) -> db::Result<()> {
        let endpoints: Vec<&Endpoint> = self.endpoints.iter().filter(|e| e.wants(kind)).collect();
        if endpoints.is_empty() {
            return Ok(());
        }
        let now = self.now.micros();
        // Deferred, as journal entries are: on PostgreSQL a group's
        // notifications go out as one statement and their deliveries as
        // another, after them (batches keep the order each was first
        // deferred in, and a notification is always deferred before its
        // deliveries, which reference it), instead of a round trip each: a
        // tick renewing a year of daily plans wrote four a renewal.
        self.connection.defer(
            db::Shape::Insert,
            INSERT_NOTIFICATION,
            params![
                self.next_notification_sequence,
                kind,
                customer_id.map(Id::as_str),
                data.to_string(),
                now
            ],
        )?;
        let notification = self.next_notification_sequence;
        self.next_notification_sequence += 1;
        self.group_notification = Some(notification);
        for endpoint in endpoints {
            self.connection.defer(
                db::Shape::Insert,
                INSERT_DELIVERY,
                params![
                    format!("dlv_{notification}_{}", endpoint.id),
                    notification,
                    endpoint.id.as_str(),
                    "pending",
                    0i64,
                    now,
                    now
                ],
            )?;
        }
        Ok(())
    }

    /// `grant.expiring` for lots of customers with `grant_expiring_days`
    /// that expire within that many days, once per lot and expiry (from the
    /// tick). Three ways, each at most `expiring_chunk` lots a tick:
    /// - **Lots made or moved since the last tick** (`expiring_recent`), in
    ///   one read: a lot made inside its warning window (a lot expiring in
    ///   5 days for a customer warned 7 days ahead), or whose expiry
    ///   changed, is warned at the next tick (while less than a chunk is
    ///   waiting). While no endpoint wants `grant.expiring` the list is
    ///   emptied, and those lots are the sweep's.
    /// - **The frontiers.** For each `grant_expiring_days` value `d` in use,
    ///   the lots whose expiry came within `d` days of now since the last
    ///   tick: those expiring after that value's frontier and at most `d`
    ///   days from now (whatever their customer's setting; each is warned
    ///   only if due under its own). A lot is warned at the first tick after
    ///   its warning day, unless more than a chunk came into the window at
    ///   once: the frontier then goes on a chunk a tick. Each frontier
    ///   starts at its horizon (now plus `d` days) at its first tick.
    /// - **The sweep** catches the rest: lots already inside their window
    ///   when the writer started, when a customer took up a setting, or
    ///   when the chunks above fell behind; a lot passed while it had no
    ///   credits left and given some again (a released hold, a refund); the
    ///   listed lots a failed tick had taken.
    ///   Each tick looks at the next `expiring_chunk` active lots expiring
    ///   within 90 days, in expiry order from where the last tick stopped,
    ///   and starts over from the soonest once it has seen them all.
    ///   Looking at all of them every tick cost 390 ms with 200,000 such
    ///   lots on SQLite, on the writer's thread, twice a second
    ///   (BENCHMARKS.md, 2026-12-05, fourth session); a sweep takes a tick
    ///   per chunk (about 100 s for 200,000 lots).
    ///
    /// A tick therefore reads at most (2 + the number of values in use) x
    /// `expiring_chunk` lots. The frontiers and the sweep start after their
    /// cursor as a bound of the index (a row value), so lots sharing one
    /// expiry are not read again on every tick. Each later read in a tick
    /// sees the notices the earlier ones wrote, so a lot is warned once.
    pub(super) fn notify_expiring(&mut self) -> db::Result<()> {
        if !self.endpoints.iter().any(|e| e.wants("grant.expiring")) {
            self.expiring_recent.clear();
            return Ok(());
        }
        // The lots' rows as this group left them so far.
        self.flush()?;
        let now = self.now.micros();
        let chunk = i64::try_from(self.options.expiring_chunk.max(1)).unwrap_or(i64::MAX);
        // Lots made or moved since the last tick, a chunk a tick.
        let take = self
            .expiring_recent
            .len()
            .min(self.options.expiring_chunk.max(1));
        let mut recent: Vec<String> = self
            .expiring_recent
            .drain(..take)
            .map(|id| id.as_str().to_owned())
            .collect();
        // (A lot made and re-dated since the last tick is listed twice.)
        recent.sort_unstable();
        recent.dedup();
        // One read for all of them: the ids as a JSON array.
        let seen: Vec<Seen> = match recent.is_empty() {
            true => Vec::new(),
            false => {
                let ids = serde_json::to_string(&recent).expect("ids serialize");
                let mut statement =
                    self.connection
                        .prepare_cached(match self.connection.dialect() {
                            db::Dialect::Sqlite => RECENT_LOTS_SQLITE,
                            db::Dialect::Postgres => RECENT_LOTS_POSTGRES,
                        })?;
                let rows = statement.query_map(params![ids, now], seen_row)?;
                rows.collect::<db::Result<_>>()?
            }
        };
        self.warn_expiring(seen, now)?;
        let mut days_in_use: Vec<i64> = self.expiring_frontiers.keys().copied().collect();
        days_in_use.sort_unstable();
        for days in days_in_use {
            let horizon = now.saturating_add(days.saturating_mul(DAY_MICROS));
            let Some(Some(cursor)) = self.expiring_frontiers.get(&days).cloned() else {
                self.expiring_frontiers
                    .insert(days, Some((horizon, String::new())));
                continue;
            };
            let (after_expiry, after_id) = resume_after(Some(cursor), now);
            let seen = self.expiring_lots((after_expiry, &after_id), horizon, chunk)?;
            // A full chunk: the next tick goes on after its last lot; else
            // every lot up to the horizon was seen.
            let frontier = match seen.last() {
                Some((id, _, expires_at, ..)) if seen.len() as i64 >= chunk => {
                    (*expires_at, id.clone())
                }
                _ => (horizon.max(after_expiry), String::new()),
            };
            self.expiring_frontiers.insert(days, Some(frontier));
            self.warn_expiring(seen, now)?;
        }
        // Resume after the last lot seen, unless that has expired meanwhile.
        let (after_expiry, after_id) = resume_after(self.expiring_sweep.take(), now);
        let seen = self.expiring_lots(
            (after_expiry, &after_id),
            now.saturating_add(WARNING_HORIZON),
            chunk,
        )?;
        // A full chunk: the next tick goes on after its last lot.
        if seen.len() as i64 >= chunk {
            if let Some((id, _, expires_at, ..)) = seen.last() {
                self.expiring_sweep = Some((*expires_at, id.clone()));
            }
        }
        self.warn_expiring(seen, now)
    }

    /// At most `chunk` active lots, not expired yet, expiring after `after`
    /// (an expiry and a lot id, in that order) and no later than `until`,
    /// in that order.
    fn expiring_lots(&self, after: (i64, &str), until: i64, chunk: i64) -> db::Result<Vec<Seen>> {
        let mut statement = self.connection.prepare_cached(
            "SELECT g.id, g.customer_id, g.expires_at, b.remaining, a.grant_expiring_days, \
               EXISTS (SELECT 1 FROM expiring_notices n WHERE n.grant_id = g.id) \
             FROM (SELECT id, customer_id, expires_at, sequence FROM grants \
               WHERE status = 'active' AND (expires_at, id) > (?1, ?2) \
               AND expires_at <= ?3 AND expires_at > ?4 \
               ORDER BY expires_at, id LIMIT ?5) g \
             JOIN grant_balances b ON b.sequence = g.sequence \
             LEFT JOIN customer_alerts a ON a.customer_id = g.customer_id \
             ORDER BY g.expires_at, g.id",
        )?;
        let rows = statement.query_map(
            params![after.0, after.1, until, self.now.micros(), chunk],
            seen_row,
        )?;
        rows.collect()
    }

    /// Warn about each lot of `seen` that is due: not warned yet, with
    /// credits left, and expiring within its customer's days.
    fn warn_expiring(&mut self, seen: Vec<Seen>, now: i64) -> db::Result<()> {
        let due = seen
            .into_iter()
            .filter(|(_, _, expires_at, remaining, days, warned)| {
                !warned
                    && *remaining > 0
                    && days.is_some_and(|days| *expires_at <= now + days * DAY_MICROS)
            });
        for (grant_id, customer_id, expires_at, remaining, ..) in due {
            // (The reads of one tick see the notices its earlier reads
            // wrote, and the listed ids are deduplicated; the conflict
            // clause is a guard.)
            let inserted = self
                .connection
                .prepare_cached(
                    "INSERT INTO expiring_notices (grant_id, sent_at) VALUES (?1, ?2) \
                     ON CONFLICT (grant_id) DO NOTHING",
                )?
                .execute(params![grant_id, now])?;
            if inserted == 0 {
                continue;
            }
            let remaining = tally_core::Amount::from_micros(remaining).unwrap_or_default();
            self.notify(
                "grant.expiring",
                Some(&Id::derived(&customer_id)),
                json!({ "grant_id": grant_id, "expires_at": Timestamp(expires_at).rfc3339(),
                        "remaining": remaining.to_string() }),
            )?;
        }
        Ok(())
    }

    /// Delete settled notifications past their retention, with their
    /// deliveries (from the tick). A notification with a delivery still
    /// pending stays, and so does the newest: its sequence is what the next
    /// one counts from, so event and delivery ids are never reused.
    pub(super) fn prune_notifications(&mut self) -> db::Result<()> {
        let now = self.now.micros();
        if now < self.next_prune_at {
            return Ok(());
        }
        let cutoff = now - RETENTION_DAYS * DAY_MICROS;
        let old: Vec<i64> = {
            let mut statement = self.connection.prepare_cached(
                "SELECT n.sequence FROM notifications n WHERE n.created_at < ?1 \
                 AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d \
                   WHERE d.notification = n.sequence AND d.status = 'pending') \
                 AND n.sequence < (SELECT MAX(sequence) FROM notifications) \
                 ORDER BY n.created_at LIMIT ?2",
            )?;
            let rows = statement.query_map(params![cutoff, PRUNE_BATCH], |row| row.get(0))?;
            rows.collect::<db::Result<_>>()?
        };
        for sequence in &old {
            self.connection
                .prepare_cached("DELETE FROM webhook_deliveries WHERE notification = ?1")?
                .execute([sequence])?;
            self.connection
                .prepare_cached("DELETE FROM notifications WHERE sequence = ?1")?
                .execute([sequence])?;
        }
        // A warned lot that has expired, was voided or no longer expires
        // will never be warned about again: its notice can go.
        let notices = self
            .connection
            .prepare_cached(
                "DELETE FROM expiring_notices WHERE grant_id IN (SELECT n.grant_id \
                 FROM expiring_notices n JOIN grants g ON g.id = n.grant_id \
                 WHERE g.status <> 'active' OR g.expires_at IS NULL OR g.expires_at <= ?1 LIMIT ?2)",
            )?
            .execute(params![now, PRUNE_BATCH])?;
        let full = old.len() >= PRUNE_BATCH as usize || notices >= PRUNE_BATCH as usize;
        self.next_prune_at = if full {
            now
        } else {
            now + 3600 * Timestamp::MICROS_PER_SECOND
        };
        Ok(())
    }

    pub(super) fn put_alerts(
        &mut self,
        customer_id: &Id,
        alerts: &Alerts,
    ) -> Result<Outcome, Failure> {
        self.load(customer_id)?;
        self.connection
            .prepare_cached(
                "INSERT INTO customer_alerts (customer_id, body, grant_expiring_days, updated_at) \
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT (customer_id) DO UPDATE SET body = excluded.body, \
                 grant_expiring_days = excluded.grant_expiring_days, updated_at = excluded.updated_at",
            )?
            .execute(params![
                customer_id.as_str(),
                serde_json::to_string(alerts).expect("alerts serialize"),
                alerts.grant_expiring_days,
                self.now.micros()
            ])?;
        if let Some(cached) = self.cache.get_mut(customer_id) {
            cached.alerts = Some(alerts.clone());
        }
        if let Some(days) = alerts.grant_expiring_days {
            self.expiring_frontiers
                .entry(i64::from(days))
                .or_insert(None);
        }
        Ok(Outcome::Alerts {
            customer_id: customer_id.clone(),
            alerts: alerts.clone(),
        })
    }

    pub(super) fn create_webhook_endpoint(
        &mut self,
        endpoint: &NewWebhookEndpoint,
    ) -> Result<Outcome, Failure> {
        let taken: bool = self
            .connection
            .prepare_cached("SELECT EXISTS(SELECT 1 FROM webhook_endpoints WHERE id = ?1)")?
            .query_row([endpoint.id.as_str()], |row| row.get(0))?;
        if taken {
            return Err(Failure::Store(StoreError::IdempotencyConflict(
                endpoint.id.to_string(),
            )));
        }
        let events = serde_json::to_string(&endpoint.events).expect("events serialize");
        self.connection
            .prepare_cached(
                "INSERT INTO webhook_endpoints (id, url, events, secret, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![
                endpoint.id.as_str(),
                endpoint.url,
                events,
                endpoint.secret,
                self.now.micros()
            ])?;
        self.endpoints.push(Endpoint {
            id: endpoint.id.to_string(),
            events: endpoint.events.clone(),
        });
        Ok(Outcome::WebhookEndpoint(WebhookEndpointRecord {
            id: endpoint.id.clone(),
            url: endpoint.url.clone(),
            events: endpoint.events.clone(),
            secret: endpoint.secret.clone(),
            created_at: self.now,
            previous_secret_expires_at: None,
        }))
    }

    pub(super) fn rotate_webhook_secret(
        &mut self,
        endpoint_id: &Id,
        secret: &str,
        previous_valid_seconds: u32,
    ) -> Result<Outcome, Failure> {
        let mut endpoint = self.live_endpoint(endpoint_id)?;
        // Past the end of the clock's range (a manual clock set there) it
        // signs until then.
        let until = (previous_valid_seconds > 0).then(|| {
            self.now
                .plus_seconds(i64::from(previous_valid_seconds))
                .unwrap_or(Timestamp(i64::MAX))
        });
        self.connection
            .prepare_cached(
                "UPDATE webhook_endpoints SET previous_secret = ?2, previous_secret_expires_at = ?3, \
                 secret = ?4 WHERE id = ?1",
            )?
            .execute(params![
                endpoint_id.as_str(),
                until.map(|_| endpoint.secret.as_str()),
                until.map(|t| t.micros()),
                secret
            ])?;
        endpoint.secret = secret.to_owned();
        endpoint.previous_secret_expires_at = until;
        Ok(Outcome::WebhookEndpoint(endpoint))
    }

    /// A live (not deleted) endpoint by id, or not found.
    fn live_endpoint(&self, id: &Id) -> Result<WebhookEndpointRecord, Failure> {
        crate::rows::webhook_endpoints(&self.connection)?
            .into_iter()
            .find(|e| e.id == *id)
            .ok_or_else(|| Failure::Store(StoreError::NotFound(format!("webhook endpoint {id}"))))
    }

    pub(super) fn update_webhook_endpoint(
        &mut self,
        id: &Id,
        url: Option<&str>,
        events: Option<&[String]>,
    ) -> Result<Outcome, Failure> {
        let mut endpoint = self.live_endpoint(id)?;
        if let Some(url) = url {
            endpoint.url = url.to_owned();
        }
        if let Some(events) = events {
            endpoint.events = events.to_vec();
        }
        let events = serde_json::to_string(&endpoint.events).expect("events serialize");
        self.connection
            .prepare_cached("UPDATE webhook_endpoints SET url = ?2, events = ?3 WHERE id = ?1")?
            .execute(params![id.as_str(), endpoint.url, events])?;
        if let Some(cached) = self.endpoints.iter_mut().find(|e| e.id == id.as_str()) {
            cached.events = endpoint.events.clone();
        }
        Ok(Outcome::WebhookEndpoint(endpoint))
    }

    pub(super) fn delete_webhook_endpoint(&mut self, id: &Id) -> Result<Outcome, Failure> {
        let endpoint = self.live_endpoint(id)?;
        let now = self.now.micros();
        self.connection
            .prepare_cached("UPDATE webhook_endpoints SET deleted_at = ?2 WHERE id = ?1")?
            .execute(params![id.as_str(), now])?;
        self.connection
            .prepare_cached(
                "UPDATE webhook_deliveries SET status = 'failed', next_attempt_at = NULL, \
                 last_error = 'the endpoint was deleted' WHERE endpoint_id = ?1 AND status = 'pending'",
            )?
            .execute([id.as_str()])?;
        self.endpoints.retain(|e| e.id != id.as_str());
        Ok(Outcome::WebhookEndpoint(endpoint))
    }

    /// Record one attempt: delivered, retried later (exponential backoff on
    /// the engine's clock), or given up after [`MAX_DELIVERY_ATTEMPTS`].
    pub(super) fn record_delivery(
        &mut self,
        delivery_id: &str,
        ok: bool,
        status: Option<u16>,
        error: Option<&str>,
    ) -> Result<Outcome, Failure> {
        let row: Option<(String, i64)> = self
            .connection
            .prepare_cached("SELECT status, attempts FROM webhook_deliveries WHERE id = ?1")?
            .query_row([delivery_id], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()?;
        let Some((current, attempts)) = row else {
            return Err(Failure::Store(StoreError::NotFound(format!(
                "delivery {delivery_id}"
            ))));
        };
        if current != "pending" {
            // A late answer for a delivery already settled changes nothing.
            return Ok(Outcome::Delivery { status: current });
        }
        let attempts = attempts + 1;
        let now = self.now.micros();
        let (state, next, delivered) = if ok {
            ("delivered", None, Some(now))
        } else if attempts >= MAX_DELIVERY_ATTEMPTS {
            ("failed", None, None)
        } else {
            let wait = backoff_seconds(attempts) * Timestamp::MICROS_PER_SECOND;
            ("pending", Some(now + wait), None)
        };
        self.connection
            .prepare_cached(
                "UPDATE webhook_deliveries SET status = ?1, attempts = ?2, next_attempt_at = ?3, \
                 last_status = ?4, last_error = ?5, delivered_at = ?6 WHERE id = ?7",
            )?
            .execute(params![
                state,
                attempts,
                next,
                status,
                error,
                delivered,
                delivery_id
            ])?;
        Ok(Outcome::Delivery {
            status: state.to_string(),
        })
    }
}
