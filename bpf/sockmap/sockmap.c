//go:build ignore

// sockmap steers TCP connections to selected pod IP:ports (kebpf_l7_dst) to
// the node-local Envoy and short-circuits the payload between the client and
// Envoy with sk_msg, so the loopback TCP stack carries only the handshakes.
//
//   connect4    dst in kebpf_l7_dst and the socket not Envoy's (the caller's
//               cgroup or an ancestor in kebpf_l7_envcg, or socket mark) ->
//               rewrite to the Envoy listener of kebpf_l7_cfg; remember the
//               original destination by socket cookie (kebpf_l7_cookie).
//   sockops     client TCP_CONNECT (local address and port chosen, SYN not
//               sent yet): move the original destination to kebpf_l7_orig
//               keyed by Envoy's end of the connection (the accepted socket
//               cannot learn the client's cookie; bpf/netpol judges the
//               client's SYN by that entry), ask for state callbacks.
//               Client ACTIVE_ESTABLISHED with a kebpf_l7_orig entry: put it
//               in kebpf_l7_socks; Envoy's PASSIVE_ESTABLISHED end joins
//               kebpf_l7_socks when kebpf_l7_orig knows its tuple.
//               TCP_CLOSE of the client (also of a connect that never
//               established) drops the kebpf_l7_orig entry.
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

#include "../include/l7_shared.h" // kebpf_l7_{dst,envcg,orig,active}, shared with bpf/netpol

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define SOL_IP 0
#define SOL_IPV6 41
#define SO_ORIGINAL_DST 80 // also IP6T_SO_ORIGINAL_DST at SOL_IPV6
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

// RD is a plain 32-bit context read the compiler may not merge or turn
// into pointer arithmetic on a socket (clang folds the IPv4/IPv6 branches
// into "sk + variable offset", which the verifier refuses).
#define RD(x) (*(volatile __u32 *)&(x))

struct cfg {
	__be32 envoy4;      // Envoy listener IPv4; 0: none -> IPv4 steering fails closed
	__u32 envoy6[4];    // Envoy listener IPv6; zero: none -> IPv6 steering fails closed
	__be16 envoy_port4; // port of the IPv4 listener
	__be16 envoy_port6; // port of the IPv6 listener
	__u32 envoy_mark;   // sockets with all these mark bits are Envoy's (0: unused)
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct cfg); // where Envoy listens, how to recognise it
	__uint(pinning, LIBBPF_PIN_BY_NAME); // survives agent restarts
} kebpf_l7_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);           // client socket cookie
	__type(value, struct l7_dst); // original destination, until TCP_CONNECT
	__uint(pinning, LIBBPF_PIN_BY_NAME); // survives agent restarts
} kebpf_l7_cookie SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 131072);
	__type(key, struct l7_tuple); // the socket's own view
	__type(value, __u64);         // socket (cookie when read back)
	__uint(pinning, LIBBPF_PIN_BY_NAME); // survives agent restarts
} kebpf_l7_socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME); // survives agent restarts
} kebpf_l7_stats SEC(".maps");

// Verdicts of kebpf_l7_events records; keep in sync with events.go.
enum {
	L7_EV_STEERED = 1,  // connect() rewritten to Envoy
	L7_EV_NO_ENVOY = 2, // connect() refused (EPERM): no Envoy listener, fail closed
	L7_EV_NO_ROOM = 3,  // connect() refused (EPERM): kebpf_l7_cookie refused the entry
};

// One record per connect() to a steered destination that was steered or
// refused (Envoy's own connects are not recorded). Process context is the
// caller's: connect() runs the hook in the calling task.
struct l7_event {
	__u64 ts;        // bpf_ktime_get_ns
	__u64 cgroup_id; // the caller's cgroup v2 id
	__u32 tgid;      // process id
	__u32 pid;       // thread id
	__u32 daddr[4];  // original destination, IPv4 in daddr[0]
	__u32 saddr[4];  // the socket's bound source address (zero when unbound, the usual case)
	__be16 dport;    // original destination port, network order
	__u16 sport;     // bound source port, host order (0 when unbound)
	__u8 family;     // FAM4 / FAM6 of daddr
	__u8 sfamily;    // FAM4 / FAM6 of saddr; 0: unbound
	__u8 verdict;    // L7_EV_*
	__u8 pad;        // zero
	char comm[16];   // the caller's task command
}; // 80 bytes

