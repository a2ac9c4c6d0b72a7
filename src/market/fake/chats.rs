//! The fake's chat directory: `chats/new` (find or open the chat of an
//! order or return; the same context always gets the same chat, as the
//! Market returns an existing chat), the chat list (`POST .../chats` with
//! its filters and paging) and `GET .../chat?chatId=`, validated per
//! `createChat`, `getChats` and `getChat` in `chats.openapi.yaml`.

use std::collections::{BTreeMap, HashMap};

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use super::send::{chat_id_query, is_json};
use super::{api_error, lock, serve, FakeMethod, FakeState, Parsed};
use crate::clock::{to_rfc3339, Millis};
use crate::store::ApiErrorEntry;

/// Chat ids the fake hands out start here, far from the sample events' ids.
const FIRST_CHAT_ID: i64 = 70_000_001;

#[derive(Default)]
pub(super) struct ChatRegistry {
    by_context: HashMap<(i64, String, i64), i64>,
    /// Chat id → (business, context type, context id, created at).
    chats: BTreeMap<i64, (i64, String, i64, Millis)>,
}

impl ChatRegistry {
    /// The chat of a context, opened on first use.
    fn open(&mut self, business: i64, kind: &str, id: i64, now: Millis) -> i64 {
        let next = FIRST_CHAT_ID + self.chats.len() as i64;
        let chat = *self
            .by_context
            .entry((business, kind.to_owned(), id))
            .or_insert(next);
        self.chats
            .entry(chat)
            .or_insert_with(|| (business, kind.to_owned(), id, now));
        chat
    }
}

const CONTEXT_TYPES: [&str; 2] = ["ORDER", "RETURN"];

fn context_of(value: &Value) -> Result<(String, i64), String> {
    let kind = value
        .get("type")
        .and_then(Value::as_str)
        .filter(|t| CONTEXT_TYPES.contains(t))
        .ok_or("context.type must be ORDER or RETURN")?;
    let id = value
        .get("id")
        .and_then(Value::as_i64)
        .filter(|&id| id >= 1)
        .ok_or("context.id must be an integer of at least 1")?;
    Ok((kind.to_owned(), id))
}

fn json_body(req: &HttpRequest, body: &[u8]) -> Result<serde_json::Map<String, Value>, String> {
    if !is_json(req) {
        return Err("Content-Type must be application/json".into());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err("the body must be a JSON object".into()),
    }
}

pub(super) async fn create_chat(
    state: web::Data<FakeState>,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    serve(
        state,
        req,
        FakeMethod::CreateChat,
        &path,
        &body,
        |req, body| {
            let map = json_body(req, body)?;
            let context = match (map.get("context"), map.get("orderId")) {
                (Some(ctx), _) => context_of(ctx)?,
                // The deprecated form still names an order.
                (None, Some(order)) => (
                    "ORDER".to_owned(),
                    order
                        .as_i64()
                        .filter(|&id| id >= 1)
                        .ok_or("orderId must be an integer of at least 1")?,
                ),
                (None, None) => {
                    return Err(
                        "context is required: {\"type\":\"ORDER\"|\"RETURN\",\"id\":N}".into(),
                    )
                }
            };
            Ok(Parsed {
                context: Some(context),
                ..Parsed::default()
            })
        },
    )
    .await
}

/// `{"status":"OK","result":{"chatId":N}}`, the same N for the same context.
pub(super) fn open_chat(
    state: &FakeState,
    business: i64,
    parsed: &mut Parsed,
    now: Millis,
) -> Value {
    let (kind, id) = parsed.context.clone().unwrap_or_default();
    let chat = lock(&state.chats).open(business, &kind, id, now);
    parsed.chat_id = Some(chat);
    json!({"status": "OK", "result": {"chatId": chat}})
}

#[derive(Deserialize)]
struct PageQuery {
    #[serde(rename = "pageToken", alias = "page_token")]
    page_token: Option<String>,
    limit: Option<String>,
}

/// The filters of a chat list request, checked as the spec describes them.
#[derive(Default)]
pub(super) struct ChatFilter {
    contexts: Option<Vec<(String, i64)>>,
    context_types: Option<Vec<String>>,
    order_ids: Option<Vec<i64>>,
    types: Option<Vec<String>>,
    statuses: Option<Vec<String>>,
    offset: usize,
    limit: usize,
}

fn list_of<T>(
    map: &serde_json::Map<String, Value>,
    key: &str,
    item: impl Fn(&Value) -> Result<T, String>,
) -> Result<Option<Vec<T>>, String> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) if !items.is_empty() => {
            items.iter().map(item).collect::<Result<_, _>>().map(Some)
        }
        Some(_) => Err(format!("{key} must be a non-empty array")),
    }
}

fn one_of(
    allowed: &'static [&'static str],
    key: &'static str,
) -> impl Fn(&Value) -> Result<String, String> {
    move |v| {
        v.as_str()
            .filter(|s| allowed.contains(s))
            .map(str::to_owned)
            .ok_or_else(|| format!("{key} items must be one of {}", allowed.join(", ")))
    }
}

