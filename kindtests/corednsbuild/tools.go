//go:build tools

// Package corednsbuild pins the CoreDNS release the Docker-free local cluster
// runs as its cluster DNS. It is a separate module so CoreDNS's dependencies
// (cloud SDKs, its own client-go) never enter the product's module graph.
package corednsbuild

import (
	_ "github.com/coredns/coredns"
)
