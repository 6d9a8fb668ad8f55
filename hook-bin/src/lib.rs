//! The pure part of the `reference-transaction` hook: parsing what git writes on the
//! hook's stdin and deriving the vote key from it. The binary (`src/main.rs`) adds the
//! socket, the deadline and the exit status; this library does no I/O, so it can be
//! unit-tested and fuzzed on its own.
#![forbid(unsafe_code)]

pub mod input;
