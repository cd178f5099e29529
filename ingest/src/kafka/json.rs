//! JSON messages → rows, by a declared mapping: which JSON paths give the table, tags,
//! fields and time. The common shape of IoT gateway messages, such as
//!
//! ```json
//! {"device": "press-4", "site": "north", "ts": 1700000000123,
//!  "values": {"temp": 81.5, "rpm": 1450, "running": true}}
//! ```
//!
//! with `table = "machines"`, `tags = { device = "$.device", site = "$.site" }`,
//! `fields = { temp = "$.values.temp", rpm = { path = "$.values.rpm", type = "integer" } }`,
//! `time = "$.ts"`, `time_unit = "ms"`. A message may also hold an array of readings:
//! `rows = "$.readings"` makes every other path relative to each element.
//!
//! Paths are `$` followed by `.name`, `["name"]` or `[index]` steps. A value that does not
//! start with `$` is a constant (for `table` and tags).

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::line_protocol::{FieldValue, Line, LineError, Precision, Validator};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonMapping {
    /// Path to an array of readings; when set, the other paths apply to each element.
    #[serde(default)]
    pub rows: Option<String>,
    /// The table: a path or a constant name.
    pub table: String,
    /// Tag name → path (or constant value). A missing value leaves the tag unset.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Field name → path, or `{ path, type }` with type `float` (the default for numbers),
    /// `integer`, `uinteger`, `boolean` or `string`. A missing value leaves the field unset.
    pub fields: BTreeMap<String, FieldSpec>,
    /// Path to the time: a number in `time_unit`, or an RFC 3339 string. Without it (or when
    /// a message lacks it) the Kafka message's timestamp is used.
    #[serde(default)]
    pub time: Option<String>,
    /// Unit of a numeric time: `s`, `ms`, `us` or `ns` (default).
    #[serde(default = "default_unit")]
    pub time_unit: String,
}

fn default_unit() -> String {
    "ns".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum FieldSpec {
    Path(String),
    Typed {
        path: String,
        #[serde(rename = "type")]
        ty: FieldType,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldType {
    Float,
    Integer,
    Uinteger,
    Boolean,
    String,
}

#[derive(Debug, Clone, PartialEq)]
enum Step {
    Key(String),
    Index(usize),
}

/// A path parsed once, or a constant.
#[derive(Debug, Clone, PartialEq)]
enum Source {
    Path(Vec<Step>),
    Constant(String),
}

impl Source {
    fn parse(text: &str) -> Result<Self, String> {
        if !text.starts_with('$') {
            return Ok(Self::Constant(text.to_string()));
        }
        parse_path(text).map(Self::Path)
    }

    fn get<'v>(&self, root: &'v Value) -> Option<Cow<'v, Value>> {
        match self {
            Self::Constant(c) => Some(Cow::Owned(Value::String(c.clone()))),
            Self::Path(steps) => lookup(root, steps).map(Cow::Borrowed),
        }
    }
}

fn parse_path(text: &str) -> Result<Vec<Step>, String> {
    let bad = |why: &str| format!("JSON path {text:?}: {why}");
    let mut rest = text
        .strip_prefix('$')
        .ok_or_else(|| bad("must start with $"))?;
    let mut steps = Vec::new();
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            if end == 0 {
                return Err(bad("empty name after '.'"));
            }
            steps.push(Step::Key(r[..end].to_string()));
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix("[\"") {
            let end = r.find("\"]").ok_or_else(|| bad("unterminated [\"…\"]"))?;
            steps.push(Step::Key(r[..end].to_string()));
            rest = &r[end + 2..];
        } else if let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']').ok_or_else(|| bad("unterminated […]"))?;
            let index = r[..end]
                .parse()
                .map_err(|_| bad("an index must be a non-negative integer"))?;
            steps.push(Step::Index(index));
            rest = &r[end + 1..];
        } else {
            return Err(bad("expected '.', '[\"name\"]' or '[index]'"));
        }
    }
    Ok(steps)
}

fn lookup<'v>(mut v: &'v Value, steps: &[Step]) -> Option<&'v Value> {
    for step in steps {
        v = match step {
            Step::Key(k) => v.get(k)?,
            Step::Index(i) => v.get(*i)?,
        };
    }
    (!v.is_null()).then_some(v)
}

