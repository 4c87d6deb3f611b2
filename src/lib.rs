//! defender-offboard: a Kubernetes operator that offboards Windows devices from
//! Microsoft Defender for Endpoint exactly once per `DeviceOffboard` resource.

pub mod controller;
pub mod crd;
pub mod defender;
pub mod devcluster;
pub mod metrics;
pub mod offboard;
pub mod playground;
pub mod simulator;
pub mod telemetry;
