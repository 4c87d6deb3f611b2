//! Microsoft Defender for Endpoint API client: sign-in, clouds, typed calls,
//! one error taxonomy and the rate budget. It knows nothing of Kubernetes.

pub mod auth;
pub mod client;
pub mod cloud;
pub mod error;
pub mod limiter;
pub mod types;

pub use auth::{
    CertificateAssertion, ClientIdentity, Credential, CredentialSource, FetchedCredential, Secret,
    token_roles,
};
pub use client::{
    Account, BudgetWait, CallObserver, ClientConfig, DefenderClient, NoObserver, SharedHttp,
    comment_with_marker, correlation_marker, has_marker, marker_key,
};
pub use cloud::{Cloud, Endpoints};
pub use error::{ErrorClass, MdeError};
pub use limiter::{ApiFamily, RateBudget, RateLimits};
pub use types::{ActionStatus, Machine, MachineAction, VmMetadata};
