//! Test-only builders of the crate's resources, in the style of
//! controller-rs's `Document::test()`: a test names what it relies on and
//! nothing else.
//!
//! ```ignore
//! let r = test_kit::offboard("laptop")
//!     .machine_id(MACHINE)
//!     .comment("returned")
//!     .namespace("it")
//!     .uid(UID)
//!     .build();
//! ```

use crate::crd::{ConnectionRef, DeviceOffboard, DeviceOffboardSpec, DeviceOffboardStatus, Phase};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// A `DeviceOffboard` named `name`, with an empty spec (no machine id, no
/// device name, an empty comment), no namespace, no metadata and no status,
/// exactly as `DeviceOffboard::new` makes it, until told otherwise.
pub(crate) fn offboard(name: &str) -> OffboardBuilder {
    OffboardBuilder(DeviceOffboard::new(
        name,
        DeviceOffboardSpec {
            machine_id: None,
            device_name: None,
            comment: String::new(),
            ttl_seconds_after_finished: None,
            connection_ref: None,
            node: None,
        },
    ))
}

/// See [`offboard`].
#[must_use]
pub(crate) struct OffboardBuilder(DeviceOffboard);

impl OffboardBuilder {
    /// `spec.machineId`.
    pub(crate) fn machine_id(mut self, id: impl Into<String>) -> Self {
        self.0.spec.machine_id = Some(id.into());
        self
    }

    /// `spec.deviceName`.
    pub(crate) fn device_name(mut self, name: impl Into<String>) -> Self {
        self.0.spec.device_name = Some(name.into());
        self
    }

    /// `spec.comment`.
    pub(crate) fn comment(mut self, comment: impl Into<String>) -> Self {
        self.0.spec.comment = comment.into();
        self
    }

    /// `spec.ttlSecondsAfterFinished` (`None` leaves it unset).
    pub(crate) fn ttl(mut self, seconds: impl Into<Option<i64>>) -> Self {
        self.0.spec.ttl_seconds_after_finished = seconds.into();
        self
    }

    /// `spec.connectionRef` (`None` leaves it unset: the default connection).
    pub(crate) fn connection<'a>(mut self, name: impl Into<Option<&'a str>>) -> Self {
        self.0.spec.connection_ref = name.into().map(|name| ConnectionRef { name: name.into() });
        self
    }

    /// `metadata.namespace`.
    pub(crate) fn namespace(mut self, namespace: &str) -> Self {
        self.0.metadata.namespace = Some(namespace.into());
        self
    }

    /// `metadata.uid` (the correlation key the operator sends to MDE).
    pub(crate) fn uid(mut self, uid: &str) -> Self {
        self.0.metadata.uid = Some(uid.into());
        self
    }

    /// `metadata.generation`.
    pub(crate) fn generation(mut self, generation: i64) -> Self {
        self.0.metadata.generation = Some(generation);
        self
    }

    /// `metadata.resourceVersion`.
    pub(crate) fn resource_version(mut self, version: &str) -> Self {
        self.0.metadata.resource_version = Some(version.into());
        self
    }

    /// `metadata.creationTimestamp`.
    pub(crate) fn created(mut self, at: jiff::Timestamp) -> Self {
        self.0.metadata.creation_timestamp = Some(Time(at));
        self
    }

    /// One label, added to those already set.
    pub(crate) fn label(mut self, key: &str, value: &str) -> Self {
        self.0
            .metadata
            .labels
            .get_or_insert_default()
            .insert(key.into(), value.into());
        self
    }

    /// The whole status (`None`: never reconciled, no status at all).
    pub(crate) fn status(mut self, status: impl Into<Option<DeviceOffboardStatus>>) -> Self {
        self.0.status = status.into();
        self
    }

    /// `status.phase`, on the status set so far (an empty one if none is).
    pub(crate) fn phase(mut self, phase: Phase) -> Self {
        self.0.status.get_or_insert_default().phase = Some(phase);
        self
    }

    pub(crate) fn build(self) -> DeviceOffboard {
        self.0
    }

    /// The spec alone, for the pure decision (which reads no metadata).
    pub(crate) fn spec(self) -> DeviceOffboardSpec {
        self.0.spec
    }
}
