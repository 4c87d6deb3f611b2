//! One error taxonomy for every MDE call, shaped for the decisions the
//! controller and the CLI make: retry now, retry later, look up before resending,
//! or stop and tell a person.

use super::limiter::ApiFamily;
use jiff::Timestamp;

#[derive(thiserror::Error, Debug, Clone, PartialEq)]
pub enum MdeError {
    /// The request never left: connection refused, DNS failure. Safe to retry.
    #[error("request not sent: {reason}")]
    NotSent { reason: String },

    /// The request went out but no definite answer came back (timeout, reset,
    /// 5xx on a write). The action may exist: look it up before any resend.
    #[error("outcome unknown: {reason}")]
    OutcomeUnknown { reason: String },

    /// 429: the tenant's budget for this API family is spent until `retry_at`.
    #[error("throttled by MDE on {family} calls until {retry_at}")]
    Throttled {
        family: ApiFamily,
        retry_at: Timestamp,
    },

    /// 401 after a fresh token: the credentials are not accepted by the API.
    #[error("MDE rejected the token (401): {message}")]
    Unauthorized { message: String },

    /// 403: the app lacks a permission, e.g. `Machine.Offboard`.
    #[error("MDE refused the call (403 {code}): {message}")]
    Forbidden { code: String, message: String },

    /// 404 `ResourceNotFound`.
    #[error("not found in MDE: {message}")]
    NotFound { message: String },

    /// 400 `ActiveRequestAlreadyExists`: an offboard for the machine is pending.
    #[error("an offboard action is already pending for this machine: {message}")]
    AlreadyPending { message: String },

    /// 400 `OsPlatformNotSupported`.
    #[error("the device's platform does not support offboarding through the API: {message}")]
    PlatformNotSupported { message: String },

    /// Any other 4xx, with MDE's code and message.
    #[error("MDE rejected the request ({status} {code}): {message}")]
    BadRequest {
        status: u16,
        code: String,
        message: String,
    },

    /// 5xx on a read, or an unreachable host on a read: retry later.
    #[error("MDE is unavailable ({status}): {message}")]
    Unavailable { status: u16, message: String },

    /// The login host refused the credentials (wrong secret, tenant or client id).
    #[error("sign-in failed: {message}")]
    SignIn { message: String },

    /// The credentials could not be read (missing variable or unreadable file).
    #[error("credentials not usable: {message}")]
    Credentials { message: String },

    /// This client's own rate budget has no slot now (with
    /// [`crate::client::BudgetWait::Refuse`]): nothing was sent.
    #[error("the operator's own {family} budget is spent for now{}", ready_in.map(|d| format!("; a slot frees in {}ms", d.as_millis())).unwrap_or_default())]
    BudgetSpent {
        family: ApiFamily,
        ready_in: Option<std::time::Duration>,
    },

    /// A list's `@odata.nextLink` did not advance, or the pages did not end:
    /// the list was stopped before it could spend the read budget.
    #[error("MDE's paging did not end: {message}")]
    Paging { message: String },

    /// MDE answered something this client cannot understand.
    #[error("unexpected answer from MDE: {message}")]
    InvalidResponse { message: String },
}

/// Whether a call can change something at MDE: a write whose answer is lost
/// has an unknown outcome; a read can simply be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    Read,
    Write,
}

/// How a caller should react: the coarse classes the controller decides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Retry (after a send, only once a lookup proved nothing was created:
    /// see [`MdeError::may_have_created`]).
    Transient,
    /// Wait until the given instant.
    Throttled,
    /// A person must fix credentials or permissions; retry on a long backoff.
    Access,
    /// Final for this request (not found, unsupported platform, bad request).
    Permanent,
    /// An action is already pending: adopt it.
    AlreadyPending,
}

/// The code of a 404 (`MdeError::NotFound`), as `lastError.code` records it.
pub const NOT_FOUND_CODE: &str = "ResourceNotFound";

