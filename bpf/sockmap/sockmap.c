//go:build ignore

// sockmap steers TCP connections to selected pod IP:ports (kebpf_l7_dst) to
// the node-local Envoy and short-circuits the payload between the client and
// Envoy with sk_msg, so the loopback TCP stack carries only the handshakes.
//
//   connect4    dst in kebpf_l7_dst and the socket not Envoy's (cgroup id in
//               kebpf_l7_envcg, or socket mark) -> rewrite to the Envoy
//               listener of kebpf_l7_cfg; remember the original destination
//               by socket cookie (kebpf_l7_cookie).
//   sockops     client ACTIVE_ESTABLISHED: move the original destination to
//               kebpf_l7_orig keyed by Envoy's end of the connection (the
//               accepted socket cannot learn the client's cookie), put the
//               client in kebpf_l7_socks; Envoy's PASSIVE_ESTABLISHED end
//               joins kebpf_l7_socks when kebpf_l7_orig knows its tuple.
//               TCP_CLOSE of the client drops the kebpf_l7_orig entry.
//   getsockopt  (SOL_IP, SO_ORIGINAL_DST) on a socket kebpf_l7_orig knows:
//               answer a sockaddr_in. Every other option is left alone.
//   sk_msg      payload sent by a socket in kebpf_l7_socks goes straight to
//               its peer's receive queue (bpf_msg_redirect_hash, INGRESS).
//
// Every tuple key is one socket's own view: {local ip, remote ip, local
// port, remote port}, ports in host byte order.

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define SOL_IP 0
#define SO_ORIGINAL_DST 80
#define TCP_CLOSE 7
#define PAGE_SIZE 4096

// Slots of kebpf_l7_stats; keep in sync with the Stat* constants in maps.go.
enum {
	STAT_STEERED = 0,      // connects rewritten to Envoy
	STAT_ENVOY_SKIP = 1,   // connects to a steered dst from Envoy itself
	STAT_NO_ENVOY = 2,     // connects refused: no Envoy configured (fail closed)
	STAT_ORIGDST = 3,      // SO_ORIGINAL_DST answered
	STAT_ORIGDST_MISS = 4, // SO_ORIGINAL_DST asked for an unknown socket
	STAT_SOCK_ADD = 5,     // sockets put in kebpf_l7_socks
	STAT_REDIRECT = 6,     // sk_msg redirects to the peer
	STAT_REDIRECT_MISS = 7,// sk_msg found no peer (payload passes the TCP stack)
	STAT_CLOSED = 8,       // kebpf_l7_orig entries dropped at close
	STAT_MAX = 9,
};

// Flags of kebpf_l7_dst values.
#define DST_STEER 1

struct dst4 {
	__be32 addr; // pod IPv4
	__be16 port; // TCP port
	__u16 pad;
};

struct cfg {
	__be32 envoy_addr; // Envoy listener IPv4; 0: no Envoy -> fail closed
	__be16 envoy_port; // Envoy listener port
	__u16 pad;
	__u32 envoy_mark; // sockets with all these mark bits are Envoy's (0: unused)
	__u32 pad2;
};

struct tuple4 {
	__be32 local_addr;
	__be32 remote_addr;
	__u32 local_port;  // host byte order
	__u32 remote_port; // host byte order
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct dst4); // steered pod IP:port
	__type(value, __u32);     // DST_* flags
	__uint(pinning, LIBBPF_PIN_BY_NAME); // survives agent restarts
} kebpf_l7_dst SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct cfg); // where Envoy listens, how to recognise it
	__uint(pinning, LIBBPF_PIN_BY_NAME); // survives agent restarts
} kebpf_l7_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u64);   // cgroup v2 id of Envoy's processes
	__type(value, __u32); // unused
	__uint(pinning, LIBBPF_PIN_BY_NAME); // survives agent restarts
} kebpf_l7_envcg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);         // client socket cookie
	__type(value, struct dst4); // original destination, until established
	__uint(pinning, LIBBPF_PIN_BY_NAME); // survives agent restarts
} kebpf_l7_cookie SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct tuple4); // Envoy's accepted socket {envoy, client}
	__type(value, struct dst4); // original destination
	__uint(pinning, LIBBPF_PIN_BY_NAME); // survives agent restarts
} kebpf_l7_orig SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 131072);
	__type(key, struct tuple4); // the socket's own view
	__type(value, __u64);       // socket (cookie when read back)
	__uint(pinning, LIBBPF_PIN_BY_NAME); // survives agent restarts
} kebpf_l7_socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME); // survives agent restarts
} kebpf_l7_stats SEC(".maps");

