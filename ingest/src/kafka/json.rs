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
//!
//! A message is read once, front to back, by a serde visitor that follows the mapping's
//! paths (a tree of their steps) and skips everything else without building it; strings are
//! borrowed from the message unless they have escapes, and each element of a `rows` array is
//! validated as soon as it has been read.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

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
        let mut row = PathTree::new();
        let table = Source::parse(&self.table, &mut row)?;
        let tags = self
            .tags
            .iter()
            .map(|(k, v)| Ok((k.clone(), Source::parse(v, &mut row)?)))
            .collect::<Result<_, String>>()?;
        let fields = self
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
                Ok((k.clone(), row.slot(&parse_path(path)?), ty))
            })
            .collect::<Result<_, String>>()?;
        let time = match &self.time {
            Some(path) => Some(row.slot(&parse_path(path)?)),
            None => None,
        };
        let rows = match &self.rows {
            Some(path) => {
                let mut tree = PathTree::new();
                let node = tree.node(&parse_path(path)?);
                Some((tree, node))
            }
            None => None,
        };
        Ok(CompiledMapping {
            rows,
            row,
            table,
            tags,
            fields,
            time,
            time_nanos,
        })
    }
}

/// The mapping's paths as a tree of steps, so that a message is read once, front to back,
/// following only mapped keys and skipping everything else without building it. Each
/// distinct path ends at a node with its own slot for the value found there.
#[derive(Debug, Clone)]
struct PathTree {
    /// `nodes[0]` is the root (`$`).
    nodes: Vec<PathNode>,
    slots: usize,
}

#[derive(Debug, Clone, Default)]
struct PathNode {
    keys: Vec<(String, usize)>,
    indices: Vec<(usize, usize)>,
    slot: Option<usize>,
}

impl PathTree {
    fn new() -> Self {
        Self {
            nodes: vec![PathNode::default()],
            slots: 0,
        }
    }

    /// The node at the end of `steps`, added if new.
    fn node(&mut self, steps: &[Step]) -> usize {
        let mut at = 0;
        for step in steps {
            let node = &self.nodes[at];
            let existing = match step {
                Step::Key(k) => node.keys.iter().find(|(n, _)| n == k).map(|(_, c)| *c),
                Step::Index(i) => node.indices.iter().find(|(n, _)| n == i).map(|(_, c)| *c),
            };
            at = match existing {
                Some(child) => child,
                None => {
                    let child = self.nodes.len();
                    self.nodes.push(PathNode::default());
                    match step {
                        Step::Key(k) => self.nodes[at].keys.push((k.clone(), child)),
                        Step::Index(i) => self.nodes[at].indices.push((*i, child)),
                    }
                    child
                }
            };
        }
        at
    }

    /// The slot of the value at `steps`: paths written alike share one.
    fn slot(&mut self, steps: &[Step]) -> usize {
        let node = self.node(steps);
        let slots = &mut self.slots;
        *self.nodes[node].slot.get_or_insert_with(|| {
            *slots += 1;
            *slots - 1
        })
    }
}

/// Where a mapped value comes from: a slot of the row's path tree, or a constant.
#[derive(Debug, Clone, PartialEq)]
enum Source {
    Slot(usize),
    Constant(String),
}

impl Source {
    fn parse(text: &str, tree: &mut PathTree) -> Result<Self, String> {
        if !text.starts_with('$') {
            return Ok(Self::Constant(text.to_string()));
        }
        Ok(Self::Slot(tree.slot(&parse_path(text)?)))
    }
}

/// A mapping with its paths parsed.
#[derive(Debug, Clone)]
pub struct CompiledMapping {
    /// The paths of the document down to its array of rows, and that array's node.
    rows: Option<(PathTree, usize)>,
    /// The paths of a row (of the document when there is no rows path).
    row: PathTree,
    table: Source,
    tags: Vec<(String, Source)>,
    fields: Vec<(String, usize, Option<FieldType>)>,
    time: Option<usize>,
    time_nanos: i64,
}

