//go:build ignore

// netpol enforces L3/L4 NetworkPolicy on the host side of a pod's veth.
//
//   kebpf_np_from  tcx ingress of the host-side veth = traffic FROM the pod
//                  (the pod's egress, DIR_EGRESS)
//   kebpf_np_to    tcx egress of the host-side veth  = traffic TO the pod
//                  (the pod's ingress, DIR_INGRESS)
//
// Per packet: one hash lookup for the endpoint (by ifindex) and one for the
// flow in kebpf_np_ct. Only a packet without a flow entry pays for a verdict:
// host-IP check, one LPM lookup in kebpf_np_pol and a bounded rule scan.
//
// Conntrack keys are canonical (lower (addr, port) first), so both
// directions of a flow hit the same entry with a single lookup, and an ICMP
// error finds the flow it reports from its embedded header the same way.
//
// Policy entries come in two generations per endpoint. User space writes the
// inactive one, flips ep_val.gen (one hash update, atomic for readers), and
// deletes the old generation shortest prefix first; a packet that read the
// old gen therefore finds either its correct old longest match or nothing,
// and on nothing it re-reads the endpoint and retries with the new gen.
//
// Policy changes and established flows: every apply bumps ep_val.rev; a flow
// entry remembers the rev its verdict was made under, and the first packet
// of the flow after a change re-evaluates the flow's original packet against
// the new policy. Still allowed: the entry is refreshed. Now denied: the
// entry is deleted and the packet (and every later one) dropped. So a change
// that denies a flow cuts established connections too, within one packet.
//
// L7 steering (bpf/sockmap; the maps of ../include/l7_shared.h are shared):
// a steered connection reaches the node-local Envoy (a node address, always
// allowed) instead of the pod, and Envoy's upstream leg comes from a node
// address too, pooled across clients. So L7 must never widen L3/L4:
//
//   kebpf_np_from  a client's SYN to a node address whose Envoy end is in
//                  kebpf_l7_orig is judged as client -> ORIGINAL destination
//                  pod:port: the client's egress policy, then the
//                  destination endpoint's ingress policy (found by pod IP in
//                  kebpf_np_ip). Either denies: dropped, as a direct SYN
//                  would have been.
//   kebpf_np_to    a SYN to a pod IP:port in kebpf_l7_dst must come from
//                  Envoy: a socket whose cgroup or an ancestor is in
//                  kebpf_l7_envcg (skb->sk is still the sending socket at
//                  tcx egress of the host-side veth for node-local senders;
//                  packets forwarded from another netns have none). Any
//                  other SYN is dropped (REASON_L7_BYPASS).
//
// Both checks run on every connection-opening SYN (SYN without ACK/RST),
// enforced endpoint or not, before conntrack; the rest of the handshake and
// the payload (which sk_msg moves socket to socket) are not re-judged.
//
// Pass is TC_ACT_UNSPEC (= TCX_NEXT): the next program of the chain (the
// CNI's own, if any) still runs. Drop is TC_ACT_SHOT.

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "../include/l7_shared.h" // kebpf_l7_{dst,envcg,orig,active}, FAM4/FAM6

#define PASS TC_ACT_UNSPEC
#define DROP TC_ACT_SHOT

// Directions relative to the pod; keep in sync with Ingress/Egress in datapath.go.
#define DIR_INGRESS 0
#define DIR_EGRESS 1

// ep_val.flags: the direction is enforced (some policy selects the pod).
#define EP_F_INGRESS (1 << DIR_INGRESS)
#define EP_F_EGRESS (1 << DIR_EGRESS)

#define MAX_RULES 16      // MaxRulesPerPrefix in datapath.go
#define MAX_EP_IPS 4      // MaxEndpointIPs in netpol.go
#define MAX_V6_EXT 6      // IPv6 extension headers skipped before giving up (drop)
#define RULE_NONE 0xffff  // rule index of verdicts no rule made

#define PROTO_ICMP 1
#define PROTO_TCP 6
#define PROTO_UDP 17
#define PROTO_ICMP6 58
#define PROTO_SCTP 132

#define ETH_HLEN 14
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define ETH_P_8021Q 0x8100
#define ETH_P_8021AD 0x88A8

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10


// Verdicts and reasons; keep in sync with Verdict*/Reason* in netpol.go.
#define VERDICT_ALLOW 1
#define VERDICT_DENY 2
#define REASON_POLICY 0       // a rule (policy_id, rule) allowed it
#define REASON_DEFAULT_DENY 1 // no rule allowed it
#define REASON_NOT_ENFORCED 2 // no policy selects the pod in this direction
#define REASON_HOST 3         // peer is a node address
#define REASON_REVOKED 4      // established flow denied after a policy change
#define REASON_RELATED 5      // ICMP error of a tracked flow
#define REASON_L7_BYPASS 6    // SYN to a steered pod:port not from Envoy

// Slots of kebpf_np_l7; keep in sync with L7Counters in counters.go.
#define L7_ALLOWED 0      // steered client SYNs allowed on the original pair
#define L7_DENY_EGRESS 1  // ... denied by the client's egress policy
#define L7_DENY_INGRESS 2 // ... denied by the destination's ingress policy
#define L7_ENVOY 3        // SYNs from Envoy to a steered pod:port (judged as usual)
#define L7_BYPASS 4       // SYNs to a steered pod:port not from Envoy (dropped)
#define L7_MAX 5

