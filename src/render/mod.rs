//! Turns an event into message text with Handlebars. Rendering is strict (a
//! missing field is an error, never an empty hole) and unescaped (chat text
//! is plain text: `&` stays `&`). The business and chat ids of a route are
//! rendered too and parsed as positive integers; the text is checked
//! against the Market's 1..4096 character bound.

mod helpers;
mod strict;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use handlebars::{Context, Handlebars};
use serde::Serialize;
use serde_json::Value;

use crate::domain::{BusinessId, ChatContext, ChatId, ContextKind, MessageText, Target};
use crate::routes::{IdSource, Route, RoutingTable};

pub use helpers::{format_roubles, russian_plural_form};
pub use strict::{BUILTIN_HELPERS, OUR_HELPERS};

/// What the renderer knows about the event besides its payload; templates
/// see it as `_event` (`{{_event.source}}`, `{{_event.type}}`, ...).
#[derive(Debug, Clone, Serialize)]
pub struct EventMeta {
    pub source: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub id: String,
    pub received_at: String,
    /// The business a Market notification was resolved to (its campaign's);
    /// absent for other events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub business_id: Option<i64>,
}

/// A message ready to send.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub business_id: BusinessId,
    /// The chat, or the order or return whose chat it goes to.
    pub target: Target,
    pub text: MessageText,
}

pub struct Renderer {
    hb: Handlebars<'static>,
    templates: BTreeSet<String>,
    partials: BTreeSet<String>,
    /// Template and partial sources by name, to quote the expression a
    /// render error points at.
    sources: BTreeMap<String, String>,
}

impl Renderer {
    /// Loads `dir/*.hbs` as templates and `dir/partials/*.hbs` as partials.
    /// Every file that fails to compile is reported as `file: reason`.
    pub fn load(dir: &Path) -> Result<Self, Vec<String>> {
        let mut hb = Handlebars::new();
        hb.set_strict_mode(true);
        hb.register_escape_fn(handlebars::no_escape);
        helpers::register(&mut hb);
        let mut problems = Vec::new();
        let mut templates = BTreeSet::new();
        let mut partials = BTreeSet::new();
        let mut sources = BTreeMap::new();
        let mut files = Vec::new();
        for (path, is_partial) in hbs_files(&dir.join("partials"), true)
            .into_iter()
            .chain(hbs_files(dir, false))
        {
            let Some(name) = path.file_stem().and_then(|s| s.to_str()).map(str::to_owned) else {
                continue;
            };
            let source = match std::fs::read_to_string(&path) {
                Ok(s) => s,
                Err(e) => {
                    problems.push(format!("{}: cannot read: {e}", path.display()));
                    continue;
                }
            };
            let registered = if is_partial {
                partials.insert(name.clone());
                hb.register_partial(&name, &source)
            } else {
                templates.insert(name.clone());
                hb.register_template_string(&name, &source)
            };
            match registered {
                Ok(()) => files.push((name.clone(), path.clone())),
                Err(e) => {
                    let hint = unclosed_block_hint(&source);
                    problems.push(format!("{}: {}{hint}", path.display(), template_error(&e)));
                }
            }
            sources.insert(name, source);
        }
        // Only once every partial is known can calls to them be checked.
        for (name, path) in files {
            if let Some(mut compiled) = hb.get_template(&name).cloned() {
                for p in strict::harden(&mut compiled, &hb, &partials) {
                    problems.push(format!("{}: {p}", path.display()));
                }
                hb.register_template(&name, compiled);
            }
        }
        if !dir.is_dir() {
            problems.push(format!(
                "{}: templates folder not found (set [templates] dir)",
                dir.display()
            ));
        }
        if problems.is_empty() {
            Ok(Self {
                hb,
                templates,
                partials,
                sources,
            })
        } else {
            Err(problems)
        }
    }

    /// A scratch copy with one template's text replaced (the console's
    /// playground): the registry in force is never touched. A text that
    /// does not compile is an error saying where.
    pub fn with_template(&self, name: &str, source: &str) -> Result<Renderer, String> {
        if !self.templates.contains(name) {
            return Err(format!("template {name:?} not found"));
        }
        let mut compiled = handlebars::Template::compile(source).map_err(|e| {
            format!(
                "template {name:?}: {}{}",
                template_error(&e),
                unclosed_block_hint(source)
            )
        })?;
        // The same strict checks as a template loaded from its file.
        let problems = strict::harden(&mut compiled, &self.hb, &self.partials);
        if !problems.is_empty() {
            return Err(format!("template {name:?}: {}", problems.join("; ")));
        }
        compiled.name = Some(name.to_owned());
        let mut hb = self.hb.clone();
        hb.register_template(name, compiled);
        let mut sources = self.sources.clone();
        sources.insert(name.to_owned(), source.to_owned());
        Ok(Renderer {
            hb,
            templates: self.templates.clone(),
            partials: self.partials.clone(),
            sources,
        })
    }

