//! The `DeviceOffboard` controller.
