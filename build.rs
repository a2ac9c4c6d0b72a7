//! `postgres_tests` when `CHATBRIDGE_TEST_POSTGRES_URL` is set: the store
//! suites are then compiled a second time to run on PostgreSQL
//! (tests/api/postgres.rs); without it one ignored test says they did not run.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(postgres_tests)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=CHATBRIDGE_TEST_POSTGRES_URL");
    if std::env::var_os("CHATBRIDGE_TEST_POSTGRES_URL").is_some_and(|v| !v.is_empty()) {
        println!("cargo::rustc-cfg=postgres_tests");
    }
}
