//! Line protocol → validated Arrow batches, one per table, checked against the catalog.
//!
//! A line is validated whole before any of it is appended, so a rejected line leaves no
//! trace. A field's type is the catalog's, or for a new column the type of its first
//! occurrence in the request; a later line with another type is rejected naming the line,
//! column and field.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, Float64Builder, Int64Builder, RecordBatch, StringBuilder,
    StringDictionaryBuilder, TimestampNanosecondBuilder, UInt64Builder,
};
use arrow::datatypes::{Field, Int32Type, Schema};
use kiln_storage::catalog::{CatalogState, ColumnType, SchemaChange, TIME_COLUMN, TableDef};

use super::parser::{FieldValue, Line, ParseError, Parser};

/// Timestamp precision of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    Nanoseconds,
    Microseconds,
    Milliseconds,
    Seconds,
}

impl Precision {
    fn nanos(self) -> i64 {
        match self {
            Self::Nanoseconds => 1,
            Self::Microseconds => 1_000,
            Self::Milliseconds => 1_000_000,
            Self::Seconds => 1_000_000_000,
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;

    /// Accepts the spellings of InfluxDB v1, v2 and v3 (`ns`, `n`, `nanosecond`, `us`, `u`,
    /// `microsecond`, `ms`, `millisecond`, `s`, `second`, `auto` = nanoseconds).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "ns" | "n" | "nanosecond" | "auto" => Self::Nanoseconds,
            "us" | "u" | "µs" | "microsecond" => Self::Microseconds,
            "ms" | "millisecond" => Self::Milliseconds,
            "s" | "second" => Self::Seconds,
            other => return Err(format!("unknown precision {other:?}; use ns, us, ms or s")),
        })
    }
}

/// A rejected line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "line {}, column {}: {}",
            self.line, self.column, self.message
        )
    }
}

impl From<ParseError> for LineError {
    fn from(e: ParseError) -> Self {
        Self {
            line: e.line,
            column: e.column,
            message: e.kind.to_string(),
        }
    }
}

/// The outcome of parsing and validating one request body.
#[derive(Debug, Default)]
pub struct ValidatedLines {
    /// Per table, the accepted rows (column names and Arrow types as in the catalog).
    pub tables: Vec<(String, RecordBatch)>,
    /// Tables and columns the catalog must gain before these rows can be written.
    pub schema_changes: Vec<SchemaChange>,
    pub rejected: Vec<LineError>,
    /// Rejected lines per table, for those whose table was read.
    pub rejected_by_table: std::collections::BTreeMap<String, u64>,
    pub accepted_lines: usize,
    /// Of the rejected lines, those older than their table's retention.
    pub expired_lines: u64,
}

/// Parses `body` and validates each line against `catalog`'s view of `database`.
/// `default_time` (nanoseconds) is used for lines without a timestamp.
pub fn validate_lines(
    body: &str,
    database: &str,
    catalog: &CatalogState,
    precision: Precision,
    default_time: i64,
) -> ValidatedLines {
    let mut validator = Validator::new(database, catalog);
    let mut parser = Parser::new(body);
    while let Some(parsed) = parser.next() {
        match parsed {
            Ok(line) => validator.push(&line, precision, default_time),
            Err(e) => validator.reject(e.into()),
        }
    }
    validator.finish()
}

/// What rows take from outside their own text, such as an MQTT topic's levels: a table
/// that replaces the row's, and tags the row gets unless it has a tag of that name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RowContext {
    pub table: Option<String>,
    pub tags: Vec<(String, String)>,
}

/// Validates rows one at a time (from line protocol or any other row format) and
/// collects the accepted ones as Arrow columns per table.
pub struct Validator<'c> {
    database: &'c str,
    catalog: &'c CatalogState,
    tables: Vec<TableBuilder>,
    table_index: HashMap<String, usize>,
    /// The table of the last row: rows of one table tend to come together.
    last_table: usize,
    out: ValidatedLines,
    /// Now, for retention: rows older than their table's retention are refused.
    now: i64,
    /// Applied to every row pushed while set.
    context: Option<RowContext>,
}