// Result of the L7 checks meaning "not theirs to decide": go on.
#define L7_NEXT 100

// Seconds between two events/verdict-map writes for the same untracked
// (denied or host) flow, so a flood of denied packets is one event a second.
#define EVENT_INTERVAL_NS 1000000000ULL
// last_seen is only rewritten when it is this stale: timeouts are >= 1s.
#define TOUCH_INTERVAL_NS 1000000000ULL

// Conntrack timeouts, overridden from LoadOptions before load.
volatile const __u64 ct_tcp_syn_ns = 60ULL * 1000000000ULL;      // SYN seen, no reply yet
volatile const __u64 ct_tcp_est_ns = 21600ULL * 1000000000ULL;   // established (6h)
volatile const __u64 ct_tcp_close_ns = 10ULL * 1000000000ULL;    // RST or FIN both ways
volatile const __u64 ct_udp_ns = 60ULL * 1000000000ULL;          // UDP, refreshed per packet
volatile const __u64 ct_sctp_ns = 60ULL * 1000000000ULL;         // SCTP (no chunk state)
volatile const __u64 ct_icmp_ns = 30ULL * 1000000000ULL;         // ICMP echo by id
volatile const __u64 ct_other_ns = 60ULL * 1000000000ULL;        // any other IP protocol

struct ep_val {
	__u32 id;                  // endpoint id (agent-assigned, never 0)
	__u32 rev;                 // policy revision, bumped by every apply
	__u32 deny_policy;         // policy reported for default-deny verdicts
	__u8 flags;                // EP_F_INGRESS | EP_F_EGRESS
	__u8 gen;                  // active generation of kebpf_np_pol entries (0/1)
	__u8 nips;                 // used slots of ips (readback only)
	__u8 pad;                  // zero
	__u8 ip_fam[MAX_EP_IPS];   // FAM4/FAM6 of ips[i] (readback only)
	__u8 ips[MAX_EP_IPS][16];  // pod addresses, v4 in the first 4 bytes (readback only)
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);     // one entry per local pod with our programs
	__uint(max_entries, 4096);           // LoadOptions.MaxEndpoints
	__type(key, __u32);                  // host-side ifindex
	__type(value, struct ep_val);        // endpoint state
	__uint(pinning, LIBBPF_PIN_BY_NAME); // survives agent restarts under <pinDir>/maps
} kebpf_np_ep SEC(".maps");

struct pol_key {
	__u32 prefixlen; // LPM bits after this field: 64 + address prefix length
	__u32 ep_id;     // endpoint id
	__u8 dir;        // DIR_INGRESS / DIR_EGRESS
	__u8 gen;        // generation (ep_val.gen selects the live one)
	__u8 family;     // FAM4 / FAM6
	__u8 pad;        // zero (inside the matched prefix)
	__u8 addr[16];   // peer prefix, v4 in the first 4 bytes
};

struct rule {
	__u32 policy_id; // policy that owns the rule (attribution)
	__u16 port_lo;   // first port, host order; lo == hi == 0: every port
	__u16 port_hi;   // last port, host order (endPort)
	__u16 idx;       // index of the ingress/egress rule in its policy
	__u8 proto;      // IP protocol, 0 = every protocol
	__u8 pad;        // zero
};

struct pol_val {
	__u32 n;                       // used rules; 0 = deny (ipBlock except)
	struct rule rules[MAX_RULES];  // first match allows
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE); // longest prefix of (endpoint, dir, gen, peer)
	__uint(max_entries, 65536);          // LoadOptions.MaxPolicyEntries (both gens together)
	__uint(map_flags, BPF_F_NO_PREALLOC); // required for LPM tries
	__type(key, struct pol_key);         // see struct pol_key
	__type(value, struct pol_val);       // port rules of the prefix
	__uint(pinning, LIBBPF_PIN_BY_NAME); // survives agent restarts
} kebpf_np_pol SEC(".maps");

struct ct_key {
	__u32 ep_id;  // endpoint the entry belongs to (each side of a pod-pod flow has one)
	__u8 proto;   // IP protocol
	__u8 family;  // FAM4 / FAM6
	__u16 pad;    // zero
	__u32 a[4];   // lower (address, port) side of the flow, v4 in a[0]
	__u32 b[4];   // higher side
	__u16 pa;     // port of a, network order (ICMP echo: id)
	__u16 pb;     // port of b, network order (ICMP echo: id)
};

// The state bits are separate bytes, not one flags word: both directions of a
// flow may update them on different CPUs at once, and a byte store cannot
// lose the other side's bit (atomic or needs -mcpu=v3).
struct ct_val {
	__u64 last_seen;  // bpf_ktime_get_ns of the last packet (1s granularity)
	__u32 policy_id;  // policy that allowed the flow (0: not enforced)
	__u32 rev;        // ep_val.rev the verdict was made under
	__u16 rule;       // rule index, RULE_NONE if no rule decided
	__u8 orig_dir;    // direction of the flow's first packet
	__u8 orig_a;      // 1: the originator is side a of the key
	__u8 seen_reply;  // 1: a packet of the reply direction passed
	__u8 fin_orig;    // 1: originator sent FIN
	__u8 fin_reply;   // 1: responder sent FIN
	__u8 rst;         // 1: either side sent RST
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH); // LRU: a full table evicts the oldest flows
	__uint(max_entries, 262144);         // LoadOptions.MaxCT
	__type(key, struct ct_key);          // canonical 5-tuple per endpoint
	__type(value, struct ct_val);        // flow state
	__uint(pinning, LIBBPF_PIN_BY_NAME); // restarts drop no flow
} kebpf_np_ct SEC(".maps");

