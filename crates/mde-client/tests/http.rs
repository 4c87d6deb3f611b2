//! The client against a scripted MDE on 127.0.0.1: what it sends, and what
//! it makes of the answers.

use mde_client::{
    CertificateAssertion, ClientConfig, ClientIdentity, Cloud, Credential, CredentialSource,
    DefenderClient, Endpoints, FetchedCredential, MdeError, NoObserver, RateLimits, Secret,
};
use serde_json::{Value, json};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One request as the server read it.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    /// Path and query as sent (still percent-encoded).
    target: String,
    body: String,
}

impl Seen {
    fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }

    fn query(&self, name: &str) -> Option<String> {
        let url = url::Url::parse(&format!("http://x{}", self.target)).unwrap();
        url.query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }

    fn is_token_request(&self) -> bool {
        self.path().ends_with("/oauth2/v2.0/token")
    }
}

type Handler = dyn Fn(&Seen) -> (u16, Value) + Send + Sync;

/// A server that signs anyone in and answers API calls with `handler`;
/// every request is kept, in order.
struct Scripted {
    base: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Scripted {
    async fn start(handler: impl Fn(&Seen) -> (u16, Value) + Send + Sync + 'static) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let kept = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (handler, kept) = (handler.clone(), kept.clone());
                tokio::spawn(async move { answer(stream, &*handler, &kept).await });
            }
        });
        Scripted { base, seen }
    }

    /// The API calls (sign-ins left out).
    fn api_calls(&self) -> Vec<Seen> {
        let seen = self.seen.lock().unwrap();
        seen.iter()
            .filter(|s| !s.is_token_request())
            .cloned()
            .collect()
    }

    fn token_requests(&self) -> Vec<Seen> {
        let seen = self.seen.lock().unwrap();
        seen.iter()
            .filter(|s| s.is_token_request())
            .cloned()
            .collect()
    }

    fn client(&self) -> DefenderClient {
        self.client_with(Credential::ClientSecret(Secret::new("s")))
    }

    fn client_with(&self, credential: Credential) -> DefenderClient {
        let mut identity = ClientIdentity::from_parts(
            Some("t".into()),
            Some("app".into()),
            Some("s".into()),
            None,
            None,
        )
        .unwrap();
        identity.credential = credential;
        let config = ClientConfig {
            endpoints: Endpoints::new(Cloud::Commercial, Some(&self.base), Some(&self.base))
                .unwrap(),
            identity,
            rate_limits: RateLimits::default(),
            request_timeout: Duration::from_secs(10),
            budget_wait: Default::default(),
        };
        DefenderClient::new(config, Arc::new(NoObserver)).unwrap()
    }
}

/// Reads one HTTP/1.1 request and answers it, closing the connection.
async fn answer(mut stream: tokio::net::TcpStream, handler: &Handler, kept: &Mutex<Vec<Seen>>) {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let length = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    while buffer.len() < head_end + length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
    let mut request_line = head.lines().next().unwrap_or_default().split(' ');
    let seen = Seen {
        method: request_line.next().unwrap_or_default().to_string(),
        target: request_line.next().unwrap_or_default().to_string(),
        body: String::from_utf8_lossy(&buffer[head_end..head_end + length]).into_owned(),
    };
    kept.lock().unwrap().push(seen.clone());
    let (status, body) = if seen.is_token_request() {
        (200, json!({"access_token": "token", "expires_in": 3600}))
    } else {
        handler(&seen)
    };
    // A redirect's target comes as the body's `location`.
    let location = match (status, body.get("location").and_then(Value::as_str)) {
        (300..=399, Some(to)) => format!("location: {to}\r\n"),
        _ => String::new(),
    };
    let body = body.to_string();
    let response = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{location}connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

fn machine(id: &str, name: Option<&str>) -> Value {
    json!({"id": id, "computerDnsName": name, "onboardingStatus": "Onboarded"})
}

fn action(id: &str) -> Value {
    json!({"id": id, "type": "Offboard", "status": "Pending", "machineId": "m1"})
}

/// A dotless name asks MDE for the name alone or with any domain, and keeps
/// only what answers to it, whatever looser matches MDE sends back.
#[tokio::test]
async fn a_dotless_name_finds_the_host_in_any_domain_and_nothing_else() {
    let server = Scripted::start(|_| {
        (
            200,
            json!({"value": [
                machine("m1", Some("pc-1")),
                machine("m2", Some("PC-1.Contoso.com")),
                machine("m3", Some("pc-10.contoso.com")),
                machine("m4", Some("pc-1x")),
                machine("m5", Some("xpc-1.contoso.com")),
                machine("m6", None),
                machine("m7", Some("pc-1.")),
            ]}),
        )
    })
    .await;
    let found = server.client().find_machines_by_name("PC-1").await.unwrap();
    let ids: Vec<&str> = found.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["m1", "m2", "m7"]);
    let calls = server.api_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].path(), "/api/machines");
    assert_eq!(
        calls[0].query("$filter").as_deref(),
        Some("computerDnsName eq 'pc-1' or startswith(computerDnsName,'pc-1.')")
    );
    assert!(
        calls[0].target.contains("%20or%20") && !calls[0].target.contains('+'),
        "spaces are sent as %20: {}",
        calls[0].target
    );
}

