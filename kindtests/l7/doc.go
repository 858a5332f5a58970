// Package l7 holds the root-tier tests of the whole single-node L7 path
// with real parts: the bpf/sockmap datapath steering connections to a real
// Envoy configured only by the xds server. They live here, not in xds/ or
// bpf/, because they join both (xds never touches BPF, bpf imports nothing
// of ours outside bpf/). The wiring they share with the benchmark's L7 rows
// (kindtests/bench) is in path.go.
package l7
