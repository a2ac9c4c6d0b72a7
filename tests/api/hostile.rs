//! Hostile input: Standard Webhooks signatures (the spec's test vector,
//! rotation, tokens), limits (JSON depth, header size, slow clients,
//! connection caps), dedupe under concurrency, across restarts and after
//! retention, secrets kept out of logs, error bodies, `Debug` and `check`
//! output, configuration mistakes that stop the service with a useful
//! message, and weird bodies that must never take the service down.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use chatbridge::clock::{Clock, ManualClock, SystemClock};
use chatbridge::market::fake::{FakeConfig, FakeMarket};
use serde_json::{json, Value};

use crate::helpers::*;

const BIN: &str = env!("CARGO_BIN_EXE_chatbridge");

// ------------------------------------------------------------------ helpers

/// A `whsec_` secret whose key is `seed` repeated to 24 bytes.
fn whsec(seed: &str) -> String {
    let key: Vec<u8> = seed.bytes().cycle().take(24).collect();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

/// Standard Webhooks headers for `body` signed with `secret` at `ts` (seconds).
fn headers_signed_with(secret: &str, body: &[u8], ts: i64) -> Vec<(&'static str, String)> {
    let id = format!("msg_{}", rand_id());
    let sig = chatbridge::ingest::signature::sign(secret, &id, ts, body).unwrap();
    vec![
        ("content-type", "application/json".into()),
        ("webhook-id", id),
        ("webhook-timestamp", ts.to_string()),
        ("webhook-signature", sig),
    ]
}

fn assert_error(status: u16, body: &Value, want_status: u16, want_code: &str) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["error"]["code"], want_code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

/// `GET /healthz` answers 200: the service survived whatever came before.
async fn assert_alive(app: &TestApp) {
    let resp = app
        .client
        .get(format!("{}/healthz", app.base))
        .send()
        .await
        .expect("the service still answers /healthz");
    assert_eq!(resp.status().as_u16(), 200);
}

fn addr_of(app: &TestApp) -> String {
    app.base.trim_start_matches("http://").to_owned()
}

/// What a raw TCP client saw: the bytes the server sent before it closed
/// the connection (or before `wait` passed), whether it closed, and how long
/// that took.
#[derive(Debug)]
struct RawOutcome {
    response: Vec<u8>,
    closed: bool,
    elapsed: Duration,
}

impl RawOutcome {
    fn status(&self) -> Option<u16> {
        let text = String::from_utf8_lossy(&self.response);
        let line = text.lines().next()?;
        line.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
    }
}

/// Sends `bytes` over a fresh connection (off the actix thread, so the
/// server keeps running) and reads until the server closes or `wait` passes.
async fn raw_exchange(addr: String, bytes: Vec<u8>, wait: Duration) -> RawOutcome {
    actix_rt::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(&addr).expect("connect");
        let started = Instant::now();
        // A server that closes early may reset the connection mid-write: that is a close too.
        let _ = stream.write_all(&bytes);
        let _ = stream.flush();
        read_until_close(&mut stream, started, wait)
    })
    .await
    .expect("the blocking task ran")
}

fn read_until_close(stream: &mut TcpStream, started: Instant, wait: Duration) -> RawOutcome {
    let mut response = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let left = wait.saturating_sub(started.elapsed());
        if left.is_zero() {
            return RawOutcome {
                response,
                closed: false,
                elapsed: started.elapsed(),
            };
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => response.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            // Reset by the server: closed.
            Err(_) => break,
        }
    }
    RawOutcome {
        response,
        closed: true,
        elapsed: started.elapsed(),
    }
}

// ------------------------------------------------------- signatures & tokens

const VECTOR_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
const VECTOR_TS: i64 = 1614265330;
const VECTOR_BODY: &[u8] = br#"{"test": 2432232314}"#;
const VECTOR_SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

fn vector_headers(signature: &str) -> Vec<(&'static str, String)> {
    vec![
        ("content-type", "application/json".into()),
        ("webhook-id", VECTOR_ID.into()),
        ("webhook-timestamp", VECTOR_TS.to_string()),
        ("webhook-signature", signature.into()),
    ]
}

#[actix_rt::test]
async fn the_standard_webhooks_test_vector_passes_auth_over_http() {
    // The shipped `oms` secret is the spec's test secret.
    let clock = ManualClock::new(VECTOR_TS * 1000);
    let app = spawn_app_with(TestOptions {
        clock: Some(clock.clone()),
        ..TestOptions::default()
    })
    .await;

    // The body has no "type": a 400 missing_event_type proves the
    // signature itself was accepted (auth is checked first).
    let (status, body) = app
        .post_raw(
            "/hooks/oms",
            &vector_headers(VECTOR_SIG),
            VECTOR_BODY.to_vec(),
        )
        .await;
    assert_error(status, &body, 400, "missing_event_type");

    // Several space-separated signatures: any valid one passes.
    let several = format!("v1,bm9wZQ== v2,c29tZXRoaW5n v1a,xyz {VECTOR_SIG} v1,AAAA");
    let (status, body) = app
        .post_raw(
            "/hooks/oms",
            &vector_headers(&several),
            VECTOR_BODY.to_vec(),
        )
        .await;
    assert_error(status, &body, 400, "missing_event_type");

    // The same bytes with one digit changed: refused.
    let (status, body) = app
        .post_raw(
            "/hooks/oms",
            &vector_headers(VECTOR_SIG),
            br#"{"test": 2432232315}"#.to_vec(),
        )
        .await;
    assert_error(status, &body, 401, "unauthorized");
    // Whitespace is part of the signed bytes.
    let (status, body) = app
        .post_raw(
            "/hooks/oms",
            &vector_headers(VECTOR_SIG),
            br#"{"test":2432232314}"#.to_vec(),
        )
        .await;
    assert_error(status, &body, 401, "unauthorized");
    // The right MAC under another version prefix is not a v1 signature.
    let (status, body) = app
        .post_raw(
            "/hooks/oms",
            &vector_headers(&VECTOR_SIG.replacen("v1,", "v2,", 1)),
            VECTOR_BODY.to_vec(),
        )
        .await;
    assert_error(status, &body, 401, "unauthorized");
    // Another id or timestamp with the same signature: refused.
    let mut other_id = vector_headers(VECTOR_SIG);
    other_id[1].1 = "msg_other".into();
    let (status, body) = app
        .post_raw("/hooks/oms", &other_id, VECTOR_BODY.to_vec())
        .await;
    assert_error(status, &body, 401, "unauthorized");
    let mut other_ts = vector_headers(VECTOR_SIG);
    other_ts[2].1 = (VECTOR_TS + 1).to_string();
    let (status, body) = app
        .post_raw("/hooks/oms", &other_ts, VECTOR_BODY.to_vec())
        .await;
    assert_error(status, &body, 401, "unauthorized");

    // ±5 minutes: 299 s later still passes, 301 s later does not.
    clock.advance(Duration::from_secs(299));
    let (status, body) = app
        .post_raw(
            "/hooks/oms",
            &vector_headers(VECTOR_SIG),
            VECTOR_BODY.to_vec(),
        )
        .await;
    assert_error(status, &body, 400, "missing_event_type");
    clock.advance(Duration::from_secs(2));
    let (status, body) = app
        .post_raw(
            "/hooks/oms",
            &vector_headers(VECTOR_SIG),
            VECTOR_BODY.to_vec(),
        )
        .await;
    assert_error(status, &body, 401, "unauthorized");
    // And 301 s early.
    clock.set((VECTOR_TS - 301) * 1000);
    let (status, body) = app
        .post_raw(
            "/hooks/oms",
            &vector_headers(VECTOR_SIG),
            VECTOR_BODY.to_vec(),
        )
        .await;
    assert_error(status, &body, 401, "unauthorized");

    app.stop().await;
}