#[tokio::test]
async fn a_qualified_name_must_match_whole_and_quotes_are_doubled() {
    let server = Scripted::start(|_| {
        (
            200,
            json!({"value": [
                machine("m1", Some("pc-1.contoso.com")),
                machine("m2", Some("pc-1.contoso.com.evil.example")),
                machine("m3", Some("pc-1")),
                machine("m4", Some("PC-1.CONTOSO.COM")),
            ]}),
        )
    })
    .await;
    let client = server.client();
    let found = client
        .find_machines_by_name("pc-1.contoso.com")
        .await
        .unwrap();
    let ids: Vec<&str> = found.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["m1", "m4"]);
    client.find_machines_by_name("o'brien").await.unwrap();
    let filters: Vec<String> = server
        .api_calls()
        .iter()
        .map(|c| c.query("$filter").unwrap())
        .collect();
    assert_eq!(
        filters,
        [
            "computerDnsName eq 'pc-1.contoso.com'",
            "computerDnsName eq 'o''brien' or startswith(computerDnsName,'o''brien.')",
        ]
    );
}

/// Pages read with `$skip` keep one order, oldest first, so an action
/// created meanwhile cannot shift another out of the pages.
#[tokio::test]
async fn a_window_page_is_ordered_by_creation_time() {
    let server = Scripted::start(|_| (200, json!({"value": [action("a1")]}))).await;
    let since: jiff::Timestamp = "2026-05-01T00:00:00Z".parse().unwrap();
    let page = server
        .client()
        .offboard_actions_page(since, 100, 200)
        .await
        .unwrap();
    assert_eq!(page.len(), 1);
    let calls = server.api_calls();
    assert_eq!(calls[0].path(), "/api/machineactions");
    assert_eq!(
        calls[0].query("$orderby").as_deref(),
        Some("creationDateTimeUtc")
    );
    assert_eq!(calls[0].query("$top").as_deref(), Some("100"));
    assert_eq!(calls[0].query("$skip").as_deref(), Some("200"));
    assert_eq!(
        calls[0].query("$filter").as_deref(),
        Some("type eq 'Offboard' and creationDateTimeUtc ge 2026-05-01T00:00:00Z")
    );
}