/// A value found at a mapped path, borrowed from the message unless it had escapes.
/// Objects and arrays are only noted (a mapped value must be a scalar).
#[derive(Debug, Clone, PartialEq)]
enum Scalar<'a> {
    Bool(bool),
    U64(u64),
    I64(i64),
    F64(f64),
    Str(Cow<'a, str>),
    Object,
    Array,
}

impl std::fmt::Display for Scalar<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Bool(b) => write!(f, "{b}"),
            Self::U64(n) => write!(f, "{n}"),
            Self::I64(n) => write!(f, "{n}"),
            Self::F64(n) => match serde_json::Number::from_f64(*n) {
                Some(n) => write!(f, "{n}"),
                None => write!(f, "{n}"),
            },
            Self::Str(s) => match serde_json::to_string(s) {
                Ok(quoted) => f.write_str(&quoted),
                Err(_) => write!(f, "{s:?}"),
            },
            Self::Object => f.write_str("{…}"),
            Self::Array => f.write_str("[…]"),
        }
    }
}

/// A string of the message for a row: borrowed, or copied if it had escapes.
fn share<'a>(s: &Cow<'a, str>) -> Cow<'a, str> {
    match s {
        Cow::Borrowed(s) => Cow::Borrowed(s),
        Cow::Owned(s) => Cow::Owned(s.clone()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tree {
    /// The document's path down to its rows.
    Rows,
    /// A row's paths.
    Row,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowsFound {
    Missing,
    NotArray,
    Array,
}

/// The state of reading one message: the values found for the current row, and the rows
/// pushed so far.
struct Reader<'a, 'v, 'c> {
    mapping: &'a CompiledMapping,
    validator: &'v mut Validator<'c>,
    default_time: i64,
    slots: Vec<Option<Scalar<'a>>>,
    /// Per node of each tree (indexed by [`Tree`]), the key to try first.
    hints: [Vec<usize>; 2],
    rows_found: RowsFound,
    rows: usize,
    tags: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    fields: Vec<(Cow<'a, str>, FieldValue<'a>)>,
}

impl<'a, 'v, 'c> Reader<'a, 'v, 'c> {
    fn tree(&self, tree: Tree) -> &'a PathTree {
        let mapping: &'a CompiledMapping = self.mapping;
        match (tree, &mapping.rows) {
            (Tree::Rows, Some((rows, _))) => rows,
            _ => &mapping.row,
        }
    }

    /// Validates the row whose values are in the slots, then empties them.
    fn push_row(&mut self) {
        self.rows += 1;
        let number = self.rows;
        let reject = |message: String| LineError {
            line: number,
            column: 0,
            message,
        };
        let m: &'a CompiledMapping = self.mapping;
        let outcome = self.read_row(m);
        self.slots.iter_mut().for_each(|s| *s = None);
        let (table, time) = match outcome {
            Ok(found) => found,
            Err(message) => return self.validator.reject(reject(message)),
        };
        if self.fields.is_empty() {
            return self.validator.reject(reject(
                "no fields: none of the mapped field paths has a value".into(),
            ));
        }
        let line = Line {
            number,
            raw: "",
            measurement: table,
            tags: &self.tags,
            fields: &self.fields,
            timestamp: Some(time),
        };
        self.validator
            .push(&line, Precision::Nanoseconds, self.default_time);
    }

    /// Fills `tags` and `fields` from the slots; returns the table and time.
    fn read_row(&mut self, m: &'a CompiledMapping) -> Result<(Cow<'a, str>, i64), String> {
        let (mut tags, mut fields) = (0, 0);
        let table = match &m.table {
            Source::Constant(c) => Cow::Borrowed(c.as_str()),
            Source::Slot(s) => match &self.slots[*s] {
                Some(Scalar::Str(t)) if !t.is_empty() => share(t),
                Some(other) => return Err(format!("the table is not a name: {other}")),
                None => return Err("the table path is missing".into()),
            },
        };
        for (name, source) in &m.tags {
            let value = match source {
                Source::Constant(c) => Cow::Borrowed(c.as_str()),
                Source::Slot(s) => match &self.slots[*s] {
                    None => continue,
                    Some(Scalar::Str(v)) => share(v),
                    Some(
                        v @ (Scalar::Bool(_) | Scalar::U64(_) | Scalar::I64(_) | Scalar::F64(_)),
                    ) => Cow::Owned(v.to_string()),
                    Some(other) => {
                        return Err(format!(
                            "tag {name:?}: {other} is not a string, number or boolean"
                        ));
                    }
                },
            };
            if !value.is_empty() {
                put(&mut self.tags, &mut tags, name, value);
            }
        }
        for (name, slot, ty) in &m.fields {
            if let Some(value) = &self.slots[*slot] {
                let value =
                    field_value(value, *ty).map_err(|why| format!("field {name:?}: {why}"))?;
                put(&mut self.fields, &mut fields, name, value);
            }
        }
        self.tags.truncate(tags);
        self.fields.truncate(fields);
        let time = match m.time.and_then(|s| self.slots[s].as_ref()) {
            Some(v) => m.time_of(v)?,
            None => self.default_time,
        };
        Ok((table, time))
    }
}

/// Sets entry `n` of `list` to `(name, value)` and moves `n` on: in place when the entry
/// already has that name (the rows of a message name the same columns), rather than
/// building the list again for every row.
fn put<'a, V>(list: &mut Vec<(Cow<'a, str>, V)>, n: &mut usize, name: &'a str, value: V) {
    match list.get_mut(*n) {
        Some((Cow::Borrowed(k), v)) if std::ptr::eq(*k, name) => *v = value,
        _ => {
            list.truncate(*n);
            list.push((Cow::Borrowed(name), value));
        }
    }
    *n += 1;
}