impl JsonMapping {
    pub fn check(&self) -> Result<(), String> {
        self.compile().map(|_| ())
    }

    pub fn compile(&self) -> Result<CompiledMapping, String> {
        if self.fields.is_empty() {
            return Err("a json mapping needs at least one field".into());
        }
        let time_nanos = match self.time_unit.as_str() {
            "s" => 1_000_000_000,
            "ms" => 1_000_000,
            "us" => 1_000,
            "ns" => 1,
            other => {
                return Err(format!(
                    "json time_unit {other:?} is not one of s, ms, us, ns"
                ));
            }
        };
        Ok(CompiledMapping {
            rows: self.rows.as_deref().map(parse_path).transpose()?,
            table: Source::parse(&self.table)?,
            tags: self
                .tags
                .iter()
                .map(|(k, v)| Ok((k.clone(), Source::parse(v)?)))
                .collect::<Result<_, String>>()?,
            fields: self
                .fields
                .iter()
                .map(|(k, spec)| {
                    let (path, ty) = match spec {
                        FieldSpec::Path(p) => (p, None),
                        FieldSpec::Typed { path, ty } => (path, Some(*ty)),
                    };
                    if !path.starts_with('$') {
                        return Err(format!("field {k:?}: {path:?} is not a JSON path ($…)"));
                    }
                    Ok((k.clone(), parse_path(path)?, ty))
                })
                .collect::<Result<_, String>>()?,
            time: self.time.as_deref().map(parse_path).transpose()?,
            time_nanos,
        })
    }
}

/// A mapping with its paths parsed.
#[derive(Debug, Clone)]
pub struct CompiledMapping {
    rows: Option<Vec<Step>>,
    table: Source,
    tags: Vec<(String, Source)>,
    fields: Vec<(String, Vec<Step>, Option<FieldType>)>,
    time: Option<Vec<Step>>,
    time_nanos: i64,
}

impl CompiledMapping {
    /// Pushes the rows of one JSON message into `validator`. `default_time` is used for rows
    /// without a time. Errors that concern the message as a whole are returned; a row's own
    /// problem is recorded in the validator like a rejected line (numbered from 1).
    pub(crate) fn push(
        &self,
        validator: &mut Validator<'_>,
        payload: &[u8],
        default_time: i64,
    ) -> Result<(), String> {
        let doc: Value =
            serde_json::from_slice(payload).map_err(|e| format!("invalid JSON: {e}"))?;
        let rows: Vec<&Value> = match &self.rows {
            None => vec![&doc],
            Some(steps) => match lookup(&doc, steps) {
                Some(Value::Array(items)) => items.iter().collect(),
                Some(_) => return Err("the rows path does not hold an array".into()),
                None => return Err("the rows path is missing".into()),
            },
        };
        let mut tags: Vec<(Cow<'_, str>, Cow<'_, str>)> = Vec::new();
        let mut fields: Vec<(Cow<'_, str>, FieldValue<'_>)> = Vec::new();
        for (i, row) in rows.into_iter().enumerate() {
            let number = i + 1;
            tags.clear();
            fields.clear();
            let reject = |message: String| LineError {
                line: number,
                column: 0,
                message,
            };
            let table = match self.table.get(row).as_deref() {
                Some(Value::String(s)) if !s.is_empty() => s.clone(),
                Some(other) => {
                    validator.reject(reject(format!("the table is not a name: {other}")));
                    continue;
                }
                None => {
                    validator.reject(reject("the table path is missing".into()));
                    continue;
                }
            };
            let mut bad = None;
            for (name, source) in &self.tags {
                match source.get(row).as_deref() {
                    None => {}
                    Some(Value::String(s)) if s.is_empty() => {}
                    Some(Value::String(s)) => tags.push((name.into(), s.clone().into())),
                    Some(v @ (Value::Number(_) | Value::Bool(_))) => {
                        tags.push((name.into(), v.to_string().into()))
                    }
                    Some(other) => {
                        bad = Some(format!(
                            "tag {name:?}: {other} is not a string, number or boolean"
                        ));
                        break;
                    }
                }
            }
            if bad.is_none() {
                for (name, path, ty) in &self.fields {
                    let Some(value) = lookup(row, path) else {
                        continue;
                    };
                    match field_value(value, *ty) {
                        Ok(v) => fields.push((name.into(), v)),
                        Err(why) => {
                            bad = Some(format!("field {name:?}: {why}"));
                            break;
                        }
                    }
                }
            }
            let time = match (&bad, &self.time) {
                (None, Some(path)) => match lookup(row, path) {
                    None => Ok(default_time),
                    Some(v) => self.time_of(v),
                },
                _ => Ok(default_time),
            };
            let time = match time {
                Ok(t) => t,
                Err(why) => {
                    bad.get_or_insert(why);
                    0
                }
            };
            if let Some(message) = bad {
                validator.reject(reject(message));
                continue;
            }
            if fields.is_empty() {
                validator.reject(reject(
                    "no fields: none of the mapped field paths has a value".into(),
                ));
                continue;
            }
            let line = Line {
                number,
                raw: "",
                measurement: Cow::Owned(table),
                tags: &tags,
                fields: &fields,
                timestamp: Some(time),
            };
            validator.push(&line, Precision::Nanoseconds, default_time);
        }
        Ok(())
    }

