//! `/ui/`: the web console, on the same HTTP server as the admin API and
//! behind the same token (a login form and a signed session cookie, see
//! [`session`]). Pages are rendered on the server by askama templates
//! compiled into the binary, which escape everything by default (the chat
//! renderer, which does not escape, is never used for pages); the
//! stylesheet and a small script are embedded too and served from here, so
//! a strict Content-Security-Policy allows nothing from elsewhere and no
//! inline script. Every action that changes something is a POST carrying
//! the session's CSRF token. The data and the actions are the admin API's
//! own functions and store queries.

mod deliveries;
mod labels;
mod overview;
mod playground;
mod session;

use actix_web::dev::HttpServiceFactory;
use actix_web::http::header::{self, ContentType};
use actix_web::http::StatusCode;
use actix_web::middleware::DefaultHeaders;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use askama::Template;
use serde::Deserialize;

use crate::api_error::ApiError;
use crate::clock::Millis;
use crate::state::AppState;
use labels::{Labels, Lang};
use session::Session;

/// Scripts and styles only from this server, no inline script, no framing.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'";

pub fn scope() -> impl HttpServiceFactory {
    web::scope("/ui")
        .wrap(
            DefaultHeaders::new()
                .add((header::CONTENT_SECURITY_POLICY, CSP))
                .add((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
                .add((header::X_FRAME_OPTIONS, "DENY"))
                .add((header::REFERRER_POLICY, "same-origin"))
                .add((header::CACHE_CONTROL, "no-store")),
        )
        .route("", web::get().to(to_root))
        .route("/", web::get().to(overview::page))
        .route("/login", web::get().to(login_form))
        .route("/login", web::post().to(login))
        .route("/logout", web::post().to(logout))
        .route("/lang/{code}", web::get().to(set_lang))
        .route("/static/console.css", web::get().to(stylesheet))
        .route("/static/console.js", web::get().to(script))
        .route("/deliveries", web::get().to(deliveries::list))
        .route(
            "/deliveries/retry",
            web::get().to(deliveries::retry_preview),
        )
        .route(
            "/deliveries/retry",
            web::post().to(deliveries::retry_matching),
        )
        .route("/deliveries/{id}", web::get().to(deliveries::show))
        .route("/deliveries/{id}/retry", web::post().to(deliveries::retry))
        .route(
            "/deliveries/{id}/cancel",
            web::post().to(deliveries::cancel),
        )
        .route("/playground", web::get().to(playground::page))
        .route("/playground", web::post().to(playground::run))
        .default_service(web::to(not_found))
}

/// Why a console request did not get its page.
#[derive(Debug)]
pub enum UiError {
    /// The admin API is off, so is the console: 404 as for any unknown path.
    Off,
    /// No valid session: to the login page.
    Login,
    /// A POST without this session's CSRF token.
    Csrf,
    Status(u16, String),
}

impl std::fmt::Display for UiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Off => f.write_str("the console is off: set admin.token"),
            Self::Login => f.write_str("log in first"),
            Self::Csrf => f.write_str("missing or wrong CSRF token: reload the page and try again"),
            Self::Status(_, message) => f.write_str(message),
        }
    }
}

impl From<ApiError> for UiError {
    fn from(e: ApiError) -> Self {
        Self::Status(e.status.as_u16(), e.message)
    }
}

impl From<crate::store::StoreError> for UiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::from(e).into()
    }
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    status: u16,
    message: &'a str,
}

impl ResponseError for UiError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::Off => StatusCode::NOT_FOUND,
            Self::Login => StatusCode::SEE_OTHER,
            Self::Csrf => StatusCode::FORBIDDEN,
            Self::Status(code, _) => {
                StatusCode::from_u16(*code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            }
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let Self::Login = self {
            return redirect("/ui/login");
        }
        let status = self.status_code();
        let message = self.to_string();
        html(
            status,
            ErrorPage {
                status: status.as_u16(),
                message: &message,
            },
        )
    }
}

/// What every page around its content needs: words, the CSRF token for
/// its forms, the current section.
pub struct Chrome {
    pub l: &'static Labels,
    pub csrf: String,
    pub section: &'static str,
}

impl Chrome {
    fn new(session: &Session, section: &'static str) -> Self {
        Self {
            l: session.lang.labels(),
            csrf: session.csrf.clone(),
            section,
        }
    }
}

fn html(status: StatusCode, page: impl Template) -> HttpResponse {
    match page.render() {
        Ok(body) => HttpResponse::build(status)
            .content_type(ContentType::html())
            .body(body),
        Err(e) => {
            tracing::error!(error = %e, "a console page did not render");
            HttpResponse::InternalServerError()
                .content_type(ContentType::plaintext())
                .body("internal error; the cause is in the service log")
        }
    }
}

