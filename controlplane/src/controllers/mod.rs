//! Controllers that run inside the control plane process, on the registry
//! directly (the datapath components only ever see the Kubernetes API).

pub mod endpointslices;

use std::sync::Arc;

use crate::registry::Registry;

/// Starts every controller.
pub fn start(registry: Arc<Registry>) {
    tokio::spawn(endpointslices::run(registry));
}
