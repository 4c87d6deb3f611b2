//! Whether an app can do what the operator asks of it: offboard, and read the
//! machines and machine actions that prove what it did. Judged from the
//! token's `roles` claim when it has one, else by a cheap read: Microsoft
//! Entra asks clients not to depend on reading tokens issued for an API they
//! do not own, so a token without readable roles is not refused for that.

use super::resource::reason;
use mde_client::{DefenderClient, MdeError};

/// The permission an app needs to offboard.
pub const OFFBOARD_ROLE: &str = "Machine.Offboard";
/// Either permission lets the app read machines and machine actions, which
/// resolution, adoption and polling all need.
pub const READ_ROLES: [&str; 2] = ["Machine.Read.All", "Machine.ReadWrite.All"];

/// The outcome of one check, as a `Ready` condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Readiness {
    pub(crate) fn not(reason: &'static str, message: impl Into<String>) -> Self {
        Readiness {
            ready: false,
            reason,
            message: message.into(),
        }
    }

    fn ready(message: impl Into<String>) -> Self {
        Readiness {
            ready: true,
            reason: reason::SIGNED_IN,
            message: message.into(),
        }
    }

    /// Worth trying again soon on its own (a host briefly down), not a
    /// person's to fix.
    pub fn is_transient(&self) -> bool {
        self.reason == reason::LOGIN_UNAVAILABLE || self.reason == reason::MDE_UNAVAILABLE
    }
}

/// Whether a sign-in's roles leave a read to be tried: only when the token
/// does not say what it grants.
pub fn needs_read_probe(signed_in: &Result<Option<Vec<String>>, MdeError>) -> bool {
    matches!(signed_in, Ok(None))
}

/// What a sign-in (the roles its token grants, `None` when unreadable) and,
/// for a token that does not say, a read of one machine tell about an app.
pub fn readiness(
    signed_in: Result<Option<&[String]>, &MdeError>,
    read_probe: Option<Result<(), &MdeError>>,
) -> Readiness {
    let roles = match signed_in {
        Err(MdeError::Credentials { message }) => {
            return Readiness::not(reason::CREDENTIAL_NOT_FOUND, message.clone());
        }
        Err(error @ MdeError::SignIn { .. }) => {
            return Readiness::not(reason::AUTHENTICATION_FAILED, error.to_string());
        }
        Err(error) => return Readiness::not(reason::LOGIN_UNAVAILABLE, error.to_string()),
        Ok(roles) => roles,
    };
    let Some(roles) = roles else {
        return match read_probe {
            Some(Ok(())) => Readiness::ready(format!(
                "signed in to Microsoft Defender for Endpoint; the token does not list its roles, and a read of machines succeeded ({OFFBOARD_ROLE} is checked by MDE on the first offboard)"
            )),
            Some(Err(MdeError::Forbidden { .. })) => Readiness::not(
                reason::PERMISSION_DENIED,
                format!(
                    "signed in, but MDE refused to list machines (403): grant the app {} or {} (and {OFFBOARD_ROLE}) with admin consent in Microsoft Entra",
                    READ_ROLES[0], READ_ROLES[1]
                ),
            ),
            Some(Err(error)) => Readiness::not(
                reason::MDE_UNAVAILABLE,
                format!("signed in, but a read of machines failed: {error}"),
            ),
            None => Readiness::not(
                reason::MDE_UNAVAILABLE,
                "signed in; the token does not list its roles and no read was tried",
            ),
        };
    };
    let has = |role: &str| roles.iter().any(|r| r.eq_ignore_ascii_case(role));
    let grants = || {
        if roles.is_empty() {
            "none".to_string()
        } else {
            roles.join(", ")
        }
    };
    let mut missing = Vec::new();
    if !has(OFFBOARD_ROLE) {
        missing.push(OFFBOARD_ROLE.to_string());
    }
    if !READ_ROLES.iter().any(|r| has(r)) {
        missing.push(format!("{} (or {})", READ_ROLES[0], READ_ROLES[1]));
    }
    if missing.is_empty() {
        Readiness::ready(
            "signed in to Microsoft Defender for Endpoint; the app may offboard and read machines",
        )
    } else {
        Readiness::not(
            reason::PERMISSION_DENIED,
            format!(
                "signed in, but the app lacks the {} application permission{} (its token grants: {}); grant {} with admin consent in Microsoft Entra",
                missing.join(" and "),
                if missing.len() > 1 { "s" } else { "" },
                grants(),
                if missing.len() > 1 { "them" } else { "it" },
            ),
        )
    }
}

