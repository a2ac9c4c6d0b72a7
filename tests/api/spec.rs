//! The Market's OpenAPI files as a checker: load one, find an operation,
//! and list what is wrong with a recorded request (or any JSON value)
//! against it. Shared by the request conformance tests (`openapi.rs`) and
//! the notification samples' check (`notifications.rs`). Constraints are
//! read from the spec, never copied here; a keyword it cannot check is
//! reported, not passed.

use std::path::PathBuf;

use chatbridge::market::fake::ReceivedRequest;
use serde_json::{json, Value};

use crate::helpers::repo;

/// One of the Market's specs, vendored in `spec/market-api/`: it is always
/// there, so these tests never skip.
pub fn load_spec(name: &str) -> Value {
    let file: PathBuf = repo().join("spec/market-api").join(name);
    let text = std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("cannot read {} ({e})", file.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{name} is not valid YAML: {e}"))
}

/// Follows a local `$ref` (`#/components/...`) until the node is not one.
pub fn resolve<'a>(spec: &'a Value, mut node: &'a Value) -> &'a Value {
    for _ in 0..32 {
        let Some(reference) = node.get("$ref").and_then(Value::as_str) else {
            return node;
        };
        let pointer = reference
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("only local $refs are supported: {reference}"));
        node = spec
            .pointer(pointer)
            .unwrap_or_else(|| panic!("dangling $ref {reference}"));
    }
    panic!("$ref cycle")
}

/// One operation as the checks need it.
pub struct Operation<'a> {
    spec: &'a Value,
    path_template: &'a str,
    parameters: Vec<&'a Value>,
    security: &'a Value,
    body: &'a Value,
}

impl<'a> Operation<'a> {
    pub fn from_spec(spec: &'a Value, method: &str, path: &'static str) -> Self {
        let path_item = &spec["paths"][path];
        let operation = &path_item[method];
        assert!(operation.is_object(), "{method} {path} is not in the spec");
        let mut parameters: Vec<&Value> = Vec::new();
        // Operation parameters override path-level ones of the same name and place.
        for p in operation["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(path_item["parameters"].as_array().into_iter().flatten())
        {
            let p = resolve(spec, p);
            if !parameters
                .iter()
                .any(|q| q["name"] == p["name"] && q["in"] == p["in"])
            {
                parameters.push(p);
            }
        }
        let security = operation.get("security").unwrap_or(&spec["security"]);
        Self {
            spec,
            path_template: path,
            parameters,
            security,
            body: resolve(spec, &operation["requestBody"]),
        }
    }

    /// Everything wrong with one recorded request, as sentences.
    pub fn problems(&self, request: &ReceivedRequest) -> Vec<String> {
        let mut out = Vec::new();
        let (path, query) = request
            .path_and_query
            .split_once('?')
            .unwrap_or((&request.path_and_query, ""));
        let header = |name: &str| {
            request
                .headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };

        // Path and its parameters.
        let path_values = match match_path(self.path_template, path) {
            Some(v) => v,
            None => {
                out.push(format!(
                    "path {path:?} does not match {}",
                    self.path_template
                ));
                Vec::new()
            }
        };
        let query_values: Vec<(String, String)> = query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (percent_decode(k), percent_decode(v))
            })
            .collect();
        for p in &self.parameters {
            let name = p["name"].as_str().unwrap_or_default();
            let place = p["in"].as_str().unwrap_or_default();
            let required = p["required"].as_bool().unwrap_or(false) || place == "path";
            let values: Vec<&str> = match place {
                "path" => path_values
                    .iter()
                    .filter(|(k, _)| k == name)
                    .map(|(_, v)| v.as_str())
                    .collect(),
                "query" => query_values
                    .iter()
                    .filter(|(k, _)| k == name)
                    .map(|(_, v)| v.as_str())
                    .collect(),
                "header" => header(name).into_iter().collect(),
                other => {
                    out.push(format!(
                        "parameter {name} in {other}: not checked by this test"
                    ));
                    continue;
                }
            };
            match values.as_slice() {
                [] if required => out.push(format!("required {place} parameter {name} is missing")),
                [] => {}
                [raw] => {
                    let schema = resolve(self.spec, &p["schema"]);
                    match parameter_value(schema, raw) {
                        Ok(value) => validate(
                            self.spec,
                            schema,
                            &value,
                            &format!("{place} parameter {name}"),
                            &mut out,
                        ),
                        Err(why) => out.push(format!("{place} parameter {name} = {raw:?}: {why}")),
                    }
                }
                many => out.push(format!(
                    "{place} parameter {name} given {} times",
                    many.len()
                )),
            }
        }

