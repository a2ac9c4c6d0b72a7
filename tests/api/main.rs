//! One integration test binary; each module tests one part of the contract
//! over real HTTP on loopback.

mod admin;
mod admin_cli;
mod config_errors;
mod crash;
mod delivery;
mod dispatch;
mod fake_market;
mod gauges;
mod helpers;
mod hostile;
mod ingest;
mod newcomer;
mod notifications;
mod openapi;
mod operations;
mod orders;
mod outage;
mod pipeline;
mod postgres;
mod process;
mod prometheus;
mod serve_binary;
// PostgreSQL only (see postgres.rs for what runs without it).
#[cfg(postgres_tests)]
mod postgres_batches;
#[cfg(postgres_tests)]
mod postgres_quota;
#[cfg(postgres_tests)]
mod several_instances;
#[cfg(postgres_tests)]
mod several_processes;
mod spec;
mod store_copy;
mod templates;
mod wake_ups;
