//! Where segments and the catalog live: the data directory (`--object-store file`, the
//! default) or a bucket of S3 or an S3-compatible store, Google Cloud Storage or Azure Blob
//! Storage. The WAL always stays in the data directory.
//!
//! Credentials come from each provider's usual environment (`AWS_ACCESS_KEY_ID`, a
//! web-identity token file, `GOOGLE_APPLICATION_CREDENTIALS`, `AZURE_STORAGE_ACCOUNT_KEY`,
//! …), never from flags: flags end up in shell histories and process listings.

use std::path::Path;
use std::sync::Arc;

use kiln_storage::durable_store::DurableLocalStore;
use kiln_storage::segment_cache::SegmentCache;
use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    /// `objects/` under the data directory, synced on every write.
    File,
    /// Amazon S3 or an S3-compatible store (MinIO, Ceph, Garage, …) that honours
    /// conditional writes (`If-None-Match`).
    S3,
    /// Google Cloud Storage.
    Gcs,
    /// Azure Blob Storage.
    Azure,
}

#[derive(Debug, Clone, clap::Args)]
pub struct StoreArgs {
    /// Where segments and the catalog are kept: `file` (`objects/` under --data-dir), `s3`
    /// (or an S3-compatible store), `gcs` or `azure`. Credentials come from the provider's
    /// environment variables (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or
    /// AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN; GOOGLE_APPLICATION_CREDENTIALS;
    /// AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY), never from flags.
    #[arg(
        long = "object-store",
        env = "KILN_OBJECT_STORE",
        value_enum,
        default_value = "file"
    )]
    pub object_store: StoreKind,

    /// The bucket (S3, GCS) or container (Azure).
    #[arg(long, env = "KILN_OBJECT_STORE_BUCKET")]
    pub object_store_bucket: Option<String>,

    /// A path inside the bucket that holds everything of this server (`plant-a/kiln`):
    /// several servers can share a bucket under different prefixes.
    #[arg(long, env = "KILN_OBJECT_STORE_PREFIX")]
    pub object_store_prefix: Option<String>,

    /// The S3 region (else AWS_REGION, else `us-east-1`).
    #[arg(long, env = "KILN_OBJECT_STORE_REGION")]
    pub object_store_region: Option<String>,

    /// The URL of an S3-compatible store or of an Azure endpoint (Azurite); an `http://`
    /// URL is allowed as given.
    #[arg(long, env = "KILN_OBJECT_STORE_ENDPOINT")]
    pub object_store_endpoint: Option<String>,

    /// With a remote object store: disk space under --data-dir (`cache/`) for segments
    /// read or written, fetched whole and evicted least recently used (`10GiB`; 0: no
    /// cache, every read goes to the store).
    #[arg(
        long,
        env = "KILN_OBJECT_STORE_CACHE_BYTES",
        default_value = "1GiB",
        value_parser = crate::config::size::parse_bytes
    )]
    pub object_store_cache_bytes: u64,
}

/// Why the object store could not be opened; start-up stops with it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open {path}")]
    Local {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--object-store {kind} needs --object-store-bucket")]
    NoBucket { kind: &'static str },
    #[error("--object-store {kind} takes no {flag}")]
    Unused {
        kind: &'static str,
        flag: &'static str,
    },
    #[error("--object-store-prefix {0:?} is not a valid object path")]
    Prefix(String),
    #[error("cannot set up the object store {url}")]
    Build {
        url: String,
        #[source]
        source: object_store::Error,
    },
    #[error("cannot read the object store {url}")]
    Unreadable {
        url: String,
        #[source]
        source: object_store::Error,
    },
    #[error("cannot write to the object store {url}")]
    Unreachable {
        url: String,
        #[source]
        source: object_store::Error,
    },
    #[error(
        "the object store {url} does not honour conditional writes (a second create-if-absent \
         PUT of one object succeeded): the catalog needs them"
    )]
    NoConditionalPut { url: String },
}

/// An opened object store and how to name it in logs and errors (`s3://bucket/prefix`).
pub struct OpenedStore {
    pub store: Arc<dyn ObjectStore>,
    pub url: String,
    /// The disk cache in front of a remote store, if it has one.
    pub cache: Option<Arc<SegmentCache>>,
}