    fn time_of(&self, v: &Value) -> Result<i64, String> {
        let overflow = || format!("time {v} is out of range");
        match v {
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    i.checked_mul(self.time_nanos).ok_or_else(overflow)
                } else if let Some(f) = n.as_f64() {
                    let t = f * self.time_nanos as f64;
                    if t.is_finite() && t.abs() < i64::MAX as f64 {
                        Ok(t.round() as i64)
                    } else {
                        Err(overflow())
                    }
                } else {
                    Err(overflow())
                }
            }
            Value::String(s) => chrono::DateTime::parse_from_rfc3339(s)
                .map_err(|e| format!("time {s:?} is not RFC 3339: {e}"))?
                .timestamp_nanos_opt()
                .ok_or_else(overflow),
            other => Err(format!(
                "time {other} is neither a number nor an RFC 3339 string"
            )),
        }
    }
}

fn field_value(v: &Value, ty: Option<FieldType>) -> Result<FieldValue<'_>, String> {
    let wrong = |want: &str| format!("{v} is not {want}");
    Ok(match (ty, v) {
        (None | Some(FieldType::Float), Value::Number(n)) => {
            FieldValue::Float(n.as_f64().ok_or_else(|| wrong("a float"))?)
        }
        (Some(FieldType::Integer), Value::Number(n)) => {
            FieldValue::Integer(n.as_i64().ok_or_else(|| wrong("a 64-bit integer"))?)
        }
        (Some(FieldType::Uinteger), Value::Number(n)) => FieldValue::UInteger(
            n.as_u64()
                .ok_or_else(|| wrong("an unsigned 64-bit integer"))?,
        ),
        (None | Some(FieldType::Boolean), Value::Bool(b)) => FieldValue::Boolean(*b),
        (None | Some(FieldType::String), Value::String(s)) => {
            FieldValue::String(Cow::Borrowed(s.as_str()))
        }
        (Some(FieldType::Float), _) => return Err(wrong("a number")),
        (Some(FieldType::Integer | FieldType::Uinteger), _) => return Err(wrong("an integer")),
        (Some(FieldType::Boolean), _) => return Err(wrong("a boolean")),
        (Some(FieldType::String), _) => return Err(wrong("a string")),
        (None, _) => return Err(wrong("a number, boolean or string")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_parse_and_reject_what_they_cannot_read() {
        assert_eq!(
            parse_path("$.a[\"b.c\"][2].d").unwrap(),
            vec![
                Step::Key("a".into()),
                Step::Key("b.c".into()),
                Step::Index(2),
                Step::Key("d".into())
            ]
        );
        assert!(parse_path("$.").unwrap_err().contains("empty name"));
        assert!(
            parse_path("$[x]")
                .unwrap_err()
                .contains("non-negative integer")
        );
        assert!(parse_path("$a").unwrap_err().contains("expected"));
        let doc: Value = serde_json::json!({"a": {"b.c": [0, 1, {"d": 5}]}, "n": null});
        assert_eq!(
            lookup(&doc, &parse_path("$.a[\"b.c\"][2].d").unwrap()),
            Some(&serde_json::json!(5))
        );
        assert_eq!(lookup(&doc, &parse_path("$.n").unwrap()), None);
        assert_eq!(lookup(&doc, &parse_path("$.zz").unwrap()), None);
    }
}
