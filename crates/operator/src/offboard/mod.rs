//! The offboard room: one `DeviceOffboard` from the watch event to MDE and
//! back. The pure [`decision`], the [`step`] that carries it out through two
//! [`ports`], the controller's [`reconcile`], the batch [`poller`] and the
//! process's own state. See docs/architecture.md.

pub(crate) mod adopt_index;
pub(crate) mod context;
pub mod decision;
pub mod poll_plan;
pub(crate) mod poller;
pub mod ports;
pub(crate) mod reconcile;
pub mod state;
pub mod status;
pub mod step;
pub mod tenant_slots;

pub use context::Context;
pub use ports::{KubeStore, MdeCalls, MemoryStore, StatusStore};

#[cfg(test)]
mod fakes;
#[cfg(test)]
mod machine_tests;
#[cfg(test)]
mod property_tests;
#[cfg(test)]
mod step_tests;
#[cfg(test)]
mod verifier_tests;