// The reader is woken only once this much is waiting: a wakeup per connect
// costs the connecting task an irq_work and the reader a context switch, a
// measurable share of a loopback connect. Records below it are picked up by
// the reader's poll (sockmap.EventsPoll).
#define EVENTS_WAKEUP_BYTES (1 << 15)

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF); // steering events for `kubectl ebpf trace`
	__uint(max_entries, 1 << 18);       // bytes
	__uint(pinning, LIBBPF_PIN_BY_NAME); // a restarted agent keeps reading
} kebpf_l7_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY); // per-CPU: no atomics on the drop path
	__uint(max_entries, 1);                  // one counter
	__type(key, __u32);                      // 0
	__type(value, __u64);                    // events kebpf_l7_events had no room for
	__uint(pinning, LIBBPF_PIN_BY_NAME);     // the count outlives agents; readers diff it
} kebpf_l7_lost SEC(".maps");

static __always_inline void count(__u32 slot)
{
	__u64 *v = bpf_map_lookup_elem(&kebpf_l7_stats, &slot);
	if (v)
		*v += 1;
}

// mapped reports a v4-mapped IPv6 address (::ffff:a.b.c.d): such sockets
// carry IPv4 and their *_ip4 context fields hold the IPv4 addresses.
#define mapped(a6) ((a6)[0] == 0 && (a6)[1] == 0 && (a6)[2] == bpf_htonl(0xffff))

// emit records a steering decision in kebpf_l7_events; a full ring buffer
// is counted in kebpf_l7_lost (the reader is behind), never waited for.
static __always_inline void emit(struct bpf_sock *sk, const struct l7_dst *d, __u8 verdict)
{
	struct l7_event *e = bpf_ringbuf_reserve(&kebpf_l7_events, sizeof(*e), 0);
	if (!e) {
		__u32 zero = 0;
		__u64 *lost = bpf_map_lookup_elem(&kebpf_l7_lost, &zero);
		if (lost)
			*lost += 1;
		return;
	}
	__u64 id = bpf_get_current_pid_tgid();
	e->ts = bpf_ktime_get_ns();
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->tgid = id >> 32;
	e->pid = (__u32)id;
	e->daddr[0] = d->addr[0];
	e->daddr[1] = d->addr[1];
	e->daddr[2] = d->addr[2];
	e->daddr[3] = d->addr[3];
	e->dport = d->port;
	e->family = d->family;
	e->verdict = verdict;
	e->pad = 0;
	e->saddr[0] = 0;
	e->saddr[1] = 0;
	e->saddr[2] = 0;
	e->saddr[3] = 0;
	e->sport = 0;
	e->sfamily = 0;
	if (sk) {
		// Every field read unconditionally (see RD): a socket bound
		// before connect() names its source; an unbound one reads zeros.
		__u32 fam = sk->family, s4 = RD(sk->src_ip4), sport = sk->src_port;
		__u32 s6[4] = {RD(sk->src_ip6[0]), RD(sk->src_ip6[1]), RD(sk->src_ip6[2]), RD(sk->src_ip6[3])};
		if (fam == AF_INET && s4) {
			e->saddr[0] = s4;
			e->sfamily = FAM4;
		} else if (fam == AF_INET6 && mapped(s6) && s6[3]) {
			e->saddr[0] = s6[3];
			e->sfamily = FAM4;
		} else if (fam == AF_INET6 && (s6[0] | s6[1] | s6[2] | s6[3])) {
			e->saddr[0] = s6[0];
			e->saddr[1] = s6[1];
			e->saddr[2] = s6[2];
			e->saddr[3] = s6[3];
			e->sfamily = FAM6;
		}
		e->sport = sport;
	}
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	__u64 flags = BPF_RB_NO_WAKEUP;
	if (bpf_ringbuf_query(&kebpf_l7_events, BPF_RB_AVAIL_DATA) >= EVENTS_WAKEUP_BYTES)
		flags = BPF_RB_FORCE_WAKEUP;
	bpf_ringbuf_submit(e, flags);
}


