//! One integration test binary; each module tests one part of the contract
//! over real HTTP on loopback.

mod delivery;
mod dispatch;
mod helpers;
mod ingest;
mod openapi;
mod pipeline;
mod templates;
