//! tar rules. STUB.
#![allow(missing_docs, unused)]
