//! Object stores that fail on purpose, for the tests of what a failure must not lose.

use std::sync::Arc;

use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};

/// A store whose next put under a chosen prefix lands but then reports an error, as a put
/// whose fsync failed or whose response a network lost does.
#[derive(Debug)]
pub(crate) struct FailingAfterPut {
    inner: Arc<dyn ObjectStore>,
    fail_next_under: parking_lot::Mutex<Option<String>>,
}

impl FailingAfterPut {
    pub(crate) fn new(inner: Arc<dyn ObjectStore>) -> Self {
        Self {
            inner,
            fail_next_under: parking_lot::Mutex::new(None),
        }
    }

    /// The next put of a path starting with `prefix` (`""`: any) lands and fails.
    pub(crate) fn fail_next_put_under(&self, prefix: &str) {
        *self.fail_next_under.lock() = Some(prefix.to_owned());
    }
}

impl std::fmt::Display for FailingAfterPut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FailingAfterPut({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for FailingAfterPut {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        let result = self.inner.put_opts(location, payload, opts).await?;
        let mut armed = self.fail_next_under.lock();
        if armed
            .as_deref()
            .is_some_and(|prefix| location.as_ref().starts_with(prefix))
        {
            *armed = None;
            return Err(object_store::Error::Generic {
                store: "FailingAfterPut",
                source: "the put landed but its answer was lost (injected)".into(),
            });
        }
        Ok(result)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}
