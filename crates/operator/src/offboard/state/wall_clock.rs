//! The wall clock the decision reads (timestamps written into status).

use std::sync::Arc;

/// The system's clock, or one a test hands in (e.g. one that moves with
/// tokio's paused clock).
#[derive(Clone)]
pub struct WallClock(Option<Arc<dyn Fn() -> jiff::Timestamp + Send + Sync>>);

impl WallClock {
    pub fn system() -> Self {
        WallClock(None)
    }

    /// A clock that reads `now`.
    pub fn from_fn(now: impl Fn() -> jiff::Timestamp + Send + Sync + 'static) -> Self {
        WallClock(Some(Arc::new(now)))
    }

    pub fn now(&self) -> jiff::Timestamp {
        match &self.0 {
            None => jiff::Timestamp::now(),
            Some(now) => now(),
        }
    }
}

impl Default for WallClock {
    fn default() -> Self {
        Self::system()
    }
}