impl<'c> Validator<'c> {
    pub fn new(database: &'c str, catalog: &'c CatalogState) -> Self {
        Self {
            database,
            catalog,
            tables: Vec::new(),
            table_index: HashMap::new(),
            last_table: 0,
            out: ValidatedLines::default(),
            now: kiln_storage::now_nanos(),
            context: None,
        }
    }

    /// Sets (or with `None` clears) the context the rows pushed from now on take.
    pub fn set_context(&mut self, context: Option<RowContext>) {
        self.context = context;
    }

    /// Validates one row; it is either accepted whole or recorded as rejected.
    pub fn push(&mut self, line: &Line<'_, '_>, precision: Precision, default_time: i64) {
        let Some(context) = self.context.take() else {
            return self.push_row(line, precision, default_time);
        };
        let mut tags = line.tags.to_vec();
        for (name, value) in &context.tags {
            if !tags.iter().any(|(n, _)| n == name) {
                tags.push((Cow::Borrowed(name.as_str()), Cow::Borrowed(value.as_str())));
            }
        }
        let measurement = match &context.table {
            Some(table) => Cow::Borrowed(table.as_str()),
            None => line.measurement.clone(),
        };
        let row = Line {
            measurement,
            tags: &tags,
            ..line.clone()
        };
        self.push_row(&row, precision, default_time);
        self.context = Some(context);
    }

    fn push_row(&mut self, line: &Line<'_, '_>, precision: Precision, default_time: i64) {
        let name = line.measurement.as_ref();
        let idx = match self.tables.get(self.last_table) {
            Some(t) if t.name == name => Some(self.last_table),
            _ => self.table_index.get(name).copied(),
        };
        let idx = match idx {
            Some(i) => i,
            None => {
                // A materialized view's rows come from its query only.
                if let Some(def) = self.catalog.table(self.database, name)
                    && self.catalog.view(def.id).is_some()
                {
                    self.out.rejected.push(LineError {
                        line: line.number,
                        column: 1,
                        message: format!(
                            "measurement: table {name:?} is a materialized view: its rows come \
                             from its query (write to the table it aggregates)"
                        ),
                    });
                    return;
                }
                // A table this write would create: its name must be one the catalog takes.
                if self.catalog.table(self.database, name).is_none()
                    && let Err(e) = kiln_storage::catalog::validate_name(name)
                {
                    self.out.rejected.push(LineError {
                        line: line.number,
                        column: 1,
                        message: format!("measurement: {e}"),
                    });
                    return;
                }
                let name = name.to_string();
                let retention = self
                    .catalog
                    .retention_by_name(self.database, &name)
                    .map(|r| (self.now.saturating_sub(r), r));
                self.tables.push(TableBuilder::new(
                    name.clone(),
                    self.catalog.table(self.database, &name),
                    retention,
                ));
                self.table_index.insert(name, self.tables.len() - 1);
                self.tables.len() - 1
            }
        };
        self.last_table = idx;
        match self.tables[idx].append(line, precision, default_time) {
            Ok(()) => self.out.accepted_lines += 1,
            Err(e) => {
                if e.expired {
                    self.out.expired_lines += 1;
                }
                self.out.rejected.push(e.error);
                *self
                    .out
                    .rejected_by_table
                    .entry(self.tables[idx].name.clone())
                    .or_default() += 1;
            }
        }
    }

    /// Records a row that could not even be read.
    pub fn reject(&mut self, error: LineError) {
        self.out.rejected.push(error);
    }

    /// The rows rejected so far, in order.
    pub fn rejected(&self) -> &[LineError] {
        &self.out.rejected
    }

