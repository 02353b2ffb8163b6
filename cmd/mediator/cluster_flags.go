package main

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"d2m-mediator/cluster"
	"d2m-mediator/mediator/daemon"
)

// clusterFlags are serve's cluster-mode flags; without --cluster-etcd the
// mediator runs as a single node, exactly as before.
type clusterFlags struct {
	etcd, nodeID, advertise, prefix string
	adminAdvertise, caFile          string
	leaseTTL                        time.Duration
	cacert, cert, key, user         string
	passwordFile                    string
	autoRebalance                   bool
	maxMoves                        int
}

func (c *clusterFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&c.etcd, "cluster-etcd", "", "cluster mode: comma-separated etcd `endpoints` (absent: a single node)")
	fs.StringVar(&c.nodeID, "node-id", "", "cluster mode: this node's `id` (letters, digits, '.', '_', '-'; stable across restarts)")
	fs.StringVar(&c.advertise, "advertise", "", "cluster mode: `host:port` other nodes and the load balancer reach the device listener at (default: the listener's address)")
	fs.StringVar(&c.adminAdvertise, "cluster-admin-advertise", "", "cluster mode: `host:port` other nodes reach the admin listener at; they forward admin requests for this node's shards there (default: the admin listener's address; on 0.0.0.0 or [::], the --advertise host with the admin port)")
	fs.StringVar(&c.caFile, "cluster-ca-file", "", "cluster mode: CA certificate `file` that verifies the other nodes' --tls-cert when they forward devices and send shards to each other over TLS (default: the system roots)")
	fs.StringVar(&c.prefix, "cluster-prefix", cluster.DefaultPrefix, "cluster mode: etcd key `prefix`")
	fs.DurationVar(&c.leaseTTL, "cluster-lease-ttl", 5*time.Second, "cluster mode: node lease TTL (whole seconds); acks for a shard stop at the last keepalive sent + TTL - TTL/5")
	fs.BoolVar(&c.autoRebalance, "cluster-auto-rebalance", true, "cluster mode: the elected controller moves shards so that every node serves its share (a node that joins takes shards, a drained one gives them away), a few at a time")
	fs.IntVar(&c.maxMoves, "cluster-max-moves", 0, "cluster mode: planned moves a rebalance or drain makes at once (`n`; 0: 4)")
	fs.StringVar(&c.cacert, "etcd-cacert", "", "CA certificate `file` that signed etcd's server certificates (enables TLS)")
	fs.StringVar(&c.cert, "etcd-cert", "", "client certificate `file` for etcd (with --etcd-key)")
	fs.StringVar(&c.key, "etcd-key", "", "client key `file` for etcd")
	fs.StringVar(&c.user, "etcd-user", "", "etcd user `name` (password from --etcd-password-file)")
	fs.StringVar(&c.passwordFile, "etcd-password-file", "", "`file` holding the etcd user's password")
}

// config turns the flags into daemon.ClusterConfig; nil without
// --cluster-etcd.
func (c *clusterFlags) config() (*daemon.ClusterConfig, error) {
	if c.etcd == "" {
		if c.nodeID != "" || c.advertise != "" || c.adminAdvertise != "" || c.caFile != "" {
			return nil, errors.New("--node-id, --advertise, --cluster-admin-advertise and --cluster-ca-file need --cluster-etcd")
		}
		return nil, nil
	}
	if !cluster.ValidNodeID(c.nodeID) {
		return nil, fmt.Errorf("--node-id %q: cluster mode needs a node id of 1-63 letters, digits, '.', '_' or '-'", c.nodeID)
	}
	if c.leaseTTL < time.Second || c.leaseTTL%time.Second != 0 {
		return nil, errors.New("--cluster-lease-ttl must be whole seconds, at least 1s")
	}
	if c.adminAdvertise != "" {
		if host, port, err := net.SplitHostPort(c.adminAdvertise); err != nil || host == "" || port == "" {
			return nil, fmt.Errorf("--cluster-admin-advertise %q: want host:port", c.adminAdvertise)
		}
	}
	var roots *x509.CertPool
	if c.caFile != "" {
		var err error
		if roots, err = loadCA("--cluster-ca-file", c.caFile); err != nil {
			return nil, err
		}
	}
	ec := clientv3.Config{DialTimeout: 5 * time.Second}
	for _, e := range strings.Split(c.etcd, ",") {
		if e = strings.TrimSpace(e); e != "" {
			ec.Endpoints = append(ec.Endpoints, e)
		}
	}
	if (c.cert == "") != (c.key == "") {
		return nil, errors.New("--etcd-cert and --etcd-key go together")
	}
	if c.cacert != "" || c.cert != "" {
		tc := &tls.Config{MinVersion: tls.VersionTLS12}
		if c.cacert != "" {
			var err error
			if tc.RootCAs, err = loadCA("--etcd-cacert", c.cacert); err != nil {
				return nil, err
			}
		}
		if c.cert != "" {
			kp, err := tls.LoadX509KeyPair(c.cert, c.key)
			if err != nil {
				return nil, fmt.Errorf("--etcd-cert/--etcd-key: %w", err)
			}
			tc.Certificates = []tls.Certificate{kp}
		}
		ec.TLS = tc
	}
	if c.user != "" {
		if c.passwordFile == "" {
			return nil, errors.New("--etcd-user needs --etcd-password-file")
		}
		pw, err := os.ReadFile(c.passwordFile)
		if err != nil {
			return nil, fmt.Errorf("--etcd-password-file: %w", err)
		}
		ec.Username, ec.Password = c.user, strings.TrimRight(string(pw), "\r\n")
	}
	if c.maxMoves < 0 {
		return nil, errors.New("--cluster-max-moves must not be negative (0: the default, 4)")
	}
	return &daemon.ClusterConfig{
		Etcd: ec, NodeID: c.nodeID, Advertise: c.advertise, AdminAdvertise: c.adminAdvertise,
		Prefix: c.prefix, LeaseTTL: c.leaseTTL, RootCAs: roots,
		AutoRebalance: c.autoRebalance, MaxConcurrentMoves: c.maxMoves,
	}, nil
}

// loadCA reads a PEM file of CA certificates for flag.
func loadCA(flag, file string) (*x509.CertPool, error) {
	pem, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", flag, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s %s: no PEM certificate in it", flag, file)
	}
	return pool, nil
}
