//! `kiln-bench mqtt`: rows/s from an MQTT broker to queryable in Kiln, for the TSBS cpu-only
//! workload as line protocol and JSON (rows per message) and as Sparkplug B DDATA (one
//! row of 10 metrics per message), against a subscriber that does nothing with the
//! messages (the broker alone) and Kiln's HTTP line-protocol rate, measured in the same run.
//!
//! Each measurement preloads a session: a persistent session subscribes (QoS 1) and leaves,
//! the workload is published to the broker, which queues it for the session; then the
//! session's owner connects (Kiln, or the subscriber that does nothing) and is timed from
//! its first row to its last.

use std::time::{Duration, Instant};

use kiln_proto::sparkplug::{DataType, Metric, Payload, Value};
use prost::Message as _;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use crate::kafka::KafkaFormat;
use crate::{CpuOnly, DEFAULT_START_NANOS, FIELDS};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MqttFormat {
    Lp,
    Json,
    Sparkplug,
}

/// Devices (hosts) per Sparkplug B edge node.
const DEVICES_PER_NODE: usize = 10;

/// The workload as MQTT messages, and what Kiln holds once it has them all.
pub struct Workload {
    pub messages: Vec<(String, Vec<u8>)>,
    /// The table the rows go to, and the rows it then holds.
    pub table: &'static str,
    pub rows: u64,
    /// Every row Kiln writes (Sparkplug B's status rows included).
    pub written: u64,
}

/// The TSBS workload as `format` messages on `tsbs/…` (line protocol, JSON) or
/// `spBv1.0/tsbs/…` (Sparkplug B: births first, then one DDATA per row).
pub fn workload(
    scale: usize,
    seed: u64,
    intervals: usize,
    format: MqttFormat,
    rows_per_message: usize,
) -> Workload {
    let kafka = match format {
        MqttFormat::Lp => KafkaFormat::Lp,
        MqttFormat::Json => KafkaFormat::Json,
        MqttFormat::Sparkplug => return sparkplug(scale, seed, intervals),
    };
    let (rows, msgs) = crate::kafka::messages(scale, seed, intervals, kafka, rows_per_message);
    Workload {
        messages: msgs
            .into_iter()
            .map(|(p, m)| (format!("tsbs/{p}"), m))
            .collect(),
        table: "cpu",
        rows: rows as u64,
        written: rows as u64,
    }
}

fn sparkplug(scale: usize, seed: u64, intervals: usize) -> Workload {
    let ms = |nanos: i64| (nanos / 1_000_000) as u64;
    let body = |seq: Option<u64>, at: u64, metrics: Vec<Metric>| {
        Payload {
            timestamp: Some(at),
            metrics,
            seq,
            ..Payload::default()
        }
        .encode_to_vec()
    };
    let nodes = scale.div_ceil(DEVICES_PER_NODE);
    let mut seq = vec![0u64; nodes];
    let mut next = |node: usize| {
        let s = seq[node];
        seq[node] = (s + 1) % 256;
        s
    };
    let birth_time = ms(DEFAULT_START_NANOS) - 1000;
    let mut messages = Vec::new();
    for node in 0..nodes {
        let bd_seq = Metric {
            name: Some("bdSeq".into()),
            datatype: Some(DataType::Int64 as u32),
            value: Some(Value::Long(0)),
            ..Metric::default()
        };
        messages.push((
            format!("spBv1.0/tsbs/NBIRTH/node_{node}"),
            body(Some(next(node)), birth_time, vec![bd_seq]),
        ));
        for host in node * DEVICES_PER_NODE..((node + 1) * DEVICES_PER_NODE).min(scale) {
            let metrics = FIELDS
                .iter()
                .enumerate()
                .map(|(i, f)| Metric {
                    name: Some(f.to_string()),
                    alias: Some(i as u64),
                    datatype: Some(DataType::Int64 as u32),
                    value: Some(Value::Long(0)),
                    ..Metric::default()
                })
                .collect();
            messages.push((
                format!("spBv1.0/tsbs/DBIRTH/node_{node}/host_{host}"),
                body(Some(next(node)), birth_time, metrics),
            ));
        }
    }
    let mut generator = CpuOnly::new(scale, seed, DEFAULT_START_NANOS);
    let mut rows = 0u64;
    for _ in 0..intervals {
        let mut host = 0usize;
        generator.next_rows(|r| {
            let node = host / DEVICES_PER_NODE;
            let metrics = r
                .fields
                .iter()
                .enumerate()
                .map(|(i, v)| Metric {
                    alias: Some(i as u64),
                    value: Some(Value::Long(*v as u64)),
                    ..Metric::default()
                })
                .collect();
            messages.push((
                format!("spBv1.0/tsbs/DDATA/node_{node}/host_{host}"),
                body(Some(next(node)), ms(r.time), metrics),
            ));
            host += 1;
            rows += 1;
        });
    }
    Workload {
        messages,
        table: "sparkplug",
        // A birth row per device, then the data.
        rows: scale as u64 + rows,
        // With a status row per node and device.
        written: nodes as u64 + 2 * scale as u64 + rows,
    }
}

