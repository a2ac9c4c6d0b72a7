//! The configuration in force: settings, routing table and compiled
//! templates, loaded and validated as one unit so that a request or a send
//! never sees half of one configuration and half of another.

use std::path::Path;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::clock::to_rfc3339;
use crate::domain::{BusinessId, Target};
use crate::render::{EventContext, EventMeta, Rendered, Renderer};
use crate::routes::RoutingTable;
use crate::settings::Settings;
use crate::store::StoredEvent;

pub struct Pipeline {
    pub settings: Settings,
    pub routes: RoutingTable,
    pub renderer: Renderer,
    /// Short hash of the files this was built from, shown by `/readyz`.
    pub version: String,
}

/// One delivery an event gives rise to: a route and its rendering.
pub struct Planned {
    pub route: String,
    pub template: String,
    pub rendered: Result<Rendered, String>,
    /// The ids that rendered, also when the rest did not.
    pub business_id: Option<BusinessId>,
    /// The chat, or the order or return whose chat it is.
    pub target: Option<Target>,
}

impl Pipeline {
    /// Loads everything under `config_dir` (and the templates folder the
    /// settings name). All problems come back at once, each as `file: what`.
    pub fn load(config_dir: &Path) -> Result<Self, Vec<String>> {
        let settings = Settings::load(config_dir).map_err(|e| vec![e.to_string()])?;
        Self::from_settings(settings)
    }

    pub fn from_settings(settings: Settings) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let routes = RoutingTable::load(&settings.routes_file())
            .map_err(|e| problems.push(e.to_string()))
            .ok();
        let renderer = Renderer::load(&settings.templates.dir)
            .map_err(|e| problems.extend(e))
            .ok();
        let (Some(routes), Some(mut renderer)) = (routes, renderer) else {
            return Err(problems);
        };
        renderer.prepare_routes(&routes, &settings.routes_file())?;
        for route in &routes.routes {
            if let Some(source) = &route.source {
                if !settings.sources.contains_key(source) {
                    problems.push(format!(
                        "{}: route {:?}: source {source:?} is not defined in {} (known: {})",
                        settings.routes_file().display(),
                        route.name,
                        settings.settings_file().display(),
                        settings
                            .sources
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let version = fingerprint(&settings);
        Ok(Self {
            settings,
            routes,
            renderer,
            version,
        })
    }

    /// Routes the event and renders every matching route.
    pub fn plan(&self, payload: &Value, meta: &EventMeta) -> Vec<Planned> {
        self.plan_with(&self.renderer, payload.clone(), meta).0
    }

    /// [`Pipeline::plan`] of a payload given by value and handed back
    /// unchanged: the templates' context is built from it without a copy
    /// (ingest, where the copy was a few percent of a webhook's CPU).
    pub fn plan_owned(&self, payload: Value, meta: &EventMeta) -> (Vec<Planned>, Value) {
        self.plan_with(&self.renderer, payload, meta)
    }

    /// Like [`Pipeline::plan`], with one template's text replaced in a
    /// scratch copy of the templates (the console's playground): nothing in
    /// force changes. `Err`: the edited text does not compile.
    pub fn plan_edited(
        &self,
        payload: &Value,
        meta: &EventMeta,
        template: &str,
        text: &str,
    ) -> Result<Vec<Planned>, String> {
        let renderer = self.renderer.with_template(template, text)?;
        Ok(self.plan_with(&renderer, payload.clone(), meta).0)
    }

    fn plan_with(
        &self,
        renderer: &Renderer,
        payload: Value,
        meta: &EventMeta,
    ) -> (Vec<Planned>, Value) {
        let meta = &self.with_configured_business(&payload, meta);
        let routes = self.routes.route(&meta.source, &meta.event_type, &payload);
        let context = EventContext::new(payload, meta);
        let planned = routes
            .into_iter()
            .map(|route| {
                let rendered = renderer.render(route, context.context());
                let (business_id, target) = match &rendered {
                    Ok(r) => (Some(r.business_id), Some(r.target)),
                    Err(_) => renderer.render_ids(route, context.context()),
                };
                Planned {
                    route: route.name.clone(),
                    template: route.template.clone(),
                    rendered,
                    business_id,
                    target,
                }
            })
            .collect();
        (planned, context.into_payload())
    }
}

impl Pipeline {
    /// Routes and renders a stored event again (reload checks).
    pub fn plan_stored(&self, event: &StoredEvent) -> Result<Vec<Planned>, String> {
        let (payload, meta) = stored_context(event)?;
        Ok(self.plan_owned(payload, &meta).0)
    }

    /// Renders a stored event for one route by name, matching or not (an
    /// operator's retry). `None`: the route is gone from routes.toml.
    pub fn render_stored(
        &self,
        event: &StoredEvent,
        route: &str,
    ) -> Option<Result<Rendered, String>> {
        let route = self.routes.routes.iter().find(|r| r.name == route)?;
        Some(stored_context(event).and_then(|(payload, meta)| {
            let meta = self.with_configured_business(&payload, &meta);
            self.renderer
                .render(route, EventContext::new(payload, &meta).context())
        }))
    }
}

impl Pipeline {
    /// The meta with the business `[market.campaigns]` names for the
    /// event's `campaignId`, when it has none yet: so an event whose
    /// campaign was unknown renders once the operator configures it.
    fn with_configured_business(&self, payload: &Value, meta: &EventMeta) -> EventMeta {
        let mut meta = meta.clone();
        let is_market = self
            .settings
            .sources
            .get(&meta.source)
            .is_some_and(|s| s.kind == crate::settings::SourceKind::Market);
        if meta.business_id.is_none() && is_market {
            meta.business_id = payload
                .get("campaignId")
                .and_then(Value::as_i64)
                .and_then(|c| self.settings.market.configured_campaign(c))
                .map(|b| b.0);
        }
        meta
    }
}

fn stored_context(event: &StoredEvent) -> Result<(Value, EventMeta), String> {
    let payload = serde_json::from_str(&event.payload)
        .map_err(|e| format!("the stored event is not JSON: {e}"))?;
    let meta = EventMeta {
        source: event.source.clone(),
        event_type: event.event_type.clone(),
        id: event.external_id.clone(),
        received_at: to_rfc3339(event.received_at),
        business_id: event.business_id.map(|b| b.0),
    };
    Ok((payload, meta))
}

/// Hash of the settings, routes and template files, so two processes (or a
/// reload) can tell whether they run the same configuration.
fn fingerprint(settings: &Settings) -> String {
    let mut hasher = Sha256::new();
    let mut files = vec![settings.settings_file(), settings.routes_file()];
    for dir in [
        settings.templates.dir.clone(),
        settings.templates.dir.join("partials"),
    ] {
        let mut found: Vec<_> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        found.sort();
        files.extend(found);
    }
    for file in files {
        hasher.update(file.to_string_lossy().as_bytes());
        hasher.update(std::fs::read(&file).unwrap_or_default());
    }
    hex(&hasher.finalize()[..6])
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