struct addr_key {
	__u8 family;  // FAM4 / FAM6
	__u8 pad[3];  // zero
	__u32 addr[4]; // address, v4 in addr[0]
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);     // node addresses
	__uint(max_entries, 256);            // addresses of one node
	__type(key, struct addr_key);        // family + node address
	__type(value, __u8);                 // 1
	__uint(pinning, LIBBPF_PIN_BY_NAME); // survives agent restarts
} kebpf_np_host SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);     // local pod addresses (EndpointPolicy.IPs)
	__uint(max_entries, 16384);          // LoadOptions.MaxEndpoints * MAX_EP_IPS
	__type(key, struct addr_key);        // family + pod address
	__type(value, __u32);                // host-side ifindex (key of kebpf_np_ep)
	__uint(pinning, LIBBPF_PIN_BY_NAME); // survives agent restarts
} kebpf_np_ip SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY); // L7 steering checks, node-wide
	__uint(max_entries, L7_MAX);
	__type(key, __u32);                  // L7_* slot
	__type(value, __u64);                // this CPU's count
	__uint(pinning, LIBBPF_PIN_BY_NAME); // counters survive restarts
} kebpf_np_l7 SEC(".maps");

struct ep_counters {
	__u64 allow[2]; // packets passed, by direction
	__u64 deny[2];  // packets dropped, by direction
	__u64 flows[2]; // new flows allowed (conntrack entries created), by direction
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH); // per-CPU: no atomics on the hot path
	__uint(max_entries, 4096);              // LoadOptions.MaxEndpoints
	__type(key, __u32);                     // endpoint id
	__type(value, struct ep_counters);      // this CPU's counts
	__uint(pinning, LIBBPF_PIN_BY_NAME);    // counters survive restarts
} kebpf_np_cnt SEC(".maps");

struct verdict_val {
	__u64 ts;        // bpf_ktime_get_ns of the decision
	__u32 policy_id; // deciding policy (0: none)
	__u16 rule;      // deciding rule index, RULE_NONE if none
	__u8 verdict;    // VERDICT_ALLOW / VERDICT_DENY
	__u8 reason;     // REASON_*
	__u8 dir;        // direction of the decided packet
	__u8 pad[7];     // zero
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH); // last decision per flow, for trace/debug
	__uint(max_entries, 65536);          // LoadOptions.MaxVerdicts
	__type(key, struct ct_key);          // same canonical tuple as conntrack
	__type(value, struct verdict_val);   // the decision
	__uint(pinning, LIBBPF_PIN_BY_NAME); // survives agent restarts
} kebpf_np_verd SEC(".maps");

// One record per new-flow verdict (rate-limited per untracked flow).
struct event {
	__u64 ts;        // bpf_ktime_get_ns
	__u32 ep_id;     // endpoint
	__u32 policy_id; // deciding policy (0: none)
	__u16 rule;      // deciding rule, RULE_NONE if none
	__u8 verdict;    // VERDICT_*
	__u8 reason;     // REASON_*
	__u8 dir;        // DIR_*
	__u8 proto;      // IP protocol
	__u8 family;     // FAM4 / FAM6
	__u8 pad;        // zero
	__u16 sport;     // network order
	__u16 dport;     // network order
	__u32 saddr[4];  // packet source, v4 in saddr[0]
	__u32 daddr[4];  // packet destination
	__u32 pad2;      // zero; keeps the record at 64 bytes with no hidden padding
}; // 64 bytes

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF); // verdict events for `kubectl ebpf trace`
	__uint(max_entries, 1 << 18);       // bytes; LoadOptions.EventsBytes
	__uint(pinning, LIBBPF_PIN_BY_NAME); // a restarted agent keeps reading
} kebpf_np_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY); // per-CPU: no atomics on the drop path
	__uint(max_entries, 1);                  // one counter
	__type(key, __u32);                      // 0
	__type(value, __u64);                    // events kebpf_np_events had no room for
	__uint(pinning, LIBBPF_PIN_BY_NAME);     // the count outlives agents; readers diff it
} kebpf_np_lost SEC(".maps");

// Result of parsing one packet.
struct pkt {
	__u32 saddr[4];
	__u32 daddr[4];
	__u16 sport;     // network order; ICMP echo: id
	__u16 dport;     // network order; ICMP echo: id
	__u8 family;
	__u8 proto;
	__u8 has_ports;  // TCP/UDP/SCTP: dport is meaningful for rules
	__u8 tcp_flags;
	__u8 icmp_err;   // ICMP error: inner holds the reported flow
	__u8 inner_ok;   // inner parsed
	__u16 pad;
	// Inner tuple of an ICMP error (the packet that caused it).
	__u32 isaddr[4];
	__u32 idaddr[4];
	__u16 isport;
	__u16 idport;
	__u8 iproto;
	__u8 ipad[3];
};

enum parse_res {
	PARSE_OK = 0,
	PARSE_PASS,  // not for policy: non-IP, NDP/MLD, non-first fragment
	PARSE_DROP,  // IP claimed but malformed or truncated
};

struct decision {
	__u32 policy_id;
	__u16 rule;
	__u8 verdict;
	__u8 reason;
};

