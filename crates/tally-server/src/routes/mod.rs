//! The HTTP handlers, one module per resource family.

pub mod customers;
pub mod ledger;
pub mod pricebook;
pub mod spend;
pub mod system;
