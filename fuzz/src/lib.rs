//! Shared code of the fuzz targets and the seed generator.
//!
//! - [`input`]: the byte format of structured inputs (decode and encode).
//! - [`header`]: tar header blocks and PAX records, valid or not.
//! - [`ops`]: the ops of a structured input.
//! - [`archive`]: building a tar and its splitfdstream from ops, with a model of what a reader
//!   must see.
//! - [`check`]: draining a [`Reader`](splitfdstream::proto::stream::Reader) while checking its
//!   invariants.
//! - [`scratch`]: memfds, pipes and scratch directories on tmpfs.

pub mod archive;
pub mod check;
pub mod header;
pub mod input;
pub mod ops;
pub mod scratch;