// Ports of an inner (ICMP-embedded) L4 header; returns 0 when known.
static __always_inline int inner_l4(struct __sk_buff *skb, __u32 off, __u8 proto, struct pkt *p)
{
	__u8 b[8];

	switch (proto) {
	case PROTO_TCP:
	case PROTO_UDP:
	case PROTO_SCTP:
		if (bpf_skb_load_bytes(skb, off, b, 4))
			return -1;
		__builtin_memcpy(&p->isport, &b[0], 2);
		__builtin_memcpy(&p->idport, &b[2], 2);
		return 0;
	case PROTO_ICMP:
	case PROTO_ICMP6:
		if (bpf_skb_load_bytes(skb, off, b, 8))
			return -1;
		__builtin_memcpy(&p->isport, &b[4], 2);
		p->idport = p->isport;
		return 0;
	}
	return -1;
}

// The header an ICMP error embeds; only the fixed header (v6: no extension
// headers), which is all a real error needs to name a TCP/UDP/SCTP/echo flow.
static __always_inline void parse_inner(struct __sk_buff *skb, __u32 off, __u8 family, struct pkt *p)
{
	__u8 h[40];

	if (family == FAM4) {
		if (bpf_skb_load_bytes(skb, off, h, 20))
			return;
		if ((h[0] >> 4) != 4 || (h[0] & 0xf) < 5)
			return;
		p->iproto = h[9];
		__builtin_memcpy(&p->isaddr[0], &h[12], 4);
		__builtin_memcpy(&p->idaddr[0], &h[16], 4);
		if (inner_l4(skb, off + (h[0] & 0xf) * 4, p->iproto, p) == 0)
			p->inner_ok = 1;
		return;
	}
	if (bpf_skb_load_bytes(skb, off, h, 40))
		return;
	if ((h[0] >> 4) != 6)
		return;
	p->iproto = h[6];
	__builtin_memcpy(p->isaddr, &h[8], 16);
	__builtin_memcpy(p->idaddr, &h[24], 16);
	if (inner_l4(skb, off + 40, p->iproto, p) == 0)
		p->inner_ok = 1;
}

static __always_inline int icmp4_is_err(__u8 type)
{
	return type == 3 || type == 11 || type == 12; // unreach, time exceeded, param problem
}

static __always_inline int icmp6_is_err(__u8 type)
{
	return type >= 1 && type <= 4; // unreach, too big, time exceeded, param problem
}

// ICMPv6 that IPv6 itself needs on the link (MLD, router/neighbour discovery).
static __always_inline int icmp6_is_link(__u8 type)
{
	return (type >= 130 && type <= 137) || type == 143;
}

// L4 after the IP header(s). limit is the end of the IP payload (0: unknown).
static __always_inline int parse_l4(struct __sk_buff *skb, __u32 off, __u32 limit, struct pkt *p)
{
	__u8 b[20];

	switch (p->proto) {
	case PROTO_TCP:
		// A full minimal header: a "tiny" first fragment or a truncated
		// header must not be classified by whatever ports it might carry.
		if ((limit && off + 20 > limit) || bpf_skb_load_bytes(skb, off, b, 20))
			return PARSE_DROP;
		if ((b[12] >> 4) < 5)
			return PARSE_DROP;
		p->tcp_flags = b[13];
		break;
	case PROTO_UDP:
		if ((limit && off + 8 > limit) || bpf_skb_load_bytes(skb, off, b, 8))
			return PARSE_DROP;
		break;
	case PROTO_SCTP:
		if ((limit && off + 12 > limit) || bpf_skb_load_bytes(skb, off, b, 12))
			return PARSE_DROP;
		break;
	case PROTO_ICMP:
	case PROTO_ICMP6:
		if ((limit && off + 8 > limit) || bpf_skb_load_bytes(skb, off, b, 8))
			return PARSE_DROP;
		if (p->proto == PROTO_ICMP6 && p->family == FAM6 && icmp6_is_link(b[0]))
			return PARSE_PASS;
		if ((p->proto == PROTO_ICMP && icmp4_is_err(b[0])) ||
		    (p->proto == PROTO_ICMP6 && icmp6_is_err(b[0]))) {
			p->icmp_err = 1;
			parse_inner(skb, off + 8, p->family, p);
			return PARSE_OK;
		}
		// Echo request/reply (and the rare others) are a flow keyed by id.
		__builtin_memcpy(&p->sport, &b[4], 2);
		p->dport = p->sport;
		return PARSE_OK;
	default:
		// No ports: only "every port" rules can match.
		return PARSE_OK;
	}
	__builtin_memcpy(&p->sport, &b[0], 2);
	__builtin_memcpy(&p->dport, &b[2], 2);
	p->has_ports = 1;
	return PARSE_OK;
}