pub(super) async fn get_chats(
    state: web::Data<FakeState>,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    serve(
        state,
        req,
        FakeMethod::GetChats,
        &path,
        &body,
        |req, body| {
            let map = json_body(req, body)?;
            let page = web::Query::<PageQuery>::from_query(req.query_string())
                .map_err(|e| format!("invalid query: {e}"))?;
            let limit = match &page.limit {
                None => 10,
                Some(raw) => raw
                    .parse::<usize>()
                    .ok()
                    .filter(|l| (1..=20).contains(l))
                    .ok_or("limit must be an integer from 1 to 20")?,
            };
            let offset = match &page.page_token {
                None => 0,
                Some(token) => token
                    .parse::<usize>()
                    .map_err(|_| "pageToken is not valid")?,
            };
            let filter = ChatFilter {
                contexts: list_of(&map, "contexts", context_of)?,
                context_types: list_of(
                    &map,
                    "contextTypes",
                    one_of(&["ORDER", "RETURN", "DIRECT"], "contextTypes"),
                )?,
                order_ids: list_of(&map, "orderIds", |v| {
                    v.as_i64()
                        .ok_or_else(|| "orderIds items must be integers".to_owned())
                })?,
                types: list_of(&map, "types", one_of(&["CHAT", "ARBITRAGE"], "types"))?,
                statuses: list_of(
                    &map,
                    "statuses",
                    one_of(
                        &[
                            "NEW",
                            "WAITING_FOR_CUSTOMER",
                            "WAITING_FOR_PARTNER",
                            "WAITING_FOR_ARBITER",
                            "WAITING_FOR_MARKET",
                            "FINISHED",
                        ],
                        "statuses",
                    ),
                )?,
                offset,
                limit,
            };
            Ok(Parsed {
                chat_filter: Some(filter),
                ..Parsed::default()
            })
        },
    )
    .await
}

fn chat_info(chat: i64, (_, kind, id, at): &(i64, String, i64, Millis)) -> Value {
    let context = if kind == "ORDER" {
        json!({"type": kind, "orderId": id})
    } else {
        json!({"type": kind, "returnId": id})
    };
    json!({
        "chatId": chat,
        "context": context,
        "type": "CHAT",
        "status": "NEW",
        "createdAt": to_rfc3339(*at),
        "updatedAt": to_rfc3339(*at),
    })
}

pub(super) fn list_chats(state: &FakeState, business: i64, parsed: &mut Parsed) -> Value {
    let filter = parsed.chat_filter.take().unwrap_or_default();
    let registry = lock(&state.chats);
    let matching: Vec<Value> = registry
        .chats
        .iter()
        .filter(|(_, (b, kind, id, _))| {
            *b == business
                && filter
                    .contexts
                    .as_ref()
                    .is_none_or(|cs| cs.iter().any(|(k, i)| k == kind && i == id))
                && filter
                    .context_types
                    .as_ref()
                    .is_none_or(|ts| ts.contains(kind))
                && filter
                    .order_ids
                    .as_ref()
                    .is_none_or(|ids| kind == "ORDER" && ids.contains(id))
                && filter
                    .types
                    .as_ref()
                    .is_none_or(|ts| ts.iter().any(|t| t == "CHAT"))
                && filter
                    .statuses
                    .as_ref()
                    .is_none_or(|ss| ss.iter().any(|s| s == "NEW"))
        })
        .map(|(chat, info)| chat_info(*chat, info))
        .collect();
    let page: Vec<Value> = matching
        .iter()
        .skip(filter.offset)
        .take(filter.limit.max(1))
        .cloned()
        .collect();
    let next = filter.offset + page.len();
    let mut result = json!({ "chats": page });
    if next < matching.len() {
        result["paging"] = json!({ "nextPageToken": next.to_string() });
    }
    json!({"status": "OK", "result": result})
}

pub(super) async fn get_chat(
    state: web::Data<FakeState>,
    req: HttpRequest,
    path: web::Path<String>,
) -> HttpResponse {
    serve(state, req, FakeMethod::GetChat, &path, &[], |req, _| {
        let chat = chat_id_query(req)?;
        Ok(Parsed {
            chat_id: Some(chat),
            ..Parsed::default()
        })
    })
    .await
}

pub(super) fn find_chat(
    state: &FakeState,
    business: i64,
    parsed: &mut Parsed,
) -> Result<Value, (u16, Vec<ApiErrorEntry>)> {
    let chat = parsed.chat_id.unwrap_or(0);
    let registry = lock(&state.chats);
    match registry.chats.get(&chat).filter(|(b, ..)| *b == business) {
        Some(info) => Ok(json!({"status": "OK", "result": chat_info(chat, info)})),
        None => Err(api_error(404, "NOT_FOUND", "chat not found")),
    }
}
