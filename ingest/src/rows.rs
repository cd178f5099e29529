//! Typed rows of `kiln.ingest.v1` (table, tags, typed fields, time) → validated Arrow
//! columns, by the same rules and with the same errors as line protocol.

use std::borrow::Cow;

use kiln_proto::ingest::v1::{Rows, field};
use kiln_storage::catalog::CatalogState;

use crate::line_protocol::{FieldValue, Line, LineError, Precision, ValidatedLines, Validator};

/// Typed rows → validated Arrow columns, with the same rules as line protocol.
pub fn validate_rows(rows: &Rows, db: &str, catalog: &CatalogState) -> ValidatedLines {
    let mut validator = Validator::new(db, catalog);
    push_rows(&mut validator, rows);
    let mut out = validator.finish();
    for e in &mut out.rejected {
        e.column = 0;
    }
    out
}

/// Validates typed rows into `validator`; a rejected row is numbered from 1 within `rows`.
pub fn push_rows(validator: &mut Validator<'_>, rows: &Rows) {
    let mut tags: Vec<(Cow<'_, str>, Cow<'_, str>)> = Vec::new();
    let mut fields: Vec<(Cow<'_, str>, FieldValue<'_>)> = Vec::new();
    for (i, row) in rows.rows.iter().enumerate() {
        let number = i + 1;
        let reject = |message: String| LineError {
            line: number,
            column: 0,
            message,
        };
        tags.clear();
        fields.clear();
        if row.table.is_empty() {
            validator.reject(reject("missing table".into()));
            continue;
        }
        if let Some((k, _)) = row.tags.iter().find(|(k, v)| k.is_empty() || v.is_empty()) {
            validator.reject(reject(format!("tag {k:?} has an empty name or value")));
            continue;
        }
        tags.extend(
            row.tags
                .iter()
                .map(|(k, v)| (Cow::Borrowed(k.as_str()), Cow::Borrowed(v.as_str()))),
        );
        // `row.tags` is a BTreeMap: already sorted by name, as a series key needs.
        let mut bad = None;
        for f in &row.fields {
            let value = match &f.value {
                Some(field::Value::Float(v)) if v.is_finite() => FieldValue::Float(*v),
                Some(field::Value::Float(_)) => {
                    bad = Some(format!(
                        "field {:?}: NaN and infinity are not allowed",
                        f.name
                    ));
                    break;
                }
                Some(field::Value::Integer(v)) => FieldValue::Integer(*v),
                Some(field::Value::Uinteger(v)) => FieldValue::UInteger(*v),
                Some(field::Value::Boolean(v)) => FieldValue::Boolean(*v),
                Some(field::Value::String(v)) => FieldValue::String(Cow::Borrowed(v.as_str())),
                None => {
                    bad = Some(format!("field {:?} has no value", f.name));
                    break;
                }
            };
            if f.name.is_empty() {
                bad = Some("a field has an empty name".into());
                break;
            }
            fields.push((Cow::Borrowed(f.name.as_str()), value));
        }
        if let Some(message) = bad {
            validator.reject(reject(message));
            continue;
        }
        if fields.is_empty() {
            validator.reject(reject("no fields: a row needs at least one".into()));
            continue;
        }
        let line = Line {
            number,
            raw: "",
            measurement: Cow::Borrowed(row.table.as_str()),
            tags: &tags,
            fields: &fields,
            timestamp: Some(row.time_unix_nano),
        };
        validator.push(&line, Precision::Nanoseconds, 0);
    }
}