/// A tenant that refuses `in` answers the same batch with `or`, and the
/// next poll asks with `or` straight away.
#[tokio::test]
async fn polling_by_id_falls_back_to_or_once_and_keeps_to_it() {
    let server = Scripted::start(|seen| {
        let filter = seen.query("$filter").unwrap_or_default();
        if filter.starts_with("id in") {
            return (
                400,
                json!({"error": {"code": "", "message": "The query specified in the URI is not valid.", "target": "c0ffee-1"}}),
            );
        }
        let ids: Vec<Value> = filter
            .split(" or ")
            .filter_map(|clause| clause.strip_prefix("id eq '")?.strip_suffix('\''))
            .map(action)
            .collect();
        (200, json!({ "value": ids }))
    })
    .await;
    let client = server.client();
    let ids: Vec<String> = ["a1", "a2", "a3"].map(String::from).into();
    let first = client.machine_actions_by_ids(&ids).await.unwrap();
    let read: Vec<&str> = first.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(read, ["a1", "a2", "a3"]);
    let second = client.machine_actions_by_ids(&ids[..1]).await.unwrap();
    assert_eq!(second.len(), 1);
    let filters: Vec<String> = server
        .api_calls()
        .iter()
        .map(|c| c.query("$filter").unwrap())
        .collect();
    assert_eq!(
        filters,
        [
            "id in ('a1','a2','a3')",
            "id eq 'a1' or id eq 'a2' or id eq 'a3'",
            "id eq 'a1'",
        ],
        "one refusal, then `or` only"
    );
    // A clone shares what the client learnt.
    client
        .clone()
        .machine_actions_by_ids(&ids[..1])
        .await
        .unwrap();
    assert_eq!(server.api_calls().len(), 4);
}

#[tokio::test]
async fn polling_by_id_stays_with_in_where_it_works() {
    let server = Scripted::start(|_| (200, json!({"value": [action("a1"), action("a2")]}))).await;
    let client = server.client();
    let ids: Vec<String> = ["a1", "a2"].map(String::from).into();
    for _ in 0..2 {
        assert_eq!(client.machine_actions_by_ids(&ids).await.unwrap().len(), 2);
    }
    let calls = server.api_calls();
    assert_eq!(calls.len(), 2);
    assert!(
        calls
            .iter()
            .all(|c| c.query("$filter").unwrap().starts_with("id in"))
    );
}

/// The readiness read: one machine, within the machines budget; a 403
/// names the permission to grant.
#[tokio::test]
async fn the_read_probe_reads_one_machine_and_names_the_permission_on_403() {
    let allowed = Scripted::start(|_| (200, json!({"value": [machine("m1", Some("pc-1"))]}))).await;
    allowed.client().probe_read().await.unwrap();
    let calls = allowed.api_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].method, "GET");
    assert_eq!(calls[0].target, "/api/machines?$top=1");

    let empty = Scripted::start(|_| {
        (
            404,
            json!({"error": {"code": "ResourceNotFound", "message": "No machines"}}),
        )
    })
    .await;
    empty
        .client()
        .probe_read()
        .await
        .expect("a 404 is an empty tenant, read allowed");

    let refused = Scripted::start(|_| {
        (
            403,
            json!({"error": {"code": "Forbidden", "message": "Missing application roles.", "target": "4f1c2a9e-77b0"}}),
        )
    })
    .await;
    let error = refused.client().probe_read().await.unwrap_err();
    assert!(matches!(error, MdeError::Forbidden { .. }), "{error:?}");
    assert_eq!(error.class(), mde_client::ErrorClass::Access);
    let text = error.to_string();
    assert!(
        text.contains("Machine.Read.All") && text.contains("Machine.ReadWrite.All"),
        "{text}"
    );
    assert!(text.contains("MDE request id 4f1c2a9e-77b0"), "{text}");
}

/// MDE's correlation id reaches the error's text; a `target` that is not
/// one (hostile input) is dropped whole.
#[tokio::test]
async fn an_error_answer_keeps_its_request_id_and_drops_a_hostile_one() {
    let server = Scripted::start(|seen| {
        let target = match seen.path() {
            "/api/machines/m1" => json!("7d6e5f40-aaaa-bbbb-cccc-0123456789ab"),
            "/api/machines/m2" => json!("x\nEvent: forged by MDE's body"),
            "/api/machines/m3" => json!("a".repeat(65)),
            _ => json!({"id": 1}),
        };
        (
            404,
            json!({"error": {"code": "ResourceNotFound", "message": "Machine was not found", "target": target}}),
        )
    })
    .await;
    let client = server.client();
    let kept = client.get_machine("m1").await.unwrap_err();
    assert_eq!(
        kept.to_string(),
        "not found in MDE: Machine was not found (MDE request id 7d6e5f40-aaaa-bbbb-cccc-0123456789ab; Microsoft support asks for it)"
    );
    for id in ["m2", "m3", "m4"] {
        let error = client.get_machine(id).await.unwrap_err();
        assert_eq!(
            error.to_string(),
            "not found in MDE: Machine was not found",
            "{id}"
        );
    }
}