#[actix_rt::test]
async fn a_401_never_reveals_the_expected_signature_or_the_secret() {
    let app = spawn_app().await;
    let text = sample("order_shipped").to_string().into_bytes();
    let mut headers = signed_headers(&text, now_secs(&app));
    let good = headers[3].1.clone();
    headers[3].1 = "v1,AAAA".into();

    let (status, body) = app.post_raw("/hooks/oms", &headers, text).await;

    assert_error(status, &body, 401, "unauthorized");
    let shown = body.to_string();
    let key_b64 = SECRET.trim_start_matches("whsec_");
    for secret in [
        good.as_str(),
        good.trim_start_matches("v1,"),
        SECRET,
        key_b64,
    ] {
        assert!(!shown.contains(secret), "{shown} reveals {secret}");
    }
    app.stop().await;
}

fn rotation_settings(secrets: &[&str]) -> (String, String) {
    let list: Vec<String> = secrets.iter().map(|s| format!("{s:?}")).collect();
    shipped_settings_plus(&format!(
        "[sources.rot]\nsecret = [{}]\nevent_type = \"/type\"\nevent_id = \"/id\"\n",
        list.join(", ")
    ))
}

#[actix_rt::test]
async fn every_secret_of_a_rotation_list_is_accepted_and_a_removed_one_is_refused() {
    let (new, old, stranger) = (whsec("new-key"), whsec("old-key"), whsec("stranger"));
    let app = spawn_app_with(TestOptions {
        files: vec![rotation_settings(&[&new, &old])],
        ..TestOptions::default()
    })
    .await;
    let post = |secret: String, id: &'static str| {
        let app = &app;
        async move {
            let text = json!({"id": id, "type": "rotation.test"})
                .to_string()
                .into_bytes();
            let headers = headers_signed_with(&secret, &text, now_secs(app));
            app.post_raw("/hooks/rot", &headers, text).await
        }
    };

    let (status, body) = post(new.clone(), "r-1").await;
    assert_eq!(status, 202, "the new secret: {body}");
    let (status, body) = post(old.clone(), "r-2").await;
    assert_eq!(status, 202, "the old secret, still listed: {body}");
    let (status, body) = post(stranger.clone(), "r-3").await;
    assert_error(status, &body, 401, "unauthorized");
    // A header carrying signatures by both the old and a stranger's secret passes.
    let text = json!({"id": "r-4", "type": "rotation.test"}).to_string();
    let mut headers = headers_signed_with(&stranger, text.as_bytes(), now_secs(&app));
    let by_old =
        chatbridge::ingest::signature::sign(&old, &headers[1].1, now_secs(&app), text.as_bytes())
            .unwrap();
    headers[3].1 = format!("{} {by_old}", headers[3].1);
    let (status, body) = app
        .post_raw("/hooks/rot", &headers, text.into_bytes())
        .await;
    assert_eq!(status, 202, "{body}");

    // The rotation ends: the old secret leaves the file.
    let (file, contents) = rotation_settings(&[&new]);
    std::fs::write(app.root.path().join(file), contents).unwrap();
    let (status, body) = app.admin_post("/admin/reload", &json!({})).await;
    assert_eq!(status, 200, "{body}");

    let (status, body) = post(old.clone(), "r-5").await;
    assert_error(status, &body, 401, "unauthorized");
    let (status, body) = post(new.clone(), "r-6").await;
    assert_eq!(status, 202, "{body}");
    app.stop().await;
}

fn token_settings(tokens: &[&str]) -> (String, String) {
    let list: Vec<String> = tokens.iter().map(|s| format!("{s:?}")).collect();
    shipped_settings_plus(&format!(
        "[sources.tok]\ntoken = [{}]\nevent_type = \"/type\"\nevent_id = \"/id\"\n",
        list.join(", ")
    ))
}

async fn post_with_auth(app: &TestApp, auth: Option<&str>, id: &str) -> (u16, Value) {
    let text = json!({"id": id, "type": "token.test"}).to_string();
    let mut headers = vec![("content-type", "application/json".to_string())];
    if let Some(auth) = auth {
        headers.push(("authorization", auth.to_owned()));
    }
    app.post_raw("/hooks/tok", &headers, text.into_bytes())
        .await
}

#[actix_rt::test]
async fn a_token_source_takes_either_of_two_bearer_tokens_and_nothing_else() {
    let (one, two) = ("tok-one-7f3a9c", "tok-two-51be02");
    let app = spawn_app_with(TestOptions {
        files: vec![token_settings(&[one, two])],
        ..TestOptions::default()
    })
    .await;

    let (status, body) = post_with_auth(&app, Some(&format!("Bearer {one}")), "t-1").await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["deliveries"], json!([]), "no route takes token.test");
    let (status, body) = post_with_auth(&app, Some(&format!("Bearer {two}")), "t-2").await;
    assert_eq!(status, 202, "{body}");

    let refused = [
        None,
        Some("Bearer ".to_string()),
        Some("Bearer tok-three".to_string()),
        Some(format!("Bearer {}", &one[..one.len() - 1])),
        Some(format!("Bearer {one}x")),
        Some(format!("Bearer {one} {two}")),
        Some(one.to_string()),
        Some(format!("Basic {one}")),
        Some(format!("Bearer {SECRET}")),
    ];
    for (i, auth) in refused.iter().enumerate() {
        let (status, body) = post_with_auth(&app, auth.as_deref(), &format!("bad-{i}")).await;
        assert_error(status, &body, 401, "unauthorized");
        let shown = body.to_string();
        assert!(
            !shown.contains(one) && !shown.contains(two),
            "{shown} reveals a token"
        );
    }
    // Standard Webhooks headers are no substitute for the token.
    let text = json!({"id": "t-sig", "type": "token.test"}).to_string();
    let (status, body) = app
        .post_raw(
            "/hooks/tok",
            &signed_headers(text.as_bytes(), now_secs(&app)),
            text.into_bytes(),
        )
        .await;
    assert_error(status, &body, 401, "unauthorized");

    // Rotation ends: `one` is removed and refused from then on.
    let (file, contents) = token_settings(&[two]);
    std::fs::write(app.root.path().join(file), contents).unwrap();
    let (status, body) = app.admin_post("/admin/reload", &json!({})).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = post_with_auth(&app, Some(&format!("Bearer {one}")), "t-3").await;
    assert_error(status, &body, 401, "unauthorized");
    let (status, body) = post_with_auth(&app, Some(&format!("Bearer {two}")), "t-4").await;
    assert_eq!(status, 202, "{body}");
    app.stop().await;
}

