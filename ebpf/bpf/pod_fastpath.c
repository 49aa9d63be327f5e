// SPDX-License-Identifier: GPL-2.0
//
// Pod fast path: cross-node pod-to-pod TCP and UDP skip the nodes' IP stacks.
//
//   from_pod  tc ingress of each pod's host-side veth. A packet for a pod on
//             another node is routed with bpf_fib_lookup (the node's own routes:
//             flannel.1 for VXLAN, the underlay for host-gw). For host-gw it is
//             redirected to the underlay. For VXLAN it is encapsulated here,
//             exactly as the vxlan driver would (VNI, port, the peer's VTEP MAC
//             from the neighbour table, its address from the vteps map, which
//             mirrors flannel.1's FDB), and sent out of the underlay: no cni0,
//             no forwarding, no conntrack, no vxlan driver, no output routing.
//   to_pod    tc ingress of the underlay (and of flannel.1). A VXLAN packet from
//             a peer for a pod of this node is decapsulated here; it, or a
//             host-gw packet for such a pod, goes straight into the pod's
//             namespace with bpf_redirect_peer: no UDP socket, no gro_cells,
//             no forwarding, no cni0, no veth backlog.
//
// Everything else takes the stack: other protocols, fragments, TTL 1, traffic
// to or from outside the cluster CIDR, VXLAN packets marked CE (the vxlan
// driver propagates the mark), and replies to flows the stack NATed on this
// node. The last is what keeps kube-proxy (ferry proxy) correct: a pod's
// packet to a ClusterIP, NodePort or external address goes through the stack,
// and from_pod records its source (address, port, protocol) in nat_guard;
// to_pod sends packets to a recorded source through the stack, where conntrack
// reverses the NAT.
#include <stddef.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

#define AF_INET 2
#define ECN_MASK 3
#define ECN_ECT_0 2
#define ECN_CE 3
// VXLAN header flags word with only the I flag (a valid VNI) set.
#define VXLAN_FLAGS_VNI 0x08000000
// UDP source ports of encapsulated packets: the kernel's default local port
// range, which the vxlan driver spreads flows over by their hash.
#define SPORT_MIN 32768
#define SPORT_MAX 61000

// The cluster CIDR and this node's pod subnet, addresses in network order;
// then VXLAN in BPF, off when vxlan_ifindex is 0.
struct fastpath_config {
	__u32 cluster_net;
	__u32 cluster_mask;
	__u32 node_net;
	__u32 node_mask;
	__u32 vxlan_ifindex; // flannel.1: packets routed to it are encapsulated here
	__u32 underlay_ifindex;
	__u32 vtep_addr; // this node's underlay address
	__u32 vni; // as in the header: VNI << 8, network order
	__u16 vxlan_port; // network order
	__u8 vtep_mac[ETH_ALEN]; // flannel.1's MAC
};

// A pod of this node, by its address (network order).
struct pod_endpoint {
	__u32 host_ifindex; // the host-side veth
	__u8 pod_mac[ETH_ALEN];
	__u8 gateway_mac[ETH_ALEN];
};

// A pod socket whose flows the stack may NAT.
struct guard_key {
	__u32 addr;
	__u16 port;
	__u8 protocol;
	__u8 pad;
};

// A peer's VTEP MAC (the FDB's key).
struct vtep_key {
	__u8 mac[ETH_ALEN];
	__u16 pad;
};

// What VXLAN puts between the outer Ethernet header and the inner IP header.
struct vxlan_encap {
	struct iphdr ip;
	struct udphdr udp;
	__be32 flags;
	__be32 vni;
	struct ethhdr inner;
} __attribute__((packed));

#define VXLAN_OVERHEAD ((int)sizeof(struct vxlan_encap))

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct fastpath_config);
} fastpath_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct pod_endpoint);
} pods SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 131072);
	__type(key, struct guard_key);
	__type(value, __u32);
} nat_guard SEC(".maps");

// Peer VTEP MAC → the peer's underlay address (network order).
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct vtep_key);
	__type(value, __u32);
} vteps SEC(".maps");

