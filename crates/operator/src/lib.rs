//! The `DeviceOffboard` operator: the resource, the reconcile (a pure decision
//! behind two small ports), the batch poller, leader election, metrics and
//! telemetry. It talks to MDE only through `mde-client`, and to Kubernetes only
//! through kube-rs; it never depends on a test double.

pub mod connection;
pub mod controller;
pub mod crd;
pub mod metrics;
pub mod telemetry;
