//! Certificate credentials as Microsoft Entra checks them: the certificates
//! registered on the app, and client assertions signed with one of them
//! (`PS256` naming it by `x5t#S256`, or the older `RS256` naming it by `x5t`).
//!
//! The simulator reads certificates and verifies signatures itself (a small
//! DER walk and `ring`), rather than with the client's libraries: a double
//! must not share the code it is meant to check.

use base64::Engine as _;
use ring::{digest, signature};
use serde_json::Value;

const B64URL: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// `rsaEncryption` (1.2.840.113549.1.1.1), the key algorithm of an RSA certificate.
const RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];

/// Clocks of clients may run a little ahead: an assertion valid from up to
/// five minutes from now is taken.
const NOT_BEFORE_SKEW: i64 = 300;

/// A certificate registered on the app.
#[derive(Clone, Debug)]
pub struct RegisteredCertificate {
    /// SHA-1 of the DER, what `x5t` names.
    sha1: Vec<u8>,
    /// SHA-256 of the DER, what `x5t#S256` names.
    sha256: Vec<u8>,
    /// The `RSAPublicKey` (PKCS#1 DER) of the certificate's key.
    rsa_public_key: Vec<u8>,
}

/// Every `CERTIFICATE` block of a PEM text; other blocks (a private key
/// kept beside it) are skipped. Errors name the problem, never the text.
pub fn parse_certificates(pem: &str) -> Result<Vec<RegisteredCertificate>, String> {
    let mut certificates = Vec::new();
    let mut block: Option<String> = None;
    for line in pem.lines().map(str::trim) {
        match (&mut block, line) {
            (None, "-----BEGIN CERTIFICATE-----") => block = Some(String::new()),
            (Some(body), "-----END CERTIFICATE-----") => {
                let der = base64::engine::general_purpose::STANDARD
                    .decode(body.as_bytes())
                    .map_err(|_| {
                        format!(
                            "certificate {} is not base64 between its BEGIN and END lines",
                            certificates.len() + 1
                        )
                    })?;
                certificates.push(
                    from_der(&der)
                        .map_err(|e| format!("certificate {}: {e}", certificates.len() + 1))?,
                );
                block = None;
            }
            (Some(body), line) => body.push_str(line),
            (None, _) => {}
        }
    }
    if block.is_some() {
        return Err("a CERTIFICATE block has no END line".into());
    }
    if certificates.is_empty() {
        return Err(
            "no CERTIFICATE block: give the PEM of the certificate registered on the app".into(),
        );
    }
    Ok(certificates)
}

fn from_der(der: &[u8]) -> Result<RegisteredCertificate, String> {
    let rsa_public_key = rsa_public_key(der).ok_or(
        "not an X.509 certificate with an RSA key (Entra signs assertions with RSA keys only)",
    )?;
    Ok(RegisteredCertificate {
        sha1: digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, der)
            .as_ref()
            .to_vec(),
        sha256: digest::digest(&digest::SHA256, der).as_ref().to_vec(),
        rsa_public_key: rsa_public_key.to_vec(),
    })
}

/// One DER element of `input`: its tag, its contents and what follows it.
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |len, &b| (len << 8) | usize::from(b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The `RSAPublicKey` inside a certificate's `subjectPublicKeyInfo`.
fn rsa_public_key(certificate: &[u8]) -> Option<&[u8]> {
    const SEQUENCE: u8 = 0x30;
    let (SEQUENCE, certificate, _) = element(certificate)? else {
        return None;
    };
    let (SEQUENCE, mut tbs, _) = element(certificate)? else {
        return None;
    };
    // [0] version (optional), serialNumber, signature, issuer, validity, subject.
    if tbs.first() == Some(&0xa0) {
        tbs = element(tbs)?.2;
    }
    for _ in 0..5 {
        tbs = element(tbs)?.2;
    }
    let (SEQUENCE, spki, _) = element(tbs)? else {
        return None;
    };
    let (SEQUENCE, algorithm, rest) = element(spki)? else {
        return None;
    };
    let (0x06, oid, _) = element(algorithm)? else {
        return None;
    };
    let (0x03, bits, _) = element(rest)? else {
        return None;
    };
    // A BIT STRING's first byte counts unused bits: a key has none.
    match bits.split_first() {
        Some((0, key)) if oid == RSA_ENCRYPTION => Some(key),
        _ => None,
    }
}

/// The signature schemes Entra takes for certificate assertions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// RSASSA-PSS with SHA-256, the certificate named by `x5t#S256`.
    Ps256,
    /// RSASSA-PKCS1-v1_5 with SHA-256, the certificate named by `x5t` (SHA-1).
    Rs256,
}