fn options(id: &str, port: u16) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_max_packet_size(1 << 24, 1 << 24)
        .set_keep_alive(Duration::from_secs(30))
        .set_inflight(1000);
    o
}

/// Creates the persistent session `id` subscribed to `filter` at QoS 1 and leaves it, so
/// that the broker queues what is published next for it.
pub async fn open_session(port: u16, id: &str, filter: &str) -> Result<(), String> {
    let mut o = options(id, port);
    o.set_clean_session(false);
    let (client, mut events) = AsyncClient::new(o, 16);
    client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .map_err(|e| e.to_string())?;
    loop {
        match events
            .poll()
            .await
            .map_err(|e| format!("session {id}: {e}"))?
        {
            Event::Incoming(Packet::SubAck(_)) => break,
            _ => continue,
        }
    }
    client.disconnect().await.map_err(|e| e.to_string())?;
    // Until the DISCONNECT is out.
    while events.poll().await.is_ok() {}
    Ok(())
}

/// Publishes every message at QoS 1 and waits until the broker acknowledged all.
pub async fn publish(port: u16, messages: &[(String, Vec<u8>)]) -> Result<(), String> {
    let (client, mut events) = AsyncClient::new(options("kiln-bench-publisher", port), 1000);
    let to_send = messages.to_vec();
    let sending = tokio::spawn(async move {
        for (topic, payload) in to_send {
            client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok::<_, String>(client)
    });
    let mut acked = 0;
    while acked < messages.len() {
        match events
            .poll()
            .await
            .map_err(|e| format!("publishing: {e}"))?
        {
            Event::Incoming(Packet::PubAck(_)) => acked += 1,
            _ => continue,
        }
    }
    let client = sending.await.map_err(|e| e.to_string())??;
    let _ = client.disconnect().await;
    Ok(())
}

/// Connects to the session `id` and takes its `n` queued messages, acknowledging each and
/// doing nothing else; seconds from the first to the last.
pub async fn drain(port: u16, id: &str, n: usize) -> Result<f64, String> {
    let mut o = options(id, port);
    o.set_clean_session(false);
    let (client, mut events) = AsyncClient::new(o, 16);
    let mut first = None;
    let mut got = 0;
    while got < n {
        let event = tokio::time::timeout(Duration::from_secs(60), events.poll())
            .await
            .map_err(|_| format!("drain: nothing for 60 s after {got} of {n}"))?
            .map_err(|e| format!("drain: {e}"))?;
        if let Event::Incoming(Packet::Publish(_)) = event {
            first.get_or_insert_with(Instant::now);
            got += 1;
        }
    }
    let secs = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let _ = client.disconnect().await;
    Ok(secs)
}