/// The test certificate, as [`FetchedCredential::Certificate`] (`None`) or
/// in the form given.
#[derive(Debug)]
struct PemSource(Option<CertificateAssertion>);

impl CredentialSource for PemSource {
    fn fetch(
        &self,
    ) -> Pin<Box<dyn Future<Output = Result<FetchedCredential, String>> + Send + '_>> {
        let pem = Secret::new(include_str!("../testdata/test-certificate.pem"));
        let fetched = match self.0 {
            None => FetchedCredential::Certificate(pem),
            Some(form) => FetchedCredential::certificate(pem, form),
        };
        Box::pin(async move { Ok(fetched) })
    }
}

/// The header of the assertion a sign-in sends, from the token form.
fn sent_assertion_header(token_request: &Seen) -> jsonwebtoken::Header {
    let (_, assertion) = url::form_urlencoded::parse(token_request.body.as_bytes())
        .find(|(k, _)| k == "client_assertion")
        .expect("a client assertion is sent");
    jsonwebtoken::decode_header(&assertion).unwrap()
}

/// A certificate credential signs PS256 with the SHA-256 thumbprint unless
/// the older RS256 form is asked for.
#[tokio::test]
async fn a_certificate_signs_in_with_ps256_unless_rs256_is_asked_for() {
    let server = Scripted::start(|_| (200, json!({}))).await;
    let sources = [
        None,
        Some(CertificateAssertion::Ps256),
        Some(CertificateAssertion::Rs256),
    ];
    for source in sources {
        let credential = Credential::Fetched(Arc::new(PemSource(source)));
        server
            .client_with(credential)
            .check_sign_in()
            .await
            .unwrap();
    }
    let headers: Vec<_> = server
        .token_requests()
        .iter()
        .map(sent_assertion_header)
        .collect();
    let sha256 = "CA5JVFoijAQzgQHwhRX28vpBR-BKfGphfKpN9QsGOgM";
    let sha1 = "XVYncR2m9fgd9-UYxe19fj3j6mQ";
    for header in &headers[..2] {
        assert_eq!(header.alg, jsonwebtoken::Algorithm::PS256);
        assert_eq!(header.x5t_s256.as_deref(), Some(sha256));
        assert_eq!(header.x5t, None);
    }
    assert_eq!(headers[2].alg, jsonwebtoken::Algorithm::RS256);
    assert_eq!(headers[2].x5t.as_deref(), Some(sha1));
    assert_eq!(headers[2].x5t_s256, None);
}

/// A redirect is never followed, whatever its code: the bearer token would go
/// with the request to the `Location`'s host. The call fails, naming the
/// answer, and the other host sees nothing.
#[tokio::test]
async fn a_redirect_is_not_followed_and_the_token_goes_nowhere_else() {
    let elsewhere = Scripted::start(|_| (200, json!({"value": []}))).await;
    let target = format!("{}/api/machines", elsewhere.base);
    for code in [301u16, 302, 307, 308] {
        let to = target.clone();
        let server = Scripted::start(move |_| (code, json!({"location": to}))).await;
        let result = server.client().get_machine(&"a".repeat(40)).await;
        assert!(result.is_err(), "{code}: {result:?}");
        assert_eq!(server.api_calls().len(), 1, "{code}: one call, not retried");
    }
    assert!(
        elsewhere.seen.lock().unwrap().is_empty(),
        "the redirect target received {:?}",
        elsewhere.seen.lock().unwrap()
    );
}
