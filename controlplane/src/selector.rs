//! Label and field selectors, parsed and matched the way kube-apiserver does
//! (k8s.io/apimachinery `labels.Parse`, `fields.ParseSelector` and
//! `metav1.LabelSelectorAsSelector`), plus the per-kind field labels the API
//! server lets clients filter on.

use std::collections::BTreeSet;
use std::fmt;

use serde_json::{Map, Value};

/// Why a selector was rejected. Every message names the offending text and,
/// for string selectors, the byte position where it starts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// A `labelSelector` query string that is not valid selector syntax.
    #[error("{reason} at position {position} in {input:?}")]
    Label {
        input: String,
        position: usize,
        reason: String,
    },
    /// A `metav1.LabelSelector` object (matchLabels / matchExpressions) that is invalid.
    #[error("invalid label selector: {field}: {reason}")]
    LabelObject { field: String, reason: String },
    /// A `fieldSelector` query string that is not valid selector syntax.
    #[error("invalid field selector: {reason} at position {position} in {input:?}")]
    Field {
        input: String,
        position: usize,
        reason: String,
    },
}

// ---------------------------------------------------------------------------
// Label selectors
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operator {
    Equals,
    DoubleEquals,
    NotEquals,
    In,
    NotIn,
    Exists,
    DoesNotExist,
    GreaterThan,
    LessThan,
}

/// One ANDed condition on a single label key. `values` is sorted and
/// de-duplicated so matching and printing are deterministic.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Requirement {
    key: String,
    operator: Operator,
    values: Vec<String>,
}

impl Requirement {
    fn matches(&self, labels: &Map<String, Value>) -> bool {
        let actual = labels.get(&self.key).and_then(Value::as_str);
        match (self.operator, actual) {
            (Operator::Exists, found) => found.is_some(),
            (Operator::DoesNotExist, found) => found.is_none(),
            (Operator::Equals | Operator::DoubleEquals | Operator::In, Some(value)) => {
                self.has_value(value)
            }
            (Operator::NotEquals | Operator::NotIn, Some(value)) => !self.has_value(value),
            (Operator::NotEquals | Operator::NotIn, None) => true,
            (Operator::GreaterThan, Some(value)) => self.compare_integer(value, |l, r| l > r),
            (Operator::LessThan, Some(value)) => self.compare_integer(value, |l, r| l < r),
            (_, None) => false,
        }
    }

    fn has_value(&self, value: &str) -> bool {
        self.values.iter().any(|v| v == value)
    }

    /// Gt/Lt only match labels whose value is an integer, as in kube.
    fn compare_integer(&self, label_value: &str, cmp: fn(i64, i64) -> bool) -> bool {
        let bound = self.values.first().and_then(|v| v.parse::<i64>().ok());
        match (label_value.parse::<i64>(), bound) {
            (Ok(actual), Some(bound)) => cmp(actual, bound),
            _ => false,
        }
    }
}

/// Renders the requirement exactly like kube's `Requirement.String()`.
impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = &self.key;
        let values = self.values.join(",");
        match self.operator {
            Operator::Exists => write!(f, "{key}"),
            Operator::DoesNotExist => write!(f, "!{key}"),
            Operator::In => write!(f, "{key} in ({values})"),
            Operator::NotIn => write!(f, "{key} notin ({values})"),
            Operator::Equals => write!(f, "{key}={values}"),
            Operator::DoubleEquals => write!(f, "{key}=={values}"),
            Operator::NotEquals => write!(f, "{key}!={values}"),
            Operator::GreaterThan => write!(f, "{key}>{values}"),
            Operator::LessThan => write!(f, "{key}<{values}"),
        }
    }
}

/// A parsed label selector: the AND of its requirements. The default value
/// selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    requirements: Vec<Requirement>,
    /// A null `metav1.LabelSelector` selects nothing (kube's `labels.Nothing()`).
    selects_nothing: bool,
}

impl LabelSelector {
    /// Parses a `labelSelector` query string; `""` selects everything.
    pub fn parse(s: &str) -> Result<LabelSelector, SelectorError> {
        let mut requirements = Parser::new(s).parse()?;
        sort_by_key(&mut requirements);
        Ok(LabelSelector {
            requirements,
            selects_nothing: false,
        })
    }

    /// True when every requirement holds for `labels` (a `metadata.labels` map).
    pub fn matches(&self, labels: &Map<String, Value>) -> bool {
        !self.selects_nothing && self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Converts a `metav1.LabelSelector` object. `null` selects nothing and
    /// `{}` selects everything, as `metav1.LabelSelectorAsSelector` does.
    pub fn from_label_selector_object(sel: &Value) -> Result<LabelSelector, SelectorError> {
        if sel.is_null() {
            return Ok(LabelSelector {
                requirements: Vec::new(),
                selects_nothing: true,
            });
        }
        let object = sel
            .as_object()
            .ok_or_else(|| object_error("selector", "must be an object"))?;
        let mut requirements = match_labels_requirements(object.get("matchLabels"))?;
        requirements.extend(match_expressions_requirements(
            object.get("matchExpressions"),
        )?);
        sort_by_key(&mut requirements);
        Ok(LabelSelector {
            requirements,
            selects_nothing: false,
        })
    }

    /// True when the selector does not restrict anything (selects everything).
    pub fn is_empty(&self) -> bool {
        !self.selects_nothing && self.requirements.is_empty()
    }
}

/// Renders the selector like kube's `Selector.String()`, e.g. `app=web,tier in (a,b)`.
/// Both "everything" and "nothing" render as the empty string, as in kube.
impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, requirement) in self.requirements.iter().enumerate() {
            if index > 0 {
                f.write_str(",")?;
            }
            write!(f, "{requirement}")?;
        }
        Ok(())
    }
}

/// kube sorts requirements by key so the canonical string is deterministic.
fn sort_by_key(requirements: &mut [Requirement]) {
    requirements.sort_by(|a, b| a.key.cmp(&b.key));
}

