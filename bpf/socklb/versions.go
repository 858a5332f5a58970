//go:build linux

package socklb

import "github.com/kubectl-ebpf/kubectl-ebpf/bpf/pins"

// Layout versions of the pinned maps' key and value structs (socklb.c).
// An upgrade that changes a struct bumps its version and adds a
// pins.Upgrade from the previous one to mapVersions; a size option
// (LoadOptions) needs neither.
const (
	svcLayout    = 1 // struct svc4_key / svc6_key -> struct svc_val
	beLayout     = 1 // struct be_key -> struct be_val
	affLayout    = 1 // struct aff_key -> struct aff_val
	revLayout    = 1 // struct rev_key -> struct rev_val
	statsLayout  = 1 // u32 STAT_* -> per-CPU u64
	eventsLayout = 1 // ring buffer of struct lb_event
	lostLayout   = 1 // u32 0 -> per-CPU u64
	cfgLayout    = 1 // u32 0 -> struct lb_cfg
)

// mapVersions is what an upgrade does with each pinned map whose layout
// changed (pins.MigrateMaps); every pinned map is listed
// (TestMapVersionsCoverSpec). Services and backends are written only by
// the agent: one copy is exact, and losing them would send every connect
// to a VIP nowhere until the next sync. The affinity and rev-NAT maps are
// written by the connect/sendmsg programs until Attach switches the links:
// the catch-up keeps the sockets connected meanwhile showing their VIP.
var mapVersions = []pins.VersionedMap{
	{Name: SocklbMapKebpfLbSvc4, Version: svcLayout, Policy: pins.Migrate,
		Why: "IPv4 frontends: written only by the agent"},
	{Name: SocklbMapKebpfLbSvc6, Version: svcLayout, Policy: pins.Migrate,
		Why: "IPv6 frontends: written only by the agent"},
	{Name: SocklbMapKebpfLbBe, Version: beLayout, Policy: pins.Migrate,
		Why: "backend slots: written only by the agent"},
	{Name: SocklbMapKebpfLbAff, Version: affLayout, Policy: pins.MigrateCatchUp,
		Why: "ClientIP affinity: the programs pick and refresh backends"},
	{Name: SocklbMapKebpfLbRev, Version: revLayout, Policy: pins.MigrateCatchUp,
		Why: "reverse NAT of live sockets (getpeername, recvmsg): written at connect/sendmsg by the programs"},
	{Name: SocklbMapKebpfLbStats, Version: statsLayout, Policy: pins.Migrate,
		Why: "verdict counters (array: increments between the copy and Attach are lost)"},
	{Name: SocklbMapKebpfLbLost, Version: lostLayout, Policy: pins.Migrate,
		Why: "lost-event counter (array); readers diff it"},
	{Name: SocklbMapKebpfLbCfg, Version: cfgLayout, Policy: pins.Migrate,
		Why: "the trace switch, written only by the agent"},
	{Name: SocklbMapKebpfLbEvents, Version: eventsLayout, Policy: pins.Recreate,
		Why: "ring buffer: cannot be iterated; events not yet read are lost and trace readers must reopen the map"},
}