impl MdeError {
    pub fn class(&self) -> ErrorClass {
        match self {
            MdeError::NotSent { .. }
            | MdeError::OutcomeUnknown { .. }
            | MdeError::Unavailable { .. }
            | MdeError::InvalidResponse { .. } => ErrorClass::Transient,
            MdeError::Throttled { .. } | MdeError::BudgetSpent { .. } => ErrorClass::Throttled,
            MdeError::Unauthorized { .. }
            | MdeError::Forbidden { .. }
            | MdeError::SignIn { .. }
            | MdeError::Credentials { .. } => ErrorClass::Access,
            MdeError::NotFound { .. }
            | MdeError::PlatformNotSupported { .. }
            | MdeError::BadRequest { .. }
            | MdeError::Paging { .. } => ErrorClass::Permanent,
            MdeError::AlreadyPending { .. } => ErrorClass::AlreadyPending,
        }
    }

    /// Whether a failed *send* may still have created an action at MDE: the
    /// request left and no definite refusal came back (timeout, reset, 5xx, a
    /// 2xx whose body does not parse). After such an outcome, the action must be
    /// looked up before anything is sent again. The one place this is decided.
    pub fn may_have_created(&self) -> bool {
        matches!(
            self,
            MdeError::OutcomeUnknown { .. }
                | MdeError::Unavailable { .. }
                | MdeError::InvalidResponse { .. }
        )
    }

    /// A stable code for `status.lastError.code`, metrics and events.
    pub fn code(&self) -> &str {
        match self {
            MdeError::NotSent { .. } => "NotSent",
            MdeError::OutcomeUnknown { .. } => "OutcomeUnknown",
            MdeError::Throttled { .. } => "TooManyRequests",
            MdeError::Unauthorized { .. } => "Unauthorized",
            MdeError::Forbidden { .. } => "Forbidden",
            MdeError::NotFound { .. } => NOT_FOUND_CODE,
            MdeError::AlreadyPending { .. } => "ActiveRequestAlreadyExists",
            MdeError::PlatformNotSupported { .. } => "OsPlatformNotSupported",
            MdeError::BadRequest { code, .. } => code,
            MdeError::Unavailable { .. } => "Unavailable",
            MdeError::SignIn { .. } => "SignInFailed",
            MdeError::Credentials { .. } => "CredentialsUnusable",
            MdeError::InvalidResponse { .. } => "InvalidResponse",
            MdeError::BudgetSpent { .. } => "BudgetSpent",
            MdeError::Paging { .. } => "PagingFailed",
        }
    }

    /// Classify an MDE error answer. On a [`CallKind::Write`] (offboard) a 5xx
    /// leaves the outcome unknown.
    pub fn from_status(
        status: u16,
        code: String,
        message: String,
        family: ApiFamily,
        retry_at: Option<Timestamp>,
        kind: CallKind,
    ) -> MdeError {
        match (status, code.as_str()) {
            (429, _) => MdeError::Throttled {
                family,
                retry_at: retry_at
                    .unwrap_or_else(|| Timestamp::now() + jiff::SignedDuration::from_secs(60)),
            },
            (401, _) => MdeError::Unauthorized { message },
            (403, _) => MdeError::Forbidden { code, message },
            (404, _) => MdeError::NotFound { message },
            (400, _) if is_already_pending(&code, &message) => MdeError::AlreadyPending { message },
            (400, "OsPlatformNotSupported") => MdeError::PlatformNotSupported { message },
            (500.., _) if kind == CallKind::Write => MdeError::OutcomeUnknown {
                reason: format!(
                    "MDE answered {status} {code} after the request was sent: {message}"
                ),
            },
            (500.., _) => MdeError::Unavailable {
                status,
                message: format!("{code} {message}").trim().to_string(),
            },
            _ => MdeError::BadRequest {
                status,
                code,
                message,
            },
        }
    }

