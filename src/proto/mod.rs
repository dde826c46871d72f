//! Wire formats: the splitfdstream codec, the tar rules it relies on, the jsonrpc-fdpass
//! transport, the typed RPC methods and image source names.
//!
//! The normative specs are `proto/splitfdstream.md` and `proto/rpc.md` in the source tree; tests
//! decode their literal examples so spec and code cannot drift. Nothing here imports from the
//! rest of the crate.

pub mod fdpass;
pub mod rpc;
pub mod source;
pub mod stream;
pub mod tar;
