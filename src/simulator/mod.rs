//! A faithful MDE API simulator (`defender-offboard simulate`).

/// Command-line arguments of `defender-offboard simulate`.
#[derive(clap::Args, Debug, Clone)]
pub struct SimulateArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub listen: std::net::SocketAddr,
}

pub async fn run(_args: SimulateArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    Err("simulator not built yet".into())
}
