// Package cluster tests package d2m-mediator/cluster against a real etcd:
// three embedded etcd members (go.etcd.io/etcd/server/v3/embed) on
// loopback. It is a module of its own so that the etcd server never
// becomes a dependency of the mediator binary; `make test` runs it.
//
// Besides the control plane it runs whole nodes: in-process
// (mediator_test.go, lifecycle_test.go) and as `mediator serve` processes
// (process_test.go, postgres_test.go); network faults between every pair
// of parts through internal/faultproxy (faults_*_test.go, the checks they
// share in faults_test.go); and the hour-long soak of `make soak`
// (soak_test.go, skipped unless SOAK is set).
package cluster
