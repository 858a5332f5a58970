package servicelb

import (
	"testing"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
)

func TestTrackerServices(t *testing.T) {
	a := service("ns", "web")
	aMeta := a.DeepCopy()
	aMeta.ResourceVersion = "2" // metadata-only change
	b := service("ns", "web", clusterIPs("10.96.0.11"))
	name := types.NamespacedName{Namespace: "ns", Name: "web"}

	tests := []struct {
		name    string
		events  [][2]*v1.Service // previous, current
		want    bool             // a change pending at the end
		wantCur *v1.Service
	}{
		{name: "add", events: [][2]*v1.Service{{nil, a}}, want: true, wantCur: a},
		{name: "update", events: [][2]*v1.Service{{a, b}}, want: true, wantCur: b},
		{name: "delete", events: [][2]*v1.Service{{a, nil}}, want: true, wantCur: nil},
		{name: "no-op update is dropped", events: [][2]*v1.Service{{a, aMeta}}, want: false},
		{name: "update and back is dropped", events: [][2]*v1.Service{{a, b}, {b, a}}, want: false},
		{name: "add then delete is dropped", events: [][2]*v1.Service{{nil, a}, {a, nil}}, want: false},
		{name: "delete then add differently keeps the latest", events: [][2]*v1.Service{{a, nil}, {nil, b}}, want: true, wantCur: b},
		{name: "two updates keep the latest", events: [][2]*v1.Service{{a, aMeta}, {aMeta, b}}, want: true, wantCur: b},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tr := NewTracker()
			var pending bool
			for _, e := range tt.events {
				pending = tr.RecordService(e[0], e[1])
			}
			if pending != tt.want {
				t.Errorf("last Record = %v, want %v", pending, tt.want)
			}
			c := tr.Take()
			cur, ok := c.Services[name]
			if ok != tt.want {
				t.Fatalf("Take has change = %v, want %v (%+v)", ok, tt.want, c)
			}
			if ok && cur != tt.wantCur {
				t.Errorf("current = %v, want %v", cur, tt.wantCur)
			}
			if !tr.Take().Empty() || tr.Pending() != 0 {
				t.Error("Take did not empty the tracker")
			}
		})
	}
}

func TestTrackerSlicesAndNode(t *testing.T) {
	tr := NewTracker()
	s1 := epSlice("ns", "web", "web-1", v4, slicePorts("http", v1.ProtocolTCP, 8080), ep("10.244.0.4"))
	s1b := s1.DeepCopy()
	s1b.ResourceVersion = "7"
	s2 := epSlice("ns", "web", "web-1", v4, slicePorts("http", v1.ProtocolTCP, 8080), ep("10.244.0.5"))
	if tr.RecordSlice(nil, s1) != true || tr.RecordSlice(s1, s1b) != true {
		t.Fatal("add then metadata update should stay pending (previous is nil)")
	}
	c := tr.Take()
	if c.Slices[types.NamespacedName{Namespace: "ns", Name: "web-1"}] != s1b {
		t.Errorf("slice current = %v", c.Slices)
	}
	if tr.RecordSlice(s1b, s1) {
		t.Error("metadata-only slice update not dropped")
	}
	if !tr.RecordSlice(s1, s2) {
		t.Error("endpoint change not recorded")
	}
	c = tr.Take()
	if c.PreviousSlices[types.NamespacedName{Namespace: "ns", Name: "web-1"}] != s1 {
		t.Errorf("previous slice = %v, want s1", c.PreviousSlices)
	}

	n1 := &v1.Node{Status: v1.NodeStatus{Addresses: []v1.NodeAddress{{Type: v1.NodeInternalIP, Address: "172.18.0.2"}}}}
	n1.Name = "node-a"
	n1b := n1.DeepCopy()
	n1b.Status.Conditions = []v1.NodeCondition{{Type: v1.NodeReady}}
	n2 := n1.DeepCopy()
	n2.Status.Addresses[0].Address = "172.18.0.3"
	if !tr.RecordNode(nil, n1) {
		t.Error("node add not recorded")
	}
	tr.Take()
	if tr.RecordNode(n1, n1b) {
		t.Error("node status change without new IPs recorded")
	}
	if !tr.RecordNode(n1b, n2) {
		t.Error("node IP change not recorded")
	}
	if c := tr.Take(); !c.Nodes {
		t.Errorf("node change not taken: %+v", c)
	}
	other := n1.DeepCopy()
	other.Name = "node-b"
	if !tr.RecordNode(nil, other) {
		t.Error("another node's add not recorded (its IPs are NodePort frontends too)")
	}
	tr.Take()
	if !tr.RecordNode(other, nil) {
		t.Error("another node's delete not recorded")
	}
}
