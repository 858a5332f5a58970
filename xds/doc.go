// Package xds is the xDS server (envoyproxy/go-control-plane) that turns
// L7Policy objects into the configuration of the node-local Envoy: one
// listener with the original_dst listener filter, one filter chain per
// steered pod:port with an HTTP connection manager, an RBAC filter (one
// policy per L7Policy rule) and the router, and an ORIGINAL_DST cluster.
// Build is pure; Lint deep-validates what Build makes; Server serves ADS
// (state of the world and delta) over a unix socket and never resends a
// version an Envoy rejected. README.md has the design.
package xds
