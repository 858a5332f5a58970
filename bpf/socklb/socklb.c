//go:build ignore

// socklb translates Service frontends (ClusterIP, NodePort, ExternalIP ports)
// to backends when a socket connects or sends, so no packet is ever DNATed
// and the cost of a lookup does not depend on the number of Services.
//
// Layout (all hash lookups, O(1) in the number of services):
//   kebpf_lb_svc4/6  {vip, port, proto} -> {id, count, base, affinity}
//   kebpf_lb_be      {id, base + i}     -> backend i of the live generation
//   kebpf_lb_aff     {id, netns cookie} -> last backend picked, last use
//   kebpf_lb_rev     {socket cookie, backend} -> frontend, for recvmsg and
//                    getpeername so applications only ever see the VIP.
//
// User space never edits the backend slots a frontend currently points at
// unless the change is append-only or a shrink that lowers count first:
// otherwise it writes the new set into the other generation (base 0 or
// GEN_SLOT) and then replaces the frontend value, which a hash map update
// swaps atomically for readers.

#include <linux/bpf.h>
#include <linux/in6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

// Constants from libc / kernel headers that do not build for the bpf target.
#define AF_INET 2
#define AF_INET6 10
#define ECONNREFUSED 111
#define TCP_ESTABLISHED 1

// Slots of kebpf_lb_stats; keep in sync with the stat* constants in socklb.go.
enum {
	STAT_TRANSLATED = 0,
	STAT_REFUSED = 1,
	STAT_PASSED = 2,
	STAT_MAX = 3,
};

// Rev-NAT and kill-filter family tags.
#define FAM4 4
#define FAM6 6

struct svc4_key {
	__be32 vip;   // frontend IPv4 address
	__be16 port;  // frontend port, network order
	__u8 proto;   // IPPROTO_TCP, IPPROTO_UDP or IPPROTO_SCTP
	__u8 pad;     // zero
};

struct svc6_key {
	__be32 vip[4]; // frontend IPv6 address
	__be16 port;   // frontend port, network order
	__u8 proto;    // IPPROTO_TCP, IPPROTO_UDP or IPPROTO_SCTP
	__u8 pad;      // zero
};

struct svc_val {
	__u32 id;          // service id chosen by the agent, never 0
	__u32 count;       // live backends; 0 = refuse with ECONNREFUSED
	__u32 base;        // first backend slot of the live generation
	__u32 flags;       // reserved, zero
	__u64 affinity_ns; // ClientIP affinity timeout, 0 = none
};

struct be_key {
	__u32 id;   // service id
	__u32 slot; // base + index
};

struct be_val {
	__be32 ip[4]; // backend address; IPv4 in ip[0], rest zero
	__be16 port;  // backend port, network order
	__u16 pad;    // zero
};

struct aff_key {
	__u32 id;    // service id
	__u32 pad;   // zero
	__u64 netns; // client network namespace cookie
};

struct aff_val {
	__u64 last_ns;    // bpf_ktime_get_ns() of the last connect that used it
	__u32 idx;        // backend index (relative to base) picked last time
	__u32 pad;        // zero
	struct be_val be; // the backend at idx then; revalidated on use
};

struct rev_key {
	__u64 cookie;  // socket cookie of the client socket
	__be32 ip[4];  // backend address the socket was sent to
	__be16 port;   // backend port, network order
	__u8 family;   // FAM4 or FAM6 (v4-mapped sockets use FAM4)
	__u8 pad[5];   // zero
};

struct rev_val {
	__be32 vip[4]; // frontend address the application asked for
	__be16 port;   // frontend port, network order
	__u16 pad;     // zero
};

struct kill_val {
	__be32 ip[4];    // backend whose connected UDP sockets to destroy
	__be16 port;     // backend port, network order
	__u8 family;     // FAM4 or FAM6
	__u8 pad;        // zero
	__u32 destroyed; // set by the iterator: sockets destroyed in this run
	__u32 svc_id;    // service the backend left, for the trace event
	__u32 pad2;      // zero
};

