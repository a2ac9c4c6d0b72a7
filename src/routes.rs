//! The routing table from `routes.toml`: which routes an event matches.
//! Routes are tried in file order; every match makes one delivery, and the
//! first match stops the search unless it says `continue = true`.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct RoutesError {
    pub file: String,
    pub message: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutesFile {
    #[serde(default)]
    routes: Vec<Route>,
}

/// How a route finds a business or chat id: a fixed number, or a template
/// rendered from the event.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum IdSource {
    Fixed(i64),
    Template(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub name: String,
    #[serde(default)]
    pub source: Option<String>,
    pub event: String,
    #[serde(default)]
    pub when: toml::Table,
    pub template: String,
    pub business_id: Option<IdSource>,
    pub chat_id: Option<IdSource>,
    /// Instead of `chat_id`: the chat of this order (found with `chats/new`).
    pub order_id: Option<IdSource>,
    /// Instead of `chat_id`: the chat of this return.
    pub return_id: Option<IdSource>,
    #[serde(default, rename = "continue")]
    pub continue_matching: bool,
}

impl Route {
    /// The id fields the route sets, by name: `business_id` and the one of
    /// `chat_id`, `order_id` or `return_id` it names.
    pub fn id_fields(&self) -> impl Iterator<Item = (&'static str, &IdSource)> {
        [
            ("business_id", &self.business_id),
            ("chat_id", &self.chat_id),
            ("order_id", &self.order_id),
            ("return_id", &self.return_id),
        ]
        .into_iter()
        .filter_map(|(field, id)| id.as_ref().map(|id| (field, id)))
    }

    /// Does this route take the event?
    pub fn matches(&self, source: &str, event_type: &str, payload: &Value) -> bool {
        self.source.as_deref().is_none_or(|s| s == source)
            && glob_match(&self.event, event_type)
            && self.when.iter().all(|(path, expected)| {
                lookup_path(payload, path).is_some_and(|actual| values_equal(actual, expected))
            })
    }
}

#[derive(Debug, Clone, Default)]
pub struct RoutingTable {
    pub routes: Vec<Route>,
}

impl RoutingTable {
    /// Reads and checks the routes file. Template names are checked later,
    /// against the templates that were actually loaded.
    pub fn load(file: &Path) -> Result<Self, RoutesError> {
        let err = |message: String| RoutesError {
            file: file.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(file)
            .map_err(|e| err(format!("cannot read the routes file: {e}")))?;
        Self::parse(&text).map_err(err)
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let parsed: RoutesFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let table = Self {
            routes: parsed.routes,
        };
        let problems = table.problems();
        if problems.is_empty() {
            Ok(table)
        } else {
            Err(problems.join("\n"))
        }
    }

    fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, route) in self.routes.iter().enumerate() {
            let at = format!("route #{} {:?}", i + 1, route.name);
            if route.name.trim().is_empty() {
                out.push(format!("route #{}: name must not be empty", i + 1));
            } else if !seen.insert(route.name.as_str()) {
                out.push(format!(
                    "{at}: another route has the same name; names must be unique"
                ));
            }
            if route.event.is_empty() {
                out.push(format!(
                    "{at}: event must not be empty (use \"*\" to match every event)"
                ));
            }
            if route.business_id.is_none() {
                out.push(format!(
                    "{at}: no business_id; write business_id = \"{{{{businessId}}}}\" (a template over the event) or a number"
                ));
            }
            let targets: Vec<&str> = route
                .id_fields()
                .map(|(field, _)| field)
                .filter(|f| *f != "business_id")
                .collect();
            match targets.len() {
                0 => out.push(format!(
                    "{at}: no chat_id; write chat_id = \"{{{{chatId}}}}\", or order_id = \"{{{{orderId}}}}\" (the chat of the order) or return_id = \"{{{{returnId}}}}\" (the chat of the return): a template over the event or a number"
                )),
                1 => {}
                _ => out.push(format!(
                    "{at}: {} are all set; a route names exactly one of chat_id, order_id and return_id",
                    targets.join(" and ")
                )),
            }
            for (field, id) in route.id_fields() {
                match id {
                    IdSource::Fixed(n) if *n < 1 => {
                        out.push(format!("{at}: {field} = {n} must be a positive integer"))
                    }
                    IdSource::Template(t) if t.trim().is_empty() => {
                        out.push(format!("{at}: {field} must not be empty"))
                    }
                    _ => {}
                }
            }
            for (path, value) in &route.when {
                if path.is_empty() || path.split('.').any(str::is_empty) {
                    out.push(format!(
                        "{at}: when key {path:?} is not a dotted path like \"delivery.type\""
                    ));
                }
                if matches!(
                    value,
                    toml::Value::Table(_) | toml::Value::Array(_) | toml::Value::Datetime(_)
                ) {
                    out.push(format!(
                        "{at}: when.{path:?} must compare with a string, number or boolean"
                    ));
                }
            }
        }
        out
    }

    /// The routes the event matches, in order, honouring `continue`.
    pub fn route<'a>(&'a self, source: &str, event_type: &str, payload: &Value) -> Vec<&'a Route> {
        let mut matched = Vec::new();
        for route in &self.routes {
            if route.matches(source, event_type, payload) {
                matched.push(route);
                if !route.continue_matching {
                    break;
                }
            }
        }
        matched
    }
}