    pub fn finish(mut self) -> ValidatedLines {
        for t in self.tables {
            if t.rows == 0 {
                continue;
            }
            self.out.schema_changes.extend(t.new_columns());
            let name = t.name.clone();
            self.out.tables.push((name, t.finish()));
        }
        self.out
    }
}

enum Builder {
    Tag(StringDictionaryBuilder<Int32Type>),
    Float(Float64Builder),
    Integer(Int64Builder),
    UInteger(UInt64Builder),
    Boolean(BooleanBuilder),
    String(StringBuilder),
}

impl Builder {
    fn new(ty: ColumnType) -> Self {
        match ty {
            ColumnType::Tag | ColumnType::Time => Self::Tag(StringDictionaryBuilder::new()),
            ColumnType::Float => Self::Float(Float64Builder::new()),
            ColumnType::Integer => Self::Integer(Int64Builder::new()),
            ColumnType::UInteger => Self::UInteger(UInt64Builder::new()),
            ColumnType::Boolean => Self::Boolean(BooleanBuilder::new()),
            ColumnType::String => Self::String(StringBuilder::new()),
        }
    }

    fn append_null(&mut self) {
        match self {
            Self::Tag(b) => b.append_null(),
            Self::Float(b) => b.append_null(),
            Self::Integer(b) => b.append_null(),
            Self::UInteger(b) => b.append_null(),
            Self::Boolean(b) => b.append_null(),
            Self::String(b) => b.append_null(),
        }
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            Self::Tag(b) => Arc::new(b.finish()),
            Self::Float(b) => Arc::new(b.finish()),
            Self::Integer(b) => Arc::new(b.finish()),
            Self::UInteger(b) => Arc::new(b.finish()),
            Self::Boolean(b) => Arc::new(b.finish()),
            Self::String(b) => Arc::new(b.finish()),
        }
    }
}

struct Column {
    name: String,
    ty: ColumnType,
    is_new: bool,
    builder: Builder,
    /// Row count after this column's last append.
    filled: usize,
}

struct TableBuilder {
    name: String,
    columns: Vec<Column>,
    index: HashMap<String, usize>,
    known: HashMap<String, ColumnType>,
    time: TimestampNanosecondBuilder,
    rows: usize,
    /// The table's retention cutoff (rows before it are refused) and its retention.
    retention: Option<(i64, i64)>,
    /// Scratch: column index per tag/field of the current line ([`NEW`] until created).
    scratch: Vec<usize>,
    /// The column index per tag/field of the last row: rows tend to name their columns in
    /// the same order, so a name is found by one comparison rather than a hash lookup.
    last: Vec<usize>,
}

/// A tag or field of the current line with no column yet.
const NEW: usize = usize::MAX;

/// 1-based character column where `key` (as written, possibly escaped) starts in the line:
/// the last `key=` occurrence, since fields follow tags and duplicates resolve to the last.
/// A backslash may have been written doubled (`\\`) or alone (before a character it does
/// not escape), so both spellings are looked for.
fn column_of(line: &Line<'_, '_>, key: &str) -> usize {
    let mut escaped = String::with_capacity(key.len() + 1);
    super::parser::escape::key(key, &mut escaped);
    escaped.push('=');
    let found = line.raw.rfind(&escaped).or_else(|| {
        let single = escaped.replace("\\\\", "\\");
        line.raw.rfind(&single)
    });
    found.map_or(1, |i| line.raw[..i].chars().count() + 1)
}

fn field_type(v: &FieldValue<'_>) -> ColumnType {
    match v {
        FieldValue::Float(_) => ColumnType::Float,
        FieldValue::Integer(_) => ColumnType::Integer,
        FieldValue::UInteger(_) => ColumnType::UInteger,
        FieldValue::Boolean(_) => ColumnType::Boolean,
        FieldValue::String(_) => ColumnType::String,
    }
}

/// Why a line was rejected, and whether for its table's retention.
struct Rejection {
    error: LineError,
    expired: bool,
}