    pub fn template_names(&self) -> impl Iterator<Item = &str> {
        self.templates.iter().map(String::as_str)
    }

    /// Compiles each route's id templates and checks its template exists.
    pub fn prepare_routes(
        &mut self,
        routes: &RoutingTable,
        routes_file: &Path,
    ) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        for route in &routes.routes {
            let at = format!("{}: route {:?}", routes_file.display(), route.name);
            if !self.templates.contains(&route.template) {
                let known: Vec<_> = self.templates.iter().map(String::as_str).collect();
                problems.push(format!(
                    "{at}: template {:?} not found; known templates: {}",
                    route.template,
                    known.join(", ")
                ));
            }
            for (field, id) in route.id_fields() {
                if let IdSource::Template(source) = id {
                    let name = id_template_name(&route.name, field);
                    match handlebars::Template::compile(source) {
                        Ok(mut compiled) => {
                            for p in strict::harden(&mut compiled, &self.hb, &self.partials) {
                                problems.push(format!("{at}: {field}: {p}"));
                            }
                            compiled.name = Some(name.clone());
                            self.hb.register_template(&name, compiled);
                            self.sources.insert(name, source.clone());
                        }
                        Err(e) => problems.push(format!("{at}: {field}: {}", template_error(&e))),
                    }
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// Renders one route for one event.
    pub fn render(&self, route: &Route, context: &Context) -> Result<Rendered, String> {
        let business_id = self
            .render_id(route, "business_id", &route.business_id, context)
            .and_then(|raw| BusinessId::parse(&raw))?;
        let target = self.render_target(route, context)?;
        let text = self.render_text(&route.template, context)?;
        Ok(Rendered {
            business_id,
            target,
            text: MessageText::parse(text)?,
        })
    }

    /// The chat the route names, or the order or return whose chat it is.
    pub fn render_target(&self, route: &Route, context: &Context) -> Result<Target, String> {
        for (kind, id) in [
            (ContextKind::Order, &route.order_id),
            (ContextKind::Return, &route.return_id),
        ] {
            if id.is_some() {
                let raw = self.render_id(route, kind.field(), id, context)?;
                let id = ChatId::parse(&raw)
                    .map_err(|_| {
                        format!("{} must be a positive integer, got {raw:?}", kind.field())
                    })?
                    .0;
                return Ok(Target::Context(ChatContext { kind, id }));
            }
        }
        self.render_id(route, "chat_id", &route.chat_id, context)
            .and_then(|raw| ChatId::parse(&raw))
            .map(Target::Chat)
    }

    /// The business id and the target alone, each `None` when it does not
    /// render: what a delivery that failed to render still records.
    pub fn render_ids(
        &self,
        route: &Route,
        context: &Context,
    ) -> (Option<BusinessId>, Option<Target>) {
        let business_id = self
            .render_id(route, "business_id", &route.business_id, context)
            .and_then(|raw| BusinessId::parse(&raw))
            .ok();
        (business_id, self.render_target(route, context).ok())
    }

    /// The message text alone, unchecked for length.
    pub fn render_text(&self, template: &str, context: &Context) -> Result<String, String> {
        self.hb
            .render_with_context(template, context)
            .map_err(|e| format!("template {template:?}: {}", self.render_error(&e)))
    }

    fn render_id(
        &self,
        route: &Route,
        field: &str,
        id: &Option<IdSource>,
        context: &Context,
    ) -> Result<String, String> {
        match id {
            Some(IdSource::Fixed(n)) => Ok(n.to_string()),
            // The common `{{chatId}}` needs no template engine: a direct
            // lookup, as strict as Handlebars (a missing field is an error).
            Some(IdSource::Template(t)) if plain_path(t).is_some() => {
                let path = plain_path(t).unwrap_or_default();
                match crate::routes::lookup_path(context.data(), path) {
                    Some(Value::String(s)) => Ok(s.clone()),
                    Some(Value::Number(n)) => Ok(n.to_string()),
                    Some(other) => Err(format!("{field}: {path:?} is {other}, not an id")),
                    None => Err(format!("{field}: field {path:?} is missing from the event")),
                }
            }
            Some(IdSource::Template(_)) => self
                .hb
                .render_with_context(&id_template_name(&route.name, field), context)
                .map_err(|e| format!("{field}: {}", self.render_error(&e))),
            None => Err(format!("route {:?} has no {field}", route.name)),
        }
    }
}

/// `Some("order.chatId")` for a template that is one plain `{{order.chatId}}`.
fn plain_path(template: &str) -> Option<&str> {
    let path = template
        .trim()
        .strip_prefix("{{")?
        .strip_suffix("}}")?
        .trim();
    let plain = !path.is_empty()
        && !path.starts_with('.')
        && path.split('.').next() != Some("this")
        && path
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    plain.then_some(path)
}

/// The context a template sees: the event's JSON with `_event` beside it.
/// Built once per event and shared by its routes (Handlebars would copy a
/// borrowed JSON value into a context of its own at every render). Built
/// from the event's JSON by value, which it hands back afterwards
/// ([`EventContext::into_payload`]), so a webhook's JSON is not copied.
pub struct EventContext {
    context: Context,
    /// The event's own `_event` member, which the context's hides.
    shadowed: Option<Value>,
    /// A payload that is not an object stands in the context as `payload`.
    wrapped: bool,
}

impl EventContext {
    pub fn new(payload: Value, meta: &EventMeta) -> EventContext {
        let (mut map, wrapped) = match payload {
            Value::Object(map) => (map, false),
            other => (
                serde_json::Map::from_iter([("payload".to_owned(), other)]),
                true,
            ),
        };
        let shadowed = map.insert(
            "_event".into(),
            serde_json::to_value(meta).unwrap_or(Value::Null),
        );
        EventContext {
            context: Context::from(Value::Object(map)),
            shadowed,
            wrapped,
        }
    }

    pub fn context(&self) -> &Context {
        &self.context
    }

    /// The event's JSON as it was given to [`EventContext::new`].
    pub fn into_payload(mut self) -> Value {
        let Value::Object(mut map) = std::mem::take(self.context.data_mut()) else {
            return Value::Null;
        };
        match self.shadowed {
            Some(own) => map.insert("_event".into(), own),
            None => map.remove("_event"),
        };
        match self.wrapped {
            true => map.remove("payload").unwrap_or(Value::Null),
            false => Value::Object(map),
        }
    }
}

fn id_template_name(route: &str, field: &str) -> String {
    format!("route:{route}:{field}")
}

fn hbs_files(dir: &Path, is_partial: bool) -> Vec<(std::path::PathBuf, bool)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "hbs"))
        .map(|p| (p, is_partial))
        .collect();
    files.sort();
    files
}

