//! Sign-in to Microsoft Entra ID with the OAuth2 client-credentials grant.
//!
//! Written by hand rather than with `azure_identity`: the two token requests
//! (client secret, federated client assertion) are a single form POST each,
//! the SDK insists on https authorities (our simulator is plain-http loopback),
//! does not read `AZURE_CLIENT_SECRET_FILE`, and brings a large dependency tree.

use super::error::{BodyError, MdeError, error_chain, read_capped};
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use tokio::time::Instant;
use url::Url;

/// A string that never shows itself in Debug or Display output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// How the app proves who it is.
#[derive(Clone, Debug)]
pub enum Credential {
    /// `AZURE_CLIENT_SECRET`.
    ClientSecret(Secret),
    /// `AZURE_CLIENT_SECRET_FILE`, re-read at every refresh so rotation needs no restart.
    ClientSecretFile(PathBuf),
    /// `AZURE_FEDERATED_TOKEN_FILE` (workload identity), re-read at every refresh:
    /// the kubelet rotates the projected token.
    FederatedTokenFile(PathBuf),
    /// Fetched afresh at every sign-in from where the caller keeps it (a
    /// Kubernetes Secret, a ServiceAccount token request).
    Fetched(Arc<dyn CredentialSource>),
}

/// What a [`CredentialSource`] hands over for one sign-in.
pub enum FetchedCredential {
    ClientSecret(Secret),
    /// A federated token (workload identity) sent as `client_assertion`.
    ClientAssertion(Secret),
    /// PEM text holding the app's certificate and its RSA private key: the
    /// client signs a fresh assertion with it for each sign-in, in the form
    /// Entra's current page asks for ([`CertificateAssertion::Ps256`]).
    Certificate(Secret),
    /// As [`FetchedCredential::Certificate`], signed in the form given (see
    /// [`FetchedCredential::certificate`]).
    CertificateAs(Secret, CertificateAssertion),
}

impl FetchedCredential {
    /// Certificate credentials whose assertion is signed in `form`.
    pub fn certificate(pem_text: Secret, form: CertificateAssertion) -> Self {
        FetchedCredential::CertificateAs(pem_text, form)
    }
}

/// How a certificate's client assertion is signed and names its certificate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CertificateAssertion {
    /// `alg: PS256` with `x5t#S256`, the SHA-256 thumbprint: what Entra's
    /// current certificate-credentials page asks for.
    #[default]
    Ps256,
    /// `alg: RS256` with `x5t`, the SHA-1 thumbprint: the older form Entra
    /// still accepts, for a setup that expects it.
    Rs256,
}

impl CertificateAssertion {
    pub fn as_str(self) -> &'static str {
        match self {
            CertificateAssertion::Ps256 => "ps256",
            CertificateAssertion::Rs256 => "rs256",
        }
    }
}

impl fmt::Display for CertificateAssertion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for CertificateAssertion {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "ps256" => Ok(CertificateAssertion::Ps256),
            "rs256" => Ok(CertificateAssertion::Rs256),
            _ => Err(format!(
                "certificate assertion {text:?} is not known: use ps256 (SHA-256 thumbprint, the default) or rs256 (SHA-1 thumbprint, the older form)"
            )),
        }
    }
}

/// How long a certificate assertion is valid: it is used at once.
const ASSERTION_LIFETIME: i64 = 600;

