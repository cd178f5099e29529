use super::*;

const NOW: i64 = 1_700_000_000_000_000_000;

fn metric(
    name: Option<&str>,
    alias: Option<u64>,
    datatype: Option<DataType>,
    value: Value,
) -> Metric {
    Metric {
        name: name.map(str::to_string),
        alias,
        datatype: datatype.map(|d| d as u32),
        value: Some(value),
        ..Metric::default()
    }
}

fn body(seq: Option<u64>, timestamp: u64, metrics: Vec<Metric>) -> Vec<u8> {
    Payload {
        timestamp: Some(timestamp),
        metrics,
        seq,
        ..Payload::default()
    }
    .encode_to_vec()
}

fn rows(s: &mut Sparkplug, topic: &str, body: &[u8]) -> String {
    let d = s
        .decode(topic, body, NOW)
        .unwrap_or_else(|r| panic!("{topic}: {}", r.reason));
    d.rows.unwrap_or_default()
}

/// Decodes a message that must be refused for `why`.
fn refusal(s: &mut Sparkplug, topic: &str, body: &[u8], why: &str) -> Refused {
    let refused = s.decode(topic, body, NOW).unwrap_err();
    assert!(refused.reason.contains(why), "{topic}: {}", refused.reason);
    refused
}

fn births(s: &mut Sparkplug) {
    let nbirth = body(
        Some(0),
        1000,
        vec![
            metric(Some("bdSeq"), None, Some(DataType::Int64), Value::Long(7)),
            metric(
                Some("Node Control/Rebirth"),
                Some(0),
                Some(DataType::Boolean),
                Value::Boolean(false),
            ),
            metric(
                Some("uptime"),
                Some(1),
                Some(DataType::Int64),
                Value::Long(5),
            ),
        ],
    );
    assert_eq!(
        rows(s, "spBv1.0/plant/NBIRTH/gw1", &nbirth),
        "sparkplug_status,group=plant,edge_node=gw1 online=true,bd_seq=7u 1000000000\n\
         sparkplug,group=plant,edge_node=gw1 uptime=5i 1000000000\n"
    );
    let dbirth = body(
        Some(1),
        2000,
        vec![
            metric(
                Some("Inputs/Temp"),
                Some(10),
                Some(DataType::Float),
                Value::Float(20.5),
            ),
            metric(
                Some("Speed"),
                Some(11),
                Some(DataType::Int16),
                Value::Int(0xFFFE),
            ),
            metric(
                Some("Label"),
                Some(12),
                Some(DataType::String),
                Value::String("a \"b\"".into()),
            ),
            metric(
                Some("Table"),
                Some(13),
                Some(DataType::DataSet),
                Value::DataSet(vec![1]),
            ),
        ],
    );
    let d = s
        .decode("spBv1.0/plant/DBIRTH/gw1/press 4", &dbirth, NOW)
        .unwrap();
    assert_eq!(
        d.rows.unwrap(),
        "sparkplug_status,group=plant,edge_node=gw1,device=press\\ 4 online=true 2000000000\n\
         sparkplug,group=plant,edge_node=gw1,device=press\\ 4 Inputs/Temp=20.5,Speed=-2i,Label=\"a \\\"b\\\"\" 2000000000\n"
    );
    assert_eq!(
        d.unsupported,
        ["metric \"Table\": data type DataSet is not stored"]
    );
    assert_eq!(
        d.presence,
        [Presence {
            tag: "device",
            value: "press 4".into(),
            group: "plant".into(),
            edge_node: "gw1".into(),
            online: true,
        }]
    );
}

