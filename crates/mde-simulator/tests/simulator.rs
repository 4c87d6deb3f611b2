//! The MDE simulator over real HTTP on loopback, as the operator, benchmarks and
//! the `dev` playground use it.

use std::time::{Duration, Instant};

use mde_simulator::{
    EXAMPLE_MACHINES, ExampleOffboard, FaultConfig, LostResponseMode, NextLinkMode,
    PendingConflictWording, RetryAfterMode, SimConfig, SimHandle, SimStats, SimulateArgs,
    WindowMode, spawn,
};
use reqwest::StatusCode;
use serde_json::{Value, json};

const SCOPE: &str = "https://api.securitycenter.microsoft.com/.default";

async fn start(config: SimConfig) -> SimHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    spawn(config, listener).await.unwrap()
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn example(name: &str) -> &'static str {
    EXAMPLE_MACHINES
        .iter()
        .find(|m| m.computer_dns_name.starts_with(name))
        .unwrap()
        .id
}

async fn request_token(
    sim: &SimHandle,
    tenant: &str,
    form: &[(&str, &str)],
) -> (StatusCode, Value) {
    let response = http()
        .post(format!("{}/{tenant}/oauth2/v2.0/token", sim.base_url()))
        .form(form)
        .send()
        .await
        .unwrap();
    (response.status(), response.json().await.unwrap())
}

/// A signed-in API client.
struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    async fn login(sim: &SimHandle) -> Api {
        let (status, body) = request_token(
            sim,
            "sim-tenant",
            &[
                ("grant_type", "client_credentials"),
                ("client_id", "sim-client"),
                ("client_secret", "sim-secret"),
                ("scope", SCOPE),
            ],
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        Api {
            http: http(),
            base: sim.base_url(),
            token: body["access_token"].as_str().unwrap().to_owned(),
        }
    }

    fn url(&self, path: &str) -> String {
        if path.starts_with("http") {
            path.to_owned()
        } else {
            format!("{}{path}", self.base)
        }
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let r = self
            .http
            .get(self.url(path))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        (r.status(), r.json().await.unwrap())
    }

    async fn post_raw(&self, path: &str, body: Value) -> reqwest::Result<reqwest::Response> {
        self.http
            .post(self.url(path))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let r = self.post_raw(path, body).await.unwrap();
        (r.status(), r.json().await.unwrap())
    }

    async fn offboard(&self, machine: &str) -> (StatusCode, Value) {
        self.post(
            &format!("/api/machines/{machine}/offboard"),
            json!({"Comment": "decommissioned"}),
        )
        .await
    }

    /// Reads an action until it is final, returning every status seen in order.
    async fn wait_final(&self, action: &str, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        let mut seen: Vec<String> = Vec::new();
        loop {
            let (status, body) = self.get(&format!("/api/machineactions/{action}")).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            let s = body["status"].as_str().unwrap().to_owned();
            if seen.last() != Some(&s) {
                seen.push(s.clone());
            }
            if ["Succeeded", "Failed", "TimeOut", "Cancelled"].contains(&s.as_str()) {
                return seen;
            }
            assert!(
                Instant::now() < deadline,
                "action still {s} after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn sim_post(sim: &SimHandle, path: &str, body: Value) -> Value {
    let r = http()
        .post(format!("{}{path}", sim.base_url()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{path}: {}", r.status());
    r.json().await.unwrap()
}

/// `GET /_sim/stats`, as a test client reads it (typed, or as raw JSON).
async fn stats_over_http<T: serde::de::DeserializeOwned>(sim: &SimHandle) -> T {
    http()
        .get(format!("{}/_sim/stats", sim.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_default()
}

/// The correlation id of an MDE error body, which must be a uuid.
fn target(body: &Value) -> &str {
    let target = body["error"]["target"].as_str().unwrap_or_default();
    assert!(
        uuid::Uuid::parse_str(target).is_ok(),
        "no uuid target: {body}"
    );
    target
}

/// Actions move quickly: Pending 200 ms, InProgress 300 ms.
fn fast() -> SimConfig {
    SimConfig {
        time_scale: 10.0,
        machines: 20,
        ..SimConfig::default()
    }
}

#[tokio::test]
async fn token_endpoint_issues_tokens_and_refuses_like_azure_ad() {
    let sim = start(SimConfig::default()).await;
    let form = |client: &'static str, secret: &'static str| {
        vec![
            ("grant_type", "client_credentials"),
            ("client_id", client),
            ("client_secret", secret),
            ("scope", SCOPE),
        ]
    };

    let (status, body) = request_token(&sim, "sim-tenant", &form("sim-client", "sim-secret")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    assert_eq!(body["ext_expires_in"], 3600);
    let token = body["access_token"].as_str().unwrap();
    assert!(token.len() >= 32 && !token.contains("sim-secret"));

    let (status, body) = request_token(&sim, "sim-tenant", &form("sim-client", "wrong")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"], "invalid_client");
    assert_eq!(body["error_codes"], json!([7000215]));
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .starts_with("AADSTS7000215: Invalid client secret provided.")
    );
    assert!(
        !body.to_string().contains("wrong"),
        "the presented secret is not echoed"
    );

    let (status, body) =
        request_token(&sim, "other-tenant", &form("sim-client", "sim-secret")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_request"))
    );
    assert_eq!(body["error_codes"], json!([90002]));

    let (status, body) =
        request_token(&sim, "sim-tenant", &form("someone-else", "sim-secret")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("unauthorized_client"))
    );
    assert_eq!(body["error_codes"], json!([700016]));

    // Workload identity: a client assertion instead of a secret.
    let (status, _) = request_token(
        &sim,
        "sim-tenant",
        &[
            ("grant_type", "client_credentials"),
            ("client_id", "sim-client"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", "eyJhbGciOi.e30.sig"),
            ("scope", SCOPE),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    let mut no_default = form("sim-client", "sim-secret");
    no_default[3] = (
        "scope",
        "https://api.securitycenter.microsoft.com/Machine.Offboard",
    );
    let (status, body) = request_token(&sim, "sim-tenant", &no_default).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_scope"))
    );

    let stats = sim.stats();
    assert_eq!(stats.tokens_issued, 2);
    assert_eq!(stats.count("token", "200"), 2);
    assert_eq!(stats.count("token", "401"), 1);
    assert_eq!(stats.count("token", "400"), 3);
}

#[tokio::test]
async fn api_calls_need_a_valid_unexpired_unrevoked_token() {
    // Lifetime 1 s at time scale 10: the token lives 100 ms.
    let sim = start(SimConfig {
        token_lifetime: Duration::from_secs(1),
        ..fast()
    })
    .await;
    let machine = format!("/api/machines/{}", example("finance-laptop"));

    let r = http()
        .get(format!("{}{machine}", sim.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&r.json().await.unwrap()), "Unauthorized");

    let mut api = Api::login(&sim).await;
    let (status, body) = api.get(&machine).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["computerDnsName"], "finance-laptop-07.contoso.com");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = api.get(&machine).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::UNAUTHORIZED, "Unauthorized")
    );

    let long_lived = start(SimConfig::default()).await;
    api = Api::login(&long_lived).await;
    assert_eq!(api.get(&machine).await.0, StatusCode::OK);
    api.token = "not-a-token".into();
    assert_eq!(api.get(&machine).await.0, StatusCode::UNAUTHORIZED);
    api = Api::login(&long_lived).await;
    let revoked = sim_post(&long_lived, "/_sim/revoke-tokens", json!({})).await;
    assert_eq!(
        revoked["revoked"], 2,
        "both tokens issued by this simulator"
    );
    assert_eq!(api.get(&machine).await.0, StatusCode::UNAUTHORIZED);
}

/// `/_sim/token-outage`: the token endpoint answers Azure AD's `503
/// temporarily_unavailable` for that long, tokens already issued keep working,
/// and sign-in works again afterwards.
#[tokio::test]
async fn a_token_outage_refuses_sign_in_for_a_while_only() {
    let sim = start(SimConfig::default()).await;
    let machine = format!("/api/machines/{}", example("finance-laptop"));
    let api = Api::login(&sim).await;
    sim_post(&sim, "/_sim/token-outage", json!({"seconds": 0.5})).await;
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", "sim-client"),
        ("client_secret", "sim-secret"),
        ("scope", SCOPE),
    ];
    let (status, body) = request_token(&sim, "sim-tenant", &form).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("temporarily_unavailable")
        )
    );
    assert_eq!(api.get(&machine).await.0, StatusCode::OK, "issued token");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        request_token(&sim, "sim-tenant", &form).await.0,
        StatusCode::OK
    );
    assert_eq!(sim.stats().count("token", "503"), 1);

    let bad = http()
        .post(format!("{}/_sim/token-outage", sim.base_url()))
        .json(&json!({"seconds": -1}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn offboard_creates_an_action_that_progresses_to_succeeded() {
    let sim = start(fast()).await;
    let api = Api::login(&sim).await;
    let machine = example("finance-laptop");
    let started = Instant::now();

    let (status, action) = api.offboard(machine).await;
    assert_eq!(status, StatusCode::CREATED, "{action}");
    assert_eq!(action["type"], "Offboard");
    assert_eq!(action["status"], "Pending");
    assert_eq!(action["machineId"], machine);
    assert_eq!(action["computerDnsName"], "finance-laptop-07.contoso.com");
    assert_eq!(action["requestor"], "sim-client");
    assert_eq!(action["requestorComment"], "decommissioned");
    assert_eq!(action["requestSource"], "PublicApi");
    assert_eq!(action["commands"], json!([]));
    for null_field in [
        "cancellationRequestor",
        "cancellationComment",
        "cancellationDateTimeUtc",
        "externalID",
        "relatedFileInfo",
    ] {
        assert!(action[null_field].is_null(), "{null_field}");
    }
    let id = action["id"].as_str().unwrap();
    assert!(uuid::Uuid::parse_str(id).is_ok());
    let created: jiff::Timestamp = action["creationDateTimeUtc"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    let seen = api.wait_final(id, Duration::from_secs(2)).await;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(seen.last().unwrap(), "Succeeded", "{seen:?}");
    assert!(
        seen.iter()
            .all(|s| ["Pending", "InProgress", "Succeeded"].contains(&s.as_str())),
        "{seen:?}"
    );
    assert!(
        seen.contains(&"InProgress".to_owned()),
        "polled every 20 ms, InProgress lasts 300 ms: {seen:?}"
    );

    let (_, done) = api.get(&format!("/api/machineactions/{id}")).await;
    let updated: jiff::Timestamp = done["lastUpdateDateTimeUtc"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        updated.duration_since(created),
        jiff::SignedDuration::from_millis(500)
    );

    // The example that fails does so through its action, not the call.
    let (status, failing) = api.offboard(example("lab-pc-09")).await;
    assert_eq!(status, StatusCode::CREATED);
    let seen = api
        .wait_final(failing["id"].as_str().unwrap(), Duration::from_secs(2))
        .await;
    assert_eq!(seen.last().unwrap(), "Failed");
}

#[tokio::test]
async fn offboard_refusals_match_mde() {
    // Real-time schedule: actions stay active for the whole test.
    let sim = start(SimConfig {
        machines: 20,
        ..SimConfig::default()
    })
    .await;
    let api = Api::login(&sim).await;

    let (status, body) = api
        .offboard("ffffffffffffffffffffffffffffffffffffffff")
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::NOT_FOUND, "ResourceNotFound")
    );
    assert_eq!(
        body["error"]["message"],
        "Machine ffffffffffffffffffffffffffffffffffffffff was not found"
    );
    assert!(uuid::Uuid::parse_str(body["error"]["target"].as_str().unwrap()).is_ok());
    let (status, body) = api
        .get("/api/machines/ffffffffffffffffffffffffffffffffffffffff")
        .await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::NOT_FOUND, "ResourceNotFound")
    );

    let linux = EXAMPLE_MACHINES
        .iter()
        .find(|m| m.offboard == ExampleOffboard::PlatformNotSupported)
        .unwrap();
    let (status, body) = api.offboard(linux.id).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::BAD_REQUEST, "OsPlatformNotSupported")
    );

    let machine = example("hr-desktop");
    for bad in [
        json!({}),
        json!({"comment": "lower case"}),
        json!({"Comment": ""}),
    ] {
        let (status, body) = api
            .post(&format!("/api/machines/{machine}/offboard"), bad.clone())
            .await;
        assert_eq!(
            (status, error_code(&body)),
            (StatusCode::BAD_REQUEST, "InvalidRequestBody"),
            "{bad}"
        );
    }

    let (status, first) = api.offboard(machine).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = api.offboard(machine).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::BAD_REQUEST, "ActiveRequestAlreadyExists")
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Action is already in progress")
    );

    // Cancelling ends it; a cancelled (final) action cannot be cancelled again.
    let cancel = format!(
        "/api/machineactions/{}/cancel",
        first["id"].as_str().unwrap()
    );
    let (status, cancelled) = api.post(&cancel, json!({"Comment": "wrong device"})).await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["status"], "Cancelled");
    assert_eq!(cancelled["cancellationComment"], "wrong device");
    assert_eq!(cancelled["cancellationRequestor"], "sim-client");
    let (status, _) = api.post(&cancel, json!({"Comment": "again"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        api.offboard(machine).await.0,
        StatusCode::CREATED,
        "a new offboard after a final one"
    );
}

#[tokio::test]
async fn permissions_come_from_the_application_roles() {
    let sim = start(SimConfig {
        roles: vec!["Machine.Read.All".into()],
        ..fast()
    })
    .await;
    let api = Api::login(&sim).await;
    let machine = example("finance-laptop");

    let (status, body) = api.offboard(machine).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        body["error"],
        json!({
            "code": "Forbidden",
            "message": "The application does not have any of the required application permissions (Machine.Offboard) to access the resource.",
            "target": body["error"]["target"],
        })
    );
    assert_eq!(api.get("/api/machines").await.0, StatusCode::OK);
    assert_eq!(sim.stats().actions_created, 0);

    sim_post(&sim, "/_sim/roles", json!({"roles": ["Machine.Offboard"]})).await;
    assert_eq!(api.offboard(machine).await.0, StatusCode::CREATED);
    let (status, body) = api.get("/api/machineactions").await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::FORBIDDEN, "Forbidden")
    );
}

