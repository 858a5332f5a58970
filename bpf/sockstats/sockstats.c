//go:build ignore

// sockstats counts sockets created per address family in the cgroup subtree
// it is attached to. It never denies: a counter must not change behaviour.

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

// Address families from <sys/socket.h>; redefined because libc headers do
// not build for the bpf target.
#define AF_INET 2
#define AF_INET6 10

// Slots of kebpf_sockstats; keep in sync with the Family* constants in sockstats.go.
enum {
	SLOT_INET = 0,
	SLOT_INET6 = 1,
	SLOT_OTHER = 2,
	SLOT_MAX = 3,
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY); // per-CPU so the hot path needs no atomics
	__uint(max_entries, SLOT_MAX);           // one slot per family bucket
	__type(key, __u32);                      // SLOT_INET, SLOT_INET6 or SLOT_OTHER
	__type(value, __u64);                    // sockets created on this CPU
	__uint(pinning, LIBBPF_PIN_BY_NAME);     // survives agent restarts under <pinDir>/maps
} kebpf_sockstats SEC(".maps");

SEC("cgroup/sock_create")
int kebpf_sockstat(struct bpf_sock *sk)
{
	__u32 slot;

	switch (sk->family) {
	case AF_INET:
		slot = SLOT_INET;
		break;
	case AF_INET6:
		slot = SLOT_INET6;
		break;
	default:
		slot = SLOT_OTHER;
		break;
	}

	__u64 *count = bpf_map_lookup_elem(&kebpf_sockstats, &slot);
	if (count)
		*count += 1;

	// 1 = allow the socket to be created.
	return 1;
}

char __license[] SEC("license") = "GPL";
