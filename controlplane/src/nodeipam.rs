//! Node IPAM: hands each Node a pod CIDR (`spec.podCIDR`) carved from the
//! cluster CIDR. Pure and in-memory: the caller persists by re-marking the
//! CIDRs of existing Nodes with [`NodeCidrAllocator::mark_used`] at start, so
//! nothing is handed out twice across restarts either.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeIpamError {
    #[error(
        "node CIDR mask size /{mask} does not fit cluster CIDR {cluster} (need {min}..={max})"
    )]
    BadMask {
        cluster: IpNet,
        mask: u8,
        min: u8,
        max: u8,
    },
    #[error("cluster CIDR {cluster} has more than 2^{limit} node CIDRs of /{mask}")]
    TooManySubnets { cluster: IpNet, mask: u8, limit: u8 },
    #[error("cluster CIDR {cluster} is full: all {total} node CIDRs of /{mask} are in use")]
    Full {
        cluster: IpNet,
        mask: u8,
        total: u128,
    },
    #[error("{cidr} is not a /{mask} node CIDR inside cluster CIDR {cluster}")]
    NotInCluster {
        cidr: IpNet,
        cluster: IpNet,
        mask: u8,
    },
    #[error("{0} is already allocated")]
    AlreadyAllocated(IpNet),
}

/// Allocator of fixed-size node CIDRs from one cluster CIDR (IPv4 or IPv6).
#[derive(Debug, Clone)]
pub struct NodeCidrAllocator {
    cluster: IpNet,
    mask: u8,
    /// Indexes of allocated subnets.
    used: BTreeSet<u128>,
    total: u128,
    /// Where the next search starts (round robin, so a released CIDR is not
    /// handed out again at once).
    next: u128,
}

/// Largest number of subnets tracked (2^24 = 16M).
const LIMIT_BITS: u8 = 24;

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v) => u32::from(v) as u128,
        IpAddr::V6(v) => u128::from(v),
    }
}

impl NodeCidrAllocator {
    /// `cluster` e.g. 10.244.0.0/16, `mask` e.g. 24. Host bits of `cluster` are ignored.
    pub fn new(cluster: IpNet, mask: u8) -> Result<NodeCidrAllocator, NodeIpamError> {
        let cluster = cluster.trunc();
        let max = cluster.max_prefix_len();
        if mask < cluster.prefix_len() || mask > max {
            return Err(NodeIpamError::BadMask {
                cluster,
                mask,
                min: cluster.prefix_len(),
                max,
            });
        }
        let bits = mask - cluster.prefix_len();
        if bits > LIMIT_BITS {
            return Err(NodeIpamError::TooManySubnets {
                cluster,
                mask,
                limit: LIMIT_BITS,
            });
        }
        Ok(NodeCidrAllocator {
            cluster,
            mask,
            used: BTreeSet::new(),
            total: 1u128 << bits,
            next: 0,
        })
    }

    pub fn cluster(&self) -> IpNet {
        self.cluster
    }

    pub fn mask(&self) -> u8 {
        self.mask
    }

    /// Number of node CIDRs in the cluster CIDR.
    pub fn capacity(&self) -> u128 {
        self.total
    }

    /// Number allocated.
    pub fn used(&self) -> usize {
        self.used.len()
    }

    fn step(&self) -> u128 {
        1u128 << (self.cluster.max_prefix_len() - self.mask)
    }

    fn subnet(&self, idx: u128) -> IpNet {
        let base = to_u128(self.cluster.network()) + idx * self.step();
        let ip = match self.cluster {
            IpNet::V4(_) => IpAddr::V4((base as u32).into()),
            IpNet::V6(_) => IpAddr::V6(base.into()),
        };
        IpNet::new(ip, self.mask).expect("mask checked in new")
    }

    fn index(&self, cidr: IpNet) -> Result<u128, NodeIpamError> {
        let err = || NodeIpamError::NotInCluster {
            cidr,
            cluster: self.cluster,
            mask: self.mask,
        };
        let same_family = matches!(
            (cidr, self.cluster),
            (IpNet::V4(_), IpNet::V4(_)) | (IpNet::V6(_), IpNet::V6(_))
        );
        if !same_family
            || cidr.prefix_len() != self.mask
            || cidr.trunc() != cidr
            || !self.cluster.contains(&cidr)
        {
            return Err(err());
        }
        Ok((to_u128(cidr.network()) - to_u128(self.cluster.network())) / self.step())
    }

    /// Allocates a free node CIDR; a clear error when none is left.
    pub fn allocate(&mut self) -> Result<IpNet, NodeIpamError> {
        if self.used.len() as u128 >= self.total {
            return Err(NodeIpamError::Full {
                cluster: self.cluster,
                mask: self.mask,
                total: self.total,
            });
        }
        // First free index at or after `next`, else from 0.
        let pick = |from: u128, to: u128, used: &BTreeSet<u128>| -> Option<u128> {
            let mut candidate = from;
            for &u in used.range(from..to) {
                if u != candidate {
                    break;
                }
                candidate += 1;
            }
            (candidate < to).then_some(candidate)
        };
        let idx = pick(self.next, self.total, &self.used)
            .or_else(|| pick(0, self.next, &self.used))
            .expect("a free index exists: used < total");
        self.used.insert(idx);
        self.next = (idx + 1) % self.total;
        Ok(self.subnet(idx))
    }

    /// Marks an existing Node's CIDR as taken (at start, or when a Node is
    /// created with a podCIDR already set). Fails if taken already or outside.
    pub fn mark_used(&mut self, cidr: IpNet) -> Result<(), NodeIpamError> {
        let idx = self.index(cidr)?;
        if !self.used.insert(idx) {
            return Err(NodeIpamError::AlreadyAllocated(cidr));
        }
        Ok(())
    }