// Trace event verdicts (lb_event.verdict); keep in sync with event.go.
enum {
	EV_TRANSLATED = 1, // connect()/sendmsg() sent to a backend
	EV_REFUSED = 2,    // the frontend has no endpoints: ECONNREFUSED
	EV_DESTROYED = 3,  // a connected UDP socket of a removed backend destroyed
};

// Hooks that write events (lb_event.hook).
enum {
	HOOK_CONNECT = 1,
	HOOK_SENDMSG = 2,
	HOOK_ITER = 3,
};

// One kebpf_lb_events record (96 bytes, no hidden padding); ParseEvent in
// event.go decodes it.
struct lb_event {
	__u64 ts;        // bpf_ktime_get_ns
	__u64 cgroup_id; // cgroup v2 id of the caller (destroyed: the socket's)
	__u64 cookie;    // socket cookie
	__u32 pid;       // tgid of the caller; 0 for destroyed (no caller)
	__u32 tid;       // thread id of the caller; 0 for destroyed
	__u32 svc_id;    // service id (svc_val.id)
	__u8 verdict;    // EV_*
	__u8 hook;       // HOOK_*
	__u8 proto;      // IPPROTO_*
	__u8 family;     // FAM4/FAM6 of the frontend
	__be32 vip[4];   // frontend dialed (destroyed: the one it was connected to)
	__be32 be_ip[4]; // chosen backend (refused: zero)
	__be16 vport;    // frontend port, network order
	__be16 be_port;  // backend port, network order
	__u32 pad;       // zero
	char comm[16];   // bpf_get_current_comm (destroyed: zero)
};

// kebpf_lb_cfg's single value.
struct lb_cfg {
	__u32 trace_off; // 1: write no events. 0 (a fresh map) = tracing on
	__u32 pad;       // zero
};

// Service and backend maps are BPF_F_NO_PREALLOC: freed elements then go
// through RCU instead of a preallocated free list, so a program that looked
// up the old frontend value never sees it recycled under it, and max_entries
// can be generous (a 2x backend headroom for generation swaps) without
// pinning the memory.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);     // O(1) frontend lookup
	__uint(max_entries, 131072);         // frontends, set by LoadOptions
	__uint(map_flags, BPF_F_NO_PREALLOC); // allocate on update, RCU free
	__type(key, struct svc4_key);        // {vip, port, proto}
	__type(value, struct svc_val);       // service + live generation
	__uint(pinning, LIBBPF_PIN_BY_NAME); // survives agent restarts
} kebpf_lb_svc4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);     // O(1) frontend lookup
	__uint(max_entries, 131072);         // frontends, set by LoadOptions
	__uint(map_flags, BPF_F_NO_PREALLOC); // allocate on update, RCU free
	__type(key, struct svc6_key);        // {vip, port, proto}
	__type(value, struct svc_val);       // service + live generation
	__uint(pinning, LIBBPF_PIN_BY_NAME); // survives agent restarts
} kebpf_lb_svc6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);     // O(1) slot lookup
	__uint(max_entries, 1048576);        // 2x backends, set by LoadOptions
	__uint(map_flags, BPF_F_NO_PREALLOC); // allocate on update, RCU free
	__type(key, struct be_key);          // {service id, slot}
	__type(value, struct be_val);        // backend address:port
	__uint(pinning, LIBBPF_PIN_BY_NAME); // survives agent restarts
} kebpf_lb_be SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH); // forgets idle clients first
	__uint(max_entries, 65536);          // client netns x service pairs
	__type(key, struct aff_key);         // {service id, netns cookie}
	__type(value, struct aff_val);       // backend + last use
	__uint(pinning, LIBBPF_PIN_BY_NAME); // affinity survives restarts
} kebpf_lb_aff SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH); // closed sockets age out
	__uint(max_entries, 131072);         // translated sockets, LoadOptions
	__type(key, struct rev_key);         // {socket cookie, backend}
	__type(value, struct rev_val);       // frontend to show the app
	__uint(pinning, LIBBPF_PIN_BY_NAME); // live sockets keep their VIP
} kebpf_lb_rev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY); // no atomics on the hot path
	__uint(max_entries, STAT_MAX);           // one slot per verdict
	__type(key, __u32);                      // STAT_*
	__type(value, __u64);                    // verdicts on this CPU
	__uint(pinning, LIBBPF_PIN_BY_NAME);     // counters survive restarts
} kebpf_lb_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);  // decisions for `kubectl ebpf trace`
	__uint(max_entries, 1 << 18);        // bytes; LoadOptions.EventsBytes
	__uint(pinning, LIBBPF_PIN_BY_NAME); // a restarted agent keeps reading
} kebpf_lb_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY); // no atomics when the ring is full
	__uint(max_entries, 1);                  // one counter
	__type(key, __u32);                      // 0
	__type(value, __u64);                    // events kebpf_lb_events had no room for
	__uint(pinning, LIBBPF_PIN_BY_NAME);     // outlives agents; readers diff it
} kebpf_lb_lost SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);    // lookups are inlined: the off switch is a load
	__uint(max_entries, 1);              // one config
	__type(key, __u32);                  // 0
	__type(value, struct lb_cfg);        // trace switch
	__uint(pinning, LIBBPF_PIN_BY_NAME); // the switch survives agent restarts
} kebpf_lb_cfg SEC(".maps");