// Packet counters, one per CPU, summed by `ferry overlay` for /metrics. The
// loader (src/pod_fastpath.rs, STATS) names them in this order.
enum stat {
	STAT_ROUTED, // from_pod: redirected to the route's device (host-gw; flannel.1 without VXLAN in BPF)
	STAT_ENCAPSULATED, // from_pod: VXLAN-encapsulated here, sent from the underlay
	STAT_TO_TUNNEL, // from_pod: handed to flannel.1 (no vteps entry or outer neighbour, too long)
	STAT_FROM_POD_STACK, // from_pod: TCP/UDP left to the stack
	STAT_DELIVERED, // to_pod: delivered into a pod
	STAT_DECAPSULATED, // to_pod: VXLAN-decapsulated here, delivered into a pod
	STAT_TO_POD_STACK, // to_pod: TCP/UDP for a pod of this node left to the stack (NAT guard, TTL)
	STAT_MAX,
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

static __always_inline void count(__u32 stat)
{
	__u64 *n = bpf_map_lookup_elem(&stats, &stat);
	if (n)
		*n += 1;
}

struct flow {
	struct ethhdr *eth;
	struct iphdr *ip;
	__u16 sport;
	__u16 dport;
};

// Points f at the Ethernet and IPv4 headers of the frame at `off`, or 0.
static __always_inline int headers(struct __sk_buff *skb, int off, struct flow *f)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	f->eth = data + off;
	f->ip = data + off + sizeof(struct ethhdr);
	return (void *)(f->ip + 1) <= end;
}

// An unfragmented IPv4 TCP or UDP packet in the frame at `off`, with its ports, or 0.
static __always_inline int parse(struct __sk_buff *skb, int off, struct flow *f)
{
	if (!headers(skb, off, f) || f->eth->h_proto != bpf_htons(ETH_P_IP))
		return 0;
	struct iphdr *ip = f->ip;
	if (ip->ihl < 5 || (ip->frag_off & bpf_htons(0x3fff)))
		return 0;
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return 0;
	__u16 ports[2];
	if (bpf_skb_load_bytes(skb, off + sizeof(struct ethhdr) + ip->ihl * 4, ports, sizeof(ports)))
		return 0;
	// bpf_skb_load_bytes may not move data, but the verifier forgets the
	// packet bounds across helper calls: check them again.
	if (!headers(skb, off, f))
		return 0;
	f->sport = ports[0];
	f->dport = ports[1];
	return 1;
}

// What a router does to a forwarded packet (as the kernel's ip_decrease_ttl).
static __always_inline void decrease_ttl(struct iphdr *ip)
{
	__u32 check = ip->check;
	check += bpf_htons(0x0100);
	ip->check = (__u16)(check + (check >= 0xFFFF));
	ip->ttl--;
}

static __always_inline __u16 csum_fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return ~sum;
}

static __always_inline int mac_eq(const __u8 *a, const __u8 *b)
{
	return *(__u32 *)a == *(__u32 *)b && *(__u16 *)(a + 4) == *(__u16 *)(b + 4);
}

// Encapsulates a routed packet (inner MACs and TTL already set) for the peer
// whose VTEP MAC `inner` resolved to, and sends it out of the underlay. When
// that cannot be done here (no vteps entry, no underlay route or neighbour
// yet, a frame too long), flannel.1 encapsulates it instead.
static __always_inline long vxlan_encap(struct __sk_buff *skb, struct fastpath_config *cfg,
					 struct bpf_fib_lookup *inner, __u8 tos)
{
	struct vtep_key key = {};
	__builtin_memcpy(key.mac, inner->dmac, ETH_ALEN);
	__u32 *remote = bpf_map_lookup_elem(&vteps, &key);
	__u32 len = skb->len - sizeof(struct ethhdr) + VXLAN_OVERHEAD;
	if (!remote || len > 0xffff)
		goto tunnel;
	struct bpf_fib_lookup out = {};
	out.family = AF_INET;
	out.l4_protocol = IPPROTO_UDP;
	out.ipv4_src = cfg->vtep_addr;
	out.ipv4_dst = *remote;
	out.ifindex = cfg->underlay_ifindex;
	if (bpf_fib_lookup(skb, &out, sizeof(out), BPF_FIB_LOOKUP_OUTPUT) != BPF_FIB_LKUP_RET_SUCCESS)
		goto tunnel;