/// Handlebars reports an unclosed `{{#if}}` as a parse error at the end of
/// the file; say which block to close.
fn unclosed_block_hint(source: &str) -> String {
    let mut open: Vec<&str> = Vec::new();
    let mut rest = source;
    while let Some(at) = rest.find("{{") {
        rest = &rest[at + 2..];
        let tag = rest.trim_start_matches('~').trim_start();
        if let Some(block) = tag.strip_prefix('#') {
            open.push(
                block
                    .split(|c: char| c.is_whitespace() || c == '}')
                    .next()
                    .unwrap_or(""),
            );
        } else if let Some(block) = tag.strip_prefix('/') {
            let block = block
                .split(|c: char| c.is_whitespace() || c == '}')
                .next()
                .unwrap_or("");
            if open.last() == Some(&block) {
                open.pop();
            }
        }
    }
    match open.last() {
        Some(block) => {
            format!(" (a {{{{#{block}}}}} block is not closed: add {{{{/{block}}}}} where it ends)")
        }
        None => String::new(),
    }
}

fn template_error(e: &handlebars::TemplateError) -> String {
    let reason = e.reason().to_string();
    match e.pos() {
        Some((line, col)) => format!("line {line}, column {col}: {reason}"),
        None => reason,
    }
}

impl Renderer {
    /// A render error in our words: what is wrong, what to write instead,
    /// and where (line and column; the partial when it is in one).
    fn render_error(&self, e: &handlebars::RenderError) -> String {
        use handlebars::RenderErrorReason as R;
        let mut text = match e.reason() {
            R::MissingVariable(Some(path)) => format!("field {path:?} is missing from the event"),
            R::MissingVariable(None) => "a value is missing from the event".into(),
            R::ParamNotFoundForIndex(helper, i) => format!(
                "helper {helper:?}: argument {} is missing (is the field it names missing from the event? guard it with {{{{#if field}}}})",
                i + 1
            ),
            R::HelperNotFound(name) => strict::unknown_helper_message(name),
            R::PartialNotFound(name) => strict::unknown_partial_message(name, &self.partials),
            R::InvalidJsonIndex(key) => {
                let expression = self.expression_at(e).unwrap_or_default();
                let list = expression
                    .split_once(&format!(".{key}"))
                    .map(|(list, _)| list.trim())
                    .filter(|l| !l.is_empty())
                    .unwrap_or("items");
                format!(
                    "{list:?} is a list, and a list has no field {key:?}: write {{{{len {list}}}}} for its size, or {{{{{list}.[0]}}}} for the first item"
                )
            }
            other => other.to_string(),
        };
        if let Some(line) = e.line_no {
            text.push_str(" (");
            if let Some(partial) = e
                .template_name
                .as_ref()
                .filter(|n| self.partials.contains(*n))
            {
                text.push_str(&format!("partial {partial:?}, "));
            }
            text.push_str(&format!("line {line}"));
            if let Some(col) = e.column_no {
                text.push_str(&format!(", column {col}"));
            }
            text.push(')');
        }
        text
    }