// --- metav1.LabelSelector objects ------------------------------------------

fn object_error(field: impl Into<String>, reason: impl Into<String>) -> SelectorError {
    SelectorError::LabelObject {
        field: field.into(),
        reason: reason.into(),
    }
}

fn invalid_value(field: &str, value: &str, reason: &str) -> SelectorError {
    object_error(field, format!("Invalid value: {value:?}: {reason}"))
}

fn match_labels_requirements(
    match_labels: Option<&Value>,
) -> Result<Vec<Requirement>, SelectorError> {
    let Some(match_labels) = match_labels.filter(|v| !v.is_null()) else {
        return Ok(Vec::new());
    };
    let entries = match_labels
        .as_object()
        .ok_or_else(|| object_error("matchLabels", "must be an object"))?;
    entries
        .iter()
        .map(|(key, value)| {
            let field = format!("matchLabels[{key}]");
            let value = value
                .as_str()
                .ok_or_else(|| object_error(&field, "must be a string"))?;
            check_key(key).map_err(|reason| invalid_value(&field, key, &reason))?;
            check_value(value).map_err(|reason| invalid_value(&field, value, &reason))?;
            Ok(Requirement {
                key: key.clone(),
                operator: Operator::Equals,
                values: vec![value.to_string()],
            })
        })
        .collect()
}

fn match_expressions_requirements(
    expressions: Option<&Value>,
) -> Result<Vec<Requirement>, SelectorError> {
    let Some(expressions) = expressions.filter(|v| !v.is_null()) else {
        return Ok(Vec::new());
    };
    let list = expressions
        .as_array()
        .ok_or_else(|| object_error("matchExpressions", "must be a list"))?;
    list.iter()
        .enumerate()
        .map(|(index, expression)| match_expression_requirement(index, expression))
        .collect()
}

fn match_expression_requirement(
    index: usize,
    expression: &Value,
) -> Result<Requirement, SelectorError> {
    let path = format!("matchExpressions[{index}]");
    let key = expression.get("key").and_then(Value::as_str).unwrap_or("");
    check_key(key).map_err(|reason| invalid_value(&format!("{path}.key"), key, &reason))?;

    let operator_name = expression
        .get("operator")
        .and_then(Value::as_str)
        .unwrap_or("");
    let operator = match operator_name {
        "In" => Operator::In,
        "NotIn" => Operator::NotIn,
        "Exists" => Operator::Exists,
        "DoesNotExist" => Operator::DoesNotExist,
        other => {
            return Err(object_error(
                format!("{path}.operator"),
                format!("{other:?} is not a valid label selector operator"),
            ))
        }
    };

    let values = expression_values(&path, expression.get("values"))?;
    let values_path = format!("{path}.values");
    match operator {
        Operator::In | Operator::NotIn if values.is_empty() => Err(object_error(
            values_path,
            "for 'in', 'notin' operators, values set can't be empty",
        )),
        Operator::Exists | Operator::DoesNotExist if !values.is_empty() => Err(object_error(
            values_path,
            "values set must be empty for exists and does not exist",
        )),
        _ => Ok(Requirement {
            key: key.to_string(),
            operator,
            values,
        }),
    }
}

fn expression_values(path: &str, values: Option<&Value>) -> Result<Vec<String>, SelectorError> {
    let Some(values) = values.filter(|v| !v.is_null()) else {
        return Ok(Vec::new());
    };
    let list = values
        .as_array()
        .ok_or_else(|| object_error(format!("{path}.values"), "must be a list"))?;
    let mut sorted = BTreeSet::new();
    for (index, value) in list.iter().enumerate() {
        let field = format!("{path}.values[{index}]");
        let value = value
            .as_str()
            .ok_or_else(|| object_error(&field, "must be a string"))?;
        check_value(value).map_err(|reason| invalid_value(&field, value, &reason))?;
        sorted.insert(value.to_string());
    }
    Ok(sorted.into_iter().collect())
}

// --- the label selector string grammar -------------------------------------
//
//   selector    ::= requirement | requirement "," selector
//   requirement ::= [!] KEY [ set-based | exact-match ]
//   set-based   ::= ("in" | "notin") "(" VALUE {"," VALUE} ")"
//   exact-match ::= ("=" | "==" | "!=" | ">" | "<") VALUE

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenKind {
    Identifier,
    In,
    NotIn,
    Bang,
    Equals,
    DoubleEquals,
    NotEquals,
    GreaterThan,
    LessThan,
    OpenParen,
    CloseParen,
    Comma,
    End,
}

#[derive(Debug, Clone, Copy)]
struct Token<'a> {
    kind: TokenKind,
    text: &'a str,
    position: usize,
}

fn is_selector_whitespace(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\r' | b'\n')
}

fn is_special_symbol(byte: u8) -> bool {
    matches!(byte, b'=' | b'!' | b'(' | b')' | b',' | b'>' | b'<')
}

/// Splits the input into tokens; the last one is always `End`.
fn tokenize(input: &str) -> Vec<Token<'_>> {
    let bytes = input.as_bytes();
    let mut tokens = Vec::new();
    let mut position = 0;
    while position < bytes.len() {
        let rest = &bytes[position..];
        if is_selector_whitespace(rest[0]) {
            position += 1;
            continue;
        }
        let length = if is_special_symbol(rest[0]) {
            // "==" and "!=" are the only two-character operators.
            if rest.starts_with(b"==") || rest.starts_with(b"!=") {
                2
            } else {
                1
            }
        } else {
            rest.iter()
                .position(|&b| is_special_symbol(b) || is_selector_whitespace(b))
                .unwrap_or(rest.len())
        };
        let text = &input[position..position + length];
        tokens.push(Token {
            kind: classify(text),
            text,
            position,
        });
        position += length;
    }
    tokens.push(Token {
        kind: TokenKind::End,
        text: "",
        position: input.len(),
    });
    tokens
}

