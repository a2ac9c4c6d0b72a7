//! `chatbridge deliveries list|show|retry` and `chatbridge reload`: the
//! admin API from the command line, for a server without curl habits.

use serde_json::Value;

/// Where the running instance is and how to get in.
pub struct Target {
    pub url: String,
    pub token: String,
}

async fn call(
    target: &Target,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<(u16, Value), String> {
    let client = awc::Client::default();
    let url = format!("{}{path}", target.url.trim_end_matches('/'));
    let request = match method {
        "POST" => client.post(&url),
        _ => client.get(&url),
    }
    .insert_header(("authorization", format!("Bearer {}", target.token)));
    let sent = match body {
        Some(b) => request.send_json(&b).await,
        None => request.send().await,
    };
    let mut response = sent.map_err(|e| format!("cannot reach {url}: {e}"))?;
    let bytes = response
        .body()
        .limit(64 << 20)
        .await
        .map_err(|e| e.to_string())?;
    let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Ok((response.status().as_u16(), value))
}

fn finish(result: Result<(u16, Value), String>, print: impl Fn(&Value)) -> i32 {
    match result {
        Ok((status, body)) if (200..300).contains(&status) => {
            print(&body);
            0
        }
        Ok((status, body)) => {
            let message = body["error"]["message"].as_str().unwrap_or("no details");
            eprintln!("error {status}: {message}");
            if let Some(problems) = body["problems"].as_array() {
                problems
                    .iter()
                    .for_each(|p| eprintln!("  {}", p.as_str().unwrap_or("")));
            }
            1
        }
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

fn pretty(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// `deliveries list`: one line per delivery.
pub async fn list(target: &Target, query: &[(&str, Option<String>)]) -> i32 {
    let params: Vec<String> = query
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v))))
        .collect();
    let path = format!("/admin/deliveries?{}", params.join("&"));
    finish(call(target, "GET", &path, None).await, |body| {
        println!(
            "{:>8}  {:<10}  {:>12}  {:>12}  {:<20}  reason",
            "id", "state", "business", "chat", "route"
        );
        for d in body["deliveries"].as_array().into_iter().flatten() {
            println!(
                "{:>8}  {:<10}  {:>12}  {:>12}  {:<20}  {}",
                d["id"].to_string(),
                d["state"].as_str().unwrap_or(""),
                d["business_id"].to_string(),
                chat_column(d),
                d["route"].as_str().unwrap_or(""),
                d["reason"].as_str().unwrap_or("")
            );
        }
        if let Some(next) = body["next_after"].as_i64() {
            println!("more: --after {next}");
        }
    })
}

/// The chat, or the order or return whose chat is still to be found.
fn chat_column(d: &Value) -> String {
    match (
        d["chat_id"].as_i64(),
        d["order_id"].as_i64(),
        d["return_id"].as_i64(),
    ) {
        (Some(chat), _, _) => chat.to_string(),
        (None, Some(order), _) => format!("order {order}"),
        (None, None, Some(ret)) => format!("return {ret}"),
        _ => "null".into(),
    }
}

pub async fn show(target: &Target, id: i64) -> i32 {
    finish(
        call(target, "GET", &format!("/admin/deliveries/{id}"), None).await,
        pretty,
    )
}

pub async fn retry(target: &Target, id: Option<i64>, filter: Value) -> i32 {
    let result = match id {
        Some(id) => {
            call(
                target,
                "POST",
                &format!("/admin/deliveries/{id}/retry"),
                None,
            )
            .await
        }
        None => call(target, "POST", "/admin/deliveries/retry", Some(filter)).await,
    };
    finish(result, pretty)
}

pub async fn cancel(target: &Target, id: i64) -> i32 {
    finish(
        call(
            target,
            "POST",
            &format!("/admin/deliveries/{id}/cancel"),
            None,
        )
        .await,
        pretty,
    )
}

/// An event by the id its source gave it, with its deliveries.
pub async fn event(target: &Target, source: &str, event_id: &str) -> i32 {
    let path = format!(
        "/admin/events?source={}&event_id={}",
        encode(source),
        encode(event_id)
    );
    finish(call(target, "GET", &path, None).await, pretty)
}

pub async fn reload(target: &Target) -> i32 {
    finish(call(target, "POST", "/admin/reload", None).await, pretty)
}

pub async fn queue(target: &Target) -> i32 {
    finish(call(target, "GET", "/admin/queue", None).await, pretty)
}

/// Percent-encodes a query value.
fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
