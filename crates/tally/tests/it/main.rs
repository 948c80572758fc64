//! Black-box tests of the `tally` binary over real HTTP: one test binary for
//! every integration test (fast builds), each test with its own server
//! process and a fresh data directory.

mod concurrency;
mod crash;
mod events;
mod hardening;
mod kafka;
mod members;
mod nats;
mod notifications;
mod overage;
mod plans;
mod pricebook;
mod routes;
mod servers;
mod smoke;
mod support;
mod topups;
