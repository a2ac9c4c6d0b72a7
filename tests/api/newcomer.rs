//! What the README gives a newcomer beyond the service itself, run as
//! written: `chatbridge sign` for a sender's first signed webhook, and
//! `chatbridge backup` of the database while the service runs.

use std::process::{Command, Output};

use serde_json::Value;

use crate::helpers::*;

async fn run(args: Vec<String>, env: Vec<(&'static str, String)>) -> Output {
    actix_rt::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_chatbridge"))
            .args(&args)
            .envs(env)
            .env_remove("CHATBRIDGE_WEBHOOK_SECRET")
            .output()
            .expect("the binary runs")
    })
    .await
    .expect("the blocking task ran")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[actix_rt::test]
async fn chatbridge_sign_prints_headers_that_the_service_accepts() {
    let app = spawn_app().await;
    let file = app.root.path().join("event.json");
    let body = serde_json::to_vec(&sample_as("order_shipped", "SIGN-1", None)).unwrap();
    std::fs::write(&file, &body).unwrap();

    let out = run(
        vec![
            "sign".into(),
            "--secret".into(),
            SECRET.into(),
            file.display().to_string(),
        ],
        vec![],
    )
    .await;

    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let printed = text(&out.stdout);
    let mut headers = vec![("content-type", "application/json".to_owned())];
    for line in printed.lines() {
        let (name, value) = line.split_once(": ").expect("name: value lines");
        let name = match name {
            "webhook-id" => "webhook-id",
            "webhook-timestamp" => "webhook-timestamp",
            "webhook-signature" => "webhook-signature",
            other => panic!("unexpected header {other}: {printed}"),
        };
        headers.push((name, value.to_owned()));
    }
    assert_eq!(headers.len(), 4, "{printed}");
    let (status, answer) = app.post_raw("/hooks/oms", &headers, body).await;
    assert_eq!(status, 202, "{answer}");

    // A secret that is not one gets a clear error, and no headers.
    let out = run(
        vec![
            "sign".into(),
            "--secret".into(),
            "not-a-secret".into(),
            file.display().to_string(),
        ],
        vec![],
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--secret"),
        "{}",
        text(&out.stderr)
    );
    assert!(out.stdout.is_empty());
    app.stop().await;
}

#[actix_rt::test]
async fn chatbridge_backup_copies_the_database_while_the_service_runs() {
    let app = spawn_app().await;
    let (status, body) = app
        .post_event("oms", &sample_as("order_shipped", "BK-1", None))
        .await;
    assert_eq!(status, 202, "{body}");
    let id = body["deliveries"][0]["id"].as_i64().unwrap();
    app.wait_for_state(id, "delivered").await;
    let root = app.root.path();
    let copy = root.join("backup.db");
    let config = root.join("config").display().to_string();
    let db = format!("sqlite://{}", root.join("chatbridge.db").display());
    let backup_args = vec![
        "backup".to_owned(),
        "--config".into(),
        config,
        "--to".into(),
        copy.display().to_string(),
    ];

    let out = run(
        backup_args.clone(),
        vec![("CHATBRIDGE__STORAGE__URL", db.clone())],
    )
    .await;

    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("backed up to"));
    let conn = rusqlite::Connection::open(&copy).unwrap();
    let (state, event): (String, String) = conn
        .query_row(
            "SELECT d.state, e.external_id FROM deliveries d JOIN events e ON e.id = d.event_id WHERE d.id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((state.as_str(), event.as_str()), ("delivered", "BK-1"));

    // Never over an existing file.
    let out = run(backup_args, vec![("CHATBRIDGE__STORAGE__URL", db)]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("exists"),
        "{}",
        text(&out.stderr)
    );
    // The service still works.
    let (status, _): (u16, Value) = app.get("/readyz").await;
    assert_eq!(status, 200);
    app.stop().await;
}
