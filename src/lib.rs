//! defender-offboard: the binary's subcommands, and a facade over the workspace
//! crates so tests and benchmarks name one crate.
//!
//! - [`mde`] (`crates/mde-client`): the MDE API client;
//! - [`operator`] (`crates/operator`): the controller;
//! - with the default `dev` feature, [`simulator`] (`crates/mde-simulator`) and
//!   [`devcluster`] (`crates/devcluster`): the test doubles, and [`playground`].

pub mod cli;
pub mod offboard;
pub mod plan;
#[cfg(feature = "dev")]
pub mod playground;

pub use mde_client as mde;
pub use offboard_operator as operator;
pub use offboard_operator::{crd, metrics, telemetry};

#[cfg(feature = "dev")]
pub use devcluster;
#[cfg(feature = "dev")]
pub use mde_simulator as simulator;
