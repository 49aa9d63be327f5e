//! `ferry node`: the node agent. Registers this machine's Node (addresses,
//! capacity, nodeInfo, Ready condition, Lease heartbeat) and runs the pods
//! bound to it as host processes in their own network namespaces (see the
//! project's issue on pods and clusters).
//!
//! Layout under `--data-dir`: `pods/<uid>/state.json` (pids and start times,
//! for adoption by a restarted agent), `pods/<uid>/volumes/<name>/` (ConfigMap,
//! Secret and emptyDir volumes), `pods/<uid>/logs/<container>/<n>.log` (one file
//! per container instance, rotated by copy-and-truncate to `<n>.log.1`),
//! `ipam/ferry/` (pod addresses, through the overlay's `PodNetwork`).
//! Pod network namespaces are `/var/run/netns/ferry-pod-<hash of the uid>`.
//!
//! Pure logic (status, backoff, probe accounting, env and volume resolution)
//! lives in its own modules with unit tests; [`pod`] and `agent` drive it.

mod agent;
pub mod backoff;
pub mod env;
pub mod events;
pub mod hosts;
pub mod lifecycle;
pub mod logs;
pub mod nodeinfo;
pub mod pod;
pub mod probe;
pub mod runtime;
pub mod state;
pub mod status;
pub mod volumes;

pub use agent::{run, run_until, NodeArgs};
