//! `chatbridge deliveries list|show|retry` and `chatbridge reload`: the
//! admin API from the command line, for a server without curl habits.

use serde_json::Value;

/// Where the running instance is and how to get in.
pub struct Target {
    pub url: String,
    pub token: String,
}

impl Target {
    /// `--url` as people type it: `127.0.0.1:8080` means
    /// `http://127.0.0.1:8080`; anything else that is not an http(s) URL
    /// is refused with what is wrong.
    pub fn new(url: &str, token: String) -> Result<Self, String> {
        Ok(Self {
            url: normalise_url(url)?,
            token,
        })
    }
}

pub fn normalise_url(raw: &str) -> Result<String, String> {
    let trimmed = raw.trim().trim_end_matches('/');
    let url = if trimmed.contains("://") {
        trimmed.to_owned()
    } else {
        format!("http://{trimmed}")
    };
    let example = "like http://127.0.0.1:8080 (--url or CHATBRIDGE_URL)";
    let uri: awc::http::Uri = url
        .parse()
        .map_err(|e| format!("--url {raw:?} is not a URL {example}: {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        Some(other) => {
            return Err(format!(
            "--url {raw:?}: the scheme must be http or https, not {other:?}; give a URL {example}"
        ))
        }
        None => return Err(format!("--url {raw:?} has no scheme; give a URL {example}")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("--url {raw:?} has no host; give a URL {example}"));
    }
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(format!(
            "--url {raw:?}: give the instance's address without a path ({:?}), {example}",
            uri.path()
        ));
    }
    Ok(url)
}

/// What came back: the status and the JSON body (`None`: not JSON).
struct Answer {
    url: String,
    status: u16,
    body: Option<Value>,
}

