//go:build !linux

package netpol

import (
	"errors"
	"net/netip"
)

type noInterfaces struct{}

func (noInterfaces) IfIndex([]netip.Addr) (int, error) {
	return 0, errors.New("pod interfaces: linux only")
}

func defaultInterfaces() Interfaces { return noInterfaces{} }
