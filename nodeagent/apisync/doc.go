// Package apisync is the machinery every datapath sync of the agent shares,
// after kube-proxy's proxiers: informer event handlers only record changes
// in a change tracker (ChangeSet) and request a run; one bounded-frequency
// Runner applies the accumulated delta, falling back to a full resync after
// a failure; Intervals carries the runner's defaults and EventRecorder
// writes Kubernetes Events about the objects a sync could not program.
//
// A feature's sync (nodeagent/servicelb, nodeagent/netpol, and the next
// ones) only says which objects it watches, what of them matters (the
// equality a ChangeSet drops no-op updates by) and how to program a delta.
package apisync
