//! The root package's integration tests, in one binary so a 2-core machine
//! links one test executable instead of eight. Everything runs on loopback.
//!
//! - `chart`, `crd_admission`: the Helm chart and the CRD against the generated types;
//! - `observability`: the chart's alerts and dashboard against the registered metrics;
//! - `client`, `cli`: the MDE client and the `offboard` command against the simulator;
//! - `controller`, `rbac`: the controller in process against the in-memory API;
//! - `final_label`: a final label the operator did not write, against the same;
//! - `lifecycle`: node offboarding and TTL cleanup against the in-memory API;
//! - `tenants`: several MDE tenants through DefenderConnections;
//! - `safety`: the blast-radius breaker and the two-person rule in the controller;
//! - `fault_matrix`: the controller under one kind of MDE misbehaviour per row;
//! - `e2e`: the built binary with real `kubectl` (or a real cluster, see README).

mod bench_smoke;
mod budget_seed;
mod chart;
mod cli;
mod client;
mod cold_start;
mod common;
mod controller;
mod crd_admission;
mod e2e;
mod fault_matrix;
mod final_label;
mod lifecycle;
mod observability;
mod plan;
mod rbac;
mod real_tenant;
mod safety;
mod status_shapes;
mod tenants;
