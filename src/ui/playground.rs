//! The template playground: an event (pasted, or loaded from the store by
//! delivery or event id) goes through the routes and templates in force,
//! or with one template's text edited in the page; the page shows each
//! matching route's text and length, or the exact error. The edited text
//! is compiled in a scratch copy of the templates (`Pipeline::plan_edited`):
//! nothing is saved, nothing is sent, nothing in force changes.

use actix_web::{web, HttpRequest, HttpResponse};
use askama::Template;
use serde::Deserialize;

use super::{ok_page, Chrome, Session, UiError};
use crate::pipeline::Planned;
use crate::render::EventMeta;
use crate::state::AppState;

pub struct TemplateOption {
    pub name: String,
    pub source: String,
    pub selected: bool,
}

pub struct SourceOption {
    pub name: String,
    pub selected: bool,
}

/// One matching route's outcome.
pub struct Outcome {
    pub route: String,
    pub template: String,
    pub business_id: String,
    pub chat_id: String,
    pub text: Option<String>,
    pub length: usize,
    pub too_long: bool,
    pub error: Option<String>,
}

/// What running the playground gave.
pub struct Results {
    /// The event itself was not usable (not JSON, no type, unknown source).
    pub event_error: Option<String>,
    /// The edited template does not compile.
    pub template_error: Option<String>,
    pub event_type: String,
    pub outcomes: Vec<Outcome>,
}

#[derive(Template)]
#[template(path = "playground.html")]
struct PlaygroundPage {
    c: Chrome,
    sources: Vec<SourceOption>,
    templates: Vec<TemplateOption>,
    payload: String,
    template_text: String,
    loaded: Option<String>,
    load_error: Option<String>,
    results: Option<Results>,
}

#[derive(Template)]
#[template(path = "playground_results.html")]
struct ResultsFragment {
    c: Chrome,
    results: Option<Results>,
}

#[derive(Deserialize)]
pub struct LoadQuery {
    delivery: Option<String>,
    event: Option<String>,
}

#[derive(Deserialize)]
pub struct RunForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    source: String,
    #[serde(default)]
    payload: String,
    #[serde(default)]
    template: String,
    #[serde(default)]
    template_text: String,
}

/// The page, with a stored event loaded when `?delivery=` or `?event=`
/// names one (and run at once on it).
pub async fn page_handler(
    state: &AppState,
    session: &Session,
    query: LoadQuery,
) -> Result<HttpResponse, UiError> {
    let l = session.lang.labels();
    let mut source = String::new();
    let mut payload = String::new();
    let mut loaded = None;
    let mut load_error = None;
    let wanted = |v: &Option<String>| {
        v.as_deref()
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(|v| {
                v.parse::<i64>()
                    .map_err(|_| format!("{v:?} is not a number"))
            })
    };
    let event_id = match (wanted(&query.delivery), wanted(&query.event)) {
        (Some(Ok(delivery)), _) => match state.store.delivery(delivery).await? {
            Some((d, _)) => Some(d.event_id),
            None => {
                load_error = Some(format!("no delivery {delivery}"));
                None
            }
        },
        (_, Some(Ok(event))) => Some(event),
        (Some(Err(e)), _) | (_, Some(Err(e))) => {
            load_error = Some(e);
            None
        }
        (None, None) => None,
    };
    if let Some(id) = event_id {
        match state.store.event(id).await? {
            Some(e) => {
                source = e.source.clone();
                payload = serde_json::from_str::<serde_json::Value>(&e.payload)
                    .and_then(|v| serde_json::to_string_pretty(&v))
                    .unwrap_or(e.payload);
                loaded = Some(format!(
                    "{} {} ({} {:?})",
                    l.pg_loaded, e.id, e.source, e.external_id
                ));
            }
            None => load_error = Some(format!("no event {id}")),
        }
    }
    let results = (!payload.is_empty()).then(|| run_once(state, &source, &payload, "", ""));
    Ok(ok_page(PlaygroundPage {
        c: Chrome::new(session, "playground"),
        sources: source_options(state, &source),
        templates: template_options(state, ""),
        payload,
        template_text: String::new(),
        loaded,
        load_error,
        results,
    }))
}

pub async fn page(
    state: web::Data<AppState>,
    session: Session,
    query: web::Query<LoadQuery>,
) -> Result<HttpResponse, UiError> {
    page_handler(&state, &session, query.into_inner()).await
}