/// Sign in and judge the app: by its roles, or by a read when its token
/// does not list them.
pub async fn check(client: &DefenderClient) -> Readiness {
    let signed_in = client.granted_roles().await;
    let probe = if needs_read_probe(&signed_in) {
        Some(client.probe_read().await)
    } else {
        None
    };
    readiness(
        signed_in.as_ref().map(|roles| roles.as_deref()),
        probe.as_ref().map(|p| p.as_ref().map(|_| ())),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roles(list: &[&str]) -> Vec<String> {
        list.iter().map(|r| r.to_string()).collect()
    }

    /// (roles the token lists, read probe, ready, reason, words in the message)
    type Row<'a> = (
        Option<&'a [String]>,
        Option<Result<(), &'a MdeError>>,
        bool,
        &'static str,
        &'static [&'static str],
    );

    /// One row per answer a person acts on: ready, and every reason not.
    #[test]
    fn readiness_names_what_is_missing_and_who_acts() {
        let forbidden = MdeError::Forbidden {
            code: "Forbidden".into(),
            message: "no read role".into(),
        };
        let down = MdeError::Unavailable {
            status: 503,
            message: "unavailable".into(),
        };
        let offboard_only = roles(&["Machine.Offboard"]);
        let read_only = roles(&["Machine.Read.All"]);
        let both = roles(&["Machine.Offboard", "Machine.Read.All"]);
        let both_rw = roles(&["machine.offboard", "Machine.ReadWrite.All"]);
        let none = roles(&[]);
        // (signed in with roles, read probe) → (ready, reason, words in message)
        let table: Vec<Row> = vec![
            (Some(&both), None, true, reason::SIGNED_IN, &[]),
            (Some(&both_rw), None, true, reason::SIGNED_IN, &[]),
            (
                Some(&offboard_only),
                None,
                false,
                reason::PERMISSION_DENIED,
                &[
                    "Machine.Read.All",
                    "Machine.ReadWrite.All",
                    "grants: Machine.Offboard",
                ],
            ),
            (
                Some(&read_only),
                None,
                false,
                reason::PERMISSION_DENIED,
                &[
                    "lacks the Machine.Offboard application permission",
                    "grants: Machine.Read.All",
                ],
            ),
            (
                Some(&none),
                None,
                false,
                reason::PERMISSION_DENIED,
                &[
                    "Machine.Offboard and Machine.Read.All",
                    "permissions",
                    "grants: none",
                ],
            ),
            (
                None,
                Some(Ok(())),
                true,
                reason::SIGNED_IN,
                &["does not list its roles"],
            ),
            (
                None,
                Some(Err(&forbidden)),
                false,
                reason::PERMISSION_DENIED,
                &["Machine.Read.All", "403"],
            ),
            (
                None,
                Some(Err(&down)),
                false,
                reason::MDE_UNAVAILABLE,
                &["503"],
            ),
        ];
        for (row, (signed_in, probe, ready, why, words)) in table.into_iter().enumerate() {
            let r = readiness(Ok(signed_in), probe);
            assert_eq!((r.ready, r.reason), (ready, why), "row {row}: {r:?}");
            for word in words {
                assert!(
                    r.message.contains(word),
                    "row {row}: {word:?} in {:?}",
                    r.message
                );
            }
        }
    }

    #[test]
    fn a_failed_sign_in_says_whose_it_is_to_fix() {
        let refused = MdeError::SignIn {
            message: "invalid_client".into(),
        };
        assert_eq!(
            readiness(Err(&refused), None).reason,
            reason::AUTHENTICATION_FAILED
        );
        let missing = MdeError::Credentials {
            message: "Secret \"s\" does not exist".into(),
        };
        assert_eq!(
            readiness(Err(&missing), None).reason,
            reason::CREDENTIAL_NOT_FOUND
        );
        let down = MdeError::NotSent {
            reason: "login host down".into(),
        };
        let r = readiness(Err(&down), None);
        assert_eq!(r.reason, reason::LOGIN_UNAVAILABLE);
        assert!(r.is_transient());
    }

    #[test]
    fn only_a_token_without_roles_costs_a_read() {
        assert!(needs_read_probe(&Ok(None)));
        assert!(!needs_read_probe(&Ok(Some(roles(&["Machine.Offboard"])))));
        assert!(!needs_read_probe(&Err(MdeError::SignIn {
            message: "x".into()
        })));
    }
}