fn ok_page(content: impl Template) -> HttpResponse {
    html(StatusCode::OK, content)
}

fn redirect(to: &str) -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, to))
        .finish()
}

/// "2026-11-25 10:00:00 UTC".
fn show_time(ms: Millis) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_default()
}

/// An RFC 3339 time from the store, shown as [`show_time`] does.
fn show_rfc3339(text: &str) -> String {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| show_time(t.timestamp_millis()))
        .unwrap_or_else(|_| text.to_owned())
}

async fn to_root(state: web::Data<AppState>) -> Result<HttpResponse, UiError> {
    session::admin_token(&state).ok_or(UiError::Off)?;
    Ok(redirect("/ui/"))
}

async fn not_found(state: web::Data<AppState>) -> Result<HttpResponse, UiError> {
    session::admin_token(&state).ok_or(UiError::Off)?;
    Err(UiError::Status(404, "no such page in the console".into()))
}

const CSS: &str = include_str!("static/console.css");
const JS: &str = include_str!("static/console.js");

async fn stylesheet(state: web::Data<AppState>) -> Result<HttpResponse, UiError> {
    session::admin_token(&state).ok_or(UiError::Off)?;
    Ok(HttpResponse::Ok()
        .content_type("text/css; charset=utf-8")
        .body(CSS))
}

async fn script(state: web::Data<AppState>) -> Result<HttpResponse, UiError> {
    session::admin_token(&state).ok_or(UiError::Off)?;
    Ok(HttpResponse::Ok()
        .content_type("text/javascript; charset=utf-8")
        .body(JS))
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    l: &'static Labels,
    failed: bool,
}

async fn login_form(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, UiError> {
    session::admin_token(&state).ok_or(UiError::Off)?;
    Ok(ok_page(LoginPage {
        l: session::lang_of(&req).labels(),
        failed: false,
    }))
}

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    token: String,
}

async fn login(
    state: web::Data<AppState>,
    req: HttpRequest,
    form: web::Form<LoginForm>,
) -> Result<HttpResponse, UiError> {
    let token = session::admin_token(&state).ok_or(UiError::Off)?;
    if !session::token_matches(&token, form.token.trim()) {
        tracing::warn!("console login refused: wrong admin token");
        return Ok(html(
            StatusCode::UNAUTHORIZED,
            LoginPage {
                l: session::lang_of(&req).labels(),
                failed: true,
            },
        ));
    }
    let value = session::issue(&token, state.clock.now_ms());
    let mut response = redirect("/ui/");
    response
        .add_cookie(&session::cookie(
            Some(value),
            session::is_https(&state, &req),
        ))
        .map_err(|e| UiError::Status(500, e.to_string()))?;
    Ok(response)
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn logout(
    state: web::Data<AppState>,
    req: HttpRequest,
    session: Session,
    form: web::Form<CsrfForm>,
) -> Result<HttpResponse, UiError> {
    session.check_csrf(&form.csrf)?;
    let mut response = redirect("/ui/login");
    response
        .add_cookie(&session::cookie(None, session::is_https(&state, &req)))
        .map_err(|e| UiError::Status(500, e.to_string()))?;
    Ok(response)
}

/// Switches the page language (a preference cookie, nothing else) and
/// goes back to the page it was asked from.
async fn set_lang(
    state: web::Data<AppState>,
    req: HttpRequest,
    code: web::Path<String>,
) -> Result<HttpResponse, UiError> {
    session::admin_token(&state).ok_or(UiError::Off)?;
    let lang = Lang::parse(&code).unwrap_or(Lang::Ru);
    // Only back to a console page: never an open redirect.
    let back = req
        .headers()
        .get(header::REFERER)
        .and_then(|v| v.to_str().ok())
        .and_then(|r| r.find("/ui/").map(|at| r[at..].to_owned()))
        .filter(|p| !p.starts_with("/ui/lang/"))
        .unwrap_or_else(|| "/ui/".into());
    let mut response = redirect(&back);
    let cookie = actix_web::cookie::Cookie::build(Lang::COOKIE, labels_code(lang))
        .path("/ui")
        .same_site(actix_web::cookie::SameSite::Strict)
        .max_age(actix_web::cookie::time::Duration::days(365))
        .finish();
    response
        .add_cookie(&cookie)
        .map_err(|e| UiError::Status(500, e.to_string()))?;
    Ok(response)
}

fn labels_code(lang: Lang) -> &'static str {
    lang.labels().lang
}