/// Runs the form. The page's script asks for the results alone
/// (`X-Fragment: results`) as the user types; without script the whole
/// page comes back.
pub async fn run(
    state: web::Data<AppState>,
    session: Session,
    req: HttpRequest,
    form: web::Form<RunForm>,
) -> Result<HttpResponse, UiError> {
    // Nothing changes here, but the form is a POST and carries the token
    // like every other.
    session.check_csrf(&form.csrf)?;
    let form = form.into_inner();
    // No text typed yet for the chosen template: start from the file.
    let template_text = if !form.template.is_empty() && form.template_text.is_empty() {
        template_source(&state, &form.template).unwrap_or_default()
    } else {
        form.template_text
    };
    let results = Some(run_once(
        &state,
        &form.source,
        &form.payload,
        &form.template,
        &template_text,
    ));
    let fragment = req
        .headers()
        .get("x-fragment")
        .is_some_and(|v| v.as_bytes() == b"results");
    if fragment {
        return Ok(super::ok_page(ResultsFragment {
            c: Chrome::new(&session, "playground"),
            results,
        }));
    }
    Ok(super::ok_page(PlaygroundPage {
        c: Chrome::new(&session, "playground"),
        sources: source_options(&state, &form.source),
        templates: template_options(&state, &form.template),
        payload: form.payload,
        template_text,
        loaded: None,
        load_error: None,
        results,
    }))
}

fn run_once(
    state: &AppState,
    source: &str,
    payload: &str,
    template: &str,
    template_text: &str,
) -> Results {
    let pipeline = state.pipeline.load_full();
    let mut results = Results {
        event_error: None,
        template_error: None,
        event_type: String::new(),
        outcomes: Vec::new(),
    };
    let Some(settings) = pipeline.settings.sources.get(source) else {
        results.event_error = Some(format!(
            "unknown source {source:?}; known: {}",
            pipeline
                .settings
                .sources
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ));
        return results;
    };
    // The same parsing a webhook goes through: type and id from the
    // source's pointers.
    let parsed = match crate::ingest::parse_event(
        settings,
        payload.as_bytes(),
        None,
        pipeline.settings.server.max_json_depth,
    ) {
        Ok(p) => p,
        Err(e) => {
            results.event_error = Some(e.message);
            return results;
        }
    };
    let meta = EventMeta {
        source: source.to_owned(),
        event_type: parsed.event_type.clone(),
        id: parsed.event_id,
        received_at: crate::clock::to_rfc3339(state.clock.now_ms()),
        business_id: None,
    };
    results.event_type = parsed.event_type;
    let planned = if template.is_empty() {
        Ok(pipeline.plan(&parsed.payload, &meta))
    } else {
        pipeline.plan_edited(&parsed.payload, &meta, template, template_text)
    };
    match planned {
        Ok(planned) => results.outcomes = planned.into_iter().map(outcome).collect(),
        Err(e) => results.template_error = Some(e),
    }
    results
}

fn outcome(p: Planned) -> Outcome {
    let mut o = Outcome {
        route: p.route,
        template: p.template,
        business_id: String::new(),
        chat_id: String::new(),
        text: None,
        length: 0,
        too_long: false,
        error: None,
    };
    match p.rendered {
        Ok(r) => {
            o.business_id = r.business_id.0.to_string();
            o.chat_id = match r.target {
                crate::domain::Target::Chat(chat) => chat.to_string(),
                crate::domain::Target::Context(ctx) => {
                    format!("{} {} → chats/new", ctx.kind.as_str(), ctx.id)
                }
            };
            o.length = r.text.as_str().chars().count();
            o.text = Some(r.text.into_string());
        }
        Err(e) => o.error = Some(e),
    }
    o.too_long = o.length > 4096;
    o
}

fn source_options(state: &AppState, selected: &str) -> Vec<SourceOption> {
    state
        .pipeline
        .load()
        .settings
        .sources
        .keys()
        .map(|name| SourceOption {
            selected: name == selected,
            name: name.clone(),
        })
        .collect()
}

fn template_options(state: &AppState, selected: &str) -> Vec<TemplateOption> {
    let pipeline = state.pipeline.load();
    pipeline
        .renderer
        .template_names()
        .map(|name| TemplateOption {
            name: name.to_owned(),
            source: template_source(state, name).unwrap_or_default(),
            selected: name == selected,
        })
        .collect()
}

/// A template's file as it is on disk now. Only names of loaded templates
/// are read, so a form field cannot point outside the templates folder.
fn template_source(state: &AppState, name: &str) -> Option<String> {
    let pipeline = state.pipeline.load();
    pipeline.renderer.template_names().find(|n| *n == name)?;
    std::fs::read_to_string(pipeline.settings.templates.dir.join(format!("{name}.hbs"))).ok()
}
