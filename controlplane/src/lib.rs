//! Ferry's control plane: a Kubernetes-compatible API server over an embedded,
//! watchable store.

pub mod cache;
pub mod resources;
pub mod store;
