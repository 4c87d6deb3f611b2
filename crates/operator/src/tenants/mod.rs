//! The tenants room: which MDE tenant a resource is offboarded through. The
//! `DefenderConnection` resource, the registry of each tenant's client, and
//! the controller that signs each connection in, and the protection rules a
//! connection adds to the operator's own. It never reaches into the
//! offboard room. See docs/architecture.md.

pub mod access;
pub mod controller;
pub mod protection;
pub(crate) mod registry;
pub mod resource;

pub use registry::{ConnectionKey, Connections, DefaultNamespaces, TenantClient, Unavailable};
pub use resource::DefenderConnection;