#[tokio::test]
async fn odata_filters_and_next_links() {
    let sim = start(SimConfig {
        page_size: 7,
        ..fast()
    })
    .await;
    let api = Api::login(&sim).await;

    let (status, body) = api
        .get("/api/machines?$filter=computerDnsName eq 'kiosk-lobby-01.contoso.com'")
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut ids: Vec<_> = body["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, [example("kiosk-lobby-01"), EXAMPLE_MACHINES[5].id]);
    assert!(
        body["@odata.context"]
            .as_str()
            .unwrap()
            .ends_with("/api/$metadata#Machines")
    );
    assert!(body.get("@odata.nextLink").is_none());

    let (_, body) = api
        .get("/api/machines?$filter=startswith(computerDnsName,'build-') and osPlatform eq 'Linux'")
        .await;
    assert_eq!(body["value"][0]["id"], example("build-agent"));
    assert_eq!(body["value"].as_array().unwrap().len(), 1);

    // Follow nextLink through 20 generated and the example machines, in pages of 7.
    let mut next = Some("/api/machines".to_owned());
    let (mut all, mut pages) = (Vec::new(), 0);
    while let Some(link) = next {
        let (status, body) = api.get(&link).await;
        assert_eq!(status, StatusCode::OK, "{link}: {body}");
        pages += 1;
        all.extend(
            body["value"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_str().unwrap().to_owned()),
        );
        next = body["@odata.nextLink"].as_str().map(str::to_owned);
        if let Some(n) = &next {
            assert!(
                n.starts_with(&format!("{}/api/machines?", sim.base_url())),
                "{n}"
            );
        }
    }
    let total = 20 + EXAMPLE_MACHINES.len();
    assert_eq!((all.len(), pages), (total, total.div_ceil(7)));
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), total);

    // $top caps the total: MDE answers up to $top at once and never adds a nextLink.
    let (_, body) = api.get("/api/machines?$top=9").await;
    assert_eq!(body["value"].as_array().unwrap().len(), 9);
    assert!(body.get("@odata.nextLink").is_none(), "{body}");
    let (_, body) = api.get("/api/machines?$top=10000&$skip=20").await;
    assert_eq!(body["value"].as_array().unwrap().len(), total - 20);
    assert!(body.get("@odata.nextLink").is_none(), "{body}");

    // Actions: in, and, gt.
    let mut actions = Vec::new();
    for name in ["finance-laptop", "hr-desktop", "ws2019-file"] {
        let (status, action) = api.offboard(example(name)).await;
        assert_eq!(status, StatusCode::CREATED);
        actions.push(action);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let id = |i: usize| actions[i]["id"].as_str().unwrap();
    let (status, body) = api
        .get(&format!(
            "/api/machineactions?$filter=id in ('{}','{}')",
            id(0),
            id(2)
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut found: Vec<_> = body["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    found.sort_unstable();
    let mut expected = vec![id(0), id(2)];
    expected.sort_unstable();
    assert_eq!(found, expected);

    let (_, body) = api
        .get(&format!(
            "/api/machineactions?$filter=machineId eq '{}' and type eq 'Offboard'",
            example("hr-desktop")
        ))
        .await;
    assert_eq!(body["value"].as_array().unwrap().len(), 1);
    assert_eq!(body["value"][0]["id"], id(1));

    let since = actions[0]["creationDateTimeUtc"].as_str().unwrap();
    let (_, body) = api
        .get(&format!(
            "/api/machineactions?$filter=creationDateTimeUtc gt {since}"
        ))
        .await;
    let later: Vec<_> = body["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(later.len(), 2);
    assert!(!later.contains(&id(0)));

    let (_, body) = api.get("/api/machineactions?$top=2").await;
    assert_eq!(body["value"].as_array().unwrap().len(), 2);

    let (status, body) = api
        .get("/api/machineactions?$filter=id eq 'unterminated")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unterminated string"),
        "{body}"
    );
    let (status, body) = api.get("/api/machineactions?$filter=colour eq 'red'").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("'colour'"),
        "{body}"
    );
    let (status, _) = api.get("/api/machineactions?$top=10001").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

async fn get_status(api: &Api, path: &str) -> (StatusCode, Option<u64>, Value) {
    let r = api
        .http
        .get(api.url(path))
        .bearer_auth(&api.token)
        .send()
        .await
        .unwrap();
    let retry = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
    (r.status(), retry, r.json().await.unwrap())
}

#[tokio::test]
async fn sliding_window_answers_429_with_retry_after() {
    let sim = start(SimConfig {
        rate_limits: "3/5s".parse::<mde_simulator::RateLimits>().unwrap().0,
        ..fast()
    })
    .await;
    let api = Api::login(&sim).await;
    // Time scale 10 turns the 5 s window into 500 ms; Retry-After still says at least 1.
    let sim2 = start(SimConfig {
        rate_limits: "3/2s".parse::<mde_simulator::RateLimits>().unwrap().0,
        time_scale: 1.0,
        ..fast()
    })
    .await;
    let api2 = Api::login(&sim2).await;

    for _ in 0..3 {
        assert_eq!(
            get_status(&api2, "/api/machines?$top=1").await.0,
            StatusCode::OK
        );
    }
    let (status, retry, body) = get_status(&api2, "/api/machines?$top=1").await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::TOO_MANY_REQUESTS, "TooManyRequests")
    );
    assert_eq!(
        retry,
        Some(2),
        "the oldest call leaves the 2 s window in just under 2 s"
    );
    // Another family has its own budget.
    assert_eq!(
        get_status(&api2, "/api/machineactions").await.0,
        StatusCode::OK
    );
    // Throttled calls are not counted, so waiting Retry-After is enough.
    tokio::time::sleep(Duration::from_secs(retry.unwrap())).await;
    assert_eq!(
        get_status(&api2, "/api/machines?$top=1").await.0,
        StatusCode::OK
    );
    assert_eq!(sim2.stats().throttled, 1);
    assert_eq!(sim2.stats().count("machines", "429"), 1);

    for _ in 0..3 {
        assert_eq!(
            get_status(&api, "/api/machines?$top=1").await.0,
            StatusCode::OK
        );
    }
    let (status, retry, _) = get_status(&api, "/api/machines?$top=1").await;
    assert_eq!((status, retry), (StatusCode::TOO_MANY_REQUESTS, Some(1)));
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        get_status(&api, "/api/machines?$top=1").await.0,
        StatusCode::OK
    );
}

