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

    fn after(&self, key: &Key) -> bool {
        (key.0.as_str(), key.1.as_str()) > (self.namespace.as_str(), self.name.as_str())
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

/// Cut `matching` (ordered by key, all read at `rv`) into the page after `from`.
pub fn page(
    matching: Vec<(Key, Value)>,
    rv: u64,
    from: Option<&Continue>,
    limit: usize,
    filtered: bool,
) -> Page {
    let mut rest: Vec<(Key, Value)> = matching
        .into_iter()
        .filter(|(key, _)| from.is_none_or(|c| c.after(key)))
        .collect();
    if limit == 0 || rest.len() <= limit {
        return Page {
            items: rest.into_iter().map(|(_, v)| v).collect(),
            rv,
            continue_token: None,
            remaining: None,
        };
    }
    let remaining = rest.len() - limit;
    rest.truncate(limit);
    let last = rest.last().map(|(key, _)| key.clone()).unwrap_or_default();
    Page {
        items: rest.into_iter().map(|(_, v)| v).collect(),
        rv,
        continue_token: Some(
            Continue {
                rv,
                namespace: last.0,
                name: last.1,
            }
            .encode(),
        ),
        remaining: (!filtered).then_some(remaining),
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
    fn pages_follow_the_key_order_and_end_without_a_token() {
        let all = items(&["a", "b", "c"]);
        let first = page(all.clone(), 7, None, 2, false);
        assert_eq!(first.items, vec![json!("a"), json!("b")]);
        assert_eq!(first.remaining, Some(1));
        let token =
            Continue::decode(first.continue_token.as_deref().expect("more")).expect("valid");
        assert_eq!(token.rv, 7);
        let second = page(all, 7, Some(&token), 2, false);
        assert_eq!(
            (second.items, second.continue_token),
            (vec![json!("c")], None)
        );
        assert!(Continue::decode("not a token").is_err());
    }
}
