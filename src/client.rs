//! The parent side. STUB.
#![allow(missing_docs, unused)]
