//! The Azure AD v2 client-credentials token endpoint and bearer-token checks.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::certificates::{self, RegisteredCertificate};
use super::responses::aad_error;
use super::store::{Caller, Shared};

const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// What is wrong with a token request, in Azure AD's terms.
#[derive(Debug, PartialEq, Eq)]
pub struct TokenRefusal {
    pub status: StatusCode,
    pub error: &'static str,
    pub code: u32,
    pub description: String,
}

fn refuse(status: StatusCode, error: &'static str, code: u32, description: String) -> TokenRefusal {
    TokenRefusal {
        status,
        error,
        code,
        description,
    }
}

/// The app registration the token endpoint signs in: its tenant, id, secret
/// and certificates.
#[derive(Clone, Copy, Debug)]
pub struct AppRegistration<'a> {
    pub tenant_id: &'a str,
    pub client_id: &'a str,
    pub client_secret: &'a str,
    pub certificates: &'a [RegisteredCertificate],
}

/// Checks a client-credentials request sent to `token_url` at `now`
/// (seconds since the epoch) against the app registration.
pub fn check_token_request(
    tenant: &str,
    form: &HashMap<String, String>,
    app: &AppRegistration<'_>,
    token_url: &str,
    now: i64,
) -> Result<Caller, TokenRefusal> {
    let (expected_tenant, expected_client, expected_secret) =
        (app.tenant_id, app.client_id, app.client_secret);
    let field = |name: &str| form.get(name).map(String::as_str).unwrap_or("");
    if !tenant.eq_ignore_ascii_case(expected_tenant) {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            90002,
            format!(
                "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."
            ),
        ));
    }
    match field("grant_type") {
        "client_credentials" => {}
        "" => {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'grant_type'.".into(),
            ));
        }
        other => {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                70003,
                format!("The app requested an unsupported grant type '{other}'."),
            ));
        }
    }
    let client_id = field("client_id");
    if client_id.is_empty() {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900144,
            "The request body must contain the following parameter: 'client_id'.".into(),
        ));
    }
    if client_id != expected_client {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700016,
            format!(
                "Application with identifier '{client_id}' was not found in the directory '{tenant}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant."
            ),
        ));
    }
    let scope = field("scope");
    if !scope.ends_with("/.default") {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            1002012,
            format!(
                "The provided value for scope '{scope}' is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."
            ),
        ));
    }
    let assertion_ok =
        field("client_assertion_type") == JWT_BEARER && !field("client_assertion").is_empty();
    if assertion_ok {
        let expected = certificates::Expected {
            client_id,
            token_url,
            now,
        };
        certificates::check_assertion(field("client_assertion"), app.certificates, expected)
            .map_err(|r| {
                refuse(
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    r.code,
                    r.description,
                )
            })?;
    } else {
        let secret = field("client_secret");
        if secret.is_empty() {
            return Err(refuse(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                7000216,
                "'client_assertion', 'client_secret' or 'request' is required for the 'client_credentials' grant type.".into(),
            ));
        }
        if secret != expected_secret {
            return Err(refuse(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                7000215,
                format!(
                    "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{client_id}'."
                ),
            ));
        }
    }
    Ok(Caller {
        tenant_id: expected_tenant.to_owned(),
        client_id: client_id.to_owned(),
    })
}

/// `POST /{tenant}/oauth2/v2.0/token`.
pub async fn token(
    State(shared): State<Arc<Shared>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    // The endpoint as the client addressed it: what a certificate assertion's `aud` names.
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty())
        .map_or_else(|| shared.local_addr.to_string(), str::to_owned);
    let token_url = format!("http://{host}/{tenant}/oauth2/v2.0/token");
    let mut store = shared.lock();
    if store.token_endpoint_down() {
        // What Azure AD answers while it cannot issue tokens.
        return aad_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            90033,
            "A transient error has occurred. Please try again.",
        );
    }
    let app = AppRegistration {
        tenant_id: &store.config.tenant_id,
        client_id: &store.config.client_id,
        client_secret: &store.config.client_secret,
        certificates: store.certificates(),
    };
    let checked = check_token_request(
        &tenant,
        &form,
        &app,
        &token_url,
        jiff::Timestamp::now().as_second(),
    );
    match checked {
        Ok(caller) => {
            let (token, lifetime) = store.issue_token(caller);
            // Round up so a sub-second scaled lifetime still reads as "1".
            let secs = lifetime.as_secs() + u64::from(lifetime.subsec_nanos() > 0);
            Json(json!({
                "token_type": "Bearer",
                "expires_in": secs,
                "ext_expires_in": secs,
                "access_token": token,
            }))
            .into_response()
        }
        Err(r) => aad_error(r.status, r.error, r.code, &r.description),
    }
}

/// The token of an `Authorization: Bearer ...` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn check(tenant: &str, pairs: &[(&str, &str)]) -> Result<Caller, TokenRefusal> {
        let app = AppRegistration {
            tenant_id: "t",
            client_id: "c",
            client_secret: "s",
            certificates: &[],
        };
        check_token_request(
            tenant,
            &form(pairs),
            &app,
            "http://h/t/oauth2/v2.0/token",
            0,
        )
    }

    const SCOPE: (&str, &str) = ("scope", "https://api.securitycenter.microsoft.com/.default");
    const GRANT: (&str, &str) = ("grant_type", "client_credentials");

    #[test]
    fn accepts_secret_or_assertion() {
        assert!(
            check(
                "t",
                &[GRANT, SCOPE, ("client_id", "c"), ("client_secret", "s")]
            )
            .is_ok()
        );
        assert!(
            check(
                "T",
                &[
                    GRANT,
                    SCOPE,
                    ("client_id", "c"),
                    ("client_assertion_type", JWT_BEARER),
                    ("client_assertion", "eyJ..."),
                ]
            )
            .is_ok()
        );
    }

    #[test]
    fn refusals_carry_azure_ad_codes() {
        let code = |tenant, pairs: &[(&str, &str)]| check(tenant, pairs).unwrap_err().code;
        assert_eq!(
            code(
                "x",
                &[GRANT, SCOPE, ("client_id", "c"), ("client_secret", "s")]
            ),
            90002
        );
        assert_eq!(
            code(
                "t",
                &[GRANT, SCOPE, ("client_id", "d"), ("client_secret", "s")]
            ),
            700016
        );
        assert_eq!(
            code(
                "t",
                &[GRANT, SCOPE, ("client_id", "c"), ("client_secret", "x")]
            ),
            7000215
        );
        assert_eq!(code("t", &[GRANT, SCOPE, ("client_id", "c")]), 7000216);
        assert_eq!(
            code(
                "t",
                &[
                    GRANT,
                    ("scope", "x"),
                    ("client_id", "c"),
                    ("client_secret", "s")
                ]
            ),
            1002012
        );
        let wrong_grant = [("grant_type", "password"), SCOPE, ("client_id", "c")];
        assert_eq!(
            check("t", &wrong_grant).unwrap_err().error,
            "unsupported_grant_type"
        );
    }

    #[test]
    fn bearer_parses_the_scheme_case_insensitively() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "bearer abc".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }
}
