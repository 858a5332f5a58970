//go:build linux

package sockmap

import "github.com/kubectl-ebpf/kubectl-ebpf/bpf/pins"

// Layout versions of the pinned maps' key and value structs (sockmap.c);
// the shared L7 maps' are in pins.SharedL7Versions. An upgrade that
// changes a struct bumps its version and adds a pins.Upgrade from the
// previous one to mapVersions.
const (
	cfgLayout    = 1 // u32 0 -> struct cfg
	cookieLayout = 1 // u64 socket cookie -> struct l7_dst
	socksLayout  = 1 // struct l7_tuple -> socket
	statsLayout  = 1 // u32 STAT_* -> per-CPU u64
	eventsLayout = 1 // ring buffer of struct l7_event
	lostLayout   = 1 // u32 0 -> per-CPU u64
)

// mapVersions is what an upgrade does with each pinned map whose layout
// changed (pins.MigrateMaps); every pinned map is listed
// (TestMapVersionsCoverSpec).
//
// kebpf_l7_socks cannot be copied: a SOCKHASH reads back socket cookies and
// an update needs the socket's fd, which only the socket's owner has. A new
// one starts empty: sockops adds connections established from then on.
// Pairs in the old one are not lost: their sockets' psocks hold the old
// sk_msg program, which holds the old map, so they stay redirected there
// until they close, and the kernel frees the old map with the last of them
// (TestUpgradeRecreatesSockhash). The agent could not re-insert them anyway:
// sockops sees an established connection once.
var mapVersions = append([]pins.VersionedMap{
	{Name: SockmapMapKebpfL7Cfg, Version: cfgLayout, Policy: pins.Migrate,
		Why: "Envoy's listeners and mark, written only by the agent"},
	{Name: SockmapMapKebpfL7Cookie, Version: cookieLayout, Policy: pins.MigrateCatchUp,
		Why: "original destinations between connect() and TCP_CONNECT, written by the programs"},
	{Name: SockmapMapKebpfL7Socks, Version: socksLayout, Policy: pins.Recreate,
		Why: "SOCKHASH: sockets cannot be copied from user space (lookups return cookies); live pairs stay redirected in the old map until they close, new connections go into the new one"},
	{Name: SockmapMapKebpfL7Stats, Version: statsLayout, Policy: pins.Migrate,
		Why: "counters (array: increments between the copy and Attach are lost)"},
	{Name: SockmapMapKebpfL7Lost, Version: lostLayout, Policy: pins.Migrate,
		Why: "lost-event counter (array); readers diff it"},
	{Name: SockmapMapKebpfL7Events, Version: eventsLayout, Policy: pins.Recreate,
		Why: "ring buffer: cannot be iterated; events not yet read are lost and trace readers must reopen the map"},
}, pins.SharedL7Versions...)