/// `*` matches any run of characters (dots included); everything else is literal.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == '*' {
            backtrack = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((star, matched)) = backtrack {
            pi = star + 1;
            ti = matched + 1;
            backtrack = Some((star, matched + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Follows a dotted path (`delivery.type`, `items.0.sku`) into the payload,
/// the same way a template names a field.
pub fn lookup_path<'a>(payload: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(payload, |node, key| match node {
        Value::Object(map) => map.get(key),
        Value::Array(items) => key.parse::<usize>().ok().and_then(|i| items.get(i)),
        _ => None,
    })
}

fn values_equal(actual: &Value, expected: &toml::Value) -> bool {
    match (actual, expected) {
        (Value::String(a), toml::Value::String(e)) => a == e,
        (Value::Bool(a), toml::Value::Boolean(e)) => a == e,
        (Value::Number(a), toml::Value::Integer(e)) => a.as_i64() == Some(*e),
        (Value::Number(a), toml::Value::Float(e)) => a.as_f64() == Some(*e),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn globs_match_any_characters_including_dots() {
        assert!(glob_match("order.*", "order.shipped"));
        assert!(glob_match("*", "a.b.c"));
        assert!(glob_match("order.*.done", "order.x.y.done"));
        assert!(!glob_match("order.*", "return.approved"));
        assert!(glob_match("order.shipped", "order.shipped"));
        assert!(!glob_match("order.shipped", "order.shipped2"));
    }

    #[test]
    fn first_match_wins_unless_it_continues() {
        let table = RoutingTable::parse(
            r#"
            [[routes]]
            name = "courier"
            event = "order.*"
            when = { "delivery.type" = "COURIER" }
            template = "t"
            business_id = 1
            chat_id = "{{chatId}}"
            continue = true

            [[routes]]
            name = "any"
            source = "oms"
            event = "order.shipped"
            template = "t"
            business_id = 1
            chat_id = 2

            [[routes]]
            name = "never"
            event = "*"
            template = "t"
            business_id = 1
            chat_id = 2
            "#,
        )
        .unwrap();
        let courier = json!({"delivery": {"type": "COURIER"}});
        let names = |v: Vec<&Route>| v.iter().map(|r| r.name.clone()).collect::<Vec<_>>();
        assert_eq!(
            names(table.route("oms", "order.shipped", &courier)),
            ["courier", "any"]
        );
        assert_eq!(
            names(table.route("crm", "order.shipped", &json!({}))),
            ["never"]
        );
    }

    #[test]
    fn a_route_without_a_chat_is_refused() {
        let err = RoutingTable::parse(
            "[[routes]]\nname = \"x\"\nevent = \"a\"\ntemplate = \"t\"\nbusiness_id = 1\n",
        )
        .unwrap_err();
        assert!(err.contains("no chat_id"), "{err}");
        assert!(err.contains("order_id"), "{err}");
    }

    #[test]
    fn a_route_names_exactly_one_chat_target() {
        let err = RoutingTable::parse(
            "[[routes]]\nname = \"x\"\nevent = \"a\"\ntemplate = \"t\"\nbusiness_id = 1\nchat_id = 2\norder_id = \"{{orderId}}\"\n",
        )
        .unwrap_err();
        assert!(err.contains("chat_id and order_id"), "{err}");
        let ok = RoutingTable::parse(
            "[[routes]]\nname = \"x\"\nevent = \"a\"\ntemplate = \"t\"\nbusiness_id = 1\nreturn_id = \"{{returnId}}\"\n",
        )
        .unwrap();
        assert_eq!(ok.routes[0].id_fields().count(), 2);
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = RoutingTable::parse(
            "[[routes]]\nname = \"x\"\nevent = \"a\"\ntemplat = \"t\"\nbusiness_id = 1\nchat_id = 2\n",
        )
        .unwrap_err();
        assert!(err.contains("templat"), "{err}");
    }
}
