//! A real Mosquitto broker (Debian's, installed by `tests/tools/debian-packages.sh` when
//! missing) on a free loopback port, and an MQTT client for the tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// The broker program, installed once per test run if the machine lacks it.
fn program() -> &'static Path {
    static PROGRAM: OnceLock<PathBuf> = OnceLock::new();
    PROGRAM.get_or_init(|| {
        let path = PathBuf::from("/usr/sbin/mosquitto");
        if !path.exists() {
            let script = concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../tests/tools/debian-packages.sh"
            );
            let status = Command::new("bash")
                .args([script, "mosquitto"])
                .status()
                .expect("run tests/tools/debian-packages.sh");
            assert!(status.success(), "installing Debian's mosquitto failed");
        }
        path
    })
}

/// Adds `user` with `password` to the Mosquitto password file `path` (created if absent).
pub fn add_user(path: &Path, user: &str, password: &str) {
    program();
    let mut command = Command::new("mosquitto_passwd");
    command.arg("-b");
    if !path.exists() {
        command.arg("-c");
    }
    let made = command
        .arg(path)
        .args([user, password])
        .status()
        .expect("run mosquitto_passwd");
    assert!(made.success(), "mosquitto_passwd failed");
}

/// A free TCP port on loopback (free when asked; the broker binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Mosquitto {
    child: Child,
    /// The plain listener's port.
    pub port: u16,
    pub log: PathBuf,
}

impl Mosquitto {
    /// A broker with a plain listener that takes anonymous clients.
    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, "allow_anonymous true", "")
    }

    /// A broker with `settings` (who may connect) and a plain listener, then `listeners`
    /// (more listeners, TLS). It holds up to 100,000 messages for a client that is away.
    pub fn start_with(dir: &Path, settings: &str, listeners: &str) -> Self {
        let port = free_port();
        let conf = dir.join("mosquitto.conf");
        let log = dir.join("mosquitto.log");
        std::fs::write(
            &conf,
            format!(
                "{settings}\npersistence false\n\
                 max_queued_messages 100000\nmax_inflight_messages 100\n\
                 listener {port} 127.0.0.1\n{listeners}\n"
            ),
        )
        .unwrap();
        let child = Command::new(program())
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start mosquitto");
        let broker = Self { child, port, log };
        broker.wait_listening(port);
        broker
    }

    /// Waits until `port` takes connections.
    pub fn wait_listening(&self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen on {port}: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Publishes every `(topic, payload)` at QoS 1 on its own connection and returns once
/// the broker acknowledged all of them.
pub async fn publish(port: u16, messages: Vec<(String, Vec<u8>)>) {
    publish_as(port, None, messages).await
}

/// [`publish`] with a user name and password.
pub async fn publish_as(port: u16, login: Option<(&str, &str)>, messages: Vec<(String, Vec<u8>)>) {
    let mut options =
        MqttOptions::new(format!("test-publisher-{}", free_port()), "127.0.0.1", port);
    options.set_max_packet_size(1 << 24, 1 << 24);
    if let Some((user, password)) = login {
        options.set_credentials(user, password);
    }
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let total = messages.len();
    let sending = tokio::spawn(async move {
        for (topic, payload) in messages {
            client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
        }
        client
    });
    let mut acked = 0;
    while acked < total {
        match tokio::time::timeout(Duration::from_secs(30), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("publishing: {e}"),
            Err(_) => panic!("publishing: no acknowledgement for 30 s ({acked} of {total})"),
        }
    }
    let client = sending.await.unwrap();
    let _ = client.disconnect().await;
}

/// Messages as they arrived: (topic, payload).
pub type Received = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

/// A subscriber that collects what arrives on `filter` (at QoS 1).
pub struct Subscriber {
    pub received: Received,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    pub async fn start(port: u16, filter: &str) -> Self {
        let options = MqttOptions::new(
            format!("test-subscriber-{}", free_port()),
            "127.0.0.1",
            port,
        );
        let (client, mut eventloop) = AsyncClient::new(options, 16);
        client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
        let received: Received = std::sync::Arc::default();
        let into = std::sync::Arc::clone(&received);
        let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let _client = client;
            let mut subscribed = Some(subscribed_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = subscribed.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => into
                        .lock()
                        .unwrap()
                        .push((p.topic.clone(), p.payload.to_vec())),
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), subscribed_rx)
            .await
            .expect("subscribed in time")
            .unwrap();
        Self { received, task }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}
