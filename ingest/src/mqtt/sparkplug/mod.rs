//! Sparkplug B: edge nodes and their devices on `spBv1.0/{group}/{type}/{edge_node}[/{device}]`
//! become rows.
//!
//! - **Births** (NBIRTH, DBIRTH) define each metric's name, alias and data type for the node
//!   or device, mark it online, and write the values they carry.
//! - **Data** (NDATA, DDATA) name metrics by alias or name; each distinct metric timestamp
//!   is one row of the data table with tags `group`, `edge_node`, `device` (absent for the
//!   node's own metrics) and one column per metric name.
//! - **Deaths** (NDEATH, whose `bdSeq` must match the birth's; DDEATH) mark the node (and its
//!   devices) or the device offline.
//! - Births and deaths are rows of the status table: the same tags, `online` (boolean) and
//!   for nodes `bd_seq`.
//! - Nothing is guessed: a data message whose node or device has no birth, with an alias no
//!   birth defined, or whose sequence number is not the one after the node's last, is
//!   refused, and the node is asked to be born again (an NCMD `Node Control/Rebirth`, at
//!   most every [`REBIRTH_INTERVAL`]). The node's messages are refused until its NBIRTH.
//! - Metric values Kiln does not store (data sets, templates, files, bytes, property sets,
//!   arrays) are left out of the row and counted; `bdSeq` and the `Node Control/` and
//!   `Device Control/` metrics are not data.
//!
//! A message becomes line protocol (one line per row), validated and written as any other.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use prost::Message as _;
use serde::{Deserialize, Serialize};

use crate::line_protocol::parser::escape;
use kiln_proto::sparkplug::{DataType, Metric, Payload, Value};

/// Topic namespace of Sparkplug B.
pub const NAMESPACE: &str = "spBv1.0";
/// Least time between two rebirth requests to one node.
pub const REBIRTH_INTERVAL: Duration = Duration::from_secs(5);

/// What one message gives.
#[derive(Debug, Default)]
pub struct Decoded {
    /// Line protocol of its rows; `None` when it has none (commands, host state).
    pub rows: Option<String>,
    /// Metrics left out, each with why.
    pub unsupported: Vec<String>,
    /// A rebirth request to publish: (topic, payload).
    pub rebirth: Option<(String, Vec<u8>)>,
    /// Nodes and devices that came online or went offline.
    pub presence: Vec<Presence>,
}

/// A node or device online or offline, for the device inventory: the device `tag`=`value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    /// `edge_node` or `device`.
    pub tag: &'static str,
    pub value: String,
    pub group: String,
    pub edge_node: String,
    pub online: bool,
}

/// Why a message was refused; a rebirth request may go with it.
#[derive(Debug)]
pub struct Refused {
    pub reason: String,
    pub rebirth: Option<(String, Vec<u8>)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct MetricDef {
    name: String,
    datatype: u32,
}

/// The metrics a birth defined, by alias and by name.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Definitions {
    by_alias: HashMap<u64, MetricDef>,
    by_name: HashMap<String, u32>,
}

impl Definitions {
    fn from_birth(metrics: &[Metric]) -> Self {
        let mut d = Self::default();
        for m in metrics {
            let (Some(name), Some(datatype)) = (&m.name, m.datatype) else {
                continue;
            };
            if let Some(alias) = m.alias {
                d.by_alias.insert(
                    alias,
                    MetricDef {
                        name: name.clone(),
                        datatype,
                    },
                );
            }
            d.by_name.insert(name.clone(), datatype);
        }
        d
    }

