use std::borrow::Cow;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Float64Type, Int32Type, Int64Type};
use kiln_storage::catalog::{CatalogState, ColumnDef, ColumnType, DatabaseDef, TableDef};
use kiln_storage::ids::{DatabaseId, TableId};
use proptest::prelude::*;

use super::parser::escape;
use super::*;

/// An owned copy of a parsed line, for comparisons.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    measurement: String,
    tags: Vec<(String, String)>,
    fields: Vec<(String, Value)>,
    timestamp: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
enum Value {
    F(f64),
    I(i64),
    U(u64),
    B(bool),
    S(String),
}

fn owned(line: &Line<'_, '_>) -> Row {
    Row {
        measurement: line.measurement.to_string(),
        tags: line
            .tags
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        fields: line
            .fields
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    FieldValue::Float(f) => Value::F(*f),
                    FieldValue::Integer(i) => Value::I(*i),
                    FieldValue::UInteger(u) => Value::U(*u),
                    FieldValue::Boolean(b) => Value::B(*b),
                    FieldValue::String(s) => Value::S(s.to_string()),
                };
                (k.to_string(), v)
            })
            .collect(),
        timestamp: line.timestamp,
    }
}

fn parse_all(input: &str) -> Vec<Result<Row, ParseError>> {
    let mut p = Parser::new(input);
    let mut out = Vec::new();
    while let Some(r) = p.next() {
        out.push(r.map(|l| owned(&l)));
    }
    out
}

fn parse_one(input: &str) -> Row {
    let mut rows = parse_all(input);
    assert_eq!(rows.len(), 1, "{input:?}");
    rows.remove(0).unwrap_or_else(|e| panic!("{input:?}: {e}"))
}

fn write(row: &Row) -> String {
    let mut s = String::new();
    escape::measurement(&row.measurement, &mut s);
    for (k, v) in &row.tags {
        s.push(',');
        escape::key(k, &mut s);
        s.push('=');
        escape::key(v, &mut s);
    }
    for (i, (k, v)) in row.fields.iter().enumerate() {
        s.push(if i == 0 { ' ' } else { ',' });
        escape::key(k, &mut s);
        s.push('=');
        match v {
            Value::F(f) => s.push_str(&format!("{f:?}")),
            Value::I(i) => s.push_str(&format!("{i}i")),
            Value::U(u) => s.push_str(&format!("{u}u")),
            Value::B(b) => s.push_str(if *b { "true" } else { "false" }),
            Value::S(x) => escape::string(x, &mut s),
        }
    }
    if let Some(ts) = row.timestamp {
        s.push_str(&format!(" {ts}"));
    }
    s
}

#[test]
fn every_field_type_and_spelling() {
    let row = parse_one(
        "m f=1.5,i=-3i,u=7u,s=\"hi\",a=t,b=T,c=true,d=True,e=TRUE,g=f,h=F,j=false,k=False,l=FALSE,n=1,o=-2e3 123",
    );
    let values: Vec<_> = row.fields.iter().map(|(_, v)| v.clone()).collect();
    assert_eq!(
        values,
        vec![
            Value::F(1.5),
            Value::I(-3),
            Value::U(7),
            Value::S("hi".into()),
            Value::B(true),
            Value::B(true),
            Value::B(true),
            Value::B(true),
            Value::B(true),
            Value::B(false),
            Value::B(false),
            Value::B(false),
            Value::B(false),
            Value::B(false),
            Value::F(1.0),
            Value::F(-2000.0),
        ]
    );
    assert_eq!(row.timestamp, Some(123));
}