fn classify(text: &str) -> TokenKind {
    match text {
        "!" => TokenKind::Bang,
        "=" => TokenKind::Equals,
        "==" => TokenKind::DoubleEquals,
        "!=" => TokenKind::NotEquals,
        ">" => TokenKind::GreaterThan,
        "<" => TokenKind::LessThan,
        "(" => TokenKind::OpenParen,
        ")" => TokenKind::CloseParen,
        "," => TokenKind::Comma,
        "in" => TokenKind::In,
        "notin" => TokenKind::NotIn,
        _ => TokenKind::Identifier,
    }
}

/// Recursive-descent parser mirroring kube's: `in`/`notin` are keywords only
/// where an operator is expected, so `in in (in)` is a valid selector.
struct Parser<'a> {
    input: &'a str,
    tokens: Vec<Token<'a>>,
    next: usize,
}

impl<'a> Parser<'a> {
    fn new(input: &'a str) -> Self {
        Parser {
            input,
            tokens: tokenize(input),
            next: 0,
        }
    }

    /// The next token with keywords treated as plain identifiers.
    fn peek(&self) -> Token<'a> {
        as_identifier(self.tokens[self.next])
    }

    fn advance(&mut self) -> Token<'a> {
        let token = self.peek();
        self.advance_raw();
        token
    }

    /// The next token with `in`/`notin` recognised as operators.
    fn advance_raw(&mut self) -> Token<'a> {
        let token = self.tokens[self.next];
        if token.kind != TokenKind::End {
            self.next += 1;
        }
        token
    }

    fn error_at(&self, token: Token<'_>, reason: String) -> SelectorError {
        SelectorError::Label {
            input: self.input.to_string(),
            position: token.position,
            reason,
        }
    }

    /// Errors inside a requirement carry kube's "unable to parse requirement" prefix.
    fn requirement_error(&self, token: Token<'_>, reason: String) -> SelectorError {
        self.error_at(token, format!("unable to parse requirement: {reason}"))
    }

    fn unexpected(&self, token: Token<'_>, expected: &str) -> SelectorError {
        self.requirement_error(
            token,
            format!("found '{}', expected: {expected}", token.text),
        )
    }

    fn parse(mut self) -> Result<Vec<Requirement>, SelectorError> {
        let mut requirements = Vec::new();
        loop {
            let token = self.peek();
            match token.kind {
                TokenKind::End => return Ok(requirements),
                TokenKind::Identifier | TokenKind::Bang => {}
                _ => {
                    return Err(self.error_at(
                        token,
                        format!(
                            "found '{}', expected: !, identifier, or 'end of string'",
                            token.text
                        ),
                    ))
                }
            }
            requirements.push(self.parse_requirement()?);
            let separator = self.advance();
            match separator.kind {
                TokenKind::End => return Ok(requirements),
                TokenKind::Comma => {
                    let after = self.peek();
                    if !matches!(after.kind, TokenKind::Identifier | TokenKind::Bang) {
                        return Err(self.error_at(
                            after,
                            format!("found '{}', expected: identifier after ','", after.text),
                        ));
                    }
                }
                _ => {
                    return Err(self.error_at(
                        separator,
                        format!(
                            "found '{}', expected: ',' or 'end of string'",
                            separator.text
                        ),
                    ))
                }
            }
        }
    }

    fn parse_requirement(&mut self) -> Result<Requirement, SelectorError> {
        let mut key_token = self.advance();
        let negated = key_token.kind == TokenKind::Bang;
        if negated {
            key_token = self.advance();
        }
        if key_token.kind != TokenKind::Identifier {
            return Err(self.unexpected(key_token, "identifier"));
        }
        let key = key_token.text;
        check_key(key).map_err(|reason| {
            self.requirement_error(key_token, format!("invalid label key {key:?}: {reason}"))
        })?;

        let ends_here = matches!(self.peek().kind, TokenKind::End | TokenKind::Comma);
        if negated || ends_here {
            let operator = if negated {
                Operator::DoesNotExist
            } else {
                Operator::Exists
            };
            return Ok(Requirement {
                key: key.to_string(),
                operator,
                values: Vec::new(),
            });
        }

        let operator = self.parse_operator()?;
        let values = match operator {
            Operator::In | Operator::NotIn => self.parse_value_set(key)?,
            _ => vec![self.parse_exact_value(key, operator)?],
        };
        Ok(Requirement {
            key: key.to_string(),
            operator,
            values,
        })
    }

    fn parse_operator(&mut self) -> Result<Operator, SelectorError> {
        let token = self.advance_raw();
        match token.kind {
            TokenKind::In => Ok(Operator::In),
            TokenKind::NotIn => Ok(Operator::NotIn),
            TokenKind::Equals => Ok(Operator::Equals),
            TokenKind::DoubleEquals => Ok(Operator::DoubleEquals),
            TokenKind::NotEquals => Ok(Operator::NotEquals),
            TokenKind::GreaterThan => Ok(Operator::GreaterThan),
            TokenKind::LessThan => Ok(Operator::LessThan),
            _ => Err(self.unexpected(token, "in, notin, =, ==, !=, gt, lt")),
        }
    }

    /// `( a, b, ... )`; empty entries (`(a,,b)`, `()`) stand for the empty value.
    fn parse_value_set(&mut self, key: &str) -> Result<Vec<String>, SelectorError> {
        let open = self.advance();
        if open.kind != TokenKind::OpenParen {
            return Err(self.unexpected(open, "'('"));
        }
        let mut values = BTreeSet::new();
        let mut expecting_value = true;
        loop {
            let token = self.advance();
            match token.kind {
                TokenKind::Identifier if expecting_value => {
                    values.insert(self.checked_value(key, token)?);
                    expecting_value = false;
                }
                TokenKind::Comma => {
                    if expecting_value {
                        values.insert(String::new());
                    }
                    expecting_value = true;
                }
                TokenKind::CloseParen => {
                    if expecting_value {
                        values.insert(String::new());
                    }
                    return Ok(values.into_iter().collect());
                }
                _ if expecting_value => {
                    return Err(self.unexpected(token, "',', ')' or identifier"))
                }
                _ => return Err(self.unexpected(token, "',' or ')'")),
            }
        }
    }

    /// The single value after `=`, `==`, `!=`, `>` or `<`; it may be empty (`key=`).
    fn parse_exact_value(
        &mut self,
        key: &str,
        operator: Operator,
    ) -> Result<String, SelectorError> {
        let token = self.peek();
        let value = match token.kind {
            TokenKind::End | TokenKind::Comma => String::new(),
            TokenKind::Identifier => {
                self.advance();
                self.checked_value(key, token)?
            }
            _ => return Err(self.unexpected(token, "identifier")),
        };
        let needs_integer = matches!(operator, Operator::GreaterThan | Operator::LessThan);
        if needs_integer && value.parse::<i64>().is_err() {
            return Err(self.requirement_error(
                token,
                format!(
                    "invalid value {value:?} for key {key:?}: for 'Gt', 'Lt' operators, the value must be an integer"
                ),
            ));
        }
        Ok(value)
    }

    fn checked_value(&self, key: &str, token: Token<'_>) -> Result<String, SelectorError> {
        check_value(token.text).map_err(|reason| {
            self.requirement_error(
                token,
                format!(
                    "invalid label value {:?} for key {key:?}: {reason}",
                    token.text
                ),
            )
        })?;
        Ok(token.text.to_string())
    }
}

