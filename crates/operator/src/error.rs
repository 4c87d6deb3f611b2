//! The operator's error vocabulary: what a reconcile can fail with. A leaf:
//! every room may import it; it imports nothing of the crate. Every MDE
//! outcome ends in the resource's status instead; these are the store's.

#[derive(thiserror::Error, Debug)]
pub enum Error {
    #[error("Kubernetes API error: {0}")]
    Kube(#[source] kube::Error),
    #[error(
        "the resource changed while being written (409 Conflict); retrying with the latest version"
    )]
    Conflict,
    #[error("the resource has no metadata.uid")]
    MissingUid,
}

impl Error {
    /// A bounded label for `defender_offboard_reconcile_errors_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Conflict => "conflict",
            Error::MissingUid => "missing_uid",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