        // Security: at least one requirement object must be met in full.
        let alternatives = self.security.as_array().cloned().unwrap_or_default();
        if !alternatives.is_empty() {
            let met = alternatives.iter().any(|requirement| {
                requirement.as_object().is_some_and(|schemes| {
                    schemes.keys().all(|scheme| {
                        let s = resolve(
                            self.spec,
                            &self.spec["components"]["securitySchemes"][scheme],
                        );
                        match (s["type"].as_str(), s["in"].as_str()) {
                            (Some("apiKey"), Some("header")) => s["name"]
                                .as_str()
                                .and_then(header)
                                .is_some_and(|v| !v.is_empty()),
                            (Some("oauth2"), _) | (Some("http"), _) => {
                                header("authorization").is_some_and(|v| v.starts_with("Bearer "))
                            }
                            _ => false,
                        }
                    })
                })
            });
            if !met {
                out.push(format!(
                    "no security requirement of {} is met (headers {:?})",
                    self.security, request.headers
                ));
            }
        }

        // Body: media type and schema.
        let required = self.body["required"].as_bool().unwrap_or(false);
        if request.body.is_empty() {
            if required {
                out.push("the request body is required".into());
            }
            return out;
        }
        let media = header("content-type").map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
        let content = self.body["content"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let Some(schema) = media
            .as_deref()
            .and_then(|m| content.get(m))
            .map(|c| &c["schema"])
        else {
            out.push(format!(
                "Content-Type {media:?} is not one of {:?}",
                content.keys().collect::<Vec<_>>()
            ));
            return out;
        };
        match serde_json::from_str::<Value>(&request.body) {
            Ok(body) => validate(self.spec, schema, &body, "body", &mut out),
            Err(e) => out.push(format!("the body is not JSON: {e}")),
        }
        out
    }
}

/// `{name}` segments of the template bound to the path's segments.
fn match_path(template: &str, path: &str) -> Option<Vec<(String, String)>> {
    let t: Vec<&str> = template.split('/').collect();
    let p: Vec<&str> = path.split('/').collect();
    if t.len() != p.len() {
        return None;
    }
    let mut bound = Vec::new();
    for (t, p) in t.iter().zip(&p) {
        match t.strip_prefix('{').and_then(|x| x.strip_suffix('}')) {
            Some(name) if !p.is_empty() => bound.push((name.to_owned(), percent_decode(p))),
            Some(_) => return None,
            None if t == p => {}
            None => return None,
        }
    }
    Some(bound)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A path or query string as the JSON value its schema's type means
/// (OpenAPI's default `simple`/`form` styles for a primitive).
fn parameter_value(schema: &Value, raw: &str) -> Result<Value, String> {
    match schema["type"].as_str() {
        Some("integer") => {
            let digits = raw.strip_prefix('-').unwrap_or(raw);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err("not an integer".into());
            }
            raw.parse::<i64>()
                .map(|n| json!(n))
                .map_err(|_| "out of int64 range".into())
        }
        Some("number") => raw
            .parse::<f64>()
            .ok()
            .and_then(|n| serde_json::Number::from_f64(n).map(Value::Number))
            .ok_or_else(|| "not a number".into()),
        Some("boolean") => match raw {
            "true" => Ok(json!(true)),
            "false" => Ok(json!(false)),
            _ => Err("not a boolean".into()),
        },
        _ => Ok(json!(raw)),
    }
}

