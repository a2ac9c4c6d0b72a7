//! Who may post an event: a Standard Webhooks signature (HMAC-SHA256 over
//! `id.timestamp.body`, `whsec_` secrets, `v1,` signatures, several allowed
//! for rotation, timestamps within ±5 minutes) or a bearer token. Every
//! comparison is constant-time.

use base64::Engine;
use hmac::{Hmac, Mac};
use secrecy::ExposeSecret;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::clock::Millis;
use crate::settings::{decode_webhook_secret, SourceSettings};

/// How far a webhook's timestamp may be from our clock.
pub const TOLERANCE_SECS: i64 = 5 * 60;

/// The headers a verification reads.
#[derive(Debug, Default, Clone, Copy)]
pub struct AuthHeaders<'a> {
    pub webhook_id: Option<&'a str>,
    pub webhook_timestamp: Option<&'a str>,
    pub webhook_signature: Option<&'a str>,
    pub authorization: Option<&'a str>,
}

/// Why a request was refused; the message tells the sender what to fix
/// and never echoes a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing {0} header (Standard Webhooks signature required)")]
    MissingHeader(&'static str),
    #[error("webhook-timestamp is not a Unix time in seconds")]
    BadTimestamp,
    #[error("webhook-timestamp is more than 5 minutes away from the server's clock")]
    StaleTimestamp,
    #[error("no valid v1 signature in webhook-signature")]
    BadSignature,
    #[error("missing or wrong Authorization: Bearer token")]
    BadToken,
}

/// Checks the request against the source's secrets or tokens.
pub fn verify(
    source: &SourceSettings,
    headers: AuthHeaders<'_>,
    body: &[u8],
    now: Millis,
) -> Result<(), AuthError> {
    if let Some(secrets) = source.secret.as_ref().filter(|s| !s.is_empty()) {
        let keys: Vec<Vec<u8>> = secrets
            .0
            .iter()
            .filter_map(|s| decode_webhook_secret(s.expose_secret()).ok())
            .collect();
        return verify_signature(&keys, headers, body, now);
    }
    if let Some(tokens) = source.token.as_ref().filter(|t| !t.is_empty()) {
        let presented = headers
            .authorization
            .and_then(|h| {
                h.split_once(' ')
                    .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                    .map(|(_, t)| t)
            })
            .ok_or(AuthError::BadToken)?;
        let mut ok = subtle::Choice::from(0);
        for token in &tokens.0 {
            ok |= token.expose_secret().as_bytes().ct_eq(presented.as_bytes());
        }
        return if bool::from(ok) {
            Ok(())
        } else {
            Err(AuthError::BadToken)
        };
    }
    // Validation at start refuses a source with neither unless insecure = true.
    Ok(())
}

/// Standard Webhooks verification against any of `keys`.
pub fn verify_signature(
    keys: &[Vec<u8>],
    headers: AuthHeaders<'_>,
    body: &[u8],
    now: Millis,
) -> Result<(), AuthError> {
    let id = headers
        .webhook_id
        .ok_or(AuthError::MissingHeader("webhook-id"))?;
    let timestamp = headers
        .webhook_timestamp
        .ok_or(AuthError::MissingHeader("webhook-timestamp"))?;
    let signatures = headers
        .webhook_signature
        .ok_or(AuthError::MissingHeader("webhook-signature"))?;
    let seconds: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| AuthError::BadTimestamp)?;
    if (now / 1000).abs_diff(seconds) > TOLERANCE_SECS as u64 {
        return Err(AuthError::StaleTimestamp);
    }
    let presented: Vec<Vec<u8>> = signatures
        .split(' ')
        .filter_map(|s| s.strip_prefix("v1,"))
        .filter_map(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
        .collect();
    let mut ok = subtle::Choice::from(0);
    for key in keys {
        let expected = sign_raw(key, id, timestamp.trim(), body);
        for candidate in &presented {
            ok |= expected.as_slice().ct_eq(candidate.as_slice());
        }
    }
    if bool::from(ok) {
        Ok(())
    } else {
        Err(AuthError::BadSignature)
    }
}

fn sign_raw(key: &[u8], id: &str, timestamp: &str, body: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().to_vec()
}

/// The `webhook-signature` value for a body: what senders (the demo, tests,
/// the benchmark) put on their requests.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> Result<String, String> {
    let key = decode_webhook_secret(secret)?;
    let mac = sign_raw(&key, id, &timestamp.to_string(), body);
    Ok(format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TS: i64 = 1614265330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn headers<'a>(ts: &'a str, sig: &'a str) -> AuthHeaders<'a> {
        AuthHeaders {
            webhook_id: Some(ID),
            webhook_timestamp: Some(ts),
            webhook_signature: Some(sig),
            authorization: None,
        }
    }

    #[test]
    fn the_specs_test_vector_passes() {
        assert_eq!(sign(SECRET, ID, TS, BODY).unwrap(), SIGNATURE);
        let key = decode_webhook_secret(SECRET).unwrap();
        let ts = TS.to_string();
        assert_eq!(
            verify_signature(
                std::slice::from_ref(&key),
                headers(&ts, SIGNATURE),
                BODY,
                TS * 1000
            ),
            Ok(())
        );
        let several = format!("v1,bm9wZQ== v2,xyz {SIGNATURE}");
        assert_eq!(
            verify_signature(&[key], headers(&ts, &several), BODY, TS * 1000),
            Ok(())
        );
    }

    #[test]
    fn stale_or_tampered_requests_fail() {
        let key = decode_webhook_secret(SECRET).unwrap();
        let ts = TS.to_string();
        assert_eq!(
            verify_signature(
                std::slice::from_ref(&key),
                headers(&ts, SIGNATURE),
                BODY,
                (TS + 301) * 1000
            ),
            Err(AuthError::StaleTimestamp)
        );
        assert_eq!(
            verify_signature(
                &[key],
                headers(&ts, SIGNATURE),
                br#"{"test": 1}"#,
                TS * 1000
            ),
            Err(AuthError::BadSignature)
        );
    }
}
