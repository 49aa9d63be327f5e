//! Thin rtnetlink layer: links, addresses, routes, neighbours and VXLAN FDB
//! entries, with "not found" mapped to `None` and idempotent helpers.
//! A [`Netlink`] talks to the network namespace its creating thread was in.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{anyhow, Context, Result};
use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder};

use crate::node::Mac;

/// Routing protocol number that marks routes ferry's overlay made.
pub const FERRY_RT_PROTO: u8 = 70;

/// True when the error is a netlink error with one of these errno values.
pub fn is_errno(e: &rtnetlink::Error, codes: &[i32]) -> bool {
    match e {
        rtnetlink::Error::NetlinkError(m) => codes.contains(&m.raw_code().abs()),
        _ => false,
    }
}

fn not_found(e: &rtnetlink::Error) -> bool {
    is_errno(
        e,
        &[libc::ENODEV, libc::ENOENT, libc::ESRCH, libc::EADDRNOTAVAIL],
    )
}

/// What ferry needs to know about a link.
#[derive(Clone, Debug)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub mac: Option<Mac>,
    pub up: bool,
    pub kind: Option<InfoKind>,
    pub controller: Option<u32>,
    pub vxlan: Vec<InfoVxlan>,
}

impl Link {
    fn from_msg(m: &LinkMessage) -> Link {
        let mut l = Link {
            index: m.header.index,
            name: String::new(),
            mtu: 0,
            mac: None,
            up: m.header.flags.contains(LinkFlags::Up),
            kind: None,
            controller: None,
            vxlan: Vec::new(),
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => l.name = n.clone(),
                LinkAttribute::Mtu(v) => l.mtu = *v,
                LinkAttribute::Address(b) => l.mac = Mac::try_from(b.as_slice()).ok(),
                LinkAttribute::Controller(c) => l.controller = Some(*c),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        match i {
                            LinkInfo::Kind(k) => l.kind = Some(k.clone()),
                            LinkInfo::Data(InfoData::Vxlan(v)) => l.vxlan = v.clone(),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        l
    }
}

/// An IPv4 route as ferry reads it.
#[derive(Clone, Debug)]
pub struct Route {
    pub dst: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    pub protocol: RouteProtocol,
    pub onlink: bool,
    pub msg: RouteMessage,
}

/// A neighbour (family inet) or FDB (family bridge) entry.
#[derive(Clone, Debug)]
pub struct Neigh {
    pub ifindex: u32,
    pub ip: Option<Ipv4Addr>,
    pub mac: Option<Mac>,
    pub permanent: bool,
    pub msg: NeighbourMessage,
}

/// A netlink connection (its task runs on the current tokio runtime).
pub struct Netlink {
    pub handle: Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Netlink {
    /// Opens a connection in the calling thread's network namespace. Must be
    /// called inside a tokio runtime.
    pub fn new() -> Result<Netlink> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink socket")?;
        let task = tokio::spawn(conn);
        Ok(Netlink { handle, task })
    }

    pub async fn link(&self, name: &str) -> Result<Option<Link>> {
        let mut s = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match s.try_next().await {
            Ok(Some(m)) => Ok(Some(Link::from_msg(&m))),
            Ok(None) => Ok(None),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(anyhow!("getting link {name}: {e}")),
        }
    }

    pub async fn link_by_index(&self, index: u32) -> Result<Option<Link>> {
        let mut s = self.handle.link().get().match_index(index).execute();
        match s.try_next().await {
            Ok(Some(m)) => Ok(Some(Link::from_msg(&m))),
            Ok(None) => Ok(None),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(anyhow!("getting link {index}: {e}")),
        }
    }

    pub async fn links(&self) -> Result<Vec<Link>> {
        let msgs: Vec<LinkMessage> = self.handle.link().get().execute().try_collect().await?;
        Ok(msgs.iter().map(Link::from_msg).collect())
    }

    pub async fn set_up(&self, index: u32) -> Result<()> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .with_context(|| format!("setting link {index} up"))
    }

    pub async fn set_mtu(&self, index: u32, mtu: u32) -> Result<()> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).build())
            .execute()
            .await
            .with_context(|| format!("setting link {index} mtu {mtu}"))
    }

    pub async fn del_link(&self, index: u32) -> Result<()> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if not_found(&e) => Ok(()),
            Err(e) => Err(anyhow!("deleting link {index}: {e}")),
        }
    }

    /// Makes sure a VXLAN device `name` exists with exactly this VNI, port,
    /// local address, underlay link and learning off; an existing matching device is
    /// kept as it is (so its MAC, and traffic through it, survive restarts).
    pub async fn ensure_vxlan(
        &self,
        name: &str,
        vni: u32,
        port: u16,
        local: Ipv4Addr,
        underlay: u32,
        mtu: u32,
    ) -> Result<Link> {
        if let Some(l) = self.link(name).await? {
            let v = &l.vxlan;
            let ok = l.kind == Some(InfoKind::Vxlan)
                && v.contains(&InfoVxlan::Id(vni))
                && v.contains(&InfoVxlan::Port(port))
                && v.contains(&InfoVxlan::Local(local))
                && v.contains(&InfoVxlan::Link(underlay))
                && v.contains(&InfoVxlan::Learning(false))
                && v.contains(&InfoVxlan::UDPCsum(false));
            if ok {
                if l.mtu != mtu {
                    self.set_mtu(l.index, mtu).await?;
                }
                if !l.up {
                    self.set_up(l.index).await?;
                }
                return self.link(name).await?.context("vxlan device vanished");
            }
            tracing::warn!(
                device = name,
                "existing device does not match the configuration; recreating it"
            );
            self.del_link(l.index).await?;
        }
        let msg = LinkVxlan::new(name, vni)
            .port(port)
            .local(local)
            .dev(underlay)
            .learning(false)
            .udp_csum(false)
            .mtu(mtu)
            .up()
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .with_context(|| format!("creating vxlan device {name}"))?;
        self.link(name)
            .await?
            .context("vxlan device missing after creation")
    }

    /// Makes sure a bridge `name` exists and is up.
    pub async fn ensure_bridge(&self, name: &str, mtu: u32) -> Result<Link> {
        if self.link(name).await?.is_none() {
            let r = self
                .handle
                .link()
                .add(LinkBridge::new(name).mtu(mtu).up().build())
                .execute()
                .await;
            match r {
                Ok(()) => {}
                Err(e) if is_errno(&e, &[libc::EEXIST]) => {}
                Err(e) => return Err(anyhow!("creating bridge {name}: {e}")),
            }
        }
        let l = self
            .link(name)
            .await?
            .context("bridge missing after creation")?;
        if !l.up {
            self.set_up(l.index).await?;
        }
        // A bridge whose address was never set takes the lowest of its ports'
        // addresses, so the gateway's MAC would change as pods come and go.
        // Setting it (to what it is now) fixes it for good.
        if let Some(mac) = l.mac {
            self.handle
                .link()
                .set(
                    LinkUnspec::new_with_index(l.index)
                        .address(mac.0.to_vec())
                        .build(),
                )
                .execute()
                .await
                .with_context(|| format!("fixing bridge {name}'s address {mac}"))?;
        }
        Ok(l)
    }

    /// IPv4 addresses on a link, with prefix.
    pub async fn addrs(&self, index: u32) -> Result<Vec<(Ipv4Net, AddressMessage)>> {
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.index == index)
            .filter_map(|m| {
                let ip = m
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                        _ => None,
                    })
                    .or_else(|| {
                        m.attributes.iter().find_map(|a| match a {
                            AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                            _ => None,
                        })
                    })?;
                Some((Ipv4Net::new(ip, m.header.prefix_len).ok()?, m))
            })
            .collect())
    }

    /// Makes `addr` present on the link; with `exclusive`, removes every other IPv4 address.
    pub async fn ensure_addr(&self, index: u32, addr: Ipv4Net, exclusive: bool) -> Result<()> {
        let mut present = false;
        for (a, msg) in self.addrs(index).await? {
            if a == addr {
                present = true;
            } else if exclusive {
                tracing::info!(%a, index, "removing stray address");
                self.handle.address().del(msg).execute().await?;
            }
        }
        if !present {
            match self
                .handle
                .address()
                .add(index, IpAddr::V4(addr.addr()), addr.prefix_len())
                .execute()
                .await
            {
                Ok(()) => {}
                Err(e) if is_errno(&e, &[libc::EEXIST]) => {}
                Err(e) => return Err(anyhow!("adding address {addr} to link {index}: {e}")),
            }
        }
        Ok(())
    }

    /// IPv4 routes of the main table.
    pub async fn routes(&self) -> Result<Vec<Route>> {
        let filter = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let msgs: Vec<RouteMessage> = self
            .handle
            .route()
            .get(filter)
            .execute()
            .try_collect()
            .await?;
        Ok(msgs
            .into_iter()
            .filter(|m| {
                m.header.table == RouteHeader::RT_TABLE_MAIN && m.header.kind == RouteType::Unicast
            })
            .filter_map(|m| {
                let mut dst = Ipv4Addr::UNSPECIFIED;
                let mut gateway = None;
                let mut oif = None;
                for a in &m.attributes {
                    match a {
                        RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = *ip,
                        RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = Some(*ip),
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        _ => {}
                    }
                }
                Some(Route {
                    dst: Ipv4Net::new(dst, m.header.destination_prefix_length).ok()?,
                    gateway,
                    oif,
                    protocol: m.header.protocol,
                    onlink: m.header.flags.contains(RouteFlags::Onlink),
                    msg: m,
                })
            })
            .collect())
    }

    /// `ip route replace dst via gw dev oif [onlink] proto 70`
    pub async fn replace_route(
        &self,
        dst: Ipv4Net,
        gw: Ipv4Addr,
        oif: u32,
        onlink: bool,
    ) -> Result<()> {
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.network(), dst.prefix_len())
            .gateway(gw)
            .output_interface(oif)
            .protocol(RouteProtocol::Other(FERRY_RT_PROTO))
            .scope(RouteScope::Universe);
        if onlink {
            b = b.onlink();
        }
        self.handle
            .route()
            .add(b.build())
            .replace()
            .execute()
            .await
            .with_context(|| format!("route {dst} via {gw} dev {oif}"))
    }

    pub async fn del_route(&self, r: &Route) -> Result<()> {
        match self.handle.route().del(r.msg.clone()).execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, &[libc::ESRCH, libc::ENOENT]) => Ok(()),
            Err(e) => Err(anyhow!("deleting route {}: {e}", r.dst)),
        }
    }

    /// Neighbour entries (`family` Inet) or FDB entries (`family` Bridge) of one link.
    pub async fn neighbours(&self, family: AddressFamily, ifindex: u32) -> Result<Vec<Neigh>> {
        let msgs: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute()
            .try_collect()
            .await?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.ifindex == ifindex && m.header.family == family)
            .map(|m| {
                let mut n = Neigh {
                    ifindex,
                    ip: None,
                    mac: None,
                    permanent: m.header.state == NeighbourState::Permanent,
                    msg: m.clone(),
                };
                for a in &m.attributes {
                    match a {
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => {
                            n.ip = Some(*ip)
                        }
                        // FDB entries (family bridge) carry the IPv4 dst as raw bytes.
                        NeighbourAttribute::Destination(NeighbourAddress::Other(b))
                            if b.len() == 4 =>
                        {
                            n.ip = Some(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
                        }
                        NeighbourAttribute::LinkLayerAddress(b) => {
                            n.mac = Mac::try_from(b.as_slice()).ok()
                        }
                        _ => {}
                    }
                }
                n
            })
            .collect())
    }

    /// `ip neigh replace ip lladdr mac dev ifindex nud permanent`
    pub async fn replace_neigh(&self, ifindex: u32, ip: Ipv4Addr, mac: Mac) -> Result<()> {
        self.handle
            .neighbours()
            .add(ifindex, IpAddr::V4(ip))
            .link_layer_address(&mac.0)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .with_context(|| format!("neighbour {ip} lladdr {mac}"))
    }

    /// `bridge fdb replace mac dev ifindex dst ip self permanent`
    pub async fn replace_fdb(&self, ifindex: u32, mac: Mac, dst: Ipv4Addr) -> Result<()> {
        self.handle
            .neighbours()
            .add_bridge(ifindex, &mac.0)
            .destination(IpAddr::V4(dst))
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .with_context(|| format!("fdb {mac} dst {dst}"))
    }

    pub async fn del_neigh(&self, n: &Neigh) -> Result<()> {
        match self.handle.neighbours().del(n.msg.clone()).execute().await {
            Ok(()) => Ok(()),
            Err(e) if not_found(&e) => Ok(()),
            Err(e) => Err(anyhow!("deleting neighbour {:?} {:?}: {e}", n.ip, n.mac)),
        }
    }

    /// Creates a veth pair `host` / `peer` in this namespace.
    pub async fn add_veth(&self, host: &str, peer: &str, mtu: u32) -> Result<()> {
        self.handle
            .link()
            .add(LinkVeth::new(host, peer).mtu(mtu).build())
            .execute()
            .await
            .with_context(|| format!("creating veth {host}/{peer}"))
    }

    /// Moves a link into the network namespace behind `fd`.
    pub async fn move_to_netns(&self, index: u32, fd: std::os::fd::RawFd) -> Result<()> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).setns_by_fd(fd).build())
            .execute()
            .await
            .with_context(|| format!("moving link {index} to another namespace"))
    }

    /// Attaches a link to a bridge, sets its MTU and brings it up.
    pub async fn attach(&self, index: u32, bridge: u32, mtu: u32) -> Result<()> {
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .controller(bridge)
                    .mtu(mtu)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .with_context(|| format!("attaching link {index} to bridge {bridge}"))
    }

    /// Renames a (down) link.
    pub async fn rename(&self, index: u32, name: &str) -> Result<()> {
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .name(name.to_string())
                    .build(),
            )
            .execute()
            .await
            .with_context(|| format!("renaming link {index} to {name}"))
    }
}