// Not pinned: it only carries one request from DestroySocketsTo to the
// iterator it runs, under the agent's lock.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY); // single slot
	__uint(max_entries, 1);           // one request at a time
	__type(key, __u32);               // 0
	__type(value, struct kill_val);   // filter in, count out
} kebpf_lb_kill SEC(".maps");

static __always_inline void count(__u32 slot)
{
	__u64 *n = bpf_map_lookup_elem(&kebpf_lb_stats, &slot);
	if (n)
		*n += 1;
}

static __always_inline int tracing(void)
{
	__u32 zero = 0;
	struct lb_cfg *c = bpf_map_lookup_elem(&kebpf_lb_cfg, &zero);

	return c && !c->trace_off;
}

// reserve returns a zeroed event slot, or NULL (counted in kebpf_lb_lost)
// when the reader is behind.
static __always_inline struct lb_event *reserve(void)
{
	struct lb_event *e = bpf_ringbuf_reserve(&kebpf_lb_events, sizeof(*e), 0);

	if (!e) {
		__u32 zero = 0;
		__u64 *lost = bpf_map_lookup_elem(&kebpf_lb_lost, &zero);

		if (lost)
			*lost += 1;
		return NULL;
	}
	__builtin_memset(e, 0, sizeof(*e));
	return e;
}

// submit hands e to the reader. Waking the reader for every event would
// cost each connect() an irq_work and the reader a context switch per
// event; instead the reader polls (trace.ringReader, every 100ms) and is
// woken only once a quarter of the ring is waiting, so a burst is still
// read long before the ring is full.
static __always_inline void submit(struct lb_event *e)
{
	__u64 avail = bpf_ringbuf_query(&kebpf_lb_events, BPF_RB_AVAIL_DATA);
	__u64 size = bpf_ringbuf_query(&kebpf_lb_events, BPF_RB_RING_SIZE);

	bpf_ringbuf_submit(e, avail >= size / 4 ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP);
}

// emit writes a translated or refused event for the caller of connect() or
// sendmsg(); be is NULL for refused.
static __always_inline void emit(struct bpf_sock_addr *ctx, __u8 verdict, __u8 hook, __u32 svc_id,
				 __u8 family, const __be32 *vip, __be16 vport, const struct be_val *be)
{
	struct lb_event *e;
	__u64 id;

	if (!tracing())
		return;
	e = reserve();
	if (!e)
		return;
	id = bpf_get_current_pid_tgid();
	e->ts = bpf_ktime_get_ns();
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->cookie = bpf_get_socket_cookie(ctx);
	e->pid = id >> 32;
	e->tid = (__u32)id;
	e->svc_id = svc_id;
	e->verdict = verdict;
	e->hook = hook;
	e->proto = (__u8)ctx->protocol;
	e->family = family;
	__builtin_memcpy(e->vip, vip, 16);
	e->vport = vport;
	if (be) {
		__builtin_memcpy(e->be_ip, be->ip, 16);
		e->be_port = be->port;
	}
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	submit(e);
}