    /// Replaces what is in use with `cidrs` (the CIDRs stored Nodes hold),
    /// keeping the rotating start; returns the CIDRs that could not be taken.
    pub fn set_used(&mut self, cidrs: impl IntoIterator<Item = IpNet>) -> Vec<NodeIpamError> {
        self.used.clear();
        cidrs
            .into_iter()
            .filter_map(|c| self.mark_used(c).err())
            .collect()
    }

    /// True when `cidr` is allocated.
    pub fn is_used(&self, cidr: IpNet) -> bool {
        self.index(cidr).is_ok_and(|i| self.used.contains(&i))
    }

    /// Releases a CIDR (its Node was deleted). Returns false when it was not allocated.
    pub fn release(&mut self, cidr: IpNet) -> Result<bool, NodeIpamError> {
        let idx = self.index(cidr)?;
        Ok(self.used.remove(&idx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn allocates_in_order_and_never_twice() {
        let mut a = NodeCidrAllocator::new(net("10.244.0.0/16"), 24).unwrap();
        assert_eq!(a.capacity(), 256);
        assert_eq!(a.allocate().unwrap(), net("10.244.0.0/24"));
        assert_eq!(a.allocate().unwrap(), net("10.244.1.0/24"));
        let mut seen = BTreeSet::new();
        seen.insert(net("10.244.0.0/24"));
        seen.insert(net("10.244.1.0/24"));
        while let Ok(c) = a.allocate() {
            assert!(seen.insert(c), "{c} handed out twice");
        }
        assert_eq!(seen.len(), 256);
    }

    #[test]
    fn full_range_is_a_clear_error() {
        let mut a = NodeCidrAllocator::new(net("10.244.0.0/23"), 24).unwrap();
        a.allocate().unwrap();
        a.allocate().unwrap();
        let e = a.allocate().unwrap_err();
        assert!(matches!(e, NodeIpamError::Full { total: 2, .. }));
        assert_eq!(
            e.to_string(),
            "cluster CIDR 10.244.0.0/23 is full: all 2 node CIDRs of /24 are in use"
        );
    }

    #[test]
    fn release_then_reuse_after_the_rest() {
        let mut a = NodeCidrAllocator::new(net("10.244.0.0/22"), 24).unwrap();
        let first = a.allocate().unwrap();
        assert!(a.release(first).unwrap());
        assert!(!a.release(first).unwrap(), "double release reports false");
        // Round robin: the released one comes back only after the others.
        assert_eq!(a.allocate().unwrap(), net("10.244.1.0/24"));
        assert_eq!(a.allocate().unwrap(), net("10.244.2.0/24"));
        assert_eq!(a.allocate().unwrap(), net("10.244.3.0/24"));
        assert_eq!(a.allocate().unwrap(), first);
        assert!(a.allocate().is_err());
    }

    #[test]
    fn mark_used_survives_restart_semantics() {
        // Restart: a new allocator re-marks existing Nodes' CIDRs.
        let mut a = NodeCidrAllocator::new(net("10.244.0.0/16"), 24).unwrap();
        a.mark_used(net("10.244.0.0/24")).unwrap();
        a.mark_used(net("10.244.2.0/24")).unwrap();
        assert_eq!(
            a.mark_used(net("10.244.2.0/24")).unwrap_err(),
            NodeIpamError::AlreadyAllocated(net("10.244.2.0/24"))
        );
        assert!(a.is_used(net("10.244.2.0/24")));
        assert_eq!(a.allocate().unwrap(), net("10.244.1.0/24"));
        assert_eq!(a.allocate().unwrap(), net("10.244.3.0/24"));
        assert_eq!(a.used(), 4);
    }

    #[test]
    fn rejects_foreign_or_misaligned_cidrs() {
        let mut a = NodeCidrAllocator::new(net("10.244.0.0/16"), 24).unwrap();
        for bad in [
            "10.245.0.0/24",
            "10.244.1.0/25",
            "10.244.1.5/24",
            "fd00::/120",
        ] {
            assert!(
                matches!(
                    a.mark_used(net(bad)),
                    Err(NodeIpamError::NotInCluster { .. })
                ),
                "{bad}"
            );
            assert!(a.release(net(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_masks() {
        assert!(matches!(
            NodeCidrAllocator::new(net("10.244.0.0/16"), 8),
            Err(NodeIpamError::BadMask { .. })
        ));
        assert!(matches!(
            NodeCidrAllocator::new(net("10.244.0.0/16"), 33),
            Err(NodeIpamError::BadMask { .. })
        ));
        assert!(matches!(
            NodeCidrAllocator::new(net("fd00::/48"), 120),
            Err(NodeIpamError::TooManySubnets { .. })
        ));
        // Host bits in the cluster CIDR are ignored.
        let mut a = NodeCidrAllocator::new(net("10.244.7.9/16"), 24).unwrap();
        assert_eq!(a.allocate().unwrap(), net("10.244.0.0/24"));
    }

    #[test]
    fn ipv6_and_whole_cluster_as_one_node() {
        let mut a = NodeCidrAllocator::new(net("fd00:10:244::/56"), 64).unwrap();
        assert_eq!(a.allocate().unwrap(), net("fd00:10:244::/64"));
        assert_eq!(a.allocate().unwrap(), net("fd00:10:244:1::/64"));
        let mut b = NodeCidrAllocator::new(net("10.0.0.0/24"), 24).unwrap();
        assert_eq!(b.allocate().unwrap(), net("10.0.0.0/24"));
        assert!(b.allocate().is_err());
    }
}