fn as_identifier(token: Token<'_>) -> Token<'_> {
    match token.kind {
        TokenKind::In | TokenKind::NotIn => Token {
            kind: TokenKind::Identifier,
            ..token
        },
        _ => token,
    }
}

// --- label key/value validation (k8s.io/apimachinery/pkg/util/validation) ---

const QUALIFIED_NAME_MAX_LENGTH: usize = 63;
const LABEL_VALUE_MAX_LENGTH: usize = 63;
const DNS1123_SUBDOMAIN_MAX_LENGTH: usize = 253;
const QUALIFIED_NAME_FORMAT: &str = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]";
const QUALIFIED_NAME_ERROR: &str = "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character";
const LABEL_VALUE_ERROR: &str = "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character";
const DNS1123_SUBDOMAIN_FORMAT: &str =
    "[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*";
const DNS1123_SUBDOMAIN_ERROR: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character";

/// kube's `RegexError` wording (including its double space between examples).
fn regex_error(message: &str, format: &str, examples: &[&str]) -> String {
    let examples: Vec<String> = examples.iter().map(|e| format!("'{e}', ")).collect();
    format!(
        "{message} (e.g. {}regex used for validation is '{format}')",
        examples.join(" or ")
    )
}

fn max_length_error(length: usize) -> String {
    format!("must be no more than {length} characters")
}

fn is_qualified_name_part(name: &str) -> bool {
    let bytes = name.as_bytes();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            first.is_ascii_alphanumeric()
                && last.is_ascii_alphanumeric()
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        }
        _ => false,
    }
}

fn is_dns1123_subdomain(value: &str) -> bool {
    value.split('.').all(|label| {
        let bytes = label.as_bytes();
        let lower_alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        match (bytes.first(), bytes.last()) {
            (Some(first), Some(last)) => {
                lower_alnum(first)
                    && lower_alnum(last)
                    && bytes.iter().all(|b| lower_alnum(b) || *b == b'-')
            }
            _ => false,
        }
    })
}

/// Validates a label key (`[prefix/]name`); the error lists every problem like kube does.
fn check_key(key: &str) -> Result<(), String> {
    let parts: Vec<&str> = key.split('/').collect();
    let mut problems = Vec::new();
    let name = match parts.as_slice() {
        [name] => *name,
        [prefix, name] => {
            problems.extend(prefix_problems(prefix));
            *name
        }
        _ => {
            return Err(format!(
                "a qualified name {} with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')",
                regex_error(QUALIFIED_NAME_ERROR, QUALIFIED_NAME_FORMAT, &["MyName", "my.name", "123-abc"])
            ))
        }
    };
    if name.is_empty() {
        problems.push("name part must be non-empty".to_string());
    } else if name.len() > QUALIFIED_NAME_MAX_LENGTH {
        problems.push(format!(
            "name part {}",
            max_length_error(QUALIFIED_NAME_MAX_LENGTH)
        ));
    }
    if !is_qualified_name_part(name) {
        problems.push(format!(
            "name part {}",
            regex_error(
                QUALIFIED_NAME_ERROR,
                QUALIFIED_NAME_FORMAT,
                &["MyName", "my.name", "123-abc"]
            )
        ));
    }
    problems_to_result(problems)
}

fn prefix_problems(prefix: &str) -> Vec<String> {
    if prefix.is_empty() {
        return vec!["prefix part must be non-empty".to_string()];
    }
    let mut problems = Vec::new();
    if prefix.len() > DNS1123_SUBDOMAIN_MAX_LENGTH {
        problems.push(format!(
            "prefix part {}",
            max_length_error(DNS1123_SUBDOMAIN_MAX_LENGTH)
        ));
    }
    if !is_dns1123_subdomain(prefix) {
        problems.push(format!(
            "prefix part {}",
            regex_error(
                DNS1123_SUBDOMAIN_ERROR,
                DNS1123_SUBDOMAIN_FORMAT,
                &["example.com"]
            )
        ));
    }
    problems
}

/// Validates a label value: empty, or a qualified-name-like string of at most 63 characters.
fn check_value(value: &str) -> Result<(), String> {
    let mut problems = Vec::new();
    if value.len() > LABEL_VALUE_MAX_LENGTH {
        problems.push(max_length_error(LABEL_VALUE_MAX_LENGTH));
    }
    if !value.is_empty() && !is_qualified_name_part(value) {
        problems.push(regex_error(
            LABEL_VALUE_ERROR,
            &format!("({QUALIFIED_NAME_FORMAT})?"),
            &["MyValue", "my_value", "12345"],
        ));
    }
    problems_to_result(problems)
}

