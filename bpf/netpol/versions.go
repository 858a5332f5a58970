//go:build linux

package netpol

import "github.com/kubectl-ebpf/kubectl-ebpf/bpf/pins"

// Layout versions of the pinned maps' key and value structs (netpol.c). An
// upgrade that changes a struct bumps its version and adds a pins.Upgrade
// from the previous one to mapVersions; a size option (LoadOptions) needs
// neither: the entries are copied as they are.
const (
	epLayout   = 1 // u32 ifindex -> struct ep_val
	ipLayout   = 1 // struct addr_key -> u32 ifindex
	polLayout  = 1 // struct pol_key -> struct pol_val
	ctLayout   = 1 // struct ct_key -> struct ct_val
	hostLayout = 1 // struct addr_key -> u8
	cntLayout  = 1 // u32 endpoint id -> per-CPU struct ep_counters
	verdLayout = 1 // struct ct_key -> struct verdict_val
	l7Layout   = 1 // u32 slot -> per-CPU u64
	lostLayout = 1 // u32 0 -> per-CPU u64
	evLayout   = 1 // ring buffer of struct event
)

// mapVersions is what an upgrade does with each pinned map whose layout
// changed (pins.MigrateMaps): every pinned map of the spec is listed
// (TestMapVersionsCoverSpec). Policy and endpoint maps are written only by
// the agent, so one copy before the load is exact. Maps the programs write
// get the catch-up after the links switch: a flow the old programs opened
// meanwhile is kept; increments to an entry that was already copied
// (counters) or a state change of a copied flow are lost — a few packets'
// worth, where starting empty would drop every established flow's entry
// and re-judge it.
var mapVersions = append([]pins.VersionedMap{
	{Name: NetpolMapKebpfNpEp, Version: epLayout, Policy: pins.Migrate,
		Why: "endpoints: written only by the agent; losing them unprotects every pod"},
	{Name: NetpolMapKebpfNpIp, Version: ipLayout, Policy: pins.Migrate,
		Why: "pod addresses: written only by the agent"},
	{Name: NetpolMapKebpfNpPol, Version: polLayout, Policy: pins.Migrate,
		Why: "policy entries: written only by the agent; losing them denies or allows wrongly until the next sync"},
	{Name: NetpolMapKebpfNpHost, Version: hostLayout, Policy: pins.Migrate,
		Why: "node addresses: written only by the agent"},
	{Name: NetpolMapKebpfNpCt, Version: ctLayout, Policy: pins.MigrateCatchUp,
		Why: "conntrack: the programs open flows until the links switch; a lost entry re-judges an established flow"},
	{Name: NetpolMapKebpfNpCnt, Version: cntLayout, Policy: pins.MigrateCatchUp,
		Why: "per-endpoint counters: the programs create an endpoint's entry on its first packet"},
	{Name: NetpolMapKebpfNpVerd, Version: verdLayout, Policy: pins.MigrateCatchUp,
		Why: "last verdict per flow (trace/explain): written by the programs"},
	{Name: NetpolMapKebpfNpL7, Version: l7Layout, Policy: pins.Migrate,
		Why: "L7 steering counters (array: every slot exists, no catch-up possible)"},
	{Name: NetpolMapKebpfNpLost, Version: lostLayout, Policy: pins.Migrate,
		Why: "lost-event counter (array); readers diff it"},
	{Name: NetpolMapKebpfNpEvents, Version: evLayout, Policy: pins.Recreate,
		Why: "ring buffer: cannot be iterated; events not yet read are lost and trace readers must reopen the map"},
}, pins.SharedL7Versions...)
