// SPDX-License-Identifier: GPL-2.0
//
// Pod fast path: cross-node pod-to-pod TCP and UDP skip the node's IP stack.
//
//   from_pod  tc ingress of each pod's host-side veth. A packet for a pod on
//             another node is routed with bpf_fib_lookup (the node's own routes:
//             flannel.1 for VXLAN, the underlay for host-gw) and redirected to
//             that device: no cni0 bridge, no forwarding, no conntrack.
//   to_pod    tc ingress of flannel.1 (VXLAN) or the underlay (host-gw). A packet
//             for a pod of this node goes straight into the pod's namespace with
//             bpf_redirect_peer: no forwarding, no cni0, no veth backlog.
//
// Everything else takes the stack: other protocols, fragments, TTL 1, traffic
// to or from outside the cluster CIDR, and replies to flows the stack NATed on
// this node. The last is what keeps kube-proxy (ferry proxy) correct: a pod's
// packet to a ClusterIP, NodePort or external address goes through the stack,
// and from_pod records its source (address, port, protocol) in nat_guard;
// to_pod sends packets to a recorded source through the stack, where conntrack
// reverses the NAT.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

#define AF_INET 2

// The cluster CIDR and this node's pod subnet, addresses in network order.
struct fastpath_config {
	__u32 cluster_net;
	__u32 cluster_mask;
	__u32 node_net;
	__u32 node_mask;
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

struct flow {
	struct ethhdr *eth;
	struct iphdr *ip;
	__u16 sport;
	__u16 dport;
};

// An unfragmented IPv4 TCP or UDP packet with its ports, or 0.
static __always_inline int parse(struct __sk_buff *skb, struct flow *f)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);
	if ((void *)(ip + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return 0;
	if (ip->ihl < 5 || (ip->frag_off & bpf_htons(0x3fff)))
		return 0;
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return 0;
	__u16 ports[2];
	if (bpf_skb_load_bytes(skb, sizeof(*eth) + ip->ihl * 4, ports, sizeof(ports)))
		return 0;
	// bpf_skb_load_bytes may not move data, but the verifier forgets the
	// packet bounds across helper calls: check them again.
	data = (void *)(long)skb->data;
	end = (void *)(long)skb->data_end;
	f->eth = data;
	f->ip = data + sizeof(*eth);
	if ((void *)(f->ip + 1) > end)
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

SEC("classifier")
int from_pod(struct __sk_buff *skb)
{
	struct flow f;
	__u32 zero = 0;
	if (!parse(skb, &f))
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
		return TC_ACT_OK;
	}
	if ((daddr & cfg->node_mask) == cfg->node_net || f.ip->ttl <= 1)
		return TC_ACT_OK;

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
		decrease_ttl(f.ip);
		__builtin_memcpy(f.eth->h_dest, fib.dmac, ETH_ALEN);
		__builtin_memcpy(f.eth->h_source, fib.smac, ETH_ALEN);
		return bpf_redirect(fib.ifindex, 0);
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		// The kernel resolves the next hop's address and queues meanwhile.
		struct bpf_redir_neigh nh = {
			.nh_family = AF_INET, .ipv4_nh = fib.ipv4_dst,
		};
		decrease_ttl(f.ip);
		return bpf_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
	}
	return TC_ACT_OK;
}

SEC("classifier")
int to_pod(struct __sk_buff *skb)
{
	struct flow f;
	if (!parse(skb, &f))
		return TC_ACT_OK;
	__u32 daddr = f.ip->daddr;
	struct pod_endpoint *ep = bpf_map_lookup_elem(&pods, &daddr);
	if (!ep || f.ip->ttl <= 1)
		return TC_ACT_OK;
	struct guard_key k = {
		.addr = daddr, .port = f.dport, .protocol = f.ip->protocol,
	};
	if (bpf_map_lookup_elem(&nat_guard, &k))
		return TC_ACT_OK;
	decrease_ttl(f.ip);
	__builtin_memcpy(f.eth->h_dest, ep->pod_mac, ETH_ALEN);
	__builtin_memcpy(f.eth->h_source, ep->gateway_mac, ETH_ALEN);
	return bpf_redirect_peer(ep->host_ifindex, 0);
}