static __always_inline void count(__u32 slot)
{
	__u64 *v = bpf_map_lookup_elem(&kebpf_l7_stats, &slot);
	if (v)
		*v += 1;
}

// steer decides for a TCP connect to addr:port (IPv4, network order).
// Returns 0 to refuse the connect, 1 to let it go; *to is set to the Envoy
// listener when the connect must be rewritten.
static __always_inline int steer(void *ctx, struct bpf_sock *sk, __be32 addr, __be16 port, struct cfg **to)
{
	*to = 0;
	struct dst4 d = {.addr = addr, .port = port};
	__u32 *flags = bpf_map_lookup_elem(&kebpf_l7_dst, &d);
	if (!flags || !(*flags & DST_STEER))
		return 1;

	__u32 zero = 0;
	struct cfg *c = bpf_map_lookup_elem(&kebpf_l7_cfg, &zero);
	// Envoy's own upstream connections go to the pod: by cgroup (what a
	// container runtime gives every Envoy process) or by mark.
	__u64 cg = bpf_get_current_cgroup_id();
	if (bpf_map_lookup_elem(&kebpf_l7_envcg, &cg)) {
		count(STAT_ENVOY_SKIP);
		return 1;
	}
	if (c && c->envoy_mark && sk && (sk->mark & c->envoy_mark) == c->envoy_mark) {
		count(STAT_ENVOY_SKIP);
		return 1;
	}
	// Fail closed: a selected pod:port is never reached around Envoy.
	if (!c || !c->envoy_addr || !c->envoy_port) {
		count(STAT_NO_ENVOY);
		return 0;
	}
	__u64 cookie = bpf_get_socket_cookie(ctx);
	if (bpf_map_update_elem(&kebpf_l7_cookie, &cookie, &d, BPF_ANY))
		return 0;
	*to = c;
	count(STAT_STEERED);
	return 1;
}

SEC("cgroup/connect4")
int kebpf_l7_conn4(struct bpf_sock_addr *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return 1;
	struct cfg *to;
	if (!steer(ctx, ctx->sk, ctx->user_ip4, (__be16)ctx->user_port, &to))
		return 0;
	if (to) {
		ctx->user_ip4 = to->envoy_addr;
		ctx->user_port = to->envoy_port;
	}
	return 1;
}

// A dual-stack AF_INET6 socket connecting to ::ffff:a.b.c.d (Java's
// default, for one) runs connect6, not connect4: without this program it
// would reach a selected pod around Envoy. The kernel carries such a
// connection as IPv4 (tcp_v4_connect), so sockops and sk_msg see its IPv4
// addresses and the rest of the datapath treats it as IPv4.
SEC("cgroup/connect6")
int kebpf_l7_conn6(struct bpf_sock_addr *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return 1;
	if (ctx->user_ip6[0] != 0 || ctx->user_ip6[1] != 0 || ctx->user_ip6[2] != bpf_htonl(0xffff))
		return 1; // native IPv6: not steered yet
	struct cfg *to;
	if (!steer(ctx, ctx->sk, ctx->user_ip6[3], (__be16)ctx->user_port, &to))
		return 0;
	if (to) {
		ctx->user_ip6[3] = to->envoy_addr;
		ctx->user_port = to->envoy_port;
	}
	return 1;
}

// mapped reports a v4-mapped IPv6 address (::ffff:a.b.c.d): such sockets
// carry IPv4 and their *_ip4 context fields hold the IPv4 addresses.
#define mapped(a6) ((a6)[0] == 0 && (a6)[1] == 0 && (a6)[2] == bpf_htonl(0xffff))

static __always_inline void own_tuple(struct bpf_sock_ops *skops, struct tuple4 *t)
{
	t->local_addr = skops->local_ip4;
	t->remote_addr = skops->remote_ip4;
	t->local_port = skops->local_port;
	// remote_port is network byte order in the upper half on little endian.
	t->remote_port = bpf_ntohl(skops->remote_port);
}

