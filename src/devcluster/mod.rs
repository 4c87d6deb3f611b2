//! In-memory Kubernetes API double for `defender-offboard dev` and tests.

/// Command-line arguments of `defender-offboard dev`.
#[derive(clap::Args, Debug, Clone)]
pub struct DevArgs {}

pub async fn run(_args: DevArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    Err("dev playground not built yet".into())
}
