//! Console sessions without server-side storage: a cookie holding its own
//! expiry and a random id, signed with HMAC-SHA256 under a key derived from
//! the admin token. Any instance sharing the configuration accepts it,
//! changing the token ends every session, and logout drops the cookie.
//! The CSRF token of a session is derived from its id under the same key,
//! so it is checked without storage too.

use actix_web::cookie::{Cookie, SameSite};
use actix_web::dev::Payload;
use actix_web::{web, FromRequest, HttpRequest};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::labels::Lang;
use super::UiError;
use crate::clock::Millis;
use crate::state::AppState;

pub const COOKIE: &str = "chatbridge_session";
/// How long a login lasts.
pub const TTL_MS: Millis = 12 * 3600 * 1000;

type HmacSha256 = Hmac<Sha256>;

/// The admin token, or `None` when the admin API (and so the console) is off.
pub fn admin_token(state: &AppState) -> Option<SecretString> {
    state
        .pipeline
        .load()
        .settings
        .admin
        .token
        .clone()
        .filter(|t| !t.expose_secret().is_empty())
}

/// Whether `presented` is the admin token (constant time).
pub fn token_matches(token: &SecretString, presented: &str) -> bool {
    bool::from(token.expose_secret().as_bytes().ct_eq(presented.as_bytes()))
}

fn mac(token: &SecretString, purpose: &str, data: &str) -> Vec<u8> {
    // The session key is derived from the token, never the token itself,
    // so a cookie reveals nothing usable against the admin API.
    let mut key = HmacSha256::new_from_slice(token.expose_secret().as_bytes())
        .expect("HMAC takes a key of any length");
    key.update(b"chatbridge console v1");
    let key = key.finalize().into_bytes();
    let mut m = HmacSha256::new_from_slice(&key).expect("HMAC takes a key of any length");
    m.update(purpose.as_bytes());
    m.update(b"\0");
    m.update(data.as_bytes());
    m.finalize().into_bytes().to_vec()
}

/// A new session cookie's value: `v1.<expiry ms>.<id>.<signature>`.
pub fn issue(token: &SecretString, now: Millis) -> String {
    let id: [u8; 16] = rand::random();
    let body = format!("v1.{}.{}", now + TTL_MS, URL_SAFE_NO_PAD.encode(id));
    let sig = URL_SAFE_NO_PAD.encode(mac(token, "session", &body));
    format!("{body}.{sig}")
}

/// The session id of a valid, unexpired cookie value.
pub fn verify(token: &SecretString, value: &str, now: Millis) -> Option<String> {
    let (body, sig) = value.rsplit_once('.')?;
    let sig = URL_SAFE_NO_PAD.decode(sig).ok()?;
    if !bool::from(mac(token, "session", body).ct_eq(&sig)) {
        return None;
    }
    let mut parts = body.split('.');
    let (Some("v1"), Some(expires), Some(id), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    (expires.parse::<Millis>().ok()? > now).then(|| id.to_owned())
}

pub fn csrf_token(token: &SecretString, session_id: &str) -> String {
    URL_SAFE_NO_PAD.encode(mac(token, "csrf", session_id))
}

/// Whether the request came over HTTPS: the listener's own TLS, or a
/// trusted proxy's `X-Forwarded-Proto` (anyone else could forge it).
pub fn is_https(state: &AppState, req: &HttpRequest) -> bool {
    if req.app_config().secure() {
        return true;
    }
    let trusted = req.peer_addr().is_some_and(|peer| {
        state
            .pipeline
            .load()
            .settings
            .server
            .is_trusted_proxy(peer.ip())
    });
    trusted
        && req
            .headers()
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

/// The session cookie, or with `value = None` the cookie that removes it.
pub fn cookie(value: Option<String>, secure: bool) -> Cookie<'static> {
    let removing = value.is_none();
    let mut c = Cookie::build(COOKIE, value.unwrap_or_default())
        .path("/ui")
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(secure)
        .finish();
    if removing {
        c.make_removal();
    } else {
        c.set_max_age(actix_web::cookie::time::Duration::milliseconds(TTL_MS));
    }
    c
}

/// The page language a request asked for (its cookie), Russian by default.
pub fn lang_of(req: &HttpRequest) -> Lang {
    req.cookie(Lang::COOKIE)
        .and_then(|c| Lang::parse(c.value()))
        .unwrap_or(Lang::Ru)
}

/// A logged-in console user. Extracting it answers 404 when the console
/// is off and sends everyone without a valid session to the login page.
pub struct Session {
    pub lang: Lang,
    pub csrf: String,
    token: SecretString,
    id: String,
}

impl Session {
    /// Refuses a state-changing request whose CSRF token is not this
    /// session's.
    pub fn check_csrf(&self, presented: &str) -> Result<(), UiError> {
        let expected = csrf_token(&self.token, &self.id);
        if !presented.is_empty() && bool::from(expected.as_bytes().ct_eq(presented.as_bytes())) {
            Ok(())
        } else {
            Err(UiError::Csrf)
        }
    }
}

impl FromRequest for Session {
    type Error = UiError;
    type Future = std::future::Ready<Result<Self, UiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        std::future::ready(session_of(req))
    }
}

fn session_of(req: &HttpRequest) -> Result<Session, UiError> {
    let state = req
        .app_data::<web::Data<AppState>>()
        .ok_or_else(|| UiError::Status(500, "the app state is missing".into()))?;
    let token = admin_token(state).ok_or(UiError::Off)?;
    let id = req
        .cookie(COOKIE)
        .and_then(|c| verify(&token, c.value(), state.clock.now_ms()))
        .ok_or(UiError::Login)?;
    Ok(Session {
        lang: lang_of(req),
        csrf: csrf_token(&token, &id),
        token,
        id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(t: &str) -> SecretString {
        t.to_owned().into()
    }

    #[test]
    fn a_session_lives_until_it_expires() {
        let cookie = issue(&token("a"), 1000);
        assert!(verify(&token("a"), &cookie, 1000 + TTL_MS - 1).is_some());
        assert!(verify(&token("a"), &cookie, 1000 + TTL_MS).is_none());
    }

    #[test]
    fn a_new_admin_token_ends_every_session() {
        let cookie = issue(&token("a"), 0);
        assert!(verify(&token("b"), &cookie, 1).is_none());
    }

    #[test]
    fn a_forged_expiry_is_refused() {
        let cookie = issue(&token("a"), 0);
        let (body, sig) = cookie.rsplit_once('.').unwrap();
        let mut parts: Vec<&str> = body.split('.').collect();
        let later = (TTL_MS * 100).to_string();
        parts[1] = &later;
        let forged = format!("{}.{sig}", parts.join("."));
        assert!(verify(&token("a"), &forged, TTL_MS * 2).is_none());
    }
}
