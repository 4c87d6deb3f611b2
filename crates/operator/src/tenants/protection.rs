//! The protection rules of one tenant: devices that are never offboarded,
//! whatever a manifest asks.
//!
//! The administrator names them by MDE machine tag (`--protected-tag`, e.g.
//! `do-not-offboard`) or by a name pattern (`--protected-name`), and a
//! tenant's `DefenderConnection` adds its own (`spec.protectedTags`,
//! `spec.protectedNamePatterns`). The rule (docs/operations.md, "Protected
//! devices"):
//!
//! - a record carrying a protected tag (compared without case, surrounding
//!   spaces ignored) is protected;
//! - so is one whose `computerDnsName` a protected pattern matches: a regular
//!   expression searched in the name without case (anchor it with `^…$` to
//!   match a whole name only).
//!
//! The rules live here, beside the connections that add to them; the
//! decision (`offboard::decision::protection`) checks a record with
//! [`protection`] before any send.

use mde_client::Machine;

/// The longest protected name pattern: a pattern is a rule a person reads,
/// and compiled patterns are held for the process's lifetime.
pub const MAX_PATTERN_LEN: usize = 256;

/// Memory one compiled pattern may take (the regex engine runs in linear
/// time; this bounds what a tenant's connection can make it build).
const PATTERN_SIZE_LIMIT: usize = 1 << 20;

/// A protected name pattern, compiled once.
#[derive(Debug, Clone)]
pub struct NamePattern {
    regex: regex::Regex,
}

impl NamePattern {
    /// `text` as a case-insensitive regular expression; the error says what
    /// is wrong with it (the caller names the flag or field).
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Err(
                "a protected name pattern is empty: give a regular expression, e.g. ^dc-".into(),
            );
        }
        if text.len() > MAX_PATTERN_LEN {
            return Err(format!(
                "protected name pattern {:?}… is longer than {MAX_PATTERN_LEN} characters",
                text.chars().take(32).collect::<String>()
            ));
        }
        regex::RegexBuilder::new(text)
            .case_insensitive(true)
            .size_limit(PATTERN_SIZE_LIMIT)
            .build()
            .map(|regex| NamePattern { regex })
            .map_err(|e| {
                format!("protected name pattern {text:?} is not a regular expression: {e}")
            })
    }

    pub fn as_str(&self) -> &str {
        self.regex.as_str()
    }

    fn matches(&self, name: &str) -> bool {
        self.regex.is_match(name)
    }
}

impl std::str::FromStr for NamePattern {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        NamePattern::parse(text)
    }
}

/// One rule and where it was set (`--protected-tag`, a connection's field),
/// so the status says what to change to lift it.
#[derive(Debug, Clone)]
struct Rule<T> {
    value: T,
    from: String,
}

/// The rules that apply to one tenant: the operator's own, and its
/// connection's. Empty by default: nothing is protected.
#[derive(Debug, Clone, Default)]
pub struct Protection {
    /// Lowercase, trimmed.
    tags: Vec<Rule<String>>,
    names: Vec<Rule<NamePattern>>,
}

impl Protection {
    /// The operator's own rules (`--protected-tag`, `--protected-name`).
    pub fn from_flags(tags: &[String], names: &[NamePattern]) -> Self {
        Protection::from_parts(tags, names, "--protected-tag", "--protected-name")
    }

