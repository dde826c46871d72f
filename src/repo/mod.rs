//! composefs repository. STUB.
#![allow(missing_docs, unused)]
