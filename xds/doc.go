// Package xds will hold the xDS server (envoyproxy/go-control-plane) that
// turns L7Policy objects into Envoy listeners, clusters and RBAC filters for
// the node-local Envoy (MISSION.md, "L7 steering to Envoy"). Nothing is built
// here yet: the foundation ships the cluster, the agent and the plugin first.
package xds
