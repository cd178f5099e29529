//! InfluxDB line protocol, parsed without allocating per line.
//!
//! ```text
//! measurement[,tag_key=tag_value…] field_key=field_value[,field_key=field_value…] [timestamp]
//! ```
//!
//! * Measurement: `\,`, `\ ` and `\\` are escapes. Tag keys, tag values and field keys:
//!   `\,`, `\=`, `\ ` and `\\`. Two backslashes are one literal backslash; a backslash
//!   before any other character is literal (as in InfluxDB).
//! * Names (measurement, tag keys, tag values, field keys) are at most
//!   [`MAX_NAME_BYTES`] bytes once unescaped, as in InfluxDB.
//! * Field values: float (`1`, `-1.5`, `1e3`), integer `1i`, unsigned `1u`, boolean
//!   (`t`, `T`, `true`, `True`, `TRUE`, `f`, `F`, `false`, `False`, `FALSE`) and
//!   double-quoted string with `\"` and `\\` escapes. Floats must be finite.
//! * Timestamp: optional signed integer in the request's precision.
//! * Lines end with `\n` or `\r\n`; blank lines and lines whose first non-blank
//!   character is `#` are skipped. A string value cannot span lines.
//!
//! Names and strings borrow from the input (`Cow::Borrowed`) unless they contain escapes.
//! The tag and field lists are reused from line to line.

use std::borrow::Cow;

/// A field value as written.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue<'a> {
    Float(f64),
    Integer(i64),
    UInteger(u64),
    Boolean(bool),
    String(Cow<'a, str>),
}

/// One parsed line. Borrows the input and the parser's reusable lists.
#[derive(Debug, Clone, PartialEq)]
pub struct Line<'p, 'a> {
    /// 1-based line number in the request body.
    pub number: usize,
    /// The line's text, for error positions.
    pub raw: &'a str,
    pub measurement: Cow<'a, str>,
    pub tags: &'p [(Cow<'a, str>, Cow<'a, str>)],
    pub fields: &'p [(Cow<'a, str>, FieldValue<'a>)],
    pub timestamp: Option<i64>,
}

/// Why a line is not valid line protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorKind {
    MissingMeasurement,
    MissingTagKey,
    MissingTagValue {
        key: String,
    },
    MissingFields,
    MissingFieldKey,
    MissingFieldValue {
        key: String,
    },
    InvalidFieldValue {
        key: String,
        value: String,
    },
    NonFiniteFloat {
        key: String,
    },
    UnterminatedString {
        key: String,
    },
    InvalidTimestamp {
        value: String,
    },
    TrailingCharacters,
    /// A measurement, tag key, tag value or field key longer than [`MAX_NAME_BYTES`].
    NameTooLong {
        part: NamePart,
        bytes: usize,
    },
}

/// The longest measurement name, tag key, tag value or field key, in bytes (unescaped).
pub const MAX_NAME_BYTES: usize = 65_535;

/// Which part of a line a name is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NamePart {
    Measurement,
    TagKey,
    TagValue,
    FieldKey,
}

impl std::fmt::Display for NamePart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Measurement => "measurement name",
            Self::TagKey => "tag key",
            Self::TagValue => "tag value",
            Self::FieldKey => "field key",
        })
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::MissingMeasurement => write!(f, "missing measurement name"),
            Self::MissingTagKey => write!(f, "missing tag key"),
            Self::MissingTagValue { key } => write!(f, "tag {key:?} has no value"),
            Self::MissingFields => write!(
                f,
                "no fields: a line needs at least one field after the first space"
            ),
            Self::MissingFieldKey => write!(f, "missing field key"),
            Self::MissingFieldValue { key } => write!(f, "field {key:?} has no value"),
            Self::InvalidFieldValue { key, value } => write!(
                f,
                "field {key:?} has invalid value {value:?}: expected a float, an integer ending in i, \
                 an unsigned integer ending in u, a boolean or a double-quoted string"
            ),
            Self::NonFiniteFloat { key } => {
                write!(f, "field {key:?}: NaN and infinity are not allowed")
            }
            Self::UnterminatedString { key } => {
                write!(f, "field {key:?}: string value has no closing quote")
            }
            Self::InvalidTimestamp { value } => {
                write!(
                    f,
                    "invalid timestamp {value:?}: expected a signed integer in the request's precision"
                )
            }
            Self::TrailingCharacters => write!(f, "unexpected characters after the timestamp"),
            Self::NameTooLong { part, bytes } => write!(
                f,
                "{part} is {bytes} bytes long; the limit is {MAX_NAME_BYTES} bytes"
            ),
        }
    }
}

