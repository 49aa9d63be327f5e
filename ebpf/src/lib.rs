//! Ferry's eBPF programs, written in C under `bpf/` and compiled by clang in
//! `build.rs`, with the Rust code that loads them, fills their maps and
//! attaches them. The datapath crates (overlay, proxy) decide when; this
//! crate knows how.

pub mod bpffs;
pub mod pod_fastpath;