impl StoreArgs {
    fn kind_name(&self) -> &'static str {
        match self.object_store {
            StoreKind::File => "file",
            StoreKind::S3 => "s3",
            StoreKind::Gcs => "gcs",
            StoreKind::Azure => "azure",
        }
    }

    /// The flags the chosen kind does not use, given: refused rather than ignored.
    fn check_flags(&self) -> Result<(), StoreError> {
        let kind = self.kind_name();
        let given = [
            ("--object-store-bucket", self.object_store_bucket.is_some()),
            ("--object-store-prefix", self.object_store_prefix.is_some()),
            ("--object-store-region", self.object_store_region.is_some()),
            (
                "--object-store-endpoint",
                self.object_store_endpoint.is_some(),
            ),
        ];
        let allowed: &[&str] = match self.object_store {
            StoreKind::File => &[],
            StoreKind::S3 => &[
                "--object-store-bucket",
                "--object-store-prefix",
                "--object-store-region",
                "--object-store-endpoint",
            ],
            StoreKind::Gcs => &["--object-store-bucket", "--object-store-prefix"],
            StoreKind::Azure => &[
                "--object-store-bucket",
                "--object-store-prefix",
                "--object-store-endpoint",
            ],
        };
        if let Some((flag, _)) = given
            .iter()
            .find(|(flag, set)| *set && !allowed.contains(flag))
        {
            return Err(StoreError::Unused { kind, flag });
        }
        if self.object_store != StoreKind::File && self.object_store_bucket.is_none() {
            return Err(StoreError::NoBucket { kind });
        }
        Ok(())
    }

    /// Where the objects are, for logs and `--check`: `file:///…/objects`, `s3://bucket/prefix`.
    pub fn url(&self, data_dir: &Path) -> String {
        if self.object_store == StoreKind::File {
            return format!("file://{}", data_dir.join("objects").display());
        }
        let scheme = match self.object_store {
            StoreKind::Gcs => "gs",
            StoreKind::Azure => "az",
            _ => "s3",
        };
        let bucket = self.object_store_bucket.as_deref().unwrap_or_default();
        match self
            .object_store_prefix
            .as_deref()
            .map(|p| p.trim_matches('/'))
        {
            Some(prefix) if !prefix.is_empty() => format!("{scheme}://{bucket}/{prefix}"),
            _ => format!("{scheme}://{bucket}"),
        }
    }

    /// How long files replaced by compaction stay in the store when
    /// `--retired-segment-grace` is not given: none on local disk, which no other server
    /// reads; five minutes in a shared store, for queriers still reading them.
    pub fn default_retired_grace(&self) -> std::time::Duration {
        match self.object_store {
            StoreKind::File => std::time::Duration::ZERO,
            _ => std::time::Duration::from_secs(300),
        }
    }

    /// Checks the flags without opening anything (`kiln serve --check`).
    pub fn check(&self) -> Result<(), StoreError> {
        self.check_flags()?;
        self.prefix().map(|_| ())
    }

    fn prefix(&self) -> Result<Option<ObjectPath>, StoreError> {
        match self
            .object_store_prefix
            .as_deref()
            .map(|p| p.trim_matches('/'))
        {
            None | Some("") => Ok(None),
            Some(prefix) => ObjectPath::parse(prefix)
                .map(Some)
                .map_err(|_| StoreError::Prefix(prefix.to_owned())),
        }
    }

    /// Opens the store and, for a remote one, proves it can be written and honours
    /// create-if-absent writes, which the catalog's log relies on; for a server that only
    /// reads (`read_only`), that it can be read (its credentials may allow no more).
    pub async fn open(&self, data_dir: &Path, read_only: bool) -> Result<OpenedStore, StoreError> {
        self.check_flags()?;
        let url = self.url(data_dir);
        if self.object_store == StoreKind::File {
            let root = data_dir.join("objects");
            let store = DurableLocalStore::new(&root).map_err(|source| StoreError::Local {
                path: root.display().to_string(),
                source,
            })?;
            return Ok(OpenedStore {
                store: Arc::new(store),
                url,
                cache: None,
            });
        }
        let bucket = self.object_store_bucket.clone().unwrap_or_default();
        let endpoint = self.object_store_endpoint.clone();
        let plain_http = endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("http://"));
        let built: object_store::Result<Arc<dyn ObjectStore>> = match self.object_store {
            StoreKind::S3 => {
                let mut builder = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_conditional_put(S3ConditionalPut::ETagMatch);
                if let Some(region) = &self.object_store_region {
                    builder = builder.with_region(region);
                }
                if let Some(endpoint) = endpoint {
                    builder = builder.with_endpoint(endpoint).with_allow_http(plain_http);
                }
                builder.build().map(|s| Arc::new(s) as _)
            }
            StoreKind::Gcs => GoogleCloudStorageBuilder::from_env()
                .with_bucket_name(bucket)
                .build()
                .map(|s| Arc::new(s) as _),
            StoreKind::Azure => {
                let mut builder = MicrosoftAzureBuilder::from_env().with_container_name(bucket);
                if let Some(endpoint) = endpoint {
                    builder = builder.with_endpoint(endpoint).with_allow_http(plain_http);
                }
                builder.build().map(|s| Arc::new(s) as _)
            }
            StoreKind::File => unreachable!("opened above"),
        };
        let mut store = built.map_err(|source| StoreError::Build {
            url: url.clone(),
            source,
        })?;
        if let Some(prefix) = self.prefix()? {
            store = Arc::new(PrefixStore::new(store, prefix));
        }
        if read_only {
            store
                .list_with_delimiter(Some(&ObjectPath::from("catalog")))
                .await
                .map_err(|source| StoreError::Unreadable {
                    url: url.clone(),
                    source,
                })?;
        } else {
            probe(&store, &url).await?;
        }
        if self.object_store_cache_bytes == 0 {
            return Ok(OpenedStore {
                store,
                url,
                cache: None,
            });
        }
        let dir = data_dir.join("cache");
        let cache =
            SegmentCache::open(store, &dir, self.object_store_cache_bytes).map_err(|source| {
                StoreError::Local {
                    path: dir.display().to_string(),
                    source,
                }
            })?;
        let cache = Arc::new(cache);
        Ok(OpenedStore {
            store: Arc::clone(&cache) as _,
            url,
            cache: Some(cache),
        })
    }
}

