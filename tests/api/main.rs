//! One integration test binary; each module tests one part of the contract
//! over real HTTP on loopback.

mod helpers;
mod pipeline;