#[actix_rt::test]
async fn an_oversized_signature_header_with_many_candidates_is_a_plain_401() {
    let app = spawn_app().await;
    let text = sample("order_shipped").to_string().into_bytes();
    let mut headers = signed_headers(&text, now_secs(&app));
    headers[3].1 = vec!["v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="; 1500].join(" ");

    let (status, body) = app.post_raw("/hooks/oms", &headers, text).await;

    assert_error(status, &body, 401, "unauthorized");
    assert_alive(&app).await;
    app.stop().await;
}

// ------------------------------------------------------------------- limits

/// `{"type":"deep.test","id":..,"x":[[...]]}` nesting `depth` levels in all.
fn nested(depth: usize, id: &str) -> Vec<u8> {
    let arrays = depth - 1;
    format!(
        r#"{{"type":"deep.test","id":"{id}","x":{}{}}}"#,
        "[".repeat(arrays),
        "]".repeat(arrays)
    )
    .into_bytes()
}

#[actix_rt::test]
async fn json_nesting_past_max_json_depth_is_400_json_too_deep() {
    let app = spawn_app().await;
    assert_eq!(
        chatbridge::settings::Settings::default()
            .server
            .max_json_depth,
        32,
        "the documented default"
    );

    let at_limit = nested(32, "d-32");
    assert_eq!(chatbridge::ingest::json_depth(&at_limit), 32);
    let (status, body) = app
        .post_raw(
            "/hooks/oms",
            &signed_headers(&at_limit, now_secs(&app)),
            at_limit,
        )
        .await;
    assert_eq!(status, 202, "32 levels are allowed: {body}");

    let (status, body) = app
        .post_raw(
            "/hooks/oms",
            &signed_headers(&nested(33, "d-33"), now_secs(&app)),
            nested(33, "d-33"),
        )
        .await;
    assert_error(status, &body, 400, "json_too_deep");

    // Far deeper than any parser's recursion limit, within the body limit.
    for body_bytes in [
        b"[".repeat(200_000),
        b"{\"a\":".repeat(40_000),
        [&br#"{"type":"x","s":"\\"}"#[..], &b"[".repeat(100_000)].concat(),
    ] {
        let (status, body) = app
            .post_raw(
                "/hooks/oms",
                &signed_headers(&body_bytes, now_secs(&app)),
                body_bytes,
            )
            .await;
        assert_error(status, &body, 400, "json_too_deep");
    }
    // Brackets inside strings do not count.
    let stringy = format!(
        r#"{{"type":"deep.test","id":"d-str","s":"{}"}}"#,
        "[{".repeat(5000)
    );
    let (status, body) = app
        .post_raw(
            "/hooks/oms",
            &signed_headers(stringy.as_bytes(), now_secs(&app)),
            stringy.into_bytes(),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    assert_alive(&app).await;
    app.stop().await;
}

#[actix_rt::test]
async fn max_json_depth_is_configurable() {
    let app = spawn_app_with(TestOptions {
        tweak: Some(Box::new(|s| s.server.max_json_depth = 3)),
        ..TestOptions::default()
    })
    .await;

    let (status, body) = app
        .post_raw(
            "/hooks/oms",
            &signed_headers(&nested(3, "c-3"), now_secs(&app)),
            nested(3, "c-3"),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let (status, body) = app
        .post_raw(
            "/hooks/oms",
            &signed_headers(&nested(4, "c-4"), now_secs(&app)),
            nested(4, "c-4"),
        )
        .await;
    assert_error(status, &body, 400, "json_too_deep");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("server.max_json_depth"),
        "the message names the setting: {body}"
    );
    app.stop().await;
}

#[actix_rt::test]
async fn a_huge_header_gets_431_or_a_closed_connection_and_the_service_lives_on() {
    let app = spawn_app().await;
    let body = sample("order_shipped").to_string();

    // One 200 KB header value (actix's head limit is 128 KiB).
    let mut one_big = format!(
        "POST /hooks/oms HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Big: {}\r\n",
        "a".repeat(200_000)
    );
    one_big.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    // 200 small headers (actix takes at most 96).
    let mut many =
        "POST /hooks/oms HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".to_string();
    for i in 0..200 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));

    for (what, request) in [("one 200 KB header", one_big), ("200 headers", many)] {
        let outcome =
            raw_exchange(addr_of(&app), request.into_bytes(), Duration::from_secs(10)).await;
        let status = outcome.status();
        assert!(
            status == Some(431) || (status.is_none() && outcome.closed),
            "{what}: want 431 or a closed connection, got {status:?} after {:?}: {:?}",
            outcome.elapsed,
            String::from_utf8_lossy(&outcome.response[..outcome.response.len().min(300)])
        );
        assert!(outcome.closed, "{what}: the connection is closed");
        assert_alive(&app).await;
    }
    // Nothing got through to ingest.
    assert_eq!(app.all_deliveries().await, Vec::<Value>::new());
    // And a normal webhook still works.
    let (status, body) = app.post_event("oms", &sample("order_shipped")).await;
    assert_eq!(status, 202, "{body}");
    app.stop().await;
}

