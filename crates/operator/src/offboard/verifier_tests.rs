//! The Kubernetes calls of the main paths, asserted one by one against a mock
//! API server (tower-test), with the in-memory MDE of [`super::fakes`].

use super::context::Context;
use super::decision::Settings;
use super::fakes::FakeMde;
use super::reconcile::reconcile;
use crate::cache::final_label::FINAL_LABEL;
use crate::crd::{DeviceOffboard, DeviceOffboardStatus, Phase};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::test_kit;
use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

const MACHINE: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567";
const UID: &str = "6f1c1a52-1111-4a4a-9c9c-000000000001";
const STATUS_PATH: &str =
    "/apis/defender.offboard.dev/v1alpha1/namespaces/it/deviceoffboards/laptop/status";

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

async fn setup() -> (Arc<Context<FakeMde>>, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let ctx = Context::new(
        client,
        FakeMde::default(),
        Arc::new(Metrics::default()),
        Settings::default(),
        None,
    );
    (Arc::new(ctx), handle)
}

fn resource(status: Option<DeviceOffboardStatus>) -> DeviceOffboard {
    test_kit::offboard("laptop")
        .machine_id(MACHINE)
        .comment("returned")
        .namespace("it")
        .uid(UID)
        .resource_version("10")
        .generation(1)
        .status(status)
        .build()
}

/// Expect one request; answer it with `answer(body)`; return the body.
async fn expect(
    handle: &mut Handle,
    method: Method,
    path: &str,
    answer: impl FnOnce(&Value) -> (StatusCode, Value),
) -> Value {
    let (request, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .unwrap_or_else(|_| panic!("no {method} {path} request came"))
        .expect("service dropped");
    assert_eq!(request.method(), method, "method of {}", request.uri());
    assert_eq!(request.uri().path(), path);
    let bytes = http_body_util::BodyExt::collect(request.into_body())
        .await
        .unwrap()
        .to_bytes();
    let body: Value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    let (status, reply) = answer(&body);
    send.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(&reply).unwrap()))
            .unwrap(),
    );
    body
}

/// Expect the next request to create an Event through events.k8s.io/v1.
async fn expect_event(handle: &mut Handle) -> Value {
    expect(
        handle,
        Method::POST,
        "/apis/events.k8s.io/v1/namespaces/it/events",
        |body| (StatusCode::CREATED, body.clone()),
    )
    .await
}

/// What the API server would return after a merge patch: the object with the new status.
fn patched(obj: &DeviceOffboard, patch: &Value, rv: &str) -> Value {
    let mut value = serde_json::to_value(obj).unwrap();
    json_patch::merge(&mut value, &json!({ "status": patch["status"] }));
    value["metadata"]["resourceVersion"] = json!(rv);
    value
}

#[tokio::test]
async fn new_resource_records_intent_with_a_precondition_then_the_action() {
    let (ctx, mut handle) = setup().await;
    let obj = resource(None);
    let reconciling = tokio::spawn(reconcile(Arc::new(obj.clone()), ctx.clone()));

    // 1. The intent record: phase Submitting, attempts 1, and the resourceVersion precondition.
    let submitting = expect(&mut handle, Method::PATCH, STATUS_PATH, |body| {
        (StatusCode::OK, patched(&obj, body, "11"))
    })
    .await;
    assert_eq!(
        submitting["metadata"]["resourceVersion"], "10",
        "the intent write carries a precondition"
    );
    assert_eq!(submitting["status"]["phase"], "Submitting");
    assert_eq!(submitting["status"]["attempts"], 1);
    assert_eq!(submitting["status"]["machineId"], MACHINE);
    assert!(submitting["status"]["machineActionId"].is_null());
    let after_intent: DeviceOffboard =
        serde_json::from_value(patched(&obj, &submitting, "11")).unwrap();

    // 2. After the send: the action id, MDE's status, Submitted=True; precondition on the new version.
    let recorded = expect(&mut handle, Method::PATCH, STATUS_PATH, |body| {
        (StatusCode::OK, patched(&after_intent, body, "12"))
    })
    .await;
    assert_eq!(recorded["metadata"]["resourceVersion"], "11");
    assert_eq!(recorded["status"]["phase"], "InProgress");
    assert_eq!(recorded["status"]["actionStatus"], "Pending");
    let action_id = recorded["status"]["machineActionId"]
        .as_str()
        .unwrap()
        .to_string();
    let submitted = recorded["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Submitted")
        .unwrap();
    assert_eq!(
        (submitted["status"].as_str(), submitted["reason"].as_str()),
        (Some("True"), Some("Requested"))
    );

    // 3. The event, through events.k8s.io/v1.
    let event = expect_event(&mut handle).await;
    assert_eq!(event["reason"], "OffboardRequested");
    assert!(event["note"].as_str().unwrap().contains(&action_id));

    reconciling.await.unwrap().unwrap();
    // The comment MDE got carries the uid marker.
    assert_eq!(ctx.connections.default_client().unwrap().posts_for(UID), 1);
}

#[tokio::test]
async fn a_stale_intent_write_sends_nothing() {
    let (ctx, mut handle) = setup().await;
    let obj = resource(None);
    let reconciling = tokio::spawn(reconcile(Arc::new(obj), ctx.clone()));
    expect(&mut handle, Method::PATCH, STATUS_PATH, |_| {
        (
            StatusCode::CONFLICT,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409,
                   "message": "Operation cannot be fulfilled: the object has been modified"}),
        )
    })
    .await;
    let result = reconciling.await.unwrap();
    assert!(matches!(result, Err(Error::Conflict)), "{result:?}");
    assert_eq!(
        ctx.connections.default_client().unwrap().posts_for(UID),
        0,
        "no offboard without the intent record"
    );
}

