//! Admission checks at upgrade time: the origin allowlist and JWT tokens.
//!
//! Browsers cannot set headers on a WebSocket, so a token is taken, in this
//! order, from `Authorization: Bearer …`, the `token` query parameter, or
//! `Sec-WebSocket-Protocol: bearer, <token>` (the router then selects the
//! `bearer` subprotocol, as browsers require). HS256 and RS256 are accepted;
//! `exp` is required; `iss`/`aud` are checked when configured. Verified
//! claims are forwarded to workers in the connect event.

use std::{collections::BTreeMap, fmt};

use axum::http::HeaderMap;
use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, Validation};
use serde_json::Value;

/// Token settings of a route.
#[derive(Clone)]
pub struct AuthPolicy {
    /// Refuse connections without a valid token. When `false`, a token is
    /// still verified if present (an invalid one is refused) and its claims
    /// forwarded.
    pub required: bool,
    pub hs256: Option<DecodingKey>,
    pub rs256: Option<DecodingKey>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp`/`nbf`, in seconds.
    pub leeway_s: u64,
}

impl fmt::Debug for AuthPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.debug_struct("AuthPolicy")
            .field("required", &self.required)
            .field("hs256", &self.hs256.is_some())
            .field("rs256", &self.rs256.is_some())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

impl PartialEq for AuthPolicy {
    fn eq(&self, other: &Self) -> bool {
        // Keys cannot be compared; a reload that changes only a key counts as unchanged
        // for change logging, which is harmless: the new policy is applied anyway.
        self.required == other.required
            && self.hs256.is_some() == other.hs256.is_some()
            && self.rs256.is_some() == other.rs256.is_some()
            && self.issuer == other.issuer
            && self.audience == other.audience
            && self.leeway_s == other.leeway_s
    }
}

/// Where the token was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    Header,
    Query,
    Subprotocol,
}

/// Finds the client's token, if any.
pub fn find_token(
    headers: &HeaderMap,
    query: &BTreeMap<String, String>,
) -> Option<(String, TokenSource)> {
    if let Some(v) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let mut parts = v.splitn(2, ' ');
        if parts
            .next()
            .is_some_and(|s| s.eq_ignore_ascii_case("bearer"))
        {
            if let Some(t) = parts.next().map(str::trim).filter(|t| !t.is_empty()) {
                return Some((t.to_owned(), TokenSource::Header));
            }
        }
    }
    if let Some(t) = query.get("token").filter(|t| !t.is_empty()) {
        return Some((t.clone(), TokenSource::Query));
    }
    subprotocol_token(headers).map(|t| (t, TokenSource::Subprotocol))
}

/// `Sec-WebSocket-Protocol: bearer, <token>` → the token.
fn subprotocol_token(headers: &HeaderMap) -> Option<String> {
    let protocols: Vec<&str> = headers
        .get_all(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let at = protocols
        .iter()
        .position(|p| p.eq_ignore_ascii_case("bearer"))?;
    protocols.get(at + 1).map(|t| (*t).to_owned())
}

/// Verifies a token and returns its claims, or a sentence saying why not.
pub fn verify(policy: &AuthPolicy, token: &str) -> Result<Value, String> {
    let header = jsonwebtoken::decode_header(token)
        .map_err(|e| format!("token is not a well-formed JWT: {e}"))?;
    let key = match header.alg {
        Algorithm::HS256 => policy.hs256.as_ref(),
        Algorithm::RS256 => policy.rs256.as_ref(),
        other => {
            return Err(format!(
                "token algorithm {other:?} is not accepted (HS256 or RS256)"
            ))
        }
    }
    .ok_or_else(|| {
        format!(
            "token algorithm {:?} is not configured for this route",
            header.alg
        )
    })?;
    let mut validation = Validation::new(header.alg);
    validation.leeway = policy.leeway_s;
    validation.validate_aud = policy.audience.is_some();
    if let Some(aud) = &policy.audience {
        validation.set_audience(&[aud]);
    }
    if let Some(iss) = &policy.issuer {
        validation.set_issuer(&[iss]);
    }
    jsonwebtoken::decode::<Value>(token, key, &validation)
        .map(|data| data.claims)
        .map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => "token has expired".to_owned(),
            ErrorKind::ImmatureSignature => "token is not valid yet (nbf)".to_owned(),
            ErrorKind::InvalidSignature => "token signature is invalid".to_owned(),
            ErrorKind::InvalidIssuer => "token issuer is not accepted".to_owned(),
            ErrorKind::InvalidAudience => "token audience is not accepted".to_owned(),
            ErrorKind::MissingRequiredClaim(c) => format!("token lacks the required `{c}` claim"),
            _ => format!("token rejected: {e}"),
        })
}

/// Checks the `Origin` header against an allowlist (`None` = any origin).
/// Requests without `Origin` come from non-browser clients, which the
/// allowlist does not concern (it protects browsers from other sites), so
/// they pass.
pub fn check_origin(allowed: Option<&[String]>, origin: Option<&str>) -> Result<(), String> {
    let (Some(allowed), Some(origin)) = (allowed, origin) else {
        return Ok(());
    };
    if allowed
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
    {
        Ok(())
    } else {
        Err(format!("origin {origin} is not in the allowlist"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    fn policy() -> AuthPolicy {
        AuthPolicy {
            required: true,
            hs256: Some(DecodingKey::from_secret(b"secret")),
            rs256: None,
            issuer: Some("issuer".into()),
            audience: None,
            leeway_s: 0,
        }
    }

    fn token(claims: Value, secret: &[u8]) -> String {
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn verification_table() {
        let p = policy();
        let good = token(
            json!({"sub":"u1","iss":"issuer","exp": now() + 60}),
            b"secret",
        );
        assert_eq!(verify(&p, &good).unwrap()["sub"], "u1");
        for (tok, fragment) in [
            (
                token(
                    json!({"sub":"u1","iss":"issuer","exp": now() - 60}),
                    b"secret",
                ),
                "expired",
            ),
            (
                token(
                    json!({"sub":"u1","iss":"issuer","exp": now() + 60}),
                    b"other",
                ),
                "signature",
            ),
            (
                token(
                    json!({"sub":"u1","iss":"evil","exp": now() + 60}),
                    b"secret",
                ),
                "issuer",
            ),
            (token(json!({"sub":"u1","iss":"issuer"}), b"secret"), "exp"),
            ("not.a.jwt".to_owned(), "well-formed"),
        ] {
            let err = verify(&p, &tok).unwrap_err();
            assert!(err.contains(fragment), "{err}");
        }
    }

    #[test]
    fn tokens_are_found_in_header_query_and_subprotocol() {
        let mut h = HeaderMap::new();
        let q = BTreeMap::new();
        assert_eq!(find_token(&h, &q), None);
        h.insert(
            "sec-websocket-protocol",
            "bearer, abc.def.ghi".parse().unwrap(),
        );
        assert_eq!(
            find_token(&h, &q),
            Some(("abc.def.ghi".into(), TokenSource::Subprotocol))
        );
        let q = BTreeMap::from([("token".to_string(), "qqq".to_string())]);
        assert_eq!(find_token(&h, &q), Some(("qqq".into(), TokenSource::Query)));
        h.insert("authorization", "Bearer hhh".parse().unwrap());
        assert_eq!(
            find_token(&h, &q),
            Some(("hhh".into(), TokenSource::Header))
        );
    }

    #[test]
    fn origins() {
        let allowed = vec!["https://app.example.com".to_string()];
        assert!(check_origin(Some(&allowed), Some("https://app.example.com")).is_ok());
        let err = check_origin(Some(&allowed), Some("https://evil.example")).unwrap_err();
        assert!(err.contains("https://evil.example"));
        assert!(check_origin(Some(&allowed), None).is_ok());
        assert!(check_origin(None, Some("https://any")).is_ok());
        assert!(check_origin(Some(&["*".to_string()]), Some("https://any")).is_ok());
    }
}