#[actix_rt::test]
async fn header_values_that_are_not_text_are_a_401_not_a_crash() {
    let app = spawn_app().await;
    let body = sample("order_shipped").to_string();
    let ts = now_secs(&app);
    let mut request = format!(
        "POST /hooks/oms HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\nwebhook-id: msg_1\r\nwebhook-timestamp: {ts}\r\nwebhook-signature: v1,"
    )
    .into_bytes();
    request.extend_from_slice(b"\xff\xfe\x80");
    request
        .extend_from_slice(format!("\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes());

    let outcome = raw_exchange(addr_of(&app), request, Duration::from_secs(10)).await;

    // actix may refuse the head itself (400) or pass it on (our 401).
    let status = outcome.status();
    assert!(
        matches!(status, Some(400) | Some(401)),
        "{status:?}: {}",
        String::from_utf8_lossy(&outcome.response)
    );
    assert_alive(&app).await;
    app.stop().await;
}

/// How long a cut-off test reads: 8x the 500 ms it configures, below actix's 5 s default.
const CUT_OFF_WAIT: Duration = Duration::from_secs(4);

#[actix_rt::test]
async fn a_client_that_sends_half_a_head_and_waits_is_cut_off() {
    let app = spawn_app_with(TestOptions {
        tweak: Some(Box::new(|s| s.server.client_request_timeout_ms = 500)),
        ..TestOptions::default()
    })
    .await;

    // The cut comes 0.5 s in; reading for up to 4 s is the margin for a
    // loaded machine, and still short of actix's default 5 s, so a
    // close seen here is this setting's doing.
    let outcome = raw_exchange(
        addr_of(&app),
        b"POST /hooks/oms HTTP/1.1\r\nHost: x\r\nContent-Type: appl".to_vec(),
        CUT_OFF_WAIT,
    )
    .await;

    let status = outcome.status();
    assert!(
        status == Some(408) || (status.is_none() && outcome.closed),
        "want 408 or a close, got {status:?} closed={} after {:?}: {:?}",
        outcome.closed,
        outcome.elapsed,
        String::from_utf8_lossy(&outcome.response)
    );
    assert!(
        outcome.closed,
        "not cut off within {CUT_OFF_WAIT:?} (client_request_timeout_ms = 500)"
    );
    // A client that sends nothing at all is cut off as well.
    let outcome = raw_exchange(addr_of(&app), Vec::new(), CUT_OFF_WAIT).await;
    assert!(outcome.closed, "{outcome:?}");
    assert_alive(&app).await;
    app.stop().await;
}

/// A client that sends a whole head, then stops sending the body it
/// announced. Nothing in DESIGN.md bounds this; see the report.
#[actix_rt::test]
async fn a_client_that_stalls_mid_body_is_cut_off() {
    let app = spawn_app_with(TestOptions {
        tweak: Some(Box::new(|s| s.server.client_request_timeout_ms = 500)),
        ..TestOptions::default()
    })
    .await;

    let outcome = raw_exchange(
        addr_of(&app),
        b"POST /hooks/oms HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"type\":".to_vec(),
        Duration::from_secs(20),
    )
    .await;

    assert!(outcome.closed, "still open after {:?}", outcome.elapsed);
    assert_alive(&app).await;
    app.stop().await;
}

#[actix_rt::test]
async fn max_connections_makes_further_clients_wait_until_one_leaves() {
    let app = spawn_app_with(TestOptions {
        tweak: Some(Box::new(|s| {
            s.server.workers = 1;
            s.server.max_connections = 1;
            s.server.client_request_timeout_ms = 30_000;
        })),
        ..TestOptions::default()
    })
    .await;
    let addr = addr_of(&app);

    let (held_tx, held_rx) = std::sync::mpsc::channel::<()>();
    let outcome = actix_rt::task::spawn_blocking(move || {
        // The one connection the worker may hold: open, silent.
        let holder = TcpStream::connect(&addr).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        // A second client asks for /healthz and gets nothing while the first is open.
        let mut waiting = TcpStream::connect(&addr).unwrap();
        waiting
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let early = read_until_close(&mut waiting, Instant::now(), Duration::from_millis(1500));
        drop(holder);
        let _ = held_tx.send(());
        let late = read_until_close(&mut waiting, Instant::now(), Duration::from_secs(10));
        (early, late)
    })
    .await
    .unwrap();
    held_rx.recv().unwrap();
    let (early, late) = outcome;

    assert!(
        early.response.is_empty(),
        "with max_connections = 1 the second client waits: {:?}",
        String::from_utf8_lossy(&early.response)
    );
    assert_eq!(
        late.status(),
        Some(200),
        "served once the first left: {:?}",
        String::from_utf8_lossy(&late.response)
    );
    app.stop().await;
}

// ------------------------------------------------------------------- dedupe

#[actix_rt::test]
async fn twenty_identical_webhooks_at_once_make_one_event_one_delivery_one_message() {
    let app = spawn_app().await;
    let event = sample("order_shipped");
    let text = event.to_string().into_bytes();
    let headers = signed_headers(&text, now_secs(&app));

    let answers = futures_util::future::join_all(
        (0..20).map(|_| app.post_raw("/hooks/oms", &headers, text.clone())),
    )
    .await;

    let accepted: Vec<&Value> = answers
        .iter()
        .filter(|(s, _)| *s == 202)
        .map(|(_, b)| b)
        .collect();
    let duplicates: Vec<&Value> = answers
        .iter()
        .filter(|(s, _)| *s == 200)
        .map(|(_, b)| b)
        .collect();
    assert_eq!(accepted.len(), 1, "{answers:#?}");
    assert_eq!(duplicates.len(), 19, "{answers:#?}");
    let first = accepted[0];
    for dup in &duplicates {
        assert_eq!(dup["duplicate"], true, "{dup}");
        assert_eq!(dup["event_id"], first["event_id"]);
        assert_eq!(
            dup["deliveries"].as_array().unwrap().len(),
            1,
            "the same delivery: {dup}"
        );
        assert_eq!(dup["deliveries"][0]["id"], first["deliveries"][0]["id"]);
    }
    let id = first["deliveries"][0]["id"].as_i64().unwrap();
    app.wait_for_state(id, "delivered").await;
    app.caught_up().await;
    assert_eq!(buyer_deliveries(&app).await.len(), 1);
    assert_eq!(app.buyer_messages().len(), 1, "{:#?}", app.buyer_requests());

    // Still a duplicate after a restart, with a fresh signature (a sender's retry).
    let app = app.restart().await;
    let (status, again) = app.post_event("oms", &event).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["deliveries"][0]["id"], id);
    app.caught_up().await;
    assert_eq!(buyer_deliveries(&app).await.len(), 1);
    assert_eq!(app.buyer_requests().len(), 1);
    app.stop().await;
}

#[actix_rt::test]
async fn the_same_event_under_twenty_webhook_ids_at_once_is_still_one_event() {
    let app = spawn_app().await;
    let event = json!({"id": "same-1", "type": "order.shipped", "businessId": 111, "chatId": 77,
        "orderId": 1, "shop": {"name": "S"}, "items": {"count": 1},
        "tracking": {"number": "T", "carrier": "C"}});

    let answers =
        futures_util::future::join_all((0..20).map(|_| app.post_event("oms", &event))).await;

    let statuses: Vec<u16> = answers.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 202).count(),
        1,
        "{answers:#?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        19,
        "{answers:#?}"
    );
    let got = app.wait_for_delivered(1).await;
    assert_eq!(got.len(), 1);
    app.caught_up().await;
    assert_eq!(app.buyer_requests().len(), 1);
    app.stop().await;
}

fn retention_options(
    clock: std::sync::Arc<ManualClock>,
    fake: FakeConfig,
    max_age_secs: u64,
) -> TestOptions {
    TestOptions {
        fake: FakeConfig {
            api_keys: vec![API_KEY.into()],
            ..fake
        },
        clock: Some(clock),
        tweak: Some(Box::new(move |s| {
            s.storage.retention_days = 1;
            s.dispatch.max_age_secs = max_age_secs;
            // The dispatcher prunes every lease_secs / 2 of the clock.
            s.dispatch.lease_secs = 20;
            s.market.request_timeout_secs = 5;
        })),
        ..TestOptions::default()
    }
}

/// Every stored delivery but `caught_up`'s markers.
async fn buyer_deliveries(app: &TestApp) -> Vec<Value> {
    let mut all = app.all_deliveries().await;
    all.retain(|d| d["business_id"] != MARKER_BUSINESS);
    all
}

async fn find_event(app: &TestApp, id: &str) -> u16 {
    app.admin_get(&format!("/admin/events?source=oms&event_id={id}"))
        .await
        .0
}