/// Reads the value at one node of a path tree: records it in the node's slot, descends
/// into mapped keys and indices, and skips the rest (checked as JSON, never built).
struct Walk<'r, 'a, 'v, 'c> {
    reader: &'r mut Reader<'a, 'v, 'c>,
    tree: Tree,
    node: usize,
    /// The node's slot (only nodes of a row have one).
    slot: Option<usize>,
}

impl<'r, 'a, 'v, 'c> Walk<'r, 'a, 'v, 'c> {
    /// At the root of `tree`.
    fn root(reader: &'r mut Reader<'a, 'v, 'c>, tree: Tree) -> Self {
        let slot = reader.tree(tree).nodes[0].slot;
        Self {
            reader,
            tree,
            node: 0,
            slot,
        }
    }

    fn set(&mut self, value: Option<Scalar<'a>>) {
        if let Some(slot) = self.slot {
            self.reader.slots[slot] = value;
        }
    }
}

impl<'de: 'a, 'a> DeserializeSeed<'de> for Walk<'_, 'a, '_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        if self.tree == Tree::Rows
            && let Some((_, rows)) = &self.reader.mapping.rows
            && self.node == *rows
        {
            return deserializer.deserialize_any(RowsVisitor(self.reader));
        }
        deserializer.deserialize_any(self)
    }
}

