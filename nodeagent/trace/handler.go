package trace

import (
	"encoding/json"
	"net/http"

	apiv1 "github.com/kubectl-ebpf/kubectl-ebpf/api/v1alpha1"
)

// Handler serves GET /trace: newline-delimited JSON, one apiv1.TraceLine
// per line, filtered by the query (see ParseQuery). Without follow=1 it
// sends the matching history and ends; with it the stream stays open. A bad
// query is a 400 with one line saying what is wrong.
func (h *Hub) Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		q, err := apiv1.ParseTraceQuery(r.URL.Query())
		if err != nil {
			http.Error(w, "trace: "+err.Error(), http.StatusBadRequest)
			return
		}
		sub := h.Subscribe(q)
		defer sub.Close()
		w.Header().Set("Content-Type", "application/x-ndjson")
		w.Header().Set("Cache-Control", "no-store")
		w.WriteHeader(http.StatusOK)
		rc := http.NewResponseController(w)
		enc := json.NewEncoder(w)
		flush := func() bool { return rc.Flush() == nil }
		if q.Follow && !flush() { // headers out: the client knows it is subscribed
			return
		}
		for {
			l, ok := sub.Next(r.Context())
			if !ok {
				return
			}
			if err := enc.Encode(l); err != nil {
				return // client gone
			}
			// Flush when the queue is drained, so a burst is one write and a
			// lone event reaches the client at once.
			if sub.Pending() == 0 && !flush() {
				return
			}
		}
	})
}
