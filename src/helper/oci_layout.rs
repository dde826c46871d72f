//! OCI image layout backend. STUB.
#![allow(missing_docs, unused)]
use super::*;
#[derive(Debug)]
pub struct OciBackend {}
impl OciBackend {
    pub fn open(dir: &std::path::Path) -> anyhow::Result<Self> {
        todo!()
    }
}
impl Backend for OciBackend {
    fn open_image(&self, reference: &str) -> Result<OpenedImage, BackendError> {
        todo!()
    }
    fn stream_layer(
        &self,
        image: &OpenedImage,
        index: usize,
        inline_threshold: u64,
        sink: &mut dyn LayerSink,
    ) -> anyhow::Result<u64> {
        todo!()
    }
}