impl<'de: 'a, 'a> Visitor<'de> for Walk<'_, 'a, '_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(mut self, v: bool) -> Result<(), E> {
        self.set(Some(Scalar::Bool(v)));
        Ok(())
    }

    fn visit_i64<E>(mut self, v: i64) -> Result<(), E> {
        self.set(Some(Scalar::I64(v)));
        Ok(())
    }

    fn visit_u64<E>(mut self, v: u64) -> Result<(), E> {
        self.set(Some(Scalar::U64(v)));
        Ok(())
    }

    fn visit_f64<E>(mut self, v: f64) -> Result<(), E> {
        self.set(Some(Scalar::F64(v)));
        Ok(())
    }

    fn visit_borrowed_str<E>(mut self, v: &'de str) -> Result<(), E> {
        self.set(Some(Scalar::Str(Cow::Borrowed(v))));
        Ok(())
    }

    fn visit_str<E>(mut self, v: &str) -> Result<(), E> {
        self.set(Some(Scalar::Str(Cow::Owned(v.to_owned()))));
        Ok(())
    }

    fn visit_string<E>(mut self, v: String) -> Result<(), E> {
        self.set(Some(Scalar::Str(Cow::Owned(v))));
        Ok(())
    }

    /// `null` is a missing value.
    fn visit_unit<E>(mut self) -> Result<(), E> {
        self.set(None);
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        self.set(Some(Scalar::Object));
        let nodes = &self.reader.tree(self.tree).nodes;
        let keys = &nodes[self.node].keys;
        // The key to try first: the one after the key matched last, so keys written in the
        // same order in every row are found at the first try.
        let mut hint = self.reader.hints[self.tree as usize][self.node];
        while let Some(key) = map.next_key_seed(KeySeed)? {
            let found = match keys.get(hint) {
                Some((k, _)) if *k == key => Some(hint),
                _ => keys.iter().position(|(k, _)| *k == key),
            };
            match found {
                Some(i) => {
                    hint = i + 1;
                    let node = keys[i].1;
                    map.next_value_seed(Walk {
                        reader: &mut *self.reader,
                        tree: self.tree,
                        node,
                        slot: nodes[node].slot,
                    })?;
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        self.reader.hints[self.tree as usize][self.node] = hint;
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        self.set(Some(Scalar::Array));
        let nodes = &self.reader.tree(self.tree).nodes;
        let indices = &nodes[self.node].indices;
        for i in 0.. {
            let more = match indices.iter().find(|(n, _)| *n == i) {
                Some(&(_, node)) => seq
                    .next_element_seed(Walk {
                        reader: &mut *self.reader,
                        tree: self.tree,
                        node,
                        slot: nodes[node].slot,
                    })?
                    .is_some(),
                None => seq.next_element::<IgnoredAny>()?.is_some(),
            };
            if !more {
                break;
            }
        }
        Ok(())
    }
}

/// A key, borrowed from the message unless it has escapes.
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a key")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }
}

/// Reads the value at the rows path: each element of the array is a row, pushed as soon as
/// it has been read.
struct RowsVisitor<'r, 'a, 'v, 'c>(&'r mut Reader<'a, 'v, 'c>);

impl<'de: 'a, 'a> Visitor<'de> for RowsVisitor<'_, 'a, '_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of rows")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.0.rows_found = RowsFound::Array;
        while let Some(()) = seq.next_element_seed(Walk::root(&mut *self.0, Tree::Row))? {
            self.0.push_row();
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.0.rows_found = RowsFound::NotArray;
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(())
    }

    /// `null` is a missing value.
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        self.not_array()
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        self.not_array()
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        self.not_array()
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        self.not_array()
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        self.not_array()
    }
}

impl RowsVisitor<'_, '_, '_, '_> {
    fn not_array<E>(self) -> Result<(), E> {
        self.0.rows_found = RowsFound::NotArray;
        Ok(())
    }
}

/// Reads `text` as one JSON document from the root of `tree`.
fn read_document<'a>(
    reader: &mut Reader<'a, '_, '_>,
    tree: Tree,
    text: &'a str,
) -> Result<(), String> {
    let mut de = serde_json::Deserializer::from_str(text);
    Walk::root(reader, tree)
        .deserialize(&mut de)
        .and_then(|()| de.end())
        .map_err(|e| format!("invalid JSON: {e}"))
}

