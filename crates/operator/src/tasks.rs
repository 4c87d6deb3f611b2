//! Background tasks that live exactly as long as their owner. A leaf: the
//! runtime and the poller both hold tasks this way.

/// A task handle that aborts its task when dropped: a detached task (a
/// poller after a lost lease) would go on writing.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