static __always_inline int parse(struct __sk_buff *skb, struct pkt *p)
{
	__u8 eth[ETH_HLEN];
	__u8 h[40];
	__u16 proto;

	// prog.Run and the stack never hand us less than an Ethernet header;
	// if it ever happens there is no ethertype claiming IP.
	if (bpf_skb_load_bytes(skb, 0, eth, ETH_HLEN))
		return PARSE_PASS;
	proto = ((__u16)eth[12] << 8) | eth[13];

	switch (proto) {
	case ETH_P_IP: {
		__u32 ihl, tot, frag;

		if (bpf_skb_load_bytes(skb, ETH_HLEN, h, 20))
			return PARSE_DROP;
		ihl = (h[0] & 0xf) * 4;
		if ((h[0] >> 4) != 4 || ihl < 20)
			return PARSE_DROP;
		tot = ((__u32)h[2] << 8) | h[3];
		// tot_len 0 is legal for BIG TCP GSO packets; otherwise it must
		// cover the header, and bounds the L4 header.
		if (tot && tot < ihl)
			return PARSE_DROP;
		// Options must be present in full, like the kernel checks.
		if (ihl > 20 && bpf_skb_load_bytes(skb, ETH_HLEN + ihl - 1, h + 20, 1))
			return PARSE_DROP;
		p->family = FAM4;
		p->proto = h[9];
		__builtin_memcpy(&p->saddr[0], &h[12], 4);
		__builtin_memcpy(&p->daddr[0], &h[16], 4);
		frag = (((__u32)h[6] << 8) | h[7]) & 0x1fff;
		// Non-first fragment: no ports to classify. The first fragment got
		// the flow's verdict; if it was dropped the datagram can never be
		// reassembled (Linux also discards overlapping fragments), so
		// passing the rest cannot deliver a denied datagram.
		if (frag)
			return PARSE_PASS;
		return parse_l4(skb, ETH_HLEN + ihl, tot ? ETH_HLEN + tot : 0, p);
	}
	case ETH_P_IPV6: {
		__u32 off = ETH_HLEN + 40, limit;
		__u8 nh;
		__u8 x[8];

		if (bpf_skb_load_bytes(skb, ETH_HLEN, h, 40))
			return PARSE_DROP;
		if ((h[0] >> 4) != 6)
			return PARSE_DROP;
		limit = ((__u32)h[4] << 8) | h[5];
		// payload_len 0: jumbogram / BIG TCP, length unknown.
		limit = limit ? off + limit : 0;
		p->family = FAM6;
		__builtin_memcpy(p->saddr, &h[8], 16);
		__builtin_memcpy(p->daddr, &h[24], 16);
		nh = h[6];
#pragma unroll
		for (int i = 0; i < MAX_V6_EXT; i++) {
			switch (nh) {
			case 0:  // hop-by-hop
			case 43: // routing
			case 60: // destination options
				if (bpf_skb_load_bytes(skb, off, x, 2))
					return PARSE_DROP;
				nh = x[0];
				off += ((__u32)x[1] + 1) * 8;
				continue;
			case 51: // AH
				if (bpf_skb_load_bytes(skb, off, x, 2))
					return PARSE_DROP;
				nh = x[0];
				off += ((__u32)x[1] + 2) * 4;
				continue;
			case 44: // fragment
				if (bpf_skb_load_bytes(skb, off, x, 8))
					return PARSE_DROP;
				nh = x[0];
				off += 8;
				// Non-first fragment: see IPv4.
				if ((((__u16)x[2] << 8) | x[3]) & 0xfff8)
					return PARSE_PASS;
				continue;
			}
			break;
		}
		// Still an extension header after MAX_V6_EXT: we cannot see the
		// transport, so we cannot classify it.
		if (nh == 0 || nh == 43 || nh == 60 || nh == 51 || nh == 44)
			return PARSE_DROP;
		if (limit && off > limit)
			return PARSE_DROP;
		p->proto = nh;
		return parse_l4(skb, off, limit, p);
	}
	case ETH_P_8021Q:
	case ETH_P_8021AD:
		// A tagged frame could carry IP past us on a bridge; pods have no
		// business sending them, so enforced endpoints drop them.
		return PARSE_DROP;
	}
	// ARP and every other non-IP protocol.
	return PARSE_PASS;
}

static __always_inline int tuple_lt(const __u32 *a, __u16 pa, const __u32 *b, __u16 pb)
{
#pragma unroll
	for (int i = 0; i < 4; i++) {
		if (a[i] != b[i])
			return a[i] < b[i];
	}
	return pa < pb;
}

// Fills the canonical key of (s, sp) -> (d, dp); returns 1 when s is side a.
static __always_inline int ct_key_of(struct ct_key *k, __u32 ep, __u8 family, __u8 proto,
				     const __u32 *s, __u16 sp, const __u32 *d, __u16 dp)
{
	int s_is_a = !tuple_lt(d, dp, s, sp);

	k->ep_id = ep;
	k->proto = proto;
	k->family = family;
	k->pad = 0;
	if (s_is_a) {
		__builtin_memcpy(k->a, s, 16);
		__builtin_memcpy(k->b, d, 16);
		k->pa = sp;
		k->pb = dp;
	} else {
		__builtin_memcpy(k->a, d, 16);
		__builtin_memcpy(k->b, s, 16);
		k->pa = dp;
		k->pb = sp;
	}
	return s_is_a;
}