SEC("sockops")
int kebpf_l7_sops(struct bpf_sock_ops *skops)
{
	if (skops->family != AF_INET && !(skops->family == AF_INET6 && mapped(skops->remote_ip6)))
		return 1;
	struct tuple4 t = {};
	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: {
		__u64 cookie = bpf_get_socket_cookie(skops);
		struct dst4 *d = bpf_map_lookup_elem(&kebpf_l7_cookie, &cookie);
		if (!d)
			return 1;
		struct dst4 orig = *d;
		bpf_map_delete_elem(&kebpf_l7_cookie, &cookie);
		own_tuple(skops, &t);
		// Envoy's end sees the same connection the other way round.
		struct tuple4 peer = {
			.local_addr = t.remote_addr,
			.remote_addr = t.local_addr,
			.local_port = t.remote_port,
			.remote_port = t.local_port,
		};
		bpf_map_update_elem(&kebpf_l7_orig, &peer, &orig, BPF_ANY);
		if (bpf_sock_hash_update(skops, &kebpf_l7_socks, &t, BPF_ANY) == 0)
			count(STAT_SOCK_ADD);
		// Close of the client drops Envoy's kebpf_l7_orig entry.
		bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
		return 1;
	}
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		own_tuple(skops, &t);
		if (!bpf_map_lookup_elem(&kebpf_l7_orig, &t))
			return 1;
		if (bpf_sock_hash_update(skops, &kebpf_l7_socks, &t, BPF_ANY) == 0)
			count(STAT_SOCK_ADD);
		return 1;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] != TCP_CLOSE)
			return 1;
		own_tuple(skops, &t);
		struct tuple4 peer = {
			.local_addr = t.remote_addr,
			.remote_addr = t.local_addr,
			.local_port = t.remote_port,
			.remote_port = t.local_port,
		};
		if (bpf_map_delete_elem(&kebpf_l7_orig, &peer) == 0)
			count(STAT_CLOSED);
		return 1;
	}
	return 1;
}

SEC("sk_msg")
int kebpf_l7_msg(struct sk_msg_md *msg)
{
	if (msg->family != AF_INET && !(msg->family == AF_INET6 && mapped(msg->remote_ip6)))
		return SK_PASS;
	struct tuple4 peer = {
		.local_addr = msg->remote_ip4,
		.remote_addr = msg->local_ip4,
		.local_port = bpf_ntohl(msg->remote_port),
		.remote_port = msg->local_port,
	};
	if (bpf_msg_redirect_hash(msg, &kebpf_l7_socks, &peer, BPF_F_INGRESS) == SK_PASS) {
		count(STAT_REDIRECT);
		return SK_PASS;
	}
	// No peer (it closed first): the payload takes the TCP stack.
	count(STAT_REDIRECT_MISS);
	return SK_PASS;
}

SEC("cgroup/getsockopt")
int kebpf_l7_gsopt(struct bpf_sockopt *ctx)
{
	// Only (SOL_IP, SO_ORIGINAL_DST) is ours; any other option keeps what
	// the kernel produced. optlen is only zeroed (the documented "use the
	// kernel's buffer") when the caller's buffer exceeds the page the
	// kernel lent us, never clamped.
	if (ctx->level != SOL_IP || ctx->optname != SO_ORIGINAL_DST) {
		if (ctx->optlen > PAGE_SIZE)
			ctx->optlen = 0;
		return 1;
	}
	struct bpf_sock *sk = ctx->sk;
	if (!sk || sk->family != AF_INET)
		return 1;
	struct tuple4 t = {
		.local_addr = sk->src_ip4,
		.remote_addr = sk->dst_ip4,
		.local_port = sk->src_port,
		.remote_port = bpf_ntohs((__u16)sk->dst_port),
	};
	struct dst4 *d = bpf_map_lookup_elem(&kebpf_l7_orig, &t);
	if (!d) {
		count(STAT_ORIGDST_MISS);
		return 1;
	}
	struct {
		__u16 family;
		__be16 port;
		__be32 addr;
		__u8 zero[8];
	} *sin = ctx->optval;
	if ((void *)(sin + 1) > ctx->optval_end)
		return 1; // caller's buffer too small: keep the kernel's error
	sin->family = AF_INET;
	sin->port = d->port;
	sin->addr = d->addr;
	__builtin_memset(sin->zero, 0, sizeof(sin->zero));
	// Separate 32-bit stores: clang merges adjacent optlen/retval writes
	// into one 64-bit store, which the verifier refuses on this context.
	*(volatile __s32 *)&ctx->optlen = sizeof(*sin);
	*(volatile __s32 *)&ctx->retval = 0;
	count(STAT_ORIGDST);
	return 1;
}

char __license[] SEC("license") = "GPL";