fn problems_to_result(problems: Vec<String>) -> Result<(), String> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

// ---------------------------------------------------------------------------
// Field selectors
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldTerm {
    field: String,
    value: String,
    negated: bool,
}

/// A parsed field selector: the AND of `field=value` / `field!=value` terms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector {
    terms: Vec<FieldTerm>,
}

impl FieldSelector {
    /// Parses a `fieldSelector` query string; `""` selects everything.
    pub fn parse(s: &str) -> Result<FieldSelector, SelectorError> {
        let terms = split_unescaped_commas(s)
            .into_iter()
            .filter(|(_, term)| !term.is_empty())
            .map(|(offset, term)| parse_field_term(s, offset, term))
            .collect::<Result<_, _>>()?;
        Ok(FieldSelector { terms })
    }

    /// True when every term holds; `field` looks a field up and a missing field compares as `""`.
    pub fn matches(&self, field: impl Fn(&str) -> Option<String>) -> bool {
        self.terms.iter().all(|term| {
            let actual = field(&term.field).unwrap_or_default();
            (actual == term.value) != term.negated
        })
    }

    /// The field names used, so the server can reject unsupported ones.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.terms.iter().map(|term| term.field.as_str())
    }
}

/// Splits on commas that are not backslash-escaped, keeping each term's byte offset.
fn split_unescaped_commas(input: &str) -> Vec<(usize, &str)> {
    let mut terms = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (index, c) in input.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            ',' => {
                terms.push((start, &input[start..index]));
                start = index + 1;
            }
            _ => {}
        }
    }
    terms.push((start, &input[start..]));
    terms
}

/// Splits a term at its first operator (`!=`, `==` or `=`); the field name has no escaping.
fn parse_field_term(input: &str, offset: usize, term: &str) -> Result<FieldTerm, SelectorError> {
    let field_error = |position: usize, reason: String| SelectorError::Field {
        input: input.to_string(),
        position,
        reason,
    };
    let (index, operator) = term
        .char_indices()
        .find_map(|(index, _)| {
            ["!=", "==", "="]
                .into_iter()
                .find(|op| term[index..].starts_with(op))
                .map(|op| (index, op))
        })
        .ok_or_else(|| {
            field_error(
                offset,
                format!(
                    "can't understand {term:?}, expected field=value, field==value or field!=value"
                ),
            )
        })?;
    let value_start = index + operator.len();
    let value = unescape_field_value(&term[value_start..])
        .map_err(|(at, reason)| field_error(offset + value_start + at, reason))?;
    Ok(FieldTerm {
        field: term[..index].to_string(),
        value,
        negated: operator == "!=",
    })
}

/// Undoes `\\`, `\,`, `\=` and `\!` escapes; a bare `,` or `=` in a value is an error.
fn unescape_field_value(raw: &str) -> Result<String, (usize, String)> {
    let mut value = String::with_capacity(raw.len());
    let mut escape_start = None;
    for (index, c) in raw.char_indices() {
        if let Some(start) = escape_start.take() {
            if !matches!(c, '\\' | ',' | '=' | '!') {
                return Err((start, format!("invalid escape sequence '\\{c}'")));
            }
            value.push(c);
            continue;
        }
        match c {
            '\\' => escape_start = Some(index),
            ',' | '=' => return Err((index, format!("unescaped character '{c}' in value"))),
            _ => value.push(c),
        }
    }
    match escape_start {
        Some(start) => Err((
            start,
            "invalid escape sequence '\\' at end of value".to_string(),
        )),
        None => Ok(value),
    }
}

// ---------------------------------------------------------------------------
// Per-kind field labels (kube's AddFieldLabelConversionFunc tables)
// ---------------------------------------------------------------------------

/// The value of field label `field` on `obj` of kind `kind`, or `None` when
/// kube-apiserver does not support that field label for the kind (answer 400
/// "field label not supported: <field>").
pub fn object_field(kind: &str, obj: &Value, field: &str) -> Option<String> {
    metadata_field(kind, obj, field).or_else(|| match kind {
        "Pod" => pod_field(obj, field),
        "Node" => (field == "spec.unschedulable").then(|| bool_text(obj, "/spec/unschedulable")),
        "Namespace" => (field == "status.phase").then(|| text(obj, "/status/phase")),
        "Event" => event_field(obj, field),
        "ReplicaSet" | "ReplicationController" => {
            (field == "status.replicas").then(|| integer_text(obj, "/status/replicas"))
        }
        "Job" => (field == "status.successful").then(|| integer_text(obj, "/status/succeeded")),
        "Secret" => (field == "type").then(|| text(obj, "/type")),
        "Service" => match field {
            "spec.clusterIP" => Some(text(obj, "/spec/clusterIP")),
            "spec.type" => Some(text(obj, "/spec/type")),
            _ => None,
        },
        _ => None,
    })
}

/// Whether `field` is a field label kube-apiserver accepts for `kind`.
pub fn supported_field(kind: &str, field: &str) -> bool {
    // Every supported field yields a value even on an empty object.
    object_field(kind, &Value::Null, field).is_some()
}

fn metadata_field(kind: &str, obj: &Value, field: &str) -> Option<String> {
    match field {
        "metadata.name" => Some(text(obj, "/metadata/name")),
        // Node and Namespace have their own conversion tables without it.
        "metadata.namespace" if !matches!(kind, "Node" | "Namespace") => {
            Some(text(obj, "/metadata/namespace"))
        }
        _ => None,
    }
}