    /// Classify a transport failure. A failure to connect means nothing was sent.
    pub fn from_transport(error: &reqwest::Error, kind: CallKind) -> MdeError {
        // reqwest's Display includes the URL, which carries no secret (tokens go in headers).
        let reason = error_chain(error);
        if error.is_connect() {
            MdeError::NotSent { reason }
        } else if kind == CallKind::Write {
            MdeError::OutcomeUnknown { reason }
        } else {
            MdeError::Unavailable {
                status: 0,
                message: reason,
            }
        }
    }
}

/// MDE's correlation id (`error.target` of an error body) if it looks like
/// one: 1 to 64 letters, digits or `-`. Anything else is dropped: the body
/// is hostile input, and the id reaches logs, status and Events.
pub fn request_id(target: &str) -> Option<&str> {
    let plausible = (1..=64).contains(&target.len())
        && target
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
    plausible.then_some(target)
}

impl MdeError {
    /// This error with MDE's correlation id `request_id` (already checked by
    /// [`request_id`]) at the end of its text, where people reading a status,
    /// an Event or a log find what Microsoft support asks for. The variants
    /// without text are unchanged (a 429 carries no message; its id is logged).
    pub fn with_request_id(self, request_id: Option<&str>) -> MdeError {
        let Some(id) = request_id else {
            return self;
        };
        let tag =
            |text: String| format!("{text} (MDE request id {id}; Microsoft support asks for it)");
        match self {
            MdeError::OutcomeUnknown { reason } => MdeError::OutcomeUnknown {
                reason: tag(reason),
            },
            MdeError::Unauthorized { message } => MdeError::Unauthorized {
                message: tag(message),
            },
            MdeError::Forbidden { code, message } => MdeError::Forbidden {
                code,
                message: tag(message),
            },
            MdeError::NotFound { message } => MdeError::NotFound {
                message: tag(message),
            },
            MdeError::AlreadyPending { message } => MdeError::AlreadyPending {
                message: tag(message),
            },
            MdeError::PlatformNotSupported { message } => MdeError::PlatformNotSupported {
                message: tag(message),
            },
            MdeError::BadRequest {
                status,
                code,
                message,
            } => MdeError::BadRequest {
                status,
                code,
                message: tag(message),
            },
            MdeError::Unavailable { status, message } => MdeError::Unavailable {
                status,
                message: tag(message),
            },
            other => other,
        }
    }
}

/// The wordings of "an offboard is already pending for this machine" this
/// client recognises: the code `ActiveRequestAlreadyExists` (seen in public
/// clients), or a message saying an action is already in progress, pending,
/// or that an active request exists (MDE's wording is not documented, and
/// codes have come back empty).
pub fn is_already_pending(code: &str, message: &str) -> bool {
    const WORDINGS: [&str; 4] = [
        "already in progress",
        "already pending",
        "active request already exists",
        "activerequestalreadyexists",
    ];
    let message = message.to_ascii_lowercase();
    code.eq_ignore_ascii_case("ActiveRequestAlreadyExists")
        || WORDINGS.iter().any(|w| message.contains(w))
}

/// Why an answer's body was not read whole.
#[derive(Debug)]
pub(crate) enum BodyError {
    /// Larger than the cap: by its `Content-Length` (`declared`) or while
    /// streaming. Reading stopped there; the rest was never buffered.
    TooLarge { declared: Option<u64> },
    /// The connection failed part way.
    Cut(reqwest::Error),
}

impl BodyError {
    /// Words for an error message: the cap and, when given, the declared
    /// length. Never the body's content.
    pub(crate) fn describe(&self, cap: usize) -> String {
        let cap = format!("the {} MiB cap", cap / (1024 * 1024));
        match self {
            BodyError::TooLarge {
                declared: Some(length),
            } => format!("a body of {length} bytes (content-length), over {cap}; not read"),
            BodyError::TooLarge { declared: None } => {
                format!("a body over {cap}; stopped reading there")
            }
            BodyError::Cut(error) => format!("a body cut off: {}", error_chain(error)),
        }
    }
}