#[test]
fn births_define_aliases_and_data_uses_them() {
    let mut s = Sparkplug::new("sparkplug".into(), "sparkplug_status".into());
    births(&mut s);
    // Aliased data without names or types; one metric with its own timestamp.
    let mut late = metric(None, Some(10), None, Value::Float(21.0));
    late.timestamp = Some(3500);
    let ddata = body(
        Some(2),
        3000,
        vec![metric(None, Some(11), None, Value::Int(7)), late],
    );
    assert_eq!(
        rows(&mut s, "spBv1.0/plant/DDATA/gw1/press 4", &ddata),
        "sparkplug,group=plant,edge_node=gw1,device=press\\ 4 Speed=7i 3000000000\n\
         sparkplug,group=plant,edge_node=gw1,device=press\\ 4 Inputs/Temp=21.0 3500000000\n"
    );
    let ndata = body(
        Some(3),
        4000,
        vec![metric(Some("uptime"), None, None, Value::Long(9))],
    );
    assert_eq!(
        rows(&mut s, "spBv1.0/plant/NDATA/gw1", &ndata),
        "sparkplug,group=plant,edge_node=gw1 uptime=9i 4000000000\n"
    );
    let ddeath = body(Some(4), 5000, vec![]);
    assert_eq!(
        rows(&mut s, "spBv1.0/plant/DDEATH/gw1/press 4", &ddeath),
        "sparkplug_status,group=plant,edge_node=gw1,device=press\\ 4 online=false 5000000000\n"
    );
    // Data of a dead device is refused and asks for a rebirth.
    let refused = refusal(
        &mut s,
        "spBv1.0/plant/DDATA/gw1/press 4",
        &body(Some(5), 6000, vec![]),
        "has no birth",
    );
    assert!(refused.rebirth.is_some());
}

#[test]
fn an_unknown_alias_or_a_gap_refuses_until_the_rebirth() {
    let mut s = Sparkplug::new("sparkplug".into(), "sparkplug_status".into());
    births(&mut s);
    let unknown = body(
        Some(2),
        3000,
        vec![metric(None, Some(99), None, Value::Int(1))],
    );
    let refused = refusal(
        &mut s,
        "spBv1.0/plant/DDATA/gw1/press 4",
        &unknown,
        "alias 99 is not defined",
    );
    let (topic, request) = refused.rebirth.expect("a rebirth request");
    assert_eq!(topic, "spBv1.0/plant/NCMD/gw1");
    let request = Payload::decode(request.as_slice()).unwrap();
    assert_eq!(
        request.metrics[0].name.as_deref(),
        Some("Node Control/Rebirth")
    );
    assert_eq!(request.metrics[0].value, Some(Value::Boolean(true)));
    // The next message, in sequence, is refused too (no second request yet).
    let good = body(
        Some(3),
        3000,
        vec![metric(None, Some(11), None, Value::Int(1))],
    );
    let refused = refusal(
        &mut s,
        "spBv1.0/plant/DDATA/gw1/press 4",
        &good,
        "awaiting the edge node's rebirth",
    );
    assert!(refused.rebirth.is_none());
    // After the rebirth, data is written again.
    births(&mut s);
    assert!(
        !rows(
            &mut s,
            "spBv1.0/plant/DDATA/gw1/press 4",
            &body(
                Some(2),
                3000,
                vec![metric(None, Some(11), None, Value::Int(1))]
            )
        )
        .is_empty()
    );
    // A gap.
    let gap = body(
        Some(9),
        3000,
        vec![metric(None, Some(11), None, Value::Int(1))],
    );
    refusal(
        &mut s,
        "spBv1.0/plant/DDATA/gw1/press 4",
        &gap,
        "sequence number 9 where 3 was due",
    );
    // Data of a node never born asks for its birth.
    let refused = refusal(
        &mut s,
        "spBv1.0/plant/NDATA/gw2",
        &gap,
        "gw2: the edge node has no birth",
    );
    assert!(
        refused
            .rebirth
            .is_some_and(|(t, _)| t == "spBv1.0/plant/NCMD/gw2")
    );
}

#[test]
fn a_death_with_the_births_bd_seq_takes_the_node_and_its_devices_offline() {
    let mut s = Sparkplug::new("sparkplug".into(), "sparkplug_status".into());
    births(&mut s);
    let stale = body(
        None,
        9000,
        vec![metric(
            Some("bdSeq"),
            None,
            Some(DataType::Int64),
            Value::Long(6),
        )],
    );
    assert_eq!(rows(&mut s, "spBv1.0/plant/NDEATH/gw1", &stale), "");
    let death = body(
        None,
        9000,
        vec![metric(
            Some("bdSeq"),
            None,
            Some(DataType::Int64),
            Value::Long(7),
        )],
    );
    assert_eq!(
        rows(&mut s, "spBv1.0/plant/NDEATH/gw1", &death),
        "sparkplug_status,group=plant,edge_node=gw1 online=false,bd_seq=7u 9000000000\n\
         sparkplug_status,group=plant,edge_node=gw1,device=press\\ 4 online=false 9000000000\n"
    );
    assert!(
        s.decode("spBv1.0/plant/NDATA/gw1", &body(Some(2), 1, vec![]), NOW)
            .is_err()
    );
}

