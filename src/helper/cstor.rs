//! containers-storage (overlay driver) backend. STUB.
#![allow(missing_docs, unused)]
use super::*;
#[derive(Debug)]
pub struct CstorBackend {}
impl CstorBackend {
    pub fn open(store: &Store) -> anyhow::Result<Self> {
        todo!()
    }
}
impl Backend for CstorBackend {
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