// steer decides for a TCP connect to *d. Returns 0 to refuse the connect,
// 1 to let it go; *to is set to the configuration when the connect must be
// rewritten to Envoy's listener of d's family.
static __always_inline int steer(void *ctx, struct bpf_sock *sk, struct l7_dst *d, struct cfg **to)
{
	*to = 0;
	__u32 *flags = bpf_map_lookup_elem(&kebpf_l7_dst, d);
	if (!flags || !(*flags & DST_STEER))
		return 1;

	__u32 zero = 0;
	struct cfg *c = bpf_map_lookup_elem(&kebpf_l7_cfg, &zero);
	// Envoy's own upstream connections go to the pod: by cgroup (what a
	// container runtime gives every Envoy process; the agent registers the
	// Envoy pod's, so any ancestor counts) or by mark.
	if (l7_envoy_cg(bpf_get_current_cgroup_id(), bpf_get_current_ancestor_cgroup_id)) {
		count(STAT_ENVOY_SKIP);
		return 1;
	}
	if (c && c->envoy_mark && sk && (sk->mark & c->envoy_mark) == c->envoy_mark) {
		count(STAT_ENVOY_SKIP);
		return 1;
	}
	// Fail closed: a selected pod:port is never reached around Envoy.
	int none = !c;
	if (c && d->family == FAM4)
		none = !c->envoy4 || !c->envoy_port4;
	else if (c)
		none = !(c->envoy6[0] | c->envoy6[1] | c->envoy6[2] | c->envoy6[3]) || !c->envoy_port6;
	if (none) {
		count(STAT_NO_ENVOY);
		emit(sk, d, L7_EV_NO_ENVOY);
		return 0;
	}
	__u64 cookie = bpf_get_socket_cookie(ctx);
	if (bpf_map_update_elem(&kebpf_l7_cookie, &cookie, d, BPF_ANY)) {
		emit(sk, d, L7_EV_NO_ROOM);
		return 0;
	}
	*to = c;
	count(STAT_STEERED);
	emit(sk, d, L7_EV_STEERED);
	return 1;
}

SEC("cgroup/connect4")
int kebpf_l7_conn4(struct bpf_sock_addr *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return 1;
	struct l7_dst d = {.addr = {ctx->user_ip4}, .port = (__be16)ctx->user_port, .family = FAM4};
	struct cfg *to;
	if (!steer(ctx, ctx->sk, &d, &to))
		return 0;
	if (to) {
		ctx->user_ip4 = to->envoy4;
		ctx->user_port = to->envoy_port4;
	}
	return 1;
}

// IPv6, and a dual-stack AF_INET6 socket connecting to ::ffff:a.b.c.d
// (Java's default, for one), which runs connect6, not connect4: without
// this it would reach a selected pod around Envoy. The kernel carries such a
// connection as IPv4 (tcp_v4_connect), so sockops and sk_msg see its IPv4
// addresses and the rest of the datapath treats it as IPv4.
SEC("cgroup/connect6")
int kebpf_l7_conn6(struct bpf_sock_addr *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return 1;
	struct l7_dst d = {.port = (__be16)ctx->user_port};
	__u32 a0 = ctx->user_ip6[0], a1 = ctx->user_ip6[1], a2 = ctx->user_ip6[2], a3 = ctx->user_ip6[3];
	int v4 = a0 == 0 && a1 == 0 && a2 == bpf_htonl(0xffff);
	if (v4) {
		d.family = FAM4;
		d.addr[0] = a3;
	} else {
		d.family = FAM6;
		d.addr[0] = a0;
		d.addr[1] = a1;
		d.addr[2] = a2;
		d.addr[3] = a3;
	}
	struct cfg *to;
	if (!steer(ctx, ctx->sk, &d, &to))
		return 0;
	if (!to)
		return 1;
	if (v4) {
		ctx->user_ip6[3] = to->envoy4;
		ctx->user_port = to->envoy_port4;
	} else {
		ctx->user_ip6[0] = to->envoy6[0];
		ctx->user_ip6[1] = to->envoy6[1];
		ctx->user_ip6[2] = to->envoy6[2];
		ctx->user_ip6[3] = to->envoy6[3];
		ctx->user_port = to->envoy_port6;
	}
	return 1;
}

// reverse is the same connection seen from the other end.
static __always_inline void reverse(const struct l7_tuple *t, struct l7_tuple *r)
{
	r->local[0] = t->remote[0];
	r->local[1] = t->remote[1];
	r->local[2] = t->remote[2];
	r->local[3] = t->remote[3];
	r->remote[0] = t->local[0];
	r->remote[1] = t->local[1];
	r->remote[2] = t->local[2];
	r->remote[3] = t->local[3];
	r->local_port = t->remote_port;
	r->remote_port = t->local_port;
	r->family = t->family;
}