async fn call(
    target: &Target,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<Answer, String> {
    let client = awc::Client::default();
    let url = format!("{}{path}", target.url);
    let request = match method {
        "POST" => client.post(&url),
        _ => client.get(&url),
    }
    .insert_header(("authorization", format!("Bearer {}", target.token)));
    let sent = match body {
        Some(b) => request.send_json(&b).await,
        None => request.send().await,
    };
    let mut response = sent.map_err(|e| {
        format!(
            "cannot reach {}: {e}; is `chatbridge serve` running there? (--url or CHATBRIDGE_URL)",
            target.url
        )
    })?;
    let bytes = response
        .body()
        .limit(64 << 20)
        .await
        .map_err(|e| format!("{url}: the answer could not be read: {e}"))?;
    Ok(Answer {
        url,
        status: response.status().as_u16(),
        body: serde_json::from_slice(&bytes).ok(),
    })
}

/// Why an answer is not what was asked for, in words that say what to do.
fn explain(target: &Target, answer: &Answer) -> String {
    let status = answer.status;
    let Some(body) = answer
        .body
        .as_ref()
        .filter(|b| b["error"]["code"].is_string())
    else {
        return format!(
            "{} does not look like a chatbridge admin API ({} answered HTTP {status} without chatbridge's JSON error); check --url (CHATBRIDGE_URL): it should be the address chatbridge serve listens on (server.listen)",
            target.url, answer.url
        );
    };
    let code = body["error"]["code"].as_str().unwrap_or_default();
    let message = body["error"]["message"].as_str().unwrap_or_default();
    match code {
        super::TOKEN_NOT_ACCEPTED => format!(
            "the admin token was not accepted by {}: pass that instance's admin.token (CHATBRIDGE__ADMIN__TOKEN in its environment) with --token or CHATBRIDGE__ADMIN__TOKEN",
            target.url
        ),
        super::TOKEN_MISSING => format!(
            "{} received no admin token: pass it with --token or CHATBRIDGE__ADMIN__TOKEN",
            target.url
        ),
        _ => format!("error {status}: {message}"),
    }
}

fn finish(target: &Target, result: Result<Answer, String>, print: impl FnOnce(&Value)) -> i32 {
    match result {
        Ok(answer) if (200..300).contains(&answer.status) => match &answer.body {
            Some(body) if body.is_object() => {
                print(body);
                0
            }
            _ => {
                eprintln!("{}", explain(target, &answer));
                1
            }
        },
        Ok(answer) => {
            eprintln!("{}", explain(target, &answer));
            if let Some(problems) = answer.body.as_ref().and_then(|b| b["problems"].as_array()) {
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
    finish(target, call(target, "GET", &path, None).await, |body| {
        print_rows(
            body["deliveries"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default(),
        );
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
        target,
        call(target, "GET", &format!("/admin/deliveries/{id}"), None).await,
        pretty,
    )
}

/// `deliveries retry ID`: one delivery, named, so no preview.
pub async fn retry_one(target: &Target, id: i64) -> i32 {
    let result = call(
        target,
        "POST",
        &format!("/admin/deliveries/{id}/retry"),
        None,
    )
    .await;
    finish(target, result, pretty)
}

/// `deliveries retry --state .. | --all`: without `yes`, a preview (what
/// would be retried, nothing changed); with it, the retry, exiting 0 only
/// when every matched delivery was queued again.
pub async fn retry_many(target: &Target, mut filter: Value, yes: bool) -> i32 {
    filter["dry_run"] = Value::Bool(!yes);
    let result = call(target, "POST", "/admin/deliveries/retry", Some(filter)).await;
    let mut code = 0;
    let status = finish(target, result, |body| {
        let matched = body["matched"].as_u64().unwrap_or(0);
        let more = if body["more"] == true {
            " (the limit; there may be more: raise --limit)"
        } else {
            ""
        };
        let states = body["states"]
            .as_array()
            .map(|s| {
                s.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(" or ")
            })
            .unwrap_or_default();
        if matched == 0 {
            println!("no {states} delivery matches; nothing to retry");
            return;
        }
        if !yes {
            println!("would retry {matched} deliver(y/ies) in state {states}{more}:");
            print_rows(
                body["sample"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default(),
            );
            if (matched as usize) > body["sample"].as_array().map_or(0, Vec::len) {
                println!("  ...");
            }
            println!("nothing was changed; run again with --yes to queue them");
            return;
        }
        let queued = body["queued"].as_u64().unwrap_or(0);
        let failing = body["still_failing"].as_u64().unwrap_or(0);
        println!("queued {queued} of {matched} deliver(y/ies) in state {states}{more}");
        for d in body["deliveries"].as_array().into_iter().flatten() {
            if let Some(error) = d["error"].as_str() {
                println!(
                    "  {:>8}  {:<10}  {error}",
                    d["id"],
                    d["state"].as_str().unwrap_or("")
                );
            }
        }
        if failing > 0 {
            eprintln!(
                "{failing} deliver(y/ies) still fail (listed above); fix the cause and retry them"
            );
            code = 1;
        }
    });
    if status != 0 {
        status
    } else {
        code
    }
}

fn print_rows(rows: &[Value]) {
    println!(
        "{:>8}  {:<10}  {:>12}  {:>12}  {:<20}  reason",
        "id", "state", "business", "chat", "route"
    );
    for d in rows {
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
}

pub async fn cancel(target: &Target, id: i64) -> i32 {
    finish(
        target,
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
    finish(target, call(target, "GET", &path, None).await, pretty)
}

pub async fn reload(target: &Target) -> i32 {
    finish(
        target,
        call(target, "POST", "/admin/reload", None).await,
        pretty,
    )
}

/// `chatbridge queue`: one block per business, then the JSON for scripts
/// with `--json`.
pub async fn queue(target: &Target, as_json: bool) -> i32 {
    let result = call(target, "GET", "/admin/queue", None).await;
    if as_json {
        return finish(target, result, pretty);
    }
    finish(target, result, |body| {
        let businesses = body["businesses"].as_array().cloned().unwrap_or_default();
        if businesses.is_empty() {
            println!("nothing queued, held or failed, and no quota used in the current window");
        }
        for b in &businesses {
            print_business(b);
        }
    })
}

fn print_business(b: &Value) {
    let n = |k: &str| b[k].as_i64().unwrap_or(0);
    println!("business {}", b["business_id"]);
    println!(
        "  queued {}  sending {}  held {}  dead {}  failed {}",
        n("queued"),
        n("sending"),
        n("held"),
        n("dead"),
        n("failed")
    );
    let waits: Vec<String> = [
        ("waiting_for_chat_turn", "waiting for chat turn"),
        ("waiting_for_pause", "waiting for pause"),
        ("waiting_for_quota", "waiting for quota"),
        ("waiting_for_retry_time", "waiting for retry time"),
    ]
    .iter()
    .filter(|(k, _)| n(k) > 0)
    .map(|(k, label)| format!("{} {label}", n(k)))
    .collect();
    if !waits.is_empty() {
        println!("  of the queued: {}", waits.join(", "));
    }
    println!(
        "  quota: {} of {} used in {} s, {} left{}",
        n("sent_in_window"),
        n("quota_limit"),
        n("quota_window_secs"),
        n("quota_left"),
        b["quota_next_free_at"]
            .as_str()
            .map(|t| format!(", next slot at {t}"))
            .unwrap_or_default()
    );
    if let Some(until) = b["paused_until"].as_str() {
        println!(
            "  paused until {until}: {}",
            b["pause_reason"]
                .as_str()
                .unwrap_or("the Market asked to wait")
        );
    }
    if b["key_refused"] == true {
        println!(
            "  held: the business's API key is refused{}; fix market.api_key, then chatbridge reload",
            b["key_refused_reason"]
                .as_str()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        );
    }
    match b["drain_estimate_secs"].as_i64() {
        Some(s) => println!("  drains in about {s} s"),
        None => println!("  drains: not until the key works"),
    }
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
