// l7_shared.h: the L7 steering maps that bpf/sockmap writes and bpf/netpol
// reads, declared once so both objects declare them identically. They are
// pinned by name under <pinDir>/maps: whichever package loads first creates
// them, the other reuses the pins (cilium/ebpf checks type, key/value size,
// max_entries and flags, which this header keeps equal).
//
// Ownership (bpf/sockmap/README.md, "Maps shared with bpf/netpol"):
// sockmap fills them; neither package's Detach nor DetachPinned unpins them
// (sockmap's clear their entries: steering off), so a loaded netpol never
// holds a map a re-enabled sockmap would not write. Only the uninstall
// cleanup, which removes the whole pin directory, deletes the pins.
//
// Needs <linux/bpf.h> and <bpf/bpf_helpers.h> first.

#ifndef KEBPF_L7_SHARED_H
#define KEBPF_L7_SHARED_H

// Address families of keys: IPv4 addresses sit in word 0 of an address, the
// other words zero; the family tag keeps them apart from IPv6 addresses with
// 96 zero bits.
#define FAM4 4
#define FAM6 6

// Flags of kebpf_l7_dst values.
#define DST_STEER 1

// A steered destination: pod IP:port.
struct l7_dst {
	__u32 addr[4]; // pod IP, network byte order
	__be16 port;   // TCP port, network byte order
	__u16 family;  // FAM4 | FAM6
};

// One socket's own view of a connection, ports in host byte order.
struct l7_tuple {
	__u32 local[4];
	__u32 remote[4];
	__u32 local_port;  // host byte order
	__u32 remote_port; // host byte order
	__u32 family;      // FAM4 | FAM6
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct l7_dst); // steered pod IP:port
	__type(value, __u32);       // DST_* flags
	__uint(pinning, LIBBPF_PIN_BY_NAME); // survives agent restarts
} kebpf_l7_dst SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u64);   // cgroup v2 id of Envoy's pod or container (or an ancestor)
	__type(value, __u32); // unused
	__uint(pinning, LIBBPF_PIN_BY_NAME); // survives agent restarts
} kebpf_l7_envcg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct l7_tuple); // Envoy's accepted socket {envoy, client}
	__type(value, struct l7_dst); // original destination
	__uint(pinning, LIBBPF_PIN_BY_NAME); // survives agent restarts
} kebpf_l7_orig SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);   // 0
	__type(value, __u32); // 1: kebpf_l7_dst may hold entries (sockmap sets it
	                      // before the first SetSteered, clears it after
	                      // emptying kebpf_l7_dst at Detach)
	__uint(pinning, LIBBPF_PIN_BY_NAME); // survives agent restarts
} kebpf_l7_active SEC(".maps");

// l7_active: steering may be in use on this node. Only an optimisation
// gate (netpol parses packets of endpoints no policy selects only then);
// every check itself reads the maps above.
static __always_inline int l7_active(void)
{
	__u32 zero = 0;
	__u32 *on = bpf_map_lookup_elem(&kebpf_l7_active, &zero);

	return on && *on;
}

// Ancestor levels searched for a registered Envoy cgroup (1 = the first
// level below the root; the root itself is never looked at).
#define L7_ENVCG_LEVELS 12

// l7_envoy_cg is 1 when the cgroup self, or any of its ancestors at levels
// 1..L7_ENVCG_LEVELS, is in kebpf_l7_envcg. ANC is a macro or function of
// one argument, the level, giving the ancestor's id there (0 when the
// cgroup is not that deep): the agent registers the Envoy *pod's* cgroup,
// which stays the same across container restarts, so a restarted container
// (a new child cgroup nobody registered) is still Envoy. self 0 (no socket,
// no cgroup) is never Envoy.
#define l7_envoy_cg(self, ANC)                                                 \
	({                                                                     \
		__u64 __self = (self);                                         \
		int __found = 0;                                               \
		if (__self && bpf_map_lookup_elem(&kebpf_l7_envcg, &__self))   \
			__found = 1;                                           \
		for (int __lvl = 1; __self && !__found && __lvl <= L7_ENVCG_LEVELS; __lvl++) { \
			__u64 __anc = ANC(__lvl);                              \
			if (!__anc)                                            \
				break;                                         \
			if (bpf_map_lookup_elem(&kebpf_l7_envcg, &__anc))      \
				__found = 1;                                   \
		}                                                              \
		__found;                                                       \
	})

#endif