/// A line that could not be parsed, with its position (1-based line; 1-based column in
/// characters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub line: usize,
    pub column: usize,
    pub kind: ErrorKind,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "line {}, column {}: {}",
            self.line, self.column, self.kind
        )
    }
}

impl std::error::Error for ParseError {}

/// Parses a request body line by line.
#[derive(Debug)]
pub struct Parser<'a> {
    input: &'a str,
    pos: usize,
    line_number: usize,
    tags: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    fields: Vec<(Cow<'a, str>, FieldValue<'a>)>,
}

/// Where a name of each kind ends, and what a backslash escapes in it.
const MEASUREMENT_STOPS: &[u8] = b", ";
const MEASUREMENT_ESCAPES: &[u8] = b", \\";
const KEY_STOPS: &[u8] = b",= ";
const KEY_ESCAPES: &[u8] = b",= \\";

impl<'a> Parser<'a> {
    pub fn new(input: &'a str) -> Self {
        Self {
            input,
            pos: 0,
            line_number: 0,
            tags: Vec::new(),
            fields: Vec::new(),
        }
    }

    /// The next non-blank, non-comment line, or `None` at the end of the input.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Option<Result<Line<'_, 'a>, ParseError>> {
        loop {
            if self.pos >= self.input.len() {
                return None;
            }
            let rest = &self.input[self.pos..];
            let (raw, advance) = match rest.find('\n') {
                Some(i) => (&rest[..i], i + 1),
                None => (rest, rest.len()),
            };
            self.pos += advance;
            self.line_number += 1;
            let line = raw.strip_suffix('\r').unwrap_or(raw);
            let trimmed = line.trim_start_matches([' ', '\t']);
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let offset = line.len() - trimmed.len();
            let number = self.line_number;
            self.tags.clear();
            self.fields.clear();
            let result = parse_line(trimmed, &mut self.tags, &mut self.fields);
            return Some(match result {
                Ok((measurement, timestamp)) => Ok(Line {
                    number,
                    raw: line,
                    measurement,
                    tags: &self.tags,
                    fields: &self.fields,
                    timestamp,
                }),
                Err((at, kind)) => Err(ParseError {
                    line: number,
                    column: line[..(offset + at).min(line.len())].chars().count() + 1,
                    kind,
                }),
            });
        }
    }
}

type LineResult<'a> = Result<(Cow<'a, str>, Option<i64>), (usize, ErrorKind)>;

