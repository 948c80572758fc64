//! The HTTP handlers, one module per resource family.

pub mod customers;
pub mod events;
pub mod ledger;
pub mod members;
pub mod notify;
pub mod plans;
pub mod pricebook;
pub mod spend;
pub mod system;
pub mod topups;
