//go:build linux

package sockmap

import (
	"errors"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/bpftest"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/netnsutil"
	"github.com/kubectl-ebpf/kubectl-ebpf/bpf/pins"
)

// TestEnvoyAncestorCgroup: the agent registers the Envoy pod's cgroup; a
// process in a container cgroup below it (a restarted container nobody
// registered) is Envoy too, at any depth, while a sibling of the pod cgroup
// is still steered.
func TestEnvoyAncestorCgroup(t *testing.T) {
	r := newRig(t)
	if err := r.o.DeleteEnvoyCgroup(cgroupID(t, r.envoy)); err != nil {
		t.Fatal(err)
	}
	podCg := subCgroup(t, r.cg, "envoypod")
	ctr := subCgroup(t, podCg, "ctr")
	deep := subCgroup(t, subCgroup(t, ctr, "a"), "b")
	if err := r.o.AddEnvoyCgroup(cgroupID(t, podCg)); err != nil {
		t.Fatal(err)
	}
	for _, dir := range []string{podCg, ctr, deep} {
		r.connects(t, dir, false, "from "+strings.TrimPrefix(dir, r.cg)+" (Envoy pod cgroup or below; Envoy would loop to itself)")
	}
	r.connects(t, r.envoy, true, "unregistered sibling")
	if s := stats(t, r.o); s.EnvoySkipped != 3 || s.Steered != 1 {
		t.Fatalf("stats = %+v, want EnvoySkipped 3, Steered 1", s)
	}
	// Unregistering the pod cgroup makes its containers ordinary clients.
	if err := r.o.DeleteEnvoyCgroup(cgroupID(t, podCg)); err != nil {
		t.Fatal(err)
	}
	r.connects(t, ctr, true, "after DeleteEnvoyCgroup")
}

// connects dials the pod from a socket of cgroup dir and checks it reached
// Envoy (steered) or the pod itself, accepting it there.
func (r *rig) connects(t *testing.T, dir string, steered bool, what string) {
	t.Helper()
	want, ln := r.podAddr, r.pod
	if steered {
		want, ln = r.envoyAdr, r.envoyLn
	}
	c, err := dialFrom(t, dir, r.podAddr)
	if err != nil {
		t.Fatalf("%s: dial %s: %v", what, r.podAddr, err)
	}
	if got := addrPort(c.RemoteAddr()); got != want {
		t.Fatalf("%s: connected to %s, want %s (steered %v)", what, got, want, steered)
	}
	accept(t, ln)
}

// TestOrigBeforeSYN: the original destination is keyed by Envoy's tuple
// before the SYN leaves (bpf/netpol judges the SYN by it), and a connect
// that never establishes does not leave it behind: it goes when the socket
// closes from SYN_SENT, or when the connect is refused.
func TestOrigBeforeSYN(t *testing.T) {
	r := newRig(t)

	t.Run("SYN into a black hole", func(t *testing.T) {
		// A namespace whose route to Envoy ends in a veth whose peer is
		// down (a static neighbour, so no ARP wait): the SYN is sent and
		// dropped, the socket stays in SYN_SENT.
		ns := bpftest.Netns(t, "kebpf-l7-")
		for _, c := range [][]string{
			{"ip", "-n", ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1"},
			{"ip", "-n", ns, "addr", "add", "10.126.0.2/24", "dev", "v0"},
			{"ip", "-n", ns, "link", "set", "v0", "up"},
			{"ip", "-n", ns, "neigh", "add", "10.126.0.1", "lladdr", "02:00:00:00:00:01", "dev", "v0", "nud", "permanent"},
			{"ip", "-n", ns, "link", "set", "lo", "up"},
		} {
			if out, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
				t.Fatalf("%v: %v\n%s", c, err, out)
			}
		}
		envoy := netip.MustParseAddrPort("10.126.0.1:15001")
		if err := r.o.SetEnvoy(Envoy{Listener: envoy}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.o.SetEnvoy(Envoy{Listener: r.envoyAdr}) })
		var fd int
		var cerr error
		inCgroup(t, r.app, func() {
			cerr = netnsutil.Do(netnsutil.Path(ns), func() error {
				var err error
				fd, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
				if err != nil {
					return err
				}
				return unix.Connect(fd, &unix.SockaddrInet4{Port: int(r.podAddr.Port()), Addr: r.podAddr.Addr().As4()})
			})
		})
		if !errors.Is(cerr, unix.EINPROGRESS) {
			unix.Close(fd)
			t.Fatalf("non-blocking connect: %v, want EINPROGRESS", cerr)
		}
		f := os.NewFile(uintptr(fd), "syn-sent")
		defer f.Close()
		sa, err := unix.Getsockname(fd)
		if err != nil {
			t.Fatal(err)
		}
		s4 := sa.(*unix.SockaddrInet4)
		client := netip.AddrPortFrom(netip.AddrFrom4(s4.Addr), uint16(s4.Port))
		info, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
		if err != nil {
			t.Fatal(err)
		}
		if info.State != 2 { // TCP_SYN_SENT
			t.Fatalf("socket state %d, want SYN_SENT", info.State)
		}
		envoyEnd := Pair{Local: envoy, Remote: client}
		if d, ok, err := r.o.OrigDst(envoyEnd); err != nil || !ok || d != r.podAddr {
			t.Fatalf("in SYN_SENT: OrigDst(%v) = %s %v %v, want %s keyed before any answer", envoyEnd, d, ok, err, r.podAddr)
		}
		before := stats(t, r.o).Closed
		f.Close()
		waitFor(t, "original destination dropped after closing in SYN_SENT", func() bool {
			_, ok, err := r.o.OrigDst(envoyEnd)
			return err == nil && !ok
		})
		if s := stats(t, r.o); s.Closed != before+1 {
			t.Fatalf("stats = %+v, want Closed %d", s, before+1)
		}
	})

	t.Run("refused", func(t *testing.T) {
		// Envoy's port with nothing listening: RST, ECONNREFUSED.
		closed := listen(t, "127.0.0.1:0")
		dead := addrPort(closed.Addr())
		closed.Close()
		if err := r.o.SetEnvoy(Envoy{Listener: dead}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.o.SetEnvoy(Envoy{Listener: r.envoyAdr}) })
		before := stats(t, r.o)
		if _, err := dialFrom(t, r.app, r.podAddr); !errors.Is(err, unix.ECONNREFUSED) {
			t.Fatalf("dial with Envoy's port closed: %v, want ECONNREFUSED", err)
		}
		s := stats(t, r.o)
		if s.Steered != before.Steered+1 || s.Closed != before.Closed+1 {
			t.Fatalf("stats = %+v, want one more Steered and Closed than %+v", s, before)
		}
		if n := entries(t, r.o.objs.KebpfL7Orig) + entries(t, r.o.objs.KebpfL7Cookie); n != 0 {
			t.Fatalf("%d original-destination entries left after a refused connect", n)
		}
	})
}

