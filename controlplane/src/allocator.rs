//! ClusterIP and NodePort allocators: a bitmap over the range with a rotating
//! search start, so allocation is amortised O(1) and a just-released value is
//! not handed out again at once (a client may still use it).

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("provided {what} is not in the valid range. The range of valid {what}s is {range}")]
    OutOfRange { what: &'static str, range: String },
    #[error("provided {what} is already allocated")]
    AlreadyAllocated { what: &'static str },
    #[error("range is full")]
    Full,
}

/// A bitmap over `size` values with a rotating search start.
#[derive(Debug, Clone)]
struct Bitmap {
    words: Vec<u64>,
    size: usize,
    used: usize,
    next: usize,
}

impl Bitmap {
    fn new(size: usize) -> Bitmap {
        Bitmap {
            words: vec![0; size.div_ceil(64)],
            size,
            used: 0,
            next: 0,
        }
    }

    fn get(&self, i: usize) -> bool {
        self.words[i / 64] & (1 << (i % 64)) != 0
    }

    fn set(&mut self, i: usize, on: bool) {
        let was = self.get(i);
        if on {
            self.words[i / 64] |= 1 << (i % 64);
        } else {
            self.words[i / 64] &= !(1 << (i % 64));
        }
        match (was, on) {
            (false, true) => self.used += 1,
            (true, false) => self.used -= 1,
            _ => {}
        }
    }

    /// Claims the first free index at or after the rotating start.
    fn claim_next(&mut self) -> Option<usize> {
        if self.used == self.size {
            return None;
        }
        for step in 0..self.size {
            let i = (self.next + step) % self.size;
            // Skip whole words that are full.
            if i.is_multiple_of(64) && self.words[i / 64] == u64::MAX && i + 64 <= self.size {
                continue;
            }
            if !self.get(i) {
                self.set(i, true);
                self.next = (i + 1) % self.size;
                return Some(i);
            }
        }
        None
    }
}

/// Service ClusterIPs from an IPv4 CIDR. The network and broadcast addresses
/// are never handed out; the first usable one, which the `kubernetes` service
/// takes with `allocate_specific`, is the last `allocate_next` reaches.
#[derive(Debug, Clone)]
pub struct IpAllocator {
    cidr: Ipv4Net,
    /// Index 0 is the first usable address.
    bits: Bitmap,
}

impl IpAllocator {
    pub fn new(cidr: Ipv4Net) -> IpAllocator {
        let cidr = cidr.trunc();
        let total = 1usize << (32 - cidr.prefix_len());
        let usable = total.saturating_sub(2).max(1);
        let mut bits = Bitmap::new(usable);
        // Reserved for the `kubernetes` service: skipped by allocate_next.
        bits.next = 1 % usable;
        IpAllocator { cidr, bits }
    }

    pub fn first_usable(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.cidr.network()) + 1)
    }

    fn index(&self, ip: Ipv4Addr) -> Result<usize, AllocError> {
        let out_of_range = || AllocError::OutOfRange {
            what: "IP",
            range: self.cidr.to_string(),
        };
        let offset = u32::from(ip)
            .checked_sub(u32::from(self.cidr.network()))
            .ok_or_else(out_of_range)?;
        let index = (offset as usize).checked_sub(1).ok_or_else(out_of_range)?;
        if index >= self.bits.size {
            return Err(out_of_range());
        }
        Ok(index)
    }

    pub fn allocate_specific(&mut self, ip: Ipv4Addr) -> Result<(), AllocError> {
        let i = self.index(ip)?;
        if self.bits.get(i) {
            return Err(AllocError::AlreadyAllocated { what: "IP" });
        }
        self.bits.set(i, true);
        Ok(())
    }

    pub fn allocate_next(&mut self) -> Result<Ipv4Addr, AllocError> {
        let i = self.bits.claim_next().ok_or(AllocError::Full)?;
        Ok(Ipv4Addr::from(
            u32::from(self.cidr.network()) + 1 + i as u32,
        ))
    }

    pub fn release(&mut self, ip: Ipv4Addr) {
        if let Ok(i) = self.index(ip) {
            self.bits.set(i, false);
        }
    }

    pub fn is_allocated(&self, ip: Ipv4Addr) -> bool {
        self.index(ip).is_ok_and(|i| self.bits.get(i))
    }

    pub fn free_count(&self) -> usize {
        self.bits.size - self.bits.used
    }
}

