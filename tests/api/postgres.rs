//! The store-touching suites (admin, delivery, dispatch, gauges, ingest,
//! notifications, orders) once more, on PostgreSQL: the same files,
//! compiled a second time in this module, where `helpers` is the shared one with `spawn_app` and
//! `spawn_app_with` starting the app on a fresh PostgreSQL database. So
//! every test of those suites runs on both backends as `<suite>::<test>`
//! and `postgres::<suite>::<test>`, and a new test in them runs on both
//! without any extra line. (Methods the suites share live in helpers.rs:
//! an `impl TestApp` in a suite would be compiled twice.)
//!
//! Compiled only when `CHATBRIDGE_TEST_POSTGRES_URL` was set at build time
//! (see build.rs); without it one ignored test says what did not run.

#[cfg(not(postgres_tests))]
#[test]
#[ignore = "CHATBRIDGE_TEST_POSTGRES_URL is not set: the admin, delivery, dispatch, gauges, ingest, notifications and orders suites did not run on PostgreSQL, nor several_instances and several_processes (instances sharing one database)"]
fn postgres_suites_skipped() {}

#[cfg(postgres_tests)]
mod helpers {
    pub use crate::helpers::*;

    pub async fn spawn_app() -> TestApp {
        spawn_app_with(TestOptions::default()).await
    }

    pub async fn spawn_app_with(options: TestOptions) -> TestApp {
        crate::helpers::spawn_app_with(TestOptions {
            backend: Backend::Postgres,
            ..options
        })
        .await
    }
}

#[cfg(postgres_tests)]
#[path = "admin.rs"]
mod admin;
#[cfg(postgres_tests)]
#[path = "delivery.rs"]
mod delivery;
#[cfg(postgres_tests)]
#[path = "dispatch.rs"]
mod dispatch;
#[cfg(postgres_tests)]
#[path = "gauges.rs"]
mod gauges;
#[cfg(postgres_tests)]
#[path = "ingest.rs"]
mod ingest;
#[cfg(postgres_tests)]
#[path = "notifications.rs"]
mod notifications;
#[cfg(postgres_tests)]
#[path = "orders.rs"]
mod orders;