fn pod_field(pod: &Value, field: &str) -> Option<String> {
    let pointer = match field {
        // spec.host is the pre-1.0 name kube still accepts for spec.nodeName.
        "spec.nodeName" | "spec.host" => "/spec/nodeName",
        "spec.restartPolicy" => "/spec/restartPolicy",
        "spec.schedulerName" => "/spec/schedulerName",
        "spec.serviceAccountName" => "/spec/serviceAccountName",
        "status.phase" => "/status/phase",
        "status.nominatedNodeName" => "/status/nominatedNodeName",
        "spec.hostNetwork" => return Some(bool_text(pod, "/spec/hostNetwork")),
        "status.podIP" => return Some(pod_ip(pod)),
        // kube accepts this label but never fills it in, so it always reads "".
        "status.podIPs" => return Some(String::new()),
        _ => return None,
    };
    Some(text(pod, pointer))
}

/// kube reports the first entry of status.podIPs; fall back to the legacy status.podIP.
fn pod_ip(pod: &Value) -> String {
    let first = text(pod, "/status/podIPs/0/ip");
    if first.is_empty() {
        text(pod, "/status/podIP")
    } else {
        first
    }
}

fn event_field(event: &Value, field: &str) -> Option<String> {
    let pointer = match field {
        "involvedObject.kind" => "/involvedObject/kind",
        "involvedObject.namespace" => "/involvedObject/namespace",
        "involvedObject.name" => "/involvedObject/name",
        "involvedObject.uid" => "/involvedObject/uid",
        "involvedObject.apiVersion" => "/involvedObject/apiVersion",
        "involvedObject.resourceVersion" => "/involvedObject/resourceVersion",
        "involvedObject.fieldPath" => "/involvedObject/fieldPath",
        "reason" => "/reason",
        "type" => "/type",
        "reportingComponent" => "/reportingComponent",
        "source" => return Some(event_source(event)),
        _ => return None,
    };
    Some(text(event, pointer))
}

/// Events from the events.k8s.io API only set reportingComponent.
fn event_source(event: &Value) -> String {
    let component = text(event, "/source/component");
    if component.is_empty() {
        text(event, "/reportingComponent")
    } else {
        component
    }
}

