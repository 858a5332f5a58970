//go:build linux

// Package netnsutil runs code inside another network namespace, for the few
// things that must be created there: sockets (netlink, TCP, UDP) and BPF
// iterators, which keep the namespace of the thread that opened them. Links,
// routes, qdiscs and filters of another namespace go through a netlink
// handle made for it (netlink.NewHandleAt) instead: no thread switching.
//
// Built on github.com/vishvananda/netns; the agent, the BPF tests and the
// benchmark all switch namespaces through here.
package netnsutil

import (
	"errors"
	"fmt"
	"path/filepath"
	"runtime"

	"github.com/vishvananda/netns"
)

// Dir holds the named network namespaces (`ip netns`).
const Dir = "/run/netns"

// Path is the bind-mount path of the named namespace name.
func Path(name string) string { return filepath.Join(Dir, name) }

// Do runs fn on an OS thread switched into the network namespace at path
// ("" runs fn directly, in the caller's namespace). Only fn's own
// goroutine is in the namespace: goroutines it starts are not, but sockets
// it opens stay there after it returns.
func Do(path string, fn func() error) error {
	if path == "" {
		return fn()
	}
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", path, err)
	}
	defer ns.Close()
	return doNs(ns, path, fn)
}

// DoNs is Do for an open namespace handle. fn's error is returned as is.
func DoNs(ns netns.NsHandle, fn func() error) error { return doNs(ns, ns.String(), fn) }

func doNs(ns netns.NsHandle, name string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		// The thread is unlocked only once back in its own namespace: if
		// switching back fails it stays locked and Go retires it with this
		// goroutine instead of handing it to others in a foreign namespace.
		runtime.LockOSThread()
		errc <- doLocked(ns, name, fn)
	}()
	return <-errc
}

func doLocked(ns netns.NsHandle, name string, fn func() error) error {
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("open own netns: %w", err)
	}
	defer orig.Close()
	if err := netns.Set(ns); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("enter netns %s: %w", name, err)
	}
	ferr := fn()
	if err := netns.Set(orig); err != nil {
		return errors.Join(ferr, fmt.Errorf("leave netns %s: %w", name, err))
	}
	runtime.UnlockOSThread()
	return ferr
}

// Create makes the named namespace name (as `ip netns add` does) and
// returns its path. The calling thread stays where it is.
func Create(name string) (string, error) {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		errc <- createLocked(name)
	}()
	if err := <-errc; err != nil {
		return "", fmt.Errorf("create netns %s: %w", name, err)
	}
	return Path(name), nil
}

func createLocked(name string) error {
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer orig.Close()
	// NewNamed moves this thread into the new namespace.
	ns, err := netns.NewNamed(name)
	if err == nil {
		ns.Close()
	}
	if serr := netns.Set(orig); serr != nil {
		return errors.Join(err, fmt.Errorf("leave: %w", serr))
	}
	runtime.UnlockOSThread()
	return err
}

// Delete removes the named namespace name (as `ip netns del` does).
func Delete(name string) error {
	if err := netns.DeleteNamed(name); err != nil {
		return fmt.Errorf("delete netns %s: %w", name, err)
	}
	return nil
}