/// Calls at 0, 1.5, 2.3 and 2.4 s against 2 calls per 2 s: a sliding window still
/// counts the call at 1.5 at 2.4; fixed windows started afresh at 2.0.
async fn window_sequence(mode: WindowMode) -> Vec<StatusCode> {
    let sim = start(SimConfig {
        rate_limits: "2/2s".parse::<mde_simulator::RateLimits>().unwrap().0,
        window_mode: mode,
        ..SimConfig::default()
    })
    .await;
    let started = Instant::now();
    let api = Api::login(&sim).await;
    let mut statuses = Vec::new();
    for at in [0.0, 1.5, 2.3, 2.4] {
        tokio::time::sleep_until((started + Duration::from_secs_f64(at)).into()).await;
        statuses.push(get_status(&api, "/api/machines?$top=1").await.0);
    }
    statuses
}

#[tokio::test]
async fn fixed_windows_reset_at_boundaries_where_sliding_ones_do_not() {
    let (sliding, fixed) = tokio::join!(
        window_sequence(WindowMode::Sliding),
        window_sequence(WindowMode::Fixed)
    );
    let ok = StatusCode::OK;
    assert_eq!(sliding, [ok, ok, ok, StatusCode::TOO_MANY_REQUESTS]);
    assert_eq!(fixed, [ok, ok, ok, ok]);
}

#[tokio::test]
async fn forced_throttle_applies_to_one_family() {
    let sim = start(fast()).await;
    let api = Api::login(&sim).await;
    sim_post(
        &sim,
        "/_sim/throttle",
        json!({"family": "offboard", "seconds": 3}),
    )
    .await;
    let r = api
        .post_raw(
            &format!("/api/machines/{}/offboard", example("finance")),
            json!({"Comment": "x"}),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.headers()["retry-after"], "3");
    assert_eq!(api.get("/api/machines?$top=1").await.0, StatusCode::OK);
    assert_eq!(sim.stats().actions_created, 0);
}

#[tokio::test]
async fn lost_responses_still_create_the_action() {
    let sim = start(SimConfig {
        faults: mde_simulator::FaultConfig {
            lost_response_rate: 1.0,
            lost_response_mode: LostResponseMode::Drop,
            ..Default::default()
        },
        machines: 20,
        ..SimConfig::default()
    })
    .await;
    let api = Api::login(&sim).await;
    let dropped = example("finance-laptop");

    let started = Instant::now();
    let error = api
        .post_raw(
            &format!("/api/machines/{dropped}/offboard"),
            json!({"Comment": "x"}),
        )
        .await
        .expect_err("the connection closes without an answer");
    assert!(!error.is_timeout(), "{error:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    let (_, listed) = api
        .get(&format!(
            "/api/machineactions?$filter=machineId eq '{dropped}'"
        ))
        .await;
    assert_eq!(
        listed["value"].as_array().unwrap().len(),
        1,
        "the action was committed"
    );
    // A blind retry is refused while the first one runs: that is how clients notice.
    sim_post(&sim, "/_sim/faults", json!({"lost_response_mode": "504"})).await;
    let (status, body) = api.offboard(dropped).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::BAD_REQUEST, "ActiveRequestAlreadyExists")
    );

    let timed_out = example("hr-desktop");
    let (status, body) = api.offboard(timed_out).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");

    sim_post(&sim, "/_sim/faults", json!({"lost_response_rate": 0.0})).await;
    assert_eq!(api.offboard(example("ws2019")).await.0, StatusCode::CREATED);

    let stats = sim.stats();
    assert_eq!(stats.lost_responses, 2);
    assert_eq!(stats.actions_created, 3);
    assert_eq!(stats.offboard_actions_by_machine[dropped], 1);
    assert_eq!(stats.offboard_actions_by_machine[timed_out], 1);
    assert_eq!(stats.count("offboard", "dropped"), 1);
    assert_eq!(stats.count("offboard", "504"), 1);
    assert_eq!(stats.count("offboard", "201"), 1);
}