/// A JSON Schema subset, enough for this operation and reporting whatever
/// keyword it cannot check rather than passing silently.
pub fn validate(spec: &Value, schema: &Value, value: &Value, at: &str, out: &mut Vec<String>) {
    let schema = resolve(spec, schema);
    let Some(keywords) = schema.as_object() else {
        return;
    };
    if value.is_null() && schema["nullable"] == true {
        return;
    }
    for (keyword, expected) in keywords {
        match keyword.as_str() {
            "type" => {
                let ok = match expected.as_str().unwrap_or_default() {
                    "object" => value.is_object(),
                    "array" => value.is_array(),
                    "string" => value.is_string(),
                    "boolean" => value.is_boolean(),
                    "number" => value.is_number(),
                    "integer" => value.is_i64() || value.is_u64(),
                    other => {
                        out.push(format!("{at}: unknown type {other}"));
                        true
                    }
                };
                if !ok {
                    out.push(format!("{at}: {value} is not of type {expected}"));
                }
            }
            "format" => {
                let fits = match expected.as_str().unwrap_or_default() {
                    "int64" => !value.is_number() || value.is_i64(),
                    "int32" => value.as_i64().is_none_or(|n| i32::try_from(n).is_ok()),
                    _ => true,
                };
                if !fits {
                    out.push(format!("{at}: {value} does not fit format {expected}"));
                }
            }
            "minimum" | "maximum" => {
                if let (Some(v), Some(bound)) = (value.as_f64(), expected.as_f64()) {
                    let exclusive = schema[format!(
                        "exclusive{}",
                        if keyword == "minimum" {
                            "Minimum"
                        } else {
                            "Maximum"
                        }
                    )] == true;
                    let ok = match (keyword.as_str(), exclusive) {
                        ("minimum", false) => v >= bound,
                        ("minimum", true) => v > bound,
                        (_, false) => v <= bound,
                        (_, true) => v < bound,
                    };
                    if !ok {
                        out.push(format!("{at}: {value} is outside {keyword} {expected}"));
                    }
                }
            }
            "minLength" | "maxLength" => {
                if let (Some(s), Some(bound)) = (value.as_str(), expected.as_u64()) {
                    // JSON Schema counts Unicode code points.
                    let n = s.chars().count() as u64;
                    let ok = if keyword == "minLength" {
                        n >= bound
                    } else {
                        n <= bound
                    };
                    if !ok {
                        out.push(format!("{at}: {n} characters break {keyword} {bound}"));
                    }
                }
            }
            "enum" if !expected.as_array().is_some_and(|e| e.contains(value)) => {
                out.push(format!("{at}: {value} is not one of {expected}"));
            }
            "required" => {
                if let Some(object) = value.as_object() {
                    for name in expected.as_array().into_iter().flatten() {
                        let name = name.as_str().unwrap_or_default();
                        if !object.contains_key(name) {
                            out.push(format!("{at}: required property {name:?} is missing"));
                        }
                    }
                }
            }
            "properties" => {
                if let (Some(object), Some(properties)) = (value.as_object(), expected.as_object())
                {
                    for (name, sub) in properties {
                        if let Some(v) = object.get(name) {
                            validate(spec, sub, v, &format!("{at}.{name}"), out);
                        }
                    }
                }
            }
            "additionalProperties" => {
                if let Some(object) = value.as_object() {
                    let known = schema["properties"].as_object();
                    for (name, v) in object {
                        if known.is_some_and(|k| k.contains_key(name)) {
                            continue;
                        }
                        match expected {
                            Value::Bool(false) => {
                                out.push(format!("{at}: property {name:?} is not allowed"))
                            }
                            Value::Object(_) => {
                                validate(spec, expected, v, &format!("{at}.{name}"), out)
                            }
                            _ => {}
                        }
                    }
                }
            }
            "items" => {
                for (i, item) in value.as_array().into_iter().flatten().enumerate() {
                    validate(spec, expected, item, &format!("{at}[{i}]"), out);
                }
            }
            "minItems" | "maxItems" => {
                if let (Some(items), Some(bound)) = (value.as_array(), expected.as_u64()) {
                    let n = items.len() as u64;
                    if (keyword == "minItems" && n < bound) || (keyword == "maxItems" && n > bound)
                    {
                        out.push(format!("{at}: {n} items break {keyword} {bound}"));
                    }
                }
            }
            "allOf" => {
                for sub in expected.as_array().into_iter().flatten() {
                    validate(spec, sub, value, at, out);
                }
            }
            "pattern" => match known_pattern(expected.as_str().unwrap_or_default()) {
                Some(matches) => {
                    if value.as_str().is_some_and(|s| !matches(s)) {
                        out.push(format!("{at}: {value} does not match pattern {expected}"));
                    }
                }
                None => out.push(format!(
                    "{at}: pattern {expected} is not known to this test; extend known_pattern"
                )),
            },
            // A discriminator names the one schema to check against.
            "oneOf" if schema.get("discriminator").is_some() => {
                let property = schema["discriminator"]["propertyName"]
                    .as_str()
                    .unwrap_or_default();
                let tag = value
                    .get(property)
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                match schema["discriminator"]["mapping"][tag].as_str() {
                    Some(reference) => {
                        validate(spec, &json!({ "$ref": reference }), value, at, out)
                    }
                    None => out.push(format!(
                        "{at}: {property} = {tag:?} is not in the discriminator's mapping"
                    )),
                }
            }
            "oneOf" | "anyOf" | "not" => out.push(format!(
                "{at}: keyword {keyword} is not checked by this test; extend it"
            )),
            // Annotations and keywords handled with their partner.
            _ => {}
        }
    }
}

/// Patterns the specs use, as predicates (no regex engine here handles the
/// lookahead they contain).
fn known_pattern(pattern: &str) -> Option<fn(&str) -> bool> {
    match pattern {
        // ShopSku: 1..255 characters, no control characters but tab, and
        // not only whitespace.
        r"^(?=.*\S.*)[^\x00-\x08\x0A-\x1f\x7f]{1,255}$" => Some(|s: &str| {
            let n = s.chars().count();
            (1..=255).contains(&n)
                && s.chars().any(|c| !c.is_whitespace())
                && s.chars()
                    .all(|c| c == '\t' || !(c <= '\x1f' || c == '\x7f'))
        }),
        _ => None,
    }
}