    /// The name and data type of a data message's metric.
    fn resolve(&self, m: &Metric) -> Result<(String, u32), String> {
        if let Some(alias) = m.alias.filter(|_| m.name.is_none()) {
            let def = self
                .by_alias
                .get(&alias)
                .ok_or_else(|| format!("alias {alias} is not defined by the birth"))?;
            return Ok((def.name.clone(), m.datatype.unwrap_or(def.datatype)));
        }
        let name = m
            .name
            .as_ref()
            .ok_or("a metric with neither name nor alias")?;
        match (m.datatype, self.by_name.get(name)) {
            (Some(t), _) | (None, Some(&t)) => Ok((name.clone(), t)),
            (None, None) => Err(format!(
                "metric {name:?} has no data type and the birth does not define it"
            )),
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Device {
    online: bool,
    metrics: Definitions,
}

/// What is known of an edge node. Its births (aliases, types, online flags) are kept on
/// disk; the sequence number is not: after a restart the node's next message sets it.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Node {
    online: bool,
    bd_seq: Option<u64>,
    /// The sequence number the next message must carry (`None`: any, once).
    #[serde(skip)]
    next_seq: Option<u8>,
    /// Waiting for a rebirth: data is refused until the NBIRTH.
    #[serde(skip)]
    stale: Option<String>,
    #[serde(skip)]
    rebirth_requested: Option<Instant>,
    metrics: Definitions,
    devices: HashMap<String, Device>,
}

/// The Sparkplug state of one source: every edge node it has heard of.
#[derive(Debug)]
pub struct Sparkplug {
    tables: Tables,
    nodes: HashMap<(String, String), Node>,
    /// Births or deaths changed what [`Self::save`] writes.
    changed: bool,
}

/// The file form of the nodes.
#[derive(Serialize, Deserialize)]
struct Saved {
    nodes: Vec<SavedNode>,
}

#[derive(Serialize, Deserialize)]
struct SavedNode {
    group: String,
    edge_node: String,
    node: Node,
}

/// Why the births kept on disk could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a Sparkplug B state file")]
    Format {
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

/// A parsed Sparkplug topic.
struct Topic<'t> {
    group: &'t str,
    kind: &'t str,
    node: &'t str,
    device: Option<&'t str>,
}

fn parse_topic(topic: &str) -> Result<Option<Topic<'_>>, String> {
    let levels: Vec<&str> = topic.split('/').collect();
    match levels.as_slice() {
        [NAMESPACE, "STATE", ..] => Ok(None),
        [NAMESPACE, group, kind, node] => Ok(Some(Topic {
            group,
            kind,
            node,
            device: None,
        })),
        [NAMESPACE, group, kind, node, device] => Ok(Some(Topic {
            group,
            kind,
            node,
            device: Some(device),
        })),
        _ => Err(format!(
            "topic {topic:?} is not spBv1.0/{{group}}/{{type}}/{{edge_node}}[/{{device}}]"
        )),
    }
}

/// The birth/death sequence number a birth or death certificate carries.
fn bd_seq(payload: &Payload) -> Option<u64> {
    payload
        .metrics
        .iter()
        .find(|m| m.name.as_deref() == Some("bdSeq"))
        .and_then(|m| match m.value {
            Some(Value::Long(v)) => Some(v),
            Some(Value::Int(v)) => Some(u64::from(v)),
            _ => None,
        })
}

/// Whether `name` is a metric that is no data (birth sequence, controls).
fn is_control(name: &str) -> bool {
    name == "bdSeq" || name.starts_with("Node Control/") || name.starts_with("Device Control/")
}

impl Sparkplug {
    pub fn new(table: String, status_table: String) -> Self {
        Self {
            tables: Tables {
                data_table: table,
                status_table,
            },
            nodes: HashMap::new(),
            changed: false,
        }
    }