/// The body of `response`, at most `cap` bytes. A declared length over the
/// cap is refused before any of the body is read; otherwise the body is read
/// chunk by chunk and given up as soon as it passes the cap, so a hostile or
/// broken server can make this hold at most `cap` bytes.
pub(crate) async fn read_capped(
    mut response: reqwest::Response,
    cap: usize,
) -> Result<Vec<u8>, BodyError> {
    let declared = response.content_length();
    if let Some(length) = declared
        && length > cap as u64
    {
        return Err(BodyError::TooLarge {
            declared: Some(length),
        });
    }
    // Sized once when the length is known (at most `cap`), so the buffer is
    // not copied while it grows.
    let mut body = Vec::with_capacity(declared.map_or(0, |length| length as usize));
    while let Some(chunk) = response.chunk().await.map_err(BodyError::Cut)? {
        if chunk.len() > cap - body.len() {
            return Err(BodyError::TooLarge { declared: None });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The error with its sources, on one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The longest `Retry-After` honoured: MDE's longest window (an hour). A
/// larger value (or a date further out) is clamped, so one hostile or broken
/// header cannot park the budget for days, nor overflow a time computation.
pub const MAX_RETRY_AFTER: jiff::SignedDuration = jiff::SignedDuration::from_secs(3600);

/// `Retry-After` is either delta-seconds or an HTTP date (RFC 9110 §10.2.3),
/// clamped to [`MAX_RETRY_AFTER`] from `now`.
pub fn parse_retry_after(value: &str, now: Timestamp) -> Option<Timestamp> {
    let value = value.trim();
    let latest = now.checked_add(MAX_RETRY_AFTER).ok()?;
    if let Ok(seconds) = value.parse::<f64>() {
        if seconds.is_finite() && seconds >= 0.0 {
            let seconds = seconds.min(MAX_RETRY_AFTER.as_secs_f64());
            return now
                .checked_add(jiff::SignedDuration::from_secs_f64(seconds))
                .ok();
        }
        return None;
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Timestamp::try_from(date).ok().map(|at| at.min(latest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_and_http_date() {
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        assert_eq!(
            parse_retry_after("7", now),
            Some("2026-01-01T00:00:07Z".parse().unwrap())
        );
        assert_eq!(
            parse_retry_after("Thu, 01 Jan 2026 00:01:00 GMT", now),
            Some("2026-01-01T00:01:00Z".parse().unwrap())
        );
        assert_eq!(parse_retry_after("soon", now), None);
        // Absurd values are clamped to an hour, never a panic or a stall of days.
        let in_an_hour = Some("2026-01-01T01:00:00Z".parse().unwrap());
        assert_eq!(parse_retry_after("1e19", now), in_an_hour);
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            in_an_hour
        );
        assert_eq!(
            parse_retry_after("Sun, 01 Jan 2090 00:00:00 GMT", now),
            in_an_hour
        );
        assert_eq!(parse_retry_after("inf", now), None);
        assert_eq!(parse_retry_after("NaN", now), None);
        assert_eq!(parse_retry_after("-3", now), None);
    }

    #[test]
    fn request_ids_keep_only_what_looks_like_one() {
        assert_eq!(
            request_id("4f1c2a9e-77b0-4f3e-9d2a-0c1b2a3d4e5f"),
            Some("4f1c2a9e-77b0-4f3e-9d2a-0c1b2a3d4e5f")
        );
        assert_eq!(request_id("A1"), Some("A1"));
        assert_eq!(request_id(&"a".repeat(64)), Some("a".repeat(64).as_str()));
        for hostile in [
            "",
            &"a".repeat(65),
            "abc def",
            "abc\nEvent: forged",
            "id; Microsoft support",
            "<script>",
            "id_1",
            "ünï",
        ] {
            assert_eq!(request_id(hostile), None, "{hostile:?}");
        }
    }

    /// Every error built from an MDE error body shows its request id; an
    /// error without one reads as before.
    #[test]
    fn errors_from_a_body_show_its_request_id() {
        let id = "4f1c2a9e-77b0-4f3e-9d2a-0c1b2a3d4e5f";
        let suffix = format!("(MDE request id {id}; Microsoft support asks for it)");
        for (status, code, kind) in [
            (401, "Unauthorized", CallKind::Read),
            (403, "Forbidden", CallKind::Read),
            (404, "ResourceNotFound", CallKind::Read),
            (400, "ActiveRequestAlreadyExists", CallKind::Write),
            (400, "OsPlatformNotSupported", CallKind::Write),
            (400, "InvalidRequestBody", CallKind::Write),
            (503, "ServiceUnavailable", CallKind::Read),
            (503, "ServiceUnavailable", CallKind::Write),
        ] {
            let error = || {
                MdeError::from_status(
                    status,
                    code.into(),
                    "the message".into(),
                    ApiFamily::Offboard,
                    None,
                    kind,
                )
            };
            let tagged = error().with_request_id(Some(id));
            let text = tagged.to_string();
            assert!(text.ends_with(&suffix), "{status} {code}: {text}");
            assert!(text.contains("the message"), "{text}");
            assert_eq!(tagged.class(), error().class(), "the class is unchanged");
            assert_eq!(tagged.code(), error().code(), "the code is unchanged");
            assert_eq!(error().with_request_id(None), error());
        }
    }

    #[test]
    fn statuses_map_to_classes() {
        let error = |status, code: &str, write: bool| {
            MdeError::from_status(
                status,
                code.into(),
                "m".into(),
                ApiFamily::Offboard,
                None,
                if write {
                    CallKind::Write
                } else {
                    CallKind::Read
                },
            )
        };
        let classify = |status, code: &str, write| error(status, code, write).class();
        assert_eq!(
            classify(429, "TooManyRequests", true),
            ErrorClass::Throttled
        );
        assert_eq!(classify(401, "Unauthorized", true), ErrorClass::Access);
        assert_eq!(classify(403, "Forbidden", true), ErrorClass::Access);
        assert_eq!(
            classify(404, "ResourceNotFound", true),
            ErrorClass::Permanent
        );
        assert_eq!(
            classify(400, "ActiveRequestAlreadyExists", true),
            ErrorClass::AlreadyPending
        );
        let pending = |code: &str, message: &str| {
            MdeError::from_status(
                400,
                code.into(),
                message.into(),
                ApiFamily::Offboard,
                None,
                CallKind::Write,
            )
            .class()
        };
        assert_eq!(
            pending("BadRequest", "Action is already in progress"),
            ErrorClass::AlreadyPending
        );
        assert_eq!(
            pending("", "An offboard action is already pending"),
            ErrorClass::AlreadyPending
        );
        assert_eq!(
            pending("BadRequest", "Comment is required"),
            ErrorClass::Permanent
        );
        assert_eq!(
            classify(400, "OsPlatformNotSupported", true),
            ErrorClass::Permanent
        );
        assert_eq!(
            classify(400, "InvalidRequestBody", true),
            ErrorClass::Permanent
        );
        assert_eq!(
            classify(503, "ServiceUnavailable", true),
            ErrorClass::Transient
        );
        assert_eq!(
            classify(503, "ServiceUnavailable", false),
            ErrorClass::Transient
        );
        // Only a write whose outcome is unknown may hide a created action.
        assert!(error(503, "ServiceUnavailable", true).may_have_created());
        assert!(!error(429, "TooManyRequests", true).may_have_created());
        assert!(!error(400, "InvalidRequestBody", true).may_have_created());
        assert!(!error(401, "Unauthorized", true).may_have_created());
        assert!(
            MdeError::InvalidResponse {
                message: "2xx body does not parse".into()
            }
            .may_have_created()
        );
        assert!(
            !MdeError::NotSent {
                reason: "refused".into()
            }
            .may_have_created()
        );
    }
}