#[tokio::test]
async fn found_in_submitting_after_a_crash_adopts_without_sending() {
    let (ctx, mut handle) = setup().await;
    // A previous process sent the request and died before recording the answer.
    let marker = mde_client::correlation_marker(UID);
    let created = ctx
        .connections
        .default_client()
        .unwrap()
        .insert(MACHINE, &format!("{marker} returned"));
    let crashed = DeviceOffboardStatus {
        phase: Some(Phase::Submitting),
        machine_id: Some(MACHINE.into()),
        attempts: Some(1),
        submitted_at: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            jiff::Timestamp::now() - jiff::SignedDuration::from_secs(60),
        )),
        ..Default::default()
    };
    let obj = resource(Some(crashed));
    let reconciling = tokio::spawn(reconcile(Arc::new(obj.clone()), ctx.clone()));
    let adopted = expect(&mut handle, Method::PATCH, STATUS_PATH, |body| {
        (StatusCode::OK, patched(&obj, body, "11"))
    })
    .await;
    assert_eq!(adopted["metadata"]["resourceVersion"], "10");
    assert_eq!(adopted["status"]["machineActionId"], created.id.as_str());
    assert_eq!(adopted["status"]["attempts"], 1, "adoption sends nothing");
    let event = expect_event(&mut handle).await;
    assert_eq!(event["reason"], "OffboardAdopted");
    reconciling.await.unwrap().unwrap();
    assert_eq!(
        ctx.connections.default_client().unwrap().posts_for(UID),
        0,
        "adopted, nothing sent"
    );
    assert_eq!(
        ctx.connections
            .default_client()
            .unwrap()
            .actions_for(MACHINE),
        1
    );
}

#[tokio::test]
async fn terminal_resources_cost_no_calls() {
    let (ctx, mut handle) = setup().await;
    let done = DeviceOffboardStatus {
        phase: Some(Phase::Succeeded),
        machine_action_id: Some("a".into()),
        ..Default::default()
    };
    let mut labelled = resource(Some(done));
    labelled
        .metadata
        .labels
        .get_or_insert_default()
        .insert(FINAL_LABEL.into(), "true".into());
    reconcile(Arc::new(labelled), ctx.clone()).await.unwrap();
    let next = tokio::time::timeout(Duration::from_millis(100), handle.next_request()).await;
    assert!(matches!(next, Err(_) | Ok(None)), "no Kubernetes call");
    assert_eq!(
        ctx.connections.default_client().unwrap().calls(),
        0,
        "no MDE call"
    );
}

/// A restart after the final status landed but its label did not: the
/// resource is still final (no MDE call); it only gets its label.
#[tokio::test]
async fn a_final_resource_whose_label_was_lost_is_only_labelled() {
    let (ctx, mut handle) = setup().await;
    let done = DeviceOffboardStatus {
        phase: Some(Phase::Failed),
        machine_action_id: Some("a".into()),
        ..Default::default()
    };
    let obj = resource(Some(done));
    let reconciling = tokio::spawn(reconcile(Arc::new(obj.clone()), ctx.clone()));
    let body = expect(
        &mut handle,
        Method::PATCH,
        "/apis/defender.offboard.dev/v1alpha1/namespaces/it/deviceoffboards/laptop",
        |_| (StatusCode::OK, serde_json::to_value(&obj).unwrap()),
    )
    .await;
    assert_eq!(body["metadata"]["labels"][FINAL_LABEL], "true");
    assert!(body.get("status").is_none(), "the status is not touched");
    reconciling.await.unwrap().unwrap();
    assert_eq!(
        ctx.connections.default_client().unwrap().calls(),
        0,
        "no MDE call"
    );
}

/// The poll that makes a resource final writes the status, then the label.
#[tokio::test]
async fn the_final_status_write_is_followed_by_the_label() {
    let (ctx, mut handle) = setup().await;
    let action = ctx
        .connections
        .default_client()
        .unwrap()
        .insert(MACHINE, "[defender-offboard:x] returned");
    let in_progress = DeviceOffboardStatus {
        phase: Some(Phase::InProgress),
        machine_id: Some(MACHINE.into()),
        machine_action_id: Some(action.id.clone()),
        ..Default::default()
    };
    let obj = resource(Some(in_progress));
    let mut done = action.clone();
    done.status = mde_client::ActionStatus::Succeeded;
    let recording = {
        let (ctx, obj) = (ctx.clone(), obj.clone());
        tokio::spawn(async move {
            super::step::record_poll(
                &ctx.ports(&ctx.connections.default_client().unwrap()),
                &obj,
                &done,
            )
            .await
        })
    };
    let written = obj.clone();
    let status = expect(&mut handle, Method::PATCH, STATUS_PATH, |patch| {
        (StatusCode::OK, patched(&written, patch, "11"))
    })
    .await;
    assert_eq!(status["status"]["phase"], "Succeeded");
    let label = expect(
        &mut handle,
        Method::PATCH,
        "/apis/defender.offboard.dev/v1alpha1/namespaces/it/deviceoffboards/laptop",
        |_| (StatusCode::OK, serde_json::to_value(&obj).unwrap()),
    )
    .await;
    assert_eq!(label["metadata"]["labels"][FINAL_LABEL], "true");
    // Then the Event of the transition.
    expect_event(&mut handle).await;
    recording.await.unwrap().unwrap();
}