    /// Takes the births kept in `path`, if it exists.
    pub fn load(&mut self, path: &Path) -> Result<(), StateError> {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(StateError::Io {
                    what: "read",
                    path: path.display().to_string(),
                    source,
                });
            }
        };
        let saved: Saved = serde_json::from_slice(&text).map_err(|source| StateError::Format {
            path: path.display().to_string(),
            source,
        })?;
        self.nodes = saved
            .nodes
            .into_iter()
            .map(|n| ((n.group, n.edge_node), n.node))
            .collect();
        Ok(())
    }

    /// Writes the births to `path` (durably: a new file, synced, renamed over the old)
    /// if a birth or death changed them since the last save.
    pub fn save(&mut self, path: &Path) -> Result<(), StateError> {
        if !self.changed {
            return Ok(());
        }
        let io = |what: &'static str, path: &Path| {
            let path = path.display().to_string();
            move |source| StateError::Io { what, path, source }
        };
        let mut nodes: Vec<SavedNode> = Vec::with_capacity(self.nodes.len());
        for ((group, edge_node), node) in &self.nodes {
            // Only what a birth defined goes to disk.
            nodes.push(SavedNode {
                group: group.clone(),
                edge_node: edge_node.clone(),
                node: Node {
                    online: node.online,
                    bd_seq: node.bd_seq,
                    metrics: node.metrics.clone(),
                    devices: node
                        .devices
                        .iter()
                        .map(|(k, d)| {
                            (
                                k.clone(),
                                Device {
                                    online: d.online,
                                    metrics: d.metrics.clone(),
                                },
                            )
                        })
                        .collect(),
                    ..Node::default()
                },
            });
        }
        let text = serde_json::to_vec(&Saved { nodes }).expect("serializable");
        let tmp = path.with_extension("tmp");
        {
            use std::io::Write as _;
            let mut f = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
            f.write_all(&text).map_err(io("write", &tmp))?;
            f.sync_all().map_err(io("sync", &tmp))?;
        }
        std::fs::rename(&tmp, path).map_err(io("rename", path))?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io("sync", dir))?;
        }
        self.changed = false;
        Ok(())
    }

    /// Decodes the message on `topic`, updating what is known of its node. `now` (ns) is
    /// the time of rows whose metrics and payload carry none.
    pub fn decode(&mut self, topic: &str, body: &[u8], now: i64) -> Result<Decoded, Refused> {
        let refuse = |reason: String| Refused {
            reason,
            rebirth: None,
        };
        let Some(t) = parse_topic(topic).map_err(refuse)? else {
            return Ok(Decoded::default());
        };
        if matches!(t.kind, "NCMD" | "DCMD") {
            return Ok(Decoded::default());
        }
        let payload =
            Payload::decode(body).map_err(|e| refuse(format!("not a Sparkplug B payload: {e}")))?;
        let time = payload.timestamp.and_then(nanos).unwrap_or(now);
        let key = (t.group.to_string(), t.node.to_string());
        let mut out = Decoded::default();
        let mut lines = String::new();
        match (t.kind, t.device) {
            ("NBIRTH", None) => {
                let bd_seq = bd_seq(&payload);
                let node = Node {
                    online: true,
                    bd_seq,
                    next_seq: Some(next(payload.seq.unwrap_or(0))),
                    metrics: Definitions::from_birth(&payload.metrics),
                    ..Node::default()
                };
                self.tables
                    .status(&mut lines, &mut out, &t, None, true, bd_seq, time);
                self.tables
                    .data(&mut lines, &mut out, &t, &node.metrics, &payload, time)
                    .map_err(refuse)?;
                self.nodes.insert(key, node);
                self.changed = true;
            }
            ("NDEATH", None) => {
                let bd_seq = bd_seq(&payload);
                let Some(node) = self.nodes.get_mut(&key) else {
                    return Ok(Decoded::default());
                };
                // A death certificate of an earlier session (its will, sent late).
                if bd_seq.is_some() && node.bd_seq.is_some() && bd_seq != node.bd_seq {
                    return Ok(Decoded::default());
                }
                node.online = false;
                let devices: Vec<String> = node
                    .devices
                    .iter_mut()
                    .filter(|(_, d)| d.online)
                    .map(|(name, d)| {
                        d.online = false;
                        name.clone()
                    })
                    .collect();
                let bd_seq = node.bd_seq;
                self.changed = true;
                self.tables
                    .status(&mut lines, &mut out, &t, None, false, bd_seq, time);
                for d in devices {
                    self.tables
                        .status(&mut lines, &mut out, &t, Some(&d), false, None, time);
                }
            }
            (kind @ ("NDATA" | "DBIRTH" | "DDATA" | "DDEATH"), device) => {
                self.in_sequence(&key, &payload, now)?;
                let tables = &self.tables;
                let node = self.nodes.get_mut(&key).expect("in sequence: born");
                // Why the node must be born again, if it must.
                let stale = match (kind, device) {
                    ("NDATA", None) => tables
                        .data(&mut lines, &mut out, &t, &node.metrics, &payload, time)
                        .err(),
                    ("DBIRTH", Some(d)) => {
                        let device = Device {
                            online: true,
                            metrics: Definitions::from_birth(&payload.metrics),
                        };
                        tables.status(&mut lines, &mut out, &t, Some(d), true, None, time);
                        tables
                            .data(&mut lines, &mut out, &t, &device.metrics, &payload, time)
                            .map_err(refuse)?;
                        node.devices.insert(d.to_string(), device);
                        self.changed = true;
                        None
                    }
                    ("DDATA", Some(d)) => match node.devices.get(d).filter(|d| d.online) {
                        Some(device) => tables
                            .data(&mut lines, &mut out, &t, &device.metrics, &payload, time)
                            .err(),
                        None => Some(format!("device {d:?} has no birth")),
                    },
                    ("DDEATH", Some(d)) => {
                        if let Some(device) = node.devices.get_mut(d) {
                            device.online = false;
                        }
                        self.changed = true;
                        tables.status(&mut lines, &mut out, &t, Some(d), false, None, time);
                        None
                    }
                    _ => {
                        return Err(refuse(format!(
                            "topic {topic:?}: {kind} {} a device level",
                            if device.is_some() {
                                "takes no"
                            } else {
                                "needs"
                            }
                        )));
                    }
                };
                if let Some(why) = stale {
                    return Err(self.stale(&key, why, now));
                }
            }
            (kind @ ("NBIRTH" | "NDEATH"), Some(_)) => {
                return Err(refuse(format!(
                    "topic {topic:?}: {kind} takes no device level"
                )));
            }
            (kind, _) => {
                return Err(refuse(format!(
                    "topic {topic:?}: unknown Sparkplug message type {kind:?}"
                )));
            }
        }
        out.rows = Some(lines).filter(|l| !l.is_empty());
        Ok(out)
    }

    fn node(&mut self, key: &(String, String)) -> &mut Node {
        self.nodes.entry(key.clone()).or_default()
    }

    /// The node of a message that must follow its birth in sequence; on a gap the node
    /// turns stale (and a rebirth is asked for).
    fn in_sequence(
        &mut self,
        key: &(String, String),
        payload: &Payload,
        now: i64,
    ) -> Result<(), Refused> {
        let node = self.nodes.get(key);
        let why = match node {
            None => Some("the edge node has no birth".to_string()),
            Some(n) if !n.online => Some("the edge node is dead (no birth since)".to_string()),
            Some(n) => match (&n.stale, payload.seq) {
                (Some(why), _) => Some(format!("awaiting the edge node's rebirth ({why})")),
                (None, None) => Some("the message has no sequence number".into()),
                (None, Some(seq)) if n.next_seq.is_some_and(|due| seq != u64::from(due)) => {
                    Some(format!(
                        "sequence number {seq} where {} was due",
                        n.next_seq.unwrap_or_default()
                    ))
                }
                (None, Some(_)) => None,
            },
        };
        if let Some(why) = why {
            return Err(self.stale(key, why, now));
        }
        self.node(key).next_seq = Some(next(payload.seq.unwrap_or_default()));
        Ok(())
    }

    /// Marks the node as waiting for a rebirth; the refusal carries a rebirth request
    /// unless one went out less than [`REBIRTH_INTERVAL`] ago.
    fn stale(&mut self, key: &(String, String), why: String, now: i64) -> Refused {
        let node = self.node(key);
        if node.stale.is_none() {
            node.stale = Some(why.clone());
        }
        let due = node
            .rebirth_requested
            .is_none_or(|at| at.elapsed() >= REBIRTH_INTERVAL);
        let rebirth = due.then(|| {
            node.rebirth_requested = Some(Instant::now());
            rebirth_request(&key.0, &key.1, now)
        });
        Refused {
            reason: format!("edge node {}/{}: {why}", key.0, key.1),
            rebirth,
        }
    }
}