static __always_inline int be_equal(const struct be_val *a, const struct be_val *b)
{
	return a->ip[0] == b->ip[0] && a->ip[1] == b->ip[1] && a->ip[2] == b->ip[2] &&
	       a->ip[3] == b->ip[3] && a->port == b->port;
}

// pick returns a backend of svc, honouring ClientIP affinity, or NULL when
// the generation svc names has just been deleted (the caller re-reads svc).
static __always_inline struct be_val *pick(void *ctx, const struct svc_val *svc)
{
	struct aff_key ak = {};
	struct be_key bk = { .id = svc->id };
	struct be_val *be;
	__u64 now = 0;
	__u32 idx;

	if (svc->affinity_ns) {
		ak.id = svc->id;
		ak.netns = bpf_get_netns_cookie(ctx);
		now = bpf_ktime_get_ns();
		struct aff_val *av = bpf_map_lookup_elem(&kebpf_lb_aff, &ak);
		// Reuse only while fresh and while that slot still holds the same
		// backend: a changed set invalidates affinity without a map walk.
		if (av && now - av->last_ns <= svc->affinity_ns && av->idx < svc->count) {
			bk.slot = svc->base + av->idx;
			be = bpf_map_lookup_elem(&kebpf_lb_be, &bk);
			if (be && be_equal(be, &av->be)) {
				av->last_ns = now;
				return be;
			}
		}
	}

	idx = bpf_get_prandom_u32() % svc->count;
	bk.slot = svc->base + idx;
	be = bpf_map_lookup_elem(&kebpf_lb_be, &bk);
	if (!be)
		return NULL;
	if (svc->affinity_ns) {
		struct aff_val nv = { .last_ns = now, .idx = idx, .be = *be };
		bpf_map_update_elem(&kebpf_lb_aff, &ak, &nv, BPF_ANY);
	}
	return be;
}

// record_rev remembers the frontend of a translated socket and returns 1 if
// the entry was new or changed.
static __always_inline int record_rev(struct bpf_sock_addr *ctx, const struct be_val *be,
				      __u8 family, const __be32 *vip, __be16 vport)
{
	struct rev_key rk = {
		.cookie = bpf_get_socket_cookie(ctx),
		.ip = { be->ip[0], be->ip[1], be->ip[2], be->ip[3] },
		.port = be->port,
		.family = family,
	};
	struct rev_val rv = {
		.vip = { vip[0], vip[1], vip[2], vip[3] },
		.port = vport,
	};
	// Unconnected UDP sends come here per datagram: skip the write (and the
	// LRU churn) when the entry is already right.
	struct rev_val *old = bpf_map_lookup_elem(&kebpf_lb_rev, &rk);
	if (old && old->port == rv.port && old->vip[0] == rv.vip[0] && old->vip[1] == rv.vip[1] &&
	    old->vip[2] == rv.vip[2] && old->vip[3] == rv.vip[3])
		return 0;
	bpf_map_update_elem(&kebpf_lb_rev, &rk, &rv, BPF_ANY);
	return 1;
}

// Verdicts of lookup_svc.
enum {
	V_PASS = 0,
	V_XLATE = 1,
	V_REFUSE = 2,
};

// resolve finds the backend for a frontend value, re-reading the frontend
// once if user space swapped generations between the two lookups.
static __always_inline int resolve(void *ctx, void *svcmap, const void *key, struct be_val *out,
				   __u32 *id)
{
	for (int i = 0; i < 2; i++) {
		struct svc_val *sv = bpf_map_lookup_elem(svcmap, key);
		if (!sv)
			return V_PASS;
		struct svc_val svc = *sv;
		*id = svc.id;
		if (svc.count == 0)
			return V_REFUSE;
		struct be_val *be = pick(ctx, &svc);
		if (be) {
			*out = *be;
			return V_XLATE;
		}
	}
	// Both tries raced a writer: refusing is what a momentarily empty
	// backend set would do, and it is never a wrong backend.
	return V_REFUSE;
}

