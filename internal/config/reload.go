package config

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"path/filepath"
	"reflect"
	"sync"
	"time"

	"github.com/fsnotify/fsnotify"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/keygate/broker/internal/broker"
	"github.com/keygate/broker/internal/inject"
)

// reloadState is what a reload needs from the running broker.
type reloadState struct {
	mu          sync.Mutex // one reload at a time
	cfg         *Config    // the file as last applied
	clock       broker.Clock
	chain       broker.Attestor
	credMetrics *inject.Metrics
	roots       *x509.CertPool // upstream roots for sources' own clients; egress needs a restart
	counter     *prometheus.CounterVec
	// vaults are the running Vault connections (restart-only); reloaded
	// vault credentials are built on them.
	vaults map[string]*inject.Vault
	// closers are the serving sources that hold leases; a reload closes
	// the ones it replaces.
	closers []inject.Closer
	log     *zap.Logger
}

// replacedGrace is how long a reload lets requests that still use a
// replaced source's cached lease finish before revoking it anyway.
const replacedGrace = time.Minute

func newReloadCounter(reg prometheus.Registerer) *prometheus.CounterVec {
	c := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "keygate_config_reloads_total",
		Help: "Config reloads, by result (success or failure).",
	}, []string{"result"})
	reg.MustRegister(c)
	return c
}

// Reload re-reads the config file and, when the whole file decodes,
// validates and compiles, swaps in its rules and credentials atomically.
// Any problem leaves the last good config serving; the problems are logged
// as file:line and returned. Requests already being decided finish under
// the rules they started with.
//
// Rules and credentials (including re-reading file: secrets) reload.
// Listeners, the CA, egress, limits, attestors, delegation and the demo need
// a restart: a change to them is logged and not applied.
func (rt *Runtime) Reload() error {
	st := &rt.reload
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.cfg == nil || st.cfg.Path == "" || st.cfg.embedded {
		return errors.New("config: nothing to reload: the broker runs the embedded quick start")
	}
	err := rt.reloadLocked(st)
	if err != nil {
		st.counter.WithLabelValues("failure").Inc()
		var ps Problems
		if errors.As(err, &ps) {
			for _, p := range ps {
				rt.log.Error("config reload rejected; the last good config keeps serving", zap.String("problem", p.Error()))
			}
		} else {
			rt.log.Error("config reload rejected; the last good config keeps serving", zap.Error(err))
		}
		return err
	}
	st.counter.WithLabelValues("success").Inc()
	rt.log.Info("config reloaded", zap.String("file", st.cfg.Path), zap.Int("rules", len(st.cfg.Rules)), zap.Int("credentials", len(st.cfg.Credentials)))
	return nil
}

func (rt *Runtime) reloadLocked(st *reloadState) error {
	c, err := LoadFile(st.cfg.Path)
	if err != nil {
		return err
	}
	ps := c.validate()
	set, rps := c.compileRules(st.clock)
	ps = append(ps, rps...)
	sources, sps := c.buildSources(sourceEnv{ctx: context.Background(), clock: st.clock, metrics: st.credMetrics,
		roots: st.roots, spiffe: c.spiffeSocket()}, st.vaults)
	if ps = append(ps, sps...); len(ps) > 0 {
		return sortProblems(ps)
	}
	old := st.cfg
	for _, ch := range []struct {
		name     string
		old, new any
	}{
		{"listen", old.Listen, c.Listen}, {"ca", old.CA, c.CA}, {"egress", old.Egress, c.Egress},
		{"limits", old.Limits, c.Limits}, {"attestors", old.Attestors, c.Attestors},
		{"delegation", old.Delegation, c.Delegation}, {"demo", old.Demo, c.Demo}, {"vaults", old.Vaults, c.Vaults},
		{"databases", old.Databases, c.Databases},
	} {
		if !reflect.DeepEqual(ch.old, ch.new) {
			rt.log.Warn("config: this section changed but needs a restart to apply; the running value stays", zap.String("section", ch.name))
		}
	}
	if len(c.Rules) == 0 && len(old.Rules) > 0 {
		// Valid, and fails closed, but rarely meant: say so loudly.
		rt.log.Warn("config: the reloaded file has no rules; every request is now denied", zap.String("file", c.Path))
	}
	pipe := &broker.Pipeline{Attestor: st.chain, Policy: set, Sources: sources, Clock: st.clock}
	rt.Proxy.SetPipeline(pipe)
	if rt.ProxyTLS != nil {
		rt.ProxyTLS.SetPipeline(pipe)
	}
	for _, db := range rt.Databases {
		db.SetPipeline(pipe)
	}
	// The replaced sources' cached leases are revoked once the requests
	// still using them finish (at most replacedGrace).
	replaced := st.closers
	st.closers = sourceClosers(sources)
	if len(replaced) > 0 {
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), replacedGrace)
			defer cancel()
			closeAll(ctx, st.log, "a replaced credential cache", replaced)
		}()
	}
	// Keep the running values of restart-only sections, so the next reload
	// compares against what is actually serving.
	applied := *old
	applied.Rules, applied.Credentials, applied.root = c.Rules, c.Credentials, c.root
	st.cfg = &applied
	return nil
}

// watch reloads when the config file changes. It watches the directory, not
// the file, so editors that replace the file and Kubernetes ConfigMaps
// (which swap a ..data symlink) are both seen; events are debounced.
func (rt *Runtime) watch(ctx context.Context) error {
	path := rt.reload.cfg.Path
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("config: watch: %w", err)
	}
	dir := filepath.Dir(path)
	if err := w.Add(dir); err != nil {
		w.Close()
		return fmt.Errorf("config: watch %s: %w", dir, err)
	}
	target, _ := filepath.EvalSymlinks(path)
	go func() {
		defer w.Close()
		var timer *time.Timer
		fire := make(chan struct{}, 1)
		for {
			select {
			case <-ctx.Done():
				return
			case ev, ok := <-w.Events:
				if !ok {
					return
				}
				name := filepath.Base(ev.Name)
				if name != filepath.Base(path) && name != "..data" && ev.Name != target {
					continue
				}
				if timer != nil {
					timer.Stop()
				}
				timer = time.AfterFunc(250*time.Millisecond, func() {
					select {
					case fire <- struct{}{}:
					default:
					}
				})
			case <-fire:
				_ = rt.Reload() // logs and counts its own outcome
				target, _ = filepath.EvalSymlinks(path)
			case err, ok := <-w.Errors:
				if !ok {
					return
				}
				rt.log.Warn("config watch error", zap.Error(err))
			}
		}
	}()
	return nil
}