/// The tables a source's rows go to, and how its rows are written as line protocol.
#[derive(Debug)]
struct Tables {
    data_table: String,
    status_table: String,
}

impl Tables {
    /// A status row of the node (or its `device`), and its presence for the inventory.
    #[allow(clippy::too_many_arguments)]
    fn status(
        &self,
        lines: &mut String,
        out: &mut Decoded,
        t: &Topic<'_>,
        device: Option<&str>,
        online: bool,
        bd_seq: Option<u64>,
        time: i64,
    ) {
        out.presence.push(Presence {
            tag: if device.is_some() {
                "device"
            } else {
                "edge_node"
            },
            value: device.unwrap_or(t.node).to_string(),
            group: t.group.to_string(),
            edge_node: t.node.to_string(),
            online,
        });
        self.row_start(lines, &self.status_table, t, device);
        let _ = write!(lines, " online={online}");
        if let Some(b) = bd_seq {
            let _ = write!(lines, ",bd_seq={b}u");
        }
        let _ = writeln!(lines, " {time}");
    }

    fn row_start(&self, lines: &mut String, table: &str, t: &Topic<'_>, device: Option<&str>) {
        escape::measurement(table, lines);
        lines.push_str(",group=");
        escape::key(t.group, lines);
        lines.push_str(",edge_node=");
        escape::key(t.node, lines);
        if let Some(d) = device {
            lines.push_str(",device=");
            escape::key(d, lines);
        }
    }