impl CompiledMapping {
    /// Pushes the rows of one JSON message into `validator`, reading the message once and
    /// building nothing but the mapped values. `default_time` is used for rows without a
    /// time. Errors that concern the message as a whole are returned (the rows already
    /// pushed are then the caller's to drop); a row's own problem is recorded in the
    /// validator like a rejected line (numbered from 1).
    pub(crate) fn push(
        &self,
        validator: &mut Validator<'_>,
        payload: &[u8],
        default_time: i64,
    ) -> Result<(), String> {
        let mut reader = Reader {
            mapping: self,
            validator,
            default_time,
            slots: vec![None; self.row.slots],
            hints: [
                vec![0; self.rows.as_ref().map_or(0, |(t, _)| t.nodes.len())],
                vec![0; self.row.nodes.len()],
            ],
            rows_found: RowsFound::Missing,
            rows: 0,
            tags: Vec::with_capacity(self.tags.len()),
            fields: Vec::with_capacity(self.fields.len()),
        };
        let tree = if self.rows.is_some() {
            Tree::Rows
        } else {
            Tree::Row
        };
        // One check of the whole message is faster than serde_json's check of each string.
        let text = std::str::from_utf8(payload)
            .map_err(|e| format!("invalid JSON: the message is not UTF-8: {e}"))?;
        read_document(&mut reader, tree, text)?;
        match (tree, reader.rows_found) {
            (Tree::Row, _) => reader.push_row(),
            (Tree::Rows, RowsFound::Array) => {}
            (Tree::Rows, RowsFound::NotArray) => {
                return Err("the rows path does not hold an array".into());
            }
            (Tree::Rows, RowsFound::Missing) => return Err("the rows path is missing".into()),
        }
        Ok(())
    }

    fn time_of(&self, v: &Scalar<'_>) -> Result<i64, String> {
        let overflow = || format!("time {v} is out of range");
        match v {
            Scalar::I64(i) => i.checked_mul(self.time_nanos).ok_or_else(overflow),
            Scalar::U64(u) => i64::try_from(*u)
                .ok()
                .and_then(|i| i.checked_mul(self.time_nanos))
                .ok_or_else(overflow),
            Scalar::F64(f) => {
                let t = f * self.time_nanos as f64;
                if t.is_finite() && t.abs() < i64::MAX as f64 {
                    Ok(t.round() as i64)
                } else {
                    Err(overflow())
                }
            }
            Scalar::Str(s) => chrono::DateTime::parse_from_rfc3339(s)
                .map_err(|e| format!("time {s:?} is not RFC 3339: {e}"))?
                .timestamp_nanos_opt()
                .ok_or_else(overflow),
            other => Err(format!(
                "time {other} is neither a number nor an RFC 3339 string"
            )),
        }
    }
}

/// `v` as a field of type `ty`; a number is a float unless the mapping says otherwise.
fn field_value<'a>(v: &Scalar<'a>, ty: Option<FieldType>) -> Result<FieldValue<'a>, String> {
    let wrong = |want: &str| format!("{v} is not {want}");
    Ok(match (ty, v) {
        (None | Some(FieldType::Float), Scalar::F64(n)) => FieldValue::Float(*n),
        (None | Some(FieldType::Float), Scalar::I64(n)) => FieldValue::Float(*n as f64),
        (None | Some(FieldType::Float), Scalar::U64(n)) => FieldValue::Float(*n as f64),
        (Some(FieldType::Integer), Scalar::I64(n)) => FieldValue::Integer(*n),
        (Some(FieldType::Integer), Scalar::U64(n)) => {
            FieldValue::Integer(i64::try_from(*n).map_err(|_| wrong("a 64-bit integer"))?)
        }
        (Some(FieldType::Integer), Scalar::F64(_)) => return Err(wrong("a 64-bit integer")),
        (Some(FieldType::Uinteger), Scalar::U64(n)) => FieldValue::UInteger(*n),
        (Some(FieldType::Uinteger), Scalar::I64(_) | Scalar::F64(_)) => {
            return Err(wrong("an unsigned 64-bit integer"));
        }
        (None | Some(FieldType::Boolean), Scalar::Bool(b)) => FieldValue::Boolean(*b),
        (None | Some(FieldType::String), Scalar::Str(s)) => FieldValue::String(share(s)),
        (Some(FieldType::Float), _) => return Err(wrong("a number")),
        (Some(FieldType::Integer | FieldType::Uinteger), _) => return Err(wrong("an integer")),
        (Some(FieldType::Boolean), _) => return Err(wrong("a boolean")),
        (Some(FieldType::String), _) => return Err(wrong("a string")),
        (None, _) => return Err(wrong("a number, boolean or string")),
    })
}

