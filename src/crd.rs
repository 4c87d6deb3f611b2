//! The `DeviceOffboard` custom resource.