	struct vxlan_encap h = {};
	h.ip.version = 4;
	h.ip.ihl = 5;
	// As the vxlan driver's default (tos 0, df unset): ECN copied from the
	// inner header, CE sent as ECT(0); DF off, so the ID varies.
	h.ip.tos = (tos & ECN_MASK) == ECN_CE ? ECN_ECT_0 : tos & ECN_MASK;
	h.ip.tot_len = bpf_htons(len);
	h.ip.id = bpf_get_prandom_u32();
	h.ip.ttl = 64;
	h.ip.protocol = IPPROTO_UDP;
	h.ip.saddr = cfg->vtep_addr;
	h.ip.daddr = *remote;
	h.ip.check = csum_fold(bpf_csum_diff(0, 0, (__be32 *)&h, sizeof(struct iphdr), 0));
	__u64 hash = bpf_get_hash_recalc(skb);
	h.udp.source = bpf_htons(((hash * (SPORT_MAX - SPORT_MIN)) >> 32) + SPORT_MIN);
	h.udp.dest = cfg->vxlan_port;
	h.udp.len = bpf_htons(len - sizeof(struct iphdr));
	// UDP checksum 0, as flannel.1 (udpcsum off) sends it.
	h.flags = bpf_htonl(VXLAN_FLAGS_VNI);
	h.vni = cfg->vni;
	__builtin_memcpy(h.inner.h_dest, inner->dmac, ETH_ALEN);
	__builtin_memcpy(h.inner.h_source, inner->smac, ETH_ALEN);
	h.inner.h_proto = bpf_htons(ETH_P_IP);

	// FIXED_GSO: the pod's MSS already fits the tunnel (flannel.1's MTU is the
	// underlay's minus the overhead), so GSO cuts outer packets at the underlay MTU.
	__u64 flags = BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 |
		      BPF_F_ADJ_ROOM_ENCAP_L4_UDP | BPF_F_ADJ_ROOM_ENCAP_L2_ETH |
		      BPF_F_ADJ_ROOM_ENCAP_L2(sizeof(struct ethhdr));
	if (bpf_skb_adjust_room(skb, VXLAN_OVERHEAD, BPF_ADJ_ROOM_MAC, flags))
		goto tunnel;
	__u8 macs[2 * ETH_ALEN];
	__builtin_memcpy(macs, out.dmac, ETH_ALEN);
	__builtin_memcpy(macs + ETH_ALEN, out.smac, ETH_ALEN);
	if (bpf_skb_store_bytes(skb, sizeof(struct ethhdr), &h, sizeof(h), 0) ||
	    bpf_skb_store_bytes(skb, 0, macs, sizeof(macs), 0))
		return TC_ACT_SHOT; // half rewritten: not fit for any path
	count(STAT_ENCAPSULATED);
	return bpf_redirect(out.ifindex, 0);
tunnel:
	count(STAT_TO_TUNNEL);
	return bpf_redirect(cfg->vxlan_ifindex, 0);
}

SEC("classifier")
int from_pod(struct __sk_buff *skb)
{
	struct flow f;
	__u32 zero = 0;
	if (!parse(skb, 0, &f))
		return TC_ACT_OK;
	struct fastpath_config *cfg = bpf_map_lookup_elem(&fastpath_config, &zero);
	if (!cfg || !cfg->cluster_mask)
		return TC_ACT_OK;
	__u32 daddr = f.ip->daddr;
	if ((daddr & cfg->cluster_mask) != cfg->cluster_net) {
		struct guard_key k = {
			.addr = f.ip->saddr, .port = f.sport, .protocol = f.ip->protocol,
		};
		if (!bpf_map_lookup_elem(&nat_guard, &k)) {
			__u32 one = 1;
			bpf_map_update_elem(&nat_guard, &k, &one, BPF_ANY);
		}
		goto stack;
	}
	if ((daddr & cfg->node_mask) == cfg->node_net || f.ip->ttl <= 1)
		goto stack;

	struct bpf_fib_lookup fib = {};
	fib.family = AF_INET;
	fib.tos = f.ip->tos;
	fib.l4_protocol = f.ip->protocol;
	fib.sport = f.sport;
	fib.dport = f.dport;
	fib.ipv4_src = f.ip->saddr;
	fib.ipv4_dst = daddr;
	fib.ifindex = skb->ingress_ifindex;
	// tot_len 0: the kernel checks the (GSO-aware) length against the MTU.
	long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		__u8 tos = f.ip->tos;
		decrease_ttl(f.ip);
		__builtin_memcpy(f.eth->h_dest, fib.dmac, ETH_ALEN);
		__builtin_memcpy(f.eth->h_source, fib.smac, ETH_ALEN);
		if (cfg->vxlan_ifindex && fib.ifindex == cfg->vxlan_ifindex)
			return vxlan_encap(skb, cfg, &fib, tos);
		count(STAT_ROUTED);
		return bpf_redirect(fib.ifindex, 0);
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		// The kernel resolves the next hop's address and queues meanwhile.
		struct bpf_redir_neigh nh = {
			.nh_family = AF_INET, .ipv4_nh = fib.ipv4_dst,
		};
		decrease_ttl(f.ip);
		count(STAT_ROUTED);
		return bpf_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
	}
