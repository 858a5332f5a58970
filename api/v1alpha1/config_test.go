package v1alpha1

import (
	"reflect"
	"slices"
	"strings"
	"testing"
)

func TestParseConfig(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    map[string]bool
		wantErr string
	}{
		{name: "all on", in: "features:\n  sockstats: true\n  service-lb: true\n",
			want: map[string]bool{"sockstats": true, "service-lb": true}},
		{name: "one off", in: "features:\n  sockstats: true\n  service-lb: false\n",
			want: map[string]bool{"sockstats": true, "service-lb": false}},
		{name: "missing feature means off", in: "features:\n  sockstats: true\n",
			want: map[string]bool{"sockstats": true}},
		{name: "no features", in: "features: {}\n", want: map[string]bool{}},
		{name: "unknown feature", in: "features:\n  sockstat: true\n", wantErr: "unknown feature(s) sockstat (known: sockstats, service-lb, policy, l7)"},
		{name: "unknown field", in: "feature:\n  sockstats: true\n", wantErr: "unknown field"},
		{name: "not a bool", in: "features:\n  sockstats: maybe\n", wantErr: "parse config.yaml"},
		{name: "empty", in: "  \n", wantErr: "empty"},
		{name: "garbage", in: "[", wantErr: "parse config.yaml"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := ParseConfig([]byte(tt.in))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("ParseConfig = %v, %v; want error containing %q", c, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(c.Features, tt.want) {
				t.Errorf("features = %v, want %v", c.Features, tt.want)
			}
		})
	}
}

func TestDefaultConfigRoundTrip(t *testing.T) {
	d := DefaultConfig()
	for _, f := range KnownFeatures {
		if want := !slices.Contains(DefaultOffFeatures, f); d.Enabled(f) != want {
			t.Errorf("default config: %s enabled %v, want %v", f, d.Enabled(f), want)
		}
	}
	b, err := d.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if want := "features:\n  l7: false\n  policy: true\n  service-lb: true\n  sockstats: true\n"; string(b) != want {
		t.Errorf("Marshal = %q, want %q", b, want)
	}
	back, err := ParseConfig(b)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(back, d) {
		t.Errorf("round trip = %v, want %v", back, d)
	}
	if b, _ := (AgentConfig{}).Marshal(); string(b) != "features: {}\n" {
		t.Errorf("empty Marshal = %q", b)
	}
}