// own_tuple fills a socket's own tuple from a sock_ops or sk_msg context
// (same field names). remote_port is network byte order in the upper half
// on little endian. Returns 0 for families we do not handle.
// fill_tuple fills a socket's own tuple from addresses already read out of
// the context. Every context field is read unconditionally first: clang
// otherwise sinks the IPv4 and IPv6 branches' common loads into one load at
// "ctx + variable offset", which the verifier refuses.
static __always_inline int fill_tuple(struct l7_tuple *t, __u32 family, __u32 l4, __u32 r4,
				      const __u32 *l6, const __u32 *r6)
{
	if (family == AF_INET || (family == AF_INET6 && mapped(r6))) {
		t->family = FAM4;
		t->local[0] = l4;
		t->remote[0] = r4;
		return 1;
	}
	if (family != AF_INET6)
		return 0;
	t->family = FAM6;
	t->local[0] = l6[0];
	t->local[1] = l6[1];
	t->local[2] = l6[2];
	t->local[3] = l6[3];
	t->remote[0] = r6[0];
	t->remote[1] = r6[1];
	t->remote[2] = r6[2];
	t->remote[3] = r6[3];
	return 1;
}

// own_tuple: the socket's own tuple from a sock_ops or sk_msg context (same
// field names). remote_port is network byte order in the upper half on
// little endian. 0 for families we do not handle.
#define own_tuple(ctx, t)                                                   \
	({                                                                  \
		__u32 l6[4] = {RD((ctx)->local_ip6[0]), RD((ctx)->local_ip6[1]),   \
			       RD((ctx)->local_ip6[2]), RD((ctx)->local_ip6[3])};  \
		__u32 r6[4] = {RD((ctx)->remote_ip6[0]), RD((ctx)->remote_ip6[1]), \
			       RD((ctx)->remote_ip6[2]), RD((ctx)->remote_ip6[3])}; \
		__u32 l4 = RD((ctx)->local_ip4), r4 = RD((ctx)->remote_ip4);       \
		(t)->local_port = (ctx)->local_port;                        \
		(t)->remote_port = bpf_ntohl((ctx)->remote_port);           \
		fill_tuple((t), (ctx)->family, l4, r4, l6, r6);             \
	})

// rekey moves a steered client's original destination from its cookie
// entry to kebpf_l7_orig under the tuple Envoy's accepted socket will have
// (the client's own, reversed) and asks for state callbacks, so the entry
// goes when the client closes, established or not. Runs at TCP_CONNECT,
// before the SYN leaves (bpf/netpol judges that SYN by the entry), and again
// at ACTIVE_ESTABLISHED for a connect whose TCP_CONNECT an older program saw.
static __always_inline void rekey(struct bpf_sock_ops *skops)
{
	struct l7_tuple t = {}, peer = {};
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct l7_dst *d = bpf_map_lookup_elem(&kebpf_l7_cookie, &cookie);
	if (!d)
		return;
	struct l7_dst orig = *d;
	bpf_map_delete_elem(&kebpf_l7_cookie, &cookie);
	if (!own_tuple(skops, &t))
		return;
	reverse(&t, &peer);
	bpf_map_update_elem(&kebpf_l7_orig, &peer, &orig, BPF_ANY);
	bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
}

SEC("sockops")
int kebpf_l7_sops(struct bpf_sock_ops *skops)
{
	struct l7_tuple t = {}, peer = {};
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		rekey(skops);
		return 1;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		rekey(skops);
		// A steered client is one whose Envoy end kebpf_l7_orig knows.
		if (!own_tuple(skops, &t))
			return 1;
		reverse(&t, &peer);
		if (!bpf_map_lookup_elem(&kebpf_l7_orig, &peer))
			return 1;
		if (bpf_sock_hash_update(skops, &kebpf_l7_socks, &t, BPF_ANY) == 0)
			count(STAT_SOCK_ADD);
		return 1;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		if (!own_tuple(skops, &t) || !bpf_map_lookup_elem(&kebpf_l7_orig, &t))
			return 1;
		if (bpf_sock_hash_update(skops, &kebpf_l7_socks, &t, BPF_ANY) == 0)
			count(STAT_SOCK_ADD);
		return 1;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] != TCP_CLOSE || !own_tuple(skops, &t))
			return 1;
		reverse(&t, &peer);
		if (bpf_map_delete_elem(&kebpf_l7_orig, &peer) == 0)
			count(STAT_CLOSED);
		return 1;
	}
	return 1;
}

