package sockmap

// bpf2go already passes -fdebug-prefix-map/-fdebug-compilation-dir and strips
// DWARF, so the committed object is byte-identical wherever it is regenerated.
//go:generate go tool bpf2go -cc clang-19 -strip llvm-strip-19 -cflags "-O2 -g -Wall -Werror" -target bpfel -tags linux Sockmap sockmap.c -- -I/usr/include/x86_64-linux-gnu