#[actix_rt::test]
async fn a_finished_event_is_pruned_after_retention_days_and_its_id_is_new_again() {
    let clock = ManualClock::new(SystemClock.now_ms());
    let app = spawn_app_with(retention_options(
        clock.clone(),
        FakeConfig::default(),
        86_400,
    ))
    .await;
    let event = sample("order_shipped");

    let (status, first) = app.post_event("oms", &event).await;
    assert_eq!(status, 202, "{first}");
    let id = first["deliveries"][0]["id"].as_i64().unwrap();
    app.wait_for_state(id, "delivered").await;

    // Within the retention: still known, still a duplicate.
    clock.advance(Duration::from_secs(23 * 3600));
    app.caught_up().await;
    assert_eq!(find_event(&app, "evt-1001").await, 200);
    let (status, body) = app.post_event("oms", &event).await;
    assert_eq!(status, 200, "{body}");

    // Past it: the dispatcher prunes the event (within a round).
    clock.advance(Duration::from_secs(2 * 3600));
    let deadline = Instant::now() + Duration::from_secs(15);
    while find_event(&app, "evt-1001").await != 404 {
        assert!(Instant::now() < deadline, "never pruned");
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(buyer_deliveries(&app).await, Vec::<Value>::new());

    let (status, again) = app.post_event("oms", &event).await;
    assert_eq!(status, 202, "a pruned id is new again: {again}");
    assert_eq!(again.get("duplicate"), None);
    // (SQLite may hand out the pruned delivery's id again: rowids, not AUTOINCREMENT.)
    let new_id = again["deliveries"][0]["id"].as_i64().unwrap();
    app.wait_for_state(new_id, "delivered").await;
    assert_eq!(app.buyer_messages().len(), 2);
    app.stop().await;
}

#[actix_rt::test]
async fn an_event_with_a_delivery_still_pending_outlives_the_retention() {
    let clock = ManualClock::new(SystemClock.now_ms());
    let app = spawn_app_with(retention_options(
        clock.clone(),
        FakeConfig {
            failure_rate: 1.0,
            ..FakeConfig::default()
        },
        // Retried for ten days: still pending when the retention passes.
        10 * 86_400,
    ))
    .await;
    let event = sample("order_shipped");
    let (status, first) = app.post_event("oms", &event).await;
    assert_eq!(status, 202, "{first}");
    let id = first["deliveries"][0]["id"].as_i64().unwrap();
    app.wait_for_delivery(id, "a failed attempt", |d| {
        d["attempts"].as_array().is_some_and(|a| !a.is_empty())
    })
    .await;

    // Six hours on: retried, still failing, still pending.
    clock.advance(Duration::from_secs(6 * 3600));
    app.caught_up().await;
    let state = app.delivery(id).await["delivery"]["state"].clone();
    assert!(
        state == "queued" || state == "sending",
        "a 500 keeps it pending: {state}"
    );
    // Received 25 h ago, past the 1-day retention, yet not finished: kept,
    // and its id is still a duplicate.
    clock.advance(Duration::from_secs(19 * 3600));
    app.caught_up().await;
    let state = app.delivery(id).await["delivery"]["state"].clone();
    assert!(state == "queued" || state == "sending", "{state}");
    assert_eq!(find_event(&app, "evt-1001").await, 200);
    let (status, body) = app.post_event("oms", &event).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["duplicate"], true);
    app.stop().await;
}

// ------------------------------------------------------------------ secrets

/// A temp root holding a copy of the shipped `config/` and `templates/`.
fn config_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    copy_dir(&repo().join("config"), &root.path().join("config"));
    copy_dir(&repo().join("templates"), &root.path().join("templates"));
    root
}