func entries(t *testing.T, m *ebpf.Map) int {
	t.Helper()
	n := 0
	for k, err := m.NextKeyBytes(nil); k != nil || err != nil; k, err = m.NextKeyBytes(k) {
		if err != nil {
			t.Fatal(err)
		}
		n++
	}
	return n
}

// TestSharedMapsSurviveDetach: Detach and DetachPinned clear the maps
// bpf/netpol shares but leave them pinned (a loaded netpol keeps using the
// same maps), and unpin the rest; a later Load reuses the cleared maps.
func TestSharedMapsSurviveDetach(t *testing.T) {
	r := newRig(t)
	r.connects(t, r.app, true, "before Detach")
	shared, err := ebpf.LoadPinnedMap(filepath.Join(MapPinDir(r.pinDir), SockmapMapKebpfL7Dst), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer shared.Close()
	sharedInfo, err := shared.Info()
	if err != nil {
		t.Fatal(err)
	}
	sharedID, _ := sharedInfo.ID()

	check := func(t *testing.T, what string) {
		t.Helper()
		for _, p := range SharedMapPinPaths(r.pinDir) {
			m, err := ebpf.LoadPinnedMap(p, nil)
			if err != nil {
				t.Fatalf("after %s: shared map %s: %v", what, filepath.Base(p), err)
			}
			if m.Type() == ebpf.Array {
				var v uint32
				if err := m.Lookup(uint32(0), &v); err != nil || v != 0 {
					t.Errorf("after %s: %s = %d %v, want 0", what, filepath.Base(p), v, err)
				}
			} else if n := entries(t, m); n != 0 {
				t.Errorf("after %s: shared map %s has %d entries, want 0", what, filepath.Base(p), n)
			}
			m.Close()
		}
		for _, p := range pins.MapPaths(r.pinDir, ownMaps) {
			if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("after %s: %s still pinned", what, filepath.Base(p))
			}
		}
	}
	if err := r.o.Detach(); err != nil {
		t.Fatal(err)
	}
	check(t, "Detach")

	o2, err := Load(r.pinDir)
	if err != nil {
		t.Fatal(err)
	}
	defer o2.Close()
	info, err := o2.objs.KebpfL7Dst.Info()
	if err != nil {
		t.Fatal(err)
	}
	if id, _ := info.ID(); id != sharedID {
		t.Fatalf("re-Load created %s anew (id %d, was %d)", SockmapMapKebpfL7Dst, id, sharedID)
	}
	r.program(t, o2)
	if err := o2.Attach(r.cg); err != nil {
		t.Fatal(err)
	}
	r.connects(t, r.app, true, "after re-Load on the cleared shared maps")
	if err := DetachPinned(r.pinDir); err != nil {
		t.Fatal(err)
	}
	check(t, "DetachPinned")
	r.connects(t, r.app, false, "after DetachPinned")
}
