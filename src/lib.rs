//! chatbridge: order-system webhooks in, Yandex Market buyer chat messages
//! out. Stages, in the order data moves: [`ingest`] → [`routes`] →
//! [`render`] → [`store`] → [`dispatch`] → [`market`].

pub mod admin;
pub mod api_error;
pub mod app;
pub mod clock;
pub mod commands;
pub mod dispatch;
pub mod domain;
pub mod ingest;
pub mod market;
pub mod pipeline;
pub mod reload;
pub mod render;
pub mod routes;
pub mod settings;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod ui;