/// The client assertion of certificate credentials, as Microsoft Entra
/// expects it: a JWT signed with the certificate's key in `form` (PS256 with
/// the SHA-256 thumbprint as `x5t#S256`, or RS256 with the SHA-1 one as
/// `x5t`), `aud` the token endpoint, `iss` and `sub` the app.
/// Errors name what is wrong with the PEM and never contain any of it.
pub fn certificate_assertion(
    pem_text: &str,
    client_id: &str,
    token_url: &Url,
    now: jiff::Timestamp,
    form: CertificateAssertion,
) -> Result<String, String> {
    let blocks = pem::parse_many(pem_text).map_err(|e| {
        format!(
            "the certificate is not PEM text ({}): put the PEM of the certificate and its private key in the Secret's key",
            pem_problem(&e)
        )
    })?;
    let certificate = blocks
        .iter()
        .find(|b| b.tag() == "CERTIFICATE")
        .ok_or("the PEM holds no CERTIFICATE block: put the certificate and its private key in the Secret's key")?;
    let key = blocks
        .iter()
        .find(|b| matches!(b.tag(), "PRIVATE KEY" | "RSA PRIVATE KEY"))
        .ok_or("the PEM holds no PRIVATE KEY (PKCS#8) or RSA PRIVATE KEY block: put the certificate and its private key in the Secret's key")?;
    let header = assertion_header(certificate.contents(), form);
    // The library's error is not repeated: an error text could quote the key.
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(pem::encode(key).as_bytes()).map_err(|_| {
        "the private key is not an RSA key this operator can sign with (an EC or Ed25519 key, or a damaged one): use the RSA key of the certificate registered on the app".to_string()
    })?;
    let issued = now.as_second();
    let claims = serde_json::json!({
        "aud": token_url.as_str(),
        "iss": client_id,
        "sub": client_id,
        "jti": uuid::Uuid::new_v4().to_string(),
        "nbf": issued,
        "iat": issued,
        "exp": issued + ASSERTION_LIFETIME,
    });
    jsonwebtoken::encode(&header, &claims, &key)
        .map_err(|e| format!("cannot sign the client assertion ({e})"))
}

/// The JWT header naming the certificate (its DER is `certificate_der`) by
/// the thumbprint `form` uses.
fn assertion_header(certificate_der: &[u8], form: CertificateAssertion) -> jsonwebtoken::Header {
    use base64::Engine as _;
    let encode = |digest: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest);
    match form {
        CertificateAssertion::Ps256 => {
            let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::PS256);
            let digest = ring::digest::digest(&ring::digest::SHA256, certificate_der);
            header.x5t_s256 = Some(encode(digest.as_ref()));
            header
        }
        CertificateAssertion::Rs256 => {
            use sha1::Digest as _;
            let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
            header.x5t = Some(encode(&sha1::Sha1::digest(certificate_der)));
            header
        }
    }
}

/// What is wrong with a PEM text, in words of our own: the parser's own
/// messages quote the text (`invalid header: <a line of the key>`, the byte
/// it could not decode), and these errors reach status and Events, which
/// people who may not read the Secret can read.
fn pem_problem(error: &pem::PemError) -> &'static str {
    match error {
        pem::PemError::MismatchedTags(..) => "a BEGIN line and its END line name different blocks",
        pem::PemError::MalformedFraming
        | pem::PemError::MissingBeginTag
        | pem::PemError::MissingEndTag => "a BEGIN or END line is missing or malformed",
        pem::PemError::MissingData => "a block is empty",
        pem::PemError::InvalidData(_) => "a block is not base64",
        pem::PemError::InvalidHeader(_) => {
            "a block holds a line that is neither base64 nor a header (a blank line inside a block?)"
        }
        pem::PemError::NotUtf8(_) => "the text is not UTF-8",
    }
}

/// Where a credential is fetched from at each sign-in, so rotating it needs
/// no restart. An error says what to fix and never holds the credential.
pub trait CredentialSource: Send + Sync + fmt::Debug {
    fn fetch(&self)
    -> Pin<Box<dyn Future<Output = Result<FetchedCredential, String>> + Send + '_>>;
}