/// NodePorts from an inclusive range such as 30000-32767.
#[derive(Debug, Clone)]
pub struct PortAllocator {
    first: u16,
    last: u16,
    bits: Bitmap,
}

impl PortAllocator {
    pub fn new(first: u16, last: u16) -> PortAllocator {
        PortAllocator {
            first,
            last,
            bits: Bitmap::new(usize::from(last - first) + 1),
        }
    }

    fn index(&self, port: u16) -> Result<usize, AllocError> {
        if port < self.first || port > self.last {
            return Err(AllocError::OutOfRange {
                what: "port",
                range: format!("{}-{}", self.first, self.last),
            });
        }
        Ok(usize::from(port - self.first))
    }

    pub fn allocate_specific(&mut self, port: u16) -> Result<(), AllocError> {
        let i = self.index(port)?;
        if self.bits.get(i) {
            return Err(AllocError::AlreadyAllocated { what: "port" });
        }
        self.bits.set(i, true);
        Ok(())
    }

    pub fn allocate_next(&mut self) -> Result<u16, AllocError> {
        let i = self.bits.claim_next().ok_or(AllocError::Full)?;
        Ok(self.first + i as u16)
    }

    pub fn release(&mut self, port: u16) {
        if let Ok(i) = self.index(port) {
            self.bits.set(i, false);
        }
    }

    pub fn is_allocated(&self, port: u16) -> bool {
        self.index(port).is_ok_and(|i| self.bits.get(i))
    }

    pub fn free_count(&self) -> usize {
        self.bits.size - self.bits.used
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_allocator_skips_reserved_and_exhausts() {
        let mut a = IpAllocator::new("10.96.0.0/29".parse().unwrap());
        assert_eq!(a.first_usable(), Ipv4Addr::new(10, 96, 0, 1));
        let got: Vec<Ipv4Addr> = (0..6).map(|_| a.allocate_next().unwrap()).collect();
        assert_eq!(got[0], Ipv4Addr::new(10, 96, 0, 2));
        assert!(
            got.contains(&Ipv4Addr::new(10, 96, 0, 1)),
            "the reserved address is handed out last"
        );
        assert_eq!(a.allocate_next(), Err(AllocError::Full));
        assert_eq!(a.free_count(), 0);
        a.release(Ipv4Addr::new(10, 96, 0, 3));
        assert_eq!(a.allocate_next().unwrap(), Ipv4Addr::new(10, 96, 0, 3));
    }

    #[test]
    fn ip_allocator_rejects_taken_and_out_of_range() {
        let mut a = IpAllocator::new("10.96.0.0/24".parse().unwrap());
        a.allocate_specific(Ipv4Addr::new(10, 96, 0, 1)).unwrap();
        assert_eq!(
            a.allocate_specific(Ipv4Addr::new(10, 96, 0, 1)),
            Err(AllocError::AlreadyAllocated { what: "IP" })
        );
        for bad in [
            Ipv4Addr::new(10, 96, 0, 0),
            Ipv4Addr::new(10, 96, 0, 255),
            Ipv4Addr::new(10, 97, 0, 1),
        ] {
            assert!(
                matches!(a.allocate_specific(bad), Err(AllocError::OutOfRange { .. })),
                "{bad}"
            );
        }
        assert!(a.is_allocated(Ipv4Addr::new(10, 96, 0, 1)));
    }

    #[test]
    fn port_allocator_rotates_after_release() {
        let mut p = PortAllocator::new(30000, 30002);
        assert_eq!(p.allocate_next().unwrap(), 30000);
        p.release(30000);
        // Not handed out again at once.
        assert_eq!(p.allocate_next().unwrap(), 30001);
        assert!(p
            .allocate_specific(29999)
            .unwrap_err()
            .to_string()
            .contains("30000-30002"));
        assert_eq!(p.allocate_next().unwrap(), 30002);
        assert_eq!(p.allocate_next().unwrap(), 30000);
        assert_eq!(p.allocate_next(), Err(AllocError::Full));
    }

    #[test]
    fn many_allocations_are_fast_and_unique() {
        let mut a = IpAllocator::new("10.96.0.0/12".parse().unwrap());
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20_000 {
            assert!(seen.insert(a.allocate_next().unwrap()));
        }
    }
}