static __always_inline int addr_eq(const __u32 *a, const __u32 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

static __always_inline int is_host(__u8 family, const __u32 *addr)
{
	struct addr_key hk = {};

	hk.family = family;
	__builtin_memcpy(hk.addr, addr, 16);
	return bpf_map_lookup_elem(&kebpf_np_host, &hk) != NULL;
}

// The host-side ifindex of the local pod with address addr, 0 if none.
static __always_inline __u32 pod_ifindex(__u8 family, const __u32 *addr)
{
	struct addr_key k = {};
	__u32 *ifindex;

	k.family = family;
	__builtin_memcpy(k.addr, addr, 16);
	ifindex = bpf_map_lookup_elem(&kebpf_np_ip, &k);
	return ifindex ? *ifindex : 0;
}

// The verdict policy gives a new packet of ep going dir to/from peer.
static __always_inline void evaluate(__u32 ifindex, struct ep_val *ep, __u8 dir, __u8 family,
				     const __u32 *peer, __u8 proto, __u8 has_ports, __u16 dport,
				     struct decision *d)
{
	struct pol_key k = {};
	struct pol_val *v;
	__u16 port = bpf_ntohs(dport);

	d->policy_id = 0;
	d->rule = RULE_NONE;
	if (!(ep->flags & (1 << dir))) {
		d->verdict = VERDICT_ALLOW;
		d->reason = REASON_NOT_ENFORCED;
		return;
	}

	k.prefixlen = 64 + (family == FAM4 ? 32 : 128);
	k.ep_id = ep->id;
	k.dir = dir;
	k.gen = ep->gen;
	k.family = family;
	__builtin_memcpy(k.addr, peer, 16);
	v = bpf_map_lookup_elem(&kebpf_np_pol, &k);
	if (!v) {
		// User space may have flipped the generation and be deleting the
		// one we read: look again with the live one.
		struct ep_val *now = bpf_map_lookup_elem(&kebpf_np_ep, &ifindex);

		if (now && now->gen != k.gen && now->id == k.ep_id) {
			k.gen = now->gen;
			v = bpf_map_lookup_elem(&kebpf_np_pol, &k);
		}
	}
	if (v) {
		__u32 n = v->n;

#pragma unroll
		for (int i = 0; i < MAX_RULES; i++) {
			struct rule *r = &v->rules[i];

			if (i >= n)
				break;
			if (r->proto && r->proto != proto)
				continue;
			if (r->port_lo || r->port_hi) {
				if (!has_ports || port < r->port_lo || port > r->port_hi)
					continue;
			}
			d->verdict = VERDICT_ALLOW;
			d->reason = REASON_POLICY;
			d->policy_id = r->policy_id;
			d->rule = r->idx;
			return;
		}
	}
	d->verdict = VERDICT_DENY;
	d->reason = REASON_DEFAULT_DENY;
	d->policy_id = ep->deny_policy;
}

static __always_inline void count(__u32 ep, __u8 dir, int allow, int new_flow)
{
	struct ep_counters *c = bpf_map_lookup_elem(&kebpf_np_cnt, &ep);

	if (!c) {
		struct ep_counters zero = {};

		bpf_map_update_elem(&kebpf_np_cnt, &ep, &zero, BPF_NOEXIST);
		c = bpf_map_lookup_elem(&kebpf_np_cnt, &ep);
		if (!c)
			return;
	}
	dir &= 1;
	if (allow)
		c->allow[dir]++;
	else
		c->deny[dir]++;
	if (new_flow)
		c->flows[dir]++;
}

// Records a decision in kebpf_np_verd and kebpf_np_events, at most once a
// second for the same flow and outcome (untracked flows decide per packet).
static __always_inline void record(struct ct_key *k, __u8 dir, struct pkt *p, struct decision *d, __u64 now)
{
	struct verdict_val *old = bpf_map_lookup_elem(&kebpf_np_verd, k);
	struct verdict_val vv = {};
	struct event *e;

	if (old && old->verdict == d->verdict && old->reason == d->reason &&
	    old->policy_id == d->policy_id && old->dir == dir && now - old->ts < EVENT_INTERVAL_NS)
		return;
	vv.ts = now;
	vv.policy_id = d->policy_id;
	vv.rule = d->rule;
	vv.verdict = d->verdict;
	vv.reason = d->reason;
	vv.dir = dir;
	bpf_map_update_elem(&kebpf_np_verd, k, &vv, BPF_ANY);

	e = bpf_ringbuf_reserve(&kebpf_np_events, sizeof(*e), 0);
	if (!e) {
		// The reader is behind: count it, so the trace can say so.
		__u32 zero = 0;
		__u64 *lost = bpf_map_lookup_elem(&kebpf_np_lost, &zero);

		if (lost)
			(*lost)++;
		return;
	}
	e->ts = now;
	e->ep_id = k->ep_id;
	e->policy_id = d->policy_id;
	e->rule = d->rule;
	e->verdict = d->verdict;
	e->reason = d->reason;
	e->dir = dir;
	e->proto = p->proto;
	e->family = p->family;
	e->pad = 0;
	e->pad2 = 0;
	e->sport = p->sport;
	e->dport = p->dport;
	__builtin_memcpy(e->saddr, p->saddr, 16);
	__builtin_memcpy(e->daddr, p->daddr, 16);
	bpf_ringbuf_submit(e, 0);
}

static __always_inline int ct_closed(const struct ct_val *ct)
{
	return ct->rst || (ct->fin_orig && ct->fin_reply);
}

static __always_inline __u64 ct_timeout(__u8 proto, const struct ct_val *ct)
{
	switch (proto) {
	case PROTO_TCP:
		if (ct_closed(ct))
			return ct_tcp_close_ns;
		if (!ct->seen_reply)
			return ct_tcp_syn_ns;
		return ct_tcp_est_ns;
	case PROTO_UDP:
		return ct_udp_ns;
	case PROTO_SCTP:
		return ct_sctp_ns;
	case PROTO_ICMP:
	case PROTO_ICMP6:
		return ct_icmp_ns;
	}
	return ct_other_ns;
}

static __always_inline void l7_count(__u32 slot)
{
	__u64 *v = bpf_map_lookup_elem(&kebpf_np_l7, &slot);

	if (v)
		*v += 1;
}

// Records and counts a decision about the pair p names, for endpoint ep_id
// going dir; returns the packet's fate.
static __always_inline int l7_decide(struct pkt *p, __u32 ep_id, __u8 dir, struct decision *d,
				     __u32 deny_slot, __u64 now)
{
	struct ct_key k = {};

	ct_key_of(&k, ep_id, p->family, p->proto, p->saddr, p->sport, p->daddr, p->dport);
	record(&k, dir, p, d, now);
	if (d->verdict == VERDICT_ALLOW)
		return PASS;
	count(ep_id, dir, 0, 0);
	l7_count(deny_slot);
	return DROP;
}

// A client pod's SYN (kebpf_np_from) to a node address: if bpf/sockmap
// steered it to Envoy, judge it as client -> original destination pod:port
// on both ends' policies, so L7 never widens L3/L4. p is rewritten to the
// original pair, which events and the verdict map then name.
static __always_inline int l7_client_syn(__u32 ifindex, struct ep_val *ep, struct pkt *p, __u64 now)
{
	struct l7_tuple t = {};
	struct l7_dst *orig;
	struct ep_val *dep;
	struct decision d;
	__u32 difindex;

	if (!is_host(p->family, p->daddr))
		return L7_NEXT;
	// Envoy's accepted socket sees {local Envoy, remote client}.
	__builtin_memcpy(t.local, p->daddr, 16);
	__builtin_memcpy(t.remote, p->saddr, 16);
	t.local_port = bpf_ntohs(p->dport);
	t.remote_port = bpf_ntohs(p->sport);
	t.family = p->family;
	orig = bpf_map_lookup_elem(&kebpf_l7_orig, &t);
	if (!orig)
		return L7_NEXT;
	__builtin_memcpy(p->daddr, orig->addr, 16);
	p->dport = orig->port;

	evaluate(ifindex, ep, DIR_EGRESS, p->family, p->daddr, p->proto, 1, p->dport, &d);
	if (l7_decide(p, ep->id, DIR_EGRESS, &d, L7_DENY_EGRESS, now) == DROP)
		return DROP;
	// The agent steers local destinations only. A destination that is no
	// endpoint here has no ingress program, so a direct SYN would not be
	// judged for it either.
	difindex = pod_ifindex(p->family, p->daddr);
	dep = difindex ? bpf_map_lookup_elem(&kebpf_np_ep, &difindex) : NULL;
	if (dep) {
		evaluate(difindex, dep, DIR_INGRESS, p->family, p->saddr, p->proto, 1, p->dport, &d);
		if (l7_decide(p, dep->id, DIR_INGRESS, &d, L7_DENY_INGRESS, now) == DROP)
			return DROP;
	}
	count(ep->id, DIR_EGRESS, 1, 0);
	l7_count(L7_ALLOWED);
	return PASS;
}

#define SKB_ANCESTOR_CG(level) bpf_skb_ancestor_cgroup_id(skb, level)

// A SYN to a pod (kebpf_np_to) whose IP:port bpf/sockmap steers: only Envoy
// may open it. Envoy is hostNetwork, so its packets reach the pod's veth
// with skb->sk still the sending socket; a packet forwarded from another
// netns has lost its socket and so is never Envoy's.
static __always_inline int l7_syn_to_pod(struct __sk_buff *skb, struct ep_val *ep, struct pkt *p, __u64 now)
{
	struct l7_dst dst = {};
	struct decision d;
	__u32 *flags;

	__builtin_memcpy(dst.addr, p->daddr, 16);
	dst.port = p->dport;
	dst.family = p->family;
	flags = bpf_map_lookup_elem(&kebpf_l7_dst, &dst);
	if (!flags || !(*flags & DST_STEER))
		return L7_NEXT;
	if (l7_envoy_cg(bpf_skb_cgroup_id(skb), SKB_ANCESTOR_CG)) {
		l7_count(L7_ENVOY);
		return L7_NEXT;
	}
	d.verdict = VERDICT_DENY;
	d.reason = REASON_L7_BYPASS;
	d.policy_id = 0;
	d.rule = RULE_NONE;
	return l7_decide(p, ep->id, DIR_INGRESS, &d, L7_BYPASS, now);
}

static __always_inline int handle(struct __sk_buff *skb, __u8 dir)
{
	__u32 ifindex = skb->ifindex;
	struct ep_val *ep;
	struct pkt p = {};
	struct ct_key k = {};
	struct ct_val *ct;
	struct decision d;
	__u64 now;
	int s_is_a, r, enforced;
	const __u32 *peer;

	ep = bpf_map_lookup_elem(&kebpf_np_ep, &ifindex);
	if (!ep)
		return PASS;
	// Endpoints no policy selects are parsed too while steering is active:
	// the L7 checks below protect every pod (parse errors there are not
	// ours to drop). Without steering they pass after this lookup.
	enforced = ep->flags & (EP_F_INGRESS | EP_F_EGRESS);
	if (!enforced && !l7_active())
		return PASS;

	r = parse(skb, &p);
	if (r == PARSE_PASS)
		return PASS;
	if (r == PARSE_DROP) {
		if (!enforced)
			return PASS;
		count(ep->id, dir, 0, 0);
		return DROP;
	}

	now = bpf_ktime_get_ns();
	if (p.proto == PROTO_TCP && (p.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST)) == TCP_SYN) {
		r = dir == DIR_EGRESS ? l7_client_syn(ifindex, ep, &p, now) : l7_syn_to_pod(skb, ep, &p, now);
		if (r != L7_NEXT)
			return r;
	}
	if (!enforced)
		return PASS;

	s_is_a = ct_key_of(&k, ep->id, p.family, p.proto, p.saddr, p.sport, p.daddr, p.dport);
	ct = p.icmp_err ? NULL : bpf_map_lookup_elem(&kebpf_np_ct, &k);
	if (ct) {
		int orig = ct->orig_dir == dir;

		if (now - ct->last_seen > ct_timeout(p.proto, ct) ||
		    (p.proto == PROTO_TCP && ct_closed(ct) &&
		     (p.tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN)) {
			// Expired, or a new connection reusing a closed tuple.
			bpf_map_delete_elem(&kebpf_np_ct, &k);
			goto new_flow;
		}
		if (ct->rev != ep->rev) {
			// Policy changed since the verdict: judge the flow's original
			// packet again (see the header comment).
			const __u32 *orig_peer;
			__u16 orig_dport;

			// The originator is side a iff orig_a; its peer is the other side.
			if (ct->orig_dir == DIR_EGRESS)
				orig_peer = ct->orig_a ? k.b : k.a;
			else
				orig_peer = ct->orig_a ? k.a : k.b;
			orig_dport = ct->orig_a ? k.pb : k.pa;
			evaluate(ifindex, ep, ct->orig_dir, p.family, orig_peer, p.proto,
				 p.has_ports, orig_dport, &d);
			if (d.verdict != VERDICT_ALLOW) {
				bpf_map_delete_elem(&kebpf_np_ct, &k);
				d.reason = REASON_REVOKED;
				record(&k, dir, &p, &d, now);
				count(ep->id, dir, 0, 0);
				return DROP;
			}
			ct->policy_id = d.policy_id;
			ct->rule = d.rule;
			ct->rev = ep->rev;
		}
		// Written only when they change: no cache-line bouncing per packet.
		if (!orig && !ct->seen_reply)
			ct->seen_reply = 1;
		if (p.tcp_flags & TCP_RST)
			ct->rst = 1;
		if (p.tcp_flags & TCP_FIN) {
			if (orig)
				ct->fin_orig = 1;
			else
				ct->fin_reply = 1;
		}
		if (now - ct->last_seen > TOUCH_INTERVAL_NS || (p.tcp_flags & (TCP_RST | TCP_FIN)))
			ct->last_seen = now;
		count(ep->id, dir, 1, 0);
		return PASS;
	}

new_flow:
	// An error goes back to the sender of the packet it embeds (what
	// nf_conntrack checks too): one addressed to anybody else is no reply
	// of that flow, and passing it would let a pod reach any peer its
	// egress denies by naming a flow it has.
	if (p.icmp_err && p.inner_ok && addr_eq(p.daddr, p.isaddr)) {
		struct ct_key ik = {};

		// The error travels against the packet that caused it; the
		// canonical key does not care about direction.
		ct_key_of(&ik, ep->id, p.family, p.iproto, p.isaddr, p.isport, p.idaddr, p.idport);
		if (bpf_map_lookup_elem(&kebpf_np_ct, &ik)) {
			count(ep->id, dir, 1, 0);
			return PASS;
		}
	}

	peer = dir == DIR_EGRESS ? p.daddr : p.saddr;
	if (is_host(p.family, peer)) {
		d.verdict = VERDICT_ALLOW;
		d.reason = REASON_HOST;
		d.policy_id = 0;
		d.rule = RULE_NONE;
		record(&k, dir, &p, &d, now);
		count(ep->id, dir, 1, 0);
		return PASS;
	}

	evaluate(ifindex, ep, dir, p.family, peer, p.proto, p.has_ports, p.dport, &d);
	record(&k, dir, &p, &d, now);
	if (d.verdict != VERDICT_ALLOW) {
		count(ep->id, dir, 0, 0);
		return DROP;
	}
	// An RST opens nothing and an ICMP error is not a flow.
	if (!p.icmp_err && !(p.proto == PROTO_TCP && (p.tcp_flags & TCP_RST))) {
		struct ct_val v = {};

		v.last_seen = now;
		v.policy_id = d.policy_id;
		v.rule = d.rule;
		v.rev = ep->rev;
		v.orig_dir = dir;
		v.orig_a = s_is_a;
		if (p.proto == PROTO_TCP && (p.tcp_flags & TCP_FIN))
			v.fin_orig = 1;
		bpf_map_update_elem(&kebpf_np_ct, &k, &v, BPF_ANY);
		count(ep->id, dir, 1, 1);
		return PASS;
	}
	count(ep->id, dir, 1, 0);
	return PASS;
}

SEC("tc")
int kebpf_np_from(struct __sk_buff *skb)
{
	return handle(skb, DIR_EGRESS);
}

SEC("tc")
int kebpf_np_to(struct __sk_buff *skb)
{
	return handle(skb, DIR_INGRESS);
}

char __license[] SEC("license") = "GPL";