// translated records a translation: every connect(), but an unconnected
// UDP sendmsg() only when it reaches a backend this socket did not reach
// before (record_rev wrote), so a DNS client's datagrams are not one event
// each.
static __always_inline void translated(struct bpf_sock_addr *ctx, __u8 hook, int fresh, __u32 id,
				       __u8 family, const __be32 *vip, __be16 vport, const struct be_val *be)
{
	count(STAT_TRANSLATED);
	if (hook == HOOK_CONNECT || fresh)
		emit(ctx, EV_TRANSLATED, hook, id, family, vip, vport, be);
}

static __always_inline int refuse(void)
{
	count(STAT_REFUSED);
	// Without set_retval the kernel reports EPERM; kube-proxy's REJECT gives
	// ECONNREFUSED, which is what clients retry on.
	bpf_set_retval(-ECONNREFUSED);
	return 0;
}

static __always_inline int lb4(struct bpf_sock_addr *ctx, __u8 hook)
{
	struct svc4_key key = {
		.vip = ctx->user_ip4,
		.port = (__be16)ctx->user_port,
		.proto = (__u8)ctx->protocol,
	};
	__be32 vip[4] = { key.vip, 0, 0, 0 };
	struct be_val be;
	__u32 id = 0;

	switch (resolve(ctx, &kebpf_lb_svc4, &key, &be, &id)) {
	case V_XLATE: {
		ctx->user_ip4 = be.ip[0];
		ctx->user_port = (__u32)be.port;
		int fresh = record_rev(ctx, &be, FAM4, vip, key.port);
		translated(ctx, hook, fresh, id, FAM4, vip, key.port, &be);
		return 1;
	}
	case V_REFUSE:
		emit(ctx, EV_REFUSED, hook, id, FAM4, vip, key.port, NULL);
		return refuse();
	}
	count(STAT_PASSED);
	return 1;
}

static __always_inline int is_v4mapped(const __be32 *a)
{
	return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0xffff);
}

static __always_inline int lb6(struct bpf_sock_addr *ctx, __u8 hook)
{
	__be32 dst[4] = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3] };
	__be16 port = (__be16)ctx->user_port;
	__u8 proto = (__u8)ctx->protocol;
	__be32 vip4[4] = { dst[3], 0, 0, 0 };
	struct be_val be;
	__u32 id = 0;
	int mapped = is_v4mapped(dst);
	int v;

	// Dual-stack sockets (Java, many runtimes) reach IPv4 ClusterIPs as
	// ::ffff:a.b.c.d; translate those with the IPv4 table.
	if (mapped) {
		struct svc4_key key = { .vip = dst[3], .port = port, .proto = proto };
		v = resolve(ctx, &kebpf_lb_svc4, &key, &be, &id);
		if (v == V_XLATE) {
			ctx->user_ip6[3] = be.ip[0];
			ctx->user_port = (__u32)be.port;
			int fresh = record_rev(ctx, &be, FAM4, vip4, port);
			translated(ctx, hook, fresh, id, FAM4, vip4, port, &be);
			return 1;
		}
	} else {
		struct svc6_key key = {
			.vip = { dst[0], dst[1], dst[2], dst[3] },
			.port = port,
			.proto = proto,
		};
		v = resolve(ctx, &kebpf_lb_svc6, &key, &be, &id);
		if (v == V_XLATE) {
			ctx->user_ip6[0] = be.ip[0];
			ctx->user_ip6[1] = be.ip[1];
			ctx->user_ip6[2] = be.ip[2];
			ctx->user_ip6[3] = be.ip[3];
			ctx->user_port = (__u32)be.port;
			int fresh = record_rev(ctx, &be, FAM6, dst, port);
			translated(ctx, hook, fresh, id, FAM6, dst, port, &be);
			return 1;
		}
	}
	if (v == V_REFUSE) {
		if (mapped)
			emit(ctx, EV_REFUSED, hook, id, FAM4, vip4, port, NULL);
		else
			emit(ctx, EV_REFUSED, hook, id, FAM6, dst, port, NULL);
		return refuse();
	}
	count(STAT_PASSED);
	return 1;
}