impl Scheme {
    fn thumbprint_header(self) -> &'static str {
        match self {
            Scheme::Ps256 => "x5t#S256",
            Scheme::Rs256 => "x5t",
        }
    }
}

impl RegisteredCertificate {
    fn thumbprint(&self, scheme: Scheme) -> &[u8] {
        match scheme {
            Scheme::Ps256 => &self.sha256,
            Scheme::Rs256 => &self.sha1,
        }
    }

    fn verifies(&self, scheme: Scheme, signed: &[u8], signature_bytes: &[u8]) -> bool {
        let algorithm: &'static dyn signature::VerificationAlgorithm = match scheme {
            Scheme::Ps256 => &signature::RSA_PSS_2048_8192_SHA256,
            Scheme::Rs256 => &signature::RSA_PKCS1_2048_8192_SHA256,
        };
        signature::UnparsedPublicKey::new(algorithm, &self.rsa_public_key)
            .verify(signed, signature_bytes)
            .is_ok()
    }
}

/// Why a certificate assertion is refused: an Entra error code and its
/// description (which never quotes the assertion).
#[derive(Debug, PartialEq, Eq)]
pub struct AssertionRefusal {
    pub code: u32,
    pub description: String,
}

fn refusal(code: u32, description: impl Into<String>) -> AssertionRefusal {
    AssertionRefusal {
        code,
        description: description.into(),
    }
}

/// What the token endpoint is checking an assertion against.
#[derive(Clone, Copy, Debug)]
pub struct Expected<'a> {
    pub client_id: &'a str,
    /// The token endpoint the request was sent to (the assertion's `aud`).
    pub token_url: &'a str,
    /// Now, in seconds since the epoch.
    pub now: i64,
}