/// Writes a probe object twice with create-if-absent, expecting the second write refused,
/// then deletes it: a store that is unreachable, refuses the credentials or ignores
/// conditional writes stops start-up here, with the reason, instead of at the first
/// persistence.
async fn probe(store: &Arc<dyn ObjectStore>, url: &str) -> Result<(), StoreError> {
    let path = ObjectPath::from(format!(
        "probe/{}-{}",
        kiln_ingest::write::now_nanos(),
        std::process::id()
    ));
    let create = || PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    let unreachable = |source| StoreError::Unreachable {
        url: url.to_owned(),
        source,
    };
    store
        .put_opts(&path, PutPayload::from_static(b"kiln"), create())
        .await
        .map_err(unreachable)?;
    let second = store
        .put_opts(&path, PutPayload::from_static(b"kiln"), create())
        .await;
    let deleted = store.delete(&path).await;
    match second {
        Err(object_store::Error::AlreadyExists { .. }) => {}
        Ok(_) => {
            return Err(StoreError::NoConditionalPut {
                url: url.to_owned(),
            });
        }
        Err(e) => return Err(unreachable(e)),
    }
    deleted.map_err(unreachable)
}

/// The segment cache's counters and the requests that reached the remote store, as
/// Prometheus metrics.
#[derive(Debug)]
pub struct Collector(pub Arc<SegmentCache>);

impl prometheus_client::collector::Collector for Collector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;

        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;

        let stats = self.0.stats();
        let requests = [
            ("get", &stats.remote_gets),
            ("head", &stats.remote_heads),
            ("put", &stats.remote_puts),
            ("list", &stats.remote_lists),
            ("delete", &stats.remote_deletes),
            ("copy", &stats.remote_copies),
        ];
        let mut family = encoder.encode_descriptor(
            "kiln_object_store_requests",
            "Requests sent to the remote object store (label: op)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (op, count) in requests {
            let labels = [("op", op)];
            let metric = family.encode_family(&labels)?;
            ConstCounter::new(count.load(Relaxed)).encode(metric)?;
        }
        let counters = [
            (
                "kiln_segment_cache_hits",
                "Segment reads served from the disk cache",
                &stats.hits,
            ),
            (
                "kiln_segment_cache_misses",
                "Segment reads that fetched the file from the object store",
                &stats.misses,
            ),
            (
                "kiln_segment_cache_fetched_bytes",
                "Bytes copied from the object store into the disk cache",
                &stats.fetched_bytes,
            ),
            (
                "kiln_segment_cache_evictions",
                "Segment files evicted from the disk cache to stay within its size",
                &stats.evictions,
            ),
        ];
        for (name, help, value) in counters {
            let c = ConstCounter::new(value.load(Relaxed));
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        let (bytes, files) = self.0.usage();
        let gauges = [
            (
                "kiln_segment_cache_bytes",
                "Bytes of segment files in the disk cache",
                bytes as i64,
            ),
            (
                "kiln_segment_cache_files",
                "Segment files in the disk cache",
                files as i64,
            ),
        ];
        for (name, help, value) in gauges {
            let g = ConstGauge::new(value);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        Ok(())
    }
}