#[test]
fn escaping_corner_cases_of_the_spec() {
    // Measurement: escaped comma and space; equals sign needs no escape.
    let r = parse_one(r"my\,meas\ ure=ment f=1");
    assert_eq!(r.measurement, "my,meas ure=ment");
    // Tag keys and values: comma, equals, space.
    let r = parse_one(r"m,tag\ key\,x\=y=va\=l\,u\ e f=1");
    assert_eq!(r.tags, vec![("tag key,x=y".into(), "va=l,u e".into())]);
    // Field key with escapes.
    let r = parse_one(r"m f\ k\=\,=1i");
    assert_eq!(r.fields[0].0, "f k=,");
    // String field: escaped quote and backslash; commas, spaces and equals inside.
    let r = parse_one(r#"m s="a \"quoted\" \\ value, with = signs" 5"#);
    assert_eq!(
        r.fields[0].1,
        Value::S(r#"a "quoted" \ value, with = signs"#.into())
    );
    // A backslash before any other character is literal.
    let r = parse_one(r"m\a,t=b\c f=1");
    assert_eq!(r.measurement, r"m\a");
    assert_eq!(r.tags[0].1, r"b\c");
    let r = parse_one(r#"m s="back\slash""#);
    assert_eq!(r.fields[0].1, Value::S(r"back\slash".into()));
    // Empty string value and a string that looks like other types.
    let r = parse_one(r#"m a="",b="1i",c="true""#);
    assert_eq!(r.fields[1].1, Value::S("1i".into()));
    // Unicode.
    let r = parse_one("温度,地点=東京 値=21.5");
    assert_eq!(r.tags[0].1, "東京");
    // Names without escapes borrow the input.
    let mut p = Parser::new("m,t=v f=1");
    let line = p.next().unwrap().unwrap();
    assert!(matches!(line.measurement, Cow::Borrowed(_)));
}

#[test]
fn two_backslashes_are_one_in_every_name() {
    // The examples of InfluxDB's line protocol reference.
    assert_eq!(parse_one(r"my\\wea\\ther v=1").measurement, r"my\wea\ther");
    assert_eq!(
        parse_one(r"m,k=\\wea\\ther v=1").tags,
        vec![("k".into(), r"\wea\ther".into())]
    );
    // An escaped backslash, then an escaped space.
    assert_eq!(
        parse_one(r"with\\\ backslash v=1").measurement,
        r"with\ backslash"
    );
    // Tag keys and field keys.
    let r = parse_one(r"m,a\\b=c d\\e=1i");
    assert_eq!(r.tags, vec![(r"a\b".into(), "c".into())]);
    assert_eq!(r.fields[0].0, r"d\e");
    // A name ending in a backslash: the next separator is not escaped.
    let r = parse_one(r"m\\,t\\=v\\ f\\=1 7");
    assert_eq!(r.measurement, r"m\");
    assert_eq!(r.tags, vec![(r"t\".into(), r"v\".into())]);
    assert_eq!(r.fields[0], (r"f\".into(), Value::F(1.0)));
    assert_eq!(r.timestamp, Some(7));
    // Three backslashes before a separator: one literal backslash, then the escape.
    let r = parse_one(r"m,t=a\\\,b f\\\==1");
    assert_eq!(r.tags, vec![("t".into(), r"a\,b".into())]);
    assert_eq!(r.fields[0].0, r"f\=");
    // Four backslashes are two.
    assert_eq!(parse_one(r"a\\\\b v=1").measurement, r"a\\b");
    // A lone backslash before another character stays literal, next to escaped ones.
    assert_eq!(parse_one(r"a\b\\c v=1").measurement, r"a\b\c");
    // `\=` is not an escape in a measurement; `\"` and `\\` in string values as before.
    assert_eq!(parse_one(r"a\=b v=1").measurement, r"a\=b");
    let r = parse_one(r#"m s="x\\\"y\\" 1"#);
    assert_eq!(r.fields[0].1, Value::S(r#"x\"y\"#.into()));
}

#[test]
fn names_longer_than_the_limit_are_refused_with_their_part() {
    use super::parser::{MAX_NAME_BYTES, NamePart};
    let long = "x".repeat(MAX_NAME_BYTES + 1);
    let at_limit = "x".repeat(MAX_NAME_BYTES);
    // At the limit is fine, escapes counted once.
    let r = parse_one(&format!("{at_limit},{at_limit}={at_limit} {at_limit}=1"));
    assert_eq!(r.measurement.len(), MAX_NAME_BYTES);
    let escaped_at_limit = r"\ ".repeat(MAX_NAME_BYTES);
    assert_eq!(
        parse_one(&format!("m {escaped_at_limit}=1")).fields[0]
            .0
            .len(),
        MAX_NAME_BYTES
    );
    let cases = [
        (format!("{long} f=1"), 1, NamePart::Measurement),
        (format!("m,{long}=v f=1"), 3, NamePart::TagKey),
        (format!("m,t=v,u={long} f=1"), 9, NamePart::TagValue),
        (format!("m,t=v f=1,{long}=2"), 11, NamePart::FieldKey),
    ];
    for (input, column, part) in cases {
        let rows = parse_all(&format!("ok f=1\n{input}\nok f=2\n"));
        assert!(rows[0].is_ok() && rows[2].is_ok(), "the other lines parse");
        let err = rows[1].clone().unwrap_err();
        assert_eq!(
            (err.line, err.column, err.kind.clone()),
            (
                2,
                column,
                ErrorKind::NameTooLong {
                    part,
                    bytes: MAX_NAME_BYTES + 1
                }
            )
        );
        assert!(
            err.to_string().ends_with(&format!(
                "{part} is 65536 bytes long; the limit is 65535 bytes"
            )),
            "{err}"
        );
    }
}

#[test]
fn comments_blank_lines_and_crlf() {
    let rows = parse_all("# a comment\r\n\r\n   \nm f=1 1\r\n  # indented comment\nm f=2 2\r\n");
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1].as_ref().unwrap().timestamp, Some(2));
    // Line numbers count skipped lines.
    let mut p = Parser::new("# c\n\nm f=1\nbad\n");
    assert_eq!(p.next().unwrap().unwrap().number, 3);
    assert_eq!(p.next().unwrap().unwrap_err().line, 4);
}

#[test]
fn each_error_kind_with_line_and_column() {
    let cases: &[(&str, usize, ErrorKind)] = &[
        (" ,t=v f=1", 2, ErrorKind::MissingMeasurement),
        ("m,=v f=1", 3, ErrorKind::MissingTagKey),
        ("m,t f=1", 4, ErrorKind::MissingTagValue { key: "t".into() }),
        (
            "m,t= f=1",
            5,
            ErrorKind::MissingTagValue { key: "t".into() },
        ),
        ("m", 2, ErrorKind::MissingFields),
        ("m,t=v", 6, ErrorKind::MissingFields),
        ("m ", 3, ErrorKind::MissingFields),
        ("m =1", 3, ErrorKind::MissingFieldKey),
        ("m f", 4, ErrorKind::MissingFieldValue { key: "f".into() }),
        ("m f=", 5, ErrorKind::MissingFieldValue { key: "f".into() }),
        (
            "m f=1,g=",
            9,
            ErrorKind::MissingFieldValue { key: "g".into() },
        ),
        (
            "m f=abc",
            5,
            ErrorKind::InvalidFieldValue {
                key: "f".into(),
                value: "abc".into(),
            },
        ),
        (
            "m f=1.5i",
            5,
            ErrorKind::InvalidFieldValue {
                key: "f".into(),
                value: "1.5i".into(),
            },
        ),
        (
            "m f=-1u",
            5,
            ErrorKind::InvalidFieldValue {
                key: "f".into(),
                value: "-1u".into(),
            },
        ),
        (
            "m f=99999999999999999999i",
            5,
            ErrorKind::InvalidFieldValue {
                key: "f".into(),
                value: "99999999999999999999i".into(),
            },
        ),
        (
            "m f=1e999",
            5,
            ErrorKind::NonFiniteFloat { key: "f".into() },
        ),
        (
            "m f=inf",
            5,
            ErrorKind::InvalidFieldValue {
                key: "f".into(),
                value: "inf".into(),
            },
        ),
        (
            "m f=NaN",
            5,
            ErrorKind::InvalidFieldValue {
                key: "f".into(),
                value: "NaN".into(),
            },
        ),
        (
            "m f=\"open",
            5,
            ErrorKind::UnterminatedString { key: "f".into() },
        ),
        (
            "m f=1 12x",
            7,
            ErrorKind::InvalidTimestamp {
                value: "12x".into(),
            },
        ),
        (
            "m f=1 1.5",
            7,
            ErrorKind::InvalidTimestamp {
                value: "1.5".into(),
            },
        ),
        ("m f=1 1 2", 9, ErrorKind::TrailingCharacters),
    ];
    for (input, column, kind) in cases {
        let body = format!("ok f=1\n{input}\n");
        let rows = parse_all(&body);
        assert!(rows[0].is_ok());
        let err = rows[1].clone().expect_err(input);
        assert_eq!(
            (err.line, err.column, &err.kind),
            (2, *column, kind),
            "{input:?}"
        );
        assert!(err.to_string().starts_with("line 2, column "), "{err}");
    }
}

fn name() -> impl Strategy<Value = String> {
    // Printable names with the characters that need escaping (a backslash anywhere, the
    // last character included, is written doubled); never starting with '#'.
    proptest::string::string_regex(r#"[a-zA-Z0-9_ ,=\\"é東\-\.]{1,12}"#)
        .unwrap()
        .prop_filter("no leading #", |s| !s.starts_with('#'))
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::F),
        any::<i64>().prop_map(Value::I),
        any::<u64>().prop_map(Value::U),
        any::<bool>().prop_map(Value::B),
        proptest::string::string_regex(r#"[a-z \\",=é]{0,12}"#)
            .unwrap()
            .prop_map(Value::S),
    ]
}

fn row() -> impl Strategy<Value = Row> {
    (
        name().prop_filter("measurement can't start with a space", |s| {
            !s.starts_with(' ')
        }),
        proptest::collection::vec((name(), name()), 0..4),
        proptest::collection::vec((name(), value()), 1..5),
        proptest::option::of(any::<i64>()),
    )
        .prop_map(|(measurement, tags, fields, timestamp)| Row {
            measurement,
            tags,
            fields,
            timestamp,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn rows_round_trip_through_text(rows in proptest::collection::vec(row(), 1..6)) {
        let text: String = rows.iter().map(|r| write(r) + "\n").collect();
        let parsed: Vec<Row> = parse_all(&text).into_iter().map(|r| r.unwrap()).collect();
        prop_assert_eq!(parsed, rows);
    }

    #[test]
    fn arbitrary_input_never_panics(input in "\\PC{0,64}") {
        let _ = parse_all(&input);
    }
}

fn catalog_with_cpu() -> CatalogState {
    let mut state = CatalogState::default();
    state.databases.insert(
        "db".into(),
        DatabaseDef {
            id: DatabaseId(0),
            name: "db".into(),
            tables: [("cpu".to_string(), TableId(0))].into(),
            retention_nanos: None,
        },
    );
    state.tables.insert(
        TableId(0),
        TableDef {
            id: TableId(0),
            database: DatabaseId(0),
            name: "cpu".into(),
            partition_nanos: 3_600_000_000_000,
            retention_nanos: None,
            columns: vec![
                ColumnDef {
                    name: "time".into(),
                    ty: ColumnType::Time,
                },
                ColumnDef {
                    name: "host".into(),
                    ty: ColumnType::Tag,
                },
                ColumnDef {
                    name: "usage".into(),
                    ty: ColumnType::Float,
                },
            ],
        },
    );
    state
}

fn column<'a>(batch: &'a RecordBatch, name: &str) -> &'a arrow::array::ArrayRef {
    batch
        .column_by_name(name)
        .unwrap_or_else(|| panic!("no column {name}"))
}

#[test]
fn lines_become_arrow_columns_with_nulls_for_missing_values() {
    let body = "cpu,host=a usage=1.5 10\ncpu,host=b,rack=r1 usage=2,load=3i 20\nmem free=7i 30\ncpu usage=4 40";
    let v = validate_lines(body, "db", &catalog_with_cpu(), Precision::Seconds, 0);
    assert!(v.rejected.is_empty(), "{:?}", v.rejected);
    assert_eq!(v.accepted_lines, 4);
    let (name, cpu) = &v.tables[0];
    assert_eq!(name, "cpu");
    assert_eq!(cpu.num_rows(), 3);
    let times = column(cpu, "time").as_primitive::<arrow::datatypes::TimestampNanosecondType>();
    assert_eq!(
        times.values(),
        &[10_000_000_000, 20_000_000_000, 40_000_000_000]
    );
    let usage = column(cpu, "usage").as_primitive::<Float64Type>();
    assert_eq!(usage.values(), &[1.5, 2.0, 4.0]);
    let load = column(cpu, "load").as_primitive::<Int64Type>();
    assert_eq!(
        (load.is_null(0), load.value(1), load.is_null(2)),
        (true, 3, true)
    );
    let host = column(cpu, "host").as_dictionary::<Int32Type>();
    assert!(host.is_null(2));
    let changed: Vec<_> = v
        .schema_changes
        .iter()
        .map(|c| (c.table.as_str(), c.column.as_str(), c.ty))
        .collect();
    assert_eq!(
        changed,
        vec![
            ("cpu", "rack", ColumnType::Tag),
            ("cpu", "load", ColumnType::Integer),
            ("mem", "free", ColumnType::Integer),
        ]
    );
}

#[test]
fn type_conflicts_reject_the_line_and_name_line_column_and_field() {
    let body = "cpu,host=a usage=1 1\ncpu,host=a usage=\"high\" 2\ncpu,host=a new=1i 3\ncpu,host=a new=1 4\ncpu usage=2,host=3 5\ncpu time=1 6";
    let v = validate_lines(body, "db", &catalog_with_cpu(), Precision::Nanoseconds, 0);
    assert_eq!(v.accepted_lines, 2);
    let errs: Vec<_> = v.rejected.iter().map(|e| (e.line, e.column)).collect();
    assert_eq!(errs, vec![(2, 12), (4, 12), (5, 13), (6, 5)]);
    assert!(
        v.rejected[0].message.contains("\"usage\"") && v.rejected[0].message.contains("float"),
        "{}",
        v.rejected[0]
    );
    assert!(
        v.rejected[1].message.contains("\"new\"") && v.rejected[1].message.contains("integer"),
        "{}",
        v.rejected[1]
    );
    assert!(
        v.rejected[2].message.contains("\"host\""),
        "{}",
        v.rejected[2]
    );
    assert!(
        v.rejected[3].message.contains("reserved"),
        "{}",
        v.rejected[3]
    );
    // Rejected lines leave no trace in the batch.
    assert_eq!(v.tables[0].1.num_rows(), 2);
}

#[test]
fn precision_scales_and_overflow_is_rejected() {
    let v = validate_lines(
        "m f=1 2\nm f=1 9223372036854775807",
        "db",
        &CatalogState::default(),
        Precision::Milliseconds,
        0,
    );
    assert_eq!(v.accepted_lines, 1);
    assert_eq!(v.rejected[0].line, 2);
    assert!(v.rejected[0].message.contains("outside the range"));
    let times =
        column(&v.tables[0].1, "time").as_primitive::<arrow::datatypes::TimestampNanosecondType>();
    assert_eq!(times.value(0), 2_000_000);
    assert!("h".parse::<Precision>().is_err());
    assert_eq!("u".parse::<Precision>(), Ok(Precision::Microseconds));
}

#[test]
fn names_the_catalog_would_refuse_reject_their_line() {
    let long = "k".repeat(256);
    let body = format!(
        "cpu,host=a usage=1 1\nplant/line1 v=1 2\ncpu,host=a {long}=1 3\ncpu,ho\u{1}st=a usage=2 4\nok v=1 5\n"
    );
    let v = validate_lines(&body, "db", &catalog_with_cpu(), Precision::Nanoseconds, 0);
    assert_eq!(v.accepted_lines, 2);
    let rejected: Vec<(usize, &str)> = v
        .rejected
        .iter()
        .map(|e| (e.line, e.message.as_str()))
        .collect();
    assert_eq!(rejected.len(), 3, "{rejected:?}");
    assert_eq!(rejected[0].0, 2);
    assert!(
        rejected[0].1.contains("must not contain '/'"),
        "{rejected:?}"
    );
    assert_eq!(rejected[1].0, 3);
    assert!(rejected[1].1.contains("at most 255 bytes"), "{rejected:?}");
    assert_eq!(rejected[2].0, 4);
    assert!(rejected[2].1.contains("control characters"), "{rejected:?}");
    // No schema change for a refused name.
    assert!(
        v.schema_changes
            .iter()
            .all(|c| c.column.len() <= 255 && c.table != "plant/line1"),
        "{:?}",
        v.schema_changes
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Any timestamp at any precision: the row is accepted with exactly `ts × precision`
    /// nanoseconds if Kiln stores that time, refused with an error at the timestamp's
    /// column otherwise; never a panic or a wrapped time.
    #[test]
    fn timestamps_are_stored_exactly_or_refused(
        ts in prop_oneof![any::<i64>(), Just(i64::MIN), Just(i64::MAX), -9_300_000_000i64..9_300_000_000],
        precision in prop_oneof![
            Just(Precision::Nanoseconds),
            Just(Precision::Microseconds),
            Just(Precision::Milliseconds),
            Just(Precision::Seconds),
        ],
    ) {
        let line = format!("cpu,host=a usage=1 {ts}");
        let v = validate_lines(&line, "db", &catalog_with_cpu(), precision, 0);
        let per = match precision {
            Precision::Nanoseconds => 1,
            Precision::Microseconds => 1_000,
            Precision::Milliseconds => 1_000_000,
            Precision::Seconds => 1_000_000_000,
        };
        let exact = i128::from(ts) * per;
        let stored = i128::from(kiln_storage::time::MIN_TIME)..=i128::from(kiln_storage::time::MAX_TIME);
        if stored.contains(&exact) {
            prop_assert!(v.rejected.is_empty(), "{:?}", v.rejected);
            let times = column(&v.tables[0].1, "time")
                .as_primitive::<arrow::datatypes::TimestampNanosecondType>();
            prop_assert_eq!(i128::from(times.value(0)), exact);
        } else {
            prop_assert_eq!(v.accepted_lines, 0);
            prop_assert_eq!(v.rejected.len(), 1);
            prop_assert_eq!(v.rejected[0].column, "cpu,host=a usage=1 ".len() + 1);
            prop_assert!(v.rejected[0].message.contains("outside the range"), "{}", v.rejected[0].message);
        }
    }
}