fn decode_json(part: &str) -> Option<Value> {
    let bytes = B64URL.decode(part.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Checks a client assertion. One whose header names no certificate
/// (`x5t`, `x5t#S256`) is another kind, a federated token of workload
/// identity, and is taken as it comes (`Ok(false)`); a certificate
/// assertion must be signed by a registered certificate with the scheme its
/// thumbprint goes with, for this app, this endpoint and now (`Ok(true)`).
pub fn check_assertion(
    assertion: &str,
    certificates: &[RegisteredCertificate],
    expected: Expected<'_>,
) -> Result<bool, AssertionRefusal> {
    let parts: Vec<&str> = assertion.split('.').collect();
    let Some(header) = parts.first().and_then(|h| decode_json(h)) else {
        return Ok(false);
    };
    let names_certificate = ["x5t", "x5t#S256"].iter().any(|h| header.get(h).is_some());
    if !names_certificate {
        return Ok(false);
    }
    let [header_part, payload_part, signature_part] = parts[..] else {
        return Err(refusal(50027, "JWT token is invalid or malformed."));
    };
    let scheme = match header.get("alg").and_then(Value::as_str) {
        Some("PS256") => Scheme::Ps256,
        Some("RS256") => Scheme::Rs256,
        other => {
            return Err(refusal(
                5002738,
                format!(
                    "Invalid JWT token. '{}' is not a supported signature algorithm. Supported signing algorithms are: 'PS256, RS256'.",
                    other.unwrap_or("")
                ),
            ));
        }
    };
    let thumbprint_header = scheme.thumbprint_header();
    let Some(thumbprint) = header
        .get(thumbprint_header)
        .and_then(Value::as_str)
        .and_then(|t| B64URL.decode(t.trim_end_matches('=')).ok())
    else {
        return Err(refusal(
            700027,
            format!(
                "Client assertion failed signature validation. A {scheme:?} assertion names its certificate by '{thumbprint_header}' (x5t#S256: SHA-256 for PS256; x5t: SHA-1 for RS256)."
            ),
        ));
    };
    let Some(certificate) = certificates
        .iter()
        .find(|c| c.thumbprint(scheme) == thumbprint.as_slice())
    else {
        let hex: String = thumbprint.iter().map(|b| format!("{b:02X}")).collect();
        return Err(refusal(
            700027,
            format!(
                "The certificate with identifier used to sign the client assertion is not registered on application. [Reason - The key was not found., Thumbprint of key used by client: '{hex}', app Id '{}']",
                expected.client_id
            ),
        ));
    };
    let signed = format!("{header_part}.{payload_part}");
    let verified = B64URL
        .decode(signature_part.trim_end_matches('='))
        .is_ok_and(|sig| certificate.verifies(scheme, signed.as_bytes(), &sig));
    if !verified {
        return Err(refusal(
            700027,
            "Client assertion failed signature validation.",
        ));
    }
    let claims = decode_json(payload_part)
        .ok_or_else(|| refusal(50027, "JWT token is invalid or malformed."))?;
    check_claims(&claims, expected).map(|()| true)
}

/// `aud` the token endpoint, `iss` and `sub` the app, a `jti`, and now
/// between `nbf` and `exp`.
fn check_claims(claims: &Value, expected: Expected<'_>) -> Result<(), AssertionRefusal> {
    let text = |name: &str| claims.get(name).and_then(Value::as_str);
    let same_url = |a: &str, b: &str| {
        a.trim_end_matches('/')
            .eq_ignore_ascii_case(b.trim_end_matches('/'))
    };
    if !text("aud").is_some_and(|aud| same_url(aud, expected.token_url)) {
        return Err(refusal(
            700023,
            format!(
                "Client assertion audience claim does not match Realm issuer: 'aud' must be the token endpoint {}.",
                expected.token_url
            ),
        ));
    }
    for name in ["iss", "sub"] {
        if text(name) != Some(expected.client_id) {
            return Err(refusal(
                700021,
                format!(
                    "Client assertion application identifier doesn't match 'client_id' parameter: '{name}' must be {}.",
                    expected.client_id
                ),
            ));
        }
    }
    if text("jti").is_none_or(str::is_empty) {
        return Err(refusal(
            50027,
            "JWT token is invalid or malformed: the client assertion has no 'jti'.",
        ));
    }
    let time = |name: &str| claims.get(name).and_then(Value::as_i64);
    match (time("nbf"), time("exp")) {
        (Some(nbf), Some(exp)) if nbf <= expected.now + NOT_BEFORE_SKEW && expected.now < exp => {
            Ok(())
        }
        (nbf, exp) => Err(refusal(
            700024,
            format!(
                "Client assertion is not within its valid time range. Current time: {}, assertion valid from {}, expiry time of assertion {}.",
                expected.now,
                nbf.map_or("(no nbf)".into(), |t| t.to_string()),
                exp.map_or("(no exp)".into(), |t| t.to_string()),
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REGISTERED: &str = include_str!("../tests/data/registered-certificate.pem");

    #[test]
    fn a_certificate_yields_its_thumbprints_and_rsa_key() {
        let certificates = parse_certificates(REGISTERED).unwrap();
        assert_eq!(certificates.len(), 1, "the private key block is skipped");
        let c = &certificates[0];
        assert_eq!((c.sha1.len(), c.sha256.len()), (20, 32));
        // An RSAPublicKey is a SEQUENCE of two INTEGERs.
        assert_eq!(c.rsa_public_key[0], 0x30);
    }

    #[test]
    fn unreadable_certificates_are_named_without_their_text() {
        let err = |pem: &str| parse_certificates(pem).unwrap_err();
        assert!(err("").contains("no CERTIFICATE block"));
        assert!(
            err("-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----")
                .contains("not base64")
        );
        assert!(
            err("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----").contains("RSA key")
        );
        assert!(err("-----BEGIN CERTIFICATE-----\nAAAA\n").contains("no END line"));
    }

    #[test]
    fn a_token_that_names_no_certificate_is_not_checked_here() {
        let expected = Expected {
            client_id: "c",
            token_url: "http://h/t/oauth2/v2.0/token",
            now: 0,
        };
        assert_eq!(check_assertion("eyJ...", &[], expected), Ok(false));
        assert_eq!(check_assertion("e30.e30.sig", &[], expected), Ok(false));
        // {"alg":"PS256","x5t#S256":"AA"} with no registered certificate.
        let header = B64URL.encode(r#"{"alg":"PS256","x5t#S256":"AA"}"#);
        let refused = check_assertion(&format!("{header}.e30.c2ln"), &[], expected).unwrap_err();
        assert_eq!(refused.code, 700027);
        assert!(
            refused.description.contains("not registered"),
            "{refused:?}"
        );
    }
}
