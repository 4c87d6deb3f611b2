//! Sovereign-cloud presets: which login and API hosts a tenant lives on.

use url::Url;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Cloud {
    #[default]
    Commercial,
    Gcc,
    GccHigh,
    Dod,
}

impl Cloud {
    /// Every cloud by its command-line name.
    pub const NAMES: [(&'static str, Cloud); 4] = [
        ("commercial", Cloud::Commercial),
        ("gcc", Cloud::Gcc),
        ("gcc-high", Cloud::GccHigh),
        ("dod", Cloud::Dod),
    ];

    /// The cloud named `name` (`commercial`, `gcc`, `gcc-high`, `dod`).
    pub fn from_name(name: &str) -> Option<Cloud> {
        Cloud::NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, cloud)| *cloud)
    }

    pub fn authority_host(self) -> &'static str {
        match self {
            Cloud::Commercial | Cloud::Gcc => "https://login.microsoftonline.com",
            Cloud::GccHigh | Cloud::Dod => "https://login.microsoftonline.us",
        }
    }

    pub fn api_url(self) -> &'static str {
        match self {
            Cloud::Commercial => "https://api.securitycenter.microsoft.com",
            Cloud::Gcc => "https://api-gcc.securitycenter.microsoft.us",
            Cloud::GccHigh | Cloud::Dod => "https://api-gov.securitycenter.microsoft.us",
        }
    }

    /// The OAuth scope to ask for. Government scopes are not in Microsoft's
    /// pages; public clients use the API host's own `/.default`.
    pub fn scope(self) -> String {
        format!("{}/.default", self.api_url())
    }
}

/// Where the client sends tokens and requests. The only two hosts a credential
/// ever goes to.
#[derive(Clone, Debug, PartialEq)]
pub struct Endpoints {
    pub api: Url,
    pub authority: Url,
    pub scope: String,
}

impl Endpoints {
    /// The preset's hosts, with `--api-url` / `--authority-host` overriding them.
    pub fn new(
        cloud: Cloud,
        api_url: Option<&str>,
        authority_host: Option<&str>,
    ) -> Result<Self, String> {
        Self::with_http_policy(cloud, api_url, authority_host, false)
    }

    /// As [`Endpoints::new`]; `allow_http` permits plain http off loopback (a
    /// simulator inside a test cluster). Never for a real tenant.
    pub fn with_http_policy(
        cloud: Cloud,
        api_url: Option<&str>,
        authority_host: Option<&str>,
        allow_http: bool,
    ) -> Result<Self, String> {
        Self::named(
            cloud,
            (api_url, authority_host),
            allow_http,
            ("--api-url", "--authority-host"),
        )
    }

    /// As [`Endpoints::with_http_policy`], with errors naming the two
    /// overrides `fields` (e.g. a resource's `spec.apiUrl`, `spec.loginUrl`)
    /// instead of the command-line flags.
    pub fn named(
        cloud: Cloud,
        (api_url, authority_host): (Option<&str>, Option<&str>),
        allow_http: bool,
        (api_field, authority_field): (&str, &str),
    ) -> Result<Self, String> {
        let api = parse_base_url(api_field, api_url.unwrap_or(cloud.api_url()), allow_http)?;
        let authority = parse_base_url(
            authority_field,
            authority_host.unwrap_or(cloud.authority_host()),
            allow_http,
        )?;
        Ok(Endpoints {
            api,
            authority,
            scope: cloud.scope(),
        })
    }
}

fn parse_base_url(flag: &str, value: &str, allow_http: bool) -> Result<Url, String> {
    let url = Url::parse(value)
        .map_err(|e| format!("{flag} {value:?} is not a URL ({e}); give e.g. https://host"))?;
    if !matches!(url.scheme(), "https" | "http") || url.host().is_none() {
        return Err(format!(
            "{flag} {value:?} must be an http(s) URL with a host"
        ));
    }
    if url.scheme() == "http" && !is_loopback(&url) && !allow_http {
        return Err(format!(
            "{flag} {value:?} uses plain http; credentials are only sent over https (plain http is allowed for loopback simulators, or with --allow-insecure-http for a test simulator)"
        ));
    }
    Ok(url)
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    }
}

/// True when `candidate` is on the same scheme, host and port as `base`: the
/// only place a bearer token may follow a link to.
pub fn same_origin(base: &Url, candidate: &Url) -> bool {
    base.scheme() == candidate.scheme()
        && base.host_str() == candidate.host_str()
        && base.port_or_known_default() == candidate.port_or_known_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_and_overrides() {
        let gov = Endpoints::new(Cloud::GccHigh, None, None).unwrap();
        assert_eq!(
            gov.api.host_str(),
            Some("api-gov.securitycenter.microsoft.us")
        );
        assert_eq!(gov.authority.host_str(), Some("login.microsoftonline.us"));
        assert_eq!(
            gov.scope,
            "https://api-gov.securitycenter.microsoft.us/.default"
        );
        let local = Endpoints::new(
            Cloud::Commercial,
            Some("http://127.0.0.1:8090"),
            Some("http://127.0.0.1:8090"),
        )
        .unwrap();
        assert_eq!(local.api.port(), Some(8090));
        assert_eq!(
            local.scope,
            "https://api.securitycenter.microsoft.com/.default"
        );
    }

    #[test]
    fn plain_http_is_refused_off_loopback() {
        let err =
            Endpoints::new(Cloud::Commercial, Some("http://evil.example.com"), None).unwrap_err();
        assert!(err.contains("--api-url"), "{err}");
        assert!(Endpoints::new(Cloud::Commercial, Some("not a url"), None).is_err());
    }

    #[test]
    fn origin_check() {
        let base = Url::parse("https://api.securitycenter.microsoft.com").unwrap();
        assert!(same_origin(
            &base,
            &Url::parse("https://api.securitycenter.microsoft.com/api/machines?$skip=10").unwrap()
        ));
        assert!(!same_origin(
            &base,
            &Url::parse("https://attacker.example/api").unwrap()
        ));
        assert!(!same_origin(
            &base,
            &Url::parse("http://api.securitycenter.microsoft.com/api").unwrap()
        ));
    }
}