#[tokio::test]
async fn injected_errors_and_latency() {
    let sim = start(SimConfig {
        faults: mde_simulator::FaultConfig {
            error_rate: 1.0,
            ..Default::default()
        },
        ..fast()
    })
    .await;
    let api = Api::login(&sim).await;
    for _ in 0..4 {
        let (status, _) = api.offboard(example("finance")).await;
        assert!(
            status == StatusCode::INTERNAL_SERVER_ERROR
                || status == StatusCode::SERVICE_UNAVAILABLE,
            "{status}"
        );
    }
    assert_eq!(sim.stats().injected_errors, 4);
    assert_eq!(
        sim.stats().actions_created,
        0,
        "errors are answered before anything happens"
    );

    // 2 s of simulated latency at time scale 10.
    sim_post(
        &sim,
        "/_sim/faults",
        json!({"error_rate": 0.0, "latency": "2s"}),
    )
    .await;
    let started = Instant::now();
    assert_eq!(api.get("/api/machines?$top=1").await.0, StatusCode::OK);
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn stats_count_requests_and_duplicate_offboards() {
    let sim = start(SimConfig {
        machines: 20,
        ..SimConfig::default()
    })
    .await;
    let api = Api::login(&sim).await;
    let twice = example("finance-laptop");

    let (_, first) = api.offboard(twice).await;
    let cancel = format!(
        "/api/machineactions/{}/cancel",
        first["id"].as_str().unwrap()
    );
    assert_eq!(
        api.post(&cancel, json!({"Comment": "retry"})).await.0,
        StatusCode::OK
    );
    assert_eq!(
        api.offboard(twice).await.0,
        StatusCode::CREATED,
        "a new offboard after a final one"
    );
    assert_eq!(
        api.offboard(example("hr-desktop")).await.0,
        StatusCode::CREATED
    );
    assert_eq!(
        api.offboard(example("hr-desktop")).await.0,
        StatusCode::BAD_REQUEST
    );

    let over_http: SimStats = stats_over_http(&sim).await;
    assert_eq!(over_http, sim.stats());
    assert_eq!(over_http.duplicate_offboards, 1);
    assert_eq!(over_http.offboard_actions_by_machine[twice], 2);
    assert_eq!(over_http.actions_created, 3);
    assert_eq!(over_http.count("offboard", "201"), 3);
    assert_eq!(over_http.count("offboard", "400"), 1);
    assert_eq!(over_http.tokens_issued, 1);
    assert_eq!(over_http.count("cancel", "200"), 1);
    assert_eq!(over_http.actions_cancelled, 1);
    assert!(
        !over_http.requests.contains_key("other"),
        "/_sim calls are not counted"
    );
    sim.shutdown().await;
}

// ---- offboard request accounting ----

/// Sends one offboard with `comment` as it is (no marker added), returning the status
/// (`None` when the connection closed without an answer) and the error code.
async fn offboard_with(api: &Api, machine: &str, comment: &str) -> (Option<StatusCode>, String) {
    match api
        .post_raw(
            &format!("/api/machines/{machine}/offboard"),
            json!({ "Comment": comment }),
        )
        .await
    {
        Ok(r) => {
            let status = r.status();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            (Some(status), error_code(&body).to_owned())
        }
        Err(e) => {
            assert!(!e.is_timeout(), "{e:?}");
            (None, String::new())
        }
    }
}

#[tokio::test]
async fn offboard_posts_are_counted_by_correlation_key_whatever_the_answer() {
    // Real-time schedule: actions stay pending for the whole test.
    let sim = start(SimConfig {
        machines: 20,
        ..SimConfig::default()
    })
    .await;
    let mut api = Api::login(&sim).await;
    let finance = example("finance-laptop");
    let hr = example("hr-desktop");
    let ws = example("ws2019");
    let missing = "ffffffffffffffffffffffffffffffffffffffff";

    // 201, then 400 ActiveRequestAlreadyExists for the same key: both counted.
    let ok = offboard_with(&api, finance, "[defender-offboard:ns/a/1] offboarding").await;
    assert_eq!(ok.0, Some(StatusCode::CREATED));
    let again = offboard_with(&api, finance, "[defender-offboard:ns/a/1] offboarding").await;
    assert_eq!(
        again,
        (
            Some(StatusCode::BAD_REQUEST),
            "ActiveRequestAlreadyExists".into()
        )
    );
    // 404 for an unknown machine, and a comment without a marker (key "").
    let gone = offboard_with(&api, missing, "[defender-offboard:ns/b/2] x").await;
    assert_eq!(gone.0, Some(StatusCode::NOT_FOUND));
    assert_eq!(
        offboard_with(&api, hr, "decommissioned").await.0,
        Some(StatusCode::CREATED)
    );
    // A marker not at the very start does not count as one.
    assert_eq!(
        offboard_with(&api, hr, " [defender-offboard:ns/c/3] late")
            .await
            .1,
        "ActiveRequestAlreadyExists"
    );
    // A body MDE refuses (lower-case `comment`) still reached the service: key "".
    let r = api
        .post(
            &format!("/api/machines/{ws}/offboard"),
            json!({"comment": "[defender-offboard:ns/d/4] x"}),
        )
        .await;
    assert_eq!(error_code(&r.1), "InvalidRequestBody");

    // Injected 5xx, a dropped connection and a 504: counted.
    sim_post(&sim, "/_sim/faults", json!({"error_rate": 1.0})).await;
    let failed = offboard_with(&api, ws, "[defender-offboard:ns/e/5] x").await;
    assert!(failed.0.unwrap().is_server_error(), "{failed:?}");
    sim_post(
        &sim,
        "/_sim/faults",
        json!({"error_rate": 0.0, "lost_response_rate": 1.0, "lost_response_mode": "drop"}),
    )
    .await;
    assert_eq!(
        offboard_with(&api, ws, "[defender-offboard:ns/e/5] x")
            .await
            .0,
        None
    );
    sim_post(&sim, "/_sim/faults", json!({"lost_response_mode": "504"})).await;
    let lost = offboard_with(&api, example("lab-pc"), "[defender-offboard:ns/f/6] x").await;
    assert_eq!(lost.0, Some(StatusCode::GATEWAY_TIMEOUT));
    sim_post(&sim, "/_sim/faults", json!({"lost_response_rate": 0.0})).await;

    // 403 (missing role) could have created an action had the role been there: counted.
    sim_post(&sim, "/_sim/roles", json!({"roles": ["Machine.Read.All"]})).await;
    let forbidden = offboard_with(&api, example("kiosk"), "[defender-offboard:ns/g/7] x").await;
    assert_eq!(forbidden.0, Some(StatusCode::FORBIDDEN));
    sim_post(
        &sim,
        "/_sim/roles",
        json!({"roles": ["Machine.Offboard", "Machine.Read.All"]}),
    )
    .await;

    // Refused before anything: 429 and 401, counted apart.
    sim_post(
        &sim,
        "/_sim/throttle",
        json!({"family": "offboard", "seconds": 30}),
    )
    .await;
    let throttled = offboard_with(&api, example("kiosk"), "[defender-offboard:ns/h/8] x").await;
    assert_eq!(throttled.0, Some(StatusCode::TOO_MANY_REQUESTS));
    api.token = "not-a-token".into();
    let bad_token = offboard_with(&api, example("kiosk"), "[defender-offboard:ns/h/8] x").await;
    assert_eq!(bad_token.0, Some(StatusCode::UNAUTHORIZED));
    let no_token = http()
        .post(format!(
            "{}/api/machines/{finance}/offboard",
            sim.base_url()
        ))
        .json(&json!({"Comment": "[defender-offboard:ns/h/8] x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(no_token.status(), StatusCode::UNAUTHORIZED);

    let stats: SimStats = stats_over_http(&sim).await;
    assert_eq!(stats, sim.stats());
    let keys: Vec<(&str, u64)> = stats
        .offboard_requests_by_key
        .iter()
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    assert_eq!(
        keys,
        [
            ("", 3),
            ("ns/a/1", 2),
            ("ns/b/2", 1),
            ("ns/e/5", 2),
            ("ns/f/6", 1),
            ("ns/g/7", 1),
        ]
    );
    assert_eq!(stats.offboard_requests_for_key("ns/h/8"), 0);
    assert_eq!(stats.offboard_requests_refused, 3);
    assert_eq!(stats.offboard_requests_by_machine[finance], 2);
    assert_eq!(stats.offboard_requests_by_machine[hr], 2);
    assert_eq!(stats.offboard_requests_by_machine[ws], 3);
    assert_eq!(stats.offboard_requests_by_machine[missing], 1);
    assert_eq!(stats.offboard_requests_by_machine[example("kiosk")], 1);
    // Actions created: finance, hr, ws (dropped answer) and lab-pc (504).
    assert_eq!(stats.actions_created, 4);
    assert_eq!(stats.duplicate_offboards, 0, "counts actions, not requests");
    // The JSON names the dev playground and other crates' tests read.
    let raw: Value = stats_over_http(&sim).await;
    assert_eq!(raw["offboard_requests_by_key"]["ns/a/1"], 2);
    assert_eq!(raw["offboard_requests_by_machine"][finance], 2);
    assert_eq!(raw["offboard_requests_refused"], 3);
}

#[tokio::test]
async fn a_second_offboard_after_success_is_created_and_counted() {
    let sim = start(fast()).await;
    let api = Api::login(&sim).await;
    let machine = example("finance-laptop");
    let comment = "[defender-offboard:default/finance/uid-1] offboard";

    let (status, _) = offboard_with(&api, machine, comment).await;
    assert_eq!(status, Some(StatusCode::CREATED));
    let (_, listed) = api
        .get(&format!(
            "/api/machineactions?$filter=machineId eq '{machine}'"
        ))
        .await;
    let first = listed["value"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(
        api.wait_final(&first, Duration::from_secs(3))
            .await
            .last()
            .unwrap(),
        "Succeeded"
    );
    // Unknown how MDE answers here; the simulator creates a second action.
    assert_eq!(
        offboard_with(&api, machine, comment).await.0,
        Some(StatusCode::CREATED)
    );
    let stats = sim.stats();
    assert_eq!(stats.offboard_requests_for_key("default/finance/uid-1"), 2);
    assert_eq!(stats.offboard_requests_by_machine[machine], 2);
    assert_eq!(stats.duplicate_offboards, 1);
}

// ---- list lag ----

fn ids_of(body: &Value) -> Vec<String> {
    body["value"]
        .as_array()
        .unwrap_or_else(|| panic!("no value in {body}"))
        .iter()
        .map(|a| a["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn list_lag_hides_new_actions_from_lists_but_not_from_get_by_id() {
    // 5 s of simulated lag at time scale 10: 500 ms; actions stay Pending 10 s (1 s).
    let sim = start(SimConfig {
        pending_for: Duration::from_secs(10),
        faults: FaultConfig {
            list_lag: Duration::from_secs(5),
            ..FaultConfig::default()
        },
        rate_limits: Vec::new(),
        ..fast()
    })
    .await;
    let api = Api::login(&sim).await;
    let machine = example("finance-laptop");
    let by_machine = format!("/api/machineactions?$filter=machineId eq '{machine}'");

    let created = Instant::now();
    let (status, action) = api.offboard(machine).await;
    assert_eq!(status, StatusCode::CREATED);
    let id = action["id"].as_str().unwrap().to_owned();
    let (status, body) = api.get(&by_machine).await;
    assert_eq!(status, StatusCode::OK);
    assert!(ids_of(&body).is_empty(), "not yet listed: {body}");
    let (_, body) = api
        .get(&format!("/api/machineactions?$filter=id in ('{id}')"))
        .await;
    assert!(ids_of(&body).is_empty(), "not by id filter either: {body}");
    let (status, one) = api.get(&format!("/api/machineactions/{id}")).await;
    assert_eq!(
        (status, one["id"].as_str()),
        (StatusCode::OK, Some(id.as_str()))
    );

    // A second POST meanwhile is still refused: the service knows the action.
    assert_eq!(api.offboard(machine).await.0, StatusCode::BAD_REQUEST);

    let visible_after = loop {
        let (_, body) = api.get(&by_machine).await;
        if ids_of(&body) == [id.clone()] {
            break created.elapsed();
        }
        assert!(created.elapsed() < Duration::from_secs(3), "never listed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        visible_after >= Duration::from_millis(450),
        "listed after {visible_after:?}"
    );

    // Changed at runtime through /_sim/faults.
    let now = sim_post(&sim, "/_sim/faults", json!({"list_lag": "0s"})).await;
    assert_eq!(now["list_lag"], "0s");
    let (_, second) = api.offboard(example("hr-desktop")).await;
    let (_, body) = api.get("/api/machineactions").await;
    assert!(
        ids_of(&body).contains(&second["id"].as_str().unwrap().to_owned()),
        "{body}"
    );
}

// ---- paging ----

/// Follows `@odata.nextLink` at most `max` times, returning every page's body.
async fn follow(api: &Api, first: &str, max: usize) -> Vec<Value> {
    let mut pages = Vec::new();
    let mut next = Some(first.to_owned());
    while let Some(link) = next {
        if pages.len() == max {
            break;
        }
        let (status, body) = api.get(&link).await;
        assert_eq!(status, StatusCode::OK, "{link}: {body}");
        next = body["@odata.nextLink"].as_str().map(str::to_owned);
        pages.push(body);
    }
    pages
}

#[tokio::test]
async fn next_link_repeat_points_to_the_same_page_forever() {
    let sim = start(SimConfig {
        page_size: 7,
        rate_limits: Vec::new(),
        faults: FaultConfig {
            next_link: NextLinkMode::Repeat,
            ..FaultConfig::default()
        },
        ..fast()
    })
    .await;
    let api = Api::login(&sim).await;
    let first = format!(
        "{}/api/machines?$filter=healthStatus eq 'Active'",
        sim.base_url()
    );
    let pages = follow(&api, &first, 5).await;
    assert_eq!(pages.len(), 5, "the link never runs out");
    let link = pages[0]["@odata.nextLink"].as_str().unwrap();
    for page in &pages {
        assert_eq!(page["@odata.nextLink"], link);
        assert_eq!(ids_of(page), ids_of(&pages[0]));
    }
    // Following it again asks for the very same page.
    let (_, again) = api.get(link).await;
    assert_eq!(ids_of(&again), ids_of(&pages[0]));
    // $top: no link; one page: no link.
    let (_, top) = api.get("/api/machines?$top=20").await;
    assert_eq!((ids_of(&top).len(), top.get("@odata.nextLink")), (20, None));
    let (_, single) = api
        .get("/api/machines?$filter=osPlatform eq 'Linux' and startswith(computerDnsName,'build-')")
        .await;
    assert!(single.get("@odata.nextLink").is_none());

    // Back to normal at runtime: the pages end.
    sim_post(&sim, "/_sim/faults", json!({"next_link": "normal"})).await;
    let pages = follow(&api, "/api/machines", 10).await;
    let total = 20 + EXAMPLE_MACHINES.len();
    assert_eq!(
        pages.len(),
        total.div_ceil(7),
        "{total} machines in pages of 7"
    );
}

#[tokio::test]
async fn next_link_mangled_keeps_skip_loses_the_filter_and_keeps_coming() {
    let sim = start(SimConfig {
        page_size: 7,
        rate_limits: Vec::new(),
        ..fast()
    })
    .await;
    let api = Api::login(&sim).await;
    let set = sim_post(&sim, "/_sim/faults", json!({"next_link": "mangled"})).await;
    assert_eq!(set["next_link"], "mangled");

    // Most machines are Active (a re-imaged one, the stale kiosk record and
    // the discovered ones are not).
    let filtered = "/api/machines?$filter=healthStatus eq 'Active'";
    let pages = follow(&api, filtered, 8).await;
    assert_eq!(pages.len(), 8, "a mangled link keeps coming");
    let link = pages[0]["@odata.nextLink"].as_str().unwrap();
    assert!(
        link.starts_with(&format!("{}/api/machines?=", sim.base_url())),
        "{link}"
    );
    assert!(link.ends_with("&=7&$skip=7"), "{link}");
    assert!(!link.contains("$filter"), "{link}");
    let statuses: Vec<String> = pages
        .iter()
        .flat_map(|p| p["value"].as_array().unwrap().iter())
        .map(|m| m["healthStatus"].as_str().unwrap_or("null").to_owned())
        .collect();
    assert!(
        statuses.iter().any(|s| s == "Inactive"),
        "the mangled pages list what the filter excluded"
    );
    // Past the end: empty pages that still carry a link with $skip advancing.
    let last = pages.last().unwrap();
    assert!(ids_of(last).is_empty(), "{last}");
    assert!(
        last["@odata.nextLink"]
            .as_str()
            .unwrap()
            .ends_with("$skip=56"),
        "{last}"
    );
    // Answering a mangled link with a huge $skip is immediate, not a loop.
    let started = Instant::now();
    let (status, far) = api
        .get("/api/machines?=x&=7&$skip=18446744073709551000")
        .await;
    assert_eq!(status, StatusCode::OK, "{far}");
    assert!(started.elapsed() < Duration::from_secs(2));

    // Machine actions page the same way; with $top there is never a link.
    for name in ["finance-laptop", "hr-desktop", "ws2019", "kiosk", "lab-pc"] {
        assert_eq!(api.offboard(example(name)).await.0, StatusCode::CREATED);
    }
    sim_post(&sim, "/_sim/faults", json!({"next_link": "normal"})).await;
    let (_, few) = api
        .get("/api/machineactions?$filter=type eq 'Offboard'")
        .await;
    assert!(few.get("@odata.nextLink").is_none(), "5 fit in a page of 7");
    let (_, top) = api.get("/api/machineactions?$top=2").await;
    assert_eq!((ids_of(&top).len(), top.get("@odata.nextLink")), (2, None));
}

// ---- unknown $ options ----

#[tokio::test]
async fn unknown_dollar_options_are_refused_with_mdes_empty_code() {
    let sim = start(fast()).await;
    let api = Api::login(&sim).await;
    let expected = |option: &str, target: &str| {
        json!({"error": {
            "code": "",
            "message": format!("The query specified in the URI is not valid. Custom query option '{option}' that starts with '$' is not supported."),
            "details": [],
            "target": target,
        }})
    };
    for (path, option) in [
        ("/api/machines?$stop=5", "$stop"),
        (
            "/api/machines?$filter=osPlatform eq 'Linux'&%24stop=5",
            "$stop",
        ),
        ("/api/machineactions?$top=5&$search=x", "$search"),
        ("/api/machineactions?$Top=5", "$Top"),
        (
            &format!("/api/machines/{}?$format=json", example("finance")),
            "$format",
        ),
        (
            "/api/machineactions/00000000-0000-0000-0000-000000000000?$x=1",
            "$x",
        ),
    ] {
        let (status, body) = api.get(path).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(body, expected(option, target(&body)), "{path}");
    }
    for path in [
        "/api/machines?$select=id&$orderby=id&$count=true&$expand=x&$top=1&$skip=1",
        "/api/machines?custom=1&$top=1",
        "/api/machineactions?$select=id",
    ] {
        assert_eq!(api.get(path).await.0, StatusCode::OK, "{path}");
    }
}

// ---- quirks ----

async fn throttled_retry_after(api: &Api) -> (StatusCode, Option<String>, Value) {
    let r = api
        .http
        .get(api.url("/api/machines?$top=1"))
        .bearer_auth(&api.token)
        .send()
        .await
        .unwrap();
    let header = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (r.status(), header, r.json().await.unwrap())
}

#[tokio::test]
async fn retry_after_modes() {
    let sim = start(SimConfig {
        faults: FaultConfig {
            retry_after: RetryAfterMode::Huge,
            ..FaultConfig::default()
        },
        ..fast()
    })
    .await;
    let api = Api::login(&sim).await;
    sim_post(
        &sim,
        "/_sim/throttle",
        json!({"family": "machines", "seconds": 3}),
    )
    .await;

    let (status, header, body) = throttled_retry_after(&api).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(error_code(&body), "TooManyRequests");
    assert_eq!(header.as_deref(), Some("1e19"));

    sim_post(&sim, "/_sim/faults", json!({"retry_after": "seconds"})).await;
    let (_, header, _) = throttled_retry_after(&api).await;
    assert_eq!(header.as_deref(), Some("3"));

    sim_post(&sim, "/_sim/faults", json!({"retry_after": "missing"})).await;
    let (status, header, _) = throttled_retry_after(&api).await;
    assert_eq!((status, header), (StatusCode::TOO_MANY_REQUESTS, None));

    sim_post(&sim, "/_sim/faults", json!({"retry_after": "http-date"})).await;
    let before = jiff::Timestamp::now();
    let (status, header, _) = throttled_retry_after(&api).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let header = header.unwrap();
    assert!(header.ends_with(" GMT"), "{header}");
    let at = jiff::fmt::rfc2822::DateTimeParser::new()
        .parse_timestamp(&header)
        .unwrap_or_else(|e| panic!("{header}: {e}"));
    let wait = at.duration_since(before);
    assert!(
        wait >= jiff::SignedDuration::from_secs(1) && wait <= jiff::SignedDuration::from_secs(4),
        "{header} is {wait:?} away"
    );
}

#[tokio::test]
async fn pending_conflict_wording_can_be_message_only() {
    let sim = start(SimConfig {
        machines: 20,
        faults: FaultConfig {
            pending_conflict_wording: PendingConflictWording::MessageOnly,
            ..FaultConfig::default()
        },
        ..SimConfig::default()
    })
    .await;
    let api = Api::login(&sim).await;
    let machine = example("finance-laptop");
    assert_eq!(api.offboard(machine).await.0, StatusCode::CREATED);
    let (status, body) = api.offboard(machine).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&body), "BadRequest");
    assert_eq!(body["error"]["message"], "Action is already in progress");

    sim_post(
        &sim,
        "/_sim/faults",
        json!({"pending_conflict_wording": "code"}),
    )
    .await;
    let (status, body) = api.offboard(machine).await;
    assert_eq!(
        (status, error_code(&body)),
        (StatusCode::BAD_REQUEST, "ActiveRequestAlreadyExists")
    );
    assert_eq!(sim.stats().offboard_requests_by_machine[machine], 3);
    assert_eq!(sim.stats().actions_created, 1);
}

#[tokio::test]
async fn nulls_fault_serves_null_optional_fields() {
    let sim = start(SimConfig {
        pending_for: Duration::from_secs(3600),
        faults: FaultConfig {
            nulls: true,
            ..FaultConfig::default()
        },
        ..fast()
    })
    .await;
    let api = Api::login(&sim).await;
    let machine = example("finance-laptop");

    let (status, one) = api.get(&format!("/api/machines/{machine}")).await;
    assert_eq!(status, StatusCode::OK);
    let (_, listed) = api.get("/api/machines").await;
    let in_list = listed["value"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == machine)
        .unwrap()
        .clone();
    for m in [&one, &in_list] {
        assert_eq!(m["id"], machine);
        assert_eq!(m["computerDnsName"], "finance-laptop-07.contoso.com");
        for field in [
            "machineTags",
            "lastSeen",
            "osPlatform",
            "healthStatus",
            "rbacGroupId",
        ] {
            assert!(m[field].is_null(), "{field} in {m}");
            assert!(
                m.as_object().unwrap().contains_key(field),
                "present, as null"
            );
        }
    }
    assert!(
        listed["value"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["machineTags"].is_null() && m["computerDnsName"].is_string())
    );

    let (status, created) = api.offboard(machine).await;
    assert_eq!(status, StatusCode::CREATED);
    let id = created["id"].as_str().unwrap().to_owned();
    let (_, fetched) = api.get(&format!("/api/machineactions/{id}")).await;
    let (_, list) = api.get("/api/machineactions").await;
    let (_, cancelled) = api
        .post(
            &format!("/api/machineactions/{id}/cancel"),
            json!({"Comment": "stop"}),
        )
        .await;
    for a in [&created, &fetched, &list["value"][0], &cancelled] {
        assert_eq!(a["id"], id.as_str());
        assert_eq!(a["machineId"], machine);
        assert_eq!(a["type"], "Offboard");
        assert!(a["status"].is_string(), "{a}");
        assert_eq!(a["computerDnsName"], "finance-laptop-07.contoso.com");
        assert_eq!(a["requestorComment"], "decommissioned");
        assert!(a["creationDateTimeUtc"].is_string(), "{a}");
        for field in [
            "lastUpdateDateTimeUtc",
            "cancellationComment",
            "relatedFileInfo",
            "requestor",
            "commands",
            "title",
        ] {
            assert!(a[field].is_null(), "{field} in {a}");
        }
    }
    assert_eq!(cancelled["status"], "Cancelled");

    sim_post(&sim, "/_sim/faults", json!({"nulls": false})).await;
    let (_, plain) = api.get(&format!("/api/machines/{machine}")).await;
    assert_eq!(plain["osPlatform"], "Windows11");
}

#[tokio::test]
async fn list_404_rate_answers_machine_action_lists_not_found() {
    let sim = start(SimConfig {
        rate_limits: Vec::new(),
        faults: FaultConfig {
            list_404_rate: 1.0,
            ..FaultConfig::default()
        },
        ..fast()
    })
    .await;
    let api = Api::login(&sim).await;
    let (status, action) = api.offboard(example("finance-laptop")).await;
    assert_eq!(status, StatusCode::CREATED);
    let id = action["id"].as_str().unwrap();

    let (status, body) = api
        .get(&format!("/api/machineactions?$filter=id in ('{id}')"))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        body,
        json!({"error": {"code": "ResourceNotFound", "message": "Not found", "target": target(&body)}})
    );
    // Only machine-action lists: one action and machines still answer.
    let (status, _) = api.get(&format!("/api/machineactions/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(api.get("/api/machines?$top=1").await.0, StatusCode::OK);

    sim_post(&sim, "/_sim/faults", json!({"list_404_rate": 0.5})).await;
    let mut statuses = Vec::new();
    for _ in 0..40 {
        statuses.push(api.get("/api/machineactions").await.0);
    }
    let not_found = statuses
        .iter()
        .filter(|s| **s == StatusCode::NOT_FOUND)
        .count();
    assert!((5..35).contains(&not_found), "{not_found} of 40");
    assert!(
        statuses
            .iter()
            .all(|s| *s == StatusCode::OK || *s == StatusCode::NOT_FOUND)
    );

    let refused = http()
        .post(format!("{}/_sim/faults", sim.base_url()))
        .json(&json!({"list_404_rate": 1.5}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
}

// ---- the command line ----

#[derive(clap::Parser)]
struct Cli {
    #[command(flatten)]
    args: SimulateArgs,
}

#[test]
fn fault_flags_parse_into_the_config() {
    use clap::Parser;
    let config = Cli::try_parse_from([
        "simulate",
        "--time-scale",
        "10",
        "--fault-list-lag",
        "2s",
        "--fault-next-link",
        "mangled",
        "--fault-retry-after",
        "http-date",
        "--fault-pending-conflict-wording",
        "message-only",
        "--fault-nulls",
        "--fault-list-404-rate",
        "0.25",
    ])
    .unwrap()
    .args
    .into_config();
    let faults = &config.faults;
    assert_eq!(faults.list_lag, Duration::from_secs(2));
    assert_eq!(config.scaled(faults.list_lag), Duration::from_millis(200));
    assert_eq!(faults.next_link, NextLinkMode::Mangled);
    assert_eq!(faults.retry_after, RetryAfterMode::HttpDate);
    assert_eq!(
        faults.pending_conflict_wording,
        PendingConflictWording::MessageOnly
    );
    assert!(faults.nulls);
    assert_eq!(faults.list_404_rate, 0.25);

    let defaults = Cli::try_parse_from(["simulate"])
        .unwrap()
        .args
        .into_config();
    assert_eq!(defaults.faults, FaultConfig::default());
    for mode in ["seconds", "missing", "huge"] {
        assert!(Cli::try_parse_from(["simulate", "--fault-retry-after", mode]).is_ok());
    }
    assert!(Cli::try_parse_from(["simulate", "--fault-next-link", "repeat"]).is_ok());
    assert!(Cli::try_parse_from(["simulate", "--fault-list-404-rate", "1.5"]).is_err());
    assert!(Cli::try_parse_from(["simulate", "--fault-next-link", "sideways"]).is_err());
    assert_eq!(mde_simulator::parse_share("0.5"), Ok(0.5));
    assert!(mde_simulator::parse_share("2").is_err());
}

#[tokio::test]
async fn offboard_window_pages_with_top_and_skip_and_undocumented_filters_are_refused() {
    let sim = start(fast()).await;
    let api = Api::login(&sim).await;
    let mut created = Vec::new();
    for name in ["finance-laptop", "hr-desktop", "ws2019-file"] {
        let (status, action) = api.offboard(example(name)).await;
        assert_eq!(status, StatusCode::CREATED, "{action}");
        created.push(action["id"].as_str().unwrap().to_owned());
    }
    // The poll of every action in flight: type and creation time, in pages of $top.
    let window = "type eq 'Offboard' and creationDateTimeUtc ge 2020-01-01T00:00:00Z";
    let mut seen = Vec::new();
    for skip in [0, 2] {
        let (status, body) = api
            .get(&format!(
                "/api/machineactions?$filter={window}&$top=2&$skip={skip}"
            ))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(
            body.get("@odata.nextLink").is_none(),
            "$top never links: {body}"
        );
        seen.extend(ids_of(&body));
    }
    seen.sort_unstable();
    created.sort_unstable();
    assert_eq!(seen, created);
    let (_, body) = api
        .get("/api/machineactions?$filter=type eq 'Offboard' and creationDateTimeUtc ge 2100-01-01T00:00:00Z")
        .await;
    assert!(ids_of(&body).is_empty(), "{body}");

    // Properties MDE does not filter machine actions on: OData's 400, empty code.
    for filter in [
        "requestorComment eq 'x'",
        "type eq 'Offboard' and computerDnsName eq 'a'",
        "lastUpdateDateTimeUtc ge 2020-01-01T00:00:00Z",
    ] {
        let (status, body) = api
            .get(&format!("/api/machineactions?$filter={filter}"))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{filter}: {body}");
        assert_eq!(error_code(&body), "", "{filter}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with("The query specified in the URI is not valid."),
            "{message}"
        );
    }
}

// ---- a tenant's past ----

const DAY: Duration = Duration::from_secs(24 * 3600);
const REONBOARDED: &str = "aaaa00000000000000000000000000000000a001";
const STILL_OFFBOARDED: &str = "aaaa00000000000000000000000000000000a002";

/// Two machines offboarded 60 days ago by another request of the operator:
/// one seen since (onboarded again), one not; and one offboard older than
/// MDE keeps.
fn past() -> Vec<mde_simulator::MachineHistory> {
    use mde_simulator::{MachineHistory, PastOffboard};
    let old = PastOffboard::succeeded("[defender-offboard:old-key] retired", 60 * DAY);
    vec![
        MachineHistory {
            machine_id: REONBOARDED.into(),
            last_seen_ago: Duration::from_secs(3600),
            offboards: vec![old.clone()],
        },
        MachineHistory {
            machine_id: STILL_OFFBOARDED.into(),
            // A minute before the offboard ended (it took ten).
            last_seen_ago: 60 * DAY - Duration::from_secs(540),
            offboards: vec![
                PastOffboard::succeeded("[defender-offboard:older-key] x", 200 * DAY),
                old,
            ],
        },
    ]
}

fn timestamp(value: &Value) -> jiff::Timestamp {
    value.as_str().unwrap().parse().unwrap()
}

/// The past is served as MDE would: offboards of 60 days ago in the
/// machine's list (none older than 180 days), final from the start, the
/// machine's `lastSeen` after or before them; a new offboard is accepted
/// for either (nothing is pending), and the one of a machine still
/// offboarded is counted as an offboard again.
#[tokio::test]
async fn a_seeded_past_is_listed_and_a_machine_seen_since_counts_as_onboarded_again() {
    let sim = start(SimConfig {
        history: past(),
        ..fast()
    })
    .await;
    let api = Api::login(&sim).await;
    let now = jiff::Timestamp::now();
    for machine in [REONBOARDED, STILL_OFFBOARDED] {
        let (status, body) = api
            .get(&format!(
                "/api/machineactions?$filter=machineId eq '{machine}' and type eq 'Offboard'"
            ))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let listed = body["value"].as_array().unwrap();
        assert_eq!(listed.len(), 1, "older than MDE keeps is gone: {body}");
        let action = &listed[0];
        assert_eq!(action["status"], "Succeeded");
        assert_eq!(
            action["requestorComment"],
            "[defender-offboard:old-key] retired"
        );
        let age = now.duration_since(timestamp(&action["creationDateTimeUtc"]));
        assert!(
            (age.as_secs() - (60 * DAY).as_secs() as i64).abs() < 60,
            "{age:?}"
        );
        let (status, record) = api.get(&format!("/api/machines/{machine}")).await;
        assert_eq!(status, StatusCode::OK, "{record}");
        let seen_after =
            timestamp(&record["lastSeen"]) > timestamp(&action["lastUpdateDateTimeUtc"]);
        assert_eq!(seen_after, machine == REONBOARDED, "{record}");
        if machine == STILL_OFFBOARDED {
            assert_eq!(record["healthStatus"], "Inactive");
        }
    }
    for machine in [REONBOARDED, STILL_OFFBOARDED] {
        let (status, body) = api.offboard(machine).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let stats = sim.stats();
    assert_eq!(
        stats.actions_created, 2,
        "the past is not counted as created"
    );
    assert_eq!(
        stats.offboarded_again_by_machine.keys().collect::<Vec<_>>(),
        [STILL_OFFBOARDED],
        "{stats:?}"
    );
}

/// Thousands of old offboards: a window read in pages of `$top` finds them
/// all, oldest first, each with its own marker.
#[tokio::test]
async fn a_bulk_history_fills_several_pages_of_a_window_read() {
    let sim = start(SimConfig {
        bulk_history: mde_simulator::BulkHistory {
            offboards: 2500,
            span: 30 * DAY,
            marked: true,
        },
        ..fast()
    })
    .await;
    let api = Api::login(&sim).await;
    let since = (jiff::Timestamp::now() - jiff::SignedDuration::from_hours(24 * 31))
        .strftime("%Y-%m-%dT%H:%M:%SZ");
    let window = format!("type eq 'Offboard' and creationDateTimeUtc ge {since}");
    let mut listed = Vec::new();
    for skip in (0..).step_by(1000) {
        let (status, body) = api
            .get(&format!(
                "/api/machineactions?$filter={window}&$top=1000&$skip={skip}"
            ))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let page = body["value"].as_array().unwrap().clone();
        let last = page.len() < 1000;
        listed.extend(page);
        if last {
            break;
        }
    }
    assert_eq!(listed.len(), 2500);
    assert!(listed.windows(2).all(
        |w| timestamp(&w[0]["creationDateTimeUtc"]) <= timestamp(&w[1]["creationDateTimeUtc"])
    ));
    assert_eq!(
        listed[7]["requestorComment"],
        "[defender-offboard:history-7] decommissioned"
    );
    let (_, recent) = api
        .get(&format!(
            "/api/machineactions?$filter=type eq 'Offboard' and creationDateTimeUtc ge {}",
            (jiff::Timestamp::now() - jiff::SignedDuration::from_hours(24))
                .strftime("%Y-%m-%dT%H:%M:%SZ")
        ))
        .await;
    let recent = recent["value"].as_array().unwrap().len();
    assert!((75..=90).contains(&recent), "a day's share: {recent}");
}

/// Reads a predecessor made just before the start fill the hourly window:
/// the few left are served, then `429` until the oldest leaves; other
/// families keep their own budget.
#[tokio::test]
async fn prior_calls_leave_only_the_rest_of_the_window() {
    let sim = start(SimConfig {
        machines: 20,
        // 5 per second, 20 per 10 s, in MDE's time.
        rate_limits: mde_simulator::parse_rate_limits("5/1s,20/10s").unwrap().0,
        prior_calls: vec![mde_simulator::PriorCalls {
            family: "machineactions".into(),
            calls: 18,
            over: Duration::from_secs(9),
        }],
        ..SimConfig::default()
    })
    .await;
    let api = Api::login(&sim).await;
    let read = || api.get("/api/machineactions?$filter=type eq 'Offboard'");
    for _ in 0..2 {
        let (status, body) = read().await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (status, body) = read().await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    let (status, body) = api.get("/api/machines").await;
    assert_eq!(status, StatusCode::OK, "another family: {body}");
    // The oldest prior read (at 0.5 s of the 9) leaves the window 1.5 s after the start.
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let (status, body) = read().await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let unknown = SimConfig {
        prior_calls: vec![mde_simulator::PriorCalls {
            family: "reads".into(),
            calls: 1,
            over: Duration::from_secs(1),
        }],
        ..SimConfig::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refused = spawn(unknown, listener).await.err().unwrap();
    assert!(refused.to_string().contains("reads"), "{refused}");
}

/// A second POST for a machine counts as unproven unless a read after the
/// first was answered showing nothing that stands for the machine: the
/// machine's own list, or a whole window of offboards from before the first.
/// The first POST's time is kept.
#[tokio::test]
async fn a_second_offboard_post_for_a_machine_is_unproven_without_a_read_showing_none() {
    let sim = start(SimConfig {
        history: past(),
        // 3 s Pending.
        pending_for: Duration::from_secs(30),
        ..fast()
    })
    .await;
    let api = Api::login(&sim).await;
    let list = |machine: &str| {
        format!("/api/machineactions?$filter=machineId eq '{machine}' and type eq 'Offboard'")
    };
    let since = (jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1))
        .strftime("%Y-%m-%dT%H:%M:%SZ");
    let window = format!(
        "/api/machineactions?$filter=type eq 'Offboard' and creationDateTimeUtc ge {since}"
    );

    // Sent twice while the first is pending, read in between: unproven.
    let pending = example("finance-laptop");
    assert_eq!(api.offboard(pending).await.0, StatusCode::CREATED);
    assert_eq!(api.get(&list(pending)).await.0, StatusCode::OK);
    let (status, body) = api.offboard(pending).await;
    assert_eq!(
        error_code(&body),
        "ActiveRequestAlreadyExists",
        "{status} {body}"
    );

    // Cancelled, then the machine's list shows it: proven.
    let cancelled = example("hr-desktop");
    let (_, action) = api.offboard(cancelled).await;
    let id = action["id"].as_str().unwrap();
    let (status, body) = api
        .post(
            &format!("/api/machineactions/{id}/cancel"),
            json!({"Comment": "no"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(api.get(&list(cancelled)).await.0, StatusCode::OK);
    assert_eq!(api.offboard(cancelled).await.0, StatusCode::CREATED);

    // A machine MDE does not know: no read at all between the two.
    let unknown = "ffff00000000000000000000000000000000ffff";
    assert_eq!(api.offboard(unknown).await.0, StatusCode::NOT_FOUND);
    assert_eq!(api.offboard(unknown).await.0, StatusCode::NOT_FOUND);

    // Onboarded again after an old success, then cancelled: a window read from
    // before the first POST proves it. For a machine still offboarded by its
    // past, a window of recent offboards proves nothing.
    for machine in [REONBOARDED, STILL_OFFBOARDED] {
        let (_, action) = api.offboard(machine).await;
        let id = action["id"].as_str().unwrap();
        api.post(
            &format!("/api/machineactions/{id}/cancel"),
            json!({"Comment": "no"}),
        )
        .await;
    }
    assert_eq!(api.get(&window).await.0, StatusCode::OK);
    for machine in [REONBOARDED, STILL_OFFBOARDED] {
        assert_eq!(api.offboard(machine).await.0, StatusCode::CREATED);
    }

    let stats: SimStats = stats_over_http(&sim).await;
    let unproven: Vec<&str> = stats
        .unproven_offboard_requests_by_machine
        .keys()
        .map(String::as_str)
        .collect();
    let mut expected = vec![pending, unknown, STILL_OFFBOARDED];
    expected.sort_unstable();
    assert_eq!(unproven, expected, "{stats:?}");
    assert_eq!(stats.offboard_requests_by_machine[cancelled], 2);
    assert!(stats.first_offboard_request_ms.is_some_and(|ms| ms < 5000));
}
