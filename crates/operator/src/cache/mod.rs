//! The cache room: what leaves the controller's cache. Final resources are
//! labelled out of the watch and objects are trimmed before they are cached
//! ([`final_label`]); a final label on a resource whose status is not final
//! is removed, so it comes back into the watch ([`stray_label`]); resources
//! that wait long are parked outside it until shortly before their time
//! ([`parked`]). See docs/architecture.md.

pub mod final_label;
pub(crate) mod parked;
pub mod stray_label;