// rev4/rev6 show the frontend instead of the backend as the peer (recvmsg
// source, getpeername). They must return 1: these hooks cannot deny.
static __always_inline int rev4(struct bpf_sock_addr *ctx)
{
	struct rev_key rk = {
		.cookie = bpf_get_socket_cookie(ctx),
		.ip = { ctx->user_ip4, 0, 0, 0 },
		.port = (__be16)ctx->user_port,
		.family = FAM4,
	};
	struct rev_val *rv = bpf_map_lookup_elem(&kebpf_lb_rev, &rk);
	if (rv) {
		ctx->user_ip4 = rv->vip[0];
		ctx->user_port = (__u32)rv->port;
	}
	return 1;
}

static __always_inline int rev6(struct bpf_sock_addr *ctx)
{
	__be32 src[4] = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3] };
	int mapped = is_v4mapped(src);
	struct rev_key rk = {
		.cookie = bpf_get_socket_cookie(ctx),
		.port = (__be16)ctx->user_port,
	};

	if (mapped) {
		rk.ip[0] = src[3];
		rk.family = FAM4;
	} else {
		rk.ip[0] = src[0];
		rk.ip[1] = src[1];
		rk.ip[2] = src[2];
		rk.ip[3] = src[3];
		rk.family = FAM6;
	}
	struct rev_val *rv = bpf_map_lookup_elem(&kebpf_lb_rev, &rk);
	if (!rv)
		return 1;
	if (mapped) {
		ctx->user_ip6[3] = rv->vip[0];
	} else {
		ctx->user_ip6[0] = rv->vip[0];
		ctx->user_ip6[1] = rv->vip[1];
		ctx->user_ip6[2] = rv->vip[2];
		ctx->user_ip6[3] = rv->vip[3];
	}
	ctx->user_port = (__u32)rv->port;
	return 1;
}

SEC("cgroup/connect4")
int kebpf_connect4(struct bpf_sock_addr *ctx) { return lb4(ctx, HOOK_CONNECT); }

SEC("cgroup/connect6")
int kebpf_connect6(struct bpf_sock_addr *ctx) { return lb6(ctx, HOOK_CONNECT); }

// Only unconnected UDP sends reach sendmsg hooks; connected sockets were
// translated by connect4/6.
SEC("cgroup/sendmsg4")
int kebpf_sendmsg4(struct bpf_sock_addr *ctx) { return lb4(ctx, HOOK_SENDMSG); }

SEC("cgroup/sendmsg6")
int kebpf_sendmsg6(struct bpf_sock_addr *ctx) { return lb6(ctx, HOOK_SENDMSG); }

SEC("cgroup/recvmsg4")
int kebpf_recvmsg4(struct bpf_sock_addr *ctx) { return rev4(ctx); }

SEC("cgroup/recvmsg6")
int kebpf_recvmsg6(struct bpf_sock_addr *ctx) { return rev6(ctx); }

SEC("cgroup/getpeername4")
int kebpf_getpeer4(struct bpf_sock_addr *ctx) { return rev4(ctx); }

SEC("cgroup/getpeername6")
int kebpf_getpeer6(struct bpf_sock_addr *ctx) { return rev6(ctx); }

// Minimal CO-RE views of kernel types for the UDP iterator; field offsets
// are relocated against the running kernel's BTF at load time.
struct sock_common {
	union {
		struct {
			__be32 skc_daddr;
			__be32 skc_rcv_saddr;
		};
	};
	union {
		struct {
			__be16 skc_dport;
			__u16 skc_num;
		};
	};
	unsigned short skc_family;
	volatile unsigned char skc_state;
	struct in6_addr skc_v6_daddr;
} __attribute__((preserve_access_index));

struct kernfs_node {
	__u64 id;
} __attribute__((preserve_access_index));