#[test]
fn values_of_every_stored_type_and_bad_messages() {
    for (ty, value, want) in [
        (DataType::Int8, Value::Int(0xFF), Some("-1i")),
        (DataType::Int32, Value::Int(u32::MAX), Some("-1i")),
        (DataType::Int64, Value::Long(u64::MAX), Some("-1i")),
        (DataType::UInt32, Value::Int(u32::MAX), Some("4294967295i")),
        (
            DataType::UInt64,
            Value::Long(u64::MAX),
            Some("18446744073709551615u"),
        ),
        (DataType::Double, Value::Double(2.0), Some("2.0")),
        (DataType::Boolean, Value::Boolean(true), Some("true")),
        (
            DataType::DateTime,
            Value::Long(1_700_000_000_000),
            Some("1700000000000i"),
        ),
        (DataType::Uuid, Value::String("x".into()), Some("\"x\"")),
        (DataType::Double, Value::Double(f64::NAN), None),
        (DataType::Boolean, Value::Int(1), None),
        (DataType::Template, Value::Template(vec![]), None),
    ] {
        assert_eq!(
            field(ty as u32, Some(&value)).ok().flatten().as_deref(),
            want,
            "{ty:?} {value:?}"
        );
    }
    assert!(field(22, Some(&Value::Bytes(vec![]))).is_err());
    let mut s = Sparkplug::new("sparkplug".into(), "sparkplug_status".into());
    for (topic, body, why) in [
        ("spBv1.0/plant/NBIRTH", vec![], "is not spBv1.0/"),
        (
            "spBv1.0/plant/NBIRTH/gw1",
            vec![0xFF],
            "not a Sparkplug B payload",
        ),
        (
            "spBv1.0/plant/NBIRTH/gw1/d1",
            body(Some(0), 1, vec![]),
            "NBIRTH takes no device level",
        ),
        (
            "spBv1.0/plant/NOPE/gw1",
            body(None, 1, vec![]),
            "unknown Sparkplug message type",
        ),
    ] {
        refusal(&mut s, topic, &body, why);
    }
    // Host state and commands carry no rows.
    assert!(
        s.decode("spBv1.0/STATE/scada", b"{}", NOW)
            .unwrap()
            .rows
            .is_none()
    );
    assert!(
        s.decode("spBv1.0/plant/NCMD/gw1", &[], NOW)
            .unwrap()
            .rows
            .is_none()
    );
}

#[test]
fn births_kept_on_disk_serve_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.sparkplug.json");
    let mut s = Sparkplug::new("sparkplug".into(), "sparkplug_status".into());
    births(&mut s);
    s.save(&path).unwrap();
    let mut restarted = Sparkplug::new("sparkplug".into(), "sparkplug_status".into());
    restarted.load(&path).unwrap();
    // Any sequence number once (the last one was not kept), then the next in turn.
    let ddata = |seq| {
        body(
            Some(seq),
            3000,
            vec![metric(None, Some(11), None, Value::Int(7))],
        )
    };
    assert_eq!(
        rows(
            &mut restarted,
            "spBv1.0/plant/DDATA/gw1/press 4",
            &ddata(40)
        ),
        "sparkplug,group=plant,edge_node=gw1,device=press\\ 4 Speed=7i 3000000000\n"
    );
    assert!(
        restarted
            .decode("spBv1.0/plant/DDATA/gw1/press 4", &ddata(40), NOW)
            .is_err()
    );
    // Without a change nothing is written; a file that is not one is an error that says so.
    std::fs::write(&path, "x").unwrap();
    restarted.save(&path).unwrap();
    let e = Sparkplug::new("a".into(), "b".into())
        .load(&path)
        .unwrap_err();
    assert!(
        e.to_string().contains("is not a Sparkplug B state file"),
        "{e}"
    );
    assert!(
        Sparkplug::new("a".into(), "b".into())
            .load(&dir.path().join("none"))
            .is_ok()
    );
}