#[cfg(test)]
mod tests {
    use kiln_storage::catalog::CatalogState;
    use proptest::prelude::*;
    use serde_json::Value;

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
    }

    /// A mapping of nothing but `paths` (as fields), read over `doc`: the value found at
    /// each path, or `Err` for a document that is not JSON.
    fn read(paths: &[String], doc: &str) -> Result<Vec<Option<Scalar<'static>>>, String> {
        let mut row = PathTree::new();
        let slots: Vec<usize> = paths
            .iter()
            .map(|p| row.slot(&parse_path(p).unwrap()))
            .collect();
        let mapping = CompiledMapping {
            rows: None,
            row,
            table: Source::Constant("t".into()),
            tags: Vec::new(),
            fields: Vec::new(),
            time: None,
            time_nanos: 1,
        };
        let catalog = CatalogState::default();
        let mut validator = Validator::new("db", &catalog);
        let mut reader = Reader {
            mapping: &mapping,
            validator: &mut validator,
            default_time: 0,
            slots: vec![None; mapping.row.slots],
            hints: [Vec::new(), vec![0; mapping.row.nodes.len()]],
            rows_found: RowsFound::Missing,
            rows: 0,
            tags: Vec::new(),
            fields: Vec::new(),
        };
        read_document(&mut reader, Tree::Row, doc)?;
        Ok(slots
            .iter()
            .map(|&s| {
                reader.slots[s].clone().map(|v| match v {
                    Scalar::Str(s) => Scalar::Str(Cow::Owned(s.into_owned())),
                    Scalar::Bool(b) => Scalar::Bool(b),
                    Scalar::U64(n) => Scalar::U64(n),
                    Scalar::I64(n) => Scalar::I64(n),
                    Scalar::F64(n) => Scalar::F64(n),
                    Scalar::Object => Scalar::Object,
                    Scalar::Array => Scalar::Array,
                })
            })
            .collect())
    }

    /// What a path finds in a whole parsed document, as the mapping defines it.
    fn expected(doc: &Value, path: &str) -> Option<Scalar<'static>> {
        let mut v = doc;
        for step in parse_path(path).unwrap() {
            v = match step {
                Step::Key(k) => v.get(&k)?,
                Step::Index(i) => v.get(i)?,
            };
        }
        Some(match v {
            Value::Null => return None,
            Value::Bool(b) => Scalar::Bool(*b),
            Value::Number(n) => match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => Scalar::U64(u),
                (None, Some(i)) => Scalar::I64(i),
                _ => Scalar::F64(n.as_f64().unwrap()),
            },
            Value::String(s) => Scalar::Str(Cow::Owned(s.clone())),
            Value::Object(_) => Scalar::Object,
            Value::Array(_) => Scalar::Array,
        })
    }

    #[test]
    fn values_are_read_at_their_paths() {
        let doc = r#"{"a": {"b.c": [0, 1, {"d": 5}], "x": "t\"q\u00e9"}, "n": null,
                      "f": -1.5e3, "i": -7, "u": 18446744073709551615, "o": {"z": []},
                      "skip": [{"deep": [1, {"er": "s"}]}, "\\"], "b": true}"#;
        let paths: Vec<String> = [
            "$.a[\"b.c\"][2].d",
            "$.a.x",
            "$.n",
            "$.zz",
            "$.f",
            "$.i",
            "$.u",
            "$.o",
            "$.o.z",
            "$.b",
            "$.a[\"b.c\"][1]",
            "$.a[\"b.c\"][7]",
            "$.a.x.y",
        ]
        .map(String::from)
        .to_vec();
        let found = read(&paths, doc).unwrap();
        let whole: Value = serde_json::from_str(doc).unwrap();
        for (path, value) in paths.iter().zip(&found) {
            assert_eq!(*value, expected(&whole, path), "{path}");
        }
        assert_eq!(found[0], Some(Scalar::U64(5)));
        assert_eq!(found[1], Some(Scalar::Str(Cow::Owned("t\"qé".into()))));
        assert_eq!(found[2], None);
        assert_eq!(found[6], Some(Scalar::U64(u64::MAX)));
        assert!(read(&paths, r#"{"a": 1,}"#).is_err());
        assert!(read(&paths, r#"{"a": 1} 2"#).is_err());
        assert!(read(&paths, r#"{"skip": [1, 2}"#).is_err());
    }

    #[test]
    fn rows_of_one_message_may_lack_different_values() {
        let mapping: JsonMapping = toml::from_str(
            r#"
rows = "$.r"
table = "t"
tags = { a = "$.a", b = "$.b" }
fields = { x = "$.x", y = "$.y" }
time = "$.ts"
"#,
        )
        .unwrap();
        let compiled = mapping.compile().unwrap();
        let catalog = CatalogState::default();
        let mut v = Validator::new("db", &catalog);
        let doc = r#"{"r": [
            {"a": "a1", "b": "b1", "x": 1, "y": 2, "ts": 1},
            {"a": "a2", "x": 3, "ts": 2},
            {"a": "a3", "y": 4, "ts": 3},
            {"a": "a4", "b": "", "x": 5, "y": null, "ts": 4},
            {"a": "a5", "b": "b5", "x": 6, "y": 7, "ts": 5}]}"#;
        compiled.push(&mut v, doc.as_bytes(), 0).unwrap();
        let out = v.finish();
        assert!(out.rejected.is_empty(), "{:?}", out.rejected);
        let batch = &out.tables[0].1;
        let column = |name: &str| {
            let c = batch.column_by_name(name).unwrap();
            let c = arrow::compute::cast(c, &arrow::datatypes::DataType::Utf8).unwrap();
            (0..c.len())
                .map(|i| {
                    (!c.is_null(i))
                        .then(|| arrow::util::display::array_value_to_string(&c, i).unwrap())
                })
                .collect::<Vec<_>>()
        };
        let s = |v: &[Option<&str>]| v.iter().map(|o| o.map(String::from)).collect::<Vec<_>>();
        assert_eq!(
            column("a"),
            s(&[Some("a1"), Some("a2"), Some("a3"), Some("a4"), Some("a5")])
        );
        assert_eq!(column("b"), s(&[Some("b1"), None, None, None, Some("b5")]));
        assert_eq!(
            column("x"),
            s(&[Some("1.0"), Some("3.0"), None, Some("5.0"), Some("6.0")])
        );
        assert_eq!(
            column("y"),
            s(&[Some("2.0"), None, Some("4.0"), None, Some("7.0")])
        );
    }

    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1e6f64..1e6).prop_map(Value::from),
            "[a-z\"\\\\é]{0,4}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 40, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map("[ab\"]{1,2}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn path() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop_oneof![
                "[ab\"]{1,2}".prop_map(|k| format!("[{}]", serde_json::to_string(&k).unwrap())),
                "[ab]{1,2}".prop_map(|k| format!(".{k}")),
                (0usize..3).prop_map(|i| format!("[{i}]")),
            ],
            0..4,
        )
        .prop_map(|steps| format!("${}", steps.concat()))
        // `["…"]` ends at the first `"]`, so a key cannot end with a quote.
        .prop_filter("readable path", |p| parse_path(p).is_ok())
    }

    proptest! {
        /// Reading a message once, front to back, finds at every path what the whole
        /// parsed document holds there.
        #[test]
        fn the_streaming_reader_finds_what_the_document_holds(
            doc in json(),
            paths in proptest::collection::vec(path(), 1..6),
            pretty in any::<bool>(),
        ) {
            let text = if pretty {
                serde_json::to_string_pretty(&doc).unwrap()
            } else {
                serde_json::to_string(&doc).unwrap()
            };
            let found = read(&paths, &text).unwrap();
            for (p, value) in paths.iter().zip(&found) {
                prop_assert_eq!(value, &expected(&doc, p), "{} in {}", p, text);
            }
        }
    }
}