/// The application roles (`roles` claim) an Entra access token carries, read
/// without checking its signature: only to tell a person that the app lacks a
/// permission before MDE refuses a call. `None` when the token is not a JWT.
pub fn token_roles(token: &Secret) -> Option<Vec<String>> {
    use base64::Engine as _;
    let payload = token.expose().split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some(match claims.get("roles") {
        Some(serde_json::Value::Array(roles)) => roles
            .iter()
            .filter_map(|r| r.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    })
}

/// Tenant, app and credential: everything needed to ask for a token.
#[derive(Clone, Debug)]
pub struct ClientIdentity {
    pub tenant_id: String,
    pub client_id: String,
    pub credential: Credential,
}

impl ClientIdentity {
    /// Reads `AZURE_TENANT_ID`, `AZURE_CLIENT_ID` and one of `AZURE_CLIENT_SECRET`,
    /// `AZURE_CLIENT_SECRET_FILE`, `AZURE_FEDERATED_TOKEN_FILE`.
    pub fn from_parts(
        tenant_id: Option<String>,
        client_id: Option<String>,
        secret: Option<String>,
        secret_file: Option<PathBuf>,
        federated_token_file: Option<PathBuf>,
    ) -> Result<Self, String> {
        let tenant_id = tenant_id
            .filter(|t| !t.trim().is_empty())
            .ok_or("AZURE_TENANT_ID is not set: give the Entra ID tenant id of the MDE app")?;
        if !tenant_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        {
            return Err(
                "AZURE_TENANT_ID must be a tenant GUID or domain name (letters, digits, '-', '.')"
                    .into(),
            );
        }
        let client_id = client_id
            .filter(|c| !c.trim().is_empty())
            .ok_or("AZURE_CLIENT_ID is not set: give the application (client) id of the MDE app")?;
        let credential = match (
            secret.filter(|s| !s.is_empty()),
            secret_file,
            federated_token_file,
        ) {
            (Some(secret), _, _) => Credential::ClientSecret(Secret::new(secret)),
            (None, Some(path), _) => Credential::ClientSecretFile(path),
            (None, None, Some(path)) => Credential::FederatedTokenFile(path),
            (None, None, None) => {
                return Err(
                    "no credential: set AZURE_CLIENT_SECRET, AZURE_CLIENT_SECRET_FILE or \
                            AZURE_FEDERATED_TOKEN_FILE (workload identity)"
                        .into(),
                );
            }
        };
        Ok(ClientIdentity {
            tenant_id,
            client_id,
            credential,
        })
    }
}

/// The longest token lifetime believed: a day. Entra issues tokens for about
/// an hour; a larger, infinite or negative `expires_in` is clamped, never a panic.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// `expires_in` (seconds, from the network) as a lifetime within [0, a day].
fn token_lifetime(expires_in: f64) -> Duration {
    if expires_in.is_nan() || expires_in <= 0.0 {
        return Duration::ZERO;
    }
    Duration::from_secs_f64(expires_in.min(MAX_TOKEN_LIFETIME.as_secs_f64()))
}

#[derive(serde::Deserialize)]
struct TokenResponse {
    access_token: String,
    expires_in: f64,
}

#[derive(serde::Deserialize, Default)]
struct TokenError {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

struct CachedToken {
    value: Secret,
    refresh_at: Instant,
}

/// The largest answer read from the login host: 1 MiB. A token answer is a
/// JWT of a few KiB plus a few fields, and a token must fit in an
/// `Authorization` header, which servers cap at tens of KiB; an error answer
/// is a short description. 1 MiB leaves room for any of them and for an
/// error page a proxy puts in front.
pub const MAX_TOKEN_BODY: usize = 1024 * 1024;

/// Hands out bearer tokens, cached until shortly before expiry. Concurrent
/// callers share one refresh: the cache lock is held across the token request
/// on purpose, so only the first caller asks and the rest get its answer.
pub struct TokenSource {
    http: reqwest::Client,
    token_url: Url,
    scope: String,
    identity: ClientIdentity,
    cache: Mutex<Option<CachedToken>>,
}

impl TokenSource {
    pub fn new(
        http: reqwest::Client,
        authority: &Url,
        scope: String,
        identity: ClientIdentity,
    ) -> Result<Self, MdeError> {
        let token_url = authority
            .join(&format!("{}/oauth2/v2.0/token", identity.tenant_id))
            .map_err(|e| MdeError::Credentials {
                message: format!("cannot build the token URL: {e}"),
            })?;
        Ok(TokenSource {
            http,
            token_url,
            scope,
            identity,
            cache: Mutex::new(None),
        })
    }

    /// A valid token, from the cache or fresh.
    pub async fn token(&self) -> Result<Secret, MdeError> {
        let mut cache = self.cache.lock().await;
        if let Some(cached) = cache.as_ref().filter(|c| Instant::now() < c.refresh_at) {
            return Ok(cached.value.clone());
        }
        let fresh = self.request_token().await?;
        let value = fresh.value.clone();
        *cache = Some(fresh);
        Ok(value)
    }

    /// Forget `stale` (the API answered 401 to it) so the next call signs in again.
    pub async fn invalidate(&self, stale: &Secret) {
        let mut cache = self.cache.lock().await;
        if cache.as_ref().is_some_and(|c| &c.value == stale) {
            *cache = None;
        }
    }

    // One piece on purpose: every failure of the token request is classified
    // here (not sent, login host down, refused credentials) for one message each.
    async fn request_token(&self) -> Result<CachedToken, MdeError> {
        let mut form = vec![
            ("grant_type", "client_credentials".to_string()),
            ("client_id", self.identity.client_id.clone()),
            ("scope", self.scope.clone()),
        ];
        match &self.identity.credential {
            Credential::ClientSecret(secret) => {
                form.push(("client_secret", secret.expose().to_string()))
            }
            Credential::ClientSecretFile(path) => form.push((
                "client_secret",
                read_credential_file(path, "AZURE_CLIENT_SECRET_FILE")?,
            )),
            Credential::FederatedTokenFile(path) => {
                form.push((
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into(),
                ));
                form.push((
                    "client_assertion",
                    read_credential_file(path, "AZURE_FEDERATED_TOKEN_FILE")?,
                ));
            }
            Credential::Fetched(source) => {
                let fetched = source
                    .fetch()
                    .await
                    .map_err(|message| MdeError::Credentials { message })?;
                match fetched {
                    FetchedCredential::ClientSecret(secret) => {
                        form.push(("client_secret", secret.expose().to_string()))
                    }
                    FetchedCredential::ClientAssertion(assertion) => {
                        form.push((
                            "client_assertion_type",
                            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into(),
                        ));
                        form.push(("client_assertion", assertion.expose().to_string()));
                    }
                    FetchedCredential::Certificate(pem_text) => {
                        form.extend(self.signed_assertion(&pem_text, Default::default())?)
                    }
                    FetchedCredential::CertificateAs(pem_text, assertion) => {
                        form.extend(self.signed_assertion(&pem_text, assertion)?)
                    }
                }
            }
        }
        let host = self.token_url.host_str().unwrap_or_default().to_string();
        let started = Instant::now();
        let response = self
            .http
            .post(self.token_url.clone())
            .form(&form)
            .send()
            .await
            .map_err(|e| {
                // Whatever happened at the login host, the MDE call that
                // needed this token has not been sent.
                MdeError::NotSent {
                    reason: format!("cannot reach the login host {host}: {}", error_chain(&e)),
                }
            })?;
        let status = response.status();
        let body = read_capped(response, MAX_TOKEN_BODY)
            .await
            .map_err(|e| match e {
                BodyError::Cut(e) => MdeError::NotSent {
                    reason: format!("login host {host} dropped the answer: {}", error_chain(&e)),
                },
                // Whatever its status, an answer too large to read is taken
                // as a token answer that does not parse.
                too_large => MdeError::InvalidResponse {
                    message: format!(
                        "login host {host}{} answered {} with {}",
                        self.token_url.path(),
                        status.as_u16(),
                        too_large.describe(MAX_TOKEN_BODY)
                    ),
                },
            })?;
        if status.is_success() {
            let token: TokenResponse =
                serde_json::from_slice(&body).map_err(|e| MdeError::InvalidResponse {
                    message: format!("login host {host} answered without a usable token: {e}"),
                })?;
            let lifetime = token_lifetime(token.expires_in);
            // Refresh early: five minutes before expiry, or at 90% of short lifetimes.
            let margin = Duration::from_secs(300).min(lifetime / 10);
            return Ok(CachedToken {
                value: Secret::new(token.access_token),
                refresh_at: started + lifetime - margin,
            });
        }
        let error: TokenError = serde_json::from_slice(&body).unwrap_or_default();
        let description = error
            .error_description
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        let answered = format!(
            "login host {host} answered {} {}: {}",
            status.as_u16(),
            error.error,
            description
        );
        // An outage or throttling of the login host is transient: nothing about
        // the credentials is known to be wrong, and the MDE call that needed
        // the token was not sent, so the caller retries later.
        if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            Err(MdeError::NotSent {
                reason: format!("{answered} (the login host is unavailable; retrying later)"),
            })
        } else {
            Err(MdeError::SignIn {
                message: format!(
                    "{answered} (check AZURE_TENANT_ID, AZURE_CLIENT_ID and the secret or federated token)"
                ),
            })
        }
    }
}

impl TokenSource {
    /// The form fields of a fresh certificate assertion, signed in `assertion`'s form.
    fn signed_assertion(
        &self,
        pem_text: &Secret,
        assertion: CertificateAssertion,
    ) -> Result<[(&'static str, String); 2], MdeError> {
        let signed = certificate_assertion(
            pem_text.expose(),
            &self.identity.client_id,
            &self.token_url,
            jiff::Timestamp::now(),
            assertion,
        )
        .map_err(|message| MdeError::Credentials { message })?;
        Ok([
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into(),
            ),
            ("client_assertion", signed),
        ])
    }
}

fn read_credential_file(path: &std::path::Path, variable: &str) -> Result<String, MdeError> {
    let text = std::fs::read_to_string(path).map_err(|e| MdeError::Credentials {
        message: format!(
            "{variable} points at {}, which cannot be read: {e}",
            path.display()
        ),
    })?;
    let value = text.trim().to_string();
    if value.is_empty() {
        return Err(MdeError::Credentials {
            message: format!("{variable} points at {}, which is empty", path.display()),
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_token_lifetimes_are_clamped_not_panics() {
        assert_eq!(token_lifetime(3599.0), Duration::from_secs(3599));
        assert_eq!(token_lifetime(1e30), MAX_TOKEN_LIFETIME);
        assert_eq!(token_lifetime(f64::INFINITY), MAX_TOKEN_LIFETIME);
        assert_eq!(token_lifetime(f64::NAN), Duration::ZERO);
        assert_eq!(token_lifetime(-5.0), Duration::ZERO);
    }

    #[test]
    fn secrets_do_not_print() {
        let secret = Secret::new("hunter2");
        assert!(!format!("{secret:?}").contains("hunter2"));
        let identity = ClientIdentity::from_parts(
            Some("t".into()),
            Some("c".into()),
            Some("hunter2".into()),
            None,
            None,
        )
        .unwrap();
        assert!(!format!("{identity:?}").contains("hunter2"));
    }

    #[test]
    fn roles_are_read_from_a_jwt_and_nothing_else() {
        use base64::Engine as _;
        let encode = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let jwt = |payload: &str| {
            Secret::new(format!(
                "{}.{}.sig",
                encode(r#"{"alg":"RS256"}"#),
                encode(payload)
            ))
        };
        assert_eq!(
            token_roles(&jwt(r#"{"roles":["Machine.Offboard","Machine.Read.All"]}"#)),
            Some(vec!["Machine.Offboard".into(), "Machine.Read.All".into()])
        );
        assert_eq!(token_roles(&jwt(r#"{"tid":"t"}"#)), Some(vec![]));
        assert_eq!(token_roles(&jwt(r#"{"roles":"x"}"#)), Some(vec![]));
        assert_eq!(token_roles(&Secret::new("0123abcd")), None);
        assert_eq!(token_roles(&Secret::new("a.!!!.c")), None);
        assert_eq!(token_roles(&jwt("not json")), None);
    }

    /// The certificate's DER, decoded here from the PEM's base64 lines
    /// without the code under test.
    fn test_certificate_der() -> Vec<u8> {
        use base64::Engine as _;
        let pem_text = include_str!("../testdata/test-certificate.pem");
        let body: String = pem_text
            .lines()
            .skip_while(|l| *l != "-----BEGIN CERTIFICATE-----")
            .skip(1)
            .take_while(|l| *l != "-----END CERTIFICATE-----")
            .collect();
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap()
    }

    /// The assertion Entra checks, in each form: signed by the certificate's
    /// key (verified with its public key) with the algorithm the form names,
    /// the thumbprint of the certificate's DER (the digest computed here and
    /// what `openssl x509 -fingerprint` prints), `aud` the token endpoint,
    /// short-lived, new each time.
    #[test]
    fn a_certificate_signs_the_assertion_entra_expects_in_either_form() {
        use base64::Engine as _;
        let encode = |d: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(d);
        let pem_text = include_str!("../testdata/test-certificate.pem");
        let public = include_str!("../testdata/test-certificate-public-key.pem");
        let der = test_certificate_der();
        let sha256 = encode(ring::digest::digest(&ring::digest::SHA256, &der).as_ref());
        let sha1 =
            encode(ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &der).as_ref());
        // 08:0E:49:54:...:0B:06:3A:03 and 5D:56:27:71:...:3D:E3:EA:64.
        assert_eq!(sha256, "CA5JVFoijAQzgQHwhRX28vpBR-BKfGphfKpN9QsGOgM");
        assert_eq!(sha1, "XVYncR2m9fgd9-UYxe19fj3j6mQ");
        let token_url =
            Url::parse("https://login.microsoftonline.com/t/oauth2/v2.0/token").unwrap();
        let now = jiff::Timestamp::now();
        use jsonwebtoken::Algorithm::{PS256, RS256};
        for (form, alg, x5t_s256, x5t) in [
            (CertificateAssertion::Ps256, PS256, Some(&sha256), None),
            (CertificateAssertion::Rs256, RS256, None, Some(&sha1)),
        ] {
            let assertion =
                certificate_assertion(pem_text, "app-1", &token_url, now, form).unwrap();
            let header = jsonwebtoken::decode_header(&assertion).unwrap();
            assert_eq!(header.alg, alg, "{form}");
            assert_eq!(header.x5t_s256.as_ref(), x5t_s256, "{form}");
            assert_eq!(header.x5t.as_ref(), x5t, "{form}");
            let mut validation = jsonwebtoken::Validation::new(alg);
            validation.set_audience(&[token_url.as_str()]);
            validation.set_issuer(&["app-1"]);
            let key = jsonwebtoken::DecodingKey::from_rsa_pem(public.as_bytes()).unwrap();
            let claims = |a: &str| {
                jsonwebtoken::decode::<serde_json::Value>(a, &key, &validation)
                    .expect("signed by the certificate's key")
                    .claims
            };
            let first = claims(&assertion);
            assert_eq!(first["sub"], "app-1");
            assert_eq!(
                first["exp"].as_i64().unwrap() - first["iat"].as_i64().unwrap(),
                600
            );
            let other = certificate_assertion(pem_text, "app-1", &token_url, now, form).unwrap();
            assert_ne!(first["jti"], claims(&other)["jti"], "each assertion is new");
        }
        // The default is the form Entra's current page asks for.
        assert_eq!(CertificateAssertion::default(), CertificateAssertion::Ps256);
    }

    #[test]
    fn assertion_forms_parse_and_print() {
        for form in [CertificateAssertion::Ps256, CertificateAssertion::Rs256] {
            assert_eq!(form.to_string().parse::<CertificateAssertion>(), Ok(form));
        }
        assert_eq!("PS256".parse(), Ok(CertificateAssertion::Ps256));
        assert_eq!("rs256".parse(), Ok(CertificateAssertion::Rs256));
        let error = "es256".parse::<CertificateAssertion>().unwrap_err();
        assert!(
            error.contains("ps256") && error.contains("rs256"),
            "{error}"
        );
    }

    #[test]
    fn a_bad_certificate_is_named_without_its_content() {
        let url = Url::parse("https://login.microsoftonline.com/t/oauth2/v2.0/token").unwrap();
        let now = jiff::Timestamp::now();
        let full = include_str!("../testdata/test-certificate.pem");
        let key_only = &full[full.find("-----BEGIN PRIVATE KEY").unwrap()..];
        let error =
            certificate_assertion(key_only, "a", &url, now, Default::default()).unwrap_err();
        assert!(error.contains("no CERTIFICATE"), "{error}");
        let cert_only = &full[..full.find("-----BEGIN PRIVATE KEY").unwrap()];
        let error =
            certificate_assertion(cert_only, "a", &url, now, Default::default()).unwrap_err();
        assert!(error.contains("no PRIVATE KEY"), "{error}");
        let error =
            certificate_assertion("hunter2", "a", &url, now, Default::default()).unwrap_err();
        assert!(!error.contains("hunter2"), "{error}");
    }

    /// A Secret's content never reaches an error (errors reach status and
    /// Events, which people who may not read the Secret can read): not a
    /// line of a key whose PEM holds a blank line, not a byte base64 could
    /// not decode, not an EC or Ed25519 key, not binary data.
    #[test]
    fn no_byte_of_a_malformed_credential_appears_in_its_error() {
        let url = Url::parse("https://login.microsoftonline.com/t/oauth2/v2.0/token").unwrap();
        let now = jiff::Timestamp::now();
        let full = include_str!("../testdata/test-certificate.pem");
        let certificate = &full[..full.find("-----BEGIN PRIVATE KEY").unwrap()];
        let secret_lines = [
            "MHcCAQEEIKsecretECkeyLine0123456789abcdefABCDEF",
            "oAoGCCqGSM49AwEHoUQDQgAEsecond",
        ];
        let shapes = [
            // A blank line inside the block: the lines before it read as headers.
            format!(
                "-----BEGIN EC PRIVATE KEY-----\n{}\n\n{}\n-----END EC PRIVATE KEY-----\n",
                secret_lines[0], secret_lines[1]
            ),
            format!(
                "{certificate}-----BEGIN PRIVATE KEY-----\n{}\n\n{}\n-----END PRIVATE KEY-----\n",
                secret_lines[0], secret_lines[1]
            ),
            // Not base64.
            format!(
                "-----BEGIN PRIVATE KEY-----\n{}!@#\n-----END PRIVATE KEY-----\n",
                secret_lines[0]
            ),
            // A well-formed EC key where an RSA key is needed.
            format!(
                "{certificate}-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBYhT0V1c2VjcmV0LWtleS1ieXRlcy0wMTIzNDU2Nzg5YWJjZGVmoAoGCCqGSM49AwEH\n-----END EC PRIVATE KEY-----\n"
            ),
            // Mismatched tags named after the content.
            format!(
                "-----BEGIN {}-----\nAAAA\n-----END OTHER-----\n",
                secret_lines[1]
            ),
            // Binary data.
            String::from_utf8_lossy(&[0x30, 0x82, 0x04, 0xa4, 0x02, 0x01, 0x00, 0xff, 0xfe])
                .into_owned(),
        ];
        for shape in &shapes {
            let Err(error) = certificate_assertion(shape, "a", &url, now, Default::default())
            else {
                continue;
            };
            for line in shape
                .lines()
                .filter(|l| l.len() >= 8 && !l.starts_with("-----"))
            {
                assert!(!error.contains(line), "{error:?} quotes {line:?}");
            }
            for secret in secret_lines {
                assert!(!error.contains(secret), "{error:?} quotes the key");
            }
            assert!(!error.contains("MHcCAQEE"), "{error:?}");
        }
    }

    #[test]
    fn missing_pieces_are_named() {
        let err = ClientIdentity::from_parts(None, Some("c".into()), Some("s".into()), None, None)
            .unwrap_err();
        assert!(err.contains("AZURE_TENANT_ID"));
        let err = ClientIdentity::from_parts(Some("t".into()), None, Some("s".into()), None, None)
            .unwrap_err();
        assert!(err.contains("AZURE_CLIENT_ID"));
        let err = ClientIdentity::from_parts(Some("t".into()), Some("c".into()), None, None, None)
            .unwrap_err();
        assert!(err.contains("AZURE_CLIENT_SECRET") && err.contains("AZURE_FEDERATED_TOKEN_FILE"));
        let err = ClientIdentity::from_parts(
            Some("../evil".into()),
            Some("c".into()),
            Some("s".into()),
            None,
            None,
        )
        .unwrap_err();
        assert!(err.contains("AZURE_TENANT_ID"));
    }
}
