//! The protocol server. STUB.
#![allow(missing_docs, unused)]
