//go:build linux

package socklb

import (
	"sync"
	"testing"
)

// TestIntegrationApplyIsAtomicForReaders flips a service between two
// disjoint backend sets (each flip a generation swap) while a client
// connects in a loop: every connect must reach a backend of one of the
// sets, never fail and never see an empty or torn set.
func TestIntegrationApplyIsAtomicForReaders(t *testing.T) {
	ns, o, cg := rootLB(t, LoadOptions{})
	a := startServers(t, ns, "tcp", "127.0.0.1:0", 2)
	b := startServers(t, ns, "tcp", "127.0.0.1:0", 3)
	f := []Frontend{fe("10.96.6.1:80", TCP)}
	mustApply(t, o, Service{ID: 1, Frontends: f, Backends: backends(a...)})

	stop := make(chan struct{})
	var wg sync.WaitGroup
	flips := 0
	wg.Add(1)
	go func() {
		defer wg.Done()
		sets := [][]server{b, a, {b[2], a[0]}, a}
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			if err := o.Apply(Service{ID: 1, Frontends: f, Backends: backends(sets[i%len(sets)]...)}); err != nil {
				t.Errorf("apply: %v", err)
				return
			}
			flips++
		}
	}()
	res := runChild(t, cg, ns, op{Kind: "tcp", Dst: "10.96.6.1:80", Count: 3000})
	close(stop)
	wg.Wait()
	t.Logf("%d connects during %d Applies", len(res[0]), flips)
	if flips < 10 {
		t.Errorf("only %d Applies raced the client; the test proves little", flips)
	}
	checkFlow(t, res[0], flowWant{Servers: addrs(append(append([]server{}, a...), b...)...), All: true, Peer: "10.96.6.1:80"})
	if got := beEntries(t, o); got != 2 && got != 3 {
		t.Errorf("backend map holds %d slots after the race", got)
	}
}