struct cgroup {
	struct kernfs_node *kn;
} __attribute__((preserve_access_index));

struct sock_cgroup_data {
	struct cgroup *cgroup;
} __attribute__((preserve_access_index));

struct sock {
	struct sock_common __sk_common;
	struct sock_cgroup_data sk_cgrp_data;
} __attribute__((preserve_access_index));

struct udp_sock;

struct bpf_iter_meta;

struct bpf_iter__udp {
	struct bpf_iter_meta *meta;
	struct udp_sock *udp_sk;
} __attribute__((preserve_access_index));

extern int bpf_sock_destroy(struct sock_common *sk) __ksym;

// kebpf_udp_kill destroys connected UDP sockets of this network namespace
// that socklb translated to the backend in kebpf_lb_kill (a rev-NAT entry
// for {socket cookie, backend} proves the translation, so sockets an app
// connected to the pod IP itself are left alone). The application's next
// send or receive fails and it reconnects, which picks a live backend.
SEC("iter/udp")
int kebpf_udp_kill(struct bpf_iter__udp *ctx)
{
	struct sock *sk = (struct sock *)ctx->udp_sk;
	__u32 zero = 0;
	struct kill_val *kv;
	struct rev_key rk = {};

	if (!sk)
		return 0;
	kv = bpf_map_lookup_elem(&kebpf_lb_kill, &zero);
	if (!kv)
		return 0;
	if (sk->__sk_common.skc_state != TCP_ESTABLISHED || sk->__sk_common.skc_dport != kv->port)
		return 0;

	if (kv->family == FAM4) {
		if (sk->__sk_common.skc_family == AF_INET6) {
			// A dual-stack socket talks to an IPv4 peer only via ::ffff:x.
			if (sk->__sk_common.skc_v6_daddr.in6_u.u6_addr32[0] != 0 ||
			    sk->__sk_common.skc_v6_daddr.in6_u.u6_addr32[1] != 0 ||
			    sk->__sk_common.skc_v6_daddr.in6_u.u6_addr32[2] != bpf_htonl(0xffff))
				return 0;
		} else if (sk->__sk_common.skc_family != AF_INET) {
			return 0;
		}
		if (sk->__sk_common.skc_daddr != kv->ip[0])
			return 0;
		rk.ip[0] = kv->ip[0];
	} else {
		if (sk->__sk_common.skc_family != AF_INET6)
			return 0;
		for (int i = 0; i < 4; i++) {
			if (sk->__sk_common.skc_v6_daddr.in6_u.u6_addr32[i] != kv->ip[i])
				return 0;
			rk.ip[i] = kv->ip[i];
		}
	}
	rk.cookie = bpf_get_socket_cookie(sk);
	rk.port = kv->port;
	rk.family = kv->family;
	struct rev_val *rv = bpf_map_lookup_elem(&kebpf_lb_rev, &rk);
	if (!rv)
		return 0;
	if (bpf_sock_destroy((struct sock_common *)sk) != 0)
		return 0;
	__sync_fetch_and_add(&kv->destroyed, 1);

	// The iterator runs in the agent, so the event names no process; the
	// socket's own cgroup (the one that created it) names the pod.
	if (!tracing())
		return 0;
	struct lb_event *e = reserve();
	if (!e)
		return 0;
	e->ts = bpf_ktime_get_ns();
	e->cookie = rk.cookie;
	e->svc_id = kv->svc_id;
	e->verdict = EV_DESTROYED;
	e->hook = HOOK_ITER;
	e->proto = 17; // IPPROTO_UDP
	e->family = kv->family;
	__builtin_memcpy(e->vip, rv->vip, 16);
	e->vport = rv->port;
	__builtin_memcpy(e->be_ip, kv->ip, 16);
	e->be_port = kv->port;
	struct cgroup *cg = sk->sk_cgrp_data.cgroup;
	if (cg && cg->kn)
		e->cgroup_id = cg->kn->id;
	submit(e);
	return 0;
}

char __license[] SEC("license") = "GPL";