/// TX checksum offload of a link (ethtool's ETHTOOL_GTXCSUM / ETHTOOL_STXCSUM),
/// in the calling thread's network namespace.
pub mod ethtool {
    use std::io;

    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GTXCSUM: u32 = 0x16;
    const ETHTOOL_STXCSUM: u32 = 0x17;

    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }

    #[repr(C)]
    struct IfReq {
        name: [libc::c_char; libc::IFNAMSIZ],
        data: *mut EthtoolValue,
        _pad: [u8; 16],
    }

    fn call(ifname: &str, cmd: u32, data: u32) -> io::Result<u32> {
        if ifname.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "interface name too long",
            ));
        }
        let mut val = EthtoolValue { cmd, data };
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: &mut val,
            _pad: [0; 16],
        };
        for (d, s) in req.name.iter_mut().zip(ifname.bytes()) {
            *d = s as libc::c_char;
        }
        // SAFETY: a datagram socket for the ioctl, closed below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: SIOCETHTOOL with a valid ifreq pointing at a live ethtool_value.
        let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL as _, &mut req as *mut IfReq) };
        let err = io::Error::last_os_error();
        // SAFETY: closing the fd opened above.
        unsafe { libc::close(fd) };
        if rc < 0 {
            return Err(err);
        }
        Ok(val.data)
    }

    /// Whether TX checksum offload is on.
    pub fn tx_checksum(ifname: &str) -> io::Result<bool> {
        call(ifname, ETHTOOL_GTXCSUM, 0).map(|v| v != 0)
    }

    /// Turns TX checksum offload on or off (`ethtool -K IF tx on|off`).
    pub fn set_tx_checksum(ifname: &str, on: bool) -> io::Result<()> {
        call(ifname, ETHTOOL_STXCSUM, on as u32).map(|_| ())
    }
}