/// The binary with no inherited `CHATBRIDGE__*` variables, in `root`.
fn command(root: &Path, env: &[(&str, String)]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(root).stdin(Stdio::null());
    for (k, _) in std::env::vars() {
        if k.starts_with("CHATBRIDGE") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

fn run_check(root: &Path, env: &[(&str, String)]) -> Output {
    command(root, env)
        .arg("check")
        .arg("--config")
        .arg(root.join("config"))
        .arg("--examples")
        .arg(repo().join("examples/events"))
        .output()
        .expect("run chatbridge check")
}

fn all_output(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `chatbridge serve` on `root`; waits (bounded) for it to exit on its own.
/// `None`: still running after `within` (then killed).
fn serve_until_exit(root: &Path, within: Duration) -> (Option<std::process::ExitStatus>, String) {
    let log = root.join("serve.log");
    let out = std::fs::File::create(&log).unwrap();
    let child = command(
        root,
        &[
            (
                "CHATBRIDGE__SERVER__LISTEN",
                format!("127.0.0.1:{}", free_port()),
            ),
            ("CHATBRIDGE__SERVER__WATCH_CONFIG", "false".into()),
        ],
    )
    .arg("serve")
    .arg("--config")
    .arg(root.join("config"))
    .stdout(out.try_clone().unwrap())
    .stderr(out)
    .spawn()
    .expect("start chatbridge serve");
    let mut child = ChildGuard::new(child, None);
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait() {
            break Some(status);
        }
        if Instant::now() > deadline {
            child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status, std::fs::read_to_string(&log).unwrap_or_default())
}

fn assert_no_secret(text: &str, secrets: &[&str], what: &str) {
    for secret in secrets {
        assert!(
            !text.contains(secret),
            "{what} shows the secret {secret:?}:\n{text}"
        );
    }
}

/// A secret's `whsec_` string and its bare base64 part.
fn secret_forms(secret: &str) -> [String; 2] {
    [
        secret.to_owned(),
        secret.trim_start_matches("whsec_").to_owned(),
    ]
}

#[test]
fn settings_debug_output_shows_no_secret() {
    let root = config_root();
    let (secret_a, secret_b) = (whsec("debug-secret-a"), whsec("debug-secret-b"));
    let api_key = "ACMA:debug-api-key-93b1";
    let biz_key = "ACMA:debug-business-key-5c2e";
    let admin = "debug-admin-token-0d7f";
    let tokens = ["debug-source-token-1", "debug-source-token-2"];
    let settings_file = root.path().join("config/chatbridge.toml");
    let shipped = std::fs::read_to_string(&settings_file).unwrap();
    let text = shipped
        .replace("\napi_key = \"\"", &format!("\napi_key = {api_key:?}"))
        .replace("\ntoken = \"\"", &format!("\ntoken = {admin:?}"))
        .replace(
            &format!("secret = {SECRET:?}"),
            &format!("secret = [{secret_a:?}, {secret_b:?}]"),
        );
    let text = format!(
        "{text}\n[market.businesses.111]\napi_key = {biz_key:?}\n\n[sources.tok]\ntoken = [{:?}, {:?}]\n",
        tokens[0], tokens[1]
    );
    std::fs::write(&settings_file, &text).unwrap();

    let settings =
        chatbridge::settings::Settings::load(&root.path().join("config")).expect("valid settings");

    // The secrets did load.
    use secrecy::ExposeSecret;
    assert_eq!(
        settings.admin.token.as_ref().unwrap().expose_secret(),
        admin
    );
    assert_eq!(settings.sources["oms"].secret.as_ref().unwrap().0.len(), 2);
    let [a, a64] = secret_forms(&secret_a);
    let [b, b64] = secret_forms(&secret_b);
    let secrets = [
        a.as_str(),
        a64.as_str(),
        b.as_str(),
        b64.as_str(),
        api_key,
        biz_key,
        admin,
        tokens[0],
        tokens[1],
    ];
    for shown in [format!("{settings:?}"), format!("{settings:#?}")] {
        assert_no_secret(&shown, &secrets, "Debug of Settings");
    }
    let limits = settings
        .market
        .limits_for(chatbridge::domain::BusinessId::parse("111").unwrap());
    assert_no_secret(
        &format!("{:?}", limits.api_key),
        &secrets,
        "Debug of the business key",
    );
    for source in settings.sources.values() {
        assert_no_secret(&format!("{source:?}"), &secrets, "Debug of a source");
    }
}

#[test]
fn check_output_shows_no_secret_from_the_environment() {
    let secret = whsec("env-check-secret");
    let api_key = "ACMA:env-check-api-key-77aa";
    let admin = "env-check-admin-token-41c0";
    let [s, s64] = secret_forms(&secret);
    let secrets = [s.as_str(), s64.as_str(), api_key, admin];
    let env = |extra: &[(&'static str, String)]| {
        let mut all = vec![
            (
                "CHATBRIDGE__SOURCES__OMS__SECRET",
                format!("{secret} {}", whsec("env-check-other")),
            ),
            ("CHATBRIDGE__MARKET__API_KEY", api_key.to_owned()),
            ("CHATBRIDGE__ADMIN__TOKEN", admin.to_owned()),
        ];
        all.extend_from_slice(extra);
        all
    };

    // A good configuration.
    let root = config_root();
    let output = run_check(root.path(), &env(&[]));
    assert!(output.status.success(), "{}", all_output(&output));
    assert_no_secret(&all_output(&output), &secrets, "check (ok)");

    // Mistakes elsewhere in the file, in the environment, and in the secrets themselves.
    let mistakes: Vec<Vec<(&'static str, String)>> = vec![
        vec![("CHATBRIDGE__MARKET__HOURLY_LIMIT", "many".into())],
        vec![("CHATBRIDGE__MARKET__APIKEY", api_key.to_owned())],
        vec![("CHATBRIDGE__SOURCES__OMS__TOKEN", admin.to_owned())],
        vec![(
            "CHATBRIDGE__SOURCES__OMS__SECRET",
            format!("{secret} whsec_{admin}!!"),
        )],
        vec![("CHATBRIDGE__SOURCES__OMS__SECRET", admin.to_owned())],
        vec![("CHATBRIDGE__SOURCES__OMS__EVENT_TYPE", "type".into())],
        vec![
            (
                "CHATBRIDGE__MARKET__BUSINESSES__111__API_KEY",
                api_key.to_owned(),
            ),
            (
                "CHATBRIDGE__MARKET__BUSINESSES__111__HOURLY_LIMIT",
                "0".into(),
            ),
        ],
    ];
    for extra in mistakes {
        let output = run_check(root.path(), &env(&extra));
        let shown = all_output(&output);
        assert!(!output.status.success(), "{extra:?} is a mistake:\n{shown}");
        // Each mistake is in the environment: the variable is named, not the file.
        assert!(extra.iter().any(|(var, _)| shown.contains(var)), "{shown}");
        assert_no_secret(&shown, &secrets, &format!("check with {extra:?}"));
    }

    // A mistake in routes.toml and in a template, with the secrets set.
    let routes = root.path().join("config/routes.toml");
    let shipped = std::fs::read_to_string(&routes).unwrap();
    std::fs::write(
        &routes,
        shipped.replace("template = \"order_shipped\"", "template = \"nope\""),
    )
    .unwrap();
    let output = run_check(root.path(), &env(&[]));
    assert!(!output.status.success());
    assert_no_secret(&all_output(&output), &secrets, "check (routes mistake)");
}

/// A syntax error on the line of a secret in chatbridge.toml.
#[test]
fn a_syntax_error_on_a_secrets_line_does_not_print_the_secret() {
    let root = config_root();
    let file = root.path().join("config/chatbridge.toml");
    let shipped = std::fs::read_to_string(&file).unwrap();
    let admin = "syntax-admin-token-e51f";
    std::fs::write(
        &file,
        shipped.replace("\ntoken = \"\"", &format!("\ntoken = \"{admin}\" oops")),
    )
    .unwrap();

    let output = run_check(root.path(), &[]);
    let shown = all_output(&output);

    assert!(!output.status.success(), "{shown}");
    assert!(shown.contains("chatbridge.toml"), "{shown}");
    assert_no_secret(&shown, &[admin], "check (TOML syntax error)");
}

#[actix_rt::test]
async fn serve_logs_at_debug_show_no_secret_and_env_secrets_rotate() {
    let (secret_new, secret_old) = (whsec("serve-env-new"), whsec("serve-env-old"));
    let api_key = "ACMA:serve-api-key-c0ffee";
    let admin = "serve-admin-token-8e6d";
    let market = FakeMarket::start(
        "127.0.0.1:0",
        FakeConfig {
            api_keys: vec![api_key.into()],
            ..FakeConfig::default()
        },
        std::sync::Arc::new(SystemClock),
    )
    .unwrap();
    let root = config_root();
    let port = free_port();
    let log_path = root.path().join("serve.log");
    let out = std::fs::File::create(&log_path).unwrap();
    let child = command(
        root.path(),
        &[
            ("RUST_LOG", "debug".into()),
            (
                "CHATBRIDGE__SOURCES__OMS__SECRET",
                format!("{secret_new} {secret_old}"),
            ),
            ("CHATBRIDGE__MARKET__API_KEY", api_key.into()),
            ("CHATBRIDGE__ADMIN__TOKEN", admin.into()),
            ("CHATBRIDGE__MARKET__BASE_URL", market.base_url()),
            ("CHATBRIDGE__SERVER__LISTEN", format!("127.0.0.1:{port}")),
            ("CHATBRIDGE__SERVER__WORKERS", "2".into()),
            ("CHATBRIDGE__SERVER__WATCH_CONFIG", "false".into()),
            (
                "CHATBRIDGE__STORAGE__URL",
                format!("sqlite://{}", root.path().join("db.sqlite").display()),
            ),
        ],
    )
    .arg("serve")
    .arg("--config")
    .arg(root.path().join("config"))
    .stdout(out.try_clone().unwrap())
    .stderr(out)
    .spawn()
    .expect("start chatbridge serve");
    // Killed on drop, so a failed assertion leaves no `serve` behind.
    let mut child = ChildGuard::new(child, Some(log_path.clone()));
    let base = format!("http://127.0.0.1:{port}");
    let client = awc::Client::builder()
        .timeout(Duration::from_secs(30))
        .finish();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait() {
            panic!(
                "serve exited ({status}):\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await {
            if r.status().as_u16() == 200 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "serve never got ready");
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    let post = |headers: Vec<(&'static str, String)>, body: Vec<u8>| {
        let (client, base) = (&client, &base);
        async move {
            let mut req = client.post(format!("{base}/hooks/oms"));
            for (k, v) in &headers {
                req = req.insert_header((*k, v.as_str()));
            }
            let mut resp = req.send_body(body).await.expect("request");
            let status = resp.status().as_u16();
            let bytes = resp.body().await.unwrap_or_default();
            (status, String::from_utf8_lossy(&bytes).into_owned())
        }
    };
    let now = SystemClock.now_ms() / 1000;
    let event = |id: &str| {
        let mut e = sample("order_shipped");
        e["id"] = json!(id);
        e.to_string().into_bytes()
    };

    // A bad signature, and the file's secret that the environment replaced: 401.
    let body = event("log-1");
    let mut bad = headers_signed_with(&secret_new, &body, now);
    bad[3].1 = "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into();
    let (status, text) = post(bad, body.clone()).await;
    assert_eq!(status, 401, "{text}");
    let (status, text) = post(headers_signed_with(SECRET, &body, now), body.clone()).await;
    assert_eq!(
        status, 401,
        "the file's secret is overridden by the environment: {text}"
    );
    // Both secrets of the environment's space-separated list pass.
    let (status, text) = post(headers_signed_with(&secret_new, &body, now), body).await;
    assert_eq!(status, 202, "{text}");
    let body = event("log-2");
    let (status, text) = post(headers_signed_with(&secret_old, &body, now), body).await;
    assert_eq!(status, 202, "{text}");
    // Admin calls with a wrong and the right token.
    for token in ["wrong-token", admin] {
        let _ = client
            .get(format!("{base}/admin/deliveries"))
            .insert_header(("authorization", format!("Bearer {token}")))
            .send()
            .await;
    }
    // Both messages reach the (fake) Market with the API key.
    let deadline = Instant::now() + Duration::from_secs(20);
    while market.delivered().len() < 2 {
        assert!(
            Instant::now() < deadline,
            "not delivered: {:#?}",
            market.requests()
        );
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    // Both deliveries are logged once their answers are recorded.
    while std::fs::read_to_string(&log_path)
        .unwrap_or_default()
        .matches(" delivered")
        .count()
        < 2
    {
        assert!(
            Instant::now() < deadline,
            "the deliveries were never logged"
        );
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill();
    market.stop().await;

    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("chatbridge is serving"),
        "the log was captured:\n{log}"
    );
    assert!(log.contains("DEBUG"), "debug logging was on:\n{log}");
    let [n, n64] = secret_forms(&secret_new);
    let [o, o64] = secret_forms(&secret_old);
    assert_no_secret(
        &log,
        &[&n, &n64, &o, &o64, api_key, admin],
        "the serve log at RUST_LOG=debug",
    );
}

// ------------------------------------------------------- configuration mistakes

/// One mistake: the files to edit (path under the root, text to replace,
/// replacement; an empty `from` appends), what the output must mention,
/// what it must not, and whether `serve` refuses it too.
struct Mistake {
    name: &'static str,
    edits: Vec<(&'static str, &'static str, &'static str)>,
    mentions: Vec<&'static str>,
    hides: Vec<&'static str>,
    serve_refuses: bool,
}

fn mistakes() -> Vec<Mistake> {
    let settings = "config/chatbridge.toml";
    let routes = "config/routes.toml";
    let secret_line = "secret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"";
    vec![
        Mistake {
            name: "wrong type",
            edits: vec![(
                settings,
                "\nhourly_limit = 1000 ",
                "\nhourly_limit = \"many\" ",
            )],
            mentions: vec![
                "chatbridge.toml",
                "market.hourly_limit",
                "\"many\"",
                "integer",
            ],
            hides: vec![],
            serve_refuses: true,
        },
        Mistake {
            name: "unknown key in chatbridge.toml",
            edits: vec![(
                settings,
                "[server]\n",
                "[server]\nlistn = \"127.0.0.1:9999\"\n",
            )],
            mentions: vec!["chatbridge.toml", "listn", "server", "`listen`"],
            hides: vec![],
            serve_refuses: true,
        },
        Mistake {
            name: "unknown key in routes.toml",
            edits: vec![(
                routes,
                "name = \"order-shipped\"\n",
                "name = \"order-shipped\"\nchannel = \"chat\"\n",
            )],
            mentions: vec!["routes.toml", "line", "channel", "template"],
            hides: vec![],
            serve_refuses: true,
        },
        Mistake {
            name: "template name typo in a route",
            edits: vec![(
                routes,
                "template = \"order_shipped\"",
                "template = \"order_shiped\"",
            )],
            mentions: vec![
                "routes.toml",
                "order-shipped",
                "\"order_shiped\"",
                "order_shipped",
            ],
            hides: vec![],
            serve_refuses: true,
        },
        Mistake {
            name: "unbalanced {{#if}}",
            edits: vec![(
                "templates/order_shipped.hbs",
                "",
                "{{#if tracking.number}}Трек: {{tracking.number}}\n",
            )],
            mentions: vec!["order_shipped.hbs", "line"],
            hides: vec![],
            serve_refuses: true,
        },
        Mistake {
            name: "JSON pointer without a leading /",
            edits: vec![(
                settings,
                "\nevent_type = \"/type\"",
                "\nevent_type = \"type\"",
            )],
            mentions: vec![
                "chatbridge.toml",
                "[sources.oms]",
                "event_type",
                "\"/type\"",
            ],
            hides: vec![],
            serve_refuses: true,
        },
        Mistake {
            name: "a glob matching no sample event",
            edits: vec![(
                routes,
                "event = \"order.shipped\"",
                "event = \"order.shiped.*\"",
            )],
            mentions: vec![
                "routes.toml",
                "order-shipped",
                "order.shiped.*",
                "matches none of the sample events",
            ],
            hides: vec![],
            // Sample events are a `check` matter: serve starts with such a route.
            serve_refuses: false,
        },
        Mistake {
            name: "a source without secret, token or insecure",
            edits: vec![(settings, secret_line, "")],
            mentions: vec![
                "chatbridge.toml",
                "[sources.oms]",
                "secret = \"whsec_",
                "CHATBRIDGE__SOURCES__OMS__SECRET",
                "insecure = true",
            ],
            hides: vec![],
            serve_refuses: true,
        },
        Mistake {
            name: "a bad whsec_ secret",
            edits: vec![(
                settings,
                secret_line,
                "secret = \"whsec_%%sekrit-not-base64%%\"",
            )],
            mentions: vec!["chatbridge.toml", "[sources.oms]", "secret", "base64"],
            hides: vec!["sekrit-not-base64"],
            serve_refuses: true,
        },
        Mistake {
            name: "a secret without the whsec_ prefix",
            edits: vec![(settings, secret_line, "secret = \"sk_live_sekrit123\"")],
            mentions: vec!["chatbridge.toml", "[sources.oms]", "secret", "whsec_"],
            hides: vec!["sk_live_sekrit123"],
            serve_refuses: true,
        },
    ]
}

fn apply(root: &Path, edits: &[(&str, &str, &str)]) {
    for (file, from, to) in edits {
        let path: PathBuf = root.join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        let changed = if from.is_empty() {
            format!("{text}{to}")
        } else {
            assert!(text.contains(from), "{file} has no {from:?}");
            text.replacen(from, to, 1)
        };
        std::fs::write(&path, changed).unwrap();
    }
}

#[test]
fn the_shipped_configuration_passes_check() {
    let root = config_root();
    let output = run_check(root.path(), &[]);
    assert!(output.status.success(), "{}", all_output(&output));
    assert!(
        all_output(&output).starts_with("ok:"),
        "{}",
        all_output(&output)
    );
}

#[test]
fn every_configuration_mistake_is_named_with_its_file_place_and_fix_and_stops_the_service() {
    for mistake in mistakes() {
        let root = config_root();
        apply(root.path(), &mistake.edits);

        let output = run_check(root.path(), &[]);
        let shown = all_output(&output);
        eprintln!("--- {}: check said:\n{shown}", mistake.name);
        assert!(
            !output.status.success(),
            "{}: check must fail:\n{shown}",
            mistake.name
        );
        for want in &mistake.mentions {
            assert!(
                shown.contains(want),
                "{}: check output lacks {want:?}:\n{shown}",
                mistake.name
            );
        }
        for secret in &mistake.hides {
            assert!(
                !shown.contains(secret),
                "{}: shows {secret:?}:\n{shown}",
                mistake.name
            );
        }
        assert!(!shown.contains("panicked"), "{}: {shown}", mistake.name);

        if mistake.serve_refuses {
            let (status, log) = serve_until_exit(root.path(), Duration::from_secs(20));
            let status =
                status.unwrap_or_else(|| panic!("{}: serve kept running:\n{log}", mistake.name));
            assert!(
                !status.success(),
                "{}: serve exited 0:\n{log}",
                mistake.name
            );
            assert!(
                log.contains(mistake.mentions[0]),
                "{}: serve names the file:\n{log}",
                mistake.name
            );
            for secret in &mistake.hides {
                assert!(
                    !log.contains(secret),
                    "{}: serve shows {secret:?}",
                    mistake.name
                );
            }
        }
    }
}

#[test]
fn an_unclosed_if_block_says_what_to_write() {
    let root = config_root();
    apply(
        root.path(),
        &[(
            "templates/order_shipped.hbs",
            "",
            "{{#if tracking.number}}Трек: {{tracking.number}}\n",
        )],
    );

    let shown = all_output(&run_check(root.path(), &[]));

    assert!(
        shown.contains("{{/if}}") || shown.contains("not closed") || shown.contains("unclosed"),
        "no hint to close the block:\n{shown}"
    );
}

// -------------------------------------------------------------- weird bodies

#[actix_rt::test]
async fn weird_bodies_never_crash_the_service() {
    let app = spawn_app().await;
    let ten_k_keys = {
        let mut map = serde_json::Map::new();
        map.insert("type".into(), json!("weird.keys"));
        map.insert("id".into(), json!("w-keys"));
        for i in 0..10_000 {
            map.insert(format!("k{i}"), json!(i));
        }
        Value::Object(map).to_string().into_bytes()
    };
    let mut random = Vec::with_capacity(65_536);
    let mut x: u32 = 0x9e37_79b9;
    for _ in 0..65_536 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        random.push(x as u8);
    }
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("deep arrays", b"[".repeat(250_000)),
        ("deep objects", b"{\"a\":".repeat(50_000)),
        (
            "huge integer",
            format!(r#"{{"type":"weird.num","id":"w-int","n":{}}}"#, "9".repeat(100_000)).into_bytes(),
        ),
        ("huge exponent", br#"{"type":"weird.num","id":"w-exp","n":1e999999}"#.to_vec()),
        ("tiny exponent", br#"{"type":"weird.num","id":"w-tiny","n":1e-999999}"#.to_vec()),
        ("float id", br#"{"type":"weird.num","id":1.7976931348623157e308}"#.to_vec()),
        ("negative id", br#"{"type":"weird.num","id":-9223372036854775809}"#.to_vec()),
        ("invalid UTF-8", b"{\"type\":\"weird.\xff\xfe\",\"id\":\"w-utf8\"}".to_vec()),
        ("overlong UTF-8", b"{\"type\":\"\xc0\xaf\"}".to_vec()),
        ("raw NUL in a string", b"{\"type\":\"a\x00b\"}".to_vec()),
        ("NUL bytes", vec![0u8; 4096]),
        ("escaped NUL", br#"{"type":"weird\u0000nul","id":"w-\u0000"}"#.to_vec()),
        ("lone surrogate", br#"{"type":"\ud800","id":"w-sur"}"#.to_vec()),
        ("BOM", "\u{feff}{\"type\":\"weird.bom\",\"id\":\"w-bom\"}".as_bytes().to_vec()),
        ("10k keys", ten_k_keys),
        ("duplicate keys", br#"{"type":"a.b","type":"weird.dup","id":"w-dup"}"#.to_vec()),
        ("type is an object", br#"{"type":{"$ne":null},"id":"w-obj"}"#.to_vec()),
        ("type is 100 KB", format!(r#"{{"type":"{}","id":"w-long"}}"#, "t".repeat(100_000)).into_bytes()),
        ("id is 100 KB", format!(r#"{{"type":"weird.longid","id":"{}"}}"#, "i".repeat(100_000)).into_bytes()),
        ("type with glob stars", br#"{"type":"****.****.*","id":"w-glob"}"#.to_vec()),
        ("array", b"[1,2,3]".to_vec()),
        ("string", b"\"order.shipped\"".to_vec()),
        ("null", b"null".to_vec()),
        ("trailing garbage", br#"{"type":"weird.trail","id":"w-trail"} {"#.to_vec()),
        ("unterminated string", b"{\"type\":\"abc".to_vec()),
        ("backslash at the end", b"{\"type\":\"abc\\".to_vec()),
        ("random bytes", random),
        ("empty", Vec::new()),
        (
            "order.shipped with hostile field types",
            br#"{"type":"order.shipped","id":"w-types","businessId":-1,"chatId":1e300,"orderId":{"a":[]},"items":{"count":-1e308},"tracking":{"number":null,"carrier":[1]},"shop":{"name":"\u0000"}}"#.to_vec(),
        ),
        (
            "order.shipped with ids out of range",
            br#"{"type":"order.shipped","id":"w-range","businessId":99999999999999999999999,"chatId":"1; DROP TABLE events","orderId":1,"items":{"count":"NaN"},"tracking":{"number":"x","carrier":"y"},"shop":{"name":"s"}}"#.to_vec(),
        ),
    ];

    for (what, body) in bodies {
        let headers = signed_headers(&body, now_secs(&app));
        let (status, answer) = app.post_raw("/hooks/oms", &headers, body).await;
        assert!(
            matches!(status, 200 | 202 | 400 | 413),
            "{what}: unexpected {status} {answer}"
        );
        if status >= 400 {
            assert!(
                answer["error"]["code"].as_str().is_some(),
                "{what}: {status} without a JSON error: {answer}"
            );
        }
        assert_alive(&app).await;
    }
    // Unsigned weird bodies stop at auth.
    let (status, body) = app
        .post_raw(
            "/hooks/oms",
            &[("content-type", "application/json".into())],
            b"[".repeat(100_000),
        )
        .await;
    assert_error(status, &body, 401, "unauthorized");
    // Weird paths.
    for path in [
        format!("/hooks/{}", "s".repeat(5000)),
        "/hooks/%00".to_string(),
        "/hooks/%FF%FE".to_string(),
        "/hooks/..%2F..%2Fadmin".to_string(),
        "/hooks/OMS".to_string(),
    ] {
        let (status, body) = app
            .post_raw(
                &path,
                &[("content-type", "application/json".into())],
                b"{}".to_vec(),
            )
            .await;
        assert!(matches!(status, 400 | 404), "{path}: {status} {body}");
    }
    assert_alive(&app).await;
    // Still fully working.
    let (status, body) = app.post_event("oms", &sample("order_delivered")).await;
    assert_eq!(status, 202, "{body}");
    let id = body["deliveries"][0]["id"].as_i64().unwrap();
    app.wait_for_state(id, "delivered").await;
    app.stop().await;
}