impl From<LineError> for Rejection {
    fn from(error: LineError) -> Self {
        Self {
            error,
            expired: false,
        }
    }
}

impl TableBuilder {
    fn new(name: String, def: Option<&TableDef>, retention: Option<(i64, i64)>) -> Self {
        let known = def
            .map(|d| d.columns.iter().map(|c| (c.name.clone(), c.ty)).collect())
            .unwrap_or_default();
        Self {
            name,
            columns: Vec::new(),
            index: HashMap::new(),
            known,
            time: TimestampNanosecondBuilder::new(),
            rows: 0,
            retention,
            scratch: Vec::new(),
            last: Vec::new(),
        }
    }

    /// The column of the tag or field at `pos` of a line, if this request has one.
    fn resolve(&self, pos: usize, name: &str) -> usize {
        match self.last.get(pos) {
            Some(&ci) if ci != NEW && self.columns[ci].name == name => ci,
            _ => self.index.get(name).copied().unwrap_or(NEW),
        }
    }

    /// Checks `name`, resolved to column `ci`, against the type it has in this request or
    /// the catalog. Returns whether the column is unknown to both.
    fn check(
        &self,
        line: &Line<'_, '_>,
        name: &str,
        ty: ColumnType,
        ci: usize,
    ) -> Result<bool, LineError> {
        let err = |message: String| LineError {
            line: line.number,
            column: column_of(line, name),
            message,
        };
        let existing = if ci != NEW {
            Some(self.columns[ci].ty)
        } else if name == TIME_COLUMN {
            return Err(err(format!(
                "{name:?} is reserved for the timestamp and cannot be a tag or field name"
            )));
        } else {
            self.known.get(name).copied()
        };
        match existing {
            Some(existing) if existing != ty => Err(err(format!(
                "column {name:?} of table {:?} is {existing}; this line writes it as {ty}",
                self.name
            ))),
            Some(_) => Ok(false),
            // A column this write would create: its name must be one the catalog takes.
            None => kiln_storage::catalog::validate_column_name(name)
                .map(|()| true)
                .map_err(|e| err(e.to_string())),
        }
    }

    fn column_for(&mut self, name: &str, ty: ColumnType) -> usize {
        if let Some(i) = self.index.get(name) {
            return *i;
        }
        let is_new = !self.known.contains_key(name);
        let mut builder = Builder::new(ty);
        for _ in 0..self.rows {
            builder.append_null();
        }
        self.columns.push(Column {
            name: name.to_owned(),
            ty,
            is_new,
            builder,
            filled: self.rows,
        });
        self.index.insert(name.to_owned(), self.columns.len() - 1);
        self.columns.len() - 1
    }

