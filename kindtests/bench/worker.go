//go:build linux

package bench

import (
	"encoding/json"
	"errors"
	"fmt"
)

// send writes one request to a worker; recv reads its answer. Requests are
// answered in order, so a caller may send, act (e.g. update a slice), then
// recv.
func (p *proc) send(req workerReq) error {
	b, err := json.Marshal(req)
	if err != nil {
		return err
	}
	if _, err := p.in.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("worker %s: %w", p.name, err)
	}
	return nil
}

func (p *proc) recv() (workerResp, error) {
	line, err := p.out.ReadBytes('\n')
	if err != nil {
		return workerResp{}, fmt.Errorf("worker %s: %w", p.name, err)
	}
	var r workerResp
	if err := json.Unmarshal(line, &r); err != nil {
		return r, fmt.Errorf("worker %s: %w", p.name, err)
	}
	if !r.OK {
		return r, errors.New(r.Err)
	}
	return r, nil
}

func (p *proc) call(req workerReq) (workerResp, error) {
	if err := p.send(req); err != nil {
		return workerResp{}, err
	}
	return p.recv()
}
