//! Standard Webhooks signatures: `v1,` and the base64 HMAC-SHA256 of
//! `id.timestamp.body` under the webhook's secret, `whsec_` and base64.

use base64::Engine;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use crate::store::{Micros, WebhookRecord};

/// What every secret starts with.
pub const PREFIX: &str = "whsec_";
/// The fewest key bytes a secret may hold.
pub const MIN_KEY: usize = 24;
/// The most key bytes a secret may hold.
pub const MAX_KEY: usize = 64;
/// Key bytes of a generated secret.
const GENERATED_KEY: usize = 32;

/// A new random secret, from the operating system's random source.
pub fn generate() -> Result<String, String> {
    let mut key = [0u8; GENERATED_KEY];
    SystemRandom::new()
        .fill(&mut key)
        .map_err(|_| "the system's random source failed".to_owned())?;
    Ok(format!(
        "{PREFIX}{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    ))
}

/// The key bytes of `secret`, or why it is not one.
pub fn key_of(secret: &str) -> Result<Vec<u8>, String> {
    let encoded = secret.strip_prefix(PREFIX).ok_or_else(|| {
        format!("a secret starts with `{PREFIX}`, followed by the base64 of {MIN_KEY} to {MAX_KEY} random bytes; leave it out to have one generated")
    })?;
    let key = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| format!("the part after `{PREFIX}` must be standard base64"))?;
    if !(MIN_KEY..=MAX_KEY).contains(&key.len()) {
        return Err(format!(
            "the secret holds {} bytes; it must hold {MIN_KEY} to {MAX_KEY}",
            key.len()
        ));
    }
    Ok(key)
}

/// `v1,<signature>` of one message under `key`.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut context = hmac::Context::with_key(&key);
    context.update(id.as_bytes());
    context.update(b".");
    context.update(timestamp.to_string().as_bytes());
    context.update(b".");
    context.update(body);
    let tag = context.sign();
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
    )
}

/// The `webhook-signature` value for a delivery of `webhook` at `now`: the
/// current secret's signature, and during the day after a rotation the
/// previous secret's too, space-separated.
pub fn header(
    webhook: &WebhookRecord,
    id: &str,
    timestamp: i64,
    body: &[u8],
    now: Micros,
) -> Result<String, String> {
    let mut value = sign(&key_of(&webhook.secret)?, id, timestamp, body);
    if let Some((previous, until)) = &webhook.previous_secret {
        if now < *until {
            if let Ok(key) = key_of(previous) {
                value.push(' ');
                value.push_str(&sign(&key, id, timestamp, body));
            }
        }
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::{generate, key_of, sign};

    #[test]
    fn generated_secrets_are_valid_and_distinct() {
        let (a, b) = (generate().expect("random"), generate().expect("random"));
        assert_ne!(a, b);
        assert_eq!(key_of(&a).map(|k| k.len()), Ok(32));
    }

    #[test]
    fn secrets_outside_the_rules_are_refused() {
        assert!(key_of("abc").is_err());
        assert!(key_of("whsec_!!!").is_err());
        assert!(key_of("whsec_c2hvcnQ=").is_err(), "5 bytes is too short");
    }

    #[test]
    fn the_signature_covers_id_timestamp_and_body() {
        let key = [7u8; 32];
        let base = sign(&key, "msg_1", 10, b"{}");
        assert!(base.starts_with("v1,"));
        assert_ne!(base, sign(&key, "msg_2", 10, b"{}"));
        assert_ne!(base, sign(&key, "msg_1", 11, b"{}"));
        assert_ne!(base, sign(&key, "msg_1", 10, b"{ }"));
    }
}
