//! The part of OData `$filter` MDE supports: comparisons (`eq ne gt ge lt le`),
//! `in (...)`, `startswith`/`endswith`/`contains`, `and`, `or`, `not` and parentheses.
//! Filters are evaluated against an entity's JSON.

use std::cmp::Ordering;
use std::fmt;

use serde_json::Value;

/// A parsed `$filter`.
#[derive(Clone, Debug, PartialEq)]
pub enum Filter {
    Compare {
        field: String,
        op: CompareOp,
        value: Literal,
    },
    In {
        field: String,
        values: Vec<Literal>,
    },
    Function {
        function: StringFunction,
        field: String,
        value: String,
    },
    And(Box<Filter>, Box<Filter>),
    Or(Box<Filter>, Box<Filter>),
    Not(Box<Filter>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompareOp {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StringFunction {
    StartsWith,
    EndsWith,
    Contains,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Literal {
    String(String),
    Number(f64),
    Bool(bool),
    Null,
    /// An unquoted value such as `2024-01-01T00:00:00Z`.
    Bare(String),
}

/// Why a `$filter` was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilterError(pub String);

impl fmt::Display for FilterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FilterError {}

#[derive(Clone, Debug, PartialEq)]
enum Token {
    LParen,
    RParen,
    Comma,
    Str(String),
    Word(String),
}

fn tokenize(input: &str) -> Result<Vec<Token>, FilterError> {
    let mut tokens = Vec::new();
    let mut chars = input.char_indices().peekable();
    while let Some(&(pos, c)) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '(' => {
                chars.next();
                tokens.push(Token::LParen);
            }
            ')' => {
                chars.next();
                tokens.push(Token::RParen);
            }
            ',' => {
                chars.next();
                tokens.push(Token::Comma);
            }
            '\'' => {
                chars.next();
                let mut s = String::new();
                loop {
                    match chars.next() {
                        // OData escapes a quote by doubling it.
                        Some((_, '\'')) if chars.peek().is_some_and(|&(_, c)| c == '\'') => {
                            chars.next();
                            s.push('\'');
                        }
                        Some((_, '\'')) => break,
                        Some((_, c)) => s.push(c),
                        None => {
                            return Err(FilterError(format!(
                                "unterminated string starting at position {pos}"
                            )));
                        }
                    }
                }
                tokens.push(Token::Str(s));
            }
            c if is_word_char(c) => {
                let mut s = String::new();
                while let Some(&(_, c)) = chars.peek() {
                    if !is_word_char(c) {
                        break;
                    }
                    s.push(c);
                    chars.next();
                }
                tokens.push(Token::Word(s));
            }
            other => {
                return Err(FilterError(format!(
                    "unexpected character {other:?} at position {pos}"
                )));
            }
        }
    }
    Ok(tokens)
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '_' | '.' | ':' | '-' | '+' | '/')
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
}

/// Parses a `$filter` expression.
pub fn parse(input: &str) -> Result<Filter, FilterError> {
    let tokens = tokenize(input)?;
    if tokens.is_empty() {
        return Err(FilterError("the filter is empty".into()));
    }
    let mut parser = Parser { tokens, pos: 0 };
    let filter = parser.or_expr()?;
    match parser.peek() {
        None => Ok(filter),
        Some(t) => Err(FilterError(format!(
            "unexpected {} after a complete expression",
            describe(t)
        ))),
    }
}

fn describe(t: &Token) -> String {
    match t {
        Token::LParen => "'('".into(),
        Token::RParen => "')'".into(),
        Token::Comma => "','".into(),
        Token::Str(s) => format!("string '{s}'"),
        Token::Word(w) => format!("'{w}'"),
    }
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn peek_word(&self, word: &str) -> bool {
        matches!(self.peek(), Some(Token::Word(w)) if w == word)
    }

    fn expect(&mut self, expected: Token, what: &str) -> Result<(), FilterError> {
        match self.next() {
            Some(t) if t == expected => Ok(()),
            Some(t) => Err(FilterError(format!(
                "expected {what}, found {}",
                describe(&t)
            ))),
            None => Err(FilterError(format!(
                "expected {what}, found the end of the filter"
            ))),
        }
    }

    fn or_expr(&mut self) -> Result<Filter, FilterError> {
        let mut left = self.and_expr()?;
        while self.peek_word("or") {
            self.next();
            let right = self.and_expr()?;
            left = Filter::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and_expr(&mut self) -> Result<Filter, FilterError> {
        let mut left = self.unary()?;
        while self.peek_word("and") {
            self.next();
            let right = self.unary()?;
            left = Filter::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Filter, FilterError> {
        if self.peek_word("not") {
            self.next();
            return Ok(Filter::Not(Box::new(self.unary()?)));
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Filter, FilterError> {
        match self.next() {
            Some(Token::LParen) => {
                let inner = self.or_expr()?;
                self.expect(Token::RParen, "')'")?;
                Ok(inner)
            }
            Some(Token::Word(word)) => {
                if self.peek() == Some(&Token::LParen) {
                    return self.function(&word);
                }
                self.comparison(word)
            }
            Some(t) => Err(FilterError(format!(
                "expected a property name, found {}",
                describe(&t)
            ))),
            None => Err(FilterError(
                "expected a property name, found the end of the filter".into(),
            )),
        }
    }

    fn function(&mut self, name: &str) -> Result<Filter, FilterError> {
        let function = match name.to_ascii_lowercase().as_str() {
            "startswith" => StringFunction::StartsWith,
            "endswith" => StringFunction::EndsWith,
            "contains" => StringFunction::Contains,
            _ => {
                return Err(FilterError(format!(
                    "function '{name}' is not supported (use startswith, endswith or contains)"
                )));
            }
        };
        self.expect(Token::LParen, "'('")?;
        let field = match self.next() {
            Some(Token::Word(w)) => w,
            other => {
                return Err(FilterError(format!(
                    "{name}() takes a property name first, found {}",
                    other
                        .as_ref()
                        .map_or("the end of the filter".into(), describe)
                )));
            }
        };
        self.expect(Token::Comma, "','")?;
        let value = match self.next() {
            Some(Token::Str(s)) => s,
            other => {
                return Err(FilterError(format!(
                    "{name}() takes a quoted string second, found {}",
                    other
                        .as_ref()
                        .map_or("the end of the filter".into(), describe)
                )));
            }
        };
        self.expect(Token::RParen, "')'")?;
        Ok(Filter::Function {
            function,
            field,
            value,
        })
    }

    fn comparison(&mut self, field: String) -> Result<Filter, FilterError> {
        let op = match self.next() {
            Some(Token::Word(op)) => op,
            Some(t) => {
                return Err(FilterError(format!(
                    "expected an operator after '{field}', found {}",
                    describe(&t)
                )));
            }
            None => {
                return Err(FilterError(format!(
                    "expected an operator after '{field}', found the end of the filter"
                )));
            }
        };
        let op = match op.as_str() {
            "eq" => CompareOp::Eq,
            "ne" => CompareOp::Ne,
            "gt" => CompareOp::Gt,
            "ge" => CompareOp::Ge,
            "lt" => CompareOp::Lt,
            "le" => CompareOp::Le,
            "in" => return self.in_list(field),
            other => {
                return Err(FilterError(format!(
                    "operator '{other}' is not supported (use eq, ne, gt, ge, lt, le or in)"
                )));
            }
        };
        let value = self.literal()?;
        Ok(Filter::Compare { field, op, value })
    }

    fn in_list(&mut self, field: String) -> Result<Filter, FilterError> {
        self.expect(Token::LParen, "'(' after 'in'")?;
        let mut values = vec![self.literal()?];
        loop {
            match self.next() {
                Some(Token::Comma) => values.push(self.literal()?),
                Some(Token::RParen) => break,
                Some(t) => {
                    return Err(FilterError(format!(
                        "expected ',' or ')' in the 'in' list of '{field}', found {}",
                        describe(&t)
                    )));
                }
                None => {
                    return Err(FilterError(format!(
                        "the 'in' list of '{field}' is not closed with ')'"
                    )));
                }
            }
        }
        Ok(Filter::In { field, values })
    }

    fn literal(&mut self) -> Result<Literal, FilterError> {
        match self.next() {
            Some(Token::Str(s)) => Ok(Literal::String(s)),
            Some(Token::Word(w)) => Ok(match w.as_str() {
                "null" => Literal::Null,
                "true" => Literal::Bool(true),
                "false" => Literal::Bool(false),
                _ => match w.parse::<f64>() {
                    Ok(n) => Literal::Number(n),
                    Err(_) => Literal::Bare(w),
                },
            }),
            Some(t) => Err(FilterError(format!(
                "expected a value, found {}",
                describe(&t)
            ))),
            None => Err(FilterError(
                "expected a value, found the end of the filter".into(),
            )),
        }
    }
}

impl Filter {
    /// Every property the filter names, to check them against what is filterable.
    pub fn fields(&self) -> Vec<&str> {
        match self {
            Filter::Compare { field, .. }
            | Filter::In { field, .. }
            | Filter::Function { field, .. } => {
                vec![field.as_str()]
            }
            Filter::And(a, b) | Filter::Or(a, b) => {
                let mut f = a.fields();
                f.extend(b.fields());
                f
            }
            Filter::Not(a) => a.fields(),
        }
    }

    /// Whether `in` appears anywhere in the filter.
    pub fn uses_in(&self) -> bool {
        match self {
            Filter::In { .. } => true,
            Filter::And(a, b) | Filter::Or(a, b) => a.uses_in() || b.uses_in(),
            Filter::Not(a) => a.uses_in(),
            Filter::Compare { .. } | Filter::Function { .. } => false,
        }
    }

    /// Refuses properties outside `allowed` (matched case-sensitively, as MDE does).
    pub fn check_fields(&self, entity: &str, allowed: &[&str]) -> Result<(), FilterError> {
        for field in self.fields() {
            if !allowed.contains(&field) {
                return Err(FilterError(format!(
                    "property '{field}' cannot be filtered on {entity}; filterable properties: {}",
                    allowed.join(", ")
                )));
            }
        }
        Ok(())
    }

    /// The values (lower-cased) `field` must equal for the filter to match, when the
    /// filter pins it down with `eq` or `in`; lets a list skip entities cheaply.
    pub fn equality_values(&self, field: &str) -> Option<Vec<String>> {
        let text = |l: &Literal| match l {
            Literal::String(s) | Literal::Bare(s) => Some(s.to_lowercase()),
            _ => None,
        };
        match self {
            Filter::Compare {
                field: f,
                op: CompareOp::Eq,
                value,
            } if f == field => text(value).map(|v| vec![v]),
            Filter::In { field: f, values } if f == field => values.iter().map(text).collect(),
            Filter::And(a, b) => a
                .equality_values(field)
                .or_else(|| b.equality_values(field)),
            Filter::Or(a, b) => {
                let mut values = a.equality_values(field)?;
                values.extend(b.equality_values(field)?);
                Some(values)
            }
            _ => None,
        }
    }

    /// The time `field` must be at or after (`ge` or `gt`) for the filter to
    /// match, when an `and` of the filter says so; lets a list skip older
    /// entities cheaply (the filter itself still decides).
    pub fn lower_time_bound(&self, field: &str) -> Option<jiff::Timestamp> {
        match self {
            Filter::Compare {
                field: f,
                op: CompareOp::Ge | CompareOp::Gt,
                value: Literal::String(v) | Literal::Bare(v),
            } if f == field => v.parse().ok(),
            Filter::And(a, b) => a.lower_time_bound(field).max(b.lower_time_bound(field)),
            _ => None,
        }
    }

    /// Whether the entity (as JSON) matches. String comparisons ignore case, like MDE's.
    pub fn matches(&self, entity: &Value) -> bool {
        match self {
            Filter::Compare { field, op, value } => {
                let actual = entity.get(field).unwrap_or(&Value::Null);
                compare_any(actual, *op, value)
            }
            Filter::In { field, values } => {
                let actual = entity.get(field).unwrap_or(&Value::Null);
                values.iter().any(|v| compare_any(actual, CompareOp::Eq, v))
            }
            Filter::Function {
                function,
                field,
                value,
            } => {
                let Some(actual) = entity.get(field).and_then(Value::as_str) else {
                    return false;
                };
                let (actual, value) = (actual.to_lowercase(), value.to_lowercase());
                match function {
                    StringFunction::StartsWith => actual.starts_with(&value),
                    StringFunction::EndsWith => actual.ends_with(&value),
                    StringFunction::Contains => actual.contains(&value),
                }
            }
            Filter::And(a, b) => a.matches(entity) && b.matches(entity),
            Filter::Or(a, b) => a.matches(entity) || b.matches(entity),
            Filter::Not(a) => !a.matches(entity),
        }
    }
}

/// Arrays (e.g. `machineTags`) match when any element does.
fn compare_any(actual: &Value, op: CompareOp, literal: &Literal) -> bool {
    match actual {
        Value::Array(items) => items.iter().any(|item| compare(item, op, literal)),
        _ => compare(actual, op, literal),
    }
}

fn compare(actual: &Value, op: CompareOp, literal: &Literal) -> bool {
    let ordering = match (actual, literal) {
        (Value::Null, Literal::Null) => Some(Ordering::Equal),
        (Value::Null, _) | (_, Literal::Null) => None,
        (Value::Bool(a), Literal::Bool(b)) => Some(a.cmp(b)),
        (Value::Number(a), Literal::Number(b)) => a.as_f64().and_then(|a| a.partial_cmp(b)),
        (Value::String(a), Literal::String(b) | Literal::Bare(b)) => Some(compare_strings(a, b)),
        (Value::String(a), Literal::Number(b)) => {
            a.parse::<f64>().ok().and_then(|a| a.partial_cmp(b))
        }
        _ => None,
    };
    match ordering {
        Some(o) => match op {
            CompareOp::Eq => o == Ordering::Equal,
            CompareOp::Ne => o != Ordering::Equal,
            CompareOp::Gt => o == Ordering::Greater,
            CompareOp::Ge => o != Ordering::Less,
            CompareOp::Lt => o == Ordering::Less,
            CompareOp::Le => o != Ordering::Greater,
        },
        // Values that cannot be compared are only "not equal".
        None => op == CompareOp::Ne,
    }
}

/// One key of an `$orderby`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderKey {
    pub field: String,
    pub descending: bool,
}

/// Parses `$orderby`: `property [asc|desc]`, comma-separated, each property
/// among `allowed` (matched case-sensitively).
pub fn parse_orderby(
    text: &str,
    entity: &str,
    allowed: &[&str],
) -> Result<Vec<OrderKey>, FilterError> {
    text.split(',')
        .map(|clause| {
            let words: Vec<&str> = clause.split_whitespace().collect();
            let (field, descending) = match words[..] {
                [field] | [field, "asc"] => (field, false),
                [field, "desc"] => (field, true),
                _ => {
                    return Err(FilterError(format!(
                        "'{}' is not 'property', 'property asc' or 'property desc'",
                        clause.trim()
                    )));
                }
            };
            if !allowed.contains(&field) {
                return Err(FilterError(format!(
                    "property '{field}' cannot be ordered by on {entity}; properties to order by: {}",
                    allowed.join(", ")
                )));
            }
            Ok(OrderKey {
                field: field.to_owned(),
                descending,
            })
        })
        .collect()
}

/// What an entity sorts by on one key: nulls first, timestamps as instants,
/// text case-insensitively.
#[derive(Debug, PartialEq, PartialOrd)]
enum SortKey {
    Null,
    Bool(bool),
    Number(f64),
    Time(jiff::Timestamp),
    Text(String),
}

fn sort_key(value: Option<&Value>) -> SortKey {
    match value {
        None | Some(Value::Null) => SortKey::Null,
        Some(Value::Bool(b)) => SortKey::Bool(*b),
        Some(Value::Number(n)) => SortKey::Number(n.as_f64().unwrap_or_default()),
        Some(Value::String(s)) => match s.parse::<jiff::Timestamp>() {
            Ok(t) => SortKey::Time(t),
            Err(_) => SortKey::Text(s.to_lowercase()),
        },
        Some(other) => SortKey::Text(other.to_string()),
    }
}

/// Sorts entities by the keys; ties keep their order. Keys are read once
/// per entity, not per comparison.
pub fn order_by(entities: &mut Vec<&Value>, keys: &[OrderKey]) {
    if keys.is_empty() {
        return;
    }
    let mut keyed: Vec<(Vec<SortKey>, &Value)> = entities
        .iter()
        .map(|e| {
            let ks = keys.iter().map(|k| sort_key(e.get(&k.field))).collect();
            (ks, *e)
        })
        .collect();
    keyed.sort_by(|(a, _), (b, _)| {
        keys.iter()
            .zip(a.iter().zip(b))
            .map(|(key, (a, b))| {
                let o = a.partial_cmp(b).unwrap_or(Ordering::Equal);
                if key.descending { o.reverse() } else { o }
            })
            .find(|o| o.is_ne())
            .unwrap_or(Ordering::Equal)
    });
    *entities = keyed.into_iter().map(|(_, e)| e).collect();
}

/// Timestamps compare as instants (so `2024-01-01T00:00:00Z` and
/// `2024-01-01T00:00:00.0000000Z` are equal); everything else case-insensitively.
fn compare_strings(a: &str, b: &str) -> Ordering {
    if let (Ok(a), Ok(b)) = (a.parse::<jiff::Timestamp>(), b.parse::<jiff::Timestamp>()) {
        return a.cmp(&b);
    }
    a.to_lowercase().cmp(&b.to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn action() -> Value {
        json!({
            "id": "a1",
            "type": "Offboard",
            "status": "Pending",
            "machineId": "m1",
            "creationDateTimeUtc": "2024-05-01T10:00:00.1234567Z",
            "machineTags": ["vip", "kiosk"],
            "riskScore": "High",
            "count": 3,
        })
    }

    fn matches(filter: &str) -> bool {
        parse(filter).unwrap().matches(&action())
    }

    #[test]
    fn parses_and_combinations_with_precedence() {
        let f = parse("machineId eq 'm1' and type eq 'Offboard' or status eq 'x'").unwrap();
        assert!(matches!(f, Filter::Or(ref a, _) if matches!(**a, Filter::And(..))));
        assert!(matches("machineId eq 'm1' and type eq 'Offboard'"));
        assert!(!matches("machineId eq 'm1' and type eq 'Isolate'"));
        assert!(matches(
            "machineId eq 'zz' or (type eq 'offboard' and not status eq 'Failed')"
        ));
    }

    #[test]
    fn in_lists_and_doubled_quotes() {
        assert!(matches("id in ('a0','a1', 'a2')"));
        assert!(!matches("id in ('a0')"));
        assert_eq!(
            parse("computerDnsName eq 'o''brien'").unwrap(),
            Filter::Compare {
                field: "computerDnsName".into(),
                op: CompareOp::Eq,
                value: Literal::String("o'brien".into())
            }
        );
    }

    #[test]
    fn timestamps_compare_as_instants() {
        assert!(matches("creationDateTimeUtc gt 2024-05-01T09:59:59Z"));
        assert!(matches(
            "creationDateTimeUtc ge '2024-05-01T10:00:00.1234567Z'"
        ));
        assert!(!matches("creationDateTimeUtc lt 2024-05-01T10:00:00Z"));
        assert!(matches("creationDateTimeUtc lt 2024-05-01T10:00:01.000Z"));
    }

    #[test]
    fn functions_numbers_and_arrays() {
        assert!(matches("startswith(machineId,'M')"));
        assert!(!matches("startswith(machineId,'x')"));
        assert!(matches("contains(type,'board')"));
        assert!(matches("machineTags eq 'vip'"));
        assert!(matches("count ge 3 and count lt 4"));
        assert!(matches("missing eq null"));
        assert!(matches("status ne 'Succeeded'"));
    }

    #[test]
    fn errors_name_the_problem() {
        let err = |f: &str| parse(f).unwrap_err().0;
        assert!(err("id eq 'abc").contains("unterminated string"));
        assert!(err("id like 'a'").contains("operator 'like'"));
        assert!(err("id eq").contains("expected a value"));
        assert!(err("id in ('a' 'b')").contains("expected ',' or ')'"));
        assert!(err("(id eq 'a'").contains("expected ')'"));
        assert!(err("id eq 'a' 'b'").contains("unexpected string 'b'"));
        assert!(err("substringof(id,'a')").contains("function 'substringof'"));
        assert!(err("").contains("empty"));
        assert!(err("id eq 'a' and").contains("expected a property name"));
    }

    #[test]
    fn equality_values_narrow_only_when_required() {
        let ids = |f: &str| parse(f).unwrap().equality_values("id");
        assert_eq!(ids("id eq 'A'"), Some(vec!["a".into()]));
        assert_eq!(
            ids("status eq 'x' and id in ('a','b')"),
            Some(vec!["a".into(), "b".into()])
        );
        assert_eq!(
            ids("id eq 'a' or id eq 'b'"),
            Some(vec!["a".into(), "b".into()])
        );
        assert_eq!(ids("id eq 'a' or status eq 'x'"), None);
        assert_eq!(ids("not id eq 'a'"), None);
        assert_eq!(ids("id ne 'a'"), None);
    }

    #[test]
    fn orderby_sorts_by_instants_and_refuses_what_it_cannot_order_by() {
        let actions = [
            json!({"id": "b", "creationDateTimeUtc": "2024-05-01T10:00:00.5Z"}),
            json!({"id": "a", "creationDateTimeUtc": "2024-05-01T10:00:00.1234567Z"}),
            json!({"id": "c", "creationDateTimeUtc": "2024-05-01T09:00:00Z"}),
            json!({"id": "d"}),
        ];
        let ordered = |text: &str| {
            let keys =
                parse_orderby(text, "machineactions", &["id", "creationDateTimeUtc"]).unwrap();
            let mut all: Vec<&Value> = actions.iter().collect();
            order_by(&mut all, &keys);
            all.iter()
                .map(|a| a["id"].as_str().unwrap())
                .collect::<String>()
        };
        assert_eq!(ordered("creationDateTimeUtc"), "dcab");
        assert_eq!(ordered("creationDateTimeUtc asc"), "dcab");
        assert_eq!(ordered("creationDateTimeUtc desc"), "bacd");
        assert_eq!(ordered("creationDateTimeUtc desc, id"), "bacd");
        let err = |text: &str| {
            parse_orderby(text, "machineactions", &["id"])
                .unwrap_err()
                .0
        };
        assert!(err("lastUpdateDateTimeUtc desc").contains("'lastUpdateDateTimeUtc'"));
        assert!(err("id sideways").contains("'id sideways'"));
        assert!(err("").contains("is not 'property'"));
    }

    #[test]
    fn in_is_found_wherever_it_is() {
        let uses_in = |f: &str| parse(f).unwrap().uses_in();
        assert!(uses_in("id in ('a')"));
        assert!(uses_in("status eq 'x' and not (id in ('a') or id eq 'b')"));
        assert!(!uses_in("id eq 'a' or id eq 'b'"));
        assert!(!uses_in("startswith(computerDnsName,'in')"));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let f = parse("id eq 'a' and colour eq 'red'").unwrap();
        let e = f
            .check_fields("machineactions", &["id", "status"])
            .unwrap_err();
        assert!(e.0.contains("'colour'"), "{e}");
        assert!(
            parse("id eq 'a'")
                .unwrap()
                .check_fields("x", &["id"])
                .is_ok()
        );
    }
}