    fn append(
        &mut self,
        line: &Line<'_, '_>,
        precision: Precision,
        default_time: i64,
    ) -> Result<(), Rejection> {
        // Validate the whole line first.
        self.scratch.clear();
        for (pos, k) in line
            .tags
            .iter()
            .map(|(k, _)| k)
            .chain(line.fields.iter().map(|(k, _)| k))
            .enumerate()
        {
            let ci = self.resolve(pos, k);
            self.scratch.push(ci);
        }
        let tag_count = line.tags.len();
        for (pos, (k, _)) in line.tags.iter().enumerate() {
            self.check(line, k, ColumnType::Tag, self.scratch[pos])?;
        }
        for (j, (k, v)) in line.fields.iter().enumerate() {
            let unknown = self.check(line, k, field_type(v), self.scratch[tag_count + j])?;
            // A known column has one type, so a name both tag and field fails the check.
            if unknown && line.tags.iter().any(|(t, _)| t == k) {
                return Err(LineError {
                    line: line.number,
                    column: column_of(line, k),
                    message: format!("{k:?} is used as both a tag and a field"),
                }
                .into());
            }
        }
        let timestamp_error = |message: String| LineError {
            line: line.number,
            column: line
                .raw
                .rfind(' ')
                .map_or(1, |i| line.raw[..=i].chars().count() + 1),
            message,
        };
        let time = match line.timestamp {
            Some(ts) => ts
                .checked_mul(precision.nanos())
                .and_then(|t| kiln_storage::time::check(t).ok())
                .ok_or_else(|| {
                    timestamp_error(format!(
                        "timestamp {ts} ({precision:?}) is outside the range Kiln stores \
                         (1678-01-01T00:00:00Z to 2261-12-31T23:59:59.999999999Z)"
                    ))
                })?,
            None => kiln_storage::time::check(default_time)
                .map_err(|e| timestamp_error(e.to_string()))?,
        };
        if let Some((cutoff, retention)) = self.retention
            && time < cutoff
        {
            return Err(Rejection {
                error: timestamp_error(format!(
                    "timestamp {} is older than the retention of table {:?} ({}): rows before {} have expired",
                    kiln_storage::time::rfc3339(time),
                    self.name,
                    kiln_storage::catalog::lifecycle::format_retention(Some(retention)),
                    kiln_storage::time::rfc3339(cutoff),
                )),
                expired: true,
            });
        }

        // Then append. Duplicate keys within a line: the last one wins.
        for (pos, (k, _)) in line.tags.iter().enumerate() {
            if self.scratch[pos] == NEW {
                self.scratch[pos] = self.column_for(k, ColumnType::Tag);
            }
        }
        for (j, (k, v)) in line.fields.iter().enumerate() {
            if self.scratch[tag_count + j] == NEW {
                self.scratch[tag_count + j] = self.column_for(k, field_type(v));
            }
        }
        let row = self.rows;
        for (pos, &ci) in self.scratch.iter().enumerate().rev() {
            let col = &mut self.columns[ci];
            if col.filled > row {
                continue; // a later duplicate already wrote this row
            }
            match (&mut col.builder, pos < tag_count) {
                (Builder::Tag(b), true) => b.append_value(line.tags[pos].1.as_ref()),
                (b, false) => match (b, &line.fields[pos - tag_count].1) {
                    (Builder::Float(b), FieldValue::Float(v)) => b.append_value(*v),
                    (Builder::Integer(b), FieldValue::Integer(v)) => b.append_value(*v),
                    (Builder::UInteger(b), FieldValue::UInteger(v)) => b.append_value(*v),
                    (Builder::Boolean(b), FieldValue::Boolean(v)) => b.append_value(*v),
                    (Builder::String(b), FieldValue::String(v)) => b.append_value(v.as_ref()),
                    (b, _) => b.append_null(),
                },
                (b, true) => b.append_null(),
            }
            col.filled = row + 1;
        }
        self.rows += 1;
        for col in &mut self.columns {
            if col.filled < self.rows {
                col.builder.append_null();
                col.filled = self.rows;
            }
        }
        std::mem::swap(&mut self.scratch, &mut self.last);
        self.time.append_value(time);
        Ok(())
    }

    fn new_columns(&self) -> Vec<SchemaChange> {
        let mut changes: Vec<SchemaChange> = self
            .columns
            .iter()
            .filter(|c| c.is_new)
            .map(|c| SchemaChange {
                table: self.name.clone(),
                column: c.name.clone(),
                ty: c.ty,
            })
            .collect();
        // Tags first, so a new table's tags come before its fields.
        changes.sort_by_key(|c| c.ty != ColumnType::Tag);
        changes
    }

    fn finish(mut self) -> RecordBatch {
        let mut fields = vec![Field::new(
            TIME_COLUMN,
            ColumnType::Time.arrow_type(),
            false,
        )];
        let mut arrays: Vec<ArrayRef> = vec![Arc::new(self.time.finish())];
        for col in &mut self.columns {
            fields.push(Field::new(&col.name, col.ty.arrow_type(), true));
            arrays.push(col.builder.finish());
        }
        RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)
            .expect("columns have equal length")
    }
}