SEC("sk_msg")
int kebpf_l7_msg(struct sk_msg_md *msg)
{
	struct l7_tuple t = {}, peer = {};
	if (!own_tuple(msg, &t))
		return SK_PASS;
	reverse(&t, &peer);
	if (bpf_msg_redirect_hash(msg, &kebpf_l7_socks, &peer, BPF_F_INGRESS) == SK_PASS) {
		count(STAT_REDIRECT);
		return SK_PASS;
	}
	// No peer (it closed first): the payload takes the TCP stack.
	count(STAT_REDIRECT_MISS);
	return SK_PASS;
}

struct sockaddr_in4 {
	__u16 family;
	__be16 port;
	__be32 addr;
	__u8 zero[8];
};

struct sockaddr_in6x {
	__u16 family;
	__be16 port;
	__u32 flowinfo;
	__u32 addr[4];
	__u32 scope_id;
};

SEC("cgroup/getsockopt")
int kebpf_l7_gsopt(struct bpf_sockopt *ctx)
{
	// Only (SOL_IP, SO_ORIGINAL_DST) and (SOL_IPV6, IP6T_SO_ORIGINAL_DST)
	// are ours; any other option keeps what the kernel produced. optlen is
	// only zeroed (the documented "use the kernel's buffer") when the
	// caller's buffer exceeds the page the kernel lent us, never clamped.
	int lvl = ctx->level;
	if ((lvl != SOL_IP && lvl != SOL_IPV6) || ctx->optname != SO_ORIGINAL_DST) {
		if (ctx->optlen > PAGE_SIZE)
			ctx->optlen = 0;
		return 1;
	}
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 1;
	struct l7_tuple t = {
		.local_port = sk->src_port,
		.remote_port = bpf_ntohs((__u16)sk->dst_port),
	};
	__u32 l6[4] = {RD(sk->src_ip6[0]), RD(sk->src_ip6[1]), RD(sk->src_ip6[2]), RD(sk->src_ip6[3])};
	__u32 r6[4] = {RD(sk->dst_ip6[0]), RD(sk->dst_ip6[1]), RD(sk->dst_ip6[2]), RD(sk->dst_ip6[3])};
	__u32 l4 = RD(sk->src_ip4), r4 = RD(sk->dst_ip4);
	if (!fill_tuple(&t, sk->family, l4, r4, l6, r6))
		return 1;
	struct l7_dst *d = bpf_map_lookup_elem(&kebpf_l7_orig, &t);
	if (!d) {
		count(STAT_ORIGDST_MISS);
		return 1;
	}
	__s32 len;
	if (lvl == SOL_IP) {
		if (d->family != FAM4)
			return 1; // an IPv6 destination has no sockaddr_in
		struct sockaddr_in4 *sin = ctx->optval;
		if ((void *)(sin + 1) > ctx->optval_end)
			return 1; // caller's buffer too small: keep the kernel's error
		sin->family = AF_INET;
		sin->port = d->port;
		sin->addr = d->addr[0];
		__builtin_memset(sin->zero, 0, sizeof(sin->zero));
		len = sizeof(*sin);
	} else {
		struct sockaddr_in6x *sin6 = ctx->optval;
		if ((void *)(sin6 + 1) > ctx->optval_end)
			return 1;
		sin6->family = AF_INET6;
		sin6->port = d->port;
		sin6->flowinfo = 0;
		sin6->scope_id = 0;
		if (d->family == FAM4) { // v4-mapped, as the socket itself is
			sin6->addr[0] = 0;
			sin6->addr[1] = 0;
			sin6->addr[2] = bpf_htonl(0xffff);
			sin6->addr[3] = d->addr[0];
		} else {
			sin6->addr[0] = d->addr[0];
			sin6->addr[1] = d->addr[1];
			sin6->addr[2] = d->addr[2];
			sin6->addr[3] = d->addr[3];
		}
		len = sizeof(*sin6);
	}
	// Separate 32-bit stores: clang merges adjacent optlen/retval writes
	// into one 64-bit store, which the verifier refuses on this context.
	*(volatile __s32 *)&ctx->optlen = len;
	*(volatile __s32 *)&ctx->retval = 0;
	count(STAT_ORIGDST);
	return 1;
}

char __license[] SEC("license") = "GPL";
