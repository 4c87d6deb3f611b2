//! `limit` and `continue` on lists, as kube-apiserver pages them: every page is
//! read at the first page's resourceVersion, and a token whose version left the
//! kept history answers `410 Expired`.

use super::status::ApiError;
use super::store::Key;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What a list request asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageRequest<'a> {
    /// `limit`; 0 or absent means everything.
    pub limit: usize,
    /// `continue` as received.
    pub token: Option<&'a str>,
}

/// The position a `continue` token carries (kube's is also base64 JSON with `rv` and `start`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Continue {
    pub rv: u64,
    /// The last key of the previous page: the next page starts after it.
    pub namespace: String,
    pub name: String,
}

impl Continue {
    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        URL_SAFE_NO_PAD.encode(json)
    }

    pub fn decode(token: &str) -> Result<Self, ApiError> {
        URL_SAFE_NO_PAD
            .decode(token)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .ok_or_else(|| ApiError::bad_request("continue key is not valid"))
    }

    /// The key the next page starts after.
    pub fn key(&self) -> Key {
        (self.namespace.clone(), self.name.clone())
    }
}

/// One page of a list.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    pub items: Vec<Value>,
    pub rv: u64,
    pub continue_token: Option<String>,
    /// Items after this page (kube reports it when no selector filters the list).
    pub remaining: Option<usize>,
}

/// The page a list answers: `taken` (the first `limit` matching objects after
/// the token, ordered by key, all read at `rv`) and how many matching ones
/// follow them (for a filtered list, only whether any do).
pub fn page(taken: Vec<(Key, Value)>, following: usize, rv: u64, filtered: bool) -> Page {
    if following == 0 {
        return Page {
            items: taken.into_iter().map(|(_, v)| v).collect(),
            rv,
            continue_token: None,
            remaining: None,
        };
    }
    let last = taken.last().map(|(key, _)| key.clone()).unwrap_or_default();
    Page {
        items: taken.into_iter().map(|(_, v)| v).collect(),
        rv,
        continue_token: Some(
            Continue {
                rv,
                namespace: last.0,
                name: last.1,
            }
            .encode(),
        ),
        remaining: (!filtered).then_some(following),
    }
}

/// kube-apiserver's answer to a `continue` whose version is no longer kept.
pub fn expired_token() -> ApiError {
    ApiError::new(
        410,
        "Expired",
        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn items(names: &[&str]) -> Vec<(Key, Value)> {
        names
            .iter()
            .map(|n| ((String::new(), n.to_string()), json!(n)))
            .collect()
    }

    #[test]
    fn a_page_with_more_after_it_carries_where_it_ended() {
        let first = page(items(&["a", "b"]), 1, 7, false);
        assert_eq!(first.items, vec![json!("a"), json!("b")]);
        assert_eq!(first.remaining, Some(1));
        let token =
            Continue::decode(first.continue_token.as_deref().expect("more")).expect("valid");
        assert_eq!((token.rv, token.key()), (7, (String::new(), "b".into())));
        let filtered = page(items(&["a"]), 1, 7, true);
        assert!(filtered.continue_token.is_some());
        assert_eq!(filtered.remaining, None);
        let last = page(items(&["c"]), 0, 7, false);
        assert_eq!((last.items, last.continue_token), (vec![json!("c")], None));
        assert!(Continue::decode("not a token").is_err());
    }
}
