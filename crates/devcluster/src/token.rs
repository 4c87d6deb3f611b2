//! The `token` subresource of ServiceAccounts (`POST .../serviceaccounts/{name}/token`):
//! an `authentication.k8s.io/v1` `TokenRequest` answered with a JWT-shaped token
//! carrying kube-apiserver's claims, for clients that exchange it elsewhere
//! (Microsoft Entra Workload ID's `api://AzureADTokenExchange`).
//!
//! The signature is random bytes: nothing here (or anywhere) can verify it, and
//! there is no `TokenReview`. `boundObjectRef` is echoed but not looked up or
//! put in the claims.

use super::ops::Shared;
use super::registry::ResourceType;
use super::state::now;
use super::status::{ApiError, Cause};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value, json};
use std::sync::OnceLock;

/// The issuer of the tokens, and the audience of those that ask for none (kube-apiserver's defaults).
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const GROUP: &str = "authentication.k8s.io";
const API_VERSION: &str = "authentication.k8s.io/v1";
const KIND: &str = "TokenRequest";
/// `spec.expirationSeconds` when the request has none.
const DEFAULT_EXPIRATION: i64 = 3600;
/// kube-apiserver refuses shorter tokens (`may not specify a duration less than 10 minutes`).
const MIN_EXPIRATION: i64 = 600;
const MAX_EXPIRATION: i64 = 1 << 32;

/// A body field of the wrong JSON type, worded like kube-apiserver's decoding error.
fn undecodable(field: &str, found: &Value, want: &str) -> ApiError {
    let found = match found {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    ApiError::bad_request(format!(
        "TokenRequest in version \"v1\" cannot be handled as a TokenRequest: json: cannot unmarshal {found} into Go struct field {field} of type {want}"
    ))
}

fn invalid(name: &str, field: &str, message: String) -> ApiError {
    ApiError::invalid(
        GROUP,
        KIND,
        name,
        vec![Cause {
            reason: "FieldValueInvalid",
            message,
            field: field.into(),
        }],
    )
}

/// The request's `spec`, checked as kube-apiserver decodes it: `(audiences, expirationSeconds)`.
fn read_spec(body: &Value) -> Result<(Vec<String>, Option<i64>), ApiError> {
    let spec = match body.get("spec") {
        None | Some(Value::Null) => return Ok((Vec::new(), None)),
        Some(spec @ Value::Object(_)) => spec,
        Some(other) => {
            return Err(undecodable(
                "TokenRequest.spec",
                other,
                "v1.TokenRequestSpec",
            ));
        }
    };
    let audiences = match spec.get("audiences") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|a| {
                a.as_str()
                    .map(String::from)
                    .ok_or_else(|| undecodable("TokenRequestSpec.spec.audiences", a, "string"))
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(undecodable(
                "TokenRequestSpec.spec.audiences",
                other,
                "[]string",
            ));
        }
    };
    let expiration = match spec.get("expirationSeconds") {
        None | Some(Value::Null) => None,
        Some(value) => Some(value.as_i64().ok_or_else(|| {
            undecodable("TokenRequestSpec.spec.expirationSeconds", value, "int64")
        })?),
    };
    Ok((audiences, expiration))
}

/// The `kid` every token names: one signing key per process, as one per API server.
fn key_id() -> &'static str {
    static KID: OnceLock<String> = OnceLock::new();
    KID.get_or_init(|| URL_SAFE_NO_PAD.encode(random_bytes(32)))
}

fn random_bytes(n: usize) -> Vec<u8> {
    use rand::Rng;
    let mut bytes = vec![0u8; n];
    rand::rng().fill(&mut bytes[..]);
    bytes
}

/// A JWT-shaped token (`header.payload.signature`, base64url) with a random RS256-sized signature.
fn jwt(claims: &Value) -> String {
    let header = json!({"alg": "RS256", "kid": key_id()});
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode(random_bytes(256))
    )
}