    /// A `DefenderConnection`'s rules; an error names the field and the pattern.
    pub fn from_connection(
        connection: &str,
        tags: &[String],
        patterns: &[String],
    ) -> Result<Self, String> {
        let names = patterns
            .iter()
            .map(|p| NamePattern::parse(p).map_err(|e| format!("spec.protectedNamePatterns: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        if tags.iter().any(|t| t.trim().is_empty()) {
            return Err("spec.protectedTags holds an empty tag: remove it".into());
        }
        Ok(Protection::from_parts(
            tags,
            &names,
            &format!("DefenderConnection {connection:?} spec.protectedTags"),
            &format!("DefenderConnection {connection:?} spec.protectedNamePatterns"),
        ))
    }

    fn from_parts(tags: &[String], names: &[NamePattern], tag_from: &str, name_from: &str) -> Self {
        Protection {
            tags: tags
                .iter()
                .map(|t| t.trim().to_lowercase())
                .filter(|t| !t.is_empty())
                .map(|value| Rule {
                    value,
                    from: tag_from.to_string(),
                })
                .collect(),
            names: names
                .iter()
                .map(|value| Rule {
                    value: value.clone(),
                    from: name_from.to_string(),
                })
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.tags.is_empty() && self.names.is_empty()
    }

    /// Both sets of rules: a device either protects is protected.
    #[must_use]
    pub fn combined(&self, other: &Protection) -> Protection {
        Protection {
            tags: self.tags.iter().chain(&other.tags).cloned().collect(),
            names: self.names.iter().chain(&other.names).cloned().collect(),
        }
    }
}

/// Why `machine` is protected by `rules`, or `None` when it is not.
pub fn protection(machine: &Machine, rules: &Protection) -> Option<String> {
    let mut why: Vec<String> = Vec::new();
    for rule in &rules.tags {
        if let Some(tag) = machine
            .machine_tags
            .iter()
            .find(|t| t.trim().to_lowercase() == rule.value)
        {
            why.push(format!(
                "it carries the machine tag {tag:?} ({})",
                rule.from
            ));
        }
    }
    if let Some(name) = machine.computer_dns_name.as_deref() {
        for rule in &rules.names {
            if rule.value.matches(name) {
                why.push(format!(
                    "its name {name:?} matches the protected pattern {:?} ({})",
                    rule.value.as_str(),
                    rule.from
                ));
            }
        }
    }
    (!why.is_empty()).then(|| why.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn machine(name: &str, tags: &[&str]) -> Machine {
        serde_json::from_value(json!({
            "id": "aa00000000000000000000000000000000000001",
            "computerDnsName": name,
            "machineTags": tags,
        }))
        .unwrap()
    }

    fn rules(tags: &[&str], names: &[&str]) -> Protection {
        let tags: Vec<String> = tags.iter().map(|t| t.to_string()).collect();
        let names: Vec<NamePattern> = names.iter().map(|n| n.parse().unwrap()).collect();
        Protection::from_flags(&tags, &names)
    }

    /// The rule as a table: which records are protected, and the reason
    /// names the tag or pattern and where it was set.
    #[test]
    fn protection_table() {
        // Name, tags, rules, and the words the reason must hold (`None`: not protected).
        type Case<'a> = (&'a str, &'a [&'a str], Protection, Option<&'a [&'a str]>);
        let cases: &[Case] = &[
            // No rules: nothing is protected, whatever the tags.
            (
                "pc-1.contoso.com",
                &["do-not-offboard"],
                Protection::default(),
                None,
            ),
            // A tag, compared without case and surrounding spaces.
            (
                "dc-01.contoso.com",
                &["Tier0", " Do-Not-Offboard "],
                rules(&["do-not-offboard"], &[]),
                Some(&["machine tag \" Do-Not-Offboard \"", "--protected-tag"]),
            ),
            // Another tag does not protect.
            (
                "pc-1.contoso.com",
                &["VIP"],
                rules(&["do-not-offboard"], &[]),
                None,
            ),
            // A tag is a whole tag, not a part of one.
            (
                "pc-1.contoso.com",
                &["do-not-offboard-later"],
                rules(&["do-not-offboard"], &[]),
                None,
            ),
            // A pattern is searched in the name, without case.
            (
                "DC-02.contoso.com",
                &[],
                rules(&[], &["^dc-"]),
                Some(&["matches the protected pattern \"^dc-\"", "--protected-name"]),
            ),
            ("hr-dc-2.contoso.com", &[], rules(&[], &["^dc-"]), None),
            // An anchored pattern matches whole names only.
            (
                "dc-01.contoso.com.old",
                &[],
                rules(&[], &["^dc-01\\.contoso\\.com$"]),
                None,
            ),
            // A rule's own case and spaces do not matter either.
            (
                "pc-1.contoso.com",
                &["do-not-offboard"],
                rules(&[" DO-NOT-OFFBOARD "], &[]),
                Some(&["machine tag \"do-not-offboard\"", "--protected-tag"]),
            ),
            // Nor does a pattern's: it is compiled without case.
            (
                "dc-03.contoso.com",
                &[],
                rules(&[], &["^DC-"]),
                Some(&["matches the protected pattern \"^DC-\""]),
            ),
            // An unanchored pattern matches anywhere in the name.
            (
                "srv.tier0.contoso.com",
                &[],
                rules(&[], &["\\.tier0\\."]),
                Some(&["its name \"srv.tier0.contoso.com\""]),
            ),
            // A tag rule reads tags only, a pattern names only.
            (
                "do-not-offboard",
                &[],
                rules(&["do-not-offboard"], &[]),
                None,
            ),
            ("pc-1.contoso.com", &["dc-01"], rules(&[], &["^dc-"]), None),
            // A blank tag rule protects nothing, not even a blank tag.
            ("pc-1.contoso.com", &[" "], rules(&["  "], &[]), None),
            // Both rules hold: both are named.
            (
                "dc-01.contoso.com",
                &["do-not-offboard"],
                rules(&["do-not-offboard"], &["contoso"]),
                Some(&["machine tag", "protected pattern \"contoso\""]),
            ),
        ];
        for (name, tags, rules, expected) in cases {
            let got = protection(&machine(name, tags), rules);
            match (expected, &got) {
                (None, None) => {}
                (Some(parts), Some(why)) => {
                    for part in *parts {
                        assert!(why.contains(part), "{name} {tags:?}: {why} lacks {part}");
                    }
                }
                _ => panic!("{name} {tags:?}: expected {expected:?}, got {got:?}"),
            }
        }
    }

    /// A machine without a name or tags (MDE's nulls) is protected by nothing.
    #[test]
    fn a_record_without_name_or_tags_matches_no_rule() {
        let bare: Machine = serde_json::from_value(json!({
            "id": "aa00000000000000000000000000000000000002",
            "computerDnsName": null,
            "machineTags": null,
        }))
        .unwrap();
        assert_eq!(protection(&bare, &rules(&["x"], &[".*"])), None);
    }

    /// A connection's rules add to the operator's; its errors name the field.
    #[test]
    fn a_connections_rules_add_to_the_operators() {
        let own = rules(&["do-not-offboard"], &[]);
        let tenant =
            Protection::from_connection("fabrikam", &["tier0".into()], &["^fab-".into()]).unwrap();
        let both = own.combined(&tenant);
        let tier0 = protection(&machine("srv.fabrikam.com", &["Tier0"]), &both).unwrap();
        assert!(
            tier0.contains("DefenderConnection \"fabrikam\" spec.protectedTags"),
            "{tier0}"
        );
        assert!(protection(&machine("fab-1", &[]), &both).is_some());
        assert!(protection(&machine("pc", &["do-not-offboard"]), &both).is_some());
        assert_eq!(protection(&machine("pc", &[]), &both), None);
        let bad = Protection::from_connection("fabrikam", &[], &["(".into()]).unwrap_err();
        assert!(
            bad.contains("spec.protectedNamePatterns") && bad.contains("\"(\""),
            "{bad}"
        );
        let empty = Protection::from_connection("fabrikam", &[" ".into()], &[]).unwrap_err();
        assert!(empty.contains("spec.protectedTags"), "{empty}");
    }

    #[test]
    fn a_bad_pattern_is_refused_with_the_reason() {
        assert!(NamePattern::parse("").unwrap_err().contains("empty"));
        assert!(
            NamePattern::parse("a[")
                .unwrap_err()
                .contains("not a regular expression")
        );
        let long = "a".repeat(MAX_PATTERN_LEN + 1);
        assert!(
            NamePattern::parse(&long)
                .unwrap_err()
                .contains("longer than")
        );
    }
}