    /// The `{{...}}` a render error points at, without its braces.
    fn expression_at(&self, e: &handlebars::RenderError) -> Option<String> {
        let source = self.sources.get(e.template_name.as_ref()?)?;
        let line = source.lines().nth(e.line_no?.checked_sub(1)?)?;
        let rest: String = line.chars().skip(e.column_no?.saturating_sub(1)).collect();
        let inner = rest.strip_prefix("{{")?;
        let end = inner.find("}}")?;
        Some(
            inner[..end]
                .trim_matches(|c: char| c == '{' || c == '~' || c.is_whitespace())
                .to_owned(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn renderer_with(name: &str, source: &str) -> (tempfile::TempDir, Renderer) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(format!("{name}.hbs")), source).unwrap();
        let r = Renderer::load(dir.path()).unwrap();
        (dir, r)
    }

    #[test]
    fn the_event_context_hands_back_the_payload_it_was_built_from() {
        let meta = EventMeta {
            source: "oms".into(),
            event_type: "t".into(),
            id: "e".into(),
            received_at: "2026-01-01T00:00:00Z".into(),
            business_id: None,
        };
        for payload in [
            json!({"a": 1}),
            json!({"a": 1, "_event": {"own": true}}),
            json!({"payload": 2}),
            json!([1, 2]),
            json!("text"),
        ] {
            let context = EventContext::new(payload.clone(), &meta);
            assert_eq!(context.context().data()["_event"]["source"], "oms");
            assert_eq!(context.into_payload(), payload);
        }
    }

    #[test]
    fn text_is_not_html_escaped() {
        let (_d, r) = renderer_with("t", "{{name}}");
        let out = r
            .render_text("t", &Context::from(json!({"name": "Tom & \"Jerry\" <Ёж>"})))
            .unwrap();
        assert_eq!(out, "Tom & \"Jerry\" <Ёж>");
    }

    #[test]
    fn a_missing_field_is_an_error_naming_it() {
        let (_d, r) = renderer_with("t", "Трек: {{tracking.number}}");
        let err = r
            .render_text("t", &Context::from(json!({"tracking": {}})))
            .unwrap_err();
        assert!(err.contains("tracking.number"), "{err}");
    }

    #[test]
    fn helpers_refuse_missing_arguments() {
        let (_d, r) = renderer_with("t", "{{rub refund.amount}}");
        let err = r.render_text("t", &Context::from(json!({}))).unwrap_err();
        assert!(err.contains("refund.amount"), "{err}");
        let (_d, r) = renderer_with("t", "{{default note \"нет\"}}");
        assert_eq!(
            r.render_text("t", &Context::from(json!({}))).unwrap(),
            "нет"
        );
    }

    #[test]
    fn dates_render_in_the_given_zone() {
        let (_d, r) = renderer_with("t", "{{date at \"%d.%m.%Y %H:%M\" \"Europe/Moscow\"}}");
        let out = r
            .render_text("t", &Context::from(json!({"at": "2026-11-25T09:30:00Z"})))
            .unwrap();
        assert_eq!(out, "25.11.2026 12:30");
    }

    #[test]
    fn broken_templates_name_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bad.hbs"), "ok\n{{#if x}}never closed").unwrap();
        let problems = Renderer::load(dir.path()).err().unwrap();
        assert!(problems[0].contains("bad.hbs"), "{problems:?}");
    }
}
