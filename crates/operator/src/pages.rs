//! Paged Kubernetes lists, followed by `continue` tokens. Hand-written because
//! kube-rs offers paging only inside its watcher: the sweeps here list once
//! and act on each page. The API server (or a proxy before it) is not trusted
//! to end the list: a token that does not advance, or more pages than any
//! cluster holds, ends it instead of listing forever.

use kube::api::ListParams;

/// More pages than any list of this operator's objects can need (100 objects
/// a page: a million objects).
pub const MAX_PAGES: u32 = 10_000;

/// Objects per page of every list (and watch re-list) that reads whole
/// objects. Anyone who may create a resource can give it 256 KiB of
/// annotations (the API server's limit), which arrive before they can be
/// dropped: a page is held once as its body and once decoded, so 100 objects
/// cost at most about 50 MiB of the pod's 128 MiB limit, where the usual
/// 500 would pass it. 50,000 resources are still read in 500 calls.
pub const FULL_OBJECT_PAGE: u32 = 100;

/// Where a paged list stands.
#[derive(Debug, Clone)]
pub struct Pages {
    params: ListParams,
    read: u32,
    last_token: Option<String>,
}

impl Pages {
    /// A list in pages of `limit` objects.
    pub fn new(limit: u32) -> Self {
        Pages {
            params: ListParams::default().limit(limit),
            read: 0,
            last_token: None,
        }
    }

    /// A list of the objects `selector` selects, in pages of `limit`.
    pub fn with_labels(limit: u32, selector: &str) -> Self {
        Pages {
            params: ListParams::default().limit(limit).labels(selector),
            ..Self::new(limit)
        }
    }

    /// The parameters of the next page to read.
    pub fn params(&self) -> &ListParams {
        &self.params
    }

    /// After a page with this `continue` token: whether to read another.
    pub fn advance(&mut self, token: Option<String>) -> bool {
        self.read = self.read.saturating_add(1);
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return false;
        };
        if self.last_token.as_deref() == Some(token.as_str()) || self.read >= MAX_PAGES {
            tracing::warn!(
                pages = self.read,
                "the list's continue token does not advance (or the list never ends); stopped reading it"
            );
            return false;
        }
        self.params = self.params.clone().continue_token(&token);
        self.last_token = Some(token);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_end_on_the_last_page_a_repeated_token_or_the_bound() {
        let mut pages = Pages::new(500);
        assert_eq!(pages.params().limit, Some(500));
        assert!(pages.advance(Some("a".into())));
        assert_eq!(pages.params().continue_token.as_deref(), Some("a"));
        assert!(pages.advance(Some("b".into())));
        assert!(
            !pages.advance(Some("b".into())),
            "a token that does not advance"
        );
        assert!(!Pages::new(1).advance(None), "the last page");
        assert!(
            !Pages::new(1).advance(Some(String::new())),
            "an empty token"
        );
        let mut endless = Pages::new(1);
        let mut read = 1;
        while endless.advance(Some(format!("t{read}"))) {
            read += 1;
        }
        assert_eq!(read, MAX_PAGES);
    }
}
