// Package cluster tests package d2m-mediator/cluster against a real etcd:
// three embedded etcd members (go.etcd.io/etcd/server/v3/embed) on
// loopback. It is a module of its own so that the etcd server never
// becomes a dependency of the mediator binary; `make test` runs it.
package cluster
