package socklb

import (
	"encoding/binary"
	"net/netip"
	"testing"
	"time"
)

// TestParseEvent decodes a record laid out as struct lb_event; the root
// tests check the same layout against records the programs wrote.
func TestParseEvent(t *testing.T) {
	b := make([]byte, EventSize)
	ne := binary.NativeEndian
	ne.PutUint64(b[0:], 5e9)
	ne.PutUint64(b[8:], 77)
	ne.PutUint64(b[16:], 99)
	ne.PutUint32(b[24:], 1234)
	ne.PutUint32(b[28:], 1235)
	ne.PutUint32(b[32:], 42)
	b[36], b[37], b[38], b[39] = byte(VerdictTranslated), byte(HookConnect), byte(TCP), 4
	copy(b[40:], []byte{10, 96, 0, 1})
	copy(b[56:], []byte{10, 244, 1, 5})
	binary.BigEndian.PutUint16(b[72:], 80)
	binary.BigEndian.PutUint16(b[74:], 8080)
	copy(b[80:], "curl")
	ev, err := ParseEvent(b)
	if err != nil {
		t.Fatal(err)
	}
	want := Event{At: 5 * time.Second, CgroupID: 77, Cookie: 99, PID: 1234, TID: 1235, ServiceID: 42,
		Verdict: VerdictTranslated, Hook: HookConnect, Proto: TCP,
		Frontend: netip.MustParseAddrPort("10.96.0.1:80"), Backend: netip.MustParseAddrPort("10.244.1.5:8080"), Comm: "curl"}
	if ev != want {
		t.Errorf("got  %+v\nwant %+v", ev, want)
	}
	b[36], b[39] = byte(VerdictRefused), 6
	copy(b[40:56], netip.MustParseAddr("fd00::1").AsSlice())
	if ev, _ = ParseEvent(b); ev.Backend.IsValid() || ev.Frontend.Addr() != netip.MustParseAddr("fd00::1") {
		t.Errorf("refused v6: %+v", ev)
	}
	if _, err := ParseEvent(b[:95]); err == nil {
		t.Error("short record parsed")
	}
}
