//! Microsoft Defender for Endpoint API client: sign-in, rate budget, typed calls.
