package images

import (
	"archive/tar"
	"context"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/kubectl-ebpf/kubectl-ebpf/xds/envoytest"
)

// An image of several files in several directories, one of them read
// through a symlink (as /lib64/ld-linux-x86-64.so.2 is on the host).
func TestBuildBinaryImageSeveralFiles(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	bin := write("envoy", "ELF envoy")
	libc := write("libc.so.6", "ELF libc")
	loader := write("ld.so", "ELF loader")
	link := filepath.Join(dir, "ld-link")
	if err := os.Symlink(loader, link); err != nil {
		t.Fatal(err)
	}
	files := map[string]string{
		"/usr/local/bin/envoy":                 bin,
		"/lib/x86_64-linux-gnu/libc.so.6":      libc,
		"/lib/x86_64-linux-gnu/libm.so.6":      libc,
		"/lib64/ld-linux-x86-64.so.2":          link,
		"usr/local/bin/../bin/kebpf-agent-ish": bin,
	}
	out := filepath.Join(dir, "img.tar")
	ref := "localhost/kubectl-ebpf/envoy:test"
	if err := BuildBinaryImage(context.Background(), ref, files, []string{"/usr/local/bin/envoy"}, out); err != nil {
		t.Fatal(err)
	}
	tag, _ := name.NewTag(ref)
	img, err := tarball.ImageFromPath(out, &tag)
	if err != nil {
		t.Fatal(err)
	}
	layers, err := img.Layers()
	if err != nil || len(layers) != 1 {
		t.Fatalf("layers = %d, %v", len(layers), err)
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	tr := tar.NewReader(rc)
	var names []string
	content := map[string]string{}
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, h.Name)
		if h.Typeflag == tar.TypeReg {
			b, _ := io.ReadAll(tr)
			content[h.Name] = string(b)
			if h.Mode != 0o755 {
				t.Errorf("%s mode %o", h.Name, h.Mode)
			}
		}
	}
	want := []string{
		"lib/", "lib/x86_64-linux-gnu/", "lib/x86_64-linux-gnu/libc.so.6", "lib/x86_64-linux-gnu/libm.so.6",
		"lib64/", "lib64/ld-linux-x86-64.so.2",
		"usr/", "usr/local/", "usr/local/bin/", "usr/local/bin/envoy", "usr/local/bin/kebpf-agent-ish",
	}
	slices.Sort(names)
	if !slices.Equal(names, want) {
		t.Errorf("layer entries:\n%v\nwant (each directory once):\n%v", names, want)
	}
	if content["lib64/ld-linux-x86-64.so.2"] != "ELF loader" || content["usr/local/bin/envoy"] != "ELF envoy" {
		t.Errorf("content %v: the symlink must be copied as its target", content)
	}

	// A directory or a missing file is an error, not an empty entry.
	for _, src := range []string{dir, filepath.Join(dir, "missing")} {
		if err := BuildBinaryImage(context.Background(), ref, map[string]string{"/x": src}, []string{"/x"}, out); err == nil {
			t.Errorf("source %s: no error", src)
		}
	}
}

func TestParseLDD(t *testing.T) {
	tests := []struct {
		name, out string
		want      []string
		wantErr   string
	}{
		{name: "envoy 1.40 on Debian", out: `	linux-vdso.so.1 (0x00007f159d4db000)
	libm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x00007f1596320000)
	librt.so.1 => /lib/x86_64-linux-gnu/librt.so.1 (0x00007f159d4c5000)
	libdl.so.2 => /lib/x86_64-linux-gnu/libdl.so.2 (0x00007f159d4c0000)
	libpthread.so.0 => /lib/x86_64-linux-gnu/libpthread.so.0 (0x00007f159d4bb000)
	libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f159613e000)
	/lib64/ld-linux-x86-64.so.2 (0x00007f159d4dd000)
`, want: []string{"/lib/x86_64-linux-gnu/libm.so.6", "/lib/x86_64-linux-gnu/librt.so.1", "/lib/x86_64-linux-gnu/libdl.so.2",
			"/lib/x86_64-linux-gnu/libpthread.so.0", "/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"}},
		{name: "old glibc prints the vDSO with an arrow", out: "\tlinux-vdso.so.1 =>  (0x00007ffd)\n\tlibc.so.6 => /lib64/libc.so.6 (0x1)\n",
			want: []string{"/lib64/libc.so.6"}},
		{name: "missing library", out: "\tlibfoo.so.1 => not found\n\tlibc.so.6 => /lib/libc.so.6 (0x1)\n", wantErr: "ldd: libfoo.so.1 not found"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseLDD(tt.out)
			if tt.wantErr != "" {
				if err == nil || err.Error() != tt.wantErr {
					t.Errorf("err = %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil || !slices.Equal(got, tt.want) {
				t.Errorf("got %v, %v\nwant %v", got, err, tt.want)
			}
		})
	}
}

func TestEnvoyVersion(t *testing.T) {
	v, err := envoyVersion("\nenvoy  version: 7b8baff1758f0a584dcc3cb657b5032000bcb3d7/1.40.0/Clean/RELEASE/BoringSSL\n\n")
	if err != nil || v != "1.40.0" {
		t.Errorf("version %q, %v", v, err)
	}
	if _, err := envoyVersion("command not found"); err == nil {
		t.Error("no error for output without a version")
	}
}

// The real Envoy of .ci/deps: its image holds it and every library ldd names.
func TestEnvoyImageFiles(t *testing.T) {
	if p, _ := envoytest.Binary(); p == "" && testing.Short() {
		t.Skip("no Envoy installed (make deps); not required under -short")
	}
	ctx := context.Background()
	bin, version, err := EnvoyBinary(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if version != envoytest.Version {
		t.Logf("Envoy %s, the pinned one is %s", version, envoytest.Version)
	}
	files, err := envoyImageFiles(ctx, bin)
	if err != nil {
		t.Fatal(err)
	}
	if files[EnvoyImagePath] != bin {
		t.Errorf("envoy at %s = %q", EnvoyImagePath, files[EnvoyImagePath])
	}
	var loader, libc bool
	for p := range files {
		loader = loader || strings.Contains(p, "ld-linux")
		libc = libc || strings.HasSuffix(p, "/libc.so.6")
	}
	if !loader || !libc {
		t.Errorf("image files %v lack the loader or libc", files)
	}
}