fn parse_line<'a>(
    line: &'a str,
    tags: &mut Vec<(Cow<'a, str>, Cow<'a, str>)>,
    fields: &mut Vec<(Cow<'a, str>, FieldValue<'a>)>,
) -> LineResult<'a> {
    let bytes = line.as_bytes();
    let (end, escaped) = scan(bytes, 0, MEASUREMENT_STOPS, MEASUREMENT_ESCAPES);
    if end == 0 {
        return Err((0, ErrorKind::MissingMeasurement));
    }
    let measurement = unescape(&line[..end], escaped, MEASUREMENT_ESCAPES);
    within_limit(&measurement, 0, NamePart::Measurement)?;
    let mut pos = end;

    // Tags.
    while bytes.get(pos) == Some(&b',') {
        pos += 1;
        let key_start = pos;
        let (key_end, escaped) = scan(bytes, pos, KEY_STOPS, KEY_ESCAPES);
        if key_end == key_start {
            return Err((key_start, ErrorKind::MissingTagKey));
        }
        let key = unescape(&line[key_start..key_end], escaped, KEY_ESCAPES);
        within_limit(&key, key_start, NamePart::TagKey)?;
        if bytes.get(key_end) != Some(&b'=') {
            return Err((
                key_end,
                ErrorKind::MissingTagValue {
                    key: key.into_owned(),
                },
            ));
        }
        let value_start = key_end + 1;
        let (value_end, escaped) = scan(bytes, value_start, KEY_STOPS, KEY_ESCAPES);
        if value_end == value_start {
            return Err((
                value_start,
                ErrorKind::MissingTagValue {
                    key: key.into_owned(),
                },
            ));
        }
        if bytes.get(value_end) == Some(&b'=') {
            return Err((
                value_end,
                ErrorKind::MissingTagValue {
                    key: key.into_owned(),
                },
            ));
        }
        let value = unescape(&line[value_start..value_end], escaped, KEY_ESCAPES);
        within_limit(&value, value_start, NamePart::TagValue)?;
        tags.push((key, value));
        pos = value_end;
    }

    // Fields.
    if bytes.get(pos) != Some(&b' ') {
        return Err((pos, ErrorKind::MissingFields));
    }
    while bytes.get(pos) == Some(&b' ') {
        pos += 1;
    }
    if pos >= bytes.len() {
        return Err((pos, ErrorKind::MissingFields));
    }
    loop {
        let key_start = pos;
        let (key_end, escaped) = scan(bytes, pos, KEY_STOPS, KEY_ESCAPES);
        if key_end == key_start {
            return Err((key_start, ErrorKind::MissingFieldKey));
        }
        let key = unescape(&line[key_start..key_end], escaped, KEY_ESCAPES);
        within_limit(&key, key_start, NamePart::FieldKey)?;
        if bytes.get(key_end) != Some(&b'=') {
            return Err((
                key_end,
                ErrorKind::MissingFieldValue {
                    key: key.into_owned(),
                },
            ));
        }
        let value_start = key_end + 1;
        let (value, value_end) = if bytes.get(value_start) == Some(&b'"') {
            parse_string(line, value_start).ok_or_else(|| {
                (
                    value_start,
                    ErrorKind::UnterminatedString {
                        key: key.to_string(),
                    },
                )
            })?
        } else {
            let end = bytes[value_start..]
                .iter()
                .position(|b| *b == b',' || *b == b' ')
                .map_or(bytes.len(), |i| value_start + i);
            let token = &line[value_start..end];
            if token.is_empty() {
                return Err((
                    value_start,
                    ErrorKind::MissingFieldValue {
                        key: key.into_owned(),
                    },
                ));
            }
            (
                parse_scalar(token).map_err(|kind| (value_start, kind(key.to_string(), token)))?,
                end,
            )
        };
        fields.push((key, value));
        pos = value_end;
        match bytes.get(pos) {
            Some(b',') => pos += 1,
            _ => break,
        }
    }

    // Timestamp.
    while bytes.get(pos) == Some(&b' ') {
        pos += 1;
    }
    if pos >= bytes.len() {
        return Ok((measurement, None));
    }
    let ts_end = bytes[pos..]
        .iter()
        .position(|b| *b == b' ')
        .map_or(bytes.len(), |i| pos + i);
    let token = &line[pos..ts_end];
    let ts = token.parse::<i64>().map_err(|_| {
        (
            pos,
            ErrorKind::InvalidTimestamp {
                value: token.to_owned(),
            },
        )
    })?;
    let mut rest = ts_end;
    while bytes.get(rest) == Some(&b' ') {
        rest += 1;
    }
    if rest < bytes.len() {
        return Err((rest, ErrorKind::TrailingCharacters));
    }
    Ok((measurement, Some(ts)))
}

/// Refuses a name longer than [`MAX_NAME_BYTES`]; `at` is where it starts in the line.
fn within_limit(name: &str, at: usize, part: NamePart) -> Result<(), (usize, ErrorKind)> {
    if name.len() > MAX_NAME_BYTES {
        return Err((
            at,
            ErrorKind::NameTooLong {
                part,
                bytes: name.len(),
            },
        ));
    }
    Ok(())
}