/// `POST .../serviceaccounts/{name}/token`: the TokenRequest as sent, with defaults, metadata and `status`.
pub fn create(
    shared: &Shared,
    rt: &ResourceType,
    namespace: &str,
    name: &str,
    body: &Value,
) -> Result<Value, ApiError> {
    if !body.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON or YAML TokenRequest object",
        ));
    }
    if let Some(version) = body.get("apiVersion").and_then(Value::as_str)
        && version != API_VERSION
    {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({version}) does not match the expected API version ({API_VERSION})"
        )));
    }
    if let Some(kind) = body.get("kind").and_then(Value::as_str)
        && kind != KIND
    {
        return Err(ApiError::bad_request(format!(
            "the kind of the provided object ({kind}) does not match the resource ({KIND})"
        )));
    }
    let mut metadata = match body.get("metadata") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(meta)) => meta.clone(),
        Some(other) => {
            return Err(undecodable("TokenRequest.metadata", other, "v1.ObjectMeta"));
        }
    };
    let (mut audiences, expiration) = read_spec(body)?;
    let meta_text = |field: &str| {
        metadata
            .get(field)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(String::from)
    };
    if let Some(body_name) = meta_text("name")
        && body_name != name
    {
        return Err(invalid(
            name,
            "metadata.name",
            format!(
                "Invalid value: {body_name:?}: must match the service account name if specified"
            ),
        ));
    }
    if let Some(body_ns) = meta_text("namespace")
        && body_ns != namespace
    {
        return Err(invalid(
            name,
            "metadata.namespace",
            format!(
                "Invalid value: {body_ns:?}: must match the service account namespace if specified"
            ),
        ));
    }
    let account = shared.get(rt, Some(namespace), name)?;
    let expiration = expiration.unwrap_or(DEFAULT_EXPIRATION);
    if expiration < MIN_EXPIRATION {
        return Err(invalid(
            "",
            "spec.expirationSeconds",
            format!("Invalid value: {expiration}: may not specify a duration less than 10 minutes"),
        ));
    }
    if expiration > MAX_EXPIRATION {
        return Err(invalid(
            "",
            "spec.expirationSeconds",
            format!(
                "Invalid value: {expiration}: may not specify a duration larger than 2^32 seconds"
            ),
        ));
    }
    if audiences.is_empty() {
        audiences = vec![ISSUER.to_string()];
    }

    let created = now();
    let issued_at = created
        .parse::<jiff::Timestamp>()
        .map_or_else(|_| jiff::Timestamp::now().as_second(), |t| t.as_second());
    let expires_at = issued_at + expiration;
    let claims = json!({
        "aud": audiences,
        "exp": expires_at,
        "iat": issued_at,
        "iss": ISSUER,
        "jti": uuid::Uuid::new_v4().to_string(),
        "kubernetes.io": {
            "namespace": namespace,
            "serviceaccount": {"name": name, "uid": account["metadata"]["uid"]},
        },
        "nbf": issued_at,
        "sub": format!("system:serviceaccount:{namespace}:{name}"),
    });
    let expiration_timestamp = jiff::Timestamp::from_second(expires_at)
        .map(|t| t.to_string())
        .unwrap_or_default();

    metadata.insert("name".into(), name.into());
    metadata.insert("namespace".into(), namespace.into());
    metadata.insert("creationTimestamp".into(), created.into());
    let mut spec = body
        .get("spec")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    spec.insert("audiences".into(), json!(audiences));
    spec.insert("expirationSeconds".into(), expiration.into());
    if spec.get("boundObjectRef").is_some_and(Value::is_null) {
        spec.remove("boundObjectRef");
    }
    Ok(json!({
        "kind": KIND,
        "apiVersion": API_VERSION,
        "metadata": metadata,
        "spec": spec,
        "status": {"token": jwt(&claims), "expirationTimestamp": expiration_timestamp},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_three_base64url_parts() {
        let token = jwt(&json!({"sub": "system:serviceaccount:default:x"}));
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let claims: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims["sub"], "system:serviceaccount:default:x");
        assert_eq!(URL_SAFE_NO_PAD.decode(parts[2]).unwrap().len(), 256);
    }

    #[test]
    fn spec_fields_of_the_wrong_type_are_bad_requests() {
        assert_eq!(read_spec(&json!({})).unwrap(), (vec![], None));
        let error = read_spec(&json!({"spec": {"expirationSeconds": "1h"}})).unwrap_err();
        assert_eq!((error.code, error.reason), (400, "BadRequest"));
        assert_eq!(
            read_spec(&json!({"spec": {"audiences": "a"}}))
                .unwrap_err()
                .code,
            400
        );
    }
}
