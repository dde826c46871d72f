//! Empty: this crate only holds interop tests.
