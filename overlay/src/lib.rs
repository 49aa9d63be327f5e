//! Ferry's pod network (see its issue): a flannel-compatible VXLAN / host-gw
//! overlay (`ferry overlay`) and a CNI plugin (`ferry cni`).

mod agent;
pub mod cni;
pub mod desired;
pub mod ipam;
pub mod netfilter;
pub mod netlink;
pub mod netns;
pub mod node;
pub mod podnet;
pub mod reconciler;
pub mod status;
pub mod subnet;

pub use agent::{run, OverlayArgs};
pub use cni::cni_main;
pub use node::Backend;
pub use podnet::{PodAddress, PodNetwork, PodNetworkConfig};
pub use reconciler::{OverlayConfig, Reconciler};
