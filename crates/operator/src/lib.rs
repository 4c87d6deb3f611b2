//! The `DeviceOffboard` operator, in rooms by concern (docs/architecture.md):
//!
//! - [`offboard`]: one resource from the watch to MDE and back (the pure
//!   decision, the step, the ports, the poller);
//! - [`tenants`]: which MDE tenant and client a resource goes through;
//! - [`nodes`]: a deleted Node's `DeviceOffboard`; [`ttl`]: cleanup of
//!   final resources; [`cache`]: what leaves the controller's cache;
//! - [`runtime`]: the composition root (`run`), leader election, gauges;
//! - leaves every room may use: [`error`], [`crd`], [`metrics`],
//!   [`telemetry`], and within the crate `lease_clock`, `tasks`, `pages`.
//!
//! It talks to MDE only through `mde-client`, to Kubernetes only through
//! kube-rs, and never depends on a test double.

pub mod cache;
pub mod crd;
pub mod error;
pub(crate) mod lease_clock;
pub mod metrics;
pub mod nodes;
pub mod offboard;
pub(crate) mod pages;
pub mod runtime;
pub(crate) mod tasks;
pub mod telemetry;
pub mod tenants;
#[cfg(test)]
pub(crate) mod test_kit;
pub mod ttl;
