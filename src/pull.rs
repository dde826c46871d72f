//! Import pipeline. STUB.
#![allow(missing_docs, unused)]
