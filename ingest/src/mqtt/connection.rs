//! One session with the broker, over MQTT 3.1.1 or 5 (rumqttc's two clients behind one
//! face): connects with a fixed client id and a persistent session, subscribes at QoS 1 when
//! the broker has no session for Kiln, hands every PUBLISH on, and acknowledges one only
//! when asked to (once its rows are durable).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Packet as Packet5, Publish as Publish5};
use rumqttc::{Publish as Publish4, QoS, TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::config::{Protocol, SourceConfig};

/// A received PUBLISH, to be acknowledged once its rows are durable.
#[derive(Debug, Clone)]
pub enum Received {
    V4(Publish4),
    V5(Publish5),
}

impl Received {
    pub fn topic(&self) -> &str {
        match self {
            Self::V4(p) => &p.topic,
            // The broker sends no topic aliases: Kiln allows none.
            Self::V5(p) => std::str::from_utf8(&p.topic).unwrap_or_default(),
        }
    }

    pub fn payload(&self) -> &Bytes {
        match self {
            Self::V4(p) => &p.payload,
            Self::V5(p) => &p.payload,
        }
    }
}

/// The sending half: acknowledgements, subscriptions and dead letters.
#[derive(Clone)]
pub enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// What a session reports.
pub enum Event {
    /// Connected; `session_present` says whether the broker kept Kiln's session.
    Connected {
        session_present: bool,
    },
    /// The broker answered a subscription: `Err` says why it refused it.
    Subscribed(Result<(), String>),
    Message(Received),
    /// Nothing for the source (pings, acknowledgements of Kiln's own packets).
    Other,
}

/// The receiving half; polling it also keeps the connection alive and reconnects.
pub enum Connection {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

/// A rumqttc error, as text (its two clients' error types differ).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct MqttError(String);

impl Client {
    /// Acknowledges `m` (a PUBACK for QoS 1; nothing for QoS 0).
    pub async fn ack(&self, m: &Received) -> Result<(), MqttError> {
        match (self, m) {
            (Self::V4(c), Received::V4(p)) => c.ack(p).await.map_err(text),
            (Self::V5(c), Received::V5(p)) => c.ack(p).await.map_err(text),
            _ => Err(MqttError(
                "a message acknowledged on the wrong client".into(),
            )),
        }
    }

    /// Subscribes to each filter at QoS 1.
    pub async fn subscribe(&self, filters: &[String]) -> Result<(), MqttError> {
        for f in filters {
            match self {
                Self::V4(c) => c.subscribe(f, QoS::AtLeastOnce).await.map_err(text)?,
                Self::V5(c) => c
                    .subscribe(f, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
                    .await
                    .map_err(text)?,
            }
        }
        Ok(())
    }

    /// Publishes `payload` to `topic` at QoS 1 (the broker's PUBACK is not awaited).
    pub async fn publish(&self, topic: &str, payload: Bytes) -> Result<(), MqttError> {
        match self {
            Self::V4(c) => c
                .publish_bytes(topic, QoS::AtLeastOnce, false, payload)
                .await
                .map_err(text),
            Self::V5(c) => c
                .publish_bytes(
                    topic,
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    false,
                    payload,
                )
                .await
                .map_err(text),
        }
    }

    /// Ends the session's connection cleanly (the session itself stays on the broker).
    pub async fn disconnect(&self) {
        let _ = match self {
            Self::V4(c) => c.disconnect().await.map_err(text),
            Self::V5(c) => c.disconnect().await.map_err(text),
        };
    }
}

impl Connection {
    /// The next event; an error means the connection is down (polling again reconnects).
    pub async fn poll(&mut self) -> Result<Event, MqttError> {
        match self {
            Self::V4(l) => match l.poll().await.map_err(text)? {
                rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => {
                    Ok(Event::Message(Received::V4(p)))
                }
                rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(c)) => Ok(Event::Connected {
                    session_present: c.session_present,
                }),
                rumqttc::Event::Incoming(rumqttc::Packet::SubAck(a)) => {
                    Ok(Event::Subscribed(match a.return_codes.first() {
                        Some(rumqttc::SubscribeReasonCode::Success(_)) => Ok(()),
                        other => Err(format!("{other:?}")),
                    }))
                }
                _ => Ok(Event::Other),
            },
            Self::V5(l) => match l.poll().await.map_err(text)? {
                rumqttc::v5::Event::Incoming(Packet5::Publish(p)) => {
                    Ok(Event::Message(Received::V5(p)))
                }
                rumqttc::v5::Event::Incoming(Packet5::ConnAck(c)) => Ok(Event::Connected {
                    session_present: c.session_present,
                }),
                rumqttc::v5::Event::Incoming(Packet5::SubAck(a)) => {
                    Ok(Event::Subscribed(match a.return_codes.first() {
                        Some(rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)) => Ok(()),
                        other => Err(format!("{other:?}")),
                    }))
                }
                _ => Ok(Event::Other),
            },
        }
    }
}

fn text(e: impl std::fmt::Display) -> MqttError {
    MqttError(e.to_string())
}

/// Requests (acknowledgements, mostly) that wait for the connection without blocking the
/// writer: more than the messages a broker lets Kiln hold unacknowledged.
const REQUEST_CAPACITY: usize = 65_536;

/// The client and connection of `config` (no network round trip yet).
pub fn open(config: &SourceConfig) -> Result<(Client, Connection), String> {
    let broker = config.broker()?;
    let id = config.client_id();
    let password = config.password()?;
    let transport = if broker.tls {
        Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(tls(config)?)))
    } else {
        Transport::tcp()
    };
    let max_bytes = config.max_message_bytes;
    Ok(match config.protocol {
        Protocol::V311 => {
            let mut o = rumqttc::MqttOptions::new(id, broker.host, broker.port);
            o.set_clean_session(false)
                .set_manual_acks(true)
                .set_keep_alive(config.keep_alive)
                .set_max_packet_size(max_bytes, max_bytes)
                .set_transport(transport);
            if let Some(user) = &config.username {
                o.set_credentials(user, password.unwrap_or_default());
            }
            let (client, eventloop) = rumqttc::AsyncClient::new(o, REQUEST_CAPACITY);
            (Client::V4(client), Connection::V4(Box::new(eventloop)))
        }
        Protocol::V5 => {
            let mut o = rumqttc::v5::MqttOptions::new(id, broker.host, broker.port);
            o.set_clean_start(false)
                .set_manual_acks(true)
                .set_keep_alive(config.keep_alive)
                // The session outlives any outage: the broker's own limit applies.
                .set_session_expiry_interval(Some(u32::MAX))
                .set_receive_maximum(Some(config.max_inflight))
                .set_max_packet_size(Some(u32::try_from(max_bytes).unwrap_or(u32::MAX)))
                .set_transport(transport);
            if let Some(user) = &config.username {
                o.set_credentials(user, password.unwrap_or_default());
            }
            let (client, eventloop) = rumqttc::v5::AsyncClient::new(o, REQUEST_CAPACITY);
            (Client::V5(client), Connection::V5(Box::new(eventloop)))
        }
    })
}

/// TLS to the broker: its certificate must chain to `ca_file`; a client certificate when
/// `cert_file` is given.
fn tls(config: &SourceConfig) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let ca = config
        .ca_file
        .as_ref()
        .ok_or("mqtts:// needs ca_file (--mqtt-ca): the CA the broker's certificate chains to")?;
    let pem = read(ca, "CA")?;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("MQTT CA file {}: {e}", ca.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("MQTT CA file {}: {e}", ca.display()))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "MQTT CA file {} holds no certificate",
            ca.display()
        ));
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    match (&config.cert_file, &config.key_file) {
        (Some(cert), Some(key)) => {
            let pem = read(cert, "client certificate")?;
            let chain = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("MQTT client certificate {}: {e}", cert.display()))?;
            let pem = read(key, "client key")?;
            let key = PrivateKeyDer::from_pem_slice(&pem)
                .map_err(|e| format!("MQTT client key {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("MQTT client certificate: {e}"))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

fn read(path: &std::path::Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read the MQTT {what} {}: {e}", path.display()))
}

/// How long to wait before reconnecting after the `n`th failure in a row.
pub fn backoff(n: u32) -> Duration {
    Duration::from_millis(200u64.saturating_mul(1 << n.min(7))).min(Duration::from_secs(15))
}