    /// Data rows of `payload`'s metrics (one per distinct timestamp).
    fn data(
        &self,
        lines: &mut String,
        out: &mut Decoded,
        t: &Topic<'_>,
        defs: &Definitions,
        payload: &Payload,
        time: i64,
    ) -> Result<(), String> {
        // Metric timestamp → its fields, in the order first seen.
        let mut rows: Vec<(i64, String)> = Vec::new();
        for m in &payload.metrics {
            let (name, datatype) = defs.resolve(m)?;
            if is_control(&name) || m.is_null == Some(true) {
                continue;
            }
            let field = match field(datatype, m.value.as_ref()) {
                Ok(Some(f)) => f,
                Ok(None) => continue,
                Err(why) => {
                    out.unsupported.push(format!("metric {name:?}: {why}"));
                    continue;
                }
            };
            let at = m.timestamp.and_then(nanos).unwrap_or(time);
            let fields = match rows.iter_mut().find(|(t, _)| *t == at) {
                Some((_, f)) => f,
                None => {
                    rows.push((at, String::new()));
                    &mut rows.last_mut().expect("just pushed").1
                }
            };
            if !fields.is_empty() {
                fields.push(',');
            }
            escape::key(&name, fields);
            fields.push('=');
            fields.push_str(&field);
        }
        for (at, fields) in rows {
            self.row_start(lines, &self.data_table, t, t.device);
            let _ = writeln!(lines, " {fields} {at}");
        }
        Ok(())
    }
}

/// Milliseconds since the epoch (Sparkplug's timestamps) as nanoseconds, if in range.
fn nanos(ms: u64) -> Option<i64> {
    i64::try_from(ms).ok()?.checked_mul(1_000_000)
}

/// The sequence number after `seq`.
fn next(seq: u64) -> u8 {
    ((seq + 1) % 256) as u8
}

/// A metric's value as a line protocol field value; `Ok(None)` for a metric without one,
/// `Err` for a type Kiln does not store.
fn field(datatype: u32, value: Option<&Value>) -> Result<Option<String>, String> {
    let Some(value) = value else {
        return Ok(None);
    };
    let ty = DataType::of(datatype)
        .ok_or_else(|| format!("data type {datatype} (arrays and unknown types) is not stored"))?;
    let mismatch = || format!("a {ty:?} metric carries a {value:?}");
    let mut s = String::new();
    match (ty, value) {
        (DataType::Int8, Value::Int(v)) => s = format!("{}i", *v as u8 as i8),
        (DataType::Int16, Value::Int(v)) => s = format!("{}i", *v as u16 as i16),
        (DataType::Int32, Value::Int(v)) => s = format!("{}i", *v as i32),
        (DataType::Int64, Value::Long(v)) => s = format!("{}i", *v as i64),
        (DataType::UInt8 | DataType::UInt16 | DataType::UInt32, Value::Int(v)) => {
            s = format!("{v}i")
        }
        // Some implementations send the small types in the 64-bit field.
        (DataType::Int8 | DataType::Int16 | DataType::Int32, Value::Long(v)) => {
            s = format!("{}i", *v as i64)
        }
        (DataType::UInt8 | DataType::UInt16 | DataType::UInt32, Value::Long(v)) => {
            s = format!("{v}i")
        }
        (DataType::UInt64, Value::Long(v)) => s = format!("{v}u"),
        (DataType::UInt64, Value::Int(v)) => s = format!("{v}u"),
        (DataType::DateTime, Value::Long(v)) => s = format!("{}i", *v as i64),
        (DataType::Float | DataType::Double, Value::Float(v)) => s = float(f64::from(*v))?,
        (DataType::Float | DataType::Double, Value::Double(v)) => s = float(*v)?,
        (DataType::Boolean, Value::Boolean(v)) => s = v.to_string(),
        (DataType::String | DataType::Text | DataType::Uuid, Value::String(v)) => {
            escape::string(v, &mut s)
        }
        (
            DataType::DataSet
            | DataType::Bytes
            | DataType::File
            | DataType::Template
            | DataType::PropertySet
            | DataType::PropertySetList,
            _,
        ) => return Err(format!("data type {ty:?} is not stored")),
        _ => return Err(mismatch()),
    }
    Ok(Some(s))
}

/// A float as line protocol writes it; not-a-number and infinities are not stored.
fn float(v: f64) -> Result<String, String> {
    if v.is_finite() {
        // `{:?}` keeps a decimal point: 1.0, not 1 (an integer in line protocol).
        Ok(format!("{v:?}"))
    } else {
        Err(format!("{v} is not stored"))
    }
}

/// The NCMD that asks `group`/`node` to publish its births again.
pub fn rebirth_request(group: &str, node: &str, now: i64) -> (String, Vec<u8>) {
    let payload = Payload {
        timestamp: u64::try_from(now / 1_000_000).ok(),
        metrics: vec![Metric {
            name: Some("Node Control/Rebirth".into()),
            datatype: Some(DataType::Boolean as u32),
            value: Some(Value::Boolean(true)),
            ..Metric::default()
        }],
        ..Payload::default()
    };
    (
        format!("{NAMESPACE}/{group}/NCMD/{node}"),
        payload.encode_to_vec(),
    )
}

#[cfg(test)]
mod tests;