stack:
	count(STAT_FROM_POD_STACK);
	return TC_ACT_OK;
}

// The pod of this node that f may go straight to, or NULL for the stack.
static __always_inline struct pod_endpoint *local_pod(struct flow *f)
{
	__u32 daddr = f->ip->daddr;
	struct pod_endpoint *ep = bpf_map_lookup_elem(&pods, &daddr);
	if (!ep)
		return NULL;
	struct guard_key k = {
		.addr = daddr, .port = f->dport, .protocol = f->ip->protocol,
	};
	if (f->ip->ttl <= 1 || bpf_map_lookup_elem(&nat_guard, &k))
		return NULL;
	return ep;
}

static __always_inline long deliver(struct flow *f, struct pod_endpoint *ep)
{
	decrease_ttl(f->ip);
	__builtin_memcpy(f->eth->h_dest, ep->pod_mac, ETH_ALEN);
	__builtin_memcpy(f->eth->h_source, ep->gateway_mac, ETH_ALEN);
	return bpf_redirect_peer(ep->host_ifindex, 0);
}

// A VXLAN packet of this overlay for a pod of this node: strips the outer
// headers and delivers the inner packet. Anything else (and CE-marked packets,
// whose mark the vxlan driver carries over) is left to the stack: -1.
static __always_inline long vxlan_decap(struct __sk_buff *skb, struct fastpath_config *cfg)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct vxlan_encap *h = (void *)(eth + 1);
	if ((void *)(h + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return -1;
	if (h->ip.ihl != 5 || h->ip.protocol != IPPROTO_UDP ||
	    (h->ip.frag_off & bpf_htons(0x3fff)) || (h->ip.tos & ECN_MASK) == ECN_CE ||
	    h->ip.daddr != cfg->vtep_addr || h->udp.dest != cfg->vxlan_port ||
	    h->flags != bpf_htonl(VXLAN_FLAGS_VNI) || h->vni != cfg->vni ||
	    !mac_eq(h->inner.h_dest, cfg->vtep_mac))
		return -1;
	struct flow f;
	if (!parse(skb, sizeof(struct ethhdr) + offsetof(struct vxlan_encap, inner), &f))
		return -1;
	struct pod_endpoint *ep = local_pod(&f);
	if (!ep)
		return -1;
	// Removes the outer IP, UDP and VXLAN headers and the inner Ethernet
	// header; the outer Ethernet header stays, rewritten by deliver. The GSO
	// size is the inner MSS already.
	if (bpf_skb_adjust_room(skb, -VXLAN_OVERHEAD, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_FIXED_GSO))
		return -1;
	if (!headers(skb, 0, &f))
		return TC_ACT_SHOT; // cannot happen: the inner headers were there
	count(STAT_DECAPSULATED);
	return deliver(&f, ep);
}

SEC("classifier")
int to_pod(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct fastpath_config *cfg = bpf_map_lookup_elem(&fastpath_config, &zero);
	if (cfg && cfg->vxlan_ifindex && skb->ifindex == cfg->underlay_ifindex) {
		long verdict = vxlan_decap(skb, cfg);
		if (verdict >= 0)
			return verdict;
	}
	struct flow f;
	if (!parse(skb, 0, &f))
		return TC_ACT_OK;
	struct pod_endpoint *ep = local_pod(&f);
	if (!ep) {
		// Counted here only: what vxlan_decap leaves comes here via flannel.1.
		__u32 daddr = f.ip->daddr;
		if (bpf_map_lookup_elem(&pods, &daddr))
			count(STAT_TO_POD_STACK);
		return TC_ACT_OK;
	}
	count(STAT_DELIVERED);
	return deliver(&f, ep);
}