fn text(obj: &Value, pointer: &str) -> String {
    obj.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn bool_text(obj: &Value, pointer: &str) -> String {
    let flag = obj
        .pointer(pointer)
        .and_then(Value::as_bool)
        .unwrap_or(false);
    flag.to_string()
}

fn integer_text(obj: &Value, pointer: &str) -> String {
    let number = obj.pointer(pointer).and_then(Value::as_i64).unwrap_or(0);
    number.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap()
    }

    fn selects(selector: &str, value: Value) -> bool {
        LabelSelector::parse(selector)
            .unwrap()
            .matches(&labels(value))
    }

    fn label_error(selector: &str) -> (usize, String) {
        match LabelSelector::parse(selector).unwrap_err() {
            SelectorError::Label {
                position, reason, ..
            } => (position, reason),
            other => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn empty_selector_matches_everything() {
        let selector = LabelSelector::parse("").unwrap();
        assert!(selector.is_empty());
        assert!(selector.matches(&Map::new()));
        assert!(LabelSelector::parse("  \t ").unwrap().is_empty());
        assert_eq!(selector.to_string(), "");
    }

    #[test]
    fn equality_operators() {
        let web = json!({"app": "web", "tier": "front"});
        assert!(selects("app=web", web.clone()));
        assert!(selects("app==web", web.clone()));
        assert!(!selects("app=db", web.clone()));
        assert!(selects("app!=db", web.clone()));
        assert!(!selects("app!=web", web.clone()));
        assert!(
            selects("missing!=x", web.clone()),
            "!= matches a missing label"
        );
        assert!(!selects("missing=x", web.clone()));
        assert!(selects("app=web,tier=front", web.clone()));
        assert!(!selects("app=web,tier=back", web));
    }

    #[test]
    fn empty_exact_value() {
        assert!(selects("a=", json!({"a": ""})));
        assert!(!selects("a=", json!({"a": "x"})));
        assert!(selects("a=,b", json!({"a": "", "b": "1"})));
    }

    #[test]
    fn set_operators() {
        let web = json!({"tier": "front"});
        assert!(selects("tier in (front,back)", web.clone()));
        assert!(selects("tier in(front)", web.clone()));
        assert!(!selects("tier in (back)", web.clone()));
        assert!(selects("tier notin (back)", web.clone()));
        assert!(!selects("tier notin (front,back)", web.clone()));
        assert!(
            selects("other notin (x)", web.clone()),
            "notin matches a missing label"
        );
        assert!(!selects("other in (x)", web));
        assert!(
            selects("a in (x,,y)", json!({"a": ""})),
            "empty entries stand for \"\""
        );
        assert!(selects("a in ()", json!({"a": ""})));
    }

    #[test]
    fn existence_operators() {
        let web = json!({"app": "web"});
        assert!(selects("app", web.clone()));
        assert!(!selects("!app", web.clone()));
        assert!(selects("!db", web.clone()));
        assert!(selects("app, !db", web.clone()));
        assert!(!selects("db", web));
    }

    #[test]
    fn integer_comparisons() {
        let five = json!({"n": "5", "s": "abc"});
        assert!(selects("n>1", five.clone()));
        assert!(!selects("n>5", five.clone()));
        assert!(selects("n<6", five.clone()));
        assert!(!selects("missing<6", five.clone()));
        assert!(
            !selects("s>1", five),
            "non-integer label values never match"
        );
    }

    #[test]
    fn keywords_are_identifiers_outside_operator_position() {
        assert!(selects("in in (in)", json!({"in": "in"})));
        assert!(selects("notin=in", json!({"notin": "in"})));
    }

    #[test]
    fn whitespace_is_tolerated() {
        assert!(selects(
            "  app = web ,\ttier in ( a , front ) , !x ",
            json!({"app": "web", "tier": "front"})
        ));
    }

    #[test]
    fn canonical_string_sorts_keys_and_values() {
        let selector = LabelSelector::parse("z in (b,a),a!=1,m,!n,k==v,g>3,l<2").unwrap();
        assert_eq!(selector.to_string(), "a!=1,g>3,k==v,l<2,m,!n,z in (a,b)");
    }

    #[test]
    fn errors_name_the_token_and_position() {
        assert_eq!(
            label_error("tier in a"),
            (
                8,
                "unable to parse requirement: found 'a', expected: '('".to_string()
            )
        );
        assert_eq!(
            label_error("a=b,"),
            (4, "found '', expected: identifier after ','".to_string())
        );
        assert_eq!(
            label_error("a=b c"),
            (4, "found 'c', expected: ',' or 'end of string'".to_string())
        );
        assert_eq!(
            label_error(",a"),
            (
                0,
                "found ',', expected: !, identifier, or 'end of string'".to_string()
            )
        );
        assert_eq!(
            label_error("a b"),
            (
                2,
                "unable to parse requirement: found 'b', expected: in, notin, =, ==, !=, gt, lt"
                    .to_string()
            )
        );
        assert_eq!(
            label_error("x in (a b)"),
            (
                8,
                "unable to parse requirement: found 'b', expected: ',' or ')'".to_string()
            )
        );
        assert_eq!(
            label_error("x in (a"),
            (
                7,
                "unable to parse requirement: found '', expected: ',' or ')'".to_string()
            )
        );
        assert_eq!(
            label_error("x=(a)"),
            (
                2,
                "unable to parse requirement: found '(', expected: identifier".to_string()
            )
        );
        assert_eq!(
            label_error("!a=b"),
            (2, "found '=', expected: ',' or 'end of string'".to_string())
        );
        assert_eq!(
            label_error("!"),
            (
                1,
                "unable to parse requirement: found '', expected: identifier".to_string()
            )
        );
        assert_eq!(
            label_error("é=1").0,
            0,
            "non-ASCII keys are rejected, not mis-sliced"
        );
        let full = LabelSelector::parse("tier in a").unwrap_err().to_string();
        assert_eq!(
            full,
            "unable to parse requirement: found 'a', expected: '(' at position 8 in \"tier in a\""
        );
    }

    #[test]
    fn invalid_keys_and_values_are_rejected() {
        let (position, reason) = label_error("app=ok,-bad=x");
        assert_eq!(position, 7);
        assert!(reason.starts_with("unable to parse requirement: invalid label key \"-bad\": name part must consist of alphanumeric characters"), "{reason}");
        assert!(reason.contains("(e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"), "{reason}");

        let (_, reason) = label_error("Example.com/app=x");
        assert!(
            reason.contains("prefix part a lowercase RFC 1123 subdomain"),
            "{reason}"
        );
        let (_, reason) = label_error("/app");
        assert!(reason.contains("prefix part must be non-empty"), "{reason}");
        let (_, reason) = label_error("a/b/c");
        assert!(
            reason.contains("a qualified name must consist of"),
            "{reason}"
        );
        let (_, reason) = label_error(&"k".repeat(64));
        assert!(
            reason.contains("name part must be no more than 63 characters"),
            "{reason}"
        );
        assert!(LabelSelector::parse(&format!("example.com/{}", "k".repeat(63))).is_ok());

        let (position, reason) = label_error("app=web-");
        assert_eq!(position, 4);
        assert!(reason.starts_with("unable to parse requirement: invalid label value \"web-\" for key \"app\": a valid label must be an empty string"), "{reason}");
        let (_, reason) = label_error(&format!("app={}", "v".repeat(64)));
        assert!(
            reason.contains("must be no more than 63 characters"),
            "{reason}"
        );

        let (position, reason) = label_error("n>abc");
        assert_eq!(position, 2);
        assert!(reason.ends_with("for 'Gt', 'Lt' operators, the value must be an integer"));
    }

    #[test]
    fn object_selector_with_labels_and_expressions() {
        let selector = LabelSelector::from_label_selector_object(&json!({
            "matchLabels": {"app": "web"},
            "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["front", "back"]},
                {"key": "env", "operator": "NotIn", "values": ["prod"]},
                {"key": "canary", "operator": "DoesNotExist"},
                {"key": "team", "operator": "Exists"}
            ]
        }))
        .unwrap();
        assert_eq!(
            selector.to_string(),
            "app=web,!canary,env notin (prod),team,tier in (back,front)"
        );
        assert!(selector.matches(&labels(
            json!({"app": "web", "tier": "front", "team": "a", "env": "dev"})
        )));
        assert!(!selector.matches(&labels(
            json!({"app": "web", "tier": "front", "team": "a", "canary": "1"})
        )));
    }

    #[test]
    fn object_selector_null_and_empty() {
        let nothing = LabelSelector::from_label_selector_object(&Value::Null).unwrap();
        assert!(!nothing.is_empty());
        assert!(!nothing.matches(&Map::new()));
        let everything = LabelSelector::from_label_selector_object(&json!({})).unwrap();
        assert!(everything.is_empty());
        assert!(everything.matches(&labels(json!({"a": "b"}))));
    }

    #[test]
    fn object_selector_errors() {
        let error = |value: Value| {
            LabelSelector::from_label_selector_object(&value)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            error(json!({"matchExpressions": [{"key": "a", "operator": "Foo"}]})),
            "invalid label selector: matchExpressions[0].operator: \"Foo\" is not a valid label selector operator"
        );
        assert_eq!(
            error(json!({"matchExpressions": [{"key": "a", "operator": "In", "values": []}]})),
            "invalid label selector: matchExpressions[0].values: for 'in', 'notin' operators, values set can't be empty"
        );
        assert_eq!(
            error(json!({"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]})),
            "invalid label selector: matchExpressions[0].values: values set must be empty for exists and does not exist"
        );
        assert!(error(json!({"matchLabels": {"bad key": "x"}})).starts_with(
            "invalid label selector: matchLabels[bad key]: Invalid value: \"bad key\": name part"
        ));
        assert_eq!(
            error(json!({"matchLabels": {"a": 1}})),
            "invalid label selector: matchLabels[a]: must be a string"
        );
    }

    #[test]
    fn non_string_label_values_count_as_missing() {
        assert!(!selects("a", json!({"a": 1})));
    }

    fn field_selects(selector: &str, fields: &[(&str, &str)]) -> bool {
        FieldSelector::parse(selector).unwrap().matches(|name| {
            fields
                .iter()
                .find(|(field, _)| *field == name)
                .map(|(_, value)| value.to_string())
        })
    }

    #[test]
    fn field_selector_operators() {
        let pod = [("metadata.name", "web"), ("spec.nodeName", "n1")];
        assert!(field_selects("", &pod));
        assert!(field_selects("metadata.name=web", &pod));
        assert!(field_selects("metadata.name==web", &pod));
        assert!(!field_selects("metadata.name!=web", &pod));
        assert!(field_selects("metadata.name=web,spec.nodeName!=n2", &pod));
        assert!(!field_selects("metadata.name=web,spec.nodeName=n2", &pod));
        assert!(
            field_selects("status.podIP=", &pod),
            "missing fields compare as \"\""
        );
        assert!(field_selects("status.podIP!=1.2.3.4", &pod));
        assert!(
            field_selects("metadata.name=web,,", &pod),
            "empty terms are skipped"
        );
    }

    #[test]
    fn field_selector_escapes() {
        let odd = [("a", r"x,y=z!w\v")];
        assert!(field_selects(r"a=x\,y\=z\!w\\v", &odd));
        assert!(
            field_selects(r"a=x\,y\=z!w\\v", &odd),
            "'!' need not be escaped"
        );
        let selector = FieldSelector::parse(r"a=x\,y,b!=c").unwrap();
        assert_eq!(selector.fields().collect::<Vec<_>>(), vec!["a", "b"]);
    }

    #[test]
    fn field_selector_errors() {
        let error = |s: &str| FieldSelector::parse(s).unwrap_err().to_string();
        assert_eq!(
            error("a=b,cd"),
            "invalid field selector: can't understand \"cd\", expected field=value, field==value or field!=value at position 4 in \"a=b,cd\""
        );
        assert_eq!(
            error("a=b=c"),
            "invalid field selector: unescaped character '=' in value at position 3 in \"a=b=c\""
        );
        assert_eq!(
            error(r"a=b\x"),
            "invalid field selector: invalid escape sequence '\\x' at position 3 in \"a=b\\\\x\""
        );
        assert_eq!(
            error(r"a=b\"),
            "invalid field selector: invalid escape sequence '\\' at end of value at position 3 in \"a=b\\\\\""
        );
    }

    #[test]
    fn pod_fields() {
        let pod = json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"nodeName": "n1", "restartPolicy": "Always", "schedulerName": "default-scheduler",
                     "serviceAccountName": "sa", "hostNetwork": true},
            "status": {"phase": "Running", "podIP": "10.0.0.9", "podIPs": [{"ip": "10.0.0.1"}],
                       "nominatedNodeName": "n2"}
        });
        let field = |name: &str| object_field("Pod", &pod, name);
        assert_eq!(field("metadata.name").as_deref(), Some("web"));
        assert_eq!(field("metadata.namespace").as_deref(), Some("default"));
        assert_eq!(field("spec.nodeName").as_deref(), Some("n1"));
        assert_eq!(field("spec.host").as_deref(), Some("n1"));
        assert_eq!(field("spec.restartPolicy").as_deref(), Some("Always"));
        assert_eq!(
            field("spec.schedulerName").as_deref(),
            Some("default-scheduler")
        );
        assert_eq!(field("spec.serviceAccountName").as_deref(), Some("sa"));
        assert_eq!(field("spec.hostNetwork").as_deref(), Some("true"));
        assert_eq!(field("status.phase").as_deref(), Some("Running"));
        assert_eq!(field("status.podIP").as_deref(), Some("10.0.0.1"));
        assert_eq!(field("status.nominatedNodeName").as_deref(), Some("n2"));
        assert_eq!(field("spec.containers"), None);
        assert_eq!(
            object_field("Pod", &json!({}), "spec.hostNetwork").as_deref(),
            Some("false")
        );
    }

    #[test]
    fn other_kind_fields() {
        let node = json!({"metadata": {"name": "n1"}, "spec": {"unschedulable": true}});
        assert_eq!(
            object_field("Node", &node, "spec.unschedulable").as_deref(),
            Some("true")
        );
        assert_eq!(object_field("Node", &node, "metadata.namespace"), None);
        assert_eq!(
            object_field(
                "Namespace",
                &json!({"status": {"phase": "Active"}}),
                "status.phase"
            )
            .as_deref(),
            Some("Active")
        );
        let event = json!({"involvedObject": {"kind": "Pod", "name": "web"}, "reason": "Started",
                           "type": "Normal", "reportingComponent": "kubelet"});
        assert_eq!(
            object_field("Event", &event, "involvedObject.kind").as_deref(),
            Some("Pod")
        );
        assert_eq!(
            object_field("Event", &event, "reason").as_deref(),
            Some("Started")
        );
        assert_eq!(
            object_field("Event", &event, "source").as_deref(),
            Some("kubelet")
        );
        assert_eq!(
            object_field("ReplicaSet", &json!({}), "status.replicas").as_deref(),
            Some("0")
        );
        assert_eq!(
            object_field(
                "ConfigMap",
                &json!({"metadata": {"name": "c"}}),
                "metadata.name"
            )
            .as_deref(),
            Some("c")
        );
        assert_eq!(object_field("ConfigMap", &json!({}), "data"), None);
    }

    #[test]
    fn supported_fields_per_kind() {
        assert!(supported_field("Pod", "status.phase"));
        assert!(supported_field("Secret", "type"));
        assert!(supported_field("Lease", "metadata.namespace"));
        assert!(!supported_field("Lease", "spec.holderIdentity"));
        assert!(!supported_field("Namespace", "metadata.namespace"));
        assert!(supported_field("Event", "involvedObject.uid"));
        assert!(!supported_field("Deployment", "status.replicas"));
    }
}
