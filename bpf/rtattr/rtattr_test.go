//go:build linux

package rtattr

import (
	"bytes"
	"slices"
	"testing"

	"golang.org/x/sys/unix"
)

func TestRoundTrip(t *testing.T) {
	msg := slices.Concat(String(unix.TCA_KIND, "bpf"), U32(unix.TCA_CHAIN, 7),
		Bytes(unix.TCA_OPTIONS|unix.NLA_F_NESTED, String(1, "kebpf_np_from")))
	got := Parse(msg)
	if len(got) != 3 {
		t.Fatalf("parsed %d attrs from %x", len(got), msg)
	}
	if got[0].Type != unix.TCA_KIND || string(got[0].Value) != "bpf\x00" {
		t.Errorf("kind %+v", got[0])
	}
	if got[1].Type != unix.TCA_CHAIN || !bytes.Equal(got[1].Value, []byte{7, 0, 0, 0}) {
		t.Errorf("chain %+v", got[1])
	}
	if got[2].Type != unix.TCA_OPTIONS {
		t.Errorf("nested type keeps NLA_F_NESTED: %#x", got[2].Type)
	}
	if inner := Parse(got[2].Value); len(inner) != 1 || string(inner[0].Value) != "kebpf_np_from\x00" {
		t.Errorf("nested %+v", inner)
	}
}

func TestParseStopsAtMalformed(t *testing.T) {
	good := String(unix.TCA_KIND, "bpf")
	for name, tail := range map[string][]byte{
		"short header":        {1, 0},
		"length below header": {2, 0, 1, 0},
		"length past end":     {40, 0, 1, 0, 'x'},
	} {
		if got := Parse(append(slices.Clone(good), tail...)); len(got) != 1 {
			t.Errorf("%s: parsed %d attrs, want the good one only", name, len(got))
		}
	}
	if got := Parse(nil); got != nil {
		t.Errorf("nil: %v", got)
	}
}
