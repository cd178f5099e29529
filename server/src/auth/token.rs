//! Token text: making one, hashing it, and finding it in the credentials clients send.

use base64::Engine as _;
use sha2::{Digest, Sha256};

/// What every Kiln token starts with, so a leaked one is recognisable (secret scanners).
pub const PREFIX: &str = "kiln_";

/// A new token: [`PREFIX`] and 256 random bits as 64 hex digits.
pub fn generate() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let mut token = String::with_capacity(PREFIX.len() + 64);
    token.push_str(PREFIX);
    for b in bytes {
        token.push_str(&format!("{b:02x}"));
    }
    token
}

/// Hex SHA-256 of a token's text: what the catalog keeps. A token has 256 random bits, so
/// a fast hash is as strong as a slow one against guessing.
pub fn hash(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// The token in an `Authorization` header value: `Bearer <token>`, `Token <token>`
/// (InfluxDB v2 clients, Telegraf) or `Basic base64(user:token)` (the password is the
/// token; with an empty password, the user name is). `None` for anything else.
pub fn from_authorization(value: &str) -> Option<String> {
    let value = value.trim();
    let (scheme, rest) = value.split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("token") {
        return Some(rest.to_owned());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        // Padded or not: Go's Flight client (ADBC) sends it without padding.
        let engine = base64::engine::GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            base64::engine::GeneralPurposeConfig::new()
                .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
        );
        let decoded = engine.decode(rest).ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (user, password) = decoded.split_once(':').unwrap_or((&decoded, ""));
        return Some(if password.is_empty() { user } else { password }.to_owned());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_prefixed_random_and_hashed_consistently() {
        let a = generate();
        let b = generate();
        assert!(a.starts_with(PREFIX) && a.len() == PREFIX.len() + 64, "{a}");
        assert!(a[PREFIX.len()..].bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        assert_eq!(hash(&a), hash(&a));
        assert_ne!(hash(&a), hash(&b));
        assert_eq!(
            hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn credentials_in_every_scheme_clients_send() {
        assert_eq!(
            from_authorization("Bearer kiln_x").as_deref(),
            Some("kiln_x")
        );
        assert_eq!(
            from_authorization("bearer  kiln_x ").as_deref(),
            Some("kiln_x")
        );
        assert_eq!(
            from_authorization("Token kiln_x").as_deref(),
            Some("kiln_x")
        );
        // Basic: user:token, or the token as user name with no password.
        let basic = |s: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(s)
            )
        };
        assert_eq!(
            from_authorization(&basic("telegraf:kiln_x")).as_deref(),
            Some("kiln_x")
        );
        assert_eq!(
            from_authorization(&basic("kiln_x:")).as_deref(),
            Some("kiln_x")
        );
        assert_eq!(
            from_authorization(&basic("kiln_x")).as_deref(),
            Some("kiln_x")
        );
        let unpadded = base64::engine::general_purpose::STANDARD_NO_PAD.encode("u:kiln_xy");
        assert_eq!(
            from_authorization(&format!("Basic {unpadded}")).as_deref(),
            Some("kiln_xy")
        );
        assert_eq!(from_authorization("Basic !!!"), None);
        assert_eq!(from_authorization("Digest abc"), None);
        assert_eq!(from_authorization("kiln_x"), None);
    }
}