type ScalarError = fn(String, &str) -> ErrorKind;

fn parse_scalar<'a>(token: &str) -> Result<FieldValue<'a>, ScalarError> {
    let invalid: ScalarError = |key, value| ErrorKind::InvalidFieldValue {
        key,
        value: value.to_owned(),
    };
    match token {
        "t" | "T" | "true" | "True" | "TRUE" => return Ok(FieldValue::Boolean(true)),
        "f" | "F" | "false" | "False" | "FALSE" => return Ok(FieldValue::Boolean(false)),
        _ => {}
    }
    if let Some(digits) = token.strip_suffix('i') {
        return digits.parse().map(FieldValue::Integer).map_err(|_| invalid);
    }
    if let Some(digits) = token.strip_suffix('u') {
        return digits
            .parse()
            .map(FieldValue::UInteger)
            .map_err(|_| invalid);
    }
    // Only digits, sign, dot and exponent: keeps "inf", "nan" and friends out.
    if !token
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E'))
    {
        return Err(invalid);
    }
    let v: f64 = token.parse().map_err(|_| invalid)?;
    if !v.is_finite() {
        return Err(|key, _| ErrorKind::NonFiniteFloat { key });
    }
    Ok(FieldValue::Float(v))
}

/// Parses a quoted string starting at `start` (the opening quote). Returns the value and
/// the position after the closing quote.
fn parse_string(line: &str, start: usize) -> Option<(FieldValue<'_>, usize)> {
    let bytes = line.as_bytes();
    let mut i = start + 1;
    let mut escaped = false;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if matches!(bytes.get(i + 1), Some(b'"') | Some(b'\\')) => {
                escaped = true;
                i += 2;
            }
            b'"' => {
                let raw = &line[start + 1..i];
                let value = if escaped {
                    let mut out = String::with_capacity(raw.len());
                    let mut chars = raw.chars().peekable();
                    while let Some(c) = chars.next() {
                        if c == '\\' && matches!(chars.peek(), Some('"') | Some('\\')) {
                            out.push(chars.next().unwrap_or('\\'));
                        } else {
                            out.push(c);
                        }
                    }
                    Cow::Owned(out)
                } else {
                    Cow::Borrowed(raw)
                };
                return Some((FieldValue::String(value), i + 1));
            }
            _ => i += 1,
        }
    }
    None
}

/// Scans from `start` to the first unescaped byte in `stops`. `escapable` are the bytes a
/// backslash escapes. Returns the end and whether any escape was seen.
fn scan(bytes: &[u8], start: usize, stops: &[u8], escapable: &[u8]) -> (usize, bool) {
    let mut i = start;
    let mut escaped = false;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'\\' {
            if let Some(next) = bytes.get(i + 1)
                && escapable.contains(next)
            {
                escaped = true;
                i += 2;
                continue;
            }
        } else if stops.contains(&b) {
            break;
        }
        i += 1;
    }
    (i, escaped)
}

fn unescape<'a>(raw: &'a str, escaped: bool, escapable: &[u8]) -> Cow<'a, str> {
    if !escaped {
        return Cow::Borrowed(raw);
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(next) = bytes.get(i + 1)
            && escapable.contains(next)
        {
            out.push(*next);
            i += 2;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    // Only ASCII bytes were removed, so the result is still UTF-8.
    Cow::Owned(
        String::from_utf8(out)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
    )
}

/// Writes names and values the way [`Parser`] reads them (used by tests and tools).
pub mod escape {
    pub fn measurement(s: &str, out: &mut String) {
        for c in s.chars() {
            if matches!(c, ',' | ' ' | '\\') {
                out.push('\\');
            }
            out.push(c);
        }
    }

    pub fn key(s: &str, out: &mut String) {
        for c in s.chars() {
            if matches!(c, ',' | '=' | ' ' | '\\') {
                out.push('\\');
            }
            out.push(c);
        }
    }

    pub fn string(s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            if matches!(c, '"' | '\\') {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
}
