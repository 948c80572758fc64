//! The price book as the store keeps it: features, versions (drafts and
//! published) and customer contracts.
//!
//! The writer holds the whole catalog in memory (it is small: tens of
//! features, a few versions, contracts for the customers that negotiated one)
//! and changes it only inside its write groups, so a charge is always priced
//! against exactly the versions committed before it. Readers read the tables.

use std::collections::{BTreeMap, HashMap};

use crate::db::{self, params, Connection, OptionalExtension, Row};
use serde::{Deserialize, Serialize};
use tally_core::pricebook::{Contract, PriceBook, Version};
use tally_core::{Rule, Timestamp};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureRecord {
    pub key: String,
    pub name: String,
    pub unit: String,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PricebookStatus {
    Draft,
    Published,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PricebookRecord {
    pub id: String,
    pub status: PricebookStatus,
    /// The version whose rules this draft started from.
    pub copied_from: Option<String>,
    pub rules: Vec<Rule>,
    pub created_at: Timestamp,
    pub created_by: Option<String>,
    pub updated_at: Timestamp,
    pub effective_at: Option<Timestamp>,
    pub published_at: Option<Timestamp>,
    pub published_by: Option<String>,
    /// Order of publication (1, 2, ...); ties on `effective_at` go to the later one.
    pub published_seq: Option<i64>,
}

impl PricebookRecord {
    pub fn version(&self) -> Option<Version> {
        Some(Version {
            id: self.id.clone(),
            effective_at: self.effective_at?,
            published_seq: self.published_seq?,
            rules: self.rules.clone(),
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContractRecord {
    pub customer_id: String,
    pub contract: Contract,
    pub updated_at: Timestamp,
    pub updated_by: Option<String>,
}

/// Everything pricing needs, in memory.
#[derive(Default)]
pub struct Catalog {
    pub features: BTreeMap<String, FeatureRecord>,
    pub books: HashMap<String, PricebookRecord>,
    pub published: PriceBook,
    /// Each customer's contracts, in the order they were set.
    pub contracts: HashMap<String, Vec<ContractRecord>>,
    /// The latest instant usage was priced at (an event stamped ahead of
    /// the clock is priced at its stamp): a version published later takes
    /// effect after it, so that no two uses at one instant are priced by
    /// two versions, and none priced already falls under a later version.
    pub priced_through: Option<Timestamp>,
    /// What the database holds of `priced_through` (written with the group
    /// that advanced it).
    pub priced_mark: Option<Timestamp>,
}

impl Catalog {
    pub fn load(connection: &Connection) -> db::Result<Catalog> {
        let books: HashMap<String, PricebookRecord> = pricebooks(connection)?
            .into_iter()
            .map(|b| (b.id.clone(), b))
            .collect();
        let published = PriceBook::new(
            books
                .values()
                .filter_map(PricebookRecord::version)
                .collect(),
        );
        let priced_mark = connection
            .query_row(
                "SELECT priced_through FROM engine_clock WHERE id = 1",
                [],
                |row| row.get::<_, Option<i64>>(0),
            )
            .optional()?
            .flatten()
            .map(Timestamp);
        Ok(Catalog {
            features: features(connection)?
                .into_iter()
                .map(|f| (f.key.clone(), f))
                .collect(),
            books,
            published,
            contracts: contracts_by_customer(connection)?,
            priced_through: priced_mark,
            priced_mark,
        })
    }

    /// Usage was priced at `at`.
    pub fn priced(&mut self, at: Timestamp) {
        if self.priced_through.is_none_or(|through| through < at) {
            self.priced_through = Some(at);
        }
    }

    pub fn next_published_seq(&self) -> i64 {
        self.books
            .values()
            .filter_map(|b| b.published_seq)
            .max()
            .unwrap_or(0)
            + 1
    }
}

fn corrupt(what: &str) -> db::Error {
    db::Error::Corrupt(what.to_string())
}

fn json<T: serde::de::DeserializeOwned>(text: &str) -> db::Result<T> {
    serde_json::from_str(text).map_err(|_| corrupt("bad json in the price book"))
}

fn ts(row: &Row, index: usize) -> db::Result<Option<Timestamp>> {
    Ok(row.get::<_, Option<i64>>(index)?.map(Timestamp))
}

pub fn upsert_feature(connection: &Connection, feature: &FeatureRecord) -> db::Result<()> {
    connection
        .prepare_cached(
            "INSERT INTO features (key, name, unit, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT(key) DO UPDATE SET name = excluded.name, unit = excluded.unit, updated_at = excluded.updated_at",
        )?
        .execute(params![
            feature.key,
            feature.name,
            feature.unit,
            feature.created_at.0,
            feature.updated_at.0
        ])?;
    Ok(())
}

pub fn features(connection: &Connection) -> db::Result<Vec<FeatureRecord>> {
    let mut statement = connection.prepare_cached(
        "SELECT key, name, unit, created_at, updated_at FROM features ORDER BY key",
    )?;
    let rows = statement.query_map([], |row| {
        Ok(FeatureRecord {
            key: row.get(0)?,
            name: row.get(1)?,
            unit: row.get(2)?,
            created_at: Timestamp(row.get(3)?),
            updated_at: Timestamp(row.get(4)?),
        })
    })?;
    rows.collect()
}

pub fn save_pricebook(connection: &Connection, book: &PricebookRecord) -> db::Result<()> {
    connection
        .prepare_cached(
            "INSERT INTO pricebooks (id, status, copied_from, rules, created_at, created_by, updated_at, \
             effective_at, published_at, published_by, published_seq) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) \
             ON CONFLICT(id) DO UPDATE SET status = excluded.status, rules = excluded.rules, \
             updated_at = excluded.updated_at, effective_at = excluded.effective_at, \
             published_at = excluded.published_at, published_by = excluded.published_by, \
             published_seq = excluded.published_seq",
        )?
        .execute(params![
            book.id,
            match book.status {
                PricebookStatus::Draft => "draft",
                PricebookStatus::Published => "published",
            },
            book.copied_from,
            serde_json::to_string(&book.rules).expect("rules serialize"),
            book.created_at.0,
            book.created_by,
            book.updated_at.0,
            book.effective_at.map(|t| t.0),
            book.published_at.map(|t| t.0),
            book.published_by,
            book.published_seq,
        ])?;
    Ok(())
}

const PRICEBOOK_COLUMNS: &str =
    "id, status, copied_from, rules, created_at, created_by, updated_at, \
     effective_at, published_at, published_by, published_seq";

fn pricebook_row(row: &Row) -> db::Result<PricebookRecord> {
    Ok(PricebookRecord {
        id: row.get(0)?,
        status: match row.get::<_, String>(1)?.as_str() {
            "draft" => PricebookStatus::Draft,
            "published" => PricebookStatus::Published,
            _ => return Err(corrupt("pricebook status")),
        },
        copied_from: row.get(2)?,
        rules: json(&row.get::<_, String>(3)?)?,
        created_at: Timestamp(row.get(4)?),
        created_by: row.get(5)?,
        updated_at: Timestamp(row.get(6)?),
        effective_at: ts(row, 7)?,
        published_at: ts(row, 8)?,
        published_by: row.get(9)?,
        published_seq: row.get(10)?,
    })
}

/// Every version, drafts and published alike, in order of creation: a draft
/// published between two pages of the list keeps its place, so paging never
/// skips it (`published_seq` says the order of publication).
pub fn pricebooks(connection: &Connection) -> db::Result<Vec<PricebookRecord>> {
    let sql = format!("SELECT {PRICEBOOK_COLUMNS} FROM pricebooks ORDER BY created_at, id");
    let mut statement = connection.prepare_cached(&sql)?;
    let rows = statement.query_map([], pricebook_row)?;
    rows.collect()
}

pub fn pricebook(connection: &Connection, id: &str) -> db::Result<Option<PricebookRecord>> {
    let sql = format!("SELECT {PRICEBOOK_COLUMNS} FROM pricebooks WHERE id = ?1");
    connection
        .prepare_cached(&sql)?
        .query_row([id], pricebook_row)
        .optional()
}

/// Add a contract to its customer's schedule.
pub fn save_contract(connection: &Connection, record: &ContractRecord) -> db::Result<()> {
    connection
        .prepare_cached(
            "INSERT INTO customer_contracts (id, customer_id, body, updated_at, updated_by) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![
            record.contract.id,
            record.customer_id,
            serde_json::to_string(&record.contract).expect("contract serializes"),
            record.updated_at.0,
            record.updated_by
        ])?;
    Ok(())
}

fn contract_row(row: &Row) -> db::Result<ContractRecord> {
    Ok(ContractRecord {
        customer_id: row.get(0)?,
        contract: json(&row.get::<_, String>(1)?)?,
        updated_at: Timestamp(row.get(2)?),
        updated_by: row.get(3)?,
    })
}

/// Every contract, in the order they were set.
pub fn contracts(connection: &Connection) -> db::Result<Vec<ContractRecord>> {
    let mut statement = connection.prepare_cached(
        "SELECT customer_id, body, updated_at, updated_by FROM customer_contracts ORDER BY seq",
    )?;
    let rows = statement.query_map([], contract_row)?;
    rows.collect()
}

/// A customer's contracts, in the order they were set.
pub fn customer_contracts(
    connection: &Connection,
    customer_id: &str,
) -> db::Result<Vec<ContractRecord>> {
    let mut statement = connection.prepare_cached(
        "SELECT customer_id, body, updated_at, updated_by FROM customer_contracts \
         WHERE customer_id = ?1 ORDER BY seq",
    )?;
    let rows = statement.query_map([customer_id], contract_row)?;
    rows.collect()
}

/// The contract that applies at `at`: the most recently set one whose window
/// contains it.
pub fn contract_at(contracts: &[ContractRecord], at: Timestamp) -> Option<&ContractRecord> {
    contracts.iter().rev().find(|c| c.contract.in_effect(at))
}

/// Every customer's contracts, in the order they were set.
pub fn contracts_by_customer(
    connection: &Connection,
) -> db::Result<HashMap<String, Vec<ContractRecord>>> {
    let mut by_customer: HashMap<String, Vec<ContractRecord>> = HashMap::new();
    for record in contracts(connection)? {
        by_customer
            .entry(record.customer_id.clone())
            .or_default()
            .push(record);
    }
    Ok(by_customer)
}

/// The price a hold locked when it was placed.
pub fn save_hold_pricing(
    connection: &Connection,
    hold_id: &str,
    pricing: &tally_core::pricebook::Pricing,
) -> db::Result<()> {
    connection
        .prepare_cached("INSERT INTO hold_pricing (hold_id, pricing) VALUES (?1, ?2)")?
        .execute(params![
            hold_id,
            serde_json::to_string(pricing).expect("pricing serializes")
        ])?;
    Ok(())
}

pub fn hold_pricing(
    connection: &Connection,
    hold_id: &str,
) -> db::Result<Option<tally_core::pricebook::Pricing>> {
    let text: Option<String> = connection
        .prepare_cached("SELECT pricing FROM hold_pricing WHERE hold_id = ?1")?
        .query_row([hold_id], |row| row.get(0))
        .optional()?;
    text.map(|t| json(&t)).transpose()
}
